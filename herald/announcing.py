"""Sending to the fleet from the command line: announcements and commands."""

from pathlib import Path

from protocol.credentials import read_secret
from protocol.layout import StateDir
from protocol.mqtt import parse_urls
from protocol.topics import PUBLISHER_USER, Topics
from publisher.announce import announce, desired_of


async def announce_hosts(state: Path, broker: str | list[str], hosts: list[str], prefix: str) -> None:
    """On the broker, or on each node of a cluster (`--broker` repeated)."""
    password = read_secret(StateDir(state).service_secret(PUBLISHER_USER))
    await announce(desired_of(state, hosts), url=parse_urls(broker), password=password, topics=Topics(prefix))
