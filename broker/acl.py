"""Who may read and write which topic: DESIGN.md's ACL as data, for amqtt and for Mosquitto.

A host `h` reads `<p>/h/desired` and `<p>/h/command`, and writes `<p>/h/state` and
`<p>/h/online`. The publisher writes every host's `desired`; the admin reads everything under
the prefix and writes every host's `command`. Each service user also reads and writes its own
confirmation topic (protocol.mqtt.confirm_routed). Anything else is denied, anonymous included.
"""

import re
from collections.abc import Container
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from protocol.topics import ADMIN_USER, PUBLISHER_USER, Kind, Topics, is_host_name


class Access(StrEnum):
    READ = "read"
    WRITE = "write"


@dataclass(frozen=True, slots=True)
class Rule:
    access: Access
    pattern: str  # an MQTT topic filter; "%u" stands for the user name, as in Mosquitto


def rules(user: str, topics: Topics) -> tuple[Rule, ...]:
    """The rules of one user; () for names that are neither a host nor a service user."""
    read, write = Access.READ, Access.WRITE
    if user == PUBLISHER_USER:
        return (
            Rule(write, topics.every(Kind.DESIRED)),
            Rule(read, topics.confirm("%u")),
            Rule(write, topics.confirm("%u")),
        )
    if user == ADMIN_USER:
        return (
            Rule(read, f"{topics.prefix}/#"),
            Rule(write, topics.every(Kind.COMMAND)),
            Rule(write, topics.confirm("%u")),
        )
    if is_host_name(user):
        return host_rules(topics)
    return ()


def host_rules(topics: Topics) -> tuple[Rule, ...]:
    return (
        Rule(Access.READ, topics.of("%u", Kind.DESIRED)),
        Rule(Access.READ, topics.of("%u", Kind.COMMAND)),
        Rule(Access.WRITE, topics.of("%u", Kind.STATE)),
        Rule(Access.WRITE, topics.of("%u", Kind.ONLINE)),
    )


def matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching of a concrete topic against a filter."""
    levels = topic.split("/")
    for index, level in enumerate(topic_filter.split("/")):
        if level == "#":
            return True
        if index >= len(levels) or level not in ("+", levels[index]):
            return False
    return len(topic_filter.split("/")) == len(levels)


def covers(allowed: str, requested: str) -> bool:
    """True if every topic `requested` can match is also matched by `allowed`."""
    want = requested.split("/")
    have = allowed.split("/")
    for index, level in enumerate(have):
        if level == "#":
            return True
        if index >= len(want) or want[index] == "#":
            return False
        if level != "+" and (want[index] == "+" or want[index] != level):
            return False
    return len(have) == len(want)


def _expand(rule: Rule, user: str) -> str:
    return rule.pattern.replace("%u", user)


_ASSIGNED: Final = re.compile(r"amqtt/[A-Za-z0-9]{16}")  # what amqtt assigns to an empty client id
_LEGACY: Final = "herald-agent-"  # agents of herald 0.1: herald-agent-<host> and herald-agent-<host>-probe


def owns_client_id(user: str, client_id: str, users: Container[str]) -> bool:
    """May `user` connect with `client_id`? Its own ids are `user` and `user.<anything>`
    (protocol.mqtt.client_id); host names hold no '.', so no user owns another's. An id the
    broker assigned (the client sent none) is random and belongs to nobody else.

    Agents of herald 0.1 used `herald-agent-<host>` and `herald-agent-<host>-probe`, and must
    keep connecting while they upgrade: those are `<host>`'s too. `herald-agent-a-probe` could
    also be the main id of a host named `a-probe`; where that user exists it is its own.
    """
    if client_id == user or client_id.startswith(f"{user}.") or _ASSIGNED.fullmatch(client_id):
        return True
    legacy = client_id.removeprefix(_LEGACY)
    if legacy == client_id:
        return False
    return legacy == user or (legacy == f"{user}-probe" and legacy not in users)


def may_publish(user: str, topic: str, topics: Topics) -> bool:
    return any(r.access is Access.WRITE and matches(_expand(r, user), topic) for r in rules(user, topics))


def may_receive(user: str, topic: str, topics: Topics) -> bool:
    return any(r.access is Access.READ and matches(_expand(r, user), topic) for r in rules(user, topics))


def may_subscribe(user: str, topic_filter: str, topics: Topics) -> bool:
    return any(
        r.access is Access.READ and covers(_expand(r, user), topic_filter) for r in rules(user, topics)
    )
