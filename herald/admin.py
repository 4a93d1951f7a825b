"""The sysadmin's commands: `herald status`, `herald trigger`, `herald logs`."""

import argparse
import asyncio
import contextlib
import re
import sys
import time
from pathlib import Path

from rich.cells import cell_len
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from herald.fleet import FleetView, as_json, broker_hosts, collect, follow, table
from herald.hostlogs import HostLogs, LogFile
from herald.output import console, errors, warn
from herald.rollout import Answer, Order, trigger
from herald.runner import run
from protocol.credentials import Secret, parse_passwd, read_secret
from protocol.errors import ConfigError, HeraldError
from protocol.hosttext import safe
from protocol.layout import StateDir
from protocol.messages import Action
from protocol.mqtt import BrokerURL, parse_urls
from protocol.release import LOGS
from protocol.settings import seconds
from protocol.topics import ADMIN_USER, SERVICE_USERS, Topics
from publisher.inventory import load_inventory
from publisher.rollout import read_book


def _admin_secret(state: Path) -> Secret:
    return read_secret(StateDir(state).service_secret(ADMIN_USER))


# ---------------------------------------------------------------- status


async def _watch(url: list[BrokerURL], password: Secret, view: FleetView) -> None:
    """Redraw the table whenever a message changes it, until interrupted."""
    changed = asyncio.Event()
    follower = asyncio.create_task(follow(url, password, view, on_change=changed.set))
    try:
        if console.is_terminal:
            with Live(table(view), console=console, auto_refresh=False) as live:
                while True:
                    await changed.wait()
                    changed.clear()
                    live.update(table(view), refresh=True)
        else:
            while True:  # not a terminal: the whole table again after each change, at most every second
                await changed.wait()
                changed.clear()
                console.print(table(view))
                await asyncio.sleep(1)
    finally:
        follower.cancel()


def fleet_view(args: argparse.Namespace) -> FleetView:
    """Every host's retained messages, and the rollout of the state directory (its wave column)."""
    urls, hosts = parse_urls(args.broker), broker_hosts(args.state)  # hosts: RabbitMQ's exact topics
    view = run(collect(urls, _admin_secret(args.state), Topics(args.prefix), hosts=hosts))
    with contextlib.suppress(HeraldError, OSError):  # no rollout shown, rather than no status
        view.rollout = read_book(StateDir(args.state)).rollout
    return view


def status(args: argparse.Namespace) -> int:
    url, password = parse_urls(args.broker), _admin_secret(args.state)
    view = fleet_view(args)
    if args.fleet is not None:
        view.add_hosts([host.name for host in load_inventory(args.fleet).hosts])
    if args.watch:
        run(_watch(url, password, view))
        return 0
    if args.json:
        sys.stdout.buffer.write(as_json(view) + b"\n")
    else:
        console.print(table(view))
    return 1 if view.any_failed() else 0


# ---------------------------------------------------------------- trigger


def _targets(args: argparse.Namespace) -> list[str]:
    if not (args.all or args.tag):
        if not args.hosts:
            raise ConfigError("name the hosts, or use --all or --tag (with --fleet)")
        _refuse_unknown(args, list(args.hosts))
        return list(args.hosts)
    if args.fleet is None:
        raise ConfigError("--all and --tag need --fleet, to read the hosts and tags of fleet.toml")
    inventory = load_inventory(args.fleet)
    chosen = [host.name for host in inventory.hosts if args.all or args.tag in host.entry.tags]
    if not chosen:
        raise ConfigError(f"no host of {args.fleet / 'fleet.toml'} has the tag {args.tag!r}")
    return chosen


def _refuse_unknown(args: argparse.Namespace, hosts: list[str]) -> None:
    """Before anything is sent: every host named must be one the fleet has (fleet.toml's with
    --fleet, else the broker's users in STATE/broker/passwd). A command to a name that is no
    host would stay retained on the broker and be waited for until --timeout."""
    if args.fleet is not None:
        known = {host.name for host in load_inventory(args.fleet).hosts}
        where = str(args.fleet / "fleet.toml")
    else:
        passwd = StateDir(args.state).passwd
        try:
            users = parse_passwd(passwd.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"{passwd}: cannot read the fleet's hosts ({exc.__class__.__name__}); "
                "pass --fleet DIR to check the hosts against fleet.toml"
            ) from exc
        known = set(users) - set(SERVICE_USERS)
        where = f"the broker's users ({passwd})"
    unknown = [host for host in hosts if host not in known]
    if unknown:
        names = ", ".join(safe(host) for host in unknown)
        raise ConfigError(f"no such host: {names} (not in {where}); nothing sent")


def _expiry(text: str) -> float | None:
    """Seconds until a command expires, from --expires ('24h', '90m', or 'never')."""
    if text == "never":
        return None
    if re.fullmatch(r"[1-9][0-9]*[smhd]", text) is None:
        raise ConfigError(f"--expires {text!r}: expected a duration such as '2h' or '1d', or 'never'")
    return float(seconds(text))


def trigger_command(args: argparse.Namespace) -> int:
    expires = _expiry(args.expires)
    hosts = _targets(args)
    action = Action(args.action)
    wait = args.wait or args.batch is not None
    with Progress(
        TextColumn("waiting for the hosts"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=errors,
        transient=True,
        disable=not (wait and errors.is_terminal),
    ) as bar:
        task = bar.add_task("hosts", total=len(hosts))
        outcome = run(
            trigger(
                BrokerURL.parse(args.broker),
                _admin_secret(args.state),
                Topics(args.prefix),
                hosts,
                Order(action, expires),
                wait=wait,
                batch=args.batch,
                stop_on_failure=args.stop_on_failure,
                timeout=seconds(args.timeout),
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
        )
    grid = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("host", args.action, "message"):
        grid.add_column(column)
    styles = {Answer.OK: "green", Answer.SENT: "green", Answer.FAILED: "bold red", Answer.ROLLED_BACK: "red"}
    for host in hosts:
        answer = outcome.answers.get(host, Answer.NOT_SENT)
        message = safe(outcome.messages.get(host, ""))  # the host's own words
        grid.add_row(Text(host), Text(answer, style=styles.get(answer, "yellow")), Text(message))
    console.print(grid)
    failed = [host for host in hosts if outcome.answers.get(host) in (Answer.FAILED, Answer.ROLLED_BACK)]
    if action is Action.CHECK and failed:
        names = " ".join(failed)
        console.print(
            Text(
                "a check does not apply again a generation that failed or was rolled back: "
                f"`herald trigger --action rebuild {names}` does"
            ),
            soft_wrap=True,
        )
    return 0 if outcome.ok else 1


# ---------------------------------------------------------------- logs


class _Shown:
    """`herald logs`' view of a host's logs/ (herald.hostlogs reads it, as hostile data): every
    entry that is not a log is named once, in a warning; names and contents go through `safe`."""

    def __init__(self, state: Path, host: str) -> None:
        self._warned: set[str] = set()
        self.logs = HostLogs(state, host, self._skip)

    def _skip(self, name: str, why: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            warn(f"skipped {LOGS}/{safe(name)}: {why}")

    def show(self, name: str) -> bool:
        data = self.logs.read(name)
        if data is None:
            return False
        console.rule(Text(safe(name)))
        text = safe(data.decode("utf-8", errors="replace"), lines=True)
        sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
        sys.stdout.flush()
        return True


def _listing(listed: list[LogFile]) -> None:
    """One line per log, newest first: name, size, time (the file's, UTC)."""
    names = [safe(log.name) for log in listed]
    width = max((cell_len(name) for name in names), default=0)
    for name, log in zip(names, listed, strict=True):
        when = log.mtime.strftime("%Y-%m-%dT%H:%M:%SZ")
        line = f"{name}{' ' * (width - cell_len(name))}  {log.size:>9} bytes  {when}"
        console.print(Text(line), soft_wrap=True)


def logs(args: argparse.Namespace) -> int:
    shown = _Shown(args.state, args.host)
    if args.name is not None:
        if args.last is not None or args.follow:
            raise ConfigError("name one log, or use --last and --follow, not both")
        if not shown.show(args.name):
            raise ConfigError(
                f"{args.host} has no log {safe(args.name)!r} (`herald logs {args.host}` lists them)"
            )
        return 0
    listed = shown.logs.listed()
    if args.last is None and not args.follow:
        _listing(listed)
        return 0
    newest = listed[: args.last or 0]
    # Newest first, as listed; followed, oldest first, so that new logs go on below them.
    for log in reversed(newest) if args.follow else newest:
        shown.show(log.name)
    seen = {log.name for log in listed}
    while args.follow:  # until interrupted
        time.sleep(1)
        for log in reversed(shown.logs.listed()):
            if log.name not in seen:
                seen.add(log.name)
                shown.show(log.name)
    return 0
