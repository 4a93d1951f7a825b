"""Connecting to a broker: URLs, clients, and confirming that messages were routed.

Every herald client (publisher, admin, agent) connects through `connect()`, so TLS, timeouts and
identifiers are set in one place.
"""

import asyncio
import hashlib
import hmac
import secrets
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import aiomqtt

from protocol.credentials import Secret
from protocol.errors import ConfigError, UnreachableError
from protocol.topics import Topics


@dataclass(frozen=True, slots=True)
class BrokerURL:
    host: str
    port: int
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> "BrokerURL":
        """mqtt://HOST[:PORT] or mqtts://HOST[:PORT]."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"broker URL {url!r}: {exc}") from exc
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ConfigError(f"broker URL {url!r}: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
        if parts.username or parts.password or parts.path not in ("", "/") or parts.query:
            raise ConfigError(f"broker URL {url!r}: only scheme, host and port are allowed")
        tls = parts.scheme == "mqtts"
        return cls(parts.hostname, port or (8883 if tls else 1883), tls)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


def parse_urls(value: str | Sequence[str] | None) -> list[BrokerURL]:
    """One URL or several (the nodes of a cluster), parsed; [] for None."""
    if value is None:
        return []
    return [BrokerURL.parse(url) for url in ([value] if isinstance(value, str) else value)]


def rotation(urls: Sequence[BrokerURL], key: str) -> list[BrokerURL]:
    """The nodes in the order one client tries them: from one that `key` (a host's name) fixes,
    so that a fleet spreads over a cluster's nodes, then each of the others in turn."""
    if not urls:
        return []
    start = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % len(urls)
    return [*urls[start:], *urls[:start]]


_REFUSED: Final = (4, 5, 134, 135)  # CONNACK: bad user name or password, not authorised


def unreachable(url: "BrokerURL", user: str, exc: Exception) -> UnreachableError:
    """One line for a broker that could not be used: what it said and, for a refused login,
    what to look at."""
    said = str(exc) or exc.__class__.__name__
    if isinstance(exc, aiomqtt.MqttCodeError) and exc.rc in _REFUSED:
        said += (
            f": the broker refused {user}'s secret; is --state the state directory of the server this "
            "broker belongs to? (with Mosquitto: run `herald broker export` again after a publish)"
        )
    return UnreachableError(f"broker {url}: {said}")


def client_id(user: str, purpose: str, secret: Secret | None = None) -> str:
    """`<user>.<purpose>.<suffix>`, the MQTT client identifier of one of `user`'s connections.

    herald's broker admits an identifier only for the user it names (broker.acl.owns_client_id),
    so no login can take over another user's session. The suffix also makes it unguessable, for
    brokers that bind identifiers to nobody (Mosquitto): derived from `secret`, it stays the same
    across reconnects, so a new connection takes over its own stale session at once; without a
    secret it is random.
    """
    if secret is None:
        suffix = secrets.token_hex(8)
    else:
        suffix = hmac.new(secret.reveal().encode(), purpose.encode(), hashlib.sha256).hexdigest()[:16]
    return f"{user}.{purpose}.{suffix}"


def connect(
    url: BrokerURL,
    *,
    username: str,
    password: Secret,
    identifier: str | None = None,
    will: aiomqtt.Will | None = None,
    keepalive: int = 60,
    timeout: float = 10.0,
    ca: str | None = None,
    max_inflight: int | None = None,
) -> aiomqtt.Client:
    """An unconnected client; use it as `async with connect(...) as client:`.

    For mqtts://, the server certificate is checked against `ca` (a PEM file), else the
    system's CAs (or $SSL_CERT_FILE). Without `identifier`, a random one of `username`'s."""
    return aiomqtt.Client(
        url.host,
        url.port,
        username=username,
        password=password.reveal(),
        identifier=identifier or client_id(username, "client"),
        will=will,
        keepalive=keepalive,
        timeout=timeout,
        clean_session=True,
        tls_context=ssl.create_default_context(cafile=ca) if url.tls else None,
        max_inflight_messages=max_inflight,
    )


async def confirm_routed(
    client: aiomqtt.Client,
    topics: Topics,
    user: str,
    timeout: float = 10.0,
    on_message: Callable[[aiomqtt.Message], None] | None = None,
) -> None:
    """Return once the broker has routed everything this client published before.

    Messages that arrive meanwhile go to `on_message`. The same marker also tells a client
    that subscribed before calling this that the broker has sent it every retained message.

    A PUBACK only says the broker received a message; amqtt can still drop it if the client
    disconnects at once (FINDINGS.md). Brokers route one client's messages in order, so once a
    marker published last comes back, everything published before it has been routed.
    """
    topic = topics.confirm(user, secrets.token_hex(8))
    try:
        await client.subscribe(topic, qos=1)
        await client.publish(topic, b"1", qos=1)
        async with asyncio.timeout(timeout):
            async for message in client.messages:
                if message.topic.value == topic:
                    break
                if on_message is not None:
                    on_message(message)
        await client.unsubscribe(topic)
    except (aiomqtt.MqttError, TimeoutError) as exc:
        raise UnreachableError(f"broker did not confirm delivery within {timeout:g}s: {exc}") from exc
