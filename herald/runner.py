"""Running a coroutine from the command line, SIGTERM cancelling it like Ctrl-C does.

asyncio is imported when a coroutine runs, not with the CLI: `herald publish`, which runs none,
does not pay for it.
"""

import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Terminated(Exception):  # noqa: N818 - what happened, not an error
    """The command was stopped by SIGTERM, as asked (exit 143, no traceback)."""


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    import asyncio  # noqa: PLC0415 - see the module's docstring

    terminated = False

    async def main() -> T:
        task = asyncio.ensure_future(coroutine)

        def terminate() -> None:
            nonlocal terminated
            terminated = True
            task.cancel()

        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, terminate)
        return await task

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        if terminated:
            raise Terminated from None
        raise
