"""Moving the root from one generation's files (and system) to another's, through a journal.

Every step is written to `journal.json` (durably) before the root is touched:

- APPLY installs a new generation's files, then the rebuild runs. Interrupted anywhere (kill -9,
  a power cut) it is undone at the next start: the files go back to the record before and, if
  the system moved, the system goes back to the exact path recorded before the rebuild. The
  agent's loop then applies the generation again, from the start.
- RESTORE returns to the generation before: after a failed rebuild, a switch that was not
  confirmed, or the `rollback` command. Interrupted, it is finished at the next start.

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

from client.apply import RebuildResult, fill, run_rebuild
from client.install import Converged, InstallRecord, converge, known_of, missing_dirs, record_of
from client.store import Applied, Journal, Rebuilding, Step, Store
from client.system import current_system, rollback_commands
from protocol.errors import RebuildError, StorageError
from protocol.messages import Phase
from protocol.release import Manifest
from protocol.settings import AgentConfig, Operation, seconds

Note = Callable[[str], None]
_GONE_POLL: Final = 0.1


class Transitions:
    def __init__(self, config: AgentConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.root = Path(config.root)
        self.timeout = float(seconds(config.rebuild.timeout))
        self.log = logger.bind(host=config.host)

    # ---------------------------------------------------------------- steps

    def install(self, manifest: Manifest, tree: Path, operation: Operation) -> tuple[Journal, Converged]:
        """Begin APPLY: journal, then the new generation's files into the root.

        A write this machine's disk refuses undoes what was written and raises StorageError:
        nothing about the release is wrong, so it is retried later.
        """
        before = self.store.installed(self.root)
        target = record_of(manifest, self.root)
        journal = Journal(
            step=Step.APPLY,
            generation=manifest.generation,
            version=manifest.version,
            operation=operation,
            before=before,
            target=target,
            new_dirs=missing_dirs(self.root, target),
            system=current_system(self.root, operation),
        )
        self.store.begin(journal)
        try:
            done = converge(self.root, target, tree / "files", known_of(before), dirs=before.dirs)
        except OSError as exc:
            self._files_back(journal)
            self.store.end()
            raise StorageError(f"cannot install generation {manifest.generation}'s files: {exc}") from exc
        if done.unavailable:
            self._files_back(journal)
            self.store.end()
            damaged = ", ".join(done.unavailable[:3])
            raise StorageError(f"the fetched tree of generation {manifest.generation} changed: {damaged}")
        return journal, done

    def running(self, pid: int) -> None:
        """The step's rebuild or rollback command started (recovery waits for it if it outlives us)."""
        self.store.set_rebuilding(Rebuilding(pid, _started(pid) or 0))

    async def rebuild(self, argv: list[str], log: TextIO) -> RebuildResult:
        try:
            return await run_rebuild(argv, timeout=self.timeout, log=log, on_start=self.running)
        finally:
            self.store.set_rebuilding(None)

    def restore_journal(self, applied: Journal, outcome: Applied, *, switch_back: bool) -> Journal:
        """RESTORE after `applied` failed: back to the files (and system) from before it."""
        return Journal(
            step=Step.RESTORE,
            generation=applied.generation,
            version=applied.version,
            operation=applied.operation,
            before=applied.target,
            target=applied.before,
            new_dirs=applied.new_dirs,
            system=applied.system,
            switch_back=switch_back,
            outcome=outcome,
        )

    def rollback_journal(self, deployed: Applied, previous: Applied, manifest: Manifest) -> Journal:
        """RESTORE for the `rollback` command: to `previous`'s files and exact system."""
        target = record_of(manifest, self.root)
        operation = previous.operation or deployed.operation or Operation.SWITCH
        message = f"rolled back from generation {deployed.generation} to {previous.generation}"
        return Journal(
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

    async def restore(self, journal: Journal, note: Note, log: TextIO) -> tuple[InstallRecord, str]:
        """Run (or finish) a RESTORE: the files, then the system. Returns what the root now
        holds and '' or what failed; the caller settles the records (`settle_restore`).

        A `rollback` command whose system could not be switched back puts the files back too:
        the host stays as it was deployed."""
        self.store.begin(journal)
        done = await asyncio.to_thread(self._files_to, journal.target, journal)
        failure = ""
        if journal.switch_back:
            failure = await self.switch_to(journal.system, journal.operation, note, log)
            self.store.begin(msgspec.structs.replace(journal, switch_back=False))  # not tried twice
        if failure and journal.rolled_back:
            return (await asyncio.to_thread(self._files_to, journal.before, journal)).record, failure
        return done.record, failure

    def settle_restore(self, journal: Journal, record: InstallRecord, failure: str) -> None:
        """The records that end a RESTORE, then the journal."""
        if journal.rolled_back:
            deployed = self.store.deployed()
            done = not failure and deployed is not None and deployed.generation == journal.generation
            self.store.settle(
                record,
                rolled_back=done,
                failed=journal.outcome if not failure else None,
            )
        else:
            outcome = journal.outcome
            if outcome is not None and failure:
                message = f"{outcome.message}; {failure}"[:2000]
                outcome = msgspec.structs.replace(outcome, message=message, phase=None)
            self.store.settle(record, failed=outcome)

    async def switch_to(self, system: str | None, operation: Operation, note: Note, log: TextIO) -> str:
        """Make `system` run again (or boot next): rebuild.rollback if set, else exactly that
        path through nix-env and its switch-to-configuration. '' on success."""
        rollback = self.config.rebuild.rollback
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
        elif system is None:
            return "rollback impossible: no system was recorded before the rebuild"
        else:
            commands = rollback_commands(self.root, system, operation)
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
            record, failure = await self.restore(journal, note, log)
            await asyncio.to_thread(self.settle_restore, journal, record, failure)
            return f"finished the interrupted return from generation {generation}" + (
                f"; {failure}" if failure else ""
            )
        deployed = self.store.deployed()
        if deployed is not None and (deployed.generation, deployed.version) == (generation, journal.version):
            await asyncio.to_thread(self.store.settle, journal.target)
            return None  # it was recorded as deployed: only the bookkeeping was left
        note(f"undoing the interrupted apply of generation {generation}")
        done = await asyncio.to_thread(self._files_to, journal.before, journal)
        failure = ""
        moved = journal.system is not None and current_system(self.root, journal.operation) != journal.system
        if moved:
            note(f"the system moved during the interrupted rebuild; returning to {journal.system}")
            failure = await self.switch_to(journal.system, journal.operation, note, log)
        await asyncio.to_thread(self.store.settle, done.record)
        return f"undid the interrupted apply of generation {generation}" + (f"; {failure}" if failure else "")

    # ---------------------------------------------------------------- helpers

    def _files_to(self, target: InstallRecord, journal: Journal) -> Converged:
        """Converge on `target`, knowing what either side of `journal` may have left."""
        source = self.store.tree(target.generation) / "files" if target.generation else None
        dirs = set(journal.before.dirs) | set(journal.target.dirs) | set(journal.new_dirs)
        done = converge(self.root, target, source, known_of(journal.before, journal.target), dirs=dirs)
        for path in done.unavailable:
            self.log.warning("cannot restore /{}: generation {}'s copy is not held", path, target.generation)
        for path in done.left_local:
            self.log.warning("left /{} in place: changed locally since herald installed it", path)
        return done

    def _files_back(self, journal: Journal) -> None:
        self._files_to(journal.before, journal)

    async def _gone(self, running: Rebuilding) -> None:
        """Wait for an earlier run's command to end; at rebuild.timeout, kill its process group."""
        deadline = time.monotonic() + self.timeout
        while _started(running.pid) == running.started:
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(running.pid, signal.SIGKILL)
                return
            await asyncio.sleep(_GONE_POLL)


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
