"""`herald host remove NAME`: a host leaves the server's world, and nothing of it stays behind.

In this order, under the publish lock (so that no publish runs between the steps):

1. its access: its authorized key, its broker user, its entry in access.json: no new login;
2. its live sessions: a running `herald serve` (herald.control) closes its SFTP connections,
   drops its MQTT sessions without their will, clears its retained `desired`, `command`,
   `state` and `online` and forgets it in the fleet view (the page, /metrics). With an external
   broker and no `serve` holding it, the retained messages are cleared over MQTT: `desired` as
   the publisher, `command` as the admin, `state` and `online` as the host itself (the only
   user the broker's rules let write them), with the secret in its chroot;
3. with OpenSSH, its processes (its sshd sessions: they run as its user);
4. its logs/, into an archive, if asked; then its chroot (releases, private objects,
   credentials, logs, backups/) and the pool entries no other host links;
5. with OpenSSH, its account and group (only an account marked "herald host", as provision made
   it) and its name in the sshd_config fragment.

Its line in STATE/publisher/generations.json stays: a machine that comes back under the same
name with its old agent state is then offered generations above the one it ran, never below.
"""

import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from herald.backup import add_host_file
from herald.control import Answer, ask
from herald.output import console, warn
from protocol.credentials import Secret, format_passwd, parse_passwd, read_secret
from protocol.errors import ConfigError, UnreachableError
from protocol.files import write_atomic
from protocol.layout import Access, StateDir
from protocol.mqtt import BrokerURL, parse_urls
from protocol.release import BROKER_SECRET, CREDENTIALS, LOGS, OBJECTS
from protocol.settings import load_fleet
from protocol.topics import ADMIN_USER, PUBLISHER_USER, Kind, Topics, is_host_name
from publisher.accounts import MARK
from publisher.chroot import Pool
from publisher.closure import prune_roots
from publisher.publish import publish_lock
from publisher.rollout import book_path, forget, read_book


@dataclass(frozen=True, slots=True)
class Step:
    what: str
    run: Callable[[], str | None]  # what was done, when it says more than `what`


class Removal:
    def __init__(
        self,
        state: Path,
        host: str,
        *,
        archive: Path | None = None,
        brokers: list[BrokerURL] | None = None,
        topics: Topics | None = None,
    ) -> None:
        if not is_host_name(host):
            raise ConfigError(f"{host!r} is not a host name")
        self.state = StateDir(state.absolute())
        self.host = host
        self.archive = archive
        self.brokers = brokers or []  # an external broker, or each node of a cluster
        self.topics = topics or Topics()
        self.chroot = self.state.chroot(host)
        self.served: Answer | None = None

    # ---------------------------------------------------------------- the plan

    def plan(self) -> list[Step]:
        host, steps = self.host, []
        key = self.state.authorized_keys(host)
        if key.exists():
            steps.append(Step(f"remove {host}'s SSH key ({key})", lambda: key.unlink(missing_ok=True)))
        if host in self._passwd():
            steps.append(Step(f"remove broker user {host} from {self.state.passwd}", self._drop_broker_user))
        if host in self._access():
            steps.append(Step(f"remove {host} from {self.state.access}", self._drop_access))
        steps.append(Step(f"drop {host}'s live sessions and retained messages", self._drop_sessions))
        if self._in_rollout():
            steps.append(
                Step(f"remove {host} from the rollout ({book_path(self.state)})", self._leave_rollout)
            )
        account = _account(host)
        if account is not None:
            steps.append(Step(f"end {host}'s processes (its sshd sessions)", lambda: _kill_user(account)))
        if self.chroot.is_dir():
            if self.archive is not None:
                target = self.archive / f"{host}-logs-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.tar.gz"
                steps.append(Step(f"archive {host}'s logs/ to {target}", lambda: self._archive(target)))
            steps.append(Step(f"delete {self.chroot} and the pool entries only it used", self._delete_chroot))
        steps += self._roots()
        if account is not None:
            steps.append(Step(f"delete user {host} and its group", lambda: _delete_account(account)))
        fragment = self.state.root / "ssh" / "sshd_config"
        if fragment.exists() and _matched_hosts(fragment.read_text(encoding="utf-8"), host):
            steps.append(Step(f"remove {host} from {fragment}", lambda: _unmatch(fragment, host)))
        return steps

    def _roots(self) -> list[Step]:
        """Dropping the GC roots that kept the host's built systems in the server's store."""
        host, roots = self.host, self.state.publisher / "roots"
        if not any(name.rpartition("-")[0] == host for name in _names(roots)):
            return []
        return [
            Step(f"drop the GC roots of {host}'s systems ({roots})", lambda: prune_roots(roots, {host: ()}))
        ]

    def known(self) -> bool:
        return (
            self.chroot.exists()
            or self.state.authorized_keys(self.host).exists()
            or self.host in self._passwd()
            or _account(self.host) is not None
        )

    # ---------------------------------------------------------------- access

    def _passwd(self) -> dict[str, str]:
        try:
            return parse_passwd(self.state.passwd.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}

    def _drop_broker_user(self) -> None:
        users = self._passwd()
        users.pop(self.host, None)
        write_atomic(self.state.passwd, format_passwd(users).encode(), mode=0o600)

    def _access(self) -> dict[str, Access]:
        try:
            return msgspec.json.decode(self.state.access.read_bytes(), type=dict[str, Access])
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            return {}

    def _drop_access(self) -> None:
        table = self._access()
        table.pop(self.host, None)
        write_atomic(self.state.access, msgspec.json.encode(table), mode=0o644)

    # ---------------------------------------------------------------- sessions

    def _drop_sessions(self) -> str:
        answer = ask(self.state.root, self.host)
        self.served = answer
        said = []
        if answer is not None:
            if answer.error:
                raise ConfigError(f"herald serve refused: {answer.error}")
            said.append(
                f"herald serve closed {answer.sftp_sessions} SFTP connection(s), dropped "
                f"{answer.mqtt_sessions} MQTT session(s), cleared {len(answer.retained)} retained message(s)"
            )
        if self.brokers and (answer is None or not answer.broker):
            said.extend(self._clear_external(url) for url in self.brokers)  # each node keeps its own
        return "; ".join(said) or "no herald serve runs on this state and no broker was named: none to drop"

    def _clear_external(self, url: BrokerURL) -> str:
        from herald.runner import run  # noqa: PLC0415 - MQTT only when a broker is named

        try:
            run(self._clear_retained(url))
        except UnreachableError as exc:
            warn(f"{self.host}'s retained messages not cleared: {exc}")
            return f"retained messages on {url} not cleared"
        return (
            f"cleared {self.host}'s retained messages on {url}; it keeps admitting {self.host} "
            "until you export its users again (herald broker export) and restart it"
        )

    # ---------------------------------------------------------------- the rollout

    def _in_rollout(self) -> bool:
        try:
            book = read_book(self.state)
        except ConfigError:
            return False
        rollout = book.rollout
        return self.host in book.aborted or (
            rollout is not None
            and (self.host in rollout.hosts or any(self.host in wave.hosts for wave in rollout.waves))
        )

    def _leave_rollout(self) -> str:
        forget(self.state, self.host)
        return f"{self.host} is in no rollout any more: given its name again, a host starts afresh"

    async def _clear_retained(self, url: BrokerURL) -> None:
        import aiomqtt  # noqa: PLC0415

        from protocol.mqtt import connect, unreachable  # noqa: PLC0415

        secrets: list[tuple[str, Secret, list[Kind]]] = [
            (PUBLISHER_USER, read_secret(self.state.service_secret(PUBLISHER_USER)), [Kind.DESIRED]),
            (ADMIN_USER, read_secret(self.state.service_secret(ADMIN_USER)), [Kind.COMMAND]),
        ]
        with contextlib.suppress(OSError, ConfigError):
            own = read_secret(self.chroot / CREDENTIALS / BROKER_SECRET)
            secrets.append((self.host, own, [Kind.STATE, Kind.ONLINE]))
        for user, secret, kinds in secrets:
            try:
                async with connect(url, username=user, password=secret, timeout=10) as client:
                    for kind in kinds:
                        await client.publish(self.topics.of(self.host, kind), b"", qos=1, retain=True)
            except (aiomqtt.MqttError, OSError) as exc:
                raise unreachable(url, user, exc) from exc

    # ---------------------------------------------------------------- files

    def _archive(self, target: Path) -> str:
        target.parent.mkdir(parents=True, exist_ok=True)
        logs, count = self.chroot / LOGS, 0
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            names = sorted(os.listdir(logs))
        except OSError:
            names = []
        with os.fdopen(fd, "wb") as stream, tarfile.open(fileobj=stream, mode="w:gz") as archive:
            for name in names:
                count += add_host_file(archive, logs / name, f"{self.host}/{name}")
        return f"archived {count} log(s) of {self.host} to {target}"

    def _delete_chroot(self) -> str:
        try:
            objects = set(os.listdir(self.chroot / OBJECTS))
        except OSError:
            objects = set()
        shutil.rmtree(self.chroot)  # never follows a link (fd-based on Linux): a host's links stay links
        Pool(self.state.objects).prune(objects)
        return f"deleted {self.chroot}"

    # ---------------------------------------------------------------- running it

    def run(self, *, dry_run: bool, say: Callable[[str], None]) -> list[Step]:
        with publish_lock(self.state.publisher / "lock"):
            if not self.known():
                raise ConfigError(f"no host {self.host} on this server ({self.state.root})")
            steps = self.plan()
            for step in steps:
                if dry_run:
                    say(f"would {step.what}")
                    continue
                said = step.run()
                say(said or step.what.replace("remove ", "removed ", 1).replace("delete ", "deleted ", 1))
        return steps


# ---------------------------------------------------------------- OpenSSH's account


def _account(host: str) -> pwd.struct_passwd | None:
    """The host's account, if provision made it (marked MARK); never any other."""
    try:
        account = pwd.getpwnam(host)
    except KeyError:
        return None
    return account if account.pw_gecos == MARK else None


def _processes_of(uid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            for line in (
                Path(f"/proc/{entry}/status").read_text(encoding="ascii", errors="replace").splitlines()
            ):
                if line.startswith("Uid:"):
                    if int(line.split()[1]) == uid:
                        found.append(int(entry))
                    break
    return found


def _kill_user(account: pwd.struct_passwd) -> str:
    """SIGKILL every process of the host's user (sshd's session processes run as it), until none
    is left (bounded: 10 s). Only an account marked MARK ever gets here."""
    killed: set[int] = set()
    deadline = time.monotonic() + 10
    while (pids := _processes_of(account.pw_uid)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            except PermissionError:
                raise ConfigError(f"cannot end {account.pw_name}'s processes: run this as root") from None
            killed.add(pid)
        time.sleep(0.05)
    if _processes_of(account.pw_uid):
        raise ConfigError(f"processes of {account.pw_name} still run after 10 s; not removing its account")
    return f"ended {len(killed)} process(es) of {account.pw_name}"


def _delete_account(account: pwd.struct_passwd) -> str:
    name = account.pw_name
    _command("userdel", name)
    with contextlib.suppress(KeyError):
        group = grp.getgrnam(name)
        if group.gr_gid == account.pw_gid and not group.gr_mem:  # the group provision made with it
            _command("groupdel", name)
    return f"deleted user {name} and its group"


def _command(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    if done.returncode != 0:
        raise ConfigError(f"{' '.join(argv)}: {done.stderr.strip() or f'exit {done.returncode}'}")


_MATCH = re.compile(r"^Match User (\S+)$", re.MULTILINE)


def _matched_hosts(text: str, host: str) -> bool:
    found = _MATCH.search(text)
    return found is not None and host in found[1].split(",")


def _unmatch(fragment: Path, host: str) -> None:
    """The fragment without `host` in its Match line; without the block when no host is left."""
    text = fragment.read_text(encoding="utf-8")
    found = _MATCH.search(text)
    if found is None:
        return
    rest = [name for name in found[1].split(",") if name != host]
    text = (
        text[: found.start()] + f"Match User {','.join(rest)}" + text[found.end() :]
        if rest
        else text[: found.start()]
    )
    write_atomic(fragment, text.encode(), mode=0o644)


# ---------------------------------------------------------------- the command


def still_in_fleet(fleet: Path, host: str) -> bool:
    return host in load_fleet(fleet / "fleet.toml").hosts


def _names(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []


def remove_host(
    state: Path,
    host: str,
    *,
    fleet: Path | None,
    dry_run: bool,
    archive: Path | None,
    broker: str | list[str] | None,
    prefix: str,
) -> int:
    if fleet is not None and still_in_fleet(fleet, host):
        raise ConfigError(
            f"{fleet / 'fleet.toml'}: hosts.{host} is still there: delete its table and hosts/{host}/ "
            "first (and commit), or the next publish gives it back"
        )
    if fleet is None:
        warn(f"no --fleet: not checked that fleet.toml no longer names {host} (a publish would give it back)")
    removal = Removal(
        state,
        host,
        archive=archive,
        brokers=parse_urls(broker),
        topics=Topics(prefix),
    )
    removal.run(dry_run=dry_run, say=lambda line: console.print(line, markup=False, soft_wrap=True))
    return 0
