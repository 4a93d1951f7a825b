"""The agent's MQTT side: report `state` and `online`, and turn `desired`/`command` into requests.

Every message received is a hint. A `desired` newer than what is deployed requests a check; a
`command` is executed once per id and ignored once expired. Payloads that do not decode are
logged and dropped.
"""

import asyncio
import contextlib
from pathlib import Path
from typing import Final, Protocol

import aiomqtt
import msgspec
from loguru import logger

import protocol
from client.schedule import Backoff
from client.store import Store
from client.workstation import reboot_needed
from protocol.credentials import Secret, read_secret
from protocol.errors import ConfigError, PayloadError, UnreachableError
from protocol.messages import Action, Command, Desired, Online, Phase, State, decode, encode, now
from protocol.mqtt import BrokerURL, client_id, connect, parse_urls, rotation
from protocol.release import BROKER_SECRET
from protocol.settings import AgentConfig
from protocol.topics import Kind, Topics

_REFUSED: Final = (4, 5, 134, 135)  # CONNACK: bad user name or password, not authorised
_FLUSH_TIMEOUT: Final = 5.0
_HEARTBEAT: Final = 60.0
_SETTLED: Final = (Phase.IDLE, Phase.FAILED, Phase.ROLLED_BACK, Phase.POSTPONED)  # where cycles end
_GOODBYE_TIMEOUT: Final = 2.0


class Requests(Protocol):
    """What messages from the broker turn into: the agent's requests (client.agent.Agent).
    Passed in, so that this module needs nothing of the agent's."""

    def request(self, reason: str, *, force: bool = False, urgent: bool = False) -> None: ...

    def request_rollback(self, reason: str) -> None: ...

    def secret_refused(self) -> None: ...


class Reporter:
    def __init__(self, config: AgentConfig, store: Store) -> None:
        self.host = config.host
        self.config = config
        self.store = store
        self.root = Path(config.root)
        # the broker's nodes, from the one this host's name picks; a failure moves to the next
        self.urls = rotation(parse_urls(config.broker.url), config.host)
        self._node = 0
        self.topics = Topics(config.broker.prefix)
        self.log = logger.bind(host=config.host)
        deployed = store.deployed()
        self.state = State(
            phase=Phase.IDLE,
            deployed_generation=deployed.generation if deployed else 0,
            deployed_version=deployed.version if deployed else None,
            since=now(),
            message="starting",
            agent_version=protocol.__version__,
            needs_reboot=reboot_needed(self.root),
        )
        self.last_settled = Phase.IDLE  # where the last finished cycle left the host
        self.restarting = ""  # why the agent restarts itself: it says so instead of going offline
        self._client: aiomqtt.Client | None = None
        self._secret: Secret | None = None
        self._secret_ready = asyncio.Event()
        self._sending: set[asyncio.Task[None]] = set()

    # ---------------------------------------------------------------- state

    async def report(
        self, phase: Phase, *, target: int | None = None, message: str = "", log: str | None = None
    ) -> State:
        deployed = self.store.deployed()
        if phase in _SETTLED:
            self.last_settled = phase
        # Only a finished rebuild (or a reboot) changes the next boot's system: looked at when a
        # cycle ends, carried through the phases in between.
        needs_reboot = reboot_needed(self.root) if phase in _SETTLED else self.state.needs_reboot
        self.state = State(
            phase=phase,
            deployed_generation=deployed.generation if deployed else 0,
            deployed_version=deployed.version if deployed else None,
            target_generation=target if target is not None else self.state.target_generation,
            since=now() if phase != self.state.phase else self.state.since,
            message=message[:2000],
            log=log if log is not None else self.state.log,
            agent_version=protocol.__version__,
            needs_reboot=needs_reboot,
            last_command=self.state.last_command,
        )
        self._send_state()
        return self.state

    def _send_state(self) -> None:
        """Queue the state and go on: the cycle does not wait for the broker's PUBACK.

        Tasks start in the order they were created, so paho queues the states in the order
        they were reported (a rollout follows every phase, so none may overtake another).
        A state the broker never acknowledges is sent again on reconnect.
        """
        client = self._client
        if client is None:
            return
        task = asyncio.create_task(
            client.publish(self.topics.state(self.host), encode(self.state), qos=1, retain=True)
        )
        self._sending.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: "asyncio.Task[None]") -> None:
        self._sending.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.log.debug("state not sent ({}); it is sent again on reconnect", exc)

    async def flush_once(self) -> None:
        """For `agent --once`: connect, send state and online=false, disconnect. Best effort."""
        if self.url is None or (self._secret is None and not (self.store.root / BROKER_SECRET).exists()):
            return  # never reached the server: no broker secret yet
        for url in self._in_turn():  # the first node that takes it
            try:
                secret = self._secret or read_secret(self.store.root / BROKER_SECRET)
                async with asyncio.timeout(_FLUSH_TIMEOUT), self._connect(url, secret, "once") as client:
                    await client.publish(self.topics.state(self.host), encode(self.state), qos=1, retain=True)
                    offline = encode(Online(online=False, at=now()))
                    await client.publish(self.topics.online(self.host), offline, qos=1, retain=True)
            except (aiomqtt.MqttError, ConfigError, TimeoutError, OSError) as exc:
                self.log.warning("state not reported to the broker {}: {}", url, exc)
            else:
                return

    # ---------------------------------------------------------------- connection

    def set_secret(self, secret: Secret) -> None:
        self._secret = secret
        self._secret_ready.set()

    def _connect(self, url: BrokerURL, secret: Secret, purpose: str = "agent") -> aiomqtt.Client:
        """The connection of `purpose`: the agent's own keeps one identifier (a reconnect takes
        over its stale session); `herald agent --once` has its own, so it never kicks the agent."""
        will = aiomqtt.Will(
            self.topics.online(self.host), encode(Online(online=False, at=now())), qos=1, retain=True
        )
        return connect(
            url,
            username=self.host,
            password=secret,
            identifier=client_id(self.host, purpose, secret),
            will=will,
            keepalive=self.config.broker.keepalive,
            ca=self.config.broker.ca,
        )

    @property
    def url(self) -> BrokerURL | None:
        """The node in use (or tried next); None without a broker."""
        return self.urls[self._node] if self.urls else None

    def _next_node(self) -> None:
        self._node = (self._node + 1) % len(self.urls)

    def _in_turn(self) -> list[BrokerURL]:
        """Every node, the one in use first."""
        return [*self.urls[self._node :], *self.urls[: self._node]]

    @property
    def connected(self) -> bool:
        return self._client is not None

    async def probe(self) -> None:
        """A new connection to the broker, closed at once: does the broker answer now?"""
        if self.url is None or self._secret is None:
            return
        failed: list[str] = []
        for url in self._in_turn():  # a cluster answers if any of its nodes does
            try:
                async with (
                    asyncio.timeout(_FLUSH_TIMEOUT),
                    connect(
                        url,
                        username=self.host,
                        password=self._secret,
                        identifier=client_id(self.host, "probe"),
                        ca=self.config.broker.ca,
                    ),
                ):
                    return
            except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
                failed.append(f"broker {url}: {exc or exc.__class__.__name__}")
        raise UnreachableError("; ".join(failed))

    async def listen(self, agent: Requests) -> None:
        """Stay connected to the broker (backing off between tries) and hand messages to `agent`.
        With several nodes, each failure moves to the next one: the publisher announces on every
        node, so the retained `desired` found there asks for a check if it names another generation."""
        if self.url is None:
            return
        backoff = Backoff(cap=60.0)
        if self._secret is None:
            with contextlib.suppress(ConfigError):  # else it is read over SFTP at the first check
                self.set_secret(read_secret(self.store.root / BROKER_SECRET))
        while True:
            await self._secret_ready.wait()
            if self._secret is None or self.url is None:
                continue
            url = self.url
            try:
                async with self._connect(url, self._secret) as client:
                    backoff.reset()
                    await self._session(client, agent)
            except aiomqtt.MqttCodeError as exc:
                if exc.rc in _REFUSED:
                    self.log.warning("broker refused our secret; reading it again from the server")
                    self._secret_ready.clear()
                    agent.secret_refused()
                else:
                    self.log.warning("broker {}: {}", url, exc)
            except aiomqtt.MqttError as exc:
                self.log.warning("broker {}: {}", url, exc)
            finally:
                self._client = None
            self._next_node()
            await asyncio.sleep(backoff.next())

    async def _session(self, client: aiomqtt.Client, agent: Requests) -> None:
        # QoS 0: both topics are retained, so a message lost with a connection comes again at the
        # next one, which also runs a check. QoS 1 would buy nothing more, and on RabbitMQ 3.10
        # it makes the subscription a durable queue homed on one node: while that node is down
        # the agent could reconnect nowhere else (DEVELOPERS.md, "RabbitMQ 3.10").
        await client.subscribe(self.topics.desired(self.host), qos=0)
        await client.subscribe(self.topics.command(self.host), qos=0)
        self._client = client
        self.log.info("connected to broker {}", self.url)
        self._send_state()
        heartbeat = asyncio.create_task(self._heartbeat(client), name="heartbeat")
        try:
            async for message in client.messages:
                self._on_message(agent, str(message.topic), message.payload)
        except asyncio.CancelledError:  # the agent stops: say so before the clean DISCONNECT
            heartbeat.cancel()
            await self._goodbye(client)
            raise
        finally:
            heartbeat.cancel()

    async def _goodbye(self, client: aiomqtt.Client) -> None:
        """On a clean stop, the last states and a retained online=false, acknowledged before the
        DISCONNECT (which makes the broker discard the will): a host stopped by `systemctl stop`
        shows as stopped at once, not when its heartbeat ages. One restarting says that instead."""
        try:
            async with asyncio.timeout(_GOODBYE_TIMEOUT):
                if self._sending:  # the states queued before, in their order
                    await asyncio.gather(*self._sending, return_exceptions=True)
                if self.restarting:
                    last = msgspec.structs.replace(self.state, message=self.restarting[:2000], since=now())
                else:
                    last = msgspec.structs.replace(
                        self.state, phase=Phase.STOPPED, message="agent stopped", since=now()
                    )
                self.state = last
                await client.publish(self.topics.state(self.host), encode(last), qos=1, retain=True)
                if not self.restarting:
                    offline = encode(Online(online=False, at=now()))
                    await client.publish(self.topics.online(self.host), offline, qos=1, retain=True)
        except (aiomqtt.MqttError, TimeoutError) as exc:
            self.log.warning("stop not reported to the broker: {}", exc)

    async def _heartbeat(self, client: aiomqtt.Client) -> None:
        while True:
            try:
                payload = encode(Online(online=True, at=now()))
                await client.publish(self.topics.online(self.host), payload, qos=1, retain=True)
            except aiomqtt.MqttError:
                return
            await asyncio.sleep(_HEARTBEAT)

    # ---------------------------------------------------------------- messages

    def _on_message(self, agent: Requests, topic: str, payload: object) -> None:
        parsed = self.topics.parse(topic)
        if parsed is None or parsed[0] != self.host or not isinstance(payload, bytes | bytearray):
            self.log.warning("ignored a message on {}", topic)
            return
        try:
            if parsed[1] is Kind.DESIRED:
                self._on_desired(agent, decode(payload, Desired))
            elif parsed[1] is Kind.COMMAND:
                self._on_command(agent, decode(payload, Command))
        except PayloadError as exc:
            self.log.warning("dropped a message on {}: {}", topic, exc)

    def _on_desired(self, agent: Requests, desired: Desired) -> None:
        deployed = self.store.deployed()
        if deployed is None or (desired.generation, desired.version) != (
            deployed.generation,
            deployed.version,
        ):
            agent.request(f"desired generation {desired.generation}")

    def _took(self, command: Command, *, send: bool) -> None:
        """The state names the last command taken, so that `herald status` stops showing it;
        `send` when no run follows to report it (a command replayed after a restart, or expired)."""
        if self.state.last_command != command.id:
            self.state = msgspec.structs.replace(self.state, last_command=command.id)
            if send:
                self._send_state()

    def _on_command(self, agent: Requests, command: Command) -> None:
        if self.store.command_done(command.id):
            self._took(command, send=True)
            return
        self.store.mark_command(command.id)
        if command.expires_at is not None and command.expires_at < now():
            self.log.info("command {} ({}) expired; ignored", command.id, command.action)
            self._took(command, send=True)
            return
        self._took(command, send=False)
        self.log.info("command {}: {} (by {})", command.id, command.action, command.by or "unknown")
        if command.action is Action.CHECK:
            agent.request(f"command {command.id}")
        elif command.action is Action.REBUILD:
            agent.request(f"command {command.id}", force=True)
        else:
            agent.request_rollback(f"command {command.id} by {command.by or 'unknown'}")
