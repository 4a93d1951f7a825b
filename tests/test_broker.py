"""The embedded broker: users, ACL, and the two amqtt 0.12.1 defects herald works around.

Each defect has two tests: herald's broker behaves, and stock amqtt still misbehaves the same
way. When an amqtt upgrade changes the internals herald patches, the second kind fails and says
so, instead of the fix silently turning into dead code.
"""

import asyncio
import contextlib
import hashlib
import inspect
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiomqtt
import amqtt.broker
import amqtt.mqtt.protocol.handler
import amqtt.plugins.manager
import paho.mqtt.client as mqtt
import pytest
from helpers import Fleet

from broker.fixes import HeraldBroker
from broker.server import EmbeddedBroker, Listener, broker_config
from protocol.credentials import Secret, read_secret
from protocol.messages import Online, decode, encode, now
from protocol.mqtt import BrokerURL, confirm_routed, connect
from protocol.topics import ADMIN_USER, PUBLISHER_USER, Kind, Topics
from publisher.announce import announce, desired_of
from publisher.publish import publish

T = Topics()


def run(coroutine):
    async def bounded():
        async with asyncio.timeout(60):
            return await coroutine

    return asyncio.run(bounded())


@pytest.fixture
def state(fleet: Fleet, tmp_path: Path) -> Path:
    """A published state dir: STATE/broker/passwd and every user's secret."""
    path = tmp_path / "state"
    publish(fleet.root, path)
    return path


def secret(state: Path, user: str) -> Secret:
    if user in (ADMIN_USER, PUBLISHER_USER):
        return read_secret(state / "broker" / f"{user}.secret")
    return read_secret(state / "chroot" / user / "credentials" / "broker.secret")


@asynccontextmanager
async def embedded(state: Path, *watchers: Callable[[str, bytes], object]) -> AsyncIterator[BrokerURL]:
    broker = EmbeddedBroker(Listener("127.0.0.1", 0), password_file=state / "broker" / "passwd")
    for watcher in watchers:
        broker.watch_retained(watcher)
    await broker.start()
    try:
        yield BrokerURL("127.0.0.1", broker.port)
    finally:
        await broker.stop()


@asynccontextmanager
async def stock(state: Path) -> AsyncIterator[BrokerURL]:
    """Unpatched amqtt with herald's plugins: to show the defects are still there."""
    port = _free_port()
    broker = amqtt.broker.Broker(
        broker_config(
            listeners={"default": Listener("127.0.0.1", port)}, password_file=state / "broker" / "passwd"
        )
    )
    await broker.start()
    try:
        yield BrokerURL("127.0.0.1", port)
    finally:
        await broker.shutdown()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def client(url: BrokerURL, state: Path, user: str, **kwargs) -> aiomqtt.Client:
    return connect(
        url, username=user, password=secret(state, user), identifier=f"{user}.{time.monotonic_ns()}", **kwargs
    )


async def drain(c: aiomqtt.Client, seconds: float) -> list[tuple[str, bytes]]:
    got: list[tuple[str, bytes]] = []
    try:
        async with asyncio.timeout(seconds):
            async for message in c.messages:  # until the timeout: no comprehension can stop there
                got.append((str(message.topic), bytes(message.payload)))  # type: ignore[arg-type]  # noqa: PERF401
    except TimeoutError:
        pass
    return got


async def publish_desired(url: BrokerURL, state: Path, hosts: list[str]) -> None:
    async with client(url, state, PUBLISHER_USER) as publisher:
        for host in hosts:
            await publisher.publish(T.desired(host), f"for {host}".encode(), qos=1, retain=True)
        await confirm_routed(publisher, T, PUBLISHER_USER)


# ---------------------------------------------------------------- authentication


def test_anonymous_wrong_and_unknown_users_are_refused(state: Path):
    async def scenario():
        async with embedded(state) as url:
            refused = []
            for username, password in (
                (None, None),
                ("alpha", "wrong"),
                ("alpha", secret(state, "beta").reveal()),
                ("zeta", "x"),
            ):
                try:
                    async with aiomqtt.Client(url.host, url.port, username=username, password=password):
                        refused.append(False)
                except aiomqtt.MqttError:
                    refused.append(True)
            async with client(url, state, "alpha"):
                pass
            return refused

    assert run(scenario()) == [True, True, True, True]


def test_a_new_host_can_log_in_after_a_publish_without_a_restart(fleet: Fleet, state: Path, tmp_path: Path):
    async def scenario():
        async with embedded(state) as url:
            fleet.add_host("delta", tmp_path)
            await asyncio.to_thread(publish, fleet.root, state)
            async with client(url, state, "delta"):
                return True

    assert run(scenario())


# ---------------------------------------------------------------- ACL


@pytest.mark.parametrize(
    ("topic", "granted"),
    [
        ("herald/alpha/desired", True),
        ("herald/alpha/command", True),
        ("herald/beta/desired", False),
        ("herald/+/desired", False),
        ("herald/#", False),
        ("#", False),
        ("herald/alpha/#", False),
        ("herald/alpha/state", False),
    ],
)
def test_a_host_subscribes_only_to_its_own_desired_and_command(state: Path, topic: str, granted: bool):
    async def scenario():
        async with embedded(state) as url, client(url, state, "alpha") as alpha:
            return await alpha.subscribe(topic, qos=1)

    (code,) = run(scenario())
    assert (code.value < 0x80) is granted


def test_forged_messages_reach_nobody(state: Path):
    forged = [T.desired("alpha"), T.desired("beta"), T.command("alpha"), T.state("beta"), T.online("beta")]

    async def scenario():
        async with embedded(state) as url, client(url, state, ADMIN_USER) as admin:
            await admin.subscribe("herald/#", qos=1)
            async with client(url, state, "alpha") as alpha:
                for topic in forged:
                    await alpha.publish(topic, b"forged", qos=1, retain=True)
                await alpha.publish(T.state("alpha"), b"genuine", qos=1, retain=True)
            seen: list[tuple[str, bytes]] = []
            await confirm_routed(
                admin, T, ADMIN_USER, on_message=lambda m: seen.append((str(m.topic), m.payload))
            )
            seen += await drain(admin, 0.5)
            seen = [(topic, payload) for topic, payload in seen if "/_confirm/" not in topic]
            async with client(url, state, "beta") as beta:  # and nothing forged was retained
                await beta.subscribe(T.desired("beta"), qos=1)
                await beta.subscribe(T.command("beta"), qos=1)
                seen += await drain(beta, 0.5)
            return seen

    assert run(scenario()) == [(T.state("alpha"), b"genuine")]


# ---------------------------------------------------------------- retained leak


async def leak_scenario(server) -> list[str]:
    """beta subscribes to its own desired; alpha then connects. What does alpha receive?"""
    async with server as url:
        state = leak_scenario.state  # type: ignore[attr-defined]
        await publish_desired(url, state, ["alpha", "beta", "gamma"])
        async with client(url, state, "beta") as beta:
            await beta.subscribe(T.desired("beta"), qos=1)
            await drain(beta, 0.3)
            async with client(url, state, "alpha") as alpha:
                before = await drain(alpha, 0.8)
                await alpha.subscribe(T.desired("alpha"), qos=1)
                after = await drain(alpha, 0.8)
        return [topic for topic, _ in before + after]


def test_a_host_never_receives_another_hosts_retained_message(state: Path):
    leak_scenario.state = state  # type: ignore[attr-defined]
    assert run(leak_scenario(embedded(state))) == [T.desired("alpha")]


def test_stock_amqtt_still_leaks_retained_messages_so_the_fix_is_still_needed(state: Path):
    leak_scenario.state = state  # type: ignore[attr-defined]
    received = run(leak_scenario(stock(state)))
    assert T.desired("beta") in received, "amqtt no longer leaks: review broker/server.py's override"
    hooked = inspect.getsource(amqtt.broker.Broker._handle_client_session)
    assert "_publish_retained_messages_for_subscription" in hooked


# ---------------------------------------------------------------- keepalive and will


def silent_client(url: BrokerURL, state: Path, host: str, keepalive: int) -> mqtt.Client:
    """A paho client that connects with a will and then never reads or writes again."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{host}.silent")
    c.username_pw_set(host, secret(state, host).reveal())
    c.will_set(T.online(host), encode(Online(online=False, at=now())), qos=1, retain=True)
    c.connect(url.host, url.port, keepalive=keepalive)
    deadline = time.monotonic() + 10
    while not c.is_connected() and time.monotonic() < deadline:
        c.loop(timeout=0.1)
    assert c.is_connected()
    return c


async def wait_will(url: BrokerURL, state: Path, host: str, within: float) -> float | None:
    """Seconds until the host's will (online=false) arrives, or None."""
    async with client(url, state, ADMIN_USER) as admin:
        await admin.subscribe(T.online(host), qos=1)
        started = time.monotonic()
        try:
            async with asyncio.timeout(within):
                async for message in admin.messages:
                    if not decode(message.payload, Online).online:  # type: ignore[arg-type]
                        return time.monotonic() - started
        except TimeoutError:
            return None
    return None


def test_a_silent_client_is_dropped_after_one_and_a_half_keepalives_and_its_will_fires(state: Path):
    async def scenario():
        async with embedded(state) as url:
            silent = await asyncio.to_thread(silent_client, url, state, "alpha", 2)
            try:
                return await wait_will(url, state, "alpha", within=1.5 * 2 + 1)
            finally:
                silent.socket().close()

    assert run(scenario()) is not None


def test_a_client_that_pings_in_time_stays_connected(state: Path):
    async def scenario():
        async with embedded(state) as url, client(url, state, "alpha", keepalive=2):
            # aiomqtt pings at the keepalive; no will may fire in 3 keepalives.
            return await wait_will(url, state, "alpha", within=6)

    assert run(scenario()) is None


def test_stock_amqtt_still_ignores_keepalive_so_the_fix_is_still_needed(state: Path):
    async def scenario():
        async with stock(state) as url:
            silent = await asyncio.to_thread(silent_client, url, state, "alpha", 1)
            try:
                return await wait_will(url, state, "alpha", within=3.5)
            finally:
                silent.socket().close()

    assert run(scenario()) is None, "amqtt now enforces keepalive: review broker/server.py's override"
    handler = amqtt.broker.BrokerProtocolHandler
    assert inspect.getsource(handler.handle_read_timeout).rstrip().endswith("pass")


# ---------------------------------------------------------------- CONNECT checks and QoS
# herald's broker is attacked in tests/test_attacks_broker.py; these show stock amqtt still has
# each defect broker/fixes.py works around.


async def will_scenario(server) -> list[str]:
    """alpha connects with a retained will on beta's command and drops its connection: what
    does an admin subscribed to every command receive?"""
    async with server as url:
        state = will_scenario.state  # type: ignore[attr-defined]
        async with client(url, state, ADMIN_USER) as admin:
            await admin.subscribe(T.every(Kind.COMMAND), qos=1)
            forger = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="alpha.forger")
            forger.username_pw_set("alpha", secret(state, "alpha").reveal())
            forger.will_set(T.command("beta"), b"rollback", qos=1, retain=True)
            await asyncio.to_thread(forger.connect, url.host, url.port, 30)
            for _ in range(20):
                await asyncio.to_thread(forger.loop, 0.05)
            sock = forger.socket()
            if sock is not None:  # refused: herald's broker closed it already
                sock.close()  # no DISCONNECT: the will fires
            return [topic for topic, _ in await drain(admin, 1.5)]


def test_stock_amqtt_still_publishes_unauthorised_wills_so_the_fix_is_still_needed(state: Path):
    will_scenario.state = state  # type: ignore[attr-defined]
    assert run(will_scenario(embedded(state))) == []
    received = run(will_scenario(stock(state)))
    assert T.command("beta") in received, "amqtt now checks wills: review broker/fixes.py's CONNECT checks"


async def kick_scenario(server) -> bool:
    """beta subscribes; a CONNECT with beta's client id and no password is refused. Does a
    message on beta's desired still reach beta?"""
    async with server as url:
        state = kick_scenario.state  # type: ignore[attr-defined]
        async with connect(
            url, username="beta", password=secret(state, "beta"), identifier="beta.agent"
        ) as beta:
            await beta.subscribe(T.desired("beta"), qos=1)
            with contextlib.suppress(aiomqtt.MqttError):
                async with aiomqtt.Client(url.host, url.port, identifier="beta.agent"):
                    pass
            await publish_desired(url, state, ["beta"])
            return any(topic == T.desired("beta") for topic, _ in await drain(beta, 1.0))


def test_stock_amqtt_still_lets_a_refused_login_kick_a_session_so_the_fix_is_still_needed(state: Path):
    kick_scenario.state = state  # type: ignore[attr-defined]
    assert run(kick_scenario(embedded(state)))
    assert not run(kick_scenario(stock(state))), "amqtt now authenticates first: review broker/fixes.py"


async def qos_scenario(server) -> int:
    """The admin subscribes at QoS 2; alpha publishes its state at QoS 0: at which QoS is it delivered?"""
    async with server as url:
        state = qos_scenario.state  # type: ignore[attr-defined]
        async with client(url, state, ADMIN_USER) as admin:
            await admin.subscribe(T.state("alpha"), qos=2)
            async with client(url, state, "alpha") as alpha:
                await alpha.publish(T.state("alpha"), b"zero", qos=0)
            async with asyncio.timeout(5):
                async for message in admin.messages:
                    return message.qos
    return -1


def test_stock_amqtt_still_upgrades_qos_so_the_fix_is_still_needed(state: Path):
    qos_scenario.state = state  # type: ignore[attr-defined]
    assert run(qos_scenario(embedded(state))) == 0
    assert run(qos_scenario(stock(state))) == 2, "amqtt now delivers at the lower QoS: review broker/fixes.py"


# sha256 (first 16 hex digits) of the source of every amqtt 0.12.1 method that broker/fixes.py
# overrides, copies or relies on. A change means: read the new code, then update broker/fixes.py
# and this table together.
REVIEWED = {
    "Broker._handle_client_session": "8b1b52a03df9daf5",  # copied, one loop changed
    "Broker._del_all_subscriptions": "615579810f47d1e0",  # replaced by an index walk
    "Broker._del_subscription": "415f349273b0552d",  # wrapped to keep the index
    "Broker.add_subscription": "07757b63113c395e",  # wrapped to keep the index
    "Broker._publish_retained_messages_for_subscription": "d6ad257821ba29ef",  # guarded
    "Broker._client_message_loop": "916c4647c3389918",  # logs repr(self._subscriptions)
    "Broker._handle_subscription": "3dae18afa195209e",  # calls add_subscription, then retained
    "Broker._run_broadcast": "e852128b3e38e04a",  # copied, the filters it walks changed
    "Broker._topic_filtering": "9259ae5e1dd3e20d",  # replaced: plugins asked in turn
    "Broker.retain_message": "6233eff2618baede",  # wrapped: watchers told after it
    "PluginManager.map_plugin_topic": "5e3f458992d50b21",  # what amqtt's version called
    "BrokerProtocolHandler.handle_read_timeout": "ffd79f12457f41e1",  # does nothing: _Silence
    "Broker._initialize_client_session": "5dd89158bbe46266",  # copied: CONNECT checked first
    "Broker._handle_message_delivery": "89727723da550bed",  # wrapped: calls _broadcast_message, no QoS
    "Broker._broadcast_message": "78ad4edb7efb3b72",  # wrapped: the PUBLISH's QoS passed on
    "Broker._handle_disconnect": "8c3b8702f3567055",  # publishes wills unchecked: checked at CONNECT
    "Broker._authenticate": "4d7db8cc6fe2c3f6",  # ignores its listener argument
    "Broker._client_connected": "432b724bc4fb7946",  # wrapped: its reader guarded; ends on AMQTTError
    "BrokerProtocolHandler.mqtt_connack_authorize": "4e64256ea1f5c73c",  # the refusal's CONNACK
    "BrokerProtocolHandler.init_from_connect": "036dc04c1133a18f",  # the session's fields from CONNECT
    "ProtocolHandler._init_session": "d8f6979793e163e9",  # keep_alive 0: no keepalive timeout at all
    "ProtocolHandler._reader_loop": "93f3b8e4483040d0",  # waits for a packet with the keepalive as timeout
    "ProtocolHandler._send_packet": "9f0ae4e325319652",  # a timer per packet sent, only with a keepalive
    "ProtocolHandler.handle_publish": "b8f1fd3212c7134e",  # wrapped per connection: QoS 2 flow bounded
    "ProtocolHandler._handle_qos2_message_flow": "f2d96f1fc4eca34f",  # an incoming QoS 2 kept in inflight_in
}


@pytest.mark.parametrize("name", sorted(REVIEWED))
def test_the_amqtt_internals_herald_patches_are_the_ones_reviewed(name: str):
    owner, method = name.split(".")
    where = {
        "PluginManager": amqtt.plugins.manager,
        "ProtocolHandler": amqtt.mqtt.protocol.handler,
    }.get(owner, amqtt.broker)
    source = inspect.getsource(getattr(getattr(where, owner), method))
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    assert digest == REVIEWED[name], f"amqtt's {name} changed: review broker/fixes.py against it"


def test_the_overridden_amqtt_methods_keep_their_signatures():
    for name in (
        "_client_connected",
        "_initialize_client_session",
        "_handle_message_delivery",
        "_broadcast_message",
        "_client_message_loop",
        "_handle_client_session",
        "_del_all_subscriptions",
        "_del_subscription",
        "add_subscription",
        "_publish_retained_messages_for_subscription",
        "_run_broadcast",
        "retain_message",
    ):
        ours = inspect.signature(getattr(HeraldBroker, name))
        theirs = inspect.signature(getattr(amqtt.broker.Broker, name))
        assert list(ours.parameters) == list(theirs.parameters), name


def test_watchers_see_every_retained_message_and_a_failing_one_stops_nothing(state: Path):
    """The serving process keeps its fleet view from these calls, not through a client."""
    seen: list[tuple[str, bytes]] = []

    def broken(topic: str, payload: bytes) -> None:
        raise RuntimeError("a watcher with a bug")

    async def scenario() -> list[tuple[str, bytes]]:
        watch = lambda topic, payload: seen.append((topic, payload))  # noqa: E731
        async with embedded(state, broken, watch) as url, client(url, state, ADMIN_USER) as admin:
            await admin.subscribe(T.every(Kind.STATE), qos=1)
            async with client(url, state, "alpha") as alpha:
                await alpha.publish(T.state("alpha"), b"one", qos=1, retain=True)
                await alpha.publish(T.state("alpha"), b"not kept", qos=1, retain=False)
                await alpha.publish(T.state("alpha"), b"", qos=1, retain=True)  # clears it
                await alpha.publish(T.state("beta"), b"forged", qos=1, retain=True)  # refused
            return await drain(admin, 2)

    delivered = run(scenario())
    assert seen == [(T.state("alpha"), b"one"), (T.state("alpha"), b"")]
    assert delivered == [(T.state("alpha"), b"one"), (T.state("alpha"), b"not kept"), (T.state("alpha"), b"")]


def test_subscriptions_are_forgotten_when_a_session_ends(state: Path):
    """The index of filters per session must not leak subscriptions of gone clients."""

    async def scenario():
        broker = EmbeddedBroker(Listener("127.0.0.1", 0), password_file=state / "broker" / "passwd")
        await broker.start()
        try:
            url = BrokerURL("127.0.0.1", broker.port)
            for _ in range(3):
                async with client(url, state, "alpha") as alpha:
                    await alpha.subscribe(T.desired("alpha"), qos=1)
                    await alpha.subscribe(T.command("alpha"), qos=1)
            inner = broker._broker
            assert inner is not None
            for _ in range(50):  # the broker ends the session just after the DISCONNECT
                if not inner._subscriptions:
                    break
                await asyncio.sleep(0.05)
            return dict(inner._subscriptions), dict(inner._filters_of)
        finally:
            await broker.stop()

    assert run(scenario()) == ({}, {})


def test_announcing_many_hosts_says_one_line(state: Path, caplog: pytest.LogCaptureFixture):
    """All announcements go out at once on purpose: no warning per waiting publish."""
    desired = desired_of(state, ["alpha"])["alpha"]
    many = {f"host{index:03d}": desired for index in range(50)}

    async def scenario() -> None:
        async with embedded(state) as url:
            await announce(many, url=url, password=secret(state, PUBLISHER_USER), topics=T)

    with caplog.at_level(logging.DEBUG):
        run(scenario())
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert warnings == []
