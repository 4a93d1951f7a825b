"""Moving the root from one generation's files (and system) to another's, through a journal.

Every step is written to `journal.json` (durably) before the root is touched:

- APPLY installs a new generation's files, then the rebuild runs. Interrupted anywhere (kill -9,
  a power cut) it is undone at the next start: the files go back to the record before (what
  herald displaced put back too) and, if a system link moved (the profile, /run/current-system),
  it goes back to the exact path recorded before the rebuild. The agent's loop then applies the
  generation again, from the start. An APPLY is finished only when deployed.json names its id:
  a forced re-apply of what is deployed shares its generation and version, not its id.
- RESTORE returns to the generation before: after a failed rebuild, a switch that was not
  confirmed, or the `rollback` command. Interrupted, it is finished at the next start. Its
  switch back is tried once and its failure journaled before anything else moves, so that a
  kill afterwards is finished as the failure it was.

A path that cannot be written or removed (a link, a directory in its way, a directory someone
else may write) never stops a step: it is reported, and the step goes on to the system.

Recovery runs before anything else (the local page, the broker, the first check). If the
rebuild or rollback command of the interrupted step is still running (it runs in a session of
its own and survives the agent), recovery waits for it first.
"""

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, TextIO

import msgspec
from loguru import logger

from client import pause
from client.apply import RebuildResult, fill, run_rebuild
from client.converge import Converged, StorageFull, converge
from client.install import Displaced, InstallRecord, displaced_of, known_of, missing_dirs, record_of
from client.records import Applied, Journal, Rebuilding, Step, journal_id
from client.store import Store
from client.system import current_system, restore_commands, rollback_commands, systems
from protocol.errors import RebuildError, StorageError
from protocol.messages import Phase
from protocol.release import Manifest
from protocol.settings import AgentConfig, Operation, seconds

Note = Callable[[str], None]
_GONE_POLL: Final = 0.1


class _Keeper:
    """Keeps what a step replaces (and herald had not installed) in the agent's state, and lists
    it in the step's journal, durably, before the path is replaced."""

    def __init__(self, store: Store, journal: Journal) -> None:
        self.store = store
        self.journal = journal

    def keep(self, entry: Displaced, data: bytes) -> None:
        self.store.keep_displaced(entry, data)
        self.journal = msgspec.structs.replace(self.journal, displaced=[*self.journal.displaced, entry])
        self.store.begin(self.journal)

    def content(self, entry: Displaced) -> bytes | None:
        return self.store.displaced_content(entry)


class Transitions:
    def __init__(self, config: AgentConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.root = Path(config.root)
        self.timeout = float(seconds(config.rebuild.timeout))
        self.log = logger.bind(host=config.host)

    # ---------------------------------------------------------------- steps

    def install(self, manifest: Manifest, tree: Path, operation: Operation) -> tuple[Journal, Converged]:
        """Begin APPLY: journal, then the new generation's files into the root. Paths that cannot
        be written are in the result's `failed`; the apply goes on without them.

        A write this machine's storage refuses (full, out of quota) undoes what was written and
        raises StorageError: nothing about the release is wrong, so it is retried later.
        """
        before = self.store.installed(self.root)
        target = record_of(manifest, self.root)
        journal = Journal(
            id=journal_id(),
            step=Step.APPLY,
            generation=manifest.generation,
            version=manifest.version,
            operation=operation,
            before=before,
            target=target,
            new_dirs=missing_dirs(self.root, target),
            system=current_system(self.root, operation),
            systems=systems(self.root),
        )
        self.store.begin(journal)
        keeper = _Keeper(self.store, journal)
        try:
            done = converge(
                self.root,
                target,
                tree / "files",
                known_of(before),
                dirs=before.dirs,
                displaced=displaced_of(before.displaced),
                keeper=keeper,
                point="install",
            )
        except StorageFull as exc:
            self._undo(keeper)
            raise StorageError(
                f"cannot install generation {manifest.generation}'s files: {exc.strerror}; "
                "free space on this machine (tried again with backoff)"
            ) from exc
        if done.unavailable:
            self._undo(keeper)
            damaged = ", ".join(done.unavailable[:3])
            raise StorageError(f"the fetched tree of generation {manifest.generation} changed: {damaged}")
        return keeper.journal, done

    def _undo(self, keeper: _Keeper) -> None:
        undone = self._files_to(keeper.journal.before, keeper, "restore")
        self.store.settle(undone.record)

    def running(self, pid: int) -> None:
        """The step's rebuild or rollback command started (recovery waits for it if it outlives us)."""
        self.store.set_rebuilding(Rebuilding(pid, _started(pid) or 0))

    async def rebuild(self, argv: list[str], log: TextIO) -> RebuildResult:
        try:
            return await run_rebuild(argv, timeout=self.timeout, log=log, on_start=self.running)
        finally:
            self.store.set_rebuilding(None)

    def moved(self, journal: Journal) -> bool:
        """Did a system link move since `journal` (an APPLY) recorded them?"""
        if journal.systems is not None:
            return bool(restore_commands(self.root, journal.systems, systems(self.root), self.config.store))
        return journal.system is not None and current_system(self.root, journal.operation) != journal.system

    def restore_journal(self, applied: Journal, outcome: Applied, *, switch_back: bool) -> Journal:
        """RESTORE after `applied` failed: back to the files (and system links) from before it."""
        return Journal(
            id=journal_id(),
            step=Step.RESTORE,
            generation=applied.generation,
            version=applied.version,
            operation=applied.operation,
            before=applied.target,
            target=applied.before,
            new_dirs=applied.new_dirs,
            system=applied.system,
            systems=applied.systems,
            displaced=applied.displaced,
            switch_back=switch_back,
            outcome=outcome,
        )

    def rollback_journal(self, deployed: Applied, previous: Applied, manifest: Manifest) -> Journal:
        """RESTORE for the `rollback` command: to `previous`'s files and exact system."""
        target = record_of(manifest, self.root)
        operation = previous.operation or deployed.operation or Operation.SWITCH
        message = f"rolled back from generation {deployed.generation} to {previous.generation}"
        return Journal(
            id=journal_id(),
            step=Step.RESTORE,
            generation=deployed.generation,
            version=deployed.version,
            operation=operation,
            before=self.store.installed(self.root),
            target=target,
            new_dirs=missing_dirs(self.root, target),
            system=previous.system,
            switch_back=True,
            outcome=msgspec.structs.replace(deployed, message=message, phase=Phase.ROLLED_BACK),
            rolled_back=True,
        )

    async def restore(self, journal: Journal, note: Note, log: TextIO) -> tuple[Converged, str]:
        """Run (or finish) a RESTORE: the files, then the system. Returns what the files became
        and '' or what failed; the caller settles the records (`settle_restore`).

        The switch back is tried once, and its failure journaled before anything else, so that
        a kill afterwards is finished as a failure. A `rollback` command whose system could not
        be switched back puts the files back too: the host stays as it was deployed."""
        self.store.begin(journal)
        keeper = _Keeper(self.store, journal)
        failure = journal.switch_failed
        done = None
        if not failure:
            done = await asyncio.to_thread(self._files_to, journal.target, keeper, "restore")
            if journal.switch_back:
                failure = await self.switch_to(journal, note, log)
                keeper.journal = msgspec.structs.replace(
                    keeper.journal, switch_back=False, switch_failed=failure
                )
                await asyncio.to_thread(self.store.begin, keeper.journal)
                pause.at("switched-back")
        if failure and journal.rolled_back:
            done = await asyncio.to_thread(self._files_to, journal.before, keeper, "restore")
        elif done is None:
            done = await asyncio.to_thread(self._files_to, journal.target, keeper, "restore")
        return done, failure

    def settle_restore(self, journal: Journal, record: InstallRecord, failure: str) -> None:
        """The records that end a RESTORE, then the journal."""
        if journal.rolled_back:
            deployed = self.store.deployed()
            pending = (  # `previous` is not deployed again yet (by this step: its id)
                not failure
                and deployed is not None
                and (deployed.journal != journal.id or not journal.id)
                and deployed.generation == journal.generation
            )
            self.store.settle(
                record,
                rolled_back=journal.id if pending else None,
                failed=journal.outcome if not failure else None,
            )
        else:
            outcome = journal.outcome
            if outcome is not None and failure:
                message = f"{outcome.message}; {failure}"[:2000]
                outcome = msgspec.structs.replace(outcome, message=message, phase=None, attempts=0)
            self.store.settle(record, failed=outcome)

    async def switch_to(self, journal: Journal, note: Note, log: TextIO) -> str:
        """Return the system to what `journal` recorded: rebuild.rollback if set; else each
        link that moved back to exactly its path (a failed apply), or exactly `system` (the
        rollback command). '' on success."""
        rollback = self.config.rebuild.rollback
        system, operation = journal.system, journal.operation
        if rollback is not None:
            try:
                commands = [
                    fill(
                        rollback,
                        "rebuild.rollback",
                        host=self.config.host,
                        system=system or "",
                        operation=operation.value,
                    )
                ]
            except RebuildError as exc:
                return f"rollback failed: {exc}"
        elif journal.systems is not None:
            commands = restore_commands(self.root, journal.systems, systems(self.root), self.config.store)
            if not commands:
                note("the system links are where they were: nothing to switch back")
        elif system is None:
            return "rollback impossible: no system was recorded before the rebuild"
        else:
            commands = rollback_commands(self.root, system, operation, self.config.store)
        for argv in commands:
            note(f"running: {' '.join(argv)}")
            try:
                result = await self.rebuild(argv, log)
            except (RebuildError, OSError) as exc:
                return f"rollback failed: {exc}"
            if not result.ok:
                code = (
                    "killed at rebuild.timeout"
                    if result.returncode is None
                    else f"exit code {result.returncode}"
                )
                return f"rollback failed: {argv[0]} ended with {code}"
        return ""

    # ---------------------------------------------------------------- recovery

    async def recover(self, note: Note, log: TextIO) -> str | None:
        """Finish or undo the step a previous run left in the journal; what was done, or None."""
        journal = self.store.journal()
        if journal is None:
            return None
        running = self.store.rebuilding()
        if running is not None:
            note(f"waiting for the command left running (pid {running.pid})")
            await self._gone(running)
        generation = journal.generation
        if journal.step is Step.RESTORE:
            note(f"finishing the interrupted return from generation {generation}")
            done, failure = await self.restore(journal, note, log)
            await asyncio.to_thread(self.settle_restore, journal, done.record, failure)
            return f"finished the interrupted return from generation {generation}" + _problems(done, failure)
        keeper = _Keeper(self.store, journal)
        if _recorded(journal, self.store.deployed()):
            # it was recorded as deployed: only the bookkeeping was left (the root as it is now)
            done = await asyncio.to_thread(self._files_to, journal.target, keeper, "")
            await asyncio.to_thread(self.store.settle, done.record)
            return None
        note(f"undoing the interrupted apply of generation {generation}")
        done = await asyncio.to_thread(self._files_to, journal.before, keeper, "restore")
        failure = ""
        if self.moved(journal):
            note("the system moved during the interrupted rebuild; returning to the system before it")
            failure = await self.switch_to(journal, note, log)
        await asyncio.to_thread(self.store.settle, done.record)
        return f"undid the interrupted apply of generation {generation}" + _problems(done, failure)

    # ---------------------------------------------------------------- helpers

    def _files_to(self, target: InstallRecord, keeper: _Keeper, point: str) -> Converged:
        """Converge on `target`, knowing what either side of the keeper's journal may have left
        and what it displaced. Never stops at a path: what fails is in the result."""
        journal = keeper.journal
        source = self.store.tree(target.generation) / "files" if target.generation else None
        dirs = set(journal.before.dirs) | set(journal.target.dirs) | set(journal.new_dirs)
        displaced = displaced_of(journal.before.displaced, journal.target.displaced, journal.displaced)
        done = converge(
            self.root,
            target,
            source,
            known_of(journal.before, journal.target),
            dirs=dirs,
            displaced=displaced,
            keeper=keeper,
            point=point,
            stop_on_full=False,
        )
        for path in done.unavailable:
            self.log.warning("cannot restore /{}: generation {}'s copy is not held", path, target.generation)
        for path in done.left_local:
            self.log.warning("left /{} in place: changed locally since herald installed it", path)
        for path, why in done.failed:
            self.log.warning("cannot change /{}: {}", path, why)
        return done

    async def _gone(self, running: Rebuilding) -> None:
        """Wait for an earlier run's command to end; at rebuild.timeout, kill its process group."""
        deadline = time.monotonic() + self.timeout
        while _started(running.pid) == running.started:
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(running.pid, signal.SIGKILL)
                return
            await asyncio.sleep(_GONE_POLL)


def _recorded(journal: Journal, deployed: Applied | None) -> bool:
    """Was this APPLY recorded as deployed? By its id; a journal of an agent that gave none, by
    what it applied (which a forced re-apply shares with what is deployed: those are undone)."""
    if deployed is None:
        return False
    if journal.id:
        return deployed.journal == journal.id
    return (deployed.generation, deployed.version) == (journal.generation, journal.version)


def _problems(done: Converged, failure: str) -> str:
    text = f"; {failure}" if failure else ""
    return text + (f"; could not change: {done.failures()}" if done.failed else "")


def _started(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks after boot), or None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    if not fields or fields[0] == b"Z":
        return None  # a zombie has ended
    return int(fields[19])
