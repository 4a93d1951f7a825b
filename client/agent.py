"""The agent's loop: every source only requests a check; one worker runs them, one at a time.

    MQTT `desired` / `command`  ─┐
    timer (poll, per-host slot)  │
    waking from suspend          ├─► request ─► worker ─► client.deploy: check, fetch, apply,
    local page, start-up        ─┘                         confirm or roll back, report

A failed generation is not retried in a loop: only a new generation or a forced request
(a `rebuild` command) retries it. The SFTP check is the truth; MQTT only makes it sooner.
A postponed generation (battery, metered link) is looked at again every `postpone.recheck`,
locally; a needed reboot runs only inside `reboot.window`, between runs.

Before anything else runs, a step a previous run left unfinished (client.transition) is finished
or undone. After a deployment that changed agent.toml or the herald package, the agent restarts
itself (client.restart), once the new agent was seen to start.

A `rollback` command rolls back the generation deployed when it arrived: if an apply running
then deployed another, it is refused (and says so). A forced request waiting beside it is kept,
and runs after it.
"""

import asyncio
import contextlib
import os
import sys
from datetime import datetime
from pathlib import Path

from loguru import logger

import protocol
from client.deploy import Deployer, MissingFileError
from client.link import ServerLink
from client.outcome import RunLog
from client.page import HISTORY, LocalPage
from client.report import Reporter
from client.restart import changes, identity, new_agent_problem, restarted_argv
from client.schedule import Backoff, until_next_poll
from client.store import Store, read_log, runs
from client.workstation import SuspendWatch, postpone_reason, until_window
from protocol.errors import StorageError, UnreachableError
from protocol.messages import Phase, State
from protocol.settings import AgentConfig, parse_endpoint, seconds

_BACKOFF_CAP = 300.0
_REACHABLE_CAP = 30.0
_WINDOW_TICK = 300.0


def wait_for_children_in_loop() -> None:
    """Wait for the rebuild and other commands on a pidfd in the running event loop.

    Python 3.11's default child watcher starts a thread per child, and the loop waits for that
    thread to start; Python 3.12 uses a pidfd by itself where the kernel has them (Linux 5.3)."""
    if sys.version_info >= (3, 12):
        return
    current = asyncio.get_child_watcher()
    if isinstance(current, asyncio.PidfdChildWatcher) and current.is_active():
        return  # another agent in this process installed it
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return  # no pidfds: the threaded watcher stays
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(asyncio.get_running_loop())
    asyncio.set_child_watcher(watcher)


class _Restart(Exception):  # noqa: N818 - not an error: the agent's way out of its TaskGroup
    pass


class Agent:
    def __init__(self, config: AgentConfig, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.identity = identity(config_path, Path(config.root))  # what this process runs as
        self.restart_requested = False  # the caller executes the agent again (client.restart)
        self.host = config.host
        self.log = logger.bind(host=config.host)
        self.store = Store(Path(config.state_dir))
        self.link = ServerLink(config)
        self.reporter = Reporter(config, self.store)
        self.deployer = Deployer(config, self.store, self.link, self.reporter)
        self.deployer.new_agent_check = self._new_agent_problem
        self.poll = float(seconds(config.poll))
        self.recheck = float(seconds(config.postpone.recheck))
        self._wake = asyncio.Event()
        self._force = False
        self._urgent = False
        self._running = asyncio.Lock()  # held by a run, and by a reboot
        self._reboot_tried = False
        self.suspend = SuspendWatch()
        self._rollback: tuple[str, int | None] | None = None  # why, and the generation to leave
        self._checks = False  # a check was requested beside a rollback: it runs after it
        self._rescheduled = asyncio.Event()
        self._next_check = 0.0
        self._backoff = Backoff(cap=_BACKOFF_CAP)  # after a failure: 2, 4, 8 ... s, jittered, at most 5 min

    # ---------------------------------------------------------------- requests

    def request(self, reason: str, *, force: bool = False, urgent: bool = False) -> None:
        """Ask the worker to check soon; requests made while it is busy coalesce into one.

        `force` applies again what is deployed or failed; `force` and `urgent` do not wait for
        the postpone policy.
        """
        self.log.debug("check requested: {}", reason)
        self._force |= force
        self._urgent |= urgent
        self._checks = True
        self._wake.set()

    def request_rollback(self, reason: str) -> None:
        """Roll back what is deployed now: the generation is taken as the command arrives."""
        deployed = self.store.deployed()
        self.log.info("rollback requested: {}", reason)
        self._rollback = (reason, deployed.generation if deployed is not None else None)
        self._wake.set()

    def secret_refused(self) -> None:
        """The broker refused our secret: read it again from the server at the next check."""
        self.deployer.chroot.secret_stale = True
        self.request("broker secret refused")

    def _schedule(self, delay: float) -> None:
        self._next_check = asyncio.get_running_loop().time() + delay
        self._rescheduled.set()

    # ---------------------------------------------------------------- run

    async def run(self) -> None:
        """Run until cancelled: worker, timer, the MQTT listener (with a broker), the local page."""
        wait_for_children_in_loop()
        self.store.prepare()
        self.log.info("agent {} starting; state in {}", protocol.__version__, self.store.root)
        await self.deployer.recover()
        page = None
        if self.config.trigger != "off":
            try:
                page = LocalPage(
                    self.host,
                    parse_endpoint(self.config.trigger),
                    lambda: self.reporter.state,
                    self._page_check,
                    lambda: runs(self.store.logs, HISTORY),
                    lambda name: read_log(self.store.logs, name),
                )
            except OSError as exc:  # the page is a convenience: the agent runs without it
                self.log.warning("local page on {} not started: {}", self.config.trigger, exc.strerror)
            else:
                page.start()
        try:
            async with self.link, asyncio.TaskGroup() as group:
                group.create_task(self._worker(), name="worker")
                group.create_task(self._timer(), name="timer")
                group.create_task(self._watch_suspend(), name="suspend")
                if self.reporter.url is not None:
                    group.create_task(self.reporter.listen(self), name="mqtt")
                if self.config.reboot.window is not None:
                    group.create_task(self._reboot_in_window(self.config.reboot.window), name="reboot")
        except* _Restart:
            self.restart_requested = True
        finally:
            if page is not None:
                page.stop()

    def _page_check(self) -> None:
        self.request("the local page", urgent=True)  # the person asked: not postponed

    async def once(self, *, urgent: bool = False) -> State:
        """One check (and apply, if there is something new), then report and return.

        An unreachable server is reported and then raised: the caller exits non-zero.
        """
        wait_for_children_in_loop()
        self.store.prepare()
        await self.deployer.recover()
        async with self.link:
            try:
                state = await self.deployer.cycle(force=False, urgent=urgent)
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
            rollback, force, urgent = self._take()
            try:
                async with self._running:
                    if rollback is not None:
                        state = await self.deployer.rollback(rollback[0], leaving=rollback[1])
                    else:
                        state = await self.deployer.cycle(force=force, urgent=urgent)
            except MissingFileError as exc:  # what the server lacks, said as such
                await self._retry_later(str(exc))
            except UnreachableError as exc:
                # The server is away or busy (down, out of descriptors, a broken connection):
                # nothing about the release is known, so nothing is marked failed.
                await self._retry_later(f"server unreachable or busy: {exc}")
            except (StorageError, OSError) as exc:  # this machine's disk: likewise
                await self._retry_later(f"local storage: {exc}")
            except Exception:
                self.log.exception("unexpected error; the agent carries on")
                await self._retry_later("unexpected error (see the agent's log)")
            else:
                self._backoff.reset()
                postponed = state.phase is Phase.POSTPONED
                self._schedule(self.recheck if postponed else until_next_poll(self.host, self.poll))
                if self.deployer.changed_host:
                    await self._restart_if_changed()

    def _take(self) -> tuple[tuple[str, int | None] | None, bool, bool]:
        """The next turn's work: a rollback, else a check (forced, urgent). A check requested
        beside a rollback waits for the turn after it, kept as it was asked."""
        rollback, self._rollback = self._rollback, None
        if rollback is not None:
            if self._checks:
                self._wake.set()
            return rollback, False, False
        force, self._force = self._force, False
        urgent, self._urgent = self._urgent, False
        self._checks = False
        return None, force, urgent

    async def _new_agent_problem(self, note: RunLog) -> str | None:
        """Part of confirming a deployment: if it changed what the agent runs as, would the
        agent a restart starts load its agent.toml and import? None if so (or nothing changed)."""
        found = changes(self.identity, identity(self.config_path, Path(self.config.root)))
        if not found:
            return None
        argv = restarted_argv(Path(self.config.root), self.config.restart.command)
        note(f"{', '.join(found)}: checking that the new agent starts: {' '.join(argv)} --check-config")
        problem = await new_agent_problem(argv)
        note(problem or "the new agent starts")
        return problem

    async def _restart_if_changed(self) -> None:
        """After a deployment: restart if it changed agent.toml or the herald package."""
        now_running = identity(self.config_path, Path(self.config.root))
        found = changes(self.identity, now_running)
        if not found:
            return
        why = f"restarting: {', '.join(found)}"
        self.log.info("{}", why)
        self.reporter.restarting = why
        self.identity = now_running
        argv = self.config.restart.command
        if argv is not None and await self._run(argv, "restart command"):
            return  # the service manager stops this process and starts the new one
        raise _Restart(why)

    async def _run(self, argv: list[str], what: str, timeout: float = 60) -> bool:
        """Run `argv` to its end (killed after `timeout` s); True if it exited 0."""
        try:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL)
        except OSError as exc:
            self.log.error("{} {} not run: {}", what, argv[0], exc.strerror)
            return False
        try:
            async with asyncio.timeout(timeout):
                code = await proc.wait()
        except TimeoutError:
            proc.kill()
            code = await proc.wait()
        if code != 0:
            self.log.error("{} {} exited with {}", what, argv[0], code)
        return code == 0

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
                self._next_check = loop.time() + self.poll
                if self.reporter.state.phase is Phase.POSTPONED:
                    if await postpone_reason(self.config.postpone) is not None:
                        self._next_check = loop.time() + self.recheck  # still waiting: no network
                        continue
                    self.request("postponed update: the condition cleared")
                else:
                    self.request("timer")
                continue
            try:
                async with asyncio.timeout(delay):
                    await self._rescheduled.wait()
            except TimeoutError:
                pass

    # ---------------------------------------------------------------- the machine slept

    async def _watch_suspend(self) -> None:
        """After a suspend: drop the stale connections, wait for the server, then check."""
        while True:
            await asyncio.sleep(self.suspend.tick)
            slept = self.suspend.slept()
            if not slept:
                continue
            self.log.info("woke after {:.0f}s asleep; checking once the server answers", slept)
            await self.link.drop()
            await self._until_reachable()
            self.request("woke from suspend")

    async def _until_reachable(self) -> None:
        """Return once the server accepts a TCP connection; quietly, backing off to 30 s."""
        backoff = Backoff(cap=_REACHABLE_CAP)
        address, port = self.config.server.address, self.config.server.port
        while True:
            try:
                async with asyncio.timeout(10):
                    _, writer = await asyncio.open_connection(address, port)
            except (OSError, TimeoutError) as exc:
                self.log.debug("server {}:{} not reachable yet: {}", address, port, exc)
                await asyncio.sleep(backoff.next())
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return

    # ---------------------------------------------------------------- reboot window

    async def _reboot_in_window(self, window: str) -> None:
        """Inside `window`, between runs, reboot once when a reboot is needed."""
        while True:
            wait = until_window(window, datetime.now().astimezone())
            if wait > 0:
                await asyncio.sleep(min(wait, _WINDOW_TICK))  # again: the clock may have moved
                continue
            async with self._running:
                if self.reporter.state.needs_reboot and not self._reboot_tried:
                    self._reboot_tried = True  # once per agent run: a reboot restarts the agent
                    await self._reboot()
            await asyncio.sleep(_WINDOW_TICK / 5)

    async def _reboot(self) -> None:
        argv = self.config.reboot.command
        self.log.warning("a reboot is needed and the window {} is open: {}", self.config.reboot.window, argv)
        await self.deployer.notifier.send(
            "Restarting to finish the system update", "herald restarts this machine now.", "critical"
        )
        await self._run(argv, "reboot command")
