"""`herald broker export --format rabbitmq|emqx` says what broker.acl says, for every user; the
fleet view merges what several nodes hold.

EMQX is not installable here, so its files are read back by a small evaluator of EMQX's file
authorization (first match wins, `${username}` expanded, `all` for every user) and compared with
broker.acl over a matrix of users, topics and actions. RabbitMQ's topic permissions are compared
the same way, as RabbitMQ applies them to routing keys; tests/test_rabbitmq.py runs them on a
real cluster. The exported hashes must verify each user's secret, and nothing else.
"""

import base64
import hashlib
import json
import re
from datetime import timedelta
from pathlib import Path

import pytest
from brokers import broker_secret
from helpers import Fleet, herald

from broker.acl import covers, matches, may_publish, may_subscribe
from herald.fleet import FleetView
from protocol.messages import Online, Phase, State, encode, now
from protocol.topics import ADMIN_USER, PUBLISHER_USER, SERVICE_USERS, Topics

T = Topics()
USERS = (*SERVICE_USERS, "alpha", "beta")
KINDS = ("desired", "command", "state", "online")
TOPICS = [
    *(f"herald/{host}/{kind}" for host in ("alpha", "beta", "gamma") for kind in KINDS),
    "herald/alpha/desired/x",
    "herald/_confirm/herald-publisher/n1",
    "herald/_confirm/herald-admin/n1",
    "herald/_confirm/alpha/n1",
    "other/alpha/state",
]
FILTERS = [*TOPICS, "herald/+/desired", "herald/+/state", "herald/#", "#", "herald/alpha/+", "+/alpha/state"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("export")
    fleet = Fleet.create(root)
    state = root / "state"
    published = herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--init")
    assert published.returncode == 0, published.stderr
    out = {}
    for kind in ("rabbitmq", "emqx"):
        done = herald(
            "broker",
            "export",
            "--state",
            str(state),
            "--fleet",
            str(fleet.root),
            "--format",
            kind,
            str(root / kind),
        )
        assert done.returncode == 0, done.stderr
        out[kind] = root / kind
    return state, out["rabbitmq"], out["emqx"]


# ---------------------------------------------------------------- EMQX


_TERM = re.compile(
    r'^\{(allow|deny), (all|\{username, "([^"]+)"\})(?:, (publish|subscribe|all), \[(.*)\])?\}\.$'
)


def emqx_rules(text: str) -> list[tuple[str, str | None, str, list[str]]]:
    """(permission, user or None for all, action, topics) per line of acl.conf."""
    parsed = []
    for line in text.splitlines():
        if not line or line.startswith("%%"):
            continue
        match = _TERM.match(line)
        assert match is not None, f"acl.conf: not a rule EMQX reads: {line}"
        permission, _, user, action, topics = match.groups()
        parsed.append((permission, user, action or "all", json.loads(f"[{topics}]") if topics else ["#"]))
    return parsed


def emqx_allows(
    rules: list[tuple[str, str | None, str, list[str]]], user: str, action: str, topic: str
) -> bool:
    for permission, who, acts, patterns in rules:
        if who not in (None, user) or acts not in ("all", action):
            continue
        expanded = [pattern.replace("${username}", user) for pattern in patterns]
        hit = any((covers if action == "subscribe" else matches)(pattern, topic) for pattern in expanded)
        if hit:
            return permission == "allow"
    return False


def test_emqx_acl_decides_every_publish_and_subscribe_as_herald_does(exported: tuple[Path, Path, Path]):
    rules = emqx_rules((exported[2] / "acl.conf").read_text())
    assert rules[-1][:2] == ("deny", None)  # and nothing falls through to EMQX's no_match
    for user in USERS:
        for topic in TOPICS:
            assert emqx_allows(rules, user, "publish", topic) == may_publish(user, topic, T), (user, topic)
        for topic_filter in FILTERS:
            expected = may_subscribe(user, topic_filter, T)
            assert emqx_allows(rules, user, "subscribe", topic_filter) == expected, (user, topic_filter)
    assert emqx_allows(rules, "alpha", "publish", "herald/alpha/state")  # the matrix is not all "no"


def test_emqx_users_verify_their_own_secret_only(exported: tuple[Path, Path, Path]):
    state, _, emqx = exported
    users = json.loads((emqx / "users.json").read_text())
    assert (emqx / "users.json").stat().st_mode & 0o777 == 0o600
    assert {user["user_id"] for user in users} >= set(USERS)
    for user in users:
        name = user["user_id"]
        assert user["is_superuser"] is False
        check = lambda s, u=user: hashlib.sha256(u["salt"].encode() + s.encode()).hexdigest()  # noqa: E731
        assert check(broker_secret(state, name)) == user["password_hash"]
        other = "beta" if name != "beta" else "alpha"
        assert check(broker_secret(state, other)) != user["password_hash"]
    conf = (emqx / "emqx.conf").read_text()
    assert "salt_position = prefix" in conf
    assert str((emqx / "acl.conf").resolve()) in conf


# ---------------------------------------------------------------- RabbitMQ


def routing_key(topic: str) -> str:
    """What RabbitMQ's MQTT plugin checks: `/` and `.` swapped, `+` as `*` (a binding key)."""
    swapped = topic.translate(str.maketrans({"/": ".", ".": "/"}))
    return ".".join("*" if level == "+" else level for level in swapped.split("."))


def test_rabbitmq_topic_permissions_decide_as_herald_does(exported: tuple[Path, Path, Path]):
    definitions = json.loads((exported[1] / "definitions.json").read_text())
    assert (exported[1] / "definitions.json").stat().st_mode & 0o777 == 0o600
    permissions = {entry["user"]: entry for entry in definitions["topic_permissions"]}
    for user in USERS:
        entry = permissions[user]
        assert entry["exchange"] == "amq.topic"

        def allowed(regex: str, key: str, u: str = user) -> bool:
            return bool(regex) and re.search(regex.replace("{username}", re.escape(u)), key) is not None

        for topic in TOPICS:
            assert allowed(entry["write"], routing_key(topic)) == may_publish(user, topic, T), (user, topic)
        for topic_filter in FILTERS:
            expected = may_subscribe(user, topic_filter, T)
            assert allowed(entry["read"], routing_key(topic_filter)) == expected, (user, topic_filter)
    conf = (exported[1] / "rabbitmq.conf").read_text()
    assert "mqtt.allow_anonymous = false" in conf


def test_rabbitmq_hashes_verify_their_own_secret_only(exported: tuple[Path, Path, Path]):
    state = exported[0]
    definitions = json.loads((exported[1] / "definitions.json").read_text())
    users = {user["name"]: user for user in definitions["users"]}
    assert set(users) >= set(USERS)
    assert all(user["tags"] == [] for user in users.values())  # no administrator, no management
    for name in USERS:
        stored = base64.b64decode(users[name]["password_hash"])
        salt, digest = stored[:4], stored[4:]
        assert hashlib.sha256(salt + broker_secret(state, name).encode()).digest() == digest
        other = ADMIN_USER if name != ADMIN_USER else PUBLISHER_USER
        assert hashlib.sha256(salt + broker_secret(state, other).encode()).digest() != digest


# ---------------------------------------------------------------- reading several nodes


def test_merging_nodes_keeps_the_newest_message_and_a_clock_far_ahead_never_wins():
    """On a cluster each node keeps its own retained messages: the fleet view takes the newest
    of each topic. A host that once published times far ahead must not pin its row to that."""
    view = FleetView(Topics())
    honest_then = now() - timedelta(minutes=2)
    old = State(phase=Phase.IDLE, deployed_generation=1, since=honest_then)
    new = State(phase=Phase.IDLE, deployed_generation=2, since=now())
    assert view.offer("herald/alpha/state", encode(new))
    assert not view.offer("herald/alpha/state", encode(old))  # the node alpha left: older, ignored
    assert view.hosts["alpha"].state.deployed_generation == 2

    ahead = now() + timedelta(days=365)
    pinned = State(phase=Phase.APPLYING, deployed_generation=1, since=ahead)
    view.offer("herald/beta/state", encode(pinned))
    view.offer("herald/beta/online", encode(Online(online=True, at=ahead)))
    assert view.offer("herald/beta/state", encode(new))  # the honest one replaces it
    assert view.offer("herald/beta/online", encode(Online(online=True, at=now())))
    assert view.hosts["beta"].state.phase is Phase.IDLE
    assert view.hosts["beta"].is_online(now())
    assert not view.offer("herald/beta/state", encode(pinned))  # and it never wins again
