"""Announce releases: a retained `desired` per host, confirmed routed before returning."""

import asyncio
from collections.abc import Iterable, Mapping
from pathlib import Path

import aiomqtt
from loguru import logger

from protocol.credentials import Secret
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
    url: BrokerURL,
    password: Secret,
    topics: Topics,
    timeout: float = 10.0,
) -> None:
    """Publish every `desired` retained (QoS 1) and wait until the broker has routed them all."""
    if not desired:
        return
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
