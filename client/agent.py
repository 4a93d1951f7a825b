"""The agent's loop: every source only requests a check; one worker runs them, one at a time.

    MQTT `desired` / `command`  ─┐
    timer (poll, per-host slot)  ├─► request ─► worker ─► client.deploy: check, fetch, apply,
    local page, start-up        ─┘                         confirm or roll back, report

A failed generation is not retried in a loop: only a new generation or a forced request
(a `rebuild` command) retries it. The SFTP check is the truth; MQTT only makes it sooner.
"""

import asyncio
import contextlib
from pathlib import Path

from loguru import logger

import protocol
from client.deploy import Deployer
from client.link import ServerLink
from client.page import LocalPage
from client.report import Reporter
from client.schedule import Backoff, until_next_poll
from client.store import Store
from protocol.errors import StorageError, UnreachableError
from protocol.messages import State
from protocol.settings import AgentConfig, parse_endpoint, seconds

_BACKOFF_CAP = 300.0


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.host = config.host
        self.log = logger.bind(host=config.host)
        self.store = Store(Path(config.state_dir))
        self.link = ServerLink(config)
        self.reporter = Reporter(config, self.store)
        self.deployer = Deployer(config, self.store, self.link, self.reporter)
        self.poll = float(seconds(config.poll))
        self._wake = asyncio.Event()
        self._force = False
        self._rollback: str | None = None
        self._rescheduled = asyncio.Event()
        self._next_check = 0.0
        self._backoff = Backoff(cap=_BACKOFF_CAP)  # after a failure: 2, 4, 8 ... s, jittered, at most 5 min

    # ---------------------------------------------------------------- requests

    def request(self, reason: str, *, force: bool = False) -> None:
        """Ask the worker to check soon; requests made while it is busy coalesce into one."""
        self.log.debug("check requested: {}", reason)
        self._force |= force
        self._wake.set()

    def request_rollback(self, reason: str) -> None:
        self.log.info("rollback requested: {}", reason)
        self._rollback = reason
        self._wake.set()

    def secret_refused(self) -> None:
        """The broker refused our secret: read it again from the server at the next check."""
        self.deployer.secret_stale = True
        self.request("broker secret refused")

    def _schedule(self, delay: float) -> None:
        self._next_check = asyncio.get_running_loop().time() + delay
        self._rescheduled.set()

    # ---------------------------------------------------------------- run

    async def run(self) -> None:
        """Run until cancelled: worker, timer, the MQTT listener (with a broker), the local page."""
        self.store.prepare()
        self.log.info("agent {} starting; state in {}", protocol.__version__, self.store.root)
        page = None
        if self.config.trigger != "off":
            try:
                page = LocalPage(
                    self.host,
                    parse_endpoint(self.config.trigger),
                    lambda: self.reporter.state,
                    self._page_check,
                )
            except OSError as exc:  # the page is a convenience: the agent runs without it
                self.log.warning("local page on {} not started: {}", self.config.trigger, exc.strerror)
            else:
                page.start()
        try:
            async with self.link, asyncio.TaskGroup() as group:
                group.create_task(self._worker(), name="worker")
                group.create_task(self._timer(), name="timer")
                if self.reporter.url is not None:
                    group.create_task(self.reporter.listen(self), name="mqtt")
        finally:
            if page is not None:
                page.stop()

    def _page_check(self) -> None:
        self.request("the local page")

    async def once(self) -> State:
        """One check (and apply, if there is something new), then report and return.

        An unreachable server is reported and then raised: the caller exits non-zero.
        """
        self.store.prepare()
        async with self.link:
            try:
                state = await self.deployer.cycle(force=False)
            except UnreachableError as exc:
                await self.reporter.report(self.reporter.last_settled, message=str(exc))
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
            rollback, self._rollback = self._rollback, None
            try:
                if rollback is not None:
                    await self.deployer.rollback(rollback)
                else:
                    await self.deployer.cycle(force=force)
            except (UnreachableError, StorageError, OSError) as exc:
                # The server or this machine's disk is not there yet: nothing about the release
                # is known, so nothing is marked failed; try again later.
                await self._retry_later(str(exc))
            except Exception:
                self.log.exception("unexpected error; the agent carries on")
                await self._retry_later("unexpected error (see the agent's log)")
            else:
                self._backoff.reset()
                self._schedule(until_next_poll(self.host, self.poll))

    async def _retry_later(self, why: str) -> None:
        delay = self._backoff.next()
        self.log.warning("{}; next try in {:.0f}s", why, delay)
        await self.link.drop()
        with contextlib.suppress(Exception):  # reporting is best effort here
            await self.reporter.report(self.reporter.last_settled, message=why)
        self._schedule(delay)

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
