"""herald's rules for a RabbitMQ 3.10 cluster with its MQTT plugin: `herald broker export --format rabbitmq`.

    OUTDIR/definitions.json  users, a vhost of their own, resource and topic permissions
                             (0600: it holds password hashes); `rabbitmqctl import_definitions`
    OUTDIR/rabbitmq.conf     the MQTT plugin's lines to add to every node's rabbitmq.conf

RabbitMQ cannot check Mosquitto's `$7$` hashes, so the export reads each user's secret itself
(STATE is root's) and writes RabbitMQ's own hash of it (`rabbit_password_hashing_sha256`: a
4-byte salt, then SHA-256 of salt and secret; the secrets are 256 random bits, so a fast hash is
enough, as in protocol.credentials).

Topic permissions are regular expressions over AMQP routing keys, where the MQTT plugin has
swapped `/` and `.` (`herald/alpha/state` is `herald.alpha.state`); a subscription's filter is
checked as its binding key (`herald/+/state` is `herald.*.state`). Each broker.acl rule becomes
one alternative: `+` a level of any name, `#` the rest, and `%u` RabbitMQ's `{username}`, so
every host has the same rules as Mosquitto's `pattern` lines. Resource permissions have no such
expansion and are written per user: its own subscription queues (`mqtt-subscription-<client
id>qos<n>`, whose id starts with `<user>.`, protocol.mqtt.client_id) and `amq.topic`.
"""

import base64
import hashlib
import json
import re
import secrets
from pathlib import Path
from typing import Final

from broker.acl import Access, Rule, rules
from broker.export import GENERATED, broker_users, plain_secret
from protocol.credentials import Secret
from protocol.files import write_atomic
from protocol.topics import SERVICE_USERS, Topics

VHOST: Final = "herald"
EXCHANGE: Final = "amq.topic"
HASHING: Final = "rabbit_password_hashing_sha256"
NOTHING: Final = ""  # RabbitMQ's permission that matches no name


def password_hash(secret: Secret, *, salt: bytes | None = None) -> str:
    """RabbitMQ's stored form of a password: base64(salt + sha256(salt + password))."""
    salt = salt if salt is not None else secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + secret.reveal().encode()).digest()).decode()


def routing_key_regex(pattern: str, user: str | None = None) -> str:
    """An MQTT filter of broker.acl (`%u` for the user) as a regex over AMQP routing keys and
    binding keys; with `user` None, `%u` stays RabbitMQ's `{username}`."""
    out: list[str] = []
    for level in pattern.split("/"):
        if level == "#":
            return "^" + r"\.".join(out) + r"(\..*)?$"
        if level == "+":
            out.append(r"[^.]*")
        elif level == "%u":
            out.append("{username}" if user is None else re.escape(user))
        else:
            out.append(re.escape(level.replace(".", "/")))
    return "^" + r"\.".join(out) + "$"


def _either(regexes: list[str]) -> str:
    return "|".join(f"(?:{regex})" for regex in regexes) if regexes else NOTHING


def topic_permission(user: str, topics: Topics, *, expand: bool) -> dict[str, str]:
    """The user's topic permission on amq.topic; with `expand`, `%u` as `{username}`."""
    found: dict[Access, list[str]] = {Access.READ: [], Access.WRITE: []}
    rule: Rule
    for rule in rules(user, topics):
        found[rule.access].append(routing_key_regex(rule.pattern, None if expand else user))
    return {
        "user": user,
        "vhost": VHOST,
        "exchange": EXCHANGE,
        "write": _either(found[Access.WRITE]),
        "read": _either(found[Access.READ]),
    }


def resource_permission(user: str) -> dict[str, str]:
    queues = rf"mqtt-subscription-{re.escape(user)}\..*"
    both = rf"^(?:{re.escape(EXCHANGE)}|{queues})$"
    return {"user": user, "vhost": VHOST, "configure": f"^{queues}$", "write": both, "read": both}


def definitions(state: Path, topics: Topics, hosts: list[str] | None = None) -> dict[str, object]:
    users = broker_users(state, hosts)
    return {
        "users": [
            {
                "name": user.name,
                "password_hash": password_hash(plain_secret(state, user)),
                "hashing_algorithm": HASHING,
                "tags": [],
                "limits": {},
            }
            for user in users
        ],
        "vhosts": [{"name": VHOST}],
        "permissions": [resource_permission(user.name) for user in users],
        "topic_permissions": [
            # hosts share one pattern ({username}); the service users' rules name them
            topic_permission(user.name, topics, expand=user.name not in SERVICE_USERS)
            for user in users
        ],
    }


def rabbitmq_conf() -> str:
    return f"""\
# herald: {GENERATED}.
# Add to every node's rabbitmq.conf (and enable the plugin: rabbitmq-plugins enable rabbitmq_mqtt),
# with a listener of your own, e.g. mqtt.listeners.ssl.default = 8883 and ssl_options.*.
mqtt.allow_anonymous = false
# herald's users have permissions in this vhost only; on a cluster whose other MQTT clients use
# another vhost, map herald's listener to it instead (the mqtt_port_to_vhost_mapping parameter).
mqtt.vhost = {VHOST}
mqtt.exchange = {EXCHANGE}
# Retained messages stay on the node that received them (RabbitMQ 3.10): herald announces on
# every node it is given, and reads every node (README: "Past one machine").
mqtt.retained_message_store = rabbit_mqtt_retained_msg_store_dets
"""


def export_rabbitmq(state: Path, outdir: Path, topics: Topics, hosts: list[str] | None = None) -> list[Path]:
    """definitions.json (0600) and rabbitmq.conf; `hosts` (from fleet.toml) must all have a secret."""
    made = definitions(state, topics, hosts)
    outdir.mkdir(parents=True, exist_ok=True)
    written = [outdir / "definitions.json", outdir / "rabbitmq.conf"]
    write_atomic(written[0], json.dumps(made, indent=2).encode() + b"\n", mode=0o600)
    write_atomic(written[1], rabbitmq_conf().encode(), mode=0o644)
    return written
