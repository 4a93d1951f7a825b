"""Admission: what herald's broker checks of a connection before, and while, it is admitted.

1. CONNECT is checked before anything is touched. amqtt deleted an existing session with the
   same client id before authenticating (`_initialize_client_session`), so a refused login,
   with no password at all, silently unsubscribed any agent whose id it named; and it published
   a client's last will with no publish-permission check (`_handle_disconnect`), so a host's
   will could retain a rollback on another host's `command` topic. Here authentication, the
   auth plugins' client-id binding (broker.auth) and the will's topic, checked against the
   publish ACL, all come first: a CONNECT that fails any of them is refused with one log line
   naming the user, and no session is looked at. A client that takes over its own session
   (same user, same id) now really disconnects the old connection (amqtt left it open with its
   subscriptions gone), and the old connection's will is published before the new one goes on.
2. Packet size. amqtt reads a packet of any length (up to MQTT's 256 MiB) into memory, and a
   host could retain one on its own topics. Here a packet whose payload is larger than
   MAX_PACKET ends the connection (Mosquitto: `max_packet_size` in the export).
3. Connections are bounded: amqtt waited for a CONNECT for ever and admitted any number of
   connections, so a stranger's idle sockets could take every descriptor of the process that
   also serves SFTP. Here a CONNECT must come within CONNECT_WAIT; past a cap (an eighth of the
   descriptor limit, at most 1024) of connections still waiting for theirs, the oldest is
   dropped (a real client sends CONNECT at once, so it gets through); a user has at most
   MAX_PER_USER connections (a host needs two or three); and a connection may keep at most
   MAX_QOS2_WAITING QoS 2 messages waiting for their PUBREL.

Pinned by tests/test_broker.py like broker.fixes, and attacked by tests/test_attacks_broker.py.
"""

import asyncio
import resource
from collections import Counter, OrderedDict
from typing import Any, Final

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import QOS_2, Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import Session
from amqtt.utils import format_client_message, gen_client_id
from loguru import logger

MAX_PACKET: Final = 256 * 1024  # bytes: far above any herald payload (protocol.messages.MAX_PAYLOAD)
CONNECT_WAIT: Final = 10.0  # seconds from TCP connection to CONNECT
MAX_PER_USER: Final = 32  # connections of one user at once
MAX_QOS2_WAITING: Final = 16  # QoS 2 messages of one connection waiting for PUBREL
_TAKEOVER_WAIT: Final = 5.0  # seconds a takeover waits for the old connection's end (its will)


def pending_cap() -> int:
    """How many connections may wait for their CONNECT at once: an eighth of the process's
    descriptors (which serve SFTP and every admitted host too), between 16 and 1024."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(1024, soft // 8)) if soft != resource.RLIM_INFINITY else 1024


class Admission(Broker):
    """amqtt's Broker with herald's admission (see the module's docstring)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self._ended: dict[int, asyncio.Event] = {}  # id(handler) -> set when its message loop ends
        self._pending: OrderedDict[int, WriterAdapter] = OrderedDict()  # waiting for CONNECT, oldest first
        self._pending_cap = pending_cap()
        self._connections: Counter[str] = Counter()  # user -> connections admitted

    async def _client_connected(
        self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter
    ) -> None:
        """amqtt's, reading through a guard: a payload of more than MAX_PACKET bytes is refused
        before it is read (amqtt reads a PUBLISH's payload with one read of its whole length;
        every other field of a packet is a string of at most 64 KiB)."""
        read = reader.read
        refused = False

        async def bounded(n: int = -1) -> bytes:
            nonlocal refused
            if n > MAX_PACKET and not refused:
                refused = True
                where = writer.get_peer_info()
                logger.warning(
                    "dropping the client at {}: a packet of more than {} KiB", where, MAX_PACKET >> 10
                )
                await writer.close()
            if refused:  # and every read after: the rest of that packet is not read as packets
                raise ConnectionResetError("packet too large")  # amqtt reads this as the connection's end
            data: bytes = await read(n)
            return data

        reader.read = bounded
        self._pending[id(writer)] = writer
        if len(self._pending) > self._pending_cap:  # the oldest has had the longest to send CONNECT
            _, oldest = self._pending.popitem(last=False)
            logger.warning(
                "more than {} connections have not sent CONNECT: dropping the oldest, from {}",
                self._pending_cap,
                oldest.get_peer_info(),
            )
            await oldest.close()
        await super()._client_connected(listener_name, reader, writer)

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        """amqtt 0.12.1's method (debug lines left out), but for the parts marked `herald:`."""
        try:
            return await self._admit(reader, writer, remote_address, remote_port)
        finally:
            self._pending.pop(id(writer), None)  # herald: admitted or refused, no longer waiting

    async def _admit(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        try:
            async with asyncio.timeout(CONNECT_WAIT):  # herald: amqtt waited for ever
                handler, client_session = await BrokerProtocolHandler.init_from_connect(
                    reader, writer, self.plugins_manager
                )
        except TimeoutError as exc:
            await writer.close()
            msg = f"no CONNECT within {CONNECT_WAIT:g} s"
            raise AMQTTError(msg) from exc
        except AMQTTError as exc:
            where = format_client_message(address=remote_address, port=remote_port)
            self.logger.warning("[MQTT-3.1.0-1] %s: Can't read first packet as CONNECT: %s", where, exc)
            raise AMQTTError(exc) from exc
        except MQTTError as exc:
            where = format_client_message(address=remote_address, port=remote_port)
            self.logger.warning("Invalid connection from %s", where)
            await writer.close()
            raise MQTTError(exc) from exc
        except NoDataError as exc:
            where = format_client_message(address=remote_address, port=remote_port)
            self.logger.error("No data from %s : %s", where, exc)
            raise AMQTTError(exc) from exc

        # herald: nothing of any other session is looked at before this CONNECT is admitted.
        refused = await self._refusal(client_session)
        if refused is not None:
            logger.warning(
                "refused a CONNECT from {} (user {!r}, client id {!r}): {}",
                f"{remote_address}:{remote_port}",
                client_session.username,
                client_session.client_id,
                refused,
            )
            handler.attach(client_session, reader, writer)
            await handler.mqtt_connack_authorize(authorize=False)
            await writer.close()
            raise AMQTTError(refused)
        return handler, await self._session_of(client_session)

    async def _session_of(self, client_session: Session) -> Session:
        """amqtt's choice of the session an admitted CONNECT goes on with (herald: ending the
        connection it replaces)."""
        if client_session.clean_session:
            # Delete existing session and create a new one
            if client_session.client_id:
                await self._take_over(client_session.client_id)  # herald: the old connection ends
                await self._delete_session(client_session.client_id)
            else:
                client_session.client_id = gen_client_id()
            client_session.parent = 0
        elif client_session.client_id in self._sessions:
            # Get session from cache: the new connection brings its configuration and credentials
            existing_client_session, _ = self._sessions[client_session.client_id]
            existing_client_session.will_flag = client_session.will_flag
            existing_client_session.will_message = client_session.will_message
            existing_client_session.will_topic = client_session.will_topic
            existing_client_session.will_qos = client_session.will_qos
            existing_client_session.keep_alive = client_session.keep_alive
            existing_client_session.username = client_session.username
            existing_client_session.password = client_session.password
            client_session = existing_client_session
            client_session.parent = 1
        else:
            client_session.parent = 0

        timeout_disconnect_delay = self.config.get("timeout-disconnect-delay", 0)
        if client_session.keep_alive > 0 and isinstance(timeout_disconnect_delay, int):
            client_session.keep_alive += timeout_disconnect_delay
        return client_session

    async def _refusal(self, session: Session) -> str | None:
        """Why this CONNECT is refused, or None: the auth plugins (herald's bind the client id
        to its user) must all admit it, and a will must be a valid topic name the client may
        publish to, checked as its PUBLISH would be (amqtt checked readers only, when it fired)."""
        if not await self._authenticate(session, None):  # amqtt ignores the listener
            return "not authorised (user name, password or client id)"
        user = session.username or ""
        existing = self._sessions.get(session.client_id or "")
        replaces = existing is not None and existing[0].transitions.is_connected()  # a takeover
        if self._connections[user] >= MAX_PER_USER and not replaces:
            return f"user {user!r} has {MAX_PER_USER} connections already"
        if session.will_flag:
            topic = session.will_topic or ""
            if not topic or "+" in topic or "#" in topic or topic.startswith("$"):
                return f"its will names no valid topic ({topic!r})"
            if not await self._topic_filtering(session, topic=topic, action=Action.PUBLISH):
                return f"its will is on {topic}, where it may not publish"
        return None

    async def _take_over(self, client_id: str) -> None:
        """End the live connection of `client_id`, if there is one, as an abnormal disconnect
        (its will is published) and wait for it to end: a client reconnecting with its own id
        replaces its stale connection, whose will must not land after the new one's messages."""
        existing = self._sessions.get(client_id)
        if existing is None or not existing[0].transitions.is_connected():
            return
        old_handler = existing[1]
        ended = self._ended.get(id(old_handler))
        logger.info("client {} connected again: ending its previous connection", client_id)
        await old_handler.handle_connection_closed()
        if ended is not None:
            try:
                async with asyncio.timeout(_TAKEOVER_WAIT):
                    await ended.wait()
            except TimeoutError:
                logger.warning("the previous connection of {} did not end in time", client_id)

    async def _client_message_loop(self, client_session: Session, handler: BrokerProtocolHandler) -> None:
        """amqtt's; a takeover can wait for it to end (after the will of an abnormal end is out),
        and the connection counts for its user (MAX_PER_USER) while it runs."""
        ended = self._ended[id(handler)] = asyncio.Event()
        user = client_session.username or ""
        self._connections[user] += 1  # counted while its loop runs: every way out passes the finally
        try:
            await super()._client_message_loop(client_session, handler)
        finally:
            ended.set()
            self._ended.pop(id(handler), None)
            self._connections[user] -= 1

    def _admitted(self, session: Session, handler: BrokerProtocolHandler) -> None:
        """A connection past CONNECT gets its incoming QoS 2 flow bounded. amqtt keeps every
        QoS 2 PUBLISH until its PUBREL, with no limit and no timeout: a client that never sends
        PUBREL made it hold one packet per packet id (16 GiB a connection). herald never
        publishes at QoS 2; past MAX_QOS2_WAITING the connection ends."""
        publish = handler.handle_publish

        async def bounded(packet: PublishPacket) -> None:
            if packet.qos == QOS_2 and len(session.inflight_in) >= MAX_QOS2_WAITING:
                logger.warning(
                    "dropping {}: {} QoS 2 messages wait for their PUBREL",
                    session.client_id,
                    MAX_QOS2_WAITING,
                )
                await handler.handle_connection_closed()
                return
            await publish(packet)

        handler.handle_publish = bounded
