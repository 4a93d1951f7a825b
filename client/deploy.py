"""One deployment cycle: check, fetch and verify, apply, confirm or roll back, report.

Everything here reports through the Reporter and leaves a log (uploaded to the server's
logs/) for any run that went past the check (client.outcome).
"""

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path

import asyncssh
import msgspec
from loguru import logger

import protocol
from client import pause
from client.apply import operation_of, rebuild_commands
from client.chroot import Chroot
from client.closure import realise
from client.confirm import confirm
from client.converge import Converged
from client.fetch import Fetched, Verify, check, fetch
from client.link import ServerLink
from client.outcome import Finisher, Outcome, RunLog, attempts_of, decide, retry_note
from client.records import Applied, Journal
from client.report import Reporter
from client.store import Store, log_name
from client.system import current_system
from client.transition import Transitions
from client.workstation import postpone_reason
from protocol import formats
from protocol.errors import NotYetError, RebuildError, ReleaseError, StorageError, UnreachableError
from protocol.keychain import Trust
from protocol.messages import Phase, State, now
from protocol.release import (
    Current,
    Manifest,
)
from protocol.settings import AgentConfig, Deliver, Operation, seconds


class MissingFileError(UnreachableError):
    """A file the release names is not on the server: a release replaced or pruned while this
    agent fetched it (gone at the next check), or a damaged chroot (it stays)."""


NewAgentCheck = Callable[[RunLog], Awaitable[str | None]]


def _missing(exc: UnreachableError) -> bool:
    """Did the server answer "no such file"? client.fetch says so in its message (a download's
    cause is dropped where the first of several parallel failures is raised)."""
    return isinstance(exc.__cause__, asyncssh.SFTPNoSuchFile) or str(exc).endswith("is missing on the server")


class Deployer:
    def __init__(self, config: AgentConfig, store: Store, link: ServerLink, reporter: Reporter) -> None:
        self.config = config
        self.host = config.host
        self.store = store
        self.link = link
        self.reporter = reporter
        self.log = logger.bind(host=config.host)
        self.chroot = Chroot(config, store, link, reporter)
        self.finisher = Finisher(config, store, self.chroot, reporter)
        self.notifier = self.finisher.notifier
        self.transitions = Transitions(config, store)
        self.root = Path(config.root)
        self.poll = float(seconds(config.poll))
        self.changed_host = False  # the last run applied or rolled back something
        # Whether the agent that a deployment installs would start: None if so, else why not
        # (client.agent passes it in; it restarts itself after a deployment that changed it).
        self.new_agent_check: NewAgentCheck | None = None

    async def recover(self) -> None:
        """Finish or undo what an earlier run left in the journal (client.transition); before
        anything else. A disk that refuses is retried at the next run."""
        if self.store.journal() is None:
            return
        try:
            with (self.store.root / "recovery.log").open("a", encoding="utf-8") as stream:
                done = await self.transitions.recover(RunLog(stream), stream)
        except OSError as exc:
            raise StorageError(f"cannot finish or undo the interrupted step: {exc}") from exc
        if done:
            self.log.warning("{}", done)
            await self.reporter.report(self.reporter.state.phase, message=done)

    async def cycle(self, *, force: bool, urgent: bool = False) -> State:
        """Check; fetch, verify and apply a new generation; report. Returns the state reported.

        `force` applies again what is deployed or failed (the sysadmin's `rebuild`); `force` and
        `urgent` (the person's "Update now") apply even when the postpone policy says wait.
        """
        self.changed_host = False
        await self.recover()  # left by a run that failed to finish or undo it
        await self.reporter.report(Phase.CHECKING, message="checking")
        sftp = await self.link.sftp()
        trust = await self.chroot.credentials(sftp)
        current = await check(sftp)
        try:
            followed = self.chroot.behind(trust, current)
            if followed:  # new key statements (a retirement, say): followed before anything is verified
                trust = await self.chroot.follow(sftp, trust)
            return await self._cycle(sftp, trust, current, followed=followed, force=force, urgent=urgent)
        except NotYetError as exc:
            # Not the release's fault: nothing is recorded as refused, and the next check (an
            # announcement, the timer, the agent upgraded and restarted) looks at it again.
            self.log.warning("generation {} not applied: {}", current.generation, exc)
            return await self.reporter.report(Phase.FAILED, target=current.generation, message=str(exc))

    async def _cycle(
        self,
        sftp: asyncssh.SFTPClient,
        trust: Trust,
        current: Current,
        *,
        followed: bool,
        force: bool,
        urgent: bool,
    ) -> State:
        verdict = decide(
            current, self.store.deployed(), self.store.failed(), force=force, retry_after=self.poll
        )
        if verdict is not None:
            phase, message = verdict
            if phase is Phase.FAILED:
                self.log.warning("generation {}: {}", current.generation, message)
            return await self.reporter.report(phase, target=current.generation, message=message)
        if current.format > formats.RELEASE:
            raise NotYetError(formats.newer_release(current.format))
        if not (force or urgent) and (reason := await postpone_reason(self.config.postpone)) is not None:
            message = f"generation {current.generation} postponed: {reason}"
            if self.reporter.state.phase is not Phase.POSTPONED:
                self.log.info("{}", message)
            return await self.reporter.report(Phase.POSTPONED, target=current.generation, message=message)
        if current.keys is None and not followed:  # a format-1 `current` counts no statements:
            trust = await self.chroot.follow(sftp, trust)  # look before each new release
            followed = True

        async def verify(data: bytes, signature: bytes) -> None:
            await self.chroot.verify(sftp, trust, data, signature, followed=followed)

        return await self._logged(current.generation, lambda note: self._apply(sftp, verify, current, note))

    async def rollback(self, reason: str, *, leaving: int | None = None) -> State:
        """Return to the deployment before the current one (the `rollback` command): its exact
        system, and its files. `leaving` is the generation deployed when the command arrived:
        one deployed since (an apply that was running) is not rolled back in its place."""
        self.changed_host = False
        await self.recover()
        deployed, previous = self.store.deployed(), self.store.previous()
        if deployed is not None and leaving is not None and deployed.generation != leaving:
            message = (
                f"rollback refused: it was sent for generation {leaving}, and generation "
                f"{deployed.generation} was deployed since; send it again to roll that back"
            )
            self.log.warning("{}", message)
            return await self.reporter.report(self.reporter.state.phase, message=message)
        if deployed is None or previous is None:
            message = "rollback refused: no earlier deployment to return to"
            return await self.reporter.report(self.reporter.state.phase, message=message)
        manifest = self.store.manifest(previous.generation)
        if manifest is None or not self.store.tree(previous.generation).is_dir():
            message = f"rollback refused: generation {previous.generation}'s files are no longer held here"
            return await self.reporter.report(self.reporter.state.phase, message=message)

        async def run(note: RunLog) -> Outcome:
            note(f"rollback from generation {deployed.generation} to {previous.generation}: {reason}")
            journal = self.transitions.rollback_journal(deployed, previous, manifest)
            done, failure = await self.transitions.restore(journal, note, note.stream)
            self._note_install(done, note)

            def settle(_: Applied) -> None:
                self.transitions.settle_restore(journal, done.record, failure)

            problems = f"; could not change: {done.failures()}" if done.failed else ""
            if failure:
                message = failure + problems
                return Outcome(deployed.generation, deployed.version, now(), Phase.FAILED, message, settle)
            self.store.point_release(previous.generation)
            message = (journal.outcome.message if journal.outcome else "rolled back") + problems
            note(message)
            return Outcome(deployed.generation, deployed.version, now(), Phase.ROLLED_BACK, message, settle)

        return await self._logged(deployed.generation, run)

    async def _logged(self, generation: int, work: Callable[[RunLog], Awaitable[Outcome]]) -> State:
        """Run `work` with a run log; record, upload and report its outcome."""
        running = self.store.logs / log_name(now(), generation, "running")
        try:
            with running.open("w", encoding="utf-8") as stream:
                outcome = await work(RunLog(stream))
        except BaseException:
            running.unlink(missing_ok=True)
            raise
        state = await self.finisher.finish(outcome, running)
        self.changed_host = outcome.phase in (Phase.IDLE, Phase.ROLLED_BACK)
        return state

    async def _apply(
        self, sftp: asyncssh.SFTPClient, verify: Verify, current: Current, note: RunLog
    ) -> Outcome:
        report = self.reporter.report
        generation, version, started = current.generation, current.version, now()

        note(f"herald agent {protocol.__version__} on {self.host}: generation {generation} ({version[:12]})")
        await report(Phase.FETCHING, target=generation, message=f"fetching generation {generation}")
        try:
            fetched = await self._fetch(sftp, verify, current, note)
        except ReleaseError as exc:  # only what the release itself says wrong refuses it
            self.log.error("release generation {} refused: {}", generation, exc)
            note(f"release refused: {exc}")
            return Outcome(generation, version, started, Phase.FAILED, f"release refused: {exc}")
        manifest = fetched.manifest
        self.store.point_release(generation)
        await report(Phase.APPLYING, target=generation, message=f"applying generation {generation}")
        broker_was_up = self.reporter.connected
        operation = operation_of(self.config, manifest)
        journal, done = await asyncio.to_thread(self.transitions.install, manifest, fetched.tree, operation)
        self._note_install(done, note)
        failed, seconds_taken = await self._rebuild(manifest, fetched.tree, note)
        if failed:
            return await self._restore(journal, failed, note, started, rolled_back=False, retry=True)
        pause.at("rebuilt")
        applied = f"applied generation {generation} in {seconds_taken:.1f}s"
        if done.left_local:
            applied += f"; left in place, changed locally: {' '.join('/' + p for p in done.left_local)}"
        if done.failed:
            applied += (
                f"; not written: {done.failures()}: change these paths on the host, then "
                f"`herald trigger --action rebuild {self.host}`"
            )
        if operation is Operation.SWITCH and self.store.deployed() is not None:
            problem = await self._confirm(generation, broker_was_up, note)
            if problem:
                self.log.error("generation {} not confirmed ({}); rolling back", generation, problem)
                return await self._restore(
                    journal, f"rolled back: {problem}", note, started, rolled_back=True
                )
        if self.new_agent_check is not None and (problem := await self.new_agent_check(note)):
            self.log.error("generation {}: {}; rolling back", generation, problem)
            return await self._restore(journal, f"rolled back: {problem}", note, started, rolled_back=True)
        # nothing running changed (boot, test), nothing to return to (the first), or confirmed
        keep = {generation} | ({deployed.generation} if (deployed := self.store.deployed()) else set())
        installed = done.record

        def settle(record: Applied) -> None:
            self.store.settle(installed, deployed=record, keep=keep)

        note(applied)
        system = current_system(self.root, operation)
        return Outcome(
            generation, version, started, Phase.IDLE, applied, settle, operation, system, journal.id
        )

    async def _fetch(
        self, sftp: asyncssh.SFTPClient, verify: Verify, current: Current, note: RunLog
    ) -> Fetched:
        """Fetch and verify the release; the server's faults and this disk's are raised (tried
        again later), a file missing on the server saying so."""
        try:
            fetched = await fetch(sftp, current, host=self.host, verify=verify, store=self.store)
            note(
                f"fetched: {fetched.downloaded} file(s), {fetched.downloaded_bytes} bytes downloaded, "
                f"{fetched.reused} reused; source {fetched.manifest.source_rev or 'unknown'}"
            )
            system = fetched.manifest.content.system
            self._check_delivery(fetched.manifest)
            if system is not msgspec.UNSET:
                imported = await realise(
                    sftp,
                    system,
                    store=self.config.store,
                    work=self.store.root / "closure",
                    log=note.stream,
                    timeout=float(seconds(self.config.rebuild.timeout)),
                )
                note(imported.summary(system))
        except UnreachableError as exc:
            note(f"fetch interrupted: {exc}")
            if _missing(exc):
                raise self._damaged(exc, current.generation) from exc
            raise
        except StorageError as exc:
            note(f"fetch interrupted: {exc}")
            raise
        return fetched

    def _damaged(self, exc: UnreachableError, generation: int) -> MissingFileError:
        """What a "no such file" from the server means, and what to do if it stays."""
        return MissingFileError(
            f"the server is missing a file of generation {generation}: {exc}; tried again with "
            f"backoff. If it stays, {self.host}'s chroot on the server is damaged: publish a change "
            "to this host, or restore the server's state"
        )

    def _check_delivery(self, manifest: Manifest) -> None:
        """ReleaseError when agent.toml's `deliver` refuses how this release delivers the system."""
        wanted = self.config.deliver
        given = Deliver.SOURCE if manifest.content.system is msgspec.UNSET else Deliver.CLOSURE
        if wanted is not None and given is not wanted:
            raise ReleaseError(
                f"this host takes {wanted.value} releases only (agent.toml: deliver = '{wanted.value}'), and "
                f"generation {manifest.generation} is a {given.value} release: set deliver = "
                f"'{wanted.value}' for {self.host} in fleet.toml"
            )

    def _note_install(self, done: Converged, note: RunLog) -> None:
        note(f"installed into {self.config.root}: {done.summary()}")
        for label, paths in (
            ("written", done.written),
            ("removed (no longer released)", done.removed),
            ("replaced, changed locally since herald installed it", done.replaced_local),
            ("replaced, there before herald installed it (kept, put back later)", done.replaced_other),
            ("put back as it was before herald installed it", done.restored),
            ("left in place, changed locally since herald installed it", done.left_local),
            ("not installed, no good copy held", done.unavailable),
        ):
            if paths:
                note(f"{label}: {' '.join('/' + path for path in paths)}")
        for path, why in done.failed:
            note(f"not changed: /{path}: {why}")
        if done.left_local:
            self.log.warning("left in place, changed locally: {}", " ".join("/" + p for p in done.left_local))
        if done.failed:
            self.log.warning("not changed: {}", done.failures())

    async def _rebuild(self, manifest: Manifest, tree: Path, note: RunLog) -> tuple[str, float]:
        """Run the rebuild command (or a delivered system's switch commands, one after the
        other): ('', seconds) when it succeeded, else (what failed, seconds)."""
        taken = 0.0
        try:
            for argv in rebuild_commands(self.config, manifest, tree):
                note(f"running: {' '.join(argv)}")
                self.log.info("generation {}: running {}", manifest.generation, argv[0])
                result = await self.transitions.rebuild(argv, note.stream)
                taken += result.seconds
                if result.returncode is None:
                    return f"rebuild killed after {self.config.rebuild.timeout} (rebuild.timeout)", taken
                if not result.ok:
                    return f"rebuild failed with exit code {result.returncode}", taken
        except (RebuildError, OSError) as exc:
            return f"apply failed: {exc}", taken
        return "", taken

    async def _confirm(self, generation: int, broker_was_up: bool, note: RunLog) -> str | None:
        """None when the switched system still reaches its server; else what failed."""
        await self.reporter.report(
            Phase.CONFIRMING, target=generation, message=f"confirming generation {generation}"
        )
        return await confirm(
            self.link,
            self.reporter.probe if broker_was_up else None,
            self.config.confirm.health,
            seconds(self.config.confirm.window),
            note,
        )

    async def _restore(
        self,
        journal: Journal,
        message: str,
        note: RunLog,
        started: datetime,
        *,
        rolled_back: bool,
        retry: bool = False,
    ) -> Outcome:
        """The apply of `journal` failed: back to the files and, if the switch happened or a
        system link moved, the exact system from before it. `retry`: a failed rebuild, tried
        again by itself a few times (client.outcome)."""
        moved = self.transitions.moved(journal)
        phase = Phase.ROLLED_BACK if rolled_back else Phase.FAILED
        attempts = attempts_of(self.store.failed(), journal.generation, journal.version) if retry else 0
        if attempts:
            message = f"{message}; {retry_note(attempts, self.config.poll, self.host)}"
        record = Applied(
            generation=journal.generation,
            version=journal.version,
            at=now(),
            message=message,
            phase=phase if rolled_back else None,
            attempts=attempts,
        )
        restore = self.transitions.restore_journal(journal, record, switch_back=rolled_back or moved)
        if restore.switch_back and not rolled_back:
            note("the system moved; returning to the system before the rebuild")
        done, failure = await self.transitions.restore(restore, note, note.stream)
        self._note_install(done, note)
        if failure:
            phase, message = Phase.FAILED, f"{message}; {failure}"
        if done.failed:
            message = f"{message}; could not put back: {done.failures()}"

        def settle(_: Applied) -> None:
            self.transitions.settle_restore(restore, done.record, failure)

        note(message)
        return Outcome(
            journal.generation, journal.version, started, phase, message, settle, attempts=attempts
        )
