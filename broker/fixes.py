"""HeraldBroker: amqtt 0.12.1's Broker with the defects herald cannot live with fixed.

1. Retained leak. On CONNECT, amqtt re-sends the retained messages of every topic filter that
   *any* client ever subscribed to, unchecked by the ACL (`_handle_client_session` calls
   `_publish_retained_messages_for_subscription` for each filter in `self._subscriptions`).
   Here a session gets the retained messages of its own subscriptions only.
2. Keepalive. amqtt never drops a silent client (`handle_read_timeout` does nothing), so a
   suspended laptop would stay online forever and its last will would never fire. Here a client
   silent for 1.5 x its keepalive is disconnected as MQTT 3.1.1 asks, and its will is published.
   One timer per client does it (`_Silence`); amqtt's own keepalive is turned off for the
   connection, as it cost a wait_for task and a timer handle per packet to do nothing.
3. Work that grows with the square of the fleet, which made a 1000-host reconnect storm take
   several seconds and an announcement of 1000 hosts two: every connect walked every topic
   filter, every disconnect walked them again (`_del_all_subscriptions`), every subscription
   matched every retained message, every message was matched against every filter
   (`_run_broadcast`), and every subscription formatted `repr()` of all subscriptions for a
   debug line nobody reads. Here an index of each session's filters makes connect and
   disconnect proportional to that session's own subscriptions, an exact filter finds its
   retained message by lookup, and a message is matched against its own topic's subscribers
   and the wildcard filters only.

4. CONNECT and connections: broker.admission (what is checked before a session is touched,
   packet size, connection limits).
5. QoS of delivery. amqtt delivered every message at the subscription's QoS, a QoS 0 publish at
   QoS 2 included; MQTT 3.1.1 (3.8.4) asks for the lower of the publish's and the subscription's.

This depends on amqtt's private methods. tests/test_broker.py pins the source of each method
overridden or copied here, and shows that stock amqtt still has each defect: an upgrade that
changes them fails the tests instead of silently turning a fix into dead code.
"""

import asyncio
import math
from collections import deque
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import QOS_0, QOS_1, QOS_2, BrokerError, BrokerEvents, MachineError, Server
from amqtt.contexts import Action
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import OutgoingApplicationMessage, Session
from loguru import logger

from broker.admission import Admission

if TYPE_CHECKING:
    from collections.abc import Callable

REFUSED = 0x80  # SUBACK return code for a refused subscription

# The QoS of the PUBLISH being routed, set around amqtt's _handle_message_delivery for the
# _broadcast_message it calls (in the same task), which amqtt gives no QoS.
_PUBLISH_QOS: ContextVar[int | None] = ContextVar("herald_publish_qos", default=None)


class _Subscriptions(dict[str, list[tuple[Session, int]]]):
    """amqtt's topic filter -> subscribers map; its repr is short because amqtt logs
    `repr(self._subscriptions)` after every subscription, debug level or not."""

    def __repr__(self) -> str:
        return f"<{len(self)} topic filters>"


class HeraldBroker(Admission):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.retained_watchers: list[Callable[[str, bytes], object]] = []
        self._subscriptions = _Subscriptions()
        self._filters_of: dict[str, set[str]] = {}  # client id -> the filters it subscribed
        self._wildcards: set[str] = set()  # filters with + or # (a superset: some may be unused)

    # ---------------------------------------------------------------- retained messages

    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        """amqtt's, then each watcher is told the topic's new retained payload (b"" once cleared):
        the serving process keeps its fleet view from here, not through a client of its own."""
        await super().retain_message(source_session, topic_name, data, qos)
        if topic_name is None:
            return
        for watcher in self.retained_watchers:
            try:
                watcher(topic_name, bytes(data or b""))
            except Exception:  # noqa: BLE001 - a watcher's bug must not stop the broker
                logger.exception("retained message watcher failed on {}", topic_name)

    # ---------------------------------------------------------------- the filter index

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        granted: int = await super().add_subscription(subscription, session)
        if granted != REFUSED and session.client_id:
            self._filters_of.setdefault(session.client_id, set()).add(subscription[0])
            if "+" in subscription[0] or "#" in subscription[0]:
                self._wildcards.add(subscription[0])
        return granted

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        deleted: int = super()._del_subscription(a_filter, session)
        if deleted and session.client_id in self._filters_of:
            self._filters_of[session.client_id].discard(a_filter)
        return deleted

    async def _del_all_subscriptions(self, session: Session) -> None:
        for topic_filter in self._filters_of.pop(session.client_id or "", set()):
            super()._del_subscription(topic_filter, session)
            if not self._subscriptions.get(topic_filter, True):
                del self._subscriptions[topic_filter]
                self._wildcards.discard(topic_filter)

    # ---------------------------------------------------------------- delivery

    async def _handle_message_delivery(
        self, client_session: Session, handler: BrokerProtocolHandler, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        """amqtt's, with the PUBLISH's QoS known to the _broadcast_message it calls."""
        message = wait_deliver.result()
        token = _PUBLISH_QOS.set(message.qos if message is not None else None)
        try:
            delivered: bool = await super()._handle_message_delivery(client_session, handler, wait_deliver)
        finally:
            _PUBLISH_QOS.reset(token)
        return delivered

    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
        """amqtt's; a client's PUBLISH is routed with its own QoS, the upper bound of delivery."""
        qos = force_qos if force_qos is not None else _PUBLISH_QOS.get()
        await super()._broadcast_message(session, topic, data, qos)

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        """The same verdict as amqtt's (every topic plugin must allow), asked of each plugin in
        turn instead of through a task per plugin: this runs for every message delivered."""
        if not self.plugins_manager.is_topic_filtering_enabled():
            return True
        for plugin in self.plugins_manager._topic_plugins:  # noqa: SLF001 - see tests/test_broker.py
            if not await plugin.topic_filtering(session=session, topic=topic, action=action):
                return False
        return True

    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[OutgoingApplicationMessage]]) -> None:
        """amqtt 0.12.1's method (debug lines left out), but for the filters it walks (`herald:`)."""
        broadcast = await self._broadcast_queue.get()
        topic = broadcast["topic"]
        # herald: the topic's own subscribers and the wildcard filters, not every filter.
        candidates = [topic] if topic in self._subscriptions else []
        candidates += [f for f in self._wildcards if f in self._subscriptions and self._matches(topic, f)]

        for k_filter in candidates:
            for target_session, sub_qos in self._subscriptions[k_filter]:
                # herald: the lower of the publish's QoS and the subscription's (MQTT 3.1.1, 3.8.4).
                qos = min(broadcast["qos"], sub_qos) if broadcast.get("qos") is not None else sub_qos

                sendable = await self._topic_filtering(target_session, topic=topic, action=Action.RECEIVE)
                if not sendable:
                    continue

                # Retain messages for disconnected persistent sessions [MQTT 3.1.2.4]
                if (
                    target_session.transitions.state != "connected"
                    and not target_session.clean_session
                    and qos in (QOS_1, QOS_2)
                    and not target_session.is_anonymous
                ):
                    await self._retain_broadcast_message(broadcast, qos, target_session)
                    continue

                if target_session.transitions.state != "connected":
                    continue

                handler = self._get_handler(target_session)
                if handler:
                    task = asyncio.ensure_future(
                        handler.mqtt_publish(topic, broadcast["data"], qos, retain=False)
                    )
                    running_tasks.append(task)

    # ---------------------------------------------------------------- retained messages

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        topic_filter, qos = subscription
        if topic_filter not in self._filters_of.get(session.client_id or "", ()):
            return  # the leak: never send another filter's retained messages
        if "+" in topic_filter or "#" in topic_filter:
            await super()._publish_retained_messages_for_subscription(subscription, session)
            return
        retained = self._retained_messages.get(topic_filter)
        handler = self._get_handler(session)
        if retained is not None and handler is not None:
            await handler.mqtt_publish(
                retained.topic, retained.data, min(qos, retained.qos or qos), retain=True
            )

    async def _handle_client_session(
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        client_session: Session,
        handler: BrokerProtocolHandler,
        server: Server,  # noqa: ARG002 - amqtt's signature
        listener_name: str,  # noqa: ARG002 - amqtt's signature
    ) -> None:
        """amqtt 0.12.1's method (debug lines left out) but for the parts marked `herald:`."""
        # herald: authenticated already, by _initialize_client_session, before any session was touched.
        if client_session.client_id is None:
            msg = "Client ID was not correctly created/set."
            raise BrokerError(msg)

        while True:
            try:
                client_session.transitions.connect()
                break
            except (MachineError, ValueError):
                if client_session.transitions.is_connected():
                    self.logger.warning(
                        "Client %s is already connected, performing take-over.", client_session.client_id
                    )
                    old_session = self._sessions[client_session.client_id]
                    await old_session[1].handle_connection_closed()
                    await old_session[1].stop()
                    break
                self.logger.warning(
                    "Client %s is reconnecting too quickly, make it wait", client_session.client_id
                )
                await asyncio.sleep(1)

        # herald: keepalive is watched by _Silence; with none set, amqtt's handler waits for each
        # packet without a timeout and keeps no timer per packet sent (it kept a wait_for task and
        # a timer handle a packet, for a timeout on which it did nothing).
        silence_limit = math.ceil(client_session.keep_alive * 1.5)
        client_session.keep_alive = 0
        handler.attach(client_session, reader, writer)
        self._sessions[client_session.client_id] = (client_session, handler)
        self._admitted(client_session, handler)  # herald: its QoS 2 flow bounded

        await handler.mqtt_connack_authorize(authorize=True)

        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_CONNECTED, client_id=client_session.client_id, client_session=client_session
        )

        await handler.start()
        if silence_limit > 0:  # herald
            _Silence(handler, client_session, reader, silence_limit)

        # publish messages that were retained because the client session was disconnected
        await self._publish_session_retained_messages(client_session)

        # herald: only this session's own filters (a persistent session's), not every filter
        # any client ever subscribed to.
        for topic in sorted(self._filters_of.get(client_session.client_id, ())):
            await self._publish_retained_messages_for_subscription((topic, QOS_0), client_session)

        await self._client_message_loop(client_session, handler)


class _Silence:
    """Drops a client silent for `limit` seconds (1.5 x its keepalive), as MQTT 3.1.1 asks.

    Every read from the client notes the time; one timer per client looks at it when the
    limit could first be reached, and again `limit` after the last read while there are any.
    """

    def __init__(
        self, handler: BrokerProtocolHandler, session: Session, reader: ReaderAdapter, limit: int
    ) -> None:
        self.handler = handler
        self.session = session
        self.limit = limit
        self.loop = asyncio.get_running_loop()
        self.last = self.loop.time()
        read = reader.read

        async def noted(n: int = -1) -> bytes:
            data: bytes = await read(n)
            self.last = self.loop.time()
            return data

        reader.read = noted
        self.timer = self.loop.call_at(self.last + limit, self.check)
        # The reader task (set by start()) ends with the connection: so does the watch, at once,
        # not a keepalive later (a reconnect storm would hold the old sessions until then).
        handler._reader_task.add_done_callback(lambda _: self.timer.cancel())  # noqa: SLF001

    def check(self) -> None:
        due = self.last + self.limit
        if self.loop.time() < due:
            self.timer = self.loop.call_at(due, self.check)
            return
        logger.info("dropping {}: silent for {} s (1.5 x keepalive)", self.session.client_id, self.limit)
        # Ends the session as an abnormal disconnect: the broker publishes the will and stops the handler.
        task = asyncio.ensure_future(self.handler.handle_connection_closed())
        _background.add(task)
        task.add_done_callback(_background.discard)


_background: set[asyncio.Future[None]] = set()
