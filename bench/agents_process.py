"""A few agents in one process, for bench/agent.py: python -m bench.agents_process CONFIG..."""

import asyncio
import contextlib
import os
import sys
from pathlib import Path

from client.agent import Agent
from protocol import log
from protocol.settings import AgentConfig, load


async def main() -> None:
    log.setup(os.environ.get("HERALD_BENCH_LOG", "WARNING"))
    agents = [Agent(load(Path(path), AgentConfig)) for path in sys.argv[1:]]
    async with asyncio.TaskGroup() as group:
        for agent in agents:
            group.create_task(agent.run())


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
