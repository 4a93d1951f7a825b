"""The rollout in `herald serve`: it moves on by itself, from what the hosts report.

What a host's state means for the rollout (`seen`), and only for that host's own part:

- `done`: `idle` with its target generation and version deployed (an agent reports `idle` after
  a switch only once it confirmed it, the `[confirm] health` command included);
- `failed`: `failed` or `rolled_back` for its target generation (counted once, however often
  it says so);
- `away`: offline, stopped, postponed (on battery, a metered link) or never seen: not waited for;
  its result counts whenever it comes (a wave needs one host done, though, so a wave of hosts
  all away waits for one of them, or for its `deadline`);
- anything else, `waiting`.

A host's state counts only once its own `current` names its target (its wave started): a report
of a generation it was never given, or another host's, is `waiting` at best. A wave passes when
each of its hosts is done, failed within the budget or away, at least one done, and that has held
for its soak (with `health = "soak"`, a host that fails during the soak counts as failed). A
host with no result by the wave's `deadline` has failed. The failure budgets (the wave's, the
rollout's) halt it, and so does a wave whose every host failed (nothing would pass it). So a
host can fail its own part, claim it, or take its time up to the deadline, and no more.

The runner wakes on every state or presence message (coalesced), at the end of a soak or the
opening of a window, and twice a second to look at the rollout file, which `herald publish` and
`herald rollout` change too.
"""

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from enum import StrEnum
from typing import Final

from loguru import logger

from herald.fleet import FleetView, HostView
from protocol.hosttext import safe
from protocol.layout import StateDir
from protocol.messages import Phase
from protocol.settings import Health
from publisher.chroot import Chroot
from publisher.rollout import (
    MESSAGE,
    Book,
    Outcome,
    Rollout,
    Status,
    Target,
    begin,
    book_path,
    give,
    locked_async,
    read_book,
    until_window,
    write_book,
)

LOOK: Final = 0.5  # seconds between looks at the rollout file
_COALESCE: Final = 0.02  # a burst of states is one evaluation


class Seen(StrEnum):
    DONE = "done"
    FAILED = "failed"
    WAITING = "waiting"
    AWAY = "away"
    HELD = "held"  # its wave has not started: it runs its previous generation


def seen(target: Target, view: HostView | None, at: datetime) -> Seen:
    """What `view` (the host's own retained messages) says of its target."""
    if not target.given:
        return Seen.HELD
    state = view.state if view is not None else None
    if state is not None:
        if (
            state.phase is Phase.IDLE
            and state.deployed_generation == target.generation
            and state.deployed_version in (None, target.version)
        ):
            return Seen.DONE
        if state.phase in (Phase.FAILED, Phase.ROLLED_BACK) and state.target_generation == target.generation:
            return Seen.FAILED
    if (
        view is None
        or state is None
        or not view.is_online(at)
        or state.phase in (Phase.STOPPED, Phase.POSTPONED)
    ):
        return Seen.AWAY
    return Seen.WAITING


def observe(rollout: Rollout, view: FleetView, at: float) -> bool:
    """Record the outcomes the hosts' states show; True if any changed."""
    when = datetime.fromtimestamp(at).astimezone()
    changed = False
    for host, target in rollout.hosts.items():
        wave = rollout.waves[target.wave]
        final = target.outcome is Outcome.FAILED or (
            target.outcome is Outcome.DONE and (wave.health is Health.CONFIRMED or wave.passed)
        )
        if final or not target.given:
            continue
        host_view = view.hosts.get(host)
        now_seen = seen(target, host_view, when)
        if now_seen is Seen.DONE and target.outcome is Outcome.NONE:
            target.outcome, target.at = Outcome.DONE, at
            changed = True
        elif now_seen is Seen.FAILED:
            state = host_view.state if host_view is not None else None
            target.outcome, target.at = Outcome.FAILED, at
            target.message = (state.message if state is not None else "")[:MESSAGE]
            changed = True
        elif target.outcome is Outcome.NONE and wave.deadline and at >= wave.started + wave.deadline:
            target.outcome, target.at = Outcome.FAILED, at  # away or busy, it holds the rollout no longer
            target.message = f"no result within the wave's deadline of {wave.deadline:.0f}s ({now_seen})"
            changed = True
    return changed


def decide(rollout: Rollout, view: FleetView, at: float, *, say: bool = True) -> tuple[bool, list[str]]:
    """Move the rollout on: outcomes, budgets, soaks, the next wave. (changed, hosts to give)."""
    changed = observe(rollout, view, at)
    if rollout.status not in (Status.RUNNING, Status.PAUSED):
        return changed, []
    if (reason := _halt(rollout)) is not None:
        rollout.status, rollout.reason = Status.HALTED, reason
        if say:
            logger.error("rollout {}: {}", rollout.id, reason)
        return True, []
    if rollout.status is not Status.RUNNING:
        return changed, []
    index = rollout.current_wave()
    if index is not None and rollout.waves[index].started:
        wave = rollout.waves[index]
        holds = _condition(rollout, index, view, datetime.fromtimestamp(at).astimezone())
        if not holds and wave.healthy:
            wave.healthy, changed = 0.0, True
        elif holds and not wave.healthy:
            wave.healthy, changed = at, True
        if wave.healthy and at >= wave.healthy + wave.soak:
            wave.passed, changed = at, True
            if say:
                logger.info("rollout {}: wave {} ({}) passed", rollout.id, index + 1, wave.name)
    before = (rollout.current_wave(), rollout.status)
    hosts = begin(rollout, at)
    return changed or bool(hosts) or before != (rollout.current_wave(), rollout.status), hosts


def _condition(rollout: Rollout, index: int, view: FleetView, at: datetime) -> bool:
    """Every host of the wave done, failed (within the budget: checked first) or away; one done,
    or else every one failed and those failures accepted by `herald rollout resume`."""
    wave = rollout.waves[index]
    done, accepted = False, False
    for host in wave.hosts:
        target = rollout.hosts.get(host)
        if target is None:
            continue
        if target.outcome is Outcome.DONE:
            done = True
        elif target.outcome is Outcome.FAILED:
            accepted = accepted or target.accepted
        elif seen(target, view.hosts.get(host), at) is not Seen.AWAY:
            return False
    return done or (accepted and _finished(rollout, index))


def _finished(rollout: Rollout, index: int) -> bool:
    """Every host of the wave has an outcome (none is waiting or away)."""
    return all(
        rollout.hosts[host].outcome is not Outcome.NONE
        for host in rollout.waves[index].hosts
        if host in rollout.hosts
    )


def _nobody_done(rollout: Rollout, index: int) -> str | None:
    """The one line halting a wave whose every host failed within the budget: nothing would
    ever pass it. None while a host may still be done, or the failures are accepted."""
    wave = rollout.waves[index]
    targets = [rollout.hosts[host] for host in wave.hosts if host in rollout.hosts]
    if not targets or not _finished(rollout, index) or any(t.outcome is Outcome.DONE for t in targets):
        return None
    failed = sorted(host for host in wave.hosts if host in rollout.hosts and not rollout.hosts[host].accepted)
    if not failed:
        return None
    return _halted(f"wave {index + 1} ({wave.name}): none of its hosts is up to date", failed)


def _halt(rollout: Rollout) -> str | None:
    """Why the rollout must halt now, in one line naming the hosts; None if it need not."""
    if (reason := _over_budget(rollout)) is not None:
        return reason
    index = rollout.current_wave()
    return _nobody_done(rollout, index) if index is not None and rollout.waves[index].started else None


def _over_budget(rollout: Rollout) -> str | None:
    """The one line saying which budget the failures broke, naming the hosts; None if none."""
    for index, wave in enumerate(rollout.waves):
        failed = rollout.failures(index)
        if wave.budget is not None and len(failed) >= wave.budget:
            return _halted(f"wave {index + 1} ({wave.name}): its budget of {wave.budget}", failed)
    failed = rollout.failures()
    if len(failed) >= rollout.budget:
        return _halted(f"the rollout's budget of {rollout.budget}", failed)
    return None


def _halted(budget: str, hosts: list[str]) -> str:
    names = ", ".join(hosts[:10]) + (f" and {len(hosts) - 10} more" if len(hosts) > 10 else "")
    return f"halted: {len(hosts)} host(s) failed or rolled back, {budget}: {names}"


def next_wake(rollout: Rollout | None, at: float) -> float:
    """Seconds until the runner must look again by itself (a soak ends, a window opens)."""
    wake = LOOK
    if rollout is None or rollout.status is not Status.RUNNING:
        return wake
    index = rollout.current_wave()
    if index is None:
        return wake
    wave = rollout.waves[index]
    if wave.healthy:
        wake = min(wake, max(0.0, wave.healthy + wave.soak - at))
    elif not wave.started:
        wake = min(wake, until_window(wave.window, datetime.fromtimestamp(at).astimezone()))
    elif wave.deadline:
        wake = min(wake, max(0.0, wave.started + wave.deadline - at))
    return wake


Announce = Callable[[list[str]], Awaitable[None]]


class Runner:
    """Keeps the rollout in STATE/run/rollout.json moving; `notice` when a host's message arrives."""

    def __init__(self, state: StateDir, view: FleetView, announce: Announce) -> None:
        self.state = state
        self.view = view
        self.announce = announce
        self.book = Book()
        self.known: dict[str, int] = {}  # the generation last announced per host of the rollout
        self._stamp: tuple[int, int, int] | None = None
        self._wake = asyncio.Event()

    @property
    def rollout(self) -> Rollout | None:
        return self.book.rollout

    def notice(self) -> None:
        self._wake.set()

    def _changed_on_disk(self) -> bool:
        try:
            info = book_path(self.state).stat()
        except FileNotFoundError:
            stamp = None
        else:
            stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        return True

    def _stamp_now(self) -> None:
        self._stamp = None
        self._changed_on_disk()

    async def run(self) -> None:
        """Give again what the started waves hold (a crash may have come between), then follow."""
        await self._reload(first=True)
        while True:
            at = time.time()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(next_wake(self.rollout, at)):
                    await self._wake.wait()
                await asyncio.sleep(_COALESCE)
            self._wake.clear()
            try:
                if self._changed_on_disk():
                    await self._reload()
                await self.step()
            except Exception as exc:  # noqa: BLE001 - the server goes on; the next wake tries again
                logger.error("rollout: {}", exc)
                self._stamp = None  # what a failed step decided in memory is dropped: read the file again

    async def _reload(self, *, first: bool = False) -> None:
        """Read the file again. Every host it says was given its target is given it again (it only
        moves `current` forward): a publish or a serve that stopped between writing the file and
        replacing `current` left such hosts behind."""
        self._stamp_now()
        self.book = await asyncio.to_thread(read_book, self.state)
        self.view.rollout = self.book.rollout
        rollout = self.book.rollout
        if rollout is None:
            return
        given = [host for host, target in rollout.hosts.items() if target.given]
        if given and (first or rollout.status.active):
            async with locked_async(self.state):
                again = await asyncio.to_thread(give, self.state, rollout, given)
            if again:
                logger.info("rollout {}: gave {} host(s) their target again", rollout.id, len(again))
        moved = await asyncio.to_thread(self._moved, list(rollout.hosts))
        if moved and not first:  # serve announces every host when it starts
            await self.announce(moved)

    def _moved(self, hosts: list[str]) -> list[str]:
        """Hosts whose `current` differs from what was last announced for them (updating that)."""
        moved = []
        for host in hosts:
            try:
                current = Chroot(self.state.chroot(host)).current()
            except OSError:
                continue
            generation = current.generation if current else 0
            if self.known.get(host) != generation:
                self.known[host] = generation
                moved.append(host)
        return moved

    async def step(self) -> None:
        rollout = self.rollout
        if rollout is None:
            return
        changed, _ = decide(rollout, self.view, time.time(), say=False)  # a look: the file is the truth
        if not changed:
            return
        # Again under the lock, on what the file holds now (a `herald rollout` may have run).
        async with locked_async(self.state):
            book = read_book(self.state)
            if book.rollout is None or book.rollout.id != rollout.id:
                self.book = book
                self.view.rollout = book.rollout
                return
            changed, hosts = decide(book.rollout, self.view, time.time())
            for host in hosts:
                book.rollout.hosts[host].given = True  # in the file before any `current` names it
            write_book(self.state, book)
            self.book = book
            self.view.rollout = book.rollout
            self._stamp_now()
            gave = await asyncio.to_thread(give, self.state, book.rollout, hosts) if hosts else []
        if gave:
            index = book.rollout.current_wave()
            name = book.rollout.waves[index].name if index is not None else "?"
            logger.info(
                "rollout {}: wave {} ({}) started: {} host(s)", rollout.id, (index or 0) + 1, name, len(gave)
            )
            for host in gave:
                self.known[host] = book.rollout.hosts[host].generation
            await self.announce(gave)


def status_line(rollout: Rollout) -> str:
    """One line: the rollout, where it is, and why it stopped if it did."""
    index = rollout.current_wave()
    where = (
        f"wave {index + 1} of {len(rollout.waves)} ({rollout.waves[index].name})"
        if index is not None
        else "every wave passed"
    )
    failed = len(rollout.failures())
    text = f"rollout {rollout.id}: {rollout.status}, {where}, {failed} of a budget of {rollout.budget} failed"
    return f"{text}; {safe(rollout.reason)}" if rollout.reason else text
