"""`python -m bench [--quick]`: run every benchmark, write bench/RESULTS.md.

Each benchmark compares herald with a baseline measured in the same run, so the ratios hold
on a machine whose speed swings from run to run.
"""

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import agent, broker, publish
from protocol import log
from tests.reliability import table

RESULTS = Path(__file__).with_name("RESULTS.md")


def reliability() -> str:
    """Run the fault suite (pytest -m faults) and turn the figures it records into a table."""
    with tempfile.TemporaryDirectory(prefix="herald-reliability-") as tmp:
        figures = Path(tmp) / "rows.jsonl"
        figures.touch()
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-m", "faults", "-q", "-p", "no:cacheprovider"],
            env=os.environ | {"HERALD_RELIABILITY": str(figures)},
            check=False,
        )
        verdict = "every test passed" if done.returncode == 0 else "**some tests failed** (see the run)"
        lines = [
            "## Reliability",
            "",
            f"`pytest -m faults` (tests/test_faults.py), the same tests CI runs: {verdict}.",
            "",
            *table(figures),
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="small sizes, one round: to try the benchmarks")
    options = parser.parse_args()
    log.setup("WARNING")
    hosts, rounds = (100, 1) if options.quick else (1000, 3)
    started = time.monotonic()
    sections = [
        publish.main(hosts, rounds),
        broker.main((10, 100) if options.quick else (100, 1000)),
        agent.main(10 if options.quick else 100),
    ]
    if not options.quick:
        sections.append(reliability())
    system = f"{platform.system()} {platform.release()}"
    machine = f"{os.cpu_count()} cores, {system}, Python {platform.python_version()}"
    quick = " (--quick: small sizes, not the figures to quote)" if options.quick else ""
    took = f"{time.monotonic() - started:.0f} s in all"
    header = [
        "# Benchmark results",
        "",
        f"Written by `make bench` on {time.strftime('%Y-%m-%d')}: {machine}; {took}.{quick}",
        "",
    ]
    RESULTS.write_text("\n".join(header + sections))
    print(RESULTS.read_text())


if __name__ == "__main__":
    main()
