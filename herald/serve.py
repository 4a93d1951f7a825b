"""`herald serve`: the broker, the SFTP server and the publisher in one process.

On start it opens its listeners first (SFTP, the broker, the page), announces the releases
already on disk, and only then publishes (which may run checks and builds for a while): an agent
confirming a switch, or fetching, reaches the server a moment after it starts, so a restart of
the server rolls nothing back. The broker keeps no state that matters, so a restart loses
nothing. With an external broker (`broker = "mqtts://..."`), herald stays connected to it as the
publisher and announces every host again each time that connection is made, so a restarted
Mosquitto or EMQX is repopulated without anyone acting.

Every connected host costs the process a descriptor, and one more per file it is fetching (at
most 8 at once, client.fetch.PARALLEL); the units set LimitNOFILE=65536 and `serve` raises its
soft limit to the hard one, since Python leaves it at the 1,024 that systemd starts with.
"""

import asyncio
import contextlib
import os
import resource
import signal
import socket
from collections.abc import Coroutine, Mapping
from pathlib import Path

import aiomqtt
import msgspec
from loguru import logger

from broker.server import EmbeddedBroker, Listener
from client.enrol import described
from herald import control
from herald.fleet import FleetView, follow
from herald.hostlogs import HostLogs, LastRun
from herald.output import print_report
from herald.rollouts import Runner
from herald.web import FleetWeb
from protocol.credentials import read_secret
from protocol.errors import HeraldError, UnreachableError
from protocol.files import write_atomic
from protocol.layout import StateDir
from protocol.messages import Desired, State
from protocol.mqtt import BrokerURL, connect, parse_urls
from protocol.settings import ServerConfig, parse_endpoint
from protocol.topics import ADMIN_USER, PUBLISHER_USER, Kind, Topics, is_host_name
from publisher.announce import announce, desired_of
from publisher.chroot import Chroot
from publisher.hostkeys import distribute
from publisher.inventory import load_inventory
from publisher.publish import Report, publish, read_floors, write_floors
from publisher.sftp import SFTPService

_RETRY = 5.0
_UPLOADS = 5.0  # seconds between looks at the hosts' logs/ when there is no broker


class RunInfo(msgspec.Struct, frozen=True):
    """STATE/run/serve.json: where a running `herald serve` listens (ports may be chosen by the OS)."""

    pid: int
    mqtt: str
    sftp_host: str
    sftp_port: int
    sftp_host_key: str
    mqtts: str = ""
    websocket: str = ""
    http: str = ""


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.state = StateDir(Path(config.state))
        self.topics = Topics(config.prefix)
        self.broker: EmbeddedBroker | None = None
        if config.mqtt != "off":
            tls = websocket = None
            if config.tls is not None:
                tls = Listener(*parse_endpoint(config.tls.listen), cert=config.tls.cert, key=config.tls.key)
            if config.websocket is not None:
                websocket = Listener(*parse_endpoint(config.websocket), websocket=True)
            self.broker = EmbeddedBroker(
                Listener(*parse_endpoint(config.mqtt)),
                password_file=self.state.passwd,
                prefix=config.prefix,
                tls=tls,
                websocket=websocket,
            )
        self.external = parse_urls(config.broker)  # the external broker, or its nodes; [] for none
        self.sftp: SFTPService | None = None
        self._lock = asyncio.Lock()
        self._keeper: asyncio.Task[None] | None = None
        self.view = FleetView(self.topics)
        if self.broker is not None:
            self.broker.watch_retained(self._retained)
        self.web = FleetWeb(lambda: self.view, self.state.root) if config.http != "off" else None
        self._follower: asyncio.Task[None] | None = None
        self._uploads: asyncio.Task[None] | None = None
        self._control: asyncio.AbstractServer | None = None
        self._ahead: dict[str, int] = {}  # hosts that reported a generation above the one served
        self._background: set[asyncio.Task[object]] = set()
        self.rollouts = Runner(self.state, self.view, self._announce_hosts)  # moves the rollout on
        self._rolling: asyncio.Task[None] | None = None

    @property
    def url(self) -> BrokerURL | None:
        """Where announcements go: the embedded broker, the external one, or None."""
        if self.broker is not None:
            return BrokerURL(self.broker.host, self.broker.port)
        return self.external[0] if self.external else None

    @property
    def urls(self) -> list[BrokerURL]:
        """Every node announcements go to and the view reads: a cluster's nodes each keep their
        own retained messages (RabbitMQ 3.10)."""
        return self.external or ([self.url] if self.url is not None else [])

    async def start(self) -> Report:
        # Listeners first, serving the releases already on disk: publishing may take long (checks,
        # builds), and agents inside their confirmation window must reach the server meanwhile.
        if self.config.sftp != "off":
            host, port = parse_endpoint(self.config.sftp)
            self.sftp = SFTPService(self.state.root, host=host, port=port)
            await self.sftp.start()
        if self.broker is not None:
            await self.broker.start()
        if self.web is not None:
            await self.web.start(*parse_endpoint(self.config.http))
        self._control = await control.listen(self.state.root, self.remove_host)
        on_disk = self._hosts_on_disk()
        self.view.add_hosts(on_disk)
        self._follow()
        served = desired_of(self.state.root, on_disk)  # hosts with a release (a chroot may be empty)
        if self.external:
            self._keeper = asyncio.create_task(self._keep_external_announced(), name="external-broker")
        else:
            await self._announce(served)
        try:
            report = await self.publish()  # announces the hosts whose release changed
        except (HeraldError, OSError) as exc:
            if not served:
                raise  # nothing to serve: say why and stop
            # A bad push, or a state this process may not write, must not take down the broker
            # and SFTP server of a fleet that runs on the releases already published.
            logger.error("publish failed: {}; serving the releases on disk, SIGHUP publishes again", exc)
            report = Report()
        self._rolling = asyncio.create_task(self.rollouts.run(), name="rollout")
        if self.url is None:  # no broker: what the chroots hold is all the page can show
            self._uploads = asyncio.create_task(self._watch_uploads(), name="sftp-view")
        # Written last, as the sign that the server is ready: a client that waits for it finds every
        # `desired` retained, instead of subscribing while the announcement is being routed (amqtt
        # then sends such a message twice: once as retained, once as it passes).
        self._write_run_info()
        notify_ready()
        return report

    def _hosts_on_disk(self) -> list[str]:
        try:
            names = os.listdir(self.state.chroots)
        except OSError:
            return []
        return sorted(name for name in names if is_host_name(name))

    def _write_run_info(self) -> None:
        ports = self.broker.ports if self.broker else {}
        host = self.broker.host if self.broker else ""
        info = RunInfo(
            os.getpid(),
            str(self.url or ""),
            self.sftp.host if self.sftp else "",
            self.sftp.port if self.sftp else 0,
            self.sftp.public_host_key if self.sftp else "",
            mqtts=f"mqtts://{host}:{ports['tls']}" if "tls" in ports else "",
            websocket=f"ws://{host}:{ports['ws']}" if "ws" in ports else "",
            http=f"http://{parse_endpoint(self.config.http)[0]}:{self.web.port}/" if self.web else "",
        )
        (self.state.root / "run").mkdir(exist_ok=True)
        write_atomic(self.state.root / "run" / "serve.json", msgspec.json.encode(info), mode=0o644)

    async def publish(self, *, announce_changes: bool = True) -> Report:
        """Publish the fleet (in a thread: it is file work) and announce the hosts that changed.
        With `publish = false`, nothing: `herald publish` does it, and this process never reads
        the signing key."""
        if not self.config.publish:
            logger.info("publish = false: publishing is left to `herald publish`")
            return Report()
        async with self._lock:
            report = await asyncio.to_thread(publish, Path(self.config.fleet), self.state.root)
            await asyncio.to_thread(distribute, self.state)  # a host added during a host-key rotation
        self.view.add_hosts([result.host for result in report.hosts])
        if self.url is None:
            for host, desired in desired_of(self.state.root, list(self.view.hosts)).items():
                self.view.hosts[host].desired = desired
        if announce_changes:  # the hosts whose `current` moved: a rollout holds others back
            try:
                await self._announce(desired_of(self.state.root, report.released))
            except UnreachableError as exc:  # published all the same: agents find it on their timer
                logger.warning("published, but the announcement failed: {}", exc)
        return report

    async def _announce_hosts(self, hosts: list[str]) -> None:
        try:
            await self._announce(desired_of(self.state.root, hosts))
        except UnreachableError as exc:
            logger.warning("not announced (agents find it on their timer): {}", exc)

    async def _announce(self, desired: Mapping[str, Desired], node: BrokerURL | None = None) -> None:
        """On every node (or on `node` only)."""
        self.rollouts.known.update({host: each.generation for host, each in desired.items()})
        if self.url is None or not desired:
            return
        password = read_secret(self.state.service_secret(PUBLISHER_USER))
        await announce(desired, url=node or self.urls, password=password, topics=self.topics)

    async def _keep_external_announced(self) -> None:
        """Stay connected to each node of the external broker; on every (re)connection to one,
        announce every host there: a node that restarts, or was down during an announcement,
        holds every host's `desired` again without anyone acting."""
        async with asyncio.TaskGroup() as group:
            for node in self.external:
                group.create_task(self._keep_node_announced(node), name=f"external-broker {node}")

    async def _keep_node_announced(self, node: BrokerURL) -> None:
        while True:
            try:
                password = read_secret(self.state.service_secret(PUBLISHER_USER))
                async with connect(node, username=PUBLISHER_USER, password=password) as watch:
                    hosts = [host.name for host in load_inventory(Path(self.config.fleet)).hosts]
                    await self._announce(desired_of(self.state.root, hosts), node)
                    logger.info("announced every host to {}; watching the connection", node)
                    async for _ in watch.messages:  # nothing is subscribed: this ends on disconnect
                        pass
            except (aiomqtt.MqttError, OSError, HeraldError) as exc:
                logger.warning("external broker {}: {}; trying again in {:.0f}s", node, exc, _RETRY)
            await asyncio.sleep(_RETRY)

    async def _watch_uploads(self) -> None:
        """Without a broker, every host's newest log in its logs/ (read by herald.hostlogs' rules),
        looked at every few seconds: the page shows each host's last run from SFTP alone."""
        while True:
            runs = await asyncio.to_thread(self._last_runs, list(self.view.hosts))
            for host, run in runs.items():
                self.view.hosts[host].last_run = run
            await asyncio.sleep(_UPLOADS)

    def _last_runs(self, hosts: list[str]) -> dict[str, LastRun | None]:
        return {host: HostLogs(self.state.root, host).last_run() for host in hosts}

    def _follow(self) -> None:
        """Keep the fleet view (page, metrics) current from the broker's retained messages:
        told by the embedded broker as it stores them, else as a client of the external one."""
        if self.url is None or self.broker is not None:
            return
        password = read_secret(self.state.service_secret(ADMIN_USER))
        self._follower = asyncio.create_task(
            follow(self.urls, password, self.view, on_change=self._notice_every_host), name="fleet-view"
        )

    # ---------------------------------------------------------------- hosts ahead, hosts removed

    def _retained(self, topic: str, payload: bytes) -> None:
        """The embedded broker stored a retained message: the view takes it, and a host's state
        may say it runs a later generation than this server serves."""
        self.view.update(topic, payload)
        parsed = self.topics.parse(topic)
        if parsed is not None and parsed[1] in (Kind.STATE, Kind.ONLINE):
            self.rollouts.notice()
        if parsed is not None and parsed[1] is Kind.STATE:
            self._notice(parsed[0])

    def _notice_every_host(self) -> None:
        self.rollouts.notice()
        for host in list(self.view.hosts):
            self._notice(host)

    def _notice(self, host: str) -> None:
        """A host whose state names a generation above the one announced for it runs a release
        this server no longer has (the state was restored from an older backup): it is recorded
        in STATE/run/reported.json, and a publish releases it again above (publisher.publish)."""
        view = self.view.hosts.get(host)
        if view is None or view.state is None or view.desired is None:
            return
        reported = max(view.state.deployed_generation, view.state.target_generation)
        if reported <= view.desired.generation or reported <= self._ahead.get(host, 0):
            return
        # The announcement lags the chroot: a publish of its own (or one that has not announced
        # yet) wrote `current` first, and a host's timer may find the release before the broker
        # hears of it. Only a generation this server does not hold is one it lacks.
        if self._holds(host, reported, view.state):
            return
        self._ahead[host] = reported
        logger.bind(host=host).warning(
            "reports generation {}, above the {} served here: its next release starts above it",
            reported,
            view.desired.generation,
        )
        path = self.state.root / "run" / "reported.json"
        floors = read_floors(path) | self._ahead
        write_floors(path, floors)
        self._in_background(self._publish_again(), "publish above a host's generation")

    def _holds(self, host: str, generation: int, state: State) -> bool:
        """Whether `generation` is on disk for `host` (its `current`, or a release kept there,
        perhaps held back by a rollout) with the content the host runs, if it runs that one: a
        server restored from an older backup may have published the same number again."""
        chroot = Chroot(self.state.chroot(host))
        try:
            current = chroot.current()
            names = os.listdir(chroot.releases)
        except (OSError, HeraldError):
            return False
        kept = {int(name) for name in names if name.isascii() and name.isdigit()}
        if current is not None:
            kept.add(current.generation)
        if generation not in kept and generation < max(kept, default=0):
            return True  # pruned since, below what is served: not one this server lacks
        if generation not in kept:
            return False
        if generation != state.deployed_generation or state.deployed_version is None:
            return True  # on its way to it: what it fetched is what this server offers
        if current is not None and current.generation == generation:
            return current.version == state.deployed_version
        manifest = chroot.manifest(generation)
        return manifest is None or manifest.version == state.deployed_version

    async def _publish_again(self) -> None:
        await _republish(self)

    def _in_background(self, work: Coroutine[object, object, object], name: str) -> None:
        task: asyncio.Task[object] = asyncio.create_task(work, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def remove_host(self, host: str) -> control.Answer:
        """`herald host remove`: drop the host's sessions (SFTP, MQTT without its will), clear its
        retained messages, forget it in the fleet view (the page, /metrics)."""
        sftp = self.sftp.drop(host) if self.sftp is not None else 0
        mqtt, cleared = 0, list[str]()
        if self.broker is not None:
            topics = [self.topics.of(host, kind) for kind in Kind]
            mqtt, cleared = await self.broker.remove_user(host, topics)
        self.view.hosts.pop(host, None)
        self._ahead.pop(host, None)
        logger.bind(host=host).warning(
            "removed: {} SFTP connection(s) closed, {} MQTT session(s) dropped, {} retained message(s) gone",
            sftp,
            mqtt,
            len(cleared),
        )
        return control.Answer(
            sftp_sessions=sftp, mqtt_sessions=mqtt, retained=cleared, broker=self.broker is not None
        )

    def reload_host_key(self) -> None:
        """After `herald server host-key switch`: new connections get the key now on disk."""
        if self.sftp is not None and self.sftp.reload_host_key():
            logger.info("SFTP host key is now {}", described(self.sftp.public_host_key))
            self._write_run_info()

    async def stop(self) -> None:
        if self._control is not None:
            self._control.close()
            control.socket_path(self.state.root).unlink(missing_ok=True)
        for task in (self._follower, self._uploads, self._rolling, *self._background):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.web is not None:
            await self.web.stop()
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        if self.sftp is not None:
            await self.sftp.stop()
        if self.broker is not None:
            await self.broker.stop()
        (self.state.root / "run" / "serve.json").unlink(missing_ok=True)


def raise_descriptor_limit() -> int:
    """Raise the soft limit on open files to the hard one; the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def notify_ready() -> None:
    """Tell systemd the server is ready (Type=notify in the units): the broker listens and every
    host is announced, so a unit ordered after this one (herald-publish) can announce too."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    target = "\0" + address[1:] if address.startswith("@") else address  # an abstract socket
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"READY=1", target)


async def serve(config: ServerConfig) -> None:
    """Run until SIGINT or SIGTERM."""
    limit = raise_descriptor_limit()
    if limit < 4096:
        logger.warning("open files limited to {}: each host fetching holds up to 9 (LimitNOFILE)", limit)
    server = Server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    republishing: set[asyncio.Task[None]] = set()

    def republish() -> None:
        task = asyncio.create_task(_republish(server))
        republishing.add(task)
        task.add_done_callback(republishing.discard)

    loop.add_signal_handler(signal.SIGHUP, republish)
    try:
        report = await server.start()
        print_report(report)
        if server.sftp is not None:
            logger.info(
                "SFTP host key (pin it in agent.toml as server.host_key): {}",
                described(server.sftp.public_host_key),
            )
        logger.info("serving {} host(s); SIGHUP publishes again, SIGTERM stops", len(server.view.hosts))
        await stop.wait()
    finally:
        await server.stop()


async def _republish(server: Server) -> None:
    try:
        server.reload_host_key()
        print_report(await server.publish())
    except UnreachableError as exc:
        logger.warning("published, but the announcement failed: {}", exc)
    except Exception as exc:  # noqa: BLE001 - a failed publish must not stop the server
        logger.error("publish failed: {}", exc)
