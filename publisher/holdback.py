"""What a publish does with a rollout: every changed host's release is written, and named in its
`current` now only if the rollout lets it (publisher.rollout holds the rollout itself).

- Before planning, the releases a rollout holds back count as the hosts' own (`head`): a publish
  that finds the same content again writes nothing, as for any unchanged host, and the version
  an abort held back (`aborted`) is not released again until the host's content changes.
- After the releases are written (`admit`): a publish that changes some host's content starts a
  rollout of fleet.toml's plan (or the one given with `herald publish --rollout FILE`). It
  supersedes a rollout still running: the new one starts again at the first wave; it carries the
  hosts the old one was still holding back or waiting for, each with its newest release; hosts
  the old one had seen through are not in it unless they changed again; it starts paused if the
  old one was paused or halted. Without a plan (or with `--rollout off`) every release is given at
  once, and a running rollout ends with every host it held back given its release.
- A new host (no `current` yet) gets its first release at once: there is nothing to hold it on.
- A release whose content did not change (a new release format, a generation lifted above what a
  host reported) starts nothing: it is given at once to a host that is not held back, and
  replaces the held release of one that is. So a host's report, which can lift its own
  generation (herald.serve), can never restart a rollout for the others.
"""

import time
from collections.abc import Mapping

import msgspec

from protocol.layout import StateDir
from protocol.release import Current
from protocol.settings import RolloutPlan
from publisher.chroot import Chroot
from publisher.rollout import (
    Book,
    Outcome,
    Rollout,
    Status,
    Target,
    begin,
    give,
    locked,
    read_book,
    resolve,
    write_book,
)


class Gate:
    """One publish run's view of the rollout. `plan`: the rollout to start for changed content,
    None to give every release at once."""

    def __init__(self, state: StateDir, plan: RolloutPlan | None, *, source: str, off: bool = False) -> None:
        self.state = state
        self.plan = plan
        self.source = source
        book = read_book(state)
        rollout = book.rollout if book.rollout is not None and book.rollout.status.active else None
        self.held: dict[str, Current] = {
            host: Current(target.generation, target.version, target.format)
            for host, target in (rollout.hosts.items() if rollout else ())
            if not target.given
        }
        self.off = off  # `herald publish --rollout off`: a running rollout ends, all given now
        self.aborted: dict[str, str] = {} if off else dict(book.aborted)
        self.notes: dict[str, str] = {}  # host -> why its release waits
        self.given: list[str] = []  # hosts this publish did not change whose `current` it moved

    def check(self, tags: Mapping[str, list[str]]) -> None:
        """The plan over this fleet, resolved before anything is planned or written: a wave
        naming a host the fleet lacks stops the run here (ConfigError), not after the releases."""
        if self.plan is not None:
            resolve(self.plan, dict(tags), source=self.source)

    def head(self, host: str) -> Current | None:
        """The release a rollout holds back for `host`: what it will run next."""
        return self.held.get(host)

    def admit(
        self, released: Mapping[str, Current], tags: Mapping[str, list[str]], rev: str | None
    ) -> set[str]:
        """The hosts of `released` (each host's new release, written and on disk) whose `current`
        may name it now; the rollout file is written first. The caller holds the publish lock."""
        at = time.time()
        with locked(self.state):
            book = read_book(self.state)
            old = book.rollout if book.rollout is not None and book.rollout.status.active else None
            running = {
                host: Chroot(self.state.chroot(host)).current() for host in released
            }  # what each host's `current` names now
            fresh = {host for host, current in running.items() if current is None}  # nothing to hold it on
            released = {host: release for host, release in released.items() if host not in fresh}
            same = {
                host
                for host, new in released.items()
                if self._head_version(old, host, running[host]) == new.version
            }
            changed = [host for host in released if host not in same]
            for host in changed:
                book.aborted.pop(host, None)
            if self.plan is None and (changed or self.off):
                go = set(released)
                if old is not None:
                    self._end(book, old, released)
            elif not changed:
                go = self._refresh(old, released) if old is not None else set(released)
            else:
                go = self._start(book, old, released, same, running, tags, rev, at)
            write_book(self.state, book)
            if book.rollout is not None and self.given:
                self.given = give(self.state, book.rollout, self.given)
        return go | fresh

    @staticmethod
    def _head_version(old: Rollout | None, host: str, current: Current | None) -> str | None:
        target = old.hosts.get(host) if old is not None else None
        if target is not None and not target.given:
            return target.version
        return current.version if current is not None else None

    def _refresh(self, old: Rollout, released: Mapping[str, Current]) -> set[str]:
        """Releases of content already out: a held host's replaces its held one."""
        go: set[str] = set()
        for host, new in released.items():
            target = old.hosts.get(host)
            if target is not None and not target.given:
                target.generation, target.format = new.generation, new.format
                self.notes[host] = _waiting(old, target)
            else:
                if target is not None:
                    target.generation, target.format = new.generation, new.format
                go.add(host)
        return go

    def _end(self, book: Book, old: Rollout, released: Mapping[str, Current]) -> None:
        """No plan: the old rollout ends, the hosts it held back get their releases."""
        old.status = Status.SUPERSEDED
        old.reason = "superseded by a publish without a rollout: every release given at once"
        for host, target in list(old.hosts.items()):
            if host in released:
                del old.hosts[host]  # given its newer release by the publisher
            elif not target.given:
                self.given.append(host)
        book.rollout = old

    def _start(
        self,
        book: Book,
        old: Rollout | None,
        released: Mapping[str, Current],
        same: set[str],
        running: Mapping[str, Current | None],
        tags: Mapping[str, list[str]],
        rev: str | None,
        at: float,
    ) -> set[str]:
        assert self.plan is not None  # noqa: S101 - only called with one
        waves = resolve(self.plan, dict(tags), source=self.source)
        new = Rollout(
            id=_new_id(at, rev, old),
            created=at,
            source_rev=rev,
            budget=self.plan.budget,
            waves=waves,
        )
        if old is not None:
            book.last = f"rollout {old.id} ({old.status}) superseded by {new.id}"
            if old.status is not Status.RUNNING:
                new.status = Status.PAUSED
                new.reason = f"the rollout it replaced was {old.status}: `herald rollout resume` starts it"
            for host, target in old.hosts.items():
                if target.outcome == "" and host in tags and host not in released:
                    target.wave = new.wave_of(host) or 0
                    new.hosts[host] = _carried(target)
        go: set[str] = set()
        for host, release in released.items():
            carried = old.hosts.get(host) if old is not None else None
            if host in same and (carried is None or carried.given):
                go.add(host)  # its content is out already: nothing to roll out
                _still_counted(new, host, carried, release)
                continue
            current = running[host]
            previous = carried.previous if carried is not None and not carried.given else None
            new.hosts[host] = Target(
                wave=new.wave_of(host) or 0,
                generation=release.generation,
                version=release.version,
                format=release.format,
                previous=previous if previous is not None else (current.generation if current else 0),
            )
        for host in begin(new, at):
            new.hosts[host].given = True  # written to the file before any `current` names it
            (go.add if host in released else self.given.append)(host)
        for host, target in new.hosts.items():
            if not target.given:
                self.notes[host] = _waiting(new, target)
        book.rollout = new
        return go


def _new_id(at: float, rev: str | None, old: Rollout | None) -> str:
    """The time, the commit; never the id of the rollout it replaces (two publishes in a second)."""
    base = time.strftime("%Y%m%dT%H%M%S", time.localtime(at)) + (f"-{rev[:12]}" if rev else "")
    made, count = base, 1
    while old is not None and made == old.id:
        count += 1
        made = f"{base}.{count}"
    return made


def _still_counted(rollout: Rollout, host: str, carried: Target | None, release: Current) -> None:
    """A host the old rollout gave its release, whose result has not come yet, stays in the new
    one (given, at its new generation): its failure must still count against a budget."""
    if carried is None or carried.outcome is not Outcome.NONE:
        return
    rollout.hosts[host] = msgspec.structs.replace(
        carried, wave=rollout.wave_of(host) or 0, generation=release.generation, format=release.format
    )


def _carried(target: Target) -> Target:
    return Target(
        wave=target.wave,
        generation=target.generation,
        version=target.version,
        format=target.format,
        previous=target.previous,
        given=target.given,
    )


def _waiting(rollout: Rollout, target: Target) -> str:
    wave = rollout.waves[target.wave]
    return f"held back: wave {target.wave + 1} of {len(rollout.waves)} ({wave.name}) of rollout {rollout.id}"
