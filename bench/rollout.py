"""Rollouts: how soon the next wave starts, and what a rollout costs a publish.

- Handoff: real `herald serve` and N real agents (bench/agent.py's, at nice 10), fleet.toml's
  `[rollout]` with a first wave of half the fleet and a soak, the rest after it. Measured from
  the moment the first wave's condition held (its last host reported up to date: the rollout's
  `healthy` time) to the first rebuild start in the second wave, less the soak; and from that
  wave's start to its first rebuild (the announcement's part).
- Bookkeeping: publishes at 1000 hosts (bench/fleetgen), in-process, with fleet.toml's plan and
  with `--rollout off` (the baseline), alternating: no change, every host changed (a rollout
  made, its first wave given), and no change while a rollout holds half the fleet back.
"""

import json
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from bench import agent
from bench.fleetgen import make_fleet
from publisher.publish import Status, publish

if TYPE_CHECKING:
    import subprocess

SOAK = 2.0
ROUNDS = 3
PLAN = f"""
[rollout]
budget = 5

[[rollout.waves]]
name = "first"
percent = 50
soak = "{SOAK:.0f}s"
"""


@dataclass(frozen=True)
class Handoff:
    agents: int
    beyond_soak: float  # first rebuild of wave 2 - (wave 1 healthy + soak)
    announce: float  # first rebuild of wave 2 - wave 2 started
    early: int  # hosts of wave 2 whose rebuild started before their wave: must be 0


def handoff(agents: int) -> Handoff:
    with tempfile.TemporaryDirectory(prefix="herald-bench-rollout-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        keys = agent.make_fleet(root, agents, files=5)
        toml = root / "fleet" / "fleet.toml"
        toml.write_text(toml.read_text() + PLAN)
        server, info = agent.serve(root)
        workers: list[subprocess.Popen[bytes]] = []
        try:
            nice = ["nice", "-n", str(agent.AGENTS_NICE)]
            workers = agent.start_agents(agent.agent_configs(root, keys, info), nice)
            started = {name: root / "agents" / name / "started" for name in keys}
            agent.wait_for(
                lambda: all(path.exists() for path in started.values()), "every agent at generation 1"
            )
            (root / "fleet" / "shared.nix").write_text("{ ... }: { changed = true; }\n")
            for name in keys:
                (root / "fleet" / "hosts" / name / "shared.nix").symlink_to("../../shared.nix")
            os.kill(server.pid, signal.SIGHUP)  # serve publishes, and announces the first wave
            agent.wait_for(
                lambda: all(len(path.read_text().splitlines()) == 2 for path in started.values()),
                "every agent's second rebuild",
            )
            book = json.loads((root / "state" / "run" / "rollout.json").read_text())["rollout"]
            first, second = book["waves"][0], book["waves"][1]
            rebuilt = {
                name: float(path.read_text().splitlines()[1].split()[0]) for name, path in started.items()
            }
            later = [rebuilt[name] for name in second["hosts"]]
            return Handoff(
                agents,
                min(later) - (first["healthy"] + first["soak"]),
                min(later) - second["started"],
                sum(1 for at in later if at < second["started"]),
            )
        finally:
            agent.stop_all(workers, server)


def _timed(fleet: Path, state: Path, rollout: Literal["off"] | None, expect: Status) -> float:
    os.sync()
    began = time.perf_counter()
    report = publish(fleet, state, rollout=rollout)
    took = time.perf_counter() - began
    assert all(result.status is expect for result in report.hosts), expect
    return took


def bookkeeping(hosts: int) -> dict[str, tuple[float, float]]:
    """Median seconds per kind of publish: (with the plan, with --rollout off). Each no-change
    publish after a change is compared with one after the same change without the plan."""
    figures: dict[str, tuple[list[float], list[float]]] = {
        "no change": ([], []),
        "every host changed": ([], []),
        "no change after that, half the fleet held back": ([], []),
    }
    with tempfile.TemporaryDirectory(prefix="herald-bench-rollout-", dir="/var/tmp") as tmp:
        fleet, state = Path(tmp) / "fleet", Path(tmp) / "state"
        make_fleet(fleet, hosts)
        toml = fleet / "fleet.toml"
        toml.write_text("[publish]\ncheck = []\n\n" + toml.read_text() + PLAN)
        publish(fleet, state, rollout="off")
        change = 0

        def changed() -> None:
            nonlocal change
            change += 1
            (fleet / "common" / "module07.nix").write_text(f"{{ ... }}: {{ shared.changed = {change}; }}\n")

        for _ in range(ROUNDS):
            publish(fleet, state, rollout="off")  # a round starts with no rollout running
            plan, off = figures["no change"]
            off.append(_timed(fleet, state, "off", Status.UNCHANGED))
            plan.append(_timed(fleet, state, None, Status.UNCHANGED))
            for rollout, side in (("off", 1), (None, 0)):
                changed()
                figures["every host changed"][side].append(_timed(fleet, state, rollout, Status.CHANGED))  # type: ignore[arg-type]
                after = figures["no change after that, half the fleet held back"][side]
                after.append(_timed(fleet, state, rollout, Status.UNCHANGED))  # type: ignore[arg-type]
    return {kind: (statistics.median(plan), statistics.median(off)) for kind, (plan, off) in figures.items()}


def main(agents: int = 100, hosts: int = 1000) -> str:
    run = handoff(agents)
    costs = bookkeeping(hosts)
    met = run.beyond_soak <= 1.0 and not run.early
    lines = [
        "## Rollout",
        "",
        "`bench/rollout.py`. Handoff: real `herald serve` and real agents (at nice 10), a first wave",
        f"of half the fleet with a {SOAK:.0f} s soak, the rest after it; from the moment the first wave's",
        "last host was seen up to date to the first rebuild start of the second wave, less the soak.",
        f"Bookkeeping: in-process publishes at {hosts} hosts, with fleet.toml's plan and with",
        f"`--rollout off` in the same run, alternating; medians of {ROUNDS}.",
        "",
        "| measure | result | target |",
        "|---|---|---|",
        (
            f"| next wave's first rebuild, {agents} agents | {run.beyond_soak * 1000:.0f} ms after the soak "
            f"({run.announce * 1000:.0f} ms of it from the wave's start); {run.early} host(s) early "
            f"| ≤ 1 s after the soak, none early: {'yes' if met else '**no**'} |"
        ),
    ]
    for kind, (plan, off) in costs.items():
        extra = (plan - off) / costs["no change"][1]
        target = (
            f"≤ 10% of the no-change publish: {'yes' if extra <= 0.10 else '**no**'} ({extra:+.0%})"
            if kind != "every host changed"
            else "- (the plan names half the fleet's releases in `current`, the baseline all)"
        )
        lines.append(f"| publish, {kind} | {plan:.3f} s with the plan, {off:.3f} s without | {target} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 100, int(sys.argv[2]) if len(sys.argv) > 2 else 1000)
    )
