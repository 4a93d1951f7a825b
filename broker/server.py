"""The embedded broker: herald's fixed amqtt (broker.fixes) with herald's users and ACL."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from broker.fixes import HeraldBroker
from protocol.listen import check_bindable
from protocol.topics import DEFAULT_PREFIX

_LISTENERS = {  # what each listener is, and the setting that names its address
    "default": ("the MQTT broker", "--mqtt, or mqtt in server.toml"),
    "tls": ("the MQTT broker's TLS listener", "tls.listen in server.toml"),
    "ws": ("the MQTT broker's WebSocket listener", "websocket in server.toml"),
}


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
        self._retained_watchers: list[Callable[[str, bytes], object]] = []
        self.host = listener.host
        self.ports = {name: item.port for name, item in self.listeners.items()}

    @property
    def port(self) -> int:
        return self.ports["default"]

    def watch_retained(self, watcher: Callable[[str, bytes], object]) -> None:
        """Call `watcher(topic, payload)` for every retained message stored (b"" when cleared),
        from the next start on."""
        self._retained_watchers.append(watcher)

    async def start(self) -> None:
        for name, listener in self.listeners.items():  # amqtt buries a bind error in two of its own
            what, setting = _LISTENERS[name]
            check_bindable(what, listener.host, listener.port, setting)
        self._broker = HeraldBroker(self._config)
        self._broker.retained_watchers.extend(self._retained_watchers)
        await self._broker.start()
        for name in self.listeners:
            server = self._broker._servers[name].instance  # noqa: SLF001 - amqtt exposes no bound address
            sockets = list(getattr(server, "sockets", ()) or ())
            if sockets:
                self.ports[name] = sockets[0].getsockname()[1]
            logger.info("MQTT broker listener {} on {}:{}", name, self.listeners[name].host, self.ports[name])

    async def remove_user(self, user: str, topics: list[str]) -> tuple[int, list[str]]:
        """Drop every session of `user` without its will (a host removed from the fleet: its
        will would retain `online` again) and forget its subscriptions; then clear and forget the
        retained messages of `topics`. (sessions dropped, topics that held a retained message)"""
        broker = self._broker
        if broker is None:
            return 0, []
        dropped = 0
        for client_id, (session, handler) in list(broker._sessions.items()):  # noqa: SLF001 - amqtt exposes no way to drop a client
            if session.username != user:
                continue
            session.will_flag = False
            if session.transitions.is_connected():
                await handler.handle_connection_closed()
                dropped += 1
            await broker._del_all_subscriptions(session)  # noqa: SLF001
            broker._sessions.pop(client_id, None)  # noqa: SLF001
        cleared = []
        for topic in topics:
            if topic in broker._retained_messages:  # noqa: SLF001
                await broker.retain_message(None, topic, b"", 1)  # its watchers hear it cleared
                broker._retained_messages.pop(topic, None)  # noqa: SLF001 - amqtt keeps an empty one
                cleared.append(topic)
        return dropped, cleared

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None
