"""One deployment cycle: check, fetch and verify, apply, confirm or roll back, report.

Everything here reports through the Reporter and leaves a log (uploaded to the server's
logs/) for any run that went past the check.
"""

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final, TextIO

import asyncssh
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from loguru import logger

import protocol
from client.apply import FILES, install_files, operation_of, rebuild_argv, rollback_argv, run_rebuild
from client.confirm import confirm
from client.fetch import check, fetch, read_small
from client.link import ServerLink
from client.report import Reporter
from client.store import Applied, Store, log_name
from client.workstation import Notifier, postpone_reason
from protocol.credentials import Secret
from protocol.errors import RebuildError, ReleaseError, UnreachableError
from protocol.files import write_atomic
from protocol.messages import Phase, State, now
from protocol.release import BROKER_SECRET, CREDENTIALS, LOGS, PUBLISHER_KEY, Current, decode_public_key
from protocol.settings import AgentConfig, Operation, seconds

KEEP_LOGS: Final = 20


def decide(
    current: Current, deployed: Applied | None, failed: Applied | None, *, force: bool
) -> tuple[Phase, str] | None:
    """What to report without fetching, or None when `current` should be fetched and applied."""
    if deployed is not None and current.generation < deployed.generation:
        offered = f"server offers generation {current.generation}"
        return Phase.FAILED, f"refused: {offered}, older than deployed {deployed.generation}"
    if deployed is not None and current.generation == deployed.generation:
        if current.version != deployed.version:
            return Phase.FAILED, f"refused: generation {current.generation} reused with other content"
        return None if force else (Phase.IDLE, "up to date")
    if (
        not force
        and failed is not None
        and (failed.generation, failed.version) == (current.generation, current.version)
    ):
        return Phase.FAILED, failed.message
    return None


@dataclass(frozen=True, slots=True)
class Outcome:
    generation: int
    version: str
    started: datetime
    phase: Phase  # IDLE (applied), FAILED or ROLLED_BACK
    message: str


class RunLog:
    """The log of one run: timestamped lines from herald, the commands' output in between."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __call__(self, line: str) -> None:
        self.stream.write(f"{now().isoformat(timespec='seconds')} {line}\n")
        self.stream.flush()


class Deployer:
    def __init__(self, config: AgentConfig, store: Store, link: ServerLink, reporter: Reporter) -> None:
        self.config = config
        self.host = config.host
        self.store = store
        self.link = link
        self.reporter = reporter
        self.log = logger.bind(host=config.host)
        self.secret_stale = True
        self.logs_listed = False  # the server's logs/ listed once since start
        self.notifier = Notifier(config.notify, config.host)

    async def cycle(self, *, force: bool, urgent: bool = False) -> State:
        """Check; fetch, verify and apply a new generation; report. Returns the state reported.

        `force` applies again what is deployed or failed (the sysadmin's `rebuild`); `force` and
        `urgent` (the person's "Update now") apply even when the postpone policy says wait.
        """
        await self.reporter.report(Phase.CHECKING, message="checking")
        sftp = await self.link.sftp()
        key = await self._credentials(sftp)
        current = await check(sftp)
        verdict = decide(current, self.store.deployed(), self.store.failed(), force=force)
        if verdict is not None:
            phase, message = verdict
            if phase is Phase.FAILED:
                self.log.warning("generation {}: {}", current.generation, message)
            return await self.reporter.report(phase, target=current.generation, message=message)
        if not (force or urgent) and (reason := await postpone_reason(self.config.postpone)) is not None:
            message = f"generation {current.generation} postponed: {reason}"
            if self.reporter.state.phase is not Phase.POSTPONED:
                self.log.info("{}", message)
            return await self.reporter.report(Phase.POSTPONED, target=current.generation, message=message)
        return await self._logged(current.generation, lambda note: self._apply(sftp, key, current, note))

    async def rollback(self, reason: str) -> State:
        """Return to the deployment before the current one (the `rollback` command)."""
        deployed, previous = self.store.deployed(), self.store.previous()
        if deployed is None or previous is None:
            message = "rollback refused: no earlier deployment to return to"
            return await self.reporter.report(self.reporter.state.phase, message=message)

        async def run(note: RunLog) -> Outcome:
            note(f"rollback from generation {deployed.generation} to {previous.generation}: {reason}")
            failure = await self._roll_back(note)
            if failure:
                return Outcome(deployed.generation, deployed.version, now(), Phase.FAILED, failure)
            self.store.rolled_back()
            if self.store.tree(previous.generation).is_dir():
                self.store.point_release(previous.generation)
            message = f"rolled back from generation {deployed.generation} to {previous.generation}"
            return Outcome(deployed.generation, deployed.version, now(), Phase.ROLLED_BACK, message)

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
        return await self._finish(outcome, running)

    async def _apply(
        self, sftp: asyncssh.SFTPClient, key: Ed25519PublicKey, current: Current, note: RunLog
    ) -> Outcome:
        report = self.reporter.report
        generation, version, started = current.generation, current.version, now()

        def outcome(phase: Phase, message: str) -> Outcome:
            note(message)
            return Outcome(generation, version, started, phase, message)

        note(f"herald agent {protocol.__version__} on {self.host}: generation {generation} ({version[:12]})")
        await report(Phase.FETCHING, target=generation, message=f"fetching generation {generation}")
        try:
            fetched = await fetch(sftp, current, host=self.host, key=key, store=self.store)
        except ReleaseError as exc:
            self.log.error("release generation {} refused: {}", generation, exc)
            return outcome(Phase.FAILED, f"release refused: {exc}")
        except UnreachableError as exc:
            note(f"fetch interrupted: {exc}")
            raise
        manifest = fetched.manifest
        note(
            f"fetched: {fetched.downloaded} file(s), {fetched.downloaded_bytes} bytes downloaded, "
            f"{fetched.reused} reused; source {manifest.source_rev or 'unknown'}"
        )
        self.store.point_release(generation)
        await report(Phase.APPLYING, target=generation, message=f"applying generation {generation}")
        broker_was_up = self.reporter.connected
        try:
            installed = install_files(manifest, fetched.tree, Path(self.config.root))
            kept = sum(1 for entry in manifest.content.files if entry.path.startswith(FILES)) - len(installed)
            listed = f": {' '.join(installed)}" if installed else ""
            note(f"installed {len(installed)} file(s) into {self.config.root}{listed}; {kept} unchanged")
            argv = rebuild_argv(self.config, manifest, fetched.tree)
            note(f"running: {' '.join(argv)}")
            self.log.info("generation {}: running {}", generation, argv[0])
            result = await run_rebuild(argv, timeout=seconds(self.config.rebuild.timeout), log=note.stream)
        except (RebuildError, OSError) as exc:
            return outcome(Phase.FAILED, f"apply failed: {exc}")
        if result.returncode is None:
            return outcome(
                Phase.FAILED, f"rebuild killed after {self.config.rebuild.timeout} (rebuild.timeout)"
            )
        if not result.ok:
            return outcome(Phase.FAILED, f"rebuild failed with exit code {result.returncode}")
        applied = f"applied generation {generation} in {result.seconds:.1f}s"
        if operation_of(self.config, manifest) is not Operation.SWITCH or self.store.deployed() is None:
            return outcome(Phase.IDLE, applied)  # nothing running changed, or nothing to return to
        phase, message = await self._confirm_or_roll_back(generation, broker_was_up, note)
        return outcome(phase, message or applied)

    async def _confirm_or_roll_back(
        self, generation: int, broker_was_up: bool, note: RunLog
    ) -> tuple[Phase, str]:
        """(IDLE, "") when the switched system still reaches its server; else the rollback's result."""
        await self.reporter.report(
            Phase.CONFIRMING, target=generation, message=f"confirming generation {generation}"
        )
        problem = await confirm(
            self.link,
            self.reporter.probe if broker_was_up else None,
            self.config.confirm.health,
            seconds(self.config.confirm.window),
            note,
        )
        if problem is None:
            return Phase.IDLE, ""
        self.log.error("generation {} not confirmed ({}); rolling back", generation, problem)
        failure = await self._roll_back(note)
        return (Phase.FAILED, failure) if failure else (Phase.ROLLED_BACK, f"rolled back: {problem}")

    async def _roll_back(self, note: RunLog) -> str:
        """Run the rollback command; '' on success, else what went wrong."""
        try:
            argv = rollback_argv(self.config)
            note(f"running: {' '.join(argv)}")
            result = await run_rebuild(argv, timeout=seconds(self.config.rebuild.timeout), log=note.stream)
        except (RebuildError, OSError) as exc:
            return f"rollback failed: {exc}"
        if not result.ok:
            return f"rollback failed with exit code {result.returncode}"
        return ""

    async def _finish(self, outcome: Outcome, running_log: Path) -> State:
        result = {Phase.IDLE: "applied", Phase.ROLLED_BACK: "rolled-back"}.get(outcome.phase, "failed")
        log_path = running_log.with_name(log_name(outcome.started, outcome.generation, result))
        running_log.replace(log_path)
        record = Applied(
            generation=outcome.generation, version=outcome.version, at=now(), message=outcome.message
        )
        deployed = self.store.deployed()
        # The records are fsynced in a thread: the loop keeps answering the broker and the page.
        if outcome.phase is Phase.IDLE:
            keep = {outcome.generation} | ({deployed.generation} if deployed else set())

            def settle() -> None:
                self.store.set_deployed(record)
                self.store.prune(keep)

            await asyncio.to_thread(settle)
            self.log.info("{}", outcome.message)
        else:  # not applied again until a new generation or a forced request
            await asyncio.to_thread(self.store.set_failed, record)
            self.log.error("generation {}: {}", outcome.generation, outcome.message)
        await self._upload_log(log_path)
        target = max(outcome.generation, self.reporter.state.target_generation)
        rebooting_before = self.reporter.state.needs_reboot
        state = await self.reporter.report(
            outcome.phase, target=target, message=outcome.message, log=log_path.name
        )
        await self._tell(outcome, reboot=state.needs_reboot and not rebooting_before)
        return state

    async def _tell(self, outcome: Outcome, *, reboot: bool) -> None:
        """The desktop notification for a finished run (with [notify] command set)."""
        if outcome.phase is Phase.IDLE:
            summary, urgency = f"System updated to generation {outcome.generation}", "normal"
            body = outcome.message
        elif outcome.phase is Phase.ROLLED_BACK:
            summary, urgency = "System update rolled back", "critical"
            body = f"generation {outcome.generation}: {outcome.message}"
        else:
            summary, urgency = "System update failed", "critical"
            body = f"generation {outcome.generation}: {outcome.message}"
        if reboot:
            window = self.config.reboot.window
            later = f" herald restarts it between {window.replace('-', ' and ')}." if window else ""
            body += f"\nA restart is needed to finish the update.{later}"
        await self.notifier.send(summary, body, urgency)

    # ---------------------------------------------------------------- server side files

    async def _credentials(self, sftp: asyncssh.SFTPClient) -> Ed25519PublicKey:
        """The publisher key (agent.toml, else pinned on first use) and, when stale, the broker secret."""
        if self.secret_stale and self.reporter.url is not None:
            data = await read_small(sftp, f"{CREDENTIALS}/{BROKER_SECRET}", 1024)
            write_atomic(self.store.root / BROKER_SECRET, data, mode=0o600)
            self.reporter.set_secret(Secret(data.decode("utf-8", "replace").strip()))
            self.secret_stale = False
        if self.config.publisher_key is not None:
            return decode_public_key(self.config.publisher_key)
        pinned = self.store.root / PUBLISHER_KEY
        if pinned.exists():
            return decode_public_key(pinned.read_text(encoding="ascii"))
        text = await read_small(sftp, f"{CREDENTIALS}/{PUBLISHER_KEY}", 256)
        key = decode_public_key(text.decode("ascii", "replace"))
        write_atomic(pinned, text, mode=0o600)
        self.log.info("pinned the publisher key on first use: {}", text.decode("ascii", "replace").strip())
        return key

    async def _upload_log(self, path: Path) -> None:
        """Upload a run's log; keep the newest KEEP_LOGS here and on the server.

        The agent is the only writer of its `logs/`, so one listing per run of the agent is
        enough: after it, the names to remove there are the names pruned here (a listing makes
        the server stat every entry, and it would be most of a no-change cycle's requests).
        """
        expired = [old.name for old in sorted(self.store.logs.glob("*.log"))[:-KEEP_LOGS]]
        try:
            sftp = await self.link.sftp()
            async with sftp.open(f"{LOGS}/{path.name}", "wb") as remote:
                await remote.write(path.read_bytes())
            remove = expired
            if not self.logs_listed:
                names = sorted(name for name in await sftp.listdir(LOGS) if name.endswith(".log"))
                remove = names[:-KEEP_LOGS]
            for name in remove:
                with contextlib.suppress(asyncssh.SFTPNoSuchFile):
                    await sftp.remove(f"{LOGS}/{name}")
            self.logs_listed = True
        except Exception as exc:  # noqa: BLE001 - asyncssh raises many kinds; a log upload never stops the agent
            self.logs_listed = False
            self.log.warning("log {} not uploaded: {}", path.name, exc)
        for name in expired:
            (self.store.logs / name).unlink(missing_ok=True)
