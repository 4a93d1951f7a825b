"""herald's MQTT side on a 3-node RabbitMQ 3.10 cluster (tests/rabbitmq.py), configured only by
`herald broker export --format rabbitmq`: the ACL matrix of the embedded broker holds on every
node; agents spread over the nodes converge; one node killed with SIGKILL while a publish is
announced, every agent still converges through another node and the fleet view stays complete.

One cluster for the module (starting it is most of the module's time). The test that kills a
node runs last.
"""

import json
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from brokers import Session, broker_secret, open_session
from helpers import (
    HERALD,
    Agent,
    Fleet,
    Serve,
    Watcher,
    current_generation,
    herald,
    make_agent,
    need_root,
    wait_until,
)
from rabbitmq import Cluster, Node, on_every_node, start_cluster, start_serve_on

from protocol.messages import Action, Command, Online, Phase, State, encode, now
from protocol.mqtt import parse_urls, rotation
from protocol.topics import ADMIN_USER, Topics

T = Topics()
AGENTS = 30
CONVERGE = 60.0  # seconds: every agent on the new generation after the node is killed
ROLLBACK = encode(Command(id="forged-rollback", action=Action.ROLLBACK, issued_at=now(), by="alpha"))
FORGED_STATE = encode(State(phase=Phase.IDLE, deployed_generation=999999, since=now(), message="forged"))


@dataclass
class Setup:
    root: Path
    cluster: Cluster
    fleet: Fleet
    state: Path
    logs: Path
    serve: Serve | None = None

    @property
    def server(self) -> Serve:
        assert self.serve is not None
        return self.serve

    def secret(self, user: str) -> str:
        return broker_secret(self.state, user)

    def brokers(self) -> list[str]:
        return [arg for url in self.cluster.urls for arg in ("--broker", url)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    need_root()
    root = tmp_path_factory.mktemp("rabbitmq")
    fleet = Fleet.create(root)
    for index in range(AGENTS - len(fleet.hosts)):
        fleet.add_host(f"host{index:02d}", root)
    state, logs = root / "state", root / "logs"
    logs.mkdir()
    published = herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--init")
    assert published.returncode == 0, published.stderr
    exported = herald(
        "broker",
        "export",
        "--format",
        "rabbitmq",
        "--state",
        str(state),
        "--fleet",
        str(fleet.root),
        str(root / "rmq"),
    )
    assert exported.returncode == 0, exported.stderr
    assert (root / "rmq" / "definitions.json").stat().st_mode & 0o777 == 0o600
    cluster = start_cluster(root / "cluster", (root / "rmq" / "rabbitmq.conf").read_text())
    try:
        assert cluster.running_nodes() == sorted(node.name for node in cluster.nodes)
        imported = cluster.ctl(cluster.nodes[0], "import_definitions", str(root / "rmq" / "definitions.json"))
        assert imported.returncode == 0, imported.stderr
        made = Setup(root, cluster, fleet, state, logs)
        wait_until(  # the import is asynchronous: the last host on the last node says it is done
            lambda: not connect(made, cluster.nodes[-1], fleet.hosts[-1]).refused, "definitions imported"
        )
        made.serve = start_serve_on(fleet, state, logs, cluster.urls)
        print(f"\nFIGURE rabbitmq cluster of {len(cluster.nodes)} started in {cluster.started_in:.1f}s")
        yield made
        made.server.stop()
    finally:
        cluster.stop()


# ---------------------------------------------------------------- one MQTT connection


def connect(
    setup: Setup,
    node: Node,
    user: str | None,
    password: str | None = None,
    *,
    will: tuple[str, bytes] | None = None,
    keepalive: int = 30,
) -> Session:
    return open_session(
        node.mqtt,
        user,
        password if password is not None else setup.secret(user) if user is not None else None,
        identifier=f"{user}.t{time.monotonic_ns()}",
        will=will,
        keepalive=keepalive,
        where=f" on {node.name}",
    )


def retained_on(setup: Setup, node: Node, topics: list[str]) -> dict[str, bytes]:
    """What an admin subscribing to each topic exactly gets as retained from `node`."""
    admin = connect(setup, node, ADMIN_USER)
    try:
        for topic in topics:
            admin.client.subscribe(topic, qos=1)
        marker = T.confirm(ADMIN_USER, str(time.monotonic_ns()))
        admin.client.subscribe(marker, qos=1)
        time.sleep(0.2)  # the SUBSCRIBEs are handled in order, before the marker's PUBLISH
        admin.client.publish(marker, b"1", qos=1)
        wait_until(lambda: any(m.topic == marker for m in admin.received), "marker")
        return {m.topic: m.payload for m in admin.received if m.retain and m.topic in topics}
    finally:
        admin.close()


# ---------------------------------------------------------------- the matrix


def test_anonymous_wrong_and_default_logins_are_refused_on_every_node(setup: Setup):
    for node in setup.cluster.nodes:
        assert connect(setup, node, None).refused
        assert connect(setup, node, "alpha", "not-the-secret").refused
        assert connect(setup, node, "alpha", setup.secret("beta")).refused
        assert connect(
            setup, node, "guest", "guest"
        ).refused  # RabbitMQ's default user: not in herald's vhost
        own = connect(setup, node, "alpha")
        assert not own.refused
        own.close()


def test_a_host_reads_its_own_desired_on_every_node_and_nothing_of_others(setup: Setup):
    for node in setup.cluster.nodes:  # the publisher announced on each: a host finds it wherever it is
        assert T.desired("alpha") in retained_on(setup, node, [T.desired("alpha")])
        own = connect(setup, node, "alpha")
        own.client.subscribe(T.desired("alpha"), qos=1)
        wait_until(lambda s=own: any(m.topic == T.desired("alpha") for m in s.received), "alpha's desired")
        own.close()
        for topic in (T.desired("beta"), T.command("beta"), "herald/+/desired", "herald/#", "#", "$SYS/#"):
            reader = connect(setup, node, "alpha")
            reader.client.subscribe(topic, qos=1)
            wait_until(lambda s=reader: s.closed, f"{topic} refused: the connection closed")
            assert reader.received == [], (node.name, topic, reader.received)
            reader.close()


def test_forged_publishes_reach_nobody_and_change_nothing_retained(setup: Setup):
    forged = [T.state("beta"), T.online("beta"), T.desired("beta"), T.desired("alpha"), T.command("beta")]
    before = {node.name: retained_on(setup, node, forged) for node in setup.cluster.nodes}
    first, *others = setup.cluster.nodes
    watcher = Watcher(others[0].url, setup.state)
    try:
        for node in setup.cluster.nodes:
            for topic in forged:
                forger = connect(setup, node, "alpha")
                forger.client.publish(topic, FORGED_STATE, qos=1, retain=True)
                wait_until(lambda s=forger: s.closed, f"{topic} refused: the connection closed")
                forger.close()
        genuine = connect(setup, first, "alpha")
        genuine.client.publish(T.state("alpha"), b"genuine", qos=1).wait_for_publish(10)
        genuine.close()
        watcher.wait_for(lambda: any(p == b"genuine" for _, _, p, _ in watcher.messages), "alpha's own state")
        watcher.marker()
        assert not [t for _, t, p, _ in watcher.messages if p == FORGED_STATE]
    finally:
        watcher.close()
    assert {node.name: retained_on(setup, node, forged) for node in setup.cluster.nodes} == before


WILLS = [
    (T.command("beta"), ROLLBACK),
    (T.state("beta"), FORGED_STATE),
    (T.online("beta"), encode(Online(online=False, at=now()))),
    (T.desired("beta"), b'{"generation": 999999}'),
    (T.desired("alpha"), b'{"generation": 999999}'),
    (T.command("alpha"), ROLLBACK),
    (T.state("beta"), b""),
    ("herald/+/command", ROLLBACK),
]


def test_a_hosts_will_on_a_topic_it_may_not_publish_is_never_published(setup: Setup):
    node = setup.cluster.nodes[1]
    topics = sorted({topic for topic, _ in WILLS if "+" not in topic})
    before = retained_on(setup, node, topics)
    watcher = Watcher(setup.cluster.nodes[0].url, setup.state)
    try:
        for topic, payload in WILLS:
            forger = connect(setup, node, "alpha", will=(topic, payload))
            if not forger.refused:  # RabbitMQ admits the CONNECT and drops the will when it fires
                forger.drop()
        # the control: a will on its own topic is published when its connection drops the same way
        control = connect(setup, node, "alpha", will=(T.online("alpha"), b"control"))
        control.drop()
        watcher.wait_for(lambda: any(p == b"control" for _, _, p, _ in watcher.messages), "the control will")
        watcher.marker()
        leaked = [(t, p) for _, t, p, _ in watcher.messages if (t, p) in WILLS]
        assert leaked == []
    finally:
        watcher.close()
    assert retained_on(setup, node, topics) == before


def test_a_silent_host_is_reported_offline_by_its_will(setup: Setup):
    keepalive = 2
    watcher = Watcher(setup.cluster.nodes[0].url, setup.state)
    try:
        silent = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"beta.silent{time.monotonic_ns()}")
        silent.username_pw_set("beta", setup.secret("beta"))
        silent.will_set(T.online("beta"), encode(Online(online=False, at=now())), qos=1, retain=True)
        silent.connect("127.0.0.1", setup.cluster.nodes[2].mqtt, keepalive=keepalive)
        wait_until(lambda: silent.loop(timeout=0.1) == 0 and silent.is_connected(), "silent client connected")
        silent.loop(timeout=0.3)
        went_silent = time.monotonic()  # from here on the client neither reads nor writes
        # Measured: RabbitMQ 3.10 fires the will about 3 x keepalive after the last packet
        # (5.8 s for 2 s, 14.8 s for 5 s), where MQTT 3.1.1 asks for 1.5 x.
        watcher.wait_for(
            lambda: any(not o.online for o in watcher.online("beta")),
            "beta's will",
            timeout=3 * keepalive + 3,
        )
        took = time.monotonic() - went_silent
        print(f"\nFIGURE rabbitmq will of a silent client, keepalive {keepalive}s: {took:.1f}s")
        assert took >= keepalive
        silent.socket().close()
    finally:
        watcher.close()


def test_retained_messages_stay_on_the_node_that_received_them_and_wildcards_get_none(setup: Setup):
    """RabbitMQ 3.10's own behaviour, which herald's multi-node design rests on: if this fails,
    the retained store changed (DEVELOPERS.md "RabbitMQ 3.10"), and herald may need less."""
    first, second, _ = setup.cluster.nodes
    user, topic = "gamma", T.online("gamma")
    pinned = connect(setup, first, user)
    pinned.client.publish(topic, b"pinned", qos=1, retain=True).wait_for_publish(10)
    pinned.close()
    assert retained_on(setup, first, [topic]).get(topic) == b"pinned"
    assert retained_on(setup, second, [topic]).get(topic) != b"pinned"
    wildcard = connect(setup, first, ADMIN_USER)
    wildcard.client.subscribe("herald/+/online", qos=1)
    wildcard.client.subscribe(topic, qos=1)  # its retained message comes after the wildcard's answer
    wait_until(lambda: any(m.topic == topic for m in wildcard.received if m.retain), "exact")
    wildcard.close()
    assert [(m.topic, m.payload) for m in wildcard.received if m.retain] == [(topic, b"pinned")]
    cleared = connect(setup, first, user)
    cleared.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(10)
    cleared.close()


# ---------------------------------------------------------------- agents, and a node killed


def status_json(setup: Setup, *, brokers: list[str]) -> dict[str, dict]:
    done = herald("status", "--json", "--state", str(setup.state), *brokers)
    assert done.returncode == 0, done.stderr
    return {row["host"]: row for row in json.loads(done.stdout)}


def page_json(setup: Setup) -> dict[str, dict]:
    with urllib.request.urlopen(f"{setup.server.http.rstrip('/')}/status.json", timeout=10) as answer:  # noqa: S310
        rows = json.loads(answer.read())
    return {row["host"]: row for row in rows}


def complete(rows: dict[str, dict], hosts: list[str], generation: int) -> list[str]:
    """The hosts whose row is not yet: online, idle, deployed and desired at `generation`."""
    return [
        host
        for host in hosts
        if not (
            host in rows
            and rows[host]["state"] is not None
            and rows[host]["state"]["deployed_generation"] == generation
            and (rows[host]["desired"] or {}).get("generation") == generation
            and (rows[host]["online"] or {}).get("online")
        )
    ]


def test_agents_spread_over_the_nodes_converge_and_follow_a_publish_through_a_node_killed(setup: Setup):
    cluster, hosts = setup.cluster, setup.fleet.hosts
    spread = Counter(str(rotation(parse_urls(cluster.urls), host)[0]) for host in hosts)
    assert len(spread) == len(cluster.nodes), spread  # every node has agents
    agents: list[Agent] = []
    for host in hosts:
        agent = make_agent(setup.fleet, host, setup.server, setup.root, broker=cluster.urls[0])
        on_every_node(agent.config, cluster.urls)
        agents.append(agent.start())
    try:
        for agent in agents:
            wait_until(lambda a=agent: a.deployed() == 1, f"{agent.host} at generation 1", timeout=180)
        wait_until(
            lambda: not complete(status_json(setup, brokers=setup.brokers()), hosts, 1), "status complete"
        )
        wait_until(lambda: not complete(page_json(setup), hosts, 1), "the page complete")

        victim = cluster.nodes[1]
        on_victim = [h for h in hosts if str(rotation(parse_urls(cluster.urls), h)[0]) == victim.url]
        watcher = Watcher(cluster.nodes[0].url, setup.state)
        for host in hosts:
            setup.fleet.edit(host, "files/etc/motd", "after the node was killed\n")
        publish = subprocess.Popen(
            [
                *HERALD,
                "publish",
                "--fleet",
                str(setup.fleet.root),
                "--state",
                str(setup.state),
                *setup.brokers(),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # the releases are written, the announcement is under way: the node dies now
        wait_until(lambda: all(current_generation(setup.state, h) == 2 for h in hosts), "releases written")
        cluster.kill(victim)
        killed = time.monotonic()
        _, err = publish.communicate(timeout=60)
        assert publish.returncode == 0, err
        took = {}
        for agent in agents:
            # The publish's own account of the announcement goes with a failure (which nodes took it).
            what = f"{agent.host} at generation 2 (publish said: {err.strip()[-2000:]})"
            wait_until(lambda a=agent: a.deployed() == 2, what, timeout=CONVERGE)
            took[agent.host] = time.monotonic() - killed
        slowest = max(took.values())
        wills = [h for h in on_victim if any(not o.online for o in watcher.online(h))]
        watcher.close()
        print(
            f"\nFIGURE rabbitmq node killed during a publish: {len(agents)} agents ({len(on_victim)} on it) "
            f"at generation 2 within {slowest:.1f}s; wills of its agents published: {len(wills)}"
        )
        survivors = [arg for node in cluster.nodes if node is not victim for arg in ("--broker", node.url)]
        wait_until(lambda: not complete(status_json(setup, brokers=survivors), hosts, 2), "status complete")
        wait_until(  # with the dead node named too: it is skipped, the others read
            lambda: not complete(status_json(setup, brokers=setup.brokers()), hosts, 2),
            "status with a dead node",
        )
        wait_until(lambda: not complete(page_json(setup), hosts, 2), "the page complete after the kill")
    finally:
        for agent in agents:
            agent.stop()
