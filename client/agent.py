"""The agent's loop: every source only requests a check; one worker runs them, one at a time.

    MQTT `desired` / `command`  ─┐
    timer (poll, per-host slot)  ├─► request ─► worker: check ─► fetch ─► apply ─► report
    start-up                    ─┘

A failed generation is not retried in a loop: only a new generation or a forced request
(a `rebuild` command) retries it. The SFTP check is the truth; MQTT only makes it sooner.
"""

import asyncio
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final, TextIO

import asyncssh
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from loguru import logger

import protocol
from client.apply import install_files, rebuild_argv, run_rebuild
from client.fetch import check, fetch, read_small
from client.link import ServerLink
from client.report import Reporter
from client.schedule import Backoff, until_next_poll
from client.store import Applied, Store, log_name
from protocol.credentials import Secret
from protocol.errors import HeraldError, RebuildError, ReleaseError, UnreachableError
from protocol.files import write_atomic
from protocol.messages import Phase, State, now
from protocol.release import BROKER_SECRET, CREDENTIALS, LOGS, PUBLISHER_KEY, Current, decode_public_key
from protocol.settings import AgentConfig, seconds

_KEEP_LOGS: Final = 20


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


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.host = config.host
        self.log = logger.bind(host=config.host)
        self.store = Store(Path(config.state_dir))
        self.link = ServerLink(config)
        self.reporter = Reporter(config, self.store)
        self.poll = float(seconds(config.poll))
        self._wake = asyncio.Event()
        self._force = False
        self._rescheduled = asyncio.Event()
        self._next_check = 0.0
        self._backoff = Backoff(cap=min(self.poll, 300.0))
        self._secret_stale = True

    # ---------------------------------------------------------------- requests

    def request(self, reason: str, *, force: bool = False) -> None:
        """Ask the worker to check soon; requests made while it is busy coalesce into one."""
        self.log.debug("check requested: {}", reason)
        self._force |= force
        self._wake.set()

    def _schedule(self, delay: float) -> None:
        self._next_check = asyncio.get_running_loop().time() + delay
        self._rescheduled.set()

    # ---------------------------------------------------------------- run

    async def run(self) -> None:
        """Run until cancelled: worker, timer and (with a broker) the MQTT listener."""
        self.store.prepare()
        self.log.info("agent {} starting; state in {}", protocol.__version__, self.store.root)
        async with self.link, asyncio.TaskGroup() as group:
            group.create_task(self._worker(), name="worker")
            group.create_task(self._timer(), name="timer")
            if self.reporter.url is not None:
                group.create_task(self.reporter.listen(self), name="mqtt")

    async def once(self) -> State:
        """One check (and apply, if there is something new), then report and return.

        An unreachable server is reported and then raised: the caller exits non-zero.
        """
        self.store.prepare()
        async with self.link:
            try:
                state = await self.cycle(force=False)
            except UnreachableError as exc:
                await self.reporter.report(self.reporter.state.phase, message=str(exc))
                await self.reporter.flush_once()
                raise
            await self.reporter.flush_once()
        return state

    async def _worker(self) -> None:
        self.request("start-up")
        while True:
            await self._wake.wait()
            self._wake.clear()
            force, self._force = self._force, False
            try:
                await self.cycle(force=force)
            except UnreachableError as exc:
                delay = self._backoff.next()
                self.log.warning("{}; next try in {:.0f}s", exc, delay)
                await self.link.drop()
                await self.reporter.report(self.reporter.state.phase, message=str(exc))
                self._schedule(delay)
            else:
                self._backoff.reset()
                self._schedule(until_next_poll(self.host, self.poll))

    async def _timer(self) -> None:
        loop = asyncio.get_running_loop()
        self._next_check = loop.time() + until_next_poll(self.host, self.poll)
        while True:
            self._rescheduled.clear()
            delay = self._next_check - loop.time()
            if delay <= 0:
                self.request("timer")
                self._next_check = loop.time() + self.poll
                continue
            try:
                async with asyncio.timeout(delay):
                    await self._rescheduled.wait()
            except TimeoutError:
                pass

    # ---------------------------------------------------------------- one cycle

    async def cycle(self, *, force: bool) -> State:
        """Check; fetch, verify and apply a new generation; report. Returns the state reported."""
        sftp = await self.link.sftp()
        key = await self._credentials(sftp)
        current = await check(sftp)
        verdict = decide(current, self.store.deployed(), self.store.failed(), force=force)
        if verdict is not None:
            phase, message = verdict
            if phase is Phase.FAILED:
                self.log.warning("generation {}: {}", current.generation, message)
            return await self.reporter.report(phase, target=current.generation, message=message)

        started = now()
        log_path = self.store.logs / log_name(started, current.generation, "running")
        try:
            with log_path.open("w", encoding="utf-8") as run_log:
                outcome = await self._apply(sftp, key, current, started, run_log)
        except BaseException:
            log_path.unlink(missing_ok=True)
            raise
        return await self._finish(outcome, log_path)

    async def _apply(
        self,
        sftp: asyncssh.SFTPClient,
        key: Ed25519PublicKey,
        current: Current,
        started: datetime,
        run_log: TextIO,
    ) -> "_Outcome":
        report = self.reporter.report
        generation, version = current.generation, current.version

        def note(line: str) -> None:
            run_log.write(f"{now().isoformat(timespec='seconds')} {line}\n")
            run_log.flush()

        note(f"herald agent {protocol.__version__} on {self.host}: generation {generation} ({version[:12]})")
        await report(Phase.FETCHING, target=generation, message=f"fetching generation {generation}")
        try:
            fetched = await fetch(sftp, current, host=self.host, key=key, store=self.store)
        except ReleaseError as exc:
            note(f"release refused: {exc}")
            self.log.error("release generation {} refused: {}", generation, exc)
            return _Outcome(generation, version, started, ok=False, message=f"release refused: {exc}")
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
        try:
            installed = install_files(manifest, fetched.tree, Path(self.config.root))
            note(f"installed {len(installed)} file(s) into {self.config.root}: {' '.join(installed)}")
            argv = rebuild_argv(self.config, manifest, fetched.tree)
            note(f"running: {' '.join(argv)}")
            self.log.info("generation {}: running {}", generation, argv[0])
            result = await run_rebuild(argv, timeout=seconds(self.config.rebuild.timeout), log=run_log)
        except (RebuildError, OSError) as exc:
            note(f"apply failed: {exc}")
            return _Outcome(generation, version, started, ok=False, message=f"apply failed: {exc}")
        if result.returncode is None:
            message = f"rebuild killed after {self.config.rebuild.timeout} (rebuild.timeout)"
        elif result.ok:
            message = f"applied generation {generation} in {result.seconds:.1f}s"
        else:
            message = f"rebuild failed with exit code {result.returncode}"
        note(message)
        return _Outcome(generation, version, started, ok=result.ok, message=message)

    async def _finish(self, outcome: "_Outcome", running_log: Path) -> State:
        result = "applied" if outcome.ok else "failed"
        log_path = running_log.with_name(log_name(outcome.started, outcome.generation, result))
        running_log.replace(log_path)
        record = Applied(
            generation=outcome.generation, version=outcome.version, at=now(), message=outcome.message
        )
        previous = self.store.deployed()
        if outcome.ok:
            self.store.set_deployed(record)
            keep = {outcome.generation} | ({previous.generation} if previous else set())
            self.store.prune(keep)
            self.log.info("{}", outcome.message)
        else:
            self.store.set_failed(record)
            self.log.error("generation {}: {}", outcome.generation, outcome.message)
        await self._upload_log(log_path)
        phase = Phase.IDLE if outcome.ok else Phase.FAILED
        return await self.reporter.report(
            phase, target=outcome.generation, message=outcome.message, log=log_path.name
        )

    # ---------------------------------------------------------------- server side files

    async def _credentials(self, sftp: asyncssh.SFTPClient) -> Ed25519PublicKey:
        """The publisher key (agent.toml, else pinned on first use) and, when stale, the broker secret."""
        if self._secret_stale and self.reporter.url is not None:
            data = await read_small(sftp, f"{CREDENTIALS}/{BROKER_SECRET}", 1024)
            secret = Secret(data.decode("utf-8", "replace").strip())
            write_atomic(self.store.root / BROKER_SECRET, data, mode=0o600)
            self.reporter.set_secret(secret)
            self._secret_stale = False
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

    def secret_refused(self) -> None:
        """The broker refused our secret: read it again from the server at the next check."""
        self._secret_stale = True
        self.request("broker secret refused")

    async def _upload_log(self, path: Path) -> None:
        try:
            sftp = await self.link.sftp()
            await sftp.put(str(path), f"{LOGS}/{path.name}")
            names = sorted(name for name in await sftp.listdir(LOGS) if name.endswith(".log"))
            for name in names[:-_KEEP_LOGS]:
                await sftp.remove(f"{LOGS}/{name}")
        except (TimeoutError, HeraldError, OSError) as exc:
            self.log.warning("log {} not uploaded: {}", path.name, exc)
        except Exception as exc:  # noqa: BLE001 - asyncssh raises many kinds; a log upload never stops the agent
            self.log.warning("log {} not uploaded: {}", path.name, exc)
        for old in sorted(self.store.logs.glob("*.log"))[:-_KEEP_LOGS]:
            old.unlink(missing_ok=True)


@dataclass(frozen=True, slots=True)
class _Outcome:
    generation: int
    version: str
    started: datetime
    ok: bool
    message: str
