"""A rollout: a new generation given to the fleet wave by wave, through each host's `current`.

    STATE/run/rollout.json   the rollout (its waves, each host's target and outcome), 0644
    STATE/run/rollout.lock   held by whoever changes it, for a moment (flock)

The publisher writes every changed host's release but names it in `current` only for the hosts
whose wave has started (publisher.holdback); the others keep serving, and converging on, their
previous generation. `herald serve` moves the rollout on from the hosts' reports (herald.rollouts),
and `herald rollout pause|resume|abort` change it from the command line: each changes the file
under the lock, from what the file holds then, so that none undoes another's change.

A host's target is given (its `current` replaced) before anything about it is announced; the file
says a wave started before any of its hosts is given, and every start of `serve` gives again what
a started wave holds, so a crash between the two gives it at the next start.
"""

import asyncio
import contextlib
import fcntl
import hashlib
import math
import os
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Final

import msgspec

from protocol.errors import ConfigError
from protocol.files import Flusher, write_atomic
from protocol.layout import StateDir
from protocol.release import Current
from protocol.settings import Health, RolloutPlan, seconds
from publisher.chroot import Chroot
from publisher.keyring import read_chain

REST: Final = "(rest)"  # the wave of the hosts no wave chose: not a name fleet.toml can give
MESSAGE: Final = 200  # characters kept of what a failing host said
_LOCK_POLL: Final = 0.05  # seconds between tries of the lock from an event loop


class Status(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    HALTED = "halted"  # a failure budget is used up: `herald rollout resume` goes on
    DONE = "done"
    ABORTED = "aborted"
    SUPERSEDED = "superseded"  # a publish that changed hosts again replaced it

    @property
    def active(self) -> bool:
        return self in (Status.RUNNING, Status.PAUSED, Status.HALTED)


class Outcome(StrEnum):
    NONE = ""
    DONE = "done"  # idle on its target: the switch confirmed
    FAILED = "failed"  # failed or rolled back on its target


class Target(msgspec.Struct, kw_only=True):
    """One host of a rollout: the release it is to get, and what became of it."""

    wave: int
    generation: int
    version: str
    format: int = 1
    previous: int = 0  # the generation its `current` named when this release was held for it
    given: bool = False  # its `current` names the target
    outcome: Outcome = Outcome.NONE
    at: float = 0.0  # when the outcome was seen
    message: str = ""  # what the host said when it failed: hostile, shown through protocol.hosttext
    accepted: bool = False  # a failure `resume` accepted: no longer counted against the budget


class Wave(msgspec.Struct, kw_only=True):
    name: str
    hosts: list[str]  # every host of the fleet the plan put here (changed or not)
    soak: float = 0.0
    budget: int | None = None
    window: str | None = None
    health: Health = Health.CONFIRMED
    deadline: float = 0.0  # seconds from `started` a host may take (0: no deadline)
    started: float = 0.0  # when its hosts were given their targets (0: not yet)
    healthy: float = 0.0  # since when its condition holds, the soak's start (0: it does not)
    passed: float = 0.0


class Rollout(msgspec.Struct, kw_only=True):
    id: str
    created: float
    source_rev: str | None = None
    status: Status = Status.RUNNING
    reason: str = ""  # one line: why it halted, paused or ended
    budget: int = 1
    waves: list[Wave]
    hosts: dict[str, Target] = {}

    def wave_of(self, host: str) -> int | None:
        for index, wave in enumerate(self.waves):
            if host in wave.hosts:
                return index
        return None

    def current_wave(self) -> int | None:
        """The first wave that has not passed; None once all have."""
        return next((index for index, wave in enumerate(self.waves) if not wave.passed), None)

    def failures(self, wave: int | None = None) -> list[str]:
        """The hosts whose failure counts against the budget (of `wave`, or overall)."""
        return sorted(
            host
            for host, target in self.hosts.items()
            if target.outcome is Outcome.FAILED and not target.accepted and wave in (None, target.wave)
        )


class Book(msgspec.Struct, kw_only=True):
    """STATE/run/rollout.json."""

    format: int = 1
    rollout: Rollout | None = None
    # Per host, the version an abort held back: a publish that makes it again does not release
    # it (the fleet repository still holds what was aborted), a change to the host does.
    aborted: dict[str, str] = {}
    last: str = ""  # one line about the rollout this one replaced


_DECODER: Final = msgspec.json.Decoder(Book)
_ENCODER: Final = msgspec.json.Encoder()


def book_path(state: StateDir) -> Path:
    return state.root / "run" / "rollout.json"


def read_book(state: StateDir) -> Book:
    """The rollout file; an empty Book if there is none. ConfigError if it cannot be read."""
    path = book_path(state)
    try:
        return _DECODER.decode(path.read_bytes())
    except FileNotFoundError:
        return Book()
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ConfigError(f"{path}: unreadable rollout state ({exc}); move it away to start afresh") from exc


def write_book(state: StateDir, book: Book) -> None:
    path = book_path(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, _ENCODER.encode(book), mode=0o644)


@contextlib.contextmanager
def locked(state: StateDir) -> Iterator[None]:
    """The rollout lock: held for a moment by whoever reads the file to change it."""
    path = state.root / "run" / "rollout.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)  # read-only suffices for flock
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.asynccontextmanager
async def locked_async(state: StateDir) -> AsyncIterator[None]:
    """The same lock for an event loop (`herald serve`): it waits without blocking the loop, so
    the broker and SFTP server go on while another process (a publish, `herald rollout abort
    --rollback`) holds it."""
    path = state.root / "run" / "rollout.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(_LOCK_POLL)
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the plan over the fleet


def order(hosts: Sequence[str]) -> list[str]:
    """The fleet in a fixed order that no name or fleet size can steer: what `percent` counts in."""
    return sorted(hosts, key=lambda name: hashlib.sha256(f"herald rollout {name}".encode()).digest())


def resolve(plan: RolloutPlan, tags: dict[str, list[str]], *, source: str) -> list[Wave]:
    """The plan's waves over the fleet (host -> its tags); the hosts no wave chose are a last
    wave, REST. ConfigError for a wave naming a host the fleet does not have."""
    fleet = sorted(tags)
    ranked = order(fleet)
    taken: set[str] = set()
    waves: list[Wave] = []
    for index, wave in enumerate(plan.waves):
        unknown = [host for host in wave.hosts if host not in tags]
        if unknown:
            raise ConfigError(
                f"{source}: rollout.waves[{index}] ({wave.name}): no host {unknown[0]!r} in the fleet"
            )
        chosen = set(wave.hosts) | {host for host in fleet if set(wave.tags) & set(tags[host])}
        if wave.percent is not None:
            chosen |= set(ranked[: max(1, math.ceil(len(fleet) * wave.percent / 100))])
        hosts = sorted(chosen - taken)
        taken |= chosen
        waves.append(
            Wave(
                name=wave.name,
                hosts=hosts,
                soak=float(seconds(wave.soak) if wave.soak else 0),
                deadline=float(seconds(wave.deadline) if wave.deadline else 0),
                budget=wave.budget,
                window=wave.window,
                health=wave.health,
            )
        )
    rest = [host for host in fleet if host not in taken]
    if rest:
        waves.append(Wave(name=REST, hosts=rest))
    return waves


def until_window(window: str | None, at: datetime) -> float:
    """Seconds until `window` ('02:00-04:00', local time, may cross midnight) opens; 0 inside it
    or without one. (client.workstation has the agent's twin: publisher/ cannot import client/.)"""
    if window is None:
        return 0.0
    start, end = (int(t[:2]) * 60 + int(t[3:]) for t in window.split("-"))
    minute = at.hour * 60 + at.minute
    if (start <= minute < end) if start <= end else (minute >= start or minute < end):
        return 0.0
    opens = at.replace(hour=start // 60, minute=start % 60, second=0, microsecond=0)
    if opens <= at:
        opens += timedelta(days=1)
    return (opens - at).total_seconds()


# ---------------------------------------------------------------- giving hosts their targets


def give(
    state: StateDir, rollout: Rollout, hosts: Sequence[str], flusher: Flusher | None = None
) -> list[str]:
    """Name each host's target in its `current` (a host whose chroot is gone is skipped); the
    hosts whose `current` changed. The caller holds the lock and has written the file first."""
    changed: list[str] = []
    keys: int | None = None
    own = flusher or Flusher(state.root)
    for host in hosts:
        target = rollout.hosts[host]
        chroot = Chroot(state.chroot(host), own)
        try:
            current = chroot.current()
            if not (chroot.releases / str(target.generation)).is_file():
                continue  # never name a release that is not there (a chroot made afresh since)
            if current is None or current.generation < target.generation:
                if target.format >= 2 and keys is None:
                    keys = read_chain(state).count(b"\n")  # what a format-2 `current` counts now
                counted = keys if target.format >= 2 else None
                chroot.set_current(Current(target.generation, target.version, target.format, counted))
                changed.append(host)
        except OSError:
            continue  # removed from the server meanwhile (herald host remove)
        target.given = True
    if flusher is None:
        own.flush()
    return changed


def start_wave(rollout: Rollout, index: int, at: float) -> list[str]:
    """Mark wave `index` started; the hosts of it that now get their target."""
    wave = rollout.waves[index]
    wave.started = wave.started or at
    return [host for host in wave.hosts if host in rollout.hosts and not rollout.hosts[host].given]


def begin(rollout: Rollout, at: float) -> list[str]:
    """Pass the waves that hold none of the rollout's hosts, start the next one if it may start
    now; the hosts to give their target. The rollout is done once every wave has passed."""
    while (index := rollout.current_wave()) is not None:
        wave = rollout.waves[index]
        if any(host in rollout.hosts for host in wave.hosts):
            return start_wave(rollout, index, at) if startable(rollout, at) == index else []
        wave.started = wave.started or at
        wave.passed = at  # nothing of this rollout to give or to wait for
    if rollout.status is Status.RUNNING:
        rollout.status = Status.DONE
    return []


def startable(rollout: Rollout, at: float) -> int | None:
    """The wave to start now, if the rollout runs, the waves before it passed and its window is open."""
    index = rollout.current_wave()
    if rollout.status is not Status.RUNNING or index is None or rollout.waves[index].started:
        return None
    if until_window(rollout.waves[index].window, datetime.fromtimestamp(at).astimezone()) > 0:
        return None
    return index


def forget(state: StateDir, host: str) -> bool:
    """`herald host remove`: the host leaves the rollout (its target, its place in a wave, what
    an abort held back for it), so that a host given the same name later starts afresh; True if
    the rollout file named it."""
    with locked(state):
        book = read_book(state)
        named = host in book.aborted
        book.aborted.pop(host, None)
        if book.rollout is not None:
            named = named or host in book.rollout.hosts
            book.rollout.hosts.pop(host, None)
            for wave in book.rollout.waves:
                if host in wave.hosts:
                    wave.hosts.remove(host)
                    named = True
        if named:
            write_book(state, book)
    return named


# ---------------------------------------------------------------- pause, resume, abort


def pause(state: StateDir) -> str:
    with locked(state):
        book = read_book(state)
        rollout = _active(book)
        if rollout.status is not Status.RUNNING:
            return f"rollout {rollout.id} is {rollout.status} already: nothing paused"
        rollout.status, rollout.reason = Status.PAUSED, f"paused by herald rollout pause at {_now()}"
        write_book(state, book)
    return f"rollout {rollout.id} paused: no further wave starts until `herald rollout resume`"


def resume(state: StateDir) -> str:
    """Go on: a paused rollout; a halted one, its failures so far accepted (the budget counts anew)."""
    with locked(state):
        book = read_book(state)
        rollout = _active(book)
        if rollout.status is Status.RUNNING:
            return f"rollout {rollout.id} is running already"
        accepted = rollout.failures() if rollout.status is Status.HALTED else []
        for host in accepted:
            rollout.hosts[host].accepted = True
        rollout.status, rollout.reason = Status.RUNNING, ""
        write_book(state, book)
    note = f"; the failures of {', '.join(accepted)} accepted" if accepted else ""
    return f"rollout {rollout.id} resumed{note}"


def abort(state: StateDir) -> tuple[str, Rollout]:
    """End the rollout: hosts not given their target keep what they run, and the content held
    for them is not released again until it changes. The caller holds the lock."""
    book = read_book(state)
    rollout = _active(book)
    held = {host: target for host, target in rollout.hosts.items() if not target.given}
    for host, target in held.items():
        book.aborted[host] = target.version
        del rollout.hosts[host]
    rollout.status, rollout.reason = Status.ABORTED, f"aborted by herald rollout abort at {_now()}"
    write_book(state, book)
    return f"rollout {rollout.id} aborted: {len(held)} host(s) kept their generation", rollout


def _active(book: Book) -> Rollout:
    rollout = book.rollout
    if rollout is None or not rollout.status.active:
        what = f"the last one is {rollout.status}" if rollout is not None else "none was started"
        raise ConfigError(f"no rollout is running ({what})")
    return rollout


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
