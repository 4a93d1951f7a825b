"""When to check: a per-host fixed offset, so a fleet never polls in step; jittered backoff."""

import hashlib
import random
import time
from typing import Final

_BACKOFF_BASE: Final = 2.0


def until_next_poll(host: str, poll: float, *, now: float | None = None) -> float:
    """Seconds until the host's next slot: every `poll` seconds, shifted by a per-host offset."""
    offset = int.from_bytes(hashlib.sha256(host.encode()).digest()[:8], "big") % max(int(poll), 1)
    now = time.time() if now is None else now
    return poll - ((now - offset) % poll)


class Backoff:
    """Exponential backoff with full jitter, capped: 2, 4, 8, ... seconds, each scaled by [0.5, 1)."""

    def __init__(self, cap: float) -> None:
        self.cap = cap
        self.failures = 0

    def reset(self) -> None:
        self.failures = 0

    def next(self) -> float:
        self.failures += 1
        ceiling = min(self.cap, _BACKOFF_BASE ** min(self.failures, 16))
        return ceiling * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not secrecy
