"""After a switch: can this host still reach its server and pass its health check?

A switch can break what the agent needs to be told about the next fix: networking, DNS, the
SSH client, certificates. So within a window the agent must open a new SFTP connection and read
`current`, connect to the broker (when it has one), and pass the optional health command. It
retries within the window (interfaces may take seconds to come back); if the window closes
first, the caller rolls back.
"""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Final

from client.fetch import check
from client.link import ServerLink
from protocol.errors import HeraldError

_RETRY: Final = 2.0


async def confirm(
    link: ServerLink,
    probe_broker: Callable[[], Awaitable[None]] | None,
    health: list[str] | None,
    window: float,
    note: Callable[[str], None],
) -> str | None:
    """None when every check passed within `window` seconds; else what failed last."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + window
    problem = "no attempt finished"
    while loop.time() < deadline:
        try:
            async with asyncio.timeout(max(deadline - loop.time(), 0.1)):
                problem = await _attempt(link, probe_broker, health)
        except TimeoutError:
            problem = f"no answer within the {window:g}s confirmation window"
        if not problem:
            note(f"confirmed after the switch: {_checked(probe_broker is not None, health)}")
            return None
        note(f"not confirmed yet: {problem}")
        await asyncio.sleep(min(_RETRY, max(deadline - loop.time(), 0)))
    return problem


def _checked(broker: bool, health: list[str] | None) -> str:
    """What a confirmation proved, in words: what was checked, and what was not."""
    passed = ["the server answers"]
    if broker:
        passed.append("the broker answers")
    if health:
        passed.append(f"the health command {health[0]} passed")
    not_checked = [
        *([] if broker else ["no broker connection before the switch"]),
        *([] if health else ["no health command configured"]),
    ]
    text = " and ".join([", ".join(passed[:-1]), passed[-1]]) if len(passed) > 1 else passed[0]
    return f"{text} ({'; '.join(not_checked)})" if not_checked else text


async def _attempt(
    link: ServerLink, probe_broker: Callable[[], Awaitable[None]] | None, health: list[str] | None
) -> str:
    """'' if everything answers, else what did not."""
    await link.drop()  # a new connection proves the network as it is now
    try:
        await check(await link.sftp())
    except HeraldError as exc:
        return f"server unreachable after the switch: {exc}"
    if probe_broker is not None:
        try:
            await probe_broker()
        except HeraldError as exc:
            return f"broker unreachable after the switch: {exc}"
    if health:
        try:
            process = await asyncio.create_subprocess_exec(
                *health,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
        except OSError as exc:
            return f"health command {health[0]} cannot start: {exc.strerror}"
        try:
            code = await process.wait()
        except asyncio.CancelledError:
            process.kill()
            raise
        if code != 0:
            return f"health command {health[0]} exited with {code}"
    return ""
