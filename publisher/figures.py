"""STATE/publisher/figures.json: what every publish run did, however it was started.

`herald publish` (from the git hook, a timer, by hand) and `herald serve` (on start, on SIGHUP)
each add their run here at its end, under the publish lock, replacing the file atomically; the
fleet page's /metrics reads it, so its counters count every run, not only those of the process
that serves them. A dry run changes nothing and is not counted.
"""

from pathlib import Path

import msgspec

from protocol.files import write_atomic


class Figures(msgspec.Struct, frozen=True, kw_only=True):
    runs: int = 0
    hosts_changed: int = 0  # hosts given a new release, over all runs
    hosts_failed: int = 0  # hosts not published (check or write failed), over all runs
    last_seconds: float = 0.0  # the last run's duration
    last_at: float = 0.0  # when the last run ended (Unix time)


def read_figures(path: Path) -> Figures:
    """The figures so far; zeros if there are none yet (or the file is unreadable)."""
    try:
        return msgspec.json.decode(path.read_bytes(), type=Figures)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return Figures()


def add_run(path: Path, *, changed: int, failed: int, seconds: float, at: float) -> Figures:
    """Count one run; the caller holds the publish lock."""
    old = read_figures(path)
    new = Figures(
        runs=old.runs + 1,
        hosts_changed=old.hosts_changed + changed,
        hosts_failed=old.hosts_failed + failed,
        last_seconds=seconds,
        last_at=at,
    )
    write_atomic(path, msgspec.json.encode(new), mode=0o644, durable=False)
    return new
