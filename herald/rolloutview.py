"""The rollout as people see it: `herald rollout status`, the fleet page's strip of waves, the
`herald_rollout_*` series of /metrics, the wave column of `herald status`; and the commands that
change it (`herald rollout pause|resume|abort [--rollback]`)."""

import argparse
import html
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import msgspec
from prometheus_client.core import GaugeMetricFamily
from rich.table import Table
from rich.text import Text

from herald.fleet import FleetView
from herald.output import console
from herald.rollouts import Seen, seen, status_line
from protocol.hosttext import safe, safe_json
from protocol.layout import StateDir
from protocol.messages import now
from publisher.rollout import Outcome, Rollout, Status, pause, read_book, resume

_SHOWN: Final = (Seen.DONE, Seen.FAILED, Seen.WAITING, Seen.AWAY, Seen.HELD)


@dataclass(frozen=True, slots=True)
class WaveProgress:
    index: int
    name: str
    hosts: int  # the hosts of the rollout in this wave (its unchanged hosts are not counted)
    counts: dict[Seen, int]
    state: str  # "passed", "soaking 12s left", "started", "waits for its window 02:00-04:00", "next"


def progress(rollout: Rollout, view: FleetView) -> list[WaveProgress]:
    at = now()
    waves = []
    for index, wave in enumerate(rollout.waves):
        counts: Counter[Seen] = Counter()
        for host in wave.hosts:
            target = rollout.hosts.get(host)
            if target is None:
                continue
            if target.outcome is Outcome.DONE:
                counts[Seen.DONE] += 1
            elif target.outcome is Outcome.FAILED:
                counts[Seen.FAILED] += 1
            else:
                counts[seen(target, view.hosts.get(host), at)] += 1
        waves.append(
            WaveProgress(index, wave.name, sum(counts.values()), dict(counts), _wave_state(rollout, index))
        )
    return waves


def _wave_state(rollout: Rollout, index: int) -> str:
    wave = rollout.waves[index]
    if wave.passed:
        return "passed"
    if wave.healthy:
        left = max(0, int(wave.healthy + wave.soak - time.time()))
        return f"soaking, {left}s left"
    if wave.started:
        return "started"
    if rollout.current_wave() == index and wave.window:
        return f"waits for its window {wave.window}"
    return "next" if rollout.current_wave() == index else "waiting"


# ---------------------------------------------------------------- the page and /metrics


def strip(rollout: Rollout | None, view: FleetView) -> str:
    """The page's strip of waves (HTML, everything escaped)."""
    if rollout is None:
        return ""
    items = []
    for wave in progress(rollout, view):
        done = wave.counts.get(Seen.DONE, 0)
        counts = ", ".join(f"{wave.counts[kind]} {kind}" for kind in _SHOWN if wave.counts.get(kind))
        items.append(
            f'<li class="wave wave-{html.escape(wave.state.split(",")[0].split(" ")[0])}">'
            f"<b>{wave.index + 1} {html.escape(wave.name)}</b> {html.escape(wave.state)}<br>"
            f'<progress max="{max(wave.hosts, 1)}" value="{done}"></progress> '
            f"{done}/{wave.hosts} done{html.escape('; ' + counts if counts else '')}</li>"
        )
    return (
        f'<section id="rollout"><p>{html.escape(status_line(rollout))}</p>'
        f'<ol class="waves">{"".join(items)}</ol></section>'
    )


def metrics(rollout: Rollout | None, view: FleetView) -> Iterator[GaugeMetricFamily]:
    status = GaugeMetricFamily(
        "herald_rollout_status", "1 for the rollout's status", labels=["rollout", "status"]
    )
    wave = GaugeMetricFamily(
        "herald_rollout_wave", "The wave the rollout is at (1-based; 0 once all passed)", labels=["rollout"]
    )
    waves = GaugeMetricFamily("herald_rollout_waves", "Waves of the rollout", labels=["rollout"])
    hosts = GaugeMetricFamily(
        "herald_rollout_hosts",
        "Hosts of the rollout per wave and progress",
        labels=["rollout", "wave", "name", "progress"],
    )
    failures = GaugeMetricFamily(
        "herald_rollout_failures", "Failures counted against the budget", labels=["rollout"]
    )
    budget = GaugeMetricFamily("herald_rollout_budget", "Failures that halt the rollout", labels=["rollout"])
    soak = GaugeMetricFamily(
        "herald_rollout_soak_remaining_seconds", "Seconds left in the current wave's soak", labels=["rollout"]
    )
    if rollout is not None:
        rid = rollout.id
        for each in Status:
            status.add_metric([rid, each.value], 1.0 if each is rollout.status else 0.0)
        index = rollout.current_wave()
        wave.add_metric([rid], float(index + 1) if index is not None else 0.0)
        waves.add_metric([rid], float(len(rollout.waves)))
        for step in progress(rollout, view):
            for kind in _SHOWN:
                hosts.add_metric(
                    [rid, str(step.index + 1), step.name, kind.value], float(step.counts.get(kind, 0))
                )
        failures.add_metric([rid], float(len(rollout.failures())))
        budget.add_metric([rid], float(rollout.budget))
        current = rollout.waves[index] if index is not None else None
        left = max(0.0, current.healthy + current.soak - time.time()) if current and current.healthy else 0.0
        soak.add_metric([rid], left)
    yield from (status, wave, waves, hosts, failures, budget, soak)


# ---------------------------------------------------------------- herald rollout


def status_command(args: argparse.Namespace, view: FleetView) -> int:
    rollout = read_book(StateDir(args.state)).rollout
    if args.json:
        document = {
            "rollout": msgspec.to_builtins(rollout) if rollout is not None else None,
            "waves": [
                {"wave": step.index + 1, "name": step.name, "state": step.state, "hosts": step.hosts}
                | {kind.value: step.counts.get(kind, 0) for kind in _SHOWN}
                for step in (progress(rollout, view) if rollout is not None else [])
            ],
        }
        sys.stdout.buffer.write(
            safe_json(msgspec.json.format(msgspec.json.encode(document), indent=2)) + b"\n"
        )
        return 0 if rollout is None or rollout.status is not Status.HALTED else 1
    if rollout is None:
        console.print("no rollout yet: fleet.toml's [rollout] (or herald publish --rollout FILE) makes one")
        return 0
    console.print(Text(status_line(rollout)), soft_wrap=True)
    grid = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("wave", "name", "hosts", *(kind.value for kind in _SHOWN), "state"):
        grid.add_column(column)
    for step in progress(rollout, view):
        counts = [str(step.counts.get(kind, 0)) for kind in _SHOWN]
        grid.add_row(str(step.index + 1), Text(step.name), str(step.hosts), *counts, step.state)
    console.print(grid)
    for host, target in sorted(rollout.hosts.items()):
        if target.outcome is Outcome.FAILED:
            note = " (accepted by resume)" if target.accepted else ""
            console.print(
                Text(f"  {host}: generation {target.generation} failed{note}: {safe(target.message)}"),
                soft_wrap=True,
            )
    return 1 if rollout.status is Status.HALTED else 0


def change_command(args: argparse.Namespace) -> int:
    """pause, resume, abort [--rollback]: each prints one line."""
    state = StateDir(args.state)
    if args.action == "pause":
        line = pause(state)
    elif args.action == "resume":
        line = resume(state)
    else:
        from publisher.rollback import abort_rollout  # noqa: PLC0415 - the signing key only here

        line = abort_rollout(state, rollback=args.rollback)
    console.print(Text(line), soft_wrap=True)
    return 0
