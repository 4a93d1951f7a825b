"""The sysadmin's view of the fleet, from the retained `desired`, `command`, `state` and `online`
messages; without a broker (`herald serve --mqtt off`), from the chroots and the logs the hosts
uploaded over SFTP."""

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Final

import aiomqtt
import msgspec
from loguru import logger
from rich.table import Table
from rich.text import Text

from herald.hostlogs import LastRun
from protocol.credentials import Secret
from protocol.errors import PayloadError
from protocol.hosttext import safe, safe_json
from protocol.messages import Command, Desired, Online, Phase, State, decode, now
from protocol.mqtt import BrokerURL, confirm_routed, connect, unreachable
from protocol.topics import ADMIN_USER, Kind, Topics
from publisher.revision import DIRTY

HEARTBEAT: Final = timedelta(seconds=60)
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
        return self.online is not None and self.online.online and at - self.online.at < 3 * HEARTBEAT

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

    def rows(self) -> list[HostView]:
        return [self.hosts[name] for name in sorted(self.hosts)]

    def any_failed(self) -> bool:
        return any(view.status() in (Status.FAILED, Status.ROLLED_BACK) for view in self.hosts.values())


def subscribe_all(topics: Topics) -> list[str]:
    return [topics.every(kind) for kind in (Kind.DESIRED, Kind.COMMAND, Kind.STATE, Kind.ONLINE)]


async def collect(url: BrokerURL, password: Secret, topics: Topics, timeout: float = 10.0) -> FleetView:
    """Every host's retained messages, read once as the admin user."""
    view = FleetView(topics)

    def take(message: aiomqtt.Message) -> None:
        if isinstance(message.payload, bytes):
            view.update(str(message.topic), message.payload)

    try:
        async with connect(url, username=ADMIN_USER, password=password, timeout=timeout) as client:
            for topic in subscribe_all(topics):
                await client.subscribe(topic, qos=1)
            await confirm_routed(client, topics, ADMIN_USER, timeout, on_message=take)
    except (aiomqtt.MqttError, OSError) as exc:
        raise unreachable(url, ADMIN_USER, exc) from exc
    return view


async def follow(
    url: BrokerURL,
    password: Secret,
    view: FleetView,
    on_change: Callable[[], None] | None = None,
    ca: str | None = None,
) -> None:
    """Keep `view` up to date from the broker until cancelled, reconnecting when it drops.

    At QoS 0: a view keeps only the last message of each topic, and a reconnect gets every
    retained one again, so acknowledging each (a PUBACK both ways, an in-flight entry in the
    broker) buys nothing. (`herald serve` with its embedded broker is told by the broker itself.)"""
    while True:
        try:
            async with connect(url, username=ADMIN_USER, password=password, ca=ca) as client:
                for topic in subscribe_all(view.topics):
                    await client.subscribe(topic, qos=0)
                async for message in client.messages:
                    changed = isinstance(message.payload, bytes) and view.update(
                        str(message.topic), message.payload
                    )
                    if changed and on_change is not None:
                        on_change()
        except (aiomqtt.MqttError, OSError) as exc:
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

    @classmethod
    def of(cls, view: HostView, at: datetime) -> "Row":
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
        )


def command_cell(command: Command | None, at: datetime) -> str:
    if command is None:
        return ""
    expiry = "never expires" if command.expires_at is None else f"expires {until(command.expires_at, at)}"
    return safe(f"{command.action} by {command.by or 'unknown'}, {expiry}"[:MESSAGE_WIDTH])


def rows(view: FleetView) -> list[Row]:
    at = now()
    return [Row.of(host, at) for host in view.rows()]


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


def cells(row: Row) -> tuple[str, ...]:
    """The row as text, in COLUMNS' order."""
    return (
        row.host,
        (f"{row.desired} (dirty)" if row.dirty else str(row.desired)) if row.desired is not None else "-",
        str(row.deployed) if row.deployed is not None else "-",
        row.status.value,
        "needed" if row.needs_reboot else "",
        ago(row.last_seen),
        row.command,
        row.message,
        row.log,
    )


def table(view: FleetView) -> Table:
    grid = Table(title=None, header_style="bold", box=None, pad_edge=False)
    for column in COLUMNS:
        grid.add_column(column)
    for row in rows(view):
        text = [Text(cell) for cell in cells(row)]  # Text: never read as markup
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
        }
        for row in view.rows()
    ]
    return safe_json(msgspec.json.format(msgspec.json.encode(hosts), indent=2))
