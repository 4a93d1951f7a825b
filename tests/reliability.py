"""The figures of the fault tests, for the reliability table in bench/RESULTS.md.

Each fault test computes its figures, hands them to `record` and only then asserts, so that a
failing scenario still shows in the table. With HERALD_RELIABILITY=FILE (set by `make bench`),
`record` appends one JSON line to FILE; otherwise it does nothing.
"""

import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Row:
    scenario: str
    runs: int  # faults injected (or agents x publishes, for the soak)
    converged: int
    seconds: list[float] = field(default_factory=list)  # time to converge, one per run
    lost: int = 0  # updates that never arrived (an agent not at the newest generation at the end)
    duplicates: int = 0  # a generation applied twice by an agent that was never killed

    def line(self) -> str:
        times = sorted(self.seconds)
        p50 = f"{statistics.median(times):.1f}" if times else "-"
        worst = f"{times[-1]:.1f}" if times else "-"
        return (
            f"| {self.scenario} | {self.runs} | {self.converged} | {p50} / {worst} | "
            f"{self.lost} | {self.duplicates} |"
        )


def record(row: Row) -> Row:
    target = os.environ.get("HERALD_RELIABILITY")
    if target:
        with Path(target).open("a", encoding="utf-8") as out:
            out.write(json.dumps(asdict(row)) + "\n")
    return row


def table(path: Path) -> list[str]:
    rows = [Row(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    return [
        "| scenario | runs | converged | time to converge, s (p50 / max) | lost | duplicate applies |",
        "|---|---|---|---|---|---|",
        *(row.line() for row in rows),
    ]
