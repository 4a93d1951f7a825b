"""The embedded broker: amqtt 0.12.1 with herald's users, ACL and two fixes to its internals.

1. Retained leak. On CONNECT, amqtt re-sends the retained messages of every topic filter that
   *any* client ever subscribed to, unchecked (`Broker._handle_client_session` calls
   `_publish_retained_messages_for_subscription` for each filter in `self._subscriptions`).
   Here that method sends only for filters the session itself subscribed to.
2. Keepalive. amqtt never drops a silent client (`handle_read_timeout` does nothing), so a
   suspended laptop would stay online forever and its last will would never fire. Here a client
   silent for 1.5 x its keepalive is disconnected as MQTT 3.1.1 asks, and its will is published.

Both depend on amqtt's private methods; tests/test_broker.py fails if they change.
"""

import asyncio
import math
from pathlib import Path
from typing import Any

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from loguru import logger

from protocol.topics import DEFAULT_PREFIX


class HeraldBroker(Broker):
    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        topic_filter = subscription[0]
        subscribers = self._subscriptions.get(topic_filter, [])
        if any(subscriber.client_id == session.client_id for subscriber, _ in subscribers):
            await super()._publish_retained_messages_for_subscription(subscription, session)

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        handler, session = await super()._initialize_client_session(
            reader, writer, remote_address, remote_port
        )
        if session.keep_alive > 0:
            # The reader loop waits this long for each packet; on timeout it calls
            # handle_read_timeout, which amqtt leaves empty.
            session.keep_alive = math.ceil(session.keep_alive * 1.5)
            handler.handle_read_timeout = lambda: _drop_silent(handler, session)
        return handler, session


def _drop_silent(handler: BrokerProtocolHandler, session: Session) -> None:
    logger.info("dropping {}: silent for {} s (1.5 x keepalive)", session.client_id, session.keep_alive)
    # Ends the session as an abnormal disconnect: the broker publishes the will and stops the handler.
    task = asyncio.ensure_future(handler.handle_connection_closed())
    _background.add(task)
    task.add_done_callback(_background.discard)


_background: set[asyncio.Future[None]] = set()


def broker_config(*, bind: str, password_file: Path, prefix: str = DEFAULT_PREFIX) -> dict[str, Any]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": bind}},
        "plugins": {
            "broker.auth.PasswordPlugin": {"password_file": str(password_file)},
            "broker.auth.AclPlugin": {"prefix": prefix},
        },
    }


class EmbeddedBroker:
    """Start and stop a HeraldBroker; `port` is the bound port (useful with port 0)."""

    def __init__(self, *, host: str, port: int, password_file: Path, prefix: str = DEFAULT_PREFIX) -> None:
        bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._config = broker_config(bind=bind, password_file=password_file, prefix=prefix)
        self._broker: HeraldBroker | None = None
        self.host = host
        self.port = port

    async def start(self) -> None:
        self._broker = HeraldBroker(self._config)
        await self._broker.start()
        server = self._broker._servers["default"].instance  # noqa: SLF001 - amqtt exposes no bound address
        sockets = server.sockets if isinstance(server, asyncio.Server) else ()
        if sockets:
            self.port = sockets[0].getsockname()[1]
        logger.info("MQTT broker listening on {}:{}", self.host, self.port)

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None
