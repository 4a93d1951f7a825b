"""The sysadmin's commands: `herald status`, `herald trigger`, `herald logs`."""

import argparse
import asyncio
import sys
import time
from pathlib import Path

from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from herald.fleet import FleetView, as_json, collect, follow, table
from herald.output import console, errors
from herald.rollout import Answer, trigger
from herald.runner import run
from protocol.credentials import Secret, read_secret
from protocol.errors import ConfigError
from protocol.layout import StateDir
from protocol.messages import Action
from protocol.mqtt import BrokerURL
from protocol.release import LOGS
from protocol.settings import seconds
from protocol.topics import ADMIN_USER, Topics
from publisher.inventory import load_inventory


def _admin_secret(state: Path) -> Secret:
    return read_secret(StateDir(state).service_secret(ADMIN_USER))


# ---------------------------------------------------------------- status


async def _watch(url: BrokerURL, password: Secret, view: FleetView) -> None:
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


def status(args: argparse.Namespace) -> int:
    url, password, topics = BrokerURL.parse(args.broker), _admin_secret(args.state), Topics(args.prefix)
    view = run(collect(url, password, topics))
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
        return list(args.hosts)
    if args.fleet is None:
        raise ConfigError("--all and --tag need --fleet, to read the hosts and tags of fleet.toml")
    inventory = load_inventory(args.fleet)
    chosen = [host.name for host in inventory.hosts if args.all or args.tag in host.entry.tags]
    if not chosen:
        raise ConfigError(f"no host of {args.fleet / 'fleet.toml'} has the tag {args.tag!r}")
    return chosen


def trigger_command(args: argparse.Namespace) -> int:
    hosts = _targets(args)
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
                Action(args.action),
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
        grid.add_row(host, f"[{styles.get(answer, 'yellow')}]{answer}[/]", outcome.messages.get(host, ""))
    console.print(grid)
    return 0 if outcome.ok else 1


# ---------------------------------------------------------------- logs


def _log_files(state: Path, host: str) -> list[Path]:
    directory = StateDir(state).chroot(host) / LOGS
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no such host chroot (is {host} in fleet.toml, and published?)")
    return sorted(
        (path for path in directory.iterdir() if path.is_file()), key=lambda p: p.name, reverse=True
    )


def logs(args: argparse.Namespace) -> int:
    files = _log_files(args.state, args.host)
    if args.last is None and not args.follow:
        for path in files:  # newest first: the names sort by time
            console.print(f"{path.name}  {path.stat().st_size} bytes", markup=False, highlight=False)
        return 0
    for path in reversed(files[: args.last or 0]):  # the N newest, oldest of them first
        _show(path)
    seen = {path.name for path in files}
    while args.follow:  # until interrupted
        time.sleep(1)
        for path in reversed(_log_files(args.state, args.host)):
            if path.name not in seen:
                seen.add(path.name)
                _show(path)
    return 0


def _show(path: Path) -> None:
    console.rule(path.name)
    sys.stdout.write(path.read_text(encoding="utf-8", errors="replace"))
    sys.stdout.flush()
