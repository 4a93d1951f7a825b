"""Format numbers: every release, key statement, MQTT message and config file carries one.

A format number changes only when a change is *breaking*: when a reader that ignored it would
do something wrong (a field it must act on, a field removed or retyped, another signature or
encoding). Within one number, a writer may add optional fields, and readers ignore the fields
they do not know, while still checking the types of the ones they know and everything
security-relevant (signature, hashes, paths, host, generation). A reader accepts every number
up to its own, and says in one line that a newer one needs a newer herald.

RELEASE  what the publisher writes into a chroot: the MANIFEST, the `current` line.
         1  herald 0.1's exactly: no `format` field, `current` is "<generation> <version>".
            0.1 agents refuse unknown fields, so a format-1 release never carries one.
         2  the MANIFEST names its format; `current` adds `format=2 keys=<statements>`, so
            that an agent notices new key statements in its no-change check.
         3  the content may name a built system and its closure (`deliver = "closure"`): an
            agent that ignored it would evaluate the configuration itself. Only such releases
            are written in it; the others stay at 2 (SOURCE), so that older agents keep reading them.
KEYS     the publisher key statements (credentials/publisher.keys): 1.
MESSAGE  MQTT payloads: 1 (`format` is left out when it is 1, as herald 0.1 reads them).
CONFIG   fleet.toml, server.toml, agent.toml: 1. People write these, so they stay strict about
         unknown keys at their own format (a typo is an error); a file that says `format = N`
         for a newer herald is refused in one line that says so.
"""

from typing import Final

RELEASE: Final = 3
SOURCE: Final = 2  # the newest format a release without a system needs
CLOSURE: Final = 3  # the first format that carries one
KEYS: Final = 1
MESSAGE: Final = 1
CONFIG: Final = 1


def newer_release(found: int) -> str:
    """What an agent says of a release it cannot read yet."""
    return f"release format {found} is newer than this agent ({RELEASE}): upgrade herald on this host"
