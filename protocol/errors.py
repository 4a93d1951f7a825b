"""herald's exception tree.

Every error herald raises for a reason a person can act on is a `HeraldError`: its text is one
line that says what failed and, where it helps, what to do. Only the CLI catches them; it prints
the line and exits with `exit_code`. Anything else is a bug and keeps its traceback.
"""


class HeraldError(Exception):
    """A failure herald explains in one line."""

    exit_code = 1


class ConfigError(HeraldError):
    """A file the user wrote (fleet.toml, server.toml, agent.toml) or the fleet repo is wrong."""

    exit_code = 2


class PayloadError(HeraldError):
    """An MQTT payload, `current` file or MANIFEST that does not decode. Logged and dropped."""


class ReleaseError(HeraldError):
    """A release failed verification: bad signature, hash, path, host or generation."""


class NotYetError(HeraldError):
    """A release this agent cannot apply yet, through no fault of the release: a format newer
    than it reads, a key it has not been told of, key statements it refuses. Reported, never
    recorded as a refused generation: looked at again at the next check, and applied once the
    agent is upgraded or has followed the statements."""


class PublishError(HeraldError):
    """Writing releases failed (disk, permissions, lock)."""


class UnreachableError(HeraldError):
    """A server (SFTP or broker) cannot be reached or refused us."""


class RebuildError(HeraldError):
    """The rebuild command failed, timed out or could not start."""


class StorageError(HeraldError):
    """The agent's own disk refused a write (full, read-only): retried when space returns."""
