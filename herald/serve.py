"""`herald serve`: the broker, the SFTP server and the publisher in one process.

On start it publishes, then announces every host's current release: the broker keeps no state
that matters, so a restart loses nothing.
"""

import asyncio
import os
import signal
from collections.abc import Mapping
from pathlib import Path

import msgspec
from loguru import logger

from broker.server import EmbeddedBroker
from herald.output import print_report
from protocol.credentials import read_secret
from protocol.errors import UnreachableError
from protocol.files import write_atomic
from protocol.layout import StateDir
from protocol.messages import Desired
from protocol.mqtt import BrokerURL
from protocol.settings import ServerConfig, parse_endpoint
from protocol.topics import PUBLISHER_USER, Topics
from publisher.announce import announce, desired_of
from publisher.publish import Report, Status, publish
from publisher.sftp import SFTPService


class RunInfo(msgspec.Struct, frozen=True):
    """STATE/run/serve.json: where a running `herald serve` listens (ports may be chosen by the OS)."""

    pid: int
    mqtt: str
    sftp_host: str
    sftp_port: int
    sftp_host_key: str


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.state = StateDir(Path(config.state))
        self.topics = Topics(config.prefix)
        sftp_host, sftp_port = parse_endpoint(config.sftp)
        self.broker: EmbeddedBroker | None = None
        if config.mqtt != "off":
            mqtt_host, mqtt_port = parse_endpoint(config.mqtt)
            self.broker = EmbeddedBroker(
                host=mqtt_host, port=mqtt_port, password_file=self.state.passwd, prefix=config.prefix
            )
        self._sftp_address = (sftp_host, sftp_port)
        self.sftp: SFTPService | None = None
        self._lock = asyncio.Lock()

    @property
    def url(self) -> BrokerURL | None:
        """The embedded broker's address; None when it is off."""
        return BrokerURL(self.broker.host, self.broker.port) if self.broker else None

    async def start(self) -> Report:
        report = await self.publish(announce_changes=False)
        self.sftp = SFTPService(self.state.root, host=self._sftp_address[0], port=self._sftp_address[1])
        if self.broker is not None:
            await self.broker.start()
        await self.sftp.start()
        info = RunInfo(
            os.getpid(), str(self.url or ""), self.sftp.host, self.sftp.port, self.sftp.public_host_key
        )
        (self.state.root / "run").mkdir(exist_ok=True)
        write_atomic(self.state.root / "run" / "serve.json", msgspec.json.encode(info), mode=0o644)
        hosts = [result.host for result in report.hosts]
        await self._announce(desired_of(self.state.root, hosts))
        return report

    async def publish(self, *, announce_changes: bool = True) -> Report:
        """Publish the fleet (in a thread: it is file work) and announce the hosts that changed."""
        async with self._lock:
            report = await asyncio.to_thread(publish, Path(self.config.fleet), self.state.root)
        if announce_changes:
            changed = [result.host for result in report.of(Status.CHANGED)]
            await self._announce(desired_of(self.state.root, changed))
        return report

    async def _announce(self, desired: Mapping[str, Desired]) -> None:
        if self.url is None:
            return
        password = read_secret(self.state.service_secret(PUBLISHER_USER))
        await announce(desired, url=self.url, password=password, topics=self.topics)

    async def stop(self) -> None:
        if self.sftp is not None:
            await self.sftp.stop()
        if self.broker is not None:
            await self.broker.stop()
        (self.state.root / "run" / "serve.json").unlink(missing_ok=True)


async def serve(config: ServerConfig) -> None:
    """Run until SIGINT or SIGTERM."""
    server = Server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(_republish(server)))
    try:
        report = await server.start()
        print_report(report)
        sftp = server.sftp
        if sftp is not None:
            logger.info("SFTP host key (pin it in agent.toml as server.host_key): {}", sftp.public_host_key)
        logger.info("serving {} host(s); SIGHUP publishes again, SIGTERM stops", len(report.hosts))
        await stop.wait()
    finally:
        await server.stop()


async def _republish(server: Server) -> None:
    try:
        print_report(await server.publish())
    except UnreachableError as exc:
        logger.warning("published, but the announcement failed: {}", exc)
    except Exception as exc:  # noqa: BLE001 - a failed publish must not stop the server
        logger.error("publish failed: {}", exc)
