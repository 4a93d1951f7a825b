"""The TOML files people write: fleet.toml, server.toml, agent.toml.

Each is decoded strictly (unknown fields are errors) and every error is one line naming the
file and the field: `fleet.toml: hosts.alpha.operation: Invalid enum value 'swtich'`.

Each may say which config format it is written for (`format = 1`, the default; see
protocol.formats): a herald that adds keys to a file raises its number, so a file written for a
newer herald is refused in one line that says so rather than as a typo in the new keys.
"""

import base64
import re
import string
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar

import msgspec

from protocol import formats
from protocol.errors import ConfigError
from protocol.reserved import is_reserved
from protocol.topics import DEFAULT_PREFIX, is_host_name

_DURATION = r"^[1-9][0-9]*(s|m|h|d)$"
_ENDPOINT = r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$"
_PREFIX = r"^[A-Za-z0-9_-]{1,32}$"
_LISTENER = r"^(off|(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):[0-9]{1,5})$"
Listener = Annotated[str, msgspec.Meta(pattern=_LISTENER)]
_SIZE = r"^[1-9][0-9]*(K|M|G|T)$"
Size = Annotated[str, msgspec.Meta(pattern=_SIZE)]
_LOOPBACK = r"^(off|(127\.0\.0\.1|\[::1\]|localhost):[0-9]{1,5})$"
Loopback = Annotated[str, msgspec.Meta(pattern=_LOOPBACK)]
Duration = Annotated[str, msgspec.Meta(pattern=_DURATION)]
Endpoint = Annotated[str, msgspec.Meta(pattern=_ENDPOINT)]
Prefix = Annotated[str, msgspec.Meta(pattern=_PREFIX)]
_WINDOW = r"^([01][0-9]|2[0-3]):[0-5][0-9]-([01][0-9]|2[0-3]):[0-5][0-9]$"
Window = Annotated[str, msgspec.Meta(pattern=_WINDOW)]

# What to tell a person instead of msgspec's "Expected `str` matching regex '...'".
_PATTERN_HINTS: Final = {
    _DURATION: "expected a duration such as '90s', '15m', '1h' or '2d'",
    _ENDPOINT: "expected HOST:PORT, such as '127.0.0.1:1883' or '[::1]:2222'",
    _PREFIX: "expected one topic level of letters, digits, '_' or '-'",
    _LISTENER: "expected HOST:PORT, such as '127.0.0.1:1883', or 'off'",
    _SIZE: "expected a size such as '512M' or '20G'",
    _LOOPBACK: "expected a loopback address and port, such as '127.0.0.1:9999', or 'off'",
    _WINDOW: "expected a local time window such as '02:00-04:00' (it may cross midnight)",
}

_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SSH_KEY_RE: Final = re.compile(r"(?P<type>[a-z0-9@.-]+) (?P<blob>[A-Za-z0-9+/]+={0,2})(?: .*)?")


def seconds(duration: str) -> int:
    """Seconds in a Duration such as '15m'."""
    return int(duration[:-1]) * _UNITS[duration[-1]]


def size_bytes(size: str) -> int:
    """Bytes in a Size such as '20G' (binary units)."""
    return int(size[:-1]) << {"K": 10, "M": 20, "G": 30, "T": 40}[size[-1]]


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """('127.0.0.1', 1883) from '127.0.0.1:1883'; ('::1', 22) from '[::1]:22'."""
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def check_ssh_public_key(text: str) -> str:
    """The key itself if `text` looks like one OpenSSH public key line, else ValueError."""
    match = _SSH_KEY_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError("not an OpenSSH public key line ('ssh-ed25519 AAAA... comment')")
    try:
        blob = base64.b64decode(match["blob"], validate=True)
    except ValueError as exc:
        raise ValueError("public key is not valid base64") from exc
    kind = match["type"].encode()
    if blob[4 : 4 + len(kind)] != kind or int.from_bytes(blob[:4], "big") != len(kind):
        raise ValueError(f"public key blob does not hold a {match['type']} key")
    return f"{match['type']} {match['blob']}"


def authorized_key(line: str) -> str | None:
    """The key of an authorized_keys line ('restrict ssh-ed25519 AAAA... comment'), or None."""
    words = line.split()
    for index in range(len(words) - 1):
        try:
            return check_ssh_public_key(f"{words[index]} {words[index + 1]}")
        except ValueError:
            continue
    return None


def check_placeholders(field: str, argv: list[str], allowed: set[str]) -> None:
    """ValueError naming the first {placeholder} of `argv` that is not in `allowed`."""
    for word in argv:
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(word) if name is not None]
        except ValueError as exc:
            raise ValueError(f"{field}: {word!r}: {exc} (write {{{{ and }}}} for braces)") from None
        for name in names:
            if name not in allowed:
                known = ", ".join(f"{{{n}}}" for n in sorted(allowed))
                raise ValueError(f"{field}: unknown placeholder {{{name}}} (known: {known})")


# ---------------------------------------------------------------- modes of files/

_MODE_RE: Final = re.compile(r"0?[0-7]{3}")
_GLOB_CHARS: Final = frozenset("*?[")
_BAD_PARTS: Final = frozenset(("", ".", ".."))
DeclaredModes = dict[str, str | int]  # a `files` table as written: path below files/ -> "0644"


def _quoted(value: object) -> str:
    return msgspec.json.encode(value).decode()


def _bad_path(key: str) -> str | None:
    """Why `key` cannot name a file or directory below files/, or None."""
    if key in ("", "/"):
        return "name a file or a directory below files/, such as 'etc/motd' or 'etc/ssl/'"
    if key.startswith("/"):
        return "a path relative to files/, without the leading '/'"
    if "\\" in key or "\0" in key:
        return "no backslash or NUL in a path"
    if not _GLOB_CHARS.isdisjoint(key):
        return "globs are not supported: name a file, or a directory with a trailing '/'"
    if not _BAD_PARTS.isdisjoint(key.removesuffix("/").split("/")):
        return "a path relative to files/, with no '..', '.' or empty parts"
    return None


def declared_modes(files: DeclaredModes) -> dict[str, int]:
    """A `files` table of fleet.toml as {path below files/: mode}; ValueError (TypeError for a
    mode that is not a string) naming the first bad entry. A key names a file ('etc/motd') or,
    ending in '/', a directory and everything below it ('etc/ssl/'). A mode is three octal
    digits, with an optional leading 0 ('0644'): no setuid, setgid or sticky bit, as the agent
    installs files as root."""
    modes: dict[str, int] = {}
    for key, value in files.items():
        why = _bad_path(key)
        if why is not None:
            raise ValueError(f"files: {_quoted(key)}: {why}")
        if not isinstance(value, str):
            hint = _quoted(f"{value:0>4}")
            raise TypeError(f"files: {_quoted(key)} = {value}: write the mode as a string, such as {hint}")
        if not _MODE_RE.fullmatch(value):
            raise ValueError(
                f"files: {_quoted(key)} = {_quoted(value)}: expected an octal mode such as "
                "'0644', '0640' or '0755' (setuid, setgid and sticky bits are refused)"
            )
        modes[key] = int(value, 8)
    return modes


class Deliver(StrEnum):
    """How a host gets its system: it builds the released configuration itself (`source`), or
    the publisher builds it and the host imports the signed closure (`closure`)."""

    SOURCE = "source"
    CLOSURE = "closure"


class Operation(StrEnum):
    SWITCH = "switch"
    BOOT = "boot"
    TEST = "test"


class _Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


ConfigFormat = Annotated[int, msgspec.Meta(ge=1)]  # checked against formats.CONFIG when loaded


# ---------------------------------------------------------------- fleet.toml


class HostEntry(_Settings, frozen=True, kw_only=True):
    """One `[hosts.<name>]` table of fleet.toml."""

    ssh_key: str
    operation: Operation = Operation.SWITCH
    poll: Duration | None = None
    tags: list[Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]] = []
    flake: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,128}$")] | None = None
    logs: Size = "64M"  # the most the host may keep in its logs/ (embedded server)
    backups: Size | None = None  # a backups/ directory for restic or duplicity, and its size cap
    files: DeclaredModes = {}  # modes of files/ for this host, over the fleet-wide [files]
    deliver: Deliver = Deliver.SOURCE

    def __post_init__(self) -> None:
        try:
            check_ssh_public_key(self.ssh_key)
        except ValueError as exc:
            raise ValueError(f"ssh_key: {exc}") from None
        declared_modes(self.files)


class PublishSettings(_Settings, frozen=True, kw_only=True):
    """`[publish]` in fleet.toml: what must pass before a host's release is published.

    `check` is an argv template run for every changed host; placeholders {release} (a directory
    holding the host's release), {host} and {flake}. Without it, herald parses every changed
    .nix file with `nix-instantiate --parse` where nix is installed; `check = []` checks
    nothing. `build` (optional) runs after a passing check, e.g. to build the system and push
    it to a binary cache. `keep` is how many releases each chroot keeps for agents mid-fetch.

    `format` is the release format to write (protocol.formats): 1 is what herald 0.1 agents
    read. Unset, each host keeps the format of its current release and a new host gets the
    newest; a host whose format changes gets a new generation with the same content.

    `system` builds the system of each changed host with `deliver = "closure"` (after its
    check), an argv template with the placeholders of `check`; the last line it prints is the
    system's store path. Unset: `nix build` of the flake's
    nixosConfigurations.<flake>.config.system.build.toplevel, or `nix-build '<nixpkgs/nixos>'
    -A system` of configuration.nix. With `substituter` (a binary cache), agents fetch the
    closure from there instead of the chroot; `push` (placeholders {system} {host}) runs once a
    system is built, before it is published, e.g. `nix copy --to <cache> {system}`: a host whose
    push fails is not published.
    """

    check: list[str] | None = None
    build: list[str] | None = None
    system: list[str] | None = None
    push: list[str] | None = None
    substituter: Annotated[str, msgspec.Meta(pattern=r"^(https?|file|s3)://[^\s]{1,2000}\Z")] | None = None
    timeout: Duration = "30m"
    keep: Annotated[int, msgspec.Meta(ge=2, le=100)] = 3
    format: int | None = None

    def __post_init__(self) -> None:
        check_placeholders("system", self.system or [], {"release", "host", "flake"})
        check_placeholders("push", self.push or [], {"system", "host"})
        if self.system == []:
            raise ValueError("system: an empty command builds nothing; leave it unset for the default")
        if self.format is not None and not 1 <= self.format <= formats.RELEASE:
            raise ValueError(
                f"format: this herald writes release formats 1 to {formats.RELEASE}, not {self.format}"
            )


Budget = Annotated[int, msgspec.Meta(ge=1, le=100_000)]


class Health(StrEnum):
    """What a wave must show before the next one starts (publisher.rollout)."""

    CONFIRMED = "confirmed"  # every host idle on the new generation (its agent confirmed the switch)
    SOAK = "soak"  # that, and none of them failing or rolling back until the soak is over


class RolloutWave(_Settings, frozen=True, kw_only=True):
    """One `[[rollout.waves]]` of fleet.toml: the hosts it takes (named, by tag, and the first
    `percent` of the fleet in an order fixed by a hash of each name), less those of the waves
    before it; how long it soaks; its own failure budget; when it may start; how long a host of
    it may take before it counts as failed."""

    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,32}$")]
    hosts: list[str] = []
    tags: list[Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]] = []
    percent: Annotated[int, msgspec.Meta(ge=1, le=100)] | None = None
    soak: Duration | None = None
    budget: Budget | None = None
    window: Window | None = None  # the server's local time; the wave starts only inside it
    health: Health = Health.CONFIRMED
    deadline: Duration | None = None  # from the wave's start: a host with no result by then has failed

    def __post_init__(self) -> None:
        if not (self.hosts or self.tags or self.percent):
            raise ValueError(f"waves: {self.name}: choose its hosts with hosts, tags or percent")
        if self.window is not None and self.window[:5] == self.window[6:]:
            raise ValueError(f"waves: {self.name}: window {self.window} starts where it ends: it never opens")


class RolloutPlan(_Settings, frozen=True, kw_only=True):
    """`[rollout]`: a new generation reaches the fleet wave by wave. `budget` is how many hosts
    failing or rolling back halt it (1: the first)."""

    budget: Budget = 1
    waves: Annotated[list[RolloutWave], msgspec.Meta(min_length=1, max_length=100)]

    def __post_init__(self) -> None:
        names = [wave.name for wave in self.waves]
        if len(set(names)) != len(names):
            raise ValueError("waves: each wave needs a name of its own")


class FleetConfig(_Settings, frozen=True, kw_only=True):
    """fleet.toml. `files` declares modes of files/ for every host (see publisher.modes): git
    keeps only the executable bit, so what is not declared is private. `rollout` holds new
    generations back, wave by wave (publisher.rollout)."""

    format: ConfigFormat = 1
    hosts: dict[str, HostEntry]
    publish: PublishSettings = PublishSettings()
    files: DeclaredModes = {}
    rollout: RolloutPlan | None = None

    def __post_init__(self) -> None:
        declared_modes(self.files)


# ---------------------------------------------------------------- server.toml


BrokerUrl = Annotated[str, msgspec.Meta(pattern=r"^mqtts?://")]
# One broker, or the nodes of a cluster (RabbitMQ, EMQX): a client uses one at a time and moves
# to the next when it fails; the publisher announces on each (README: "Past one machine").
BrokerUrls = BrokerUrl | Annotated[list[BrokerUrl], msgspec.Meta(min_length=1, max_length=64)]


def broker_urls(value: str | list[str] | None) -> list[str]:
    """A `broker`/`broker.url` setting as a list (empty when unset)."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


class ServerTLS(_Settings, frozen=True, kw_only=True):
    """An MQTT-over-TLS listener of the embedded broker."""

    listen: Endpoint
    cert: str
    key: str


class ServerConfig(_Settings, frozen=True, kw_only=True):
    """`herald serve`: one process with the broker, the SFTP server and the publisher.

    `mqtt = "off"` runs no embedded broker. With `broker` set (an external broker such as
    Mosquitto), herald announces there instead, and again each time it reconnects.
    `publish = false` leaves publishing to `herald publish` (its own unit, its own user): this
    process then never reads the signing key, and only announces what the chroots hold.
    """

    format: ConfigFormat = 1
    fleet: str
    state: str
    mqtt: Listener = "127.0.0.1:1883"
    sftp: Listener = "127.0.0.1:2222"  # "off" when OpenSSH serves the chroots
    prefix: Prefix = DEFAULT_PREFIX
    tls: ServerTLS | None = None
    websocket: Endpoint | None = None
    broker: BrokerUrls | None = None
    http: Listener = "127.0.0.1:8080"  # the fleet page, status.json and /metrics; or "off"
    publish: bool = True  # publish on start and on SIGHUP

    def __post_init__(self) -> None:
        if self.broker is not None and self.mqtt != "off":
            raise ValueError("broker: an external broker replaces the embedded one; set mqtt = 'off'")
        if self.mqtt == "off" and (self.tls is not None or self.websocket is not None):
            raise ValueError(
                "tls and websocket are listeners of the embedded broker, which mqtt = 'off' disables"
            )


# ---------------------------------------------------------------- agent.toml


class AgentServer(_Settings, frozen=True, kw_only=True):
    """Where the host's chroot is served, and the server's pinned host key."""

    address: str
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 22
    host_key: str

    def __post_init__(self) -> None:
        try:
            check_ssh_public_key(self.host_key)
        except ValueError as exc:
            raise ValueError(f"host_key: {exc}") from None


class AgentBroker(_Settings, frozen=True, kw_only=True):
    url: BrokerUrls | None = None
    keepalive: Annotated[int, msgspec.Meta(ge=5, le=60)] = 60
    prefix: Prefix = DEFAULT_PREFIX
    ca: str | None = None  # for mqtts:// with a private CA; else the system's CAs


class AgentRebuild(_Settings, frozen=True, kw_only=True):
    """The rebuild command, as an argv template.

    Placeholders: {operation} {dir} {host} {flake}. Without `command`, herald runs
    `nixos-rebuild {operation} --flake {dir}#{flake}` for a release with flake.nix and
    `nixos-rebuild {operation} -I nixos-config={dir}/configuration.nix` otherwise.

    A rollback (a switch not confirmed, a rebuild that failed after the system moved, the
    `rollback` command) returns to the exact store path recorded before: without `rollback`,
    `nix-env --profile /nix/var/nix/profiles/system --set {system}` and
    `{system}/bin/switch-to-configuration {operation}`; with it, that argv (placeholders
    {system} {operation} {host}) instead.
    """

    command: list[str] | None = None
    operation: Operation | None = None
    timeout: Duration = "1h"
    rollback: list[str] | None = None

    def __post_init__(self) -> None:
        check_placeholders("command", self.command or [], {"operation", "dir", "host", "flake"})
        check_placeholders("rollback", self.rollback or [], {"host", "system", "operation"})


class AgentConfirm(_Settings, frozen=True, kw_only=True):
    """After a switch, the agent must reach the server (SFTP, and the broker if it has one) and
    pass `health` (an argv, exit 0) within `window`; otherwise it rolls back."""

    window: Duration = "60s"
    health: list[str] | None = None


class AgentPostpone(_Settings, frozen=True, kw_only=True):
    """When a new generation waits (reported as `postponed`). A `rebuild` command from the
    sysadmin and "Update now" on the local page apply it all the same.

    `on_battery` reads `power_supply` (sysfs): on battery when no mains or USB supply is online
    and a battery discharges. `on_metered` runs `metered` and reads its output: NetworkManager's
    `Metered` property ('u 1' or 'u 3' through busctl) or nmcli's 'yes' / 'yes (guessed)'.
    """

    on_battery: bool = False
    on_metered: bool = False
    power_supply: str = "/sys/class/power_supply"
    metered: list[str] = msgspec.field(
        default_factory=lambda: [
            "busctl",
            "get-property",
            "org.freedesktop.NetworkManager",
            "/org/freedesktop/NetworkManager",
            "org.freedesktop.NetworkManager",
            "Metered",
        ]
    )
    recheck: Duration = "1m"  # how often a postponed update looks again (locally, no network)


class AgentReboot(_Settings, frozen=True, kw_only=True):
    """A reboot is needed when the system that boots next has another kernel, initrd or kernel
    modules than the booted one (`/run/booted-system` against the system profile). With a
    `window` (local time, e.g. '02:00-04:00'), the agent runs `command` inside it; without one
    it only reports `needs_reboot`."""

    window: Window | None = None
    command: list[str] = msgspec.field(default_factory=lambda: ["systemctl", "reboot"])


class AgentNotify(_Settings, frozen=True, kw_only=True):
    """Desktop notifications: with `command` set, an applied, failed or rolled-back update and a
    needed reboot are shown to every user with a session bus under `runtime_dir`, the command
    running as that user with DBUS_SESSION_BUS_ADDRESS set. Placeholders: {summary} {body}
    {urgency} (low, normal or critical)."""

    command: list[str] | None = None
    runtime_dir: str = "/run/user"
    timeout: Duration = "10s"

    def __post_init__(self) -> None:
        check_placeholders("command", self.command or [], {"summary", "body", "urgency"})


class AgentRestart(_Settings, frozen=True, kw_only=True):
    """After a confirmed deployment that changed agent.toml or the herald package, the agent
    restarts itself: it runs `command` (e.g. `systemctl --no-block restart herald-agent.service`,
    which the NixOS module sets, so that systemd starts the new package), else it executes itself
    again with the same arguments."""

    command: list[str] | None = None


class AgentConfig(_Settings, frozen=True, kw_only=True):
    format: ConfigFormat = 1
    host: str
    ssh_key: str
    state_dir: str = "/var/lib/herald"
    root: str = "/"
    # The Nix store delivered systems are imported into and run from: the machine's own ("/"),
    # or a chroot store at another directory (`nix-store --store DIR`: a system being installed).
    store: str = "/"
    # Which releases this host applies: unset, what each carries; "closure", only built systems
    # (a small host that must never evaluate); "source", only configurations it builds itself
    # (a host the server cannot build for). Another release is refused, as failed.
    deliver: Deliver | None = None
    poll: Duration = "15m"
    publisher_key: str | None = None
    server: AgentServer
    broker: AgentBroker = AgentBroker()
    rebuild: AgentRebuild = AgentRebuild()
    confirm: AgentConfirm = AgentConfirm()
    postpone: AgentPostpone = AgentPostpone()
    reboot: AgentReboot = AgentReboot()
    notify: AgentNotify = AgentNotify()
    restart: AgentRestart = AgentRestart()
    trigger: Loopback = "127.0.0.1:9999"  # the local page with an "Update now" button; or "off"

    def __post_init__(self) -> None:
        if not is_host_name(self.host):
            raise ValueError(f"host {self.host!r} is not a valid host name")
        if not self.store.startswith("/"):
            raise ValueError(
                f"store: {self.store!r}: the root directory of a Nix store, an absolute path such as '/'"
            )


# ---------------------------------------------------------------- loading

S = TypeVar("S", bound=msgspec.Struct)


def _where(exc: msgspec.ValidationError, prefix: str) -> str:
    """'hosts.alpha.poll: Expected ...' from msgspec's 'Expected ... - at `$.poll`'."""
    message, sep, location = str(exc).rpartition(" - at `")
    if not sep:
        message, location = location, ""
    for pattern, hint in _PATTERN_HINTS.items():
        escaped = pattern.replace("\\", "\\\\")  # msgspec shows the pattern with backslashes doubled
        if message.endswith((f"matching regex '{pattern}'", f"matching regex '{escaped}'")):
            message = hint
    path = location.rstrip("`").removeprefix("$").lstrip(".")
    path = ".".join(part for part in (prefix, path) if part)
    if message.startswith("Invalid enum value") and path.rsplit(".", 1)[-1] == "operation":
        message += f" (one of: {', '.join(operation.value for operation in Operation)})"
    return f"{path}: {message}" if path else message


def convert(data: object, kind: type[S], *, source: str, at: str = "") -> S:
    try:
        return msgspec.convert(data, kind, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_where(exc, at)}") from exc


def read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc


def check_format(data: dict[str, Any], source: str) -> None:
    """A file written for a newer herald says so, before its new keys read as typos."""
    found = data.get("format", 1)
    if isinstance(found, int) and not isinstance(found, bool) and found > formats.CONFIG:
        raise ConfigError(
            f"{source}: format {found} is newer than this herald reads ({formats.CONFIG}): upgrade "
            f"herald, or write the file for format {formats.CONFIG}"
        )


def load(path: Path, kind: type[S]) -> S:
    """Decode the TOML file at `path` strictly as `kind`."""
    data = read_toml(path)
    check_format(data, str(path))
    return convert(data, kind, source=str(path))


def load_fleet(path: Path) -> FleetConfig:
    """fleet.toml, each host decoded on its own so that errors name the host."""
    data = read_toml(path)
    check_format(data, str(path))
    hosts = data.get("hosts")
    if not isinstance(hosts, dict) or not hosts:
        raise ConfigError(f"{path}: hosts: at least one [hosts.<name>] table is required")
    for name, entry in hosts.items():
        if not is_host_name(name):
            raise ConfigError(
                f"{path}: hosts.{name}: invalid host name (lower-case letters, digits and '-', "
                "starting with a letter, at most 32 characters, not starting with 'herald-')"
            )
        if is_reserved(name):
            raise ConfigError(
                f"{path}: hosts.{name}: {name!r} is a system user or group on NixOS or Debian, and "
                "the host's own user and group would merge with it; rename the host"
            )
        hosts[name] = convert(entry, HostEntry, source=str(path), at=f"hosts.{name}")
    keys: dict[str, str] = {}
    for name, entry in hosts.items():  # a key is how the server tells hosts apart
        key = " ".join(entry.ssh_key.split()[:2])  # type and blob: checked by HostEntry already
        if key in keys:
            raise ConfigError(
                f"{path}: hosts.{name}: ssh_key is hosts.{keys[key]}'s too; each host needs a key of its "
                f"own (whoever holds it could log in as either host)"
            )
        keys[key] = name
    return convert(data, FleetConfig, source=str(path))
