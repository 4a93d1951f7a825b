"""What a run decides before it fetches, and what it leaves after: the records, the log, the
state, the desktop notification.

A generation that failed is not applied again in a loop. Its rebuild is tried again by itself
at most REBUILD_ATTEMPTS times in all, at the first check at least `poll` after the last
failure (a rebuild that failed for a reason that passes: a binary cache down, the network), then
only for a new generation or a forced request (`herald trigger --action rebuild`). A switch that
was not confirmed, or whose switch back failed, is never tried again by itself.
"""

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TextIO

from loguru import logger

from client.chroot import Chroot
from client.records import Applied
from client.report import Reporter
from client.store import Store, log_name
from client.workstation import Notifier
from protocol.messages import Phase, State, now
from protocol.release import Current
from protocol.settings import AgentConfig, Operation

REBUILD_ATTEMPTS = 3


def decide(
    current: Current,
    deployed: Applied | None,
    failed: Applied | None,
    *,
    force: bool,
    retry_after: float = 0.0,
    at: datetime | None = None,
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
        if _retry_due(failed, retry_after, at or now()):
            return None
        return failed.phase or Phase.FAILED, failed.message
    return None


def _retry_due(failed: Applied, retry_after: float, at: datetime) -> bool:
    return (
        failed.phase is None
        and 0 < failed.attempts < REBUILD_ATTEMPTS
        and at - failed.at >= timedelta(seconds=retry_after)
    )


def attempts_of(failed: Applied | None, generation: int, version: str) -> int:
    """Which attempt a rebuild of (generation, version) that failed now was."""
    same = failed is not None and (failed.generation, failed.version) == (generation, version)
    return failed.attempts + 1 if same and failed is not None and failed.attempts else 1


def retry_note(attempts: int, poll: str, host: str) -> str:
    """What the state says after a failed rebuild: when it is tried again, or what to do."""
    if attempts < REBUILD_ATTEMPTS:
        return f"attempt {attempts} of {REBUILD_ATTEMPTS}: tried again at a check {poll} from now"
    return (
        f"{attempts} attempts failed: tried again for a new generation or "
        f"`herald trigger --action rebuild {host}`"
    )


@dataclass(frozen=True, slots=True)
class Outcome:
    generation: int
    version: str
    started: datetime
    phase: Phase  # IDLE (applied), FAILED or ROLLED_BACK
    message: str
    # Records the outcome (in a thread), given its record; None: failed.json only.
    settle: Callable[[Applied], None] | None = None
    operation: Operation | None = None
    system: str | None = None
    journal: str = ""  # the step that recorded it (deployed.json names it)
    attempts: int = 0


class RunLog:
    """The log of one run: timestamped lines from herald, the commands' output in between."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __call__(self, line: str) -> None:
        self.stream.write(f"{now().isoformat(timespec='seconds')} {line}\n")
        self.stream.flush()


class Finisher:
    """Ends a run: records its outcome, uploads its log, reports its state, tells the person."""

    def __init__(self, config: AgentConfig, store: Store, chroot: Chroot, reporter: Reporter) -> None:
        self.config = config
        self.store = store
        self.chroot = chroot
        self.reporter = reporter
        self.notifier = Notifier(config.notify, config.host)
        self.log = logger.bind(host=config.host)

    async def finish(self, outcome: Outcome, running_log: Path) -> State:
        result = {Phase.IDLE: "applied", Phase.ROLLED_BACK: "rolled-back"}.get(outcome.phase, "failed")
        log_path = running_log.with_name(log_name(outcome.started, outcome.generation, result))
        running_log.replace(log_path)
        record = Applied(
            generation=outcome.generation,
            version=outcome.version,
            at=now(),
            message=outcome.message,
            operation=outcome.operation,
            system=outcome.system,
            phase=Phase.ROLLED_BACK if outcome.phase is Phase.ROLLED_BACK else None,
            journal=outcome.journal,
            attempts=outcome.attempts,
        )
        # The records are fsynced in a thread: the loop keeps answering the broker and the page.
        # A failed generation is not applied again until a new generation or a forced request.
        await asyncio.to_thread(outcome.settle or self.store.set_failed, record)
        if outcome.phase is Phase.IDLE:
            self.log.info("{}", outcome.message)
        else:
            self.log.error("generation {}: {}", outcome.generation, outcome.message)
        await self.chroot.upload_log(log_path)
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
