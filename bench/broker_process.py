"""The embedded broker alone in a process, for bench/broker.py: python -m bench.broker_process PASSWD PORT."""

import asyncio
import signal
import sys
from pathlib import Path

from broker.server import EmbeddedBroker, Listener
from protocol import log


async def main() -> None:
    log.setup("WARNING")
    broker = EmbeddedBroker(Listener("127.0.0.1", int(sys.argv[2])), password_file=Path(sys.argv[1]))
    await broker.start()
    print("ready", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await broker.stop()


if __name__ == "__main__":
    asyncio.run(main())
