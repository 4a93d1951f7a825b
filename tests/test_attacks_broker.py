"""Attacks on the MQTT side, each tried on both brokers: the embedded amqtt (herald serve) and a
real Mosquitto started from `herald broker export` (the `broker` fixture of test_broker_matrix).

Every test is one attack by one actor of SECURITY.md. It asserts that the attack was delivered
(the broker read the CONNECT and answered it, the publish was acknowledged, the connection was
dropped without DISCONNECT) and that it had no effect: nothing reached another host, nothing
retained changed, no agent acted.
"""

import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokers import Broker, Session, open_session
from helpers import Fleet, Serve, Watcher, make_agent, start_serve, wait_until

from protocol.credentials import Secret
from protocol.messages import Action, Command, Online, Phase, State, encode, now
from protocol.mqtt import client_id
from protocol.topics import ADMIN_USER, PUBLISHER_USER, Topics

T = Topics()
ROLLBACK = encode(Command(id="forged-rollback", action=Action.ROLLBACK, issued_at=now(), by="alpha"))
FORGED_STATE = encode(State(phase=Phase.IDLE, deployed_generation=999999, since=now(), message="forged"))


def session(
    broker: Broker,
    user: str | None,
    *,
    password: str | None = None,
    identifier: str | None = None,
    will: tuple[str, bytes] | None = None,
    subscribe: tuple[str, ...] = (),
    qos: int = 1,
) -> Session:
    """Connect (and subscribe) as `user`; returns once the broker answered the CONNECT."""
    return open_session(
        broker.port,
        user,
        password if password is not None else broker.secret(user) if user is not None else None,
        identifier=identifier or f"{user}.{time.monotonic_ns()}",
        will=will,
        subscribe=subscribe,
        qos=qos,
    )


@pytest.fixture
def watcher(broker: Broker) -> Iterator[Watcher]:
    client = Watcher(broker.url, broker.state)
    client.wait_for(lambda: all(client.desired(h) for h in ("alpha", "beta", "gamma")), "retained desired")
    yield client
    client.close()


def retained(broker: Broker, topics: tuple[str, ...]) -> dict[str, bytes]:
    """What a fresh admin subscription receives as retained, per topic."""
    fresh = Watcher(broker.url, broker.state)
    try:
        fresh.marker()
        return {t: p for _, t, p, is_retained in fresh.messages if is_retained and t in topics}
    finally:
        fresh.close()


# ---------------------------------------------------------------- last wills

FOREIGN_WILLS = [
    pytest.param((T.command("beta"), ROLLBACK), id="another-hosts-command"),
    pytest.param((T.state("beta"), FORGED_STATE), id="another-hosts-state"),
    pytest.param((T.online("beta"), encode(Online(online=False, at=now()))), id="another-hosts-online"),
    pytest.param((T.desired("beta"), b'{"generation": 999999}'), id="another-hosts-desired"),
    pytest.param((T.desired("alpha"), b'{"generation": 999999}'), id="its-own-desired"),
    pytest.param((T.command("alpha"), ROLLBACK), id="its-own-command"),
    pytest.param((T.state("beta"), b""), id="clearing-another-hosts-state"),
    pytest.param(("herald/+/command", ROLLBACK), id="a-wildcard-topic"),
    pytest.param(("$SYS/broker/herald", b"x"), id="a-sys-topic"),
]


@pytest.mark.parametrize("will", FOREIGN_WILLS)
def test_a_hosts_will_on_a_topic_it_may_not_publish_is_never_published(
    broker: Broker,
    watcher: Watcher,
    will: tuple[str, bytes],
):
    """Actor: a compromised host (alpha), with its own password. It connects with a retained
    last will on a topic it may not publish, then drops the connection without DISCONNECT."""
    topic = will[0]
    watched = (T.command("beta"), T.state("beta"), T.online("beta"), T.desired("beta"), T.desired("alpha"))
    before = retained(broker, watched)
    watcher.marker()
    seen = len(watcher.messages)

    attacker = session(broker, "alpha", will=will)
    # The embedded broker refuses the CONNECT: the attack reached it and was answered. Mosquitto
    # admits most of them (it must then drop the will when it fires) and closes on invalid topics.
    assert attacker.refused or broker.kind == "mosquitto"
    if not attacker.refused:
        attacker.drop()
    # The same connection with a will on alpha's own `online` fires: the broker did fire wills.
    control = session(broker, "alpha", will=(T.online("alpha"), encode(Online(online=False, at=now()))))
    assert not control.refused
    control.drop()
    watcher.wait_for(
        lambda: any(t == T.online("alpha") for _, t, _, _ in watcher.messages[seen:]), "alpha's own will"
    )
    watcher.marker()
    arrived = [t for _, t, _, _ in watcher.messages[seen:] if "/_confirm/" not in t]
    assert arrived == [T.online("alpha")], f"will on {topic} was published"
    assert retained(broker, watched) == before


def test_a_forged_rollback_will_never_reaches_the_other_hosts_agent(
    broker: Broker,
    fleet: Fleet,
    tmp_path,
):
    """Actor: a compromised host (alpha). Its will is a retained rollback on beta's `command`;
    beta's real agent is connected and would execute a rollback delivered to it."""
    agent = make_agent(fleet, "beta", broker.server, tmp_path, broker=broker.url).start()
    watcher = Watcher(broker.url, broker.state)
    try:
        watcher.wait_state("beta", lambda s: s.deployed_generation == 1 and s.phase is Phase.IDLE, "deployed")
        attacker = session(broker, "alpha", will=(T.command("beta"), ROLLBACK))
        if not attacker.refused:
            attacker.drop()
        # A genuine command sent after the attack arrives and runs: beta listened all along.
        genuine = encode(Command(id="genuine-check", action=Action.CHECK, issued_at=now(), by="test"))
        admin = session(broker, ADMIN_USER)
        admin.client.publish(T.command("beta"), genuine, qos=1, retain=True).wait_for_publish(10)
        admin.close()
        assert agent.proc is not None
        wait_until(lambda: "command genuine-check: check" in agent.proc.output(), "beta ran the genuine one")
        assert "forged-rollback" not in agent.proc.output()
        assert [record["args"][0] for record in agent.rebuilds()] == ["boot"]  # beta's first deployment only
    finally:
        watcher.close()
        agent.stop()


# ---------------------------------------------------------------- client ids and sessions


def agent_id(broker: Broker, host: str) -> str:
    """The client id `host`'s agent connects with."""
    return client_id(host, "agent", Secret(broker.secret(host)))


@pytest.mark.parametrize(
    ("who", "password_of", "identifier"),
    [
        pytest.param(None, None, "victim", id="no-password"),
        pytest.param("beta", "wrong", "victim", id="wrong-password"),
        pytest.param("alpha", "alpha", "victim", id="another-users-valid-password"),
        pytest.param("alpha", "alpha", "herald-agent-beta", id="the-old-predictable-id"),
        pytest.param("alpha", "alpha", "beta", id="the-host-name-as-id"),
        pytest.param("alpha", "alpha", "beta.agent", id="a-guessed-id"),
    ],
)
def test_no_login_takes_over_another_hosts_session(
    broker: Broker,
    who: str | None,
    password_of: str | None,
    identifier: str,
):
    """Actor: a stranger on the network (no or a wrong password), or a compromised host (alpha,
    with its own valid password). It connects with the client id of beta's live session, or an id
    it could guess; beta must stay connected and subscribed.

    One case is a known limit of Mosquitto, which binds client ids to nobody: a valid login that
    names a live session's id takes it over. That is why an agent's id is derived from its own
    broker secret (protocol.mqtt.client_id): on Mosquitto, another host can try only the ids it
    can guess (the other cases), not this one. The test asserts the takeover there, so that a
    Mosquitto that starts refusing it is noticed and SECURITY.md's row made stronger."""
    victim = session(
        broker, "beta", identifier=agent_id(broker, "beta"), subscribe=(T.desired("beta"), T.command("beta"))
    )
    try:
        wait_until(
            lambda: any(m.topic == T.desired("beta") for m in victim.received), "beta's retained desired"
        )
        if identifier == "victim":
            identifier = agent_id(broker, "beta")
        wrong = password_of not in ("alpha", "beta")
        password = password_of if wrong else broker.secret(password_of)
        attacker = session(broker, who, password=password, identifier=identifier)
        if broker.kind == "embedded" or wrong:
            assert attacker.refused  # delivered and answered: refused
        if broker.kind == "mosquitto" and not wrong and identifier == agent_id(broker, "beta"):
            wait_until(lambda: victim.closed, "Mosquitto: the victim taken over")
            attacker.close()
            return
        attacker.close()
        # beta is still connected and still subscribed: a new command reaches it.
        admin = session(broker, ADMIN_USER)
        marker = encode(Command(id=f"after-{time.monotonic_ns()}", action=Action.CHECK, issued_at=now()))
        admin.client.publish(T.command("beta"), marker, qos=1, retain=True).wait_for_publish(10)
        admin.close()
        wait_until(
            lambda: any(m.payload == marker for m in victim.received), "beta still receives its command"
        )
        assert victim.client.is_connected()
        assert not victim.closed
    finally:
        victim.close()


# ---------------------------------------------------------------- subscriptions and retained deletes


def test_a_host_subscribing_to_wildcards_and_sys_learns_nothing_of_others(
    broker: Broker,
    watcher: Watcher,
):
    """Actor: a compromised host (alpha). It subscribes to every wildcard and $SYS filter,
    then other hosts and the admin send their own messages."""
    filters = (
        "#",
        "+/#",
        "+/+/+",
        "herald/#",
        "herald/+/state",
        "herald/+/command",
        "herald/beta/#",
        "$SYS/#",
    )
    spy = session(broker, "alpha", subscribe=filters)
    try:
        beta = session(broker, "beta")
        beta.client.publish(
            T.state("beta"), FORGED_STATE.replace(b"forged", b"beta's"), qos=1
        ).wait_for_publish(10)
        beta.close()
        admin = session(broker, ADMIN_USER)
        check = encode(Command(id="for-beta", action=Action.CHECK, issued_at=now()))
        admin.client.publish(T.command("beta"), check, qos=1, retain=True).wait_for_publish(10)
        admin.close()
        watcher.wait_for(
            lambda: any(t == T.command("beta") for _, t, _, _ in watcher.messages), "beta's command"
        )
        watcher.marker()
        time.sleep(0.3)  # what was routed before the marker has arrived; a little more for alpha's socket
        leaked = [m.topic for m in spy.received if not m.topic.startswith("herald/alpha/")]
        assert leaked == []
        if broker.kind == "embedded":
            assert all(code >= 0x80 for code in spy.granted[0])  # refused outright
    finally:
        spy.close()


def test_a_host_cannot_clear_another_hosts_retained_messages(
    broker: Broker,
    watcher: Watcher,
):
    """Actor: a compromised host (alpha). It publishes empty retained payloads, which would
    delete a retained message, on every topic of beta and on its own desired and command."""
    watcher.wait_for(lambda: watcher.desired("beta"), "beta's desired")
    admin = session(broker, ADMIN_USER)
    check = encode(Command(id="kept", action=Action.CHECK, issued_at=now()))
    admin.client.publish(T.command("beta"), check, qos=1, retain=True).wait_for_publish(10)
    admin.close()
    beta = session(broker, "beta")
    beta.client.publish(
        T.state("beta"), FORGED_STATE.replace(b"forged", b"kept"), qos=1, retain=True
    ).wait_for_publish(10)
    beta.close()
    topics = (T.desired("beta"), T.command("beta"), T.state("beta"), T.desired("alpha"))
    wait_until(lambda: len(retained(broker, topics)) == len(topics), "the retained messages")
    before = retained(broker, topics)

    alpha = session(broker, "alpha")
    for topic in (*topics, T.command("alpha"), T.online("beta")):
        info = alpha.client.publish(topic, b"", qos=1, retain=True)
        info.wait_for_publish(10)
        assert info.is_published()  # acknowledged by the broker: the delete was delivered
    alpha.close()
    assert retained(broker, topics) == before


def test_a_qos0_message_is_delivered_at_qos0_to_a_qos2_subscriber(broker: Broker):
    """MQTT 3.1.1 (3.8.4): the lower of the publish's and the subscription's QoS. A broker that
    upgraded QoS 0 to 2 would make every host's state cost four packets to each admin."""
    admin = session(broker, ADMIN_USER, subscribe=(T.state("alpha"),), qos=2)
    try:
        alpha = session(broker, "alpha")
        alpha.client.publish(T.state("alpha"), b"at qos 0", qos=0).wait_for_publish(10)
        alpha.client.publish(T.state("alpha"), b"at qos 1", qos=1).wait_for_publish(10)
        alpha.close()
        wait_until(
            lambda: len([m for m in admin.received if not m.payload.startswith(b"{")]) == 2, "both messages"
        )
        by_payload = {m.payload: m.qos for m in admin.received}
        assert by_payload[b"at qos 0"] == 0
        assert by_payload[b"at qos 1"] == 1
    finally:
        admin.close()


def test_the_publisher_user_cannot_command_hosts_nor_the_admin_publish_releases(
    broker: Broker,
    watcher: Watcher,
):
    """Actor: a leaked service secret. The publisher may write `desired` only, the admin
    `command` only; neither may write a host's `state`."""
    seen = len(watcher.messages)
    publisher = session(broker, PUBLISHER_USER)
    publisher.client.publish(T.command("beta"), ROLLBACK, qos=1, retain=True).wait_for_publish(10)
    publisher.client.publish(T.state("beta"), FORGED_STATE, qos=1, retain=True).wait_for_publish(10)
    publisher.close()
    admin = session(broker, ADMIN_USER)
    admin.client.publish(T.desired("beta"), b'{"generation": 999999}', qos=1, retain=True).wait_for_publish(
        10
    )
    admin.client.publish(T.state("beta"), FORGED_STATE, qos=1, retain=True).wait_for_publish(10)
    admin.close()
    watcher.marker()
    assert [t for _, t, _, _ in watcher.messages[seen:] if "/_confirm/" not in t] == []


def test_a_host_cannot_make_the_broker_hold_a_huge_message(broker: Broker, watcher: Watcher):
    """Actor: a compromised host (alpha). It publishes a retained 1 MiB state, which a broker
    would keep in memory and send to every admin and to the fleet view; herald's payloads are
    at most 64 KiB. The broker drops the connection and keeps nothing."""
    seen = len(watcher.messages)
    alpha = session(broker, "alpha")
    alpha.client.publish(T.state("alpha"), b"x" * (1 << 20), qos=1, retain=True)
    wait_until(lambda: alpha.closed, "the broker dropped alpha")  # it read the packet's header
    alpha.close()
    watcher.marker()
    assert [t for _, t, _, _ in watcher.messages[seen:] if "/_confirm/" not in t] == []
    assert T.state("alpha") not in retained(broker, (T.state("alpha"),))
    small = session(broker, "alpha")  # and a normal message still goes through
    small.client.publish(T.state("alpha"), b"y" * 60_000, qos=1).wait_for_publish(10)
    small.close()
    watcher.wait_for(lambda: any(p == b"y" * 60_000 for _, _, p, _ in watcher.messages), "a 60 kB message")


# ---------------------------------------------------------------- connections and memory, embedded broker
# Mosquitto has its own limits for these (max_connections, max_inflight_messages, a CONNECT
# timeout of its own); the embedded broker shares its process with the SFTP server, so one
# peer holding its descriptors or memory would take every host's SFTP down with it.

NOFILE = ("prlimit", "--nofile=256:256")
KiB = 1 << 10


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">H", len(data)) + data


def _remaining(n: int) -> bytes:
    out = b""
    while True:
        byte, n = n % 128, n // 128
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


def raw_connect(port: int, user: str, password: str, identifier: str) -> socket.socket:
    """A CONNECT written by hand (keepalive 0: never dropped for silence); CONNACK accepted."""
    body = _string("MQTT") + bytes([4, 0xC2]) + struct.pack(">H", 0)
    body += _string(identifier) + _string(user) + _string(password)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"\x10" + _remaining(len(body)) + body)
    assert sock.recv(4) == b"\x20\x02\x00\x00", "CONNACK: accepted"
    return sock


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * KiB
    raise AssertionError("no VmRSS")


@pytest.fixture
def small_serve(fleet: Fleet, state: Path, logs: Path) -> Iterator[Serve]:
    """`herald serve` with 256 descriptors, hard limit too (systemd's default soft limit is 1024)."""
    server = start_serve(fleet, state, logs, wrap=NOFILE)
    yield server
    server.stop()


def test_a_strangers_idle_connections_do_not_lock_the_fleet_out_of_the_broker(
    fleet: Fleet, state: Path, small_serve: Serve
):
    """Actor: a stranger on the network, no credentials. It opens 300 TCP connections to the
    broker and never sends CONNECT: amqtt waited for one for ever, with no cap, in the process
    whose descriptors also serve every host's SFTP. A host connected before keeps its session,
    the admin and a host connect afresh, and the idle sockets are closed by the broker."""
    port = int(small_serve.mqtt.rsplit(":", 1)[1])
    alpha = raw_connect(port, "alpha", small_serve_secret(state, "alpha"), "alpha.before")
    held: list[socket.socket] = []
    try:
        for _ in range(300):
            try:
                held.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                break
        assert len(held) >= 100  # delivered: the connections were made
        Watcher(small_serve.mqtt, state).close()  # the admin connects
        beta = raw_connect(port, "beta", small_serve_secret(state, "beta"), "beta.after")
        beta.close()
        alpha.sendall(b"\xc0\x00")  # PINGREQ on the connection made before
        assert alpha.recv(2) == b"\xd0\x00"  # PINGRESP: still served
        assert len(os.listdir(f"/proc/{small_serve.proc.pid}/fd")) < 256

        def closed_by_the_broker() -> bool:
            for sock in held:
                sock.settimeout(0)
                try:
                    if sock.recv(1) != b"":
                        return False
                except BlockingIOError:
                    return False
                except OSError:
                    pass
            return True

        wait_until(closed_by_the_broker, "every idle connection closed (no CONNECT within 10 s)", timeout=20)
    finally:
        alpha.close()
        for sock in held:
            sock.close()


def small_serve_secret(state: Path, host: str) -> str:
    return (state / "chroot" / host / "credentials" / "broker.secret").read_text().strip()


def test_a_host_cannot_open_connections_without_bound(fleet: Fleet, state: Path, serve: Serve):
    """Actor: a compromised host (alpha), with its own secret. Each connection is a descriptor
    of the process that serves every host; a host needs two or three. alpha opens 40 with ids
    of its own: past 32 they are refused (one log line), and beta still connects."""
    port = int(serve.mqtt.rsplit(":", 1)[1])
    secret = small_serve_secret(state, "alpha")
    held: list[socket.socket] = []
    refused = 0
    try:
        for index in range(40):
            try:
                held.append(raw_connect(port, "alpha", secret, f"alpha.flood{index}"))
            except AssertionError:
                refused += 1
        assert len(held) == 32  # delivered: 32 admitted
        assert refused == 8
        raw_connect(port, "beta", small_serve_secret(state, "beta"), "beta.other").close()
        assert "has 32 connections already" in serve.proc.output()
    finally:
        for sock in held:
            sock.close()
    # The count falls as they close: alpha connects again.
    wait_until(lambda: _admitted(port, secret), "alpha admitted again once its connections closed")


def _admitted(port: int, secret: str) -> bool:
    try:
        raw_connect(port, "alpha", secret, f"alpha.again{time.monotonic_ns()}").close()
    except AssertionError:
        return False
    return True


def test_a_host_cannot_make_the_broker_hold_unreleased_qos2_messages(state: Path, serve: Serve):
    """Actor: a compromised host (alpha). It publishes 200 QoS 2 messages of 250 KiB on its own
    state and never sends PUBREL: amqtt kept each, for as long as the connection lived (16 GiB
    possible a connection). herald never publishes at QoS 2: past 16 waiting, the connection ends."""
    port = int(serve.mqtt.rsplit(":", 1)[1])
    sock = raw_connect(port, "alpha", small_serve_secret(state, "alpha"), "alpha.qos2")
    before = rss(serve.proc.pid)
    payload = b"q" * (250 * KiB)
    body_of = lambda packet_id: _string(T.state("alpha")) + struct.pack(">H", packet_id) + payload  # noqa: E731
    sent = 0
    try:
        for packet_id in range(1, 201):
            body = body_of(packet_id)
            sock.sendall(b"\x34" + _remaining(len(body)) + body)  # PUBLISH, QoS 2
            sent += 1
    except OSError:
        pass  # the broker ended the connection
    finally:
        sock.close()
    assert sent >= 17  # delivered: more than the broker keeps
    wait_until(lambda: "QoS 2 messages wait for their PUBREL" in serve.proc.output(), "the connection ended")
    assert rss(serve.proc.pid) - before < 16 << 20
