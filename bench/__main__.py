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

from bench import agent, broker, closure, publish, rollout
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


SECTIONS = ("publish", "broker", "agent", "rollout", "closure", "reliability")


def _section(name: str, *, quick: bool) -> str:
    hosts, rounds = (100, 1) if quick else (1000, 3)
    if name == "publish":
        return publish.main(hosts, rounds)
    if name == "broker":
        return broker.main((10, 100) if quick else (100, 1000))
    if name == "agent":
        return agent.main(10 if quick else 100)
    if name == "rollout":
        return rollout.main(10 if quick else 100, hosts)
    if name == "closure":
        return closure.main(*((5, 30, 20) if quick else (50, 300, 200)))
    return reliability()


def _splice(old: str, new: dict[str, str]) -> list[str]:
    """RESULTS.md's sections (after its header), those named in `new` replaced, in SECTIONS' order."""
    kept: dict[str, str] = {}
    for part in old.split("\n## ")[1:]:
        title = part.split("\n", 1)[0].strip()
        kept[title.lower()] = "## " + part.rstrip("\n") + "\n"
    kept |= new
    return [kept[name] for name in SECTIONS if name in kept]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="small sizes, one round: to try the benchmarks")
    parser.add_argument(
        "--only",
        metavar="NAME",
        action="append",
        choices=SECTIONS,
        help="run this benchmark only (repeatable) and replace its section of RESULTS.md, keeping the rest",
    )
    options = parser.parse_args()
    log.setup("WARNING")
    started = time.monotonic()
    names = options.only or [name for name in SECTIONS if not (options.quick and name == "reliability")]
    ran = {name: _section(name, quick=options.quick) for name in names}
    sections = _splice(RESULTS.read_text(), ran) if options.only and RESULTS.exists() else list(ran.values())
    system = f"{platform.system()} {platform.release()}"
    machine = f"{os.cpu_count()} cores, {system}, Python {platform.python_version()}"
    quick = " (--quick: small sizes, not the figures to quote)" if options.quick else ""
    took = f"{time.monotonic() - started:.0f} s in all"
    only = (
        f" (only {', '.join(names)} run then; the other sections are from an earlier run)"
        if options.only
        else ""
    )
    header = [
        "# Benchmark results",
        "",
        f"Written by `make bench` on {time.strftime('%Y-%m-%d')}: {machine}; {took}.{quick}{only}",
        "",
    ]
    RESULTS.write_text("\n".join(header + sections))
    print(RESULTS.read_text())


if __name__ == "__main__":
    main()
