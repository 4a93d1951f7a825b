"""Announce releases: a retained `desired` per host, confirmed routed before returning."""

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import aiomqtt
from loguru import logger

from protocol.credentials import Secret
from protocol.errors import UnreachableError
from protocol.layout import StateDir
from protocol.messages import Desired, encode
from protocol.mqtt import BrokerURL, confirm_routed, connect, unreachable
from protocol.topics import PUBLISHER_USER, Topics
from publisher.chroot import Chroot

_IN_FLIGHT = 256  # announcements sent before the first acknowledgement is awaited (paho: 20)


def desired_of(state: Path, hosts: Iterable[str]) -> dict[str, Desired]:
    """What each host's chroot serves now, as `desired` payloads (hosts never published are left out)."""
    found: dict[str, Desired] = {}
    for host in hosts:
        chroot = Chroot(StateDir(state).chroot(host))
        current = chroot.current()
        manifest = chroot.manifest(current.generation) if current else None
        if current is None or manifest is None:
            continue
        found[host] = Desired(
            generation=current.generation,
            version=current.version,
            published_at=manifest.published_at,
            source_rev=manifest.source_rev,
        )
    return found


async def announce(
    desired: Mapping[str, Desired],
    *,
    url: BrokerURL | Sequence[BrokerURL],
    password: Secret,
    topics: Topics,
    timeout: float = 10.0,
) -> None:
    """Publish every `desired` retained (QoS 1) and wait until the broker has routed them all.

    With the nodes of a cluster, on every node at once: RabbitMQ 3.10 keeps a retained message
    on the node that received it only, and an agent that moves to another node must find its
    `desired` there. Done when one node took them all; a node that did not is warned about
    (`herald serve --broker` announces again on each node as it reconnects)."""
    urls = [url] if isinstance(url, BrokerURL) else list(url)
    if not desired or not urls:
        return
    if len(urls) == 1:
        await _announce_on(urls[0], desired, password, topics, timeout)
        return
    results = await asyncio.gather(
        *(_announce_on(node, desired, password, topics, timeout) for node in urls), return_exceptions=True
    )
    failed = [result for result in results if isinstance(result, BaseException)]
    for error in failed:
        if not isinstance(error, UnreachableError):
            raise error
    if len(failed) == len(urls):
        raise UnreachableError("; ".join(str(error) for error in failed))
    for error in failed:
        logger.warning("{}; announced on the other nodes", error)


async def _announce_on(
    url: BrokerURL, desired: Mapping[str, Desired], password: Secret, topics: Topics, timeout: float
) -> None:
    try:
        async with connect(
            url,
            username=PUBLISHER_USER,
            password=password,
            timeout=timeout,
            max_inflight=_IN_FLIGHT,
        ) as client:
            # All at once: paho keeps a window of them in flight instead of one round trip each
            # (and aiomqtt, which warns past 10 waiting publishes, is told that is intended).
            client.pending_calls_threshold = len(desired) + 1
            await asyncio.gather(
                *(
                    client.publish(topics.desired(host), encode(payload), qos=1, retain=True)
                    for host, payload in desired.items()
                )
            )
            await confirm_routed(client, topics, PUBLISHER_USER, timeout)
    except (aiomqtt.MqttError, OSError) as exc:
        raise unreachable(url, PUBLISHER_USER, exc) from exc
    logger.info("announced {} host(s) on {}", len(desired), url)
