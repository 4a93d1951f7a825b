"""MQTT topic names and the user names that appear in them.

    <prefix>/<host>/desired   retained   publisher -> host
    <prefix>/<host>/command   retained   admin     -> host
    <prefix>/<host>/state     retained   host      -> admin
    <prefix>/<host>/online    retained   host      -> admin (the last will says false)
    <prefix>/_confirm/<user>/<nonce>     a client's own echo, to learn its messages were routed

Host names double as MQTT and SSH user names, so they follow the strictest of the rules:
lower-case letters, digits and '-', starting with a letter, at most 32 characters.
"""

import re
from dataclasses import dataclass
from enum import StrEnum

HOST_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")
PUBLISHER_USER = "herald-publisher"
ADMIN_USER = "herald-admin"
SERVICE_USERS = (PUBLISHER_USER, ADMIN_USER)
DEFAULT_PREFIX = "herald"


def is_host_name(name: str) -> bool:
    return HOST_RE.fullmatch(name) is not None and not name.startswith("herald-")


class Kind(StrEnum):
    DESIRED = "desired"
    COMMAND = "command"
    STATE = "state"
    ONLINE = "online"


@dataclass(frozen=True, slots=True)
class Topics:
    prefix: str = DEFAULT_PREFIX

    def of(self, host: str, kind: Kind) -> str:
        return f"{self.prefix}/{host}/{kind}"

    def desired(self, host: str) -> str:
        return self.of(host, Kind.DESIRED)

    def command(self, host: str) -> str:
        return self.of(host, Kind.COMMAND)

    def state(self, host: str) -> str:
        return self.of(host, Kind.STATE)

    def online(self, host: str) -> str:
        return self.of(host, Kind.ONLINE)

    def every(self, kind: Kind) -> str:
        """The filter matching `kind` for every host."""
        return f"{self.prefix}/+/{kind}"

    def confirm(self, user: str, nonce: str = "#") -> str:
        return f"{self.prefix}/_confirm/{user}/{nonce}"

    def parse(self, topic: str) -> tuple[str, Kind] | None:
        """(host, kind) of a host topic; None for anything else."""
        parts = topic.split("/")
        if len(parts) != 3 or parts[0] != self.prefix or not is_host_name(parts[1]):
            return None
        try:
            return parts[1], Kind(parts[2])
        except ValueError:
            return None
