"""`herald trigger`: send commands, optionally wait for the hosts' answers, batch by batch.

A host has answered when, after its command was sent, it reports a state that ends a cycle
(idle, failed, rolled back) following one that started it (checking, fetching, applying...).
Only messages that arrive after the command count: retained ones are drained first, so
neither old states nor a skewed clock on a host can fake an answer. A host that is offline
answers when it comes back (its command is retained), or the wait times out for it. A command
expires (24 hours by default): a host back after that ignores it, so a rollback sent to a laptop
on the shelf does not fire months later.
"""

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from typing import Final

import aiomqtt

from protocol.credentials import Secret
from protocol.errors import PayloadError
from protocol.messages import Action, Command, Phase, State, decode, encode, now
from protocol.mqtt import BrokerURL, confirm_routed, connect, unreachable
from protocol.topics import ADMIN_USER, Kind, Topics

_SETTLED: Final = (Phase.IDLE, Phase.FAILED, Phase.ROLLED_BACK, Phase.POSTPONED)
_ANSWERS: Final = {Phase.IDLE: "ok", Phase.FAILED: "failed", Phase.POSTPONED: "postponed"}


class Answer(StrEnum):
    OK = "ok"
    FAILED = "failed"
    ROLLED_BACK = "rolled back"
    POSTPONED = "postponed"  # a check found a new generation that waits (battery, metered link)
    NO_ANSWER = "no answer"
    NOT_SENT = "not sent"  # a batch before it failed and --stop-on-failure held it back
    SENT = "sent"  # not waited for


@dataclass
class Outcome:
    answers: dict[str, Answer] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(answer in (Answer.OK, Answer.SENT, Answer.POSTPONED) for answer in self.answers.values())


def batches(hosts: list[str], size: int | None) -> list[list[str]]:
    """One batch of everything; or a canary alone, then batches of `size`."""
    if not size or len(hosts) <= 1:
        return [hosts]
    return [hosts[:1]] + [hosts[index : index + size] for index in range(1, len(hosts), size)]


@dataclass(frozen=True, slots=True)
class Order:
    """What each host is told: the action, and for how many seconds it holds (None: until the
    host takes it, however late)."""

    action: Action
    expires: float | None = 86400.0

    def command(self) -> Command:
        issued = now()
        return Command(
            id=secrets.token_hex(8),
            action=self.action,
            issued_at=issued,
            expires_at=issued + timedelta(seconds=self.expires) if self.expires is not None else None,
            by=ADMIN_USER,
        )


class _Watch:
    """What each host reported since its command was sent."""

    def __init__(self, topics: Topics, action: Action) -> None:
        self.topics = topics
        self.action = action
        self.waiting: set[str] = set()
        self.started: set[str] = set()
        self.answers: dict[str, tuple[Answer, str]] = {}
        self.changed = asyncio.Event()

    def take(self, message: aiomqtt.Message) -> None:
        parsed = self.topics.parse(str(message.topic))
        if parsed is None or parsed[1] is not Kind.STATE or parsed[0] not in self.waiting:
            return
        host, payload = parsed[0], message.payload
        try:
            state = decode(payload if isinstance(payload, bytes) else b"", State)
        except PayloadError:  # a bad state message is not an answer
            return
        if state.phase not in _SETTLED:
            self.started.add(host)
        elif host in self.started or (self.action is Action.ROLLBACK and state.phase is not Phase.IDLE):
            answer = Answer(_ANSWERS.get(state.phase, Answer.ROLLED_BACK))
            self.answers[host] = (answer, state.message)
            self.waiting.discard(host)
            self.changed.set()


async def trigger(
    url: BrokerURL,
    password: Secret,
    topics: Topics,
    hosts: list[str],
    order: "Order",
    *,
    wait: bool,
    batch: int | None = None,
    stop_on_failure: bool = False,
    timeout: float = 1800.0,
    progress: Callable[[int, int], None] | None = None,
) -> Outcome:
    outcome = Outcome()
    watch = _Watch(topics, order.action)
    try:
        async with connect(url, username=ADMIN_USER, password=password) as client:
            if wait:
                await client.subscribe(topics.every(Kind.STATE), qos=1)
                await confirm_routed(client, topics, ADMIN_USER)  # drain the retained states first
            for group in batches(hosts, batch):
                if stop_on_failure and not outcome.ok:
                    outcome.answers.update(dict.fromkeys(group, Answer.NOT_SENT))
                    continue
                watch.waiting.update(group)
                for host in group:
                    await client.publish(topics.command(host), encode(order.command()), qos=1, retain=True)
                await confirm_routed(client, topics, ADMIN_USER, on_message=watch.take)
                if not wait:
                    outcome.answers.update(dict.fromkeys(group, Answer.SENT))
                    continue
                await _wait(client, watch, group, timeout, progress, len(hosts), outcome)
    except (aiomqtt.MqttError, OSError) as exc:
        raise unreachable(url, ADMIN_USER, exc) from exc
    return outcome


async def _wait(
    client: aiomqtt.Client,
    watch: _Watch,
    group: list[str],
    timeout: float,
    progress: Callable[[int, int], None] | None,
    total: int,
    outcome: Outcome,
) -> None:
    try:
        async with asyncio.timeout(timeout):
            while any(host in watch.waiting for host in group):
                if progress is not None:
                    progress(len(watch.answers), total)
                message = await anext(client.messages)
                watch.take(message)
    except TimeoutError:
        pass
    for host in group:
        answer, text = watch.answers.get(host, (Answer.NO_ANSWER, ""))
        outcome.answers[host] = answer
        outcome.messages[host] = text
    watch.waiting.difference_update(group)
    if progress is not None:
        progress(len(watch.answers), total)
