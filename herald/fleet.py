"""The sysadmin's view of the fleet, from the retained `desired`, `command`, `state` and `online`
messages; without a broker (`herald serve --mqtt off`), from the chroots and the logs the hosts
uploaded over SFTP."""

import asyncio
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Final

import aiomqtt
import msgspec
from loguru import logger
from rich.table import Table
from rich.text import Text

from herald.hostlogs import LastRun
from protocol.credentials import Secret, parse_passwd
from protocol.errors import PayloadError, UnreachableError
from protocol.hosttext import safe, safe_json
from protocol.layout import StateDir
from protocol.messages import Command, Desired, Online, Phase, State, decode, now
from protocol.mqtt import BrokerURL, confirm_routed, connect, unreachable
from protocol.topics import ADMIN_USER, Kind, Topics, is_host_name
from publisher.revision import DIRTY
from publisher.rollout import Rollout

HEARTBEAT: Final = timedelta(seconds=60)
SKEW: Final = timedelta(minutes=5)  # how far ahead of this clock a host's own timestamps may be
_RECONNECT: Final = 5.0
MESSAGE_WIDTH: Final = 60  # characters of a host's message that the table and the page show


class Status(StrEnum):
    UP_TO_DATE = "up to date"
    PENDING = "pending"
    APPLYING = "applying"
    POSTPONED = "postponed"
    FAILED = "failed"
    ROLLED_BACK = "rolled back"
    OFFLINE = "offline"
    STOPPED = "stopped"  # offline, and it said so: its agent stopped cleanly
    NEVER_SEEN = "never seen"
    SFTP_ONLY = "sftp only"  # no broker: what its last log uploaded over SFTP says


_STYLE: Final = {
    Status.UP_TO_DATE: "green",
    Status.PENDING: "yellow",
    Status.APPLYING: "cyan",
    Status.POSTPONED: "yellow",
    Status.FAILED: "bold red",
    Status.ROLLED_BACK: "red",
    Status.OFFLINE: "dim",
    Status.STOPPED: "dim",
    Status.NEVER_SEEN: "dim",
    Status.SFTP_ONLY: "dim",
}


_BUSY: Final = {
    Phase.FAILED: Status.FAILED,
    Phase.ROLLED_BACK: Status.ROLLED_BACK,
    Phase.POSTPONED: Status.POSTPONED,
}


@dataclass(slots=True)
class HostView:
    host: str
    desired: Desired | None = None
    state: State | None = None
    online: Online | None = None
    command: Command | None = None
    last_run: LastRun | None = None  # without a broker: its newest log in logs/

    def pending_command(self, at: datetime) -> Command | None:
        """The retained command, unless it expired or the host says it took it."""
        command = self.command
        if command is None or (command.expires_at is not None and command.expires_at <= at):
            return None
        if self.state is not None and self.state.last_command == command.id:
            return None
        return command

    def is_online(self, at: datetime) -> bool:
        """Online, and said so within three heartbeats; a time far ahead of this clock is no
        proof of anything (a host could otherwise look online, and hold its wave, for ever)."""
        return self.online is not None and self.online.online and -SKEW < at - self.online.at < 3 * HEARTBEAT

    def status(self, at: datetime | None = None) -> Status:
        if self.state is None:
            return Status.NEVER_SEEN if self.last_run is None else Status.SFTP_ONLY
        if not self.is_online(at or now()):
            return Status.STOPPED if self.state.phase is Phase.STOPPED else Status.OFFLINE
        if self.state.phase not in (Phase.IDLE, Phase.CHECKING):
            return _BUSY.get(self.state.phase, Status.APPLYING)
        if self.desired is not None and self.state.deployed_generation < self.desired.generation:
            return Status.PENDING
        return Status.UP_TO_DATE

    def last_seen(self) -> datetime | None:
        times = [
            t
            for t in (
                self.online.at if self.online else None,
                self.state.since if self.state else None,
                self.last_run.at if self.last_run else None,
            )
            if t
        ]
        return max(times) if times else None


@dataclass(slots=True)
class FleetView:
    topics: Topics
    hosts: dict[str, HostView] = field(default_factory=dict)
    rollout: Rollout | None = None  # STATE/run/rollout.json's, for the wave column and the page's strip

    def add_hosts(self, names: list[str]) -> None:
        for name in names:
            self.hosts.setdefault(name, HostView(name))

    def update(self, topic: str, payload: bytes) -> bool:
        """Take one retained message; False if it is not a host topic or does not decode."""
        parsed = self.topics.parse(topic)
        if parsed is None:
            return False
        host, kind = parsed
        view = self.hosts.setdefault(host, HostView(host))
        try:
            if kind is Kind.DESIRED:
                view.desired = decode(payload, Desired) if payload else None
            elif kind is Kind.STATE:
                view.state = decode(payload, State) if payload else None
            elif kind is Kind.ONLINE:
                view.online = decode(payload, Online) if payload else None
            elif kind is Kind.COMMAND:
                view.command = decode(payload, Command) if payload else None
        except PayloadError as exc:
            logger.bind(host=host).warning("ignored {}: {}", topic, safe(str(exc)))  # quotes the payload
            return False
        return True

    def offer(self, topic: str, payload: bytes) -> bool:
        """Take a retained message read from one node of several only if it is newer than the
        one held: a node that was down, or that the host has left, still holds its older ones."""
        parsed = self.topics.parse(topic)
        if parsed is None or not payload:
            return False
        host, kind = parsed
        held = self.hosts.get(host)
        current = getattr(held, kind.value, None) if held is not None else None
        if current is not None:
            try:
                offered = decode(payload, type(current))
            except PayloadError:
                return False
            if _freshness(offered) <= _freshness(current):
                return False
        return self.update(topic, payload)

    def rows(self) -> list[HostView]:
        return [self.hosts[name] for name in sorted(self.hosts)]

    def any_failed(self) -> bool:
        return any(view.status() in (Status.FAILED, Status.ROLLED_BACK) for view in self.hosts.values())


def _freshness(payload: msgspec.Struct) -> tuple[object, ...]:
    """What makes one retained message of a topic newer than another, for merging nodes. A time
    beyond this clock's (and SKEW) makes a message the oldest, not the newest: a host's clock
    must not pin its row for ever to what it said once, on a node it has left."""
    if isinstance(payload, Desired):
        return (payload.generation, payload.published_at)
    if isinstance(payload, State):
        return (
            _plausible(payload.since),
            payload.since,
            payload.deployed_generation,
            payload.target_generation,
        )
    if isinstance(payload, Online):
        return (_plausible(payload.at), payload.at)
    if isinstance(payload, Command):
        return (payload.issued_at,)
    return ()


def _plausible(at: datetime) -> bool:
    return at - now() < SKEW


_KINDS: Final = (Kind.DESIRED, Kind.COMMAND, Kind.STATE, Kind.ONLINE)
_BATCH: Final = 200  # topic filters per SUBSCRIBE packet


def subscribe_all(topics: Topics) -> list[str]:
    return [topics.every(kind) for kind in _KINDS]


def broker_hosts(state: Path) -> list[str]:
    """The hosts STATE/broker/passwd admits ([] if it cannot be read): whose topics to ask for."""
    try:
        users = parse_passwd(StateDir(state).passwd.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return []
    return sorted(user for user in users if is_host_name(user))


async def _snapshot(
    client: aiomqtt.Client,
    topics: Topics,
    hosts: Iterable[str],
    take: Callable[[aiomqtt.Message], None],
    *,
    qos: int,
    timeout: float,
    keep: bool,
) -> None:
    """Subscribe to every host's topics; return once the broker has sent every retained message.

    The wildcard filters first, then each of `hosts` whose `desired` did not come its own four
    topics: RabbitMQ 3.10 sends retained messages for filters without wildcards only (DEVELOPERS.md,
    "RabbitMQ 3.10"), where the other brokers leave that list empty. Unless `keep`, those exact
    subscriptions are dropped again: the wildcards carry what follows."""
    seen: set[str] = set()

    def record(message: aiomqtt.Message) -> None:
        parsed = topics.parse(str(message.topic))
        if parsed is not None and parsed[1] is Kind.DESIRED:
            seen.add(parsed[0])
        take(message)

    await client.subscribe([(topic, qos) for topic in subscribe_all(topics)])
    await confirm_routed(client, topics, ADMIN_USER, timeout, on_message=record)
    exact = [topics.of(host, kind) for host in hosts if host not in seen for kind in _KINDS]
    batches = [exact[at : at + _BATCH] for at in range(0, len(exact), _BATCH)]
    for batch in batches:
        await client.subscribe([(topic, qos) for topic in batch])
    if exact:
        await confirm_routed(client, topics, ADMIN_USER, timeout, on_message=take)
    if not keep:
        for batch in batches:
            await client.unsubscribe(batch)


def _nodes(url: BrokerURL | Sequence[BrokerURL]) -> list[BrokerURL]:
    return [url] if isinstance(url, BrokerURL) else list(url)


async def _read_node(
    url: BrokerURL, password: Secret, topics: Topics, hosts: Sequence[str], timeout: float
) -> list[tuple[str, bytes]]:
    found: list[tuple[str, bytes]] = []

    def take(message: aiomqtt.Message) -> None:
        if isinstance(message.payload, bytes):
            found.append((str(message.topic), message.payload))

    try:
        async with connect(url, username=ADMIN_USER, password=password, timeout=timeout) as client:
            await _snapshot(client, topics, hosts, take, qos=1, timeout=timeout, keep=True)
    except (aiomqtt.MqttError, OSError) as exc:
        raise unreachable(url, ADMIN_USER, exc) from exc
    return found


async def collect(
    url: BrokerURL | Sequence[BrokerURL],
    password: Secret,
    topics: Topics,
    timeout: float = 10.0,
    hosts: Sequence[str] = (),
) -> FleetView:
    """Every host's retained messages, read once as the admin user (`hosts`: those whose topics
    to ask for one by one where the wildcards bring nothing). With several nodes, from each
    that answers, the newest message of each topic kept: RabbitMQ 3.10 keeps a retained message
    on the node that received it, and a host that moved holds older ones where it was."""
    nodes = _nodes(url)
    read = await asyncio.gather(
        *(_read_node(node, password, topics, hosts, timeout) for node in nodes), return_exceptions=True
    )
    failed = [result for result in read if isinstance(result, BaseException)]
    for error in failed:
        if not isinstance(error, UnreachableError) or len(failed) == len(nodes):
            raise error
        logger.warning("fleet view: {}; read from the other nodes", error)
    view = FleetView(topics)
    for messages in read:
        if not isinstance(messages, BaseException):
            for topic, payload in messages:
                if len(nodes) == 1:
                    view.update(topic, payload)
                else:
                    view.offer(topic, payload)
    return view


async def follow(
    url: BrokerURL | Sequence[BrokerURL],
    password: Secret,
    view: FleetView,
    on_change: Callable[[], None] | None = None,
    ca: str | None = None,
) -> None:
    """Keep `view` up to date from the broker until cancelled, reconnecting when it drops.

    At QoS 0: a view keeps only the last message of each topic, and a reconnect gets every
    retained one again, so acknowledging each (a PUBACK both ways, an in-flight entry in the
    broker) buys nothing. (`herald serve` with its embedded broker is told by the broker itself.)
    With several nodes, connected to each: a node that dies leaves the others, and the retained
    messages a node sends on (re)connection replace only older ones."""
    nodes = _nodes(url)
    async with asyncio.TaskGroup() as group:
        for node in nodes:
            group.create_task(_follow_node(node, password, view, on_change, ca, merge=len(nodes) > 1))


async def _follow_node(
    url: BrokerURL,
    password: Secret,
    view: FleetView,
    on_change: Callable[[], None] | None,
    ca: str | None,
    *,
    merge: bool,
) -> None:
    def take(message: aiomqtt.Message, *, retained: bool = False) -> None:
        topic, payload = str(message.topic), message.payload
        changed = isinstance(payload, bytes) and (
            view.offer(topic, payload) if retained else view.update(topic, payload)
        )
        if changed and on_change is not None:
            on_change()

    while True:
        try:
            async with connect(url, username=ADMIN_USER, password=password, ca=ca) as client:
                await _snapshot(
                    client,
                    view.topics,
                    list(view.hosts),
                    lambda message: take(message, retained=merge and message.retain),
                    qos=0,
                    timeout=10.0,
                    keep=False,
                )
                async for message in client.messages:
                    take(message)
        except (aiomqtt.MqttError, OSError, UnreachableError) as exc:
            logger.debug("fleet view: broker {}: {}; reconnecting", url, exc)
        await asyncio.sleep(_RECONNECT)


@dataclass(frozen=True, slots=True)
class Row:
    """One host as every view shows it: the terminal table, the web page, metrics. What the host
    wrote (message, log name) is made safe here, once, for all of them."""

    host: str
    desired: int | None
    deployed: int | None
    status: Status
    needs_reboot: bool
    last_seen: datetime | None
    message: str
    log: str
    command: str = ""  # the retained command not yet taken: "rebuild by herald-admin, expires in 5h"
    dirty: bool = False  # the desired release was published from a work tree with uncommitted changes
    wave: str = ""  # its wave in the running rollout: "2/3 office, held"

    @classmethod
    def of(cls, view: HostView, at: datetime, rollout: Rollout | None = None) -> "Row":
        state, run = view.state, view.last_run
        if state is not None:
            message, log = safe(state.message[:MESSAGE_WIDTH]), safe(state.log or "")
        elif run is not None:  # its newest log, named as an agent names one (herald.hostlogs)
            message = f"{run.result} generation {run.generation} (its last log; no broker)"
            log = safe(run.name)
        else:
            message, log = "", ""
        return cls(
            view.host,
            view.desired.generation if view.desired else None,
            state.deployed_generation if state and state.deployed_generation else None,
            view.status(at),
            state.needs_reboot if state else False,
            view.last_seen(),
            message,
            log,
            command_cell(view.pending_command(at), at),
            dirty=bool(view.desired and (view.desired.source_rev or "").endswith(DIRTY)),
            wave=wave_label(rollout, view.host),
        )


def command_cell(command: Command | None, at: datetime) -> str:
    if command is None:
        return ""
    expiry = "never expires" if command.expires_at is None else f"expires {until(command.expires_at, at)}"
    return safe(f"{command.action} by {command.by or 'unknown'}, {expiry}"[:MESSAGE_WIDTH])


def wave_label(rollout: Rollout | None, host: str) -> str:
    """The wave column: '2/3 office', with ', held' until the host is given its release."""
    if rollout is None or not rollout.status.active:
        return ""
    index = rollout.wave_of(host)
    if index is None:
        return ""
    target = rollout.hosts.get(host)
    held = ", held" if target is not None and not target.given else ""
    return f"{index + 1}/{len(rollout.waves)} {rollout.waves[index].name}{held}"


def rows(view: FleetView) -> list[Row]:
    at = now()
    return [Row.of(host, at, view.rollout) for host in view.rows()]


def ago(then: datetime | None, at: datetime | None = None) -> str:
    if then is None:
        return "-"
    seconds = max(0, int(((at or now()) - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def until(then: datetime, at: datetime | None = None) -> str:
    seconds = max(0, int((then - (at or now())).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"in {seconds // size}{unit}"
    return f"in {seconds}s"


COLUMNS: Final = ("host", "desired", "deployed", "status", "reboot", "last seen", "command", "message", "log")
LOG_COLUMN: Final = COLUMNS.index("log")
WAVE: Final = "wave"  # a last column, while a rollout runs


def columns(view: FleetView) -> tuple[str, ...]:
    return (*COLUMNS, WAVE) if view.rollout is not None and view.rollout.status.active else COLUMNS


def cells(row: Row, *, wave: bool = False) -> tuple[str, ...]:
    """The row as text, in COLUMNS' order (then the wave's, with `wave`)."""
    return *(
        row.host,
        (f"{row.desired} (dirty)" if row.dirty else str(row.desired)) if row.desired is not None else "-",
        str(row.deployed) if row.deployed is not None else "-",
        row.status.value,
        "needed" if row.needs_reboot else "",
        ago(row.last_seen),
        row.command,
        row.message,
        row.log,
    ), *((row.wave,) if wave else ())


def table(view: FleetView) -> Table:
    grid = Table(title=None, header_style="bold", box=None, pad_edge=False)
    shown = columns(view)
    for column in shown:
        grid.add_column(column)
    for row in rows(view):
        text = [Text(cell) for cell in cells(row, wave=WAVE in shown)]  # Text: never read as markup
        text[3].stylize(_STYLE[row.status])
        grid.add_row(*text)
    return grid


def _every_field(payload: msgspec.Struct | None) -> dict[str, object] | None:
    """A payload with every field, defaults too: on the wire they are left out (older readers
    default them), but a script reading `--json` should not have to know the defaults."""
    return msgspec.structs.asdict(payload) if payload is not None else None


def as_json(view: FleetView) -> bytes:
    """Every host's retained messages as they are: a script reads the host's text exactly, and
    the bytes hold no raw control or bidi character (those are JSON escapes)."""
    at = now()
    hosts = [
        {
            "host": row.host,
            "status": row.status(at).value,
            "desired": _every_field(row.desired),
            "state": _every_field(row.state),
            "online": _every_field(row.online),
            "command": row.pending_command(at),
            "wave": wave_label(view.rollout, row.host) or None,
        }
        for row in view.rows()
    ]
    return safe_json(msgspec.json.format(msgspec.json.encode(hosts), indent=2))
