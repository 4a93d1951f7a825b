"""The sysadmin's commands: `herald status`, `herald trigger`, `herald logs`."""

import argparse
import asyncio
import os
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from herald.fleet import FleetView, as_json, collect, follow, table
from herald.output import console, errors, warn
from herald.rollout import Answer, trigger
from herald.runner import run
from protocol.credentials import Secret, read_secret
from protocol.errors import ConfigError
from protocol.hosttext import safe
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
        message = safe(outcome.messages.get(host, ""))  # the host's own words
        grid.add_row(Text(host), Text(answer, style=styles.get(answer, "yellow")), Text(message))
    console.print(grid)
    return 0 if outcome.ok else 1


# ---------------------------------------------------------------- logs


_SHOWN: Final = 4 << 20  # bytes of one log printed at most: its end, where a rebuild says what failed
_OPEN: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class _Log:
    name: str  # as on disk (undecodable bytes as surrogates)
    size: int


def _not_a_log(info: os.stat_result) -> str | None:
    """Why an entry of a host's logs/ is neither listed nor read; None for a log."""
    mode = info.st_mode
    if stat.S_ISLNK(mode):
        return "a symbolic link (the host may have made it; links are never followed)"
    if stat.S_ISREG(mode):
        if info.st_nlink != 1:
            return f"a hard link ({info.st_nlink} names: its contents may be any other file's)"
        return None
    kinds = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket"}
    return next((kind for test, kind in kinds.items() if test(mode)), "a device or other special file")


class _Logs:
    """STATE/chroot/<host>/logs/, which the host writes (with OpenSSH it can make links there).

    `herald logs` runs as root: every entry is lstat'ed, and only regular files with one link are
    listed or read, opened with O_NOFOLLOW (and O_NONBLOCK, so a FIFO swapped in cannot block)
    and checked again on the descriptor. Anything else is named once, in a warning, and never
    opened. Names and contents are printed through protocol.hosttext.safe."""

    def __init__(self, state: Path, host: str) -> None:
        self.host = host
        self.path = StateDir(state).chroot(host) / LOGS
        self._warned: set[str] = set()

    def _directory(self) -> int:
        try:
            return os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            raise ConfigError(
                f"{self.path}: no such host chroot (is {self.host} in fleet.toml, and published?)"
            ) from None

    def _skip(self, name: str, why: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            warn(f"skipped {LOGS}/{safe(name)}: {why}")

    def listed(self) -> list[_Log]:
        """The logs, newest first (their names sort by time)."""
        directory = self._directory()
        found = []
        try:
            for name in os.listdir(directory):
                try:
                    info = os.lstat(name, dir_fd=directory)
                except FileNotFoundError:
                    continue
                why = _not_a_log(info)
                if why is None:
                    found.append(_Log(name, info.st_size))
                else:
                    self._skip(name, why)
        finally:
            os.close(directory)
        return sorted(found, key=lambda log: log.name, reverse=True)

    def read(self, log: _Log) -> bytes | None:
        """Up to the last _SHOWN bytes of `log`, or None if it is no longer a log."""
        directory = self._directory()
        try:
            fd = os.open(log.name, _OPEN, dir_fd=directory)
        except OSError as exc:
            self._skip(log.name, f"cannot be opened as a plain file ({exc.strerror})")
            return None
        finally:
            os.close(directory)
        try:
            info = os.fstat(fd)
            why = _not_a_log(info)
            if why is not None:
                self._skip(log.name, why)
                return None
            start = max(0, info.st_size - _SHOWN)
            chunks, offset = [], start
            while chunk := os.pread(fd, min(1 << 20, info.st_size - offset), offset):
                chunks.append(chunk)
                offset += len(chunk)
        finally:
            os.close(fd)
        data = b"".join(chunks)
        return f"[the first {start} bytes are not shown]\n".encode() + data if start else data

    def show(self, log: _Log) -> None:
        data = self.read(log)
        if data is None:
            return
        console.rule(Text(safe(log.name)))
        text = safe(data.decode("utf-8", errors="replace"), lines=True)
        sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
        sys.stdout.flush()


def logs(args: argparse.Namespace) -> int:
    found = _Logs(args.state, args.host)
    listed = found.listed()
    if args.last is None and not args.follow:
        for log in listed:
            console.print(Text(f"{safe(log.name)}  {log.size} bytes"), soft_wrap=True)
        return 0
    for log in reversed(listed[: args.last or 0]):  # the N newest, oldest of them first
        found.show(log)
    seen = {log.name for log in listed}
    while args.follow:  # until interrupted
        time.sleep(1)
        for log in reversed(found.listed()):
            if log.name not in seen:
                seen.add(log.name)
                found.show(log)
    return 0
