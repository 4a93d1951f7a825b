"""Sending to the fleet from the command line: announcements and commands."""

import secrets
from pathlib import Path

import aiomqtt
from loguru import logger

from protocol.credentials import read_secret
from protocol.errors import ConfigError, UnreachableError
from protocol.layout import StateDir
from protocol.messages import Action, Command, encode, now
from protocol.mqtt import BrokerURL, confirm_routed, connect
from protocol.topics import ADMIN_USER, PUBLISHER_USER, Topics, is_host_name
from publisher.announce import announce, desired_of


async def announce_hosts(state: Path, broker: str, hosts: list[str], prefix: str) -> None:
    password = read_secret(StateDir(state).service_secret(PUBLISHER_USER))
    await announce(
        desired_of(state, hosts), url=BrokerURL.parse(broker), password=password, topics=Topics(prefix)
    )


async def trigger(state: Path, broker: str, hosts: list[str], action: Action, prefix: str) -> dict[str, str]:
    """Send a retained `command` to each host (delivered once, also to hosts offline now)."""
    for host in hosts:
        if not is_host_name(host):
            raise ConfigError(f"{host!r} is not a host name")
    url = BrokerURL.parse(broker)
    topics = Topics(prefix)
    password = read_secret(StateDir(state).service_secret(ADMIN_USER))
    ids = {}
    try:
        async with connect(url, username=ADMIN_USER, password=password) as client:
            for host in hosts:
                command = Command(id=secrets.token_hex(8), action=action, issued_at=now(), by=ADMIN_USER)
                await client.publish(topics.command(host), encode(command), qos=1, retain=True)
                ids[host] = command.id
            await confirm_routed(client, topics, ADMIN_USER)
    except (aiomqtt.MqttError, OSError) as exc:
        raise UnreachableError(f"broker {url}: {exc}") from exc
    logger.debug("sent {} to {}", action, ", ".join(hosts))
    return ids
