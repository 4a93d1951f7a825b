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
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class Listener:
    """One listener of the embedded broker: plain MQTT, MQTT over TLS, or MQTT over WebSocket."""

    host: str
    port: int
    websocket: bool = False
    cert: str | None = None
    key: str | None = None

    @property
    def bind(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def amqtt(self) -> dict[str, Any]:
        config: dict[str, Any] = {"type": "ws" if self.websocket else "tcp", "bind": self.bind}
        if self.cert is not None:
            config |= {"ssl": True, "certfile": self.cert, "keyfile": self.key}
        return config


def broker_config(
    *, listeners: dict[str, Listener], password_file: Path, prefix: str = DEFAULT_PREFIX
) -> dict[str, Any]:
    """amqtt's configuration; `listeners` must hold one named "default"."""
    return {
        "listeners": {name: listener.amqtt() for name, listener in listeners.items()},
        "plugins": {
            "broker.auth.PasswordPlugin": {"password_file": str(password_file)},
            "broker.auth.AclPlugin": {"prefix": prefix},
        },
    }


class EmbeddedBroker:
    """Start and stop a HeraldBroker. After start, `ports` holds each listener's bound port
    (useful with port 0); `port` is the default listener's."""

    def __init__(
        self,
        listener: Listener,
        *,
        password_file: Path,
        prefix: str = DEFAULT_PREFIX,
        tls: Listener | None = None,
        websocket: Listener | None = None,
    ) -> None:
        self.listeners = (
            {"default": listener} | ({"tls": tls} if tls else {}) | ({"ws": websocket} if websocket else {})
        )
        self._config = broker_config(listeners=self.listeners, password_file=password_file, prefix=prefix)
        self._broker: HeraldBroker | None = None
        self.host = listener.host
        self.ports = {name: item.port for name, item in self.listeners.items()}

    @property
    def port(self) -> int:
        return self.ports["default"]

    async def start(self) -> None:
        self._broker = HeraldBroker(self._config)
        await self._broker.start()
        for name in self.listeners:
            server = self._broker._servers[name].instance  # noqa: SLF001 - amqtt exposes no bound address
            sockets = list(getattr(server, "sockets", ()) or ())
            if sockets:
                self.ports[name] = sockets[0].getsockname()[1]
            logger.info("MQTT broker listener {} on {}:{}", name, self.listeners[name].host, self.ports[name])

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None
