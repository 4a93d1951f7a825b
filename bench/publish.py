"""Publish speed against `cp -rL` of the same hosts, measured alternately in the same run.

Scenarios on a synthetic fleet (bench.fleetgen): cold publish, no-change publish, one host
changed, one shared file changed (every host changes). Times are the publisher's work in
process; `herald publish` adds the interpreter's start (measured once, reported beside).
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.fleetgen import make_fleet
from publisher.publish import Status, publish

RACY = 2.1  # seconds: files younger than this are re-hashed (publisher.hashcache)


@dataclass
class Figures:
    hosts: int
    times: dict[str, list[float]] = field(default_factory=dict)
    entries: dict[str, int] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.times.setdefault(name, []).append(seconds)

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def worst(self, name: str) -> float:
        return max(self.times[name])


def _entries(root: Path) -> dict[str, int]:
    """path -> inode of every entry below root: what a run created or replaced shows as a change."""
    found: dict[str, int] = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)  # noqa: PTH118
            found[path] = os.lstat(path).st_ino
    return found


def _written(before: dict[str, int], after: dict[str, int]) -> int:
    return sum(1 for path, inode in after.items() if before.get(path) != inode)


def _timed_publish(fleet: Path, state: Path) -> tuple[float, list[Status]]:
    os.sync()  # each step starts with nothing waiting to be written (see _timed_copy)
    started = time.perf_counter()
    report = publish(fleet, state)
    return time.perf_counter() - started, [result.status for result in report.hosts]


def _timed_copy(fleet: Path, target: Path) -> float:
    """cp -rL's own time. It leaves its files to be written back later; the next step starts
    after a sync, so that a publish (which makes its own files durable) does not pay for them."""
    os.sync()
    started = time.perf_counter()
    subprocess.run(["cp", "-rL", str(fleet / "hosts"), str(target)], check=True)
    return time.perf_counter() - started


def run(hosts: int, rounds: int, *, check_round: bool = True) -> Figures:
    figures = Figures(hosts)
    for index in range(rounds):
        with tempfile.TemporaryDirectory(prefix="herald-bench-", dir="/var/tmp") as tmp:
            root = Path(tmp)
            fleet, state = root / "fleet", root / "state"
            names = make_fleet(fleet, hosts)
            toml = fleet / "fleet.toml"
            toml.write_text(
                "[publish]\ncheck = []\n\n" + toml.read_text()
            )  # file work only; the check is measured below
            time.sleep(RACY)
            # Alternate which runs first, so that neither always meets a warm or a cold cache.
            order = ("copy", "publish") if index % 2 == 0 else ("publish", "copy")
            for step in order:
                if step == "copy":
                    figures.add("cold: cp -rL", _timed_copy(fleet, root / "copy"))
                else:
                    seconds, statuses = _timed_publish(fleet, state)
                    assert statuses.count(Status.CHANGED) == hosts
                    figures.add("cold", seconds)
            figures.entries["cold: cp -rL"] = len(_entries(root / "copy"))
            figures.entries["cold"] = len(_entries(state))

            before = _entries(state)
            seconds, statuses = _timed_publish(fleet, state)
            assert statuses.count(Status.UNCHANGED) == hosts
            figures.add("no change", seconds)
            figures.entries["no change"] = _written(before, _entries(state))
            figures.add("no change: cp -rL", _timed_copy(fleet, root / "copy2"))

            (fleet / "hosts" / names[hosts // 2] / "configuration.nix").write_text(
                "{ ... }: { changed = true; }\n"
            )
            before = _entries(state)
            seconds, statuses = _timed_publish(fleet, state)
            assert statuses.count(Status.CHANGED) == 1
            figures.add("one host changed", seconds)
            figures.entries["one host changed"] = _written(before, _entries(state))

            (fleet / "common" / "module07.nix").write_text("{ ... }: { shared.changed = true; }\n")
            before = _entries(state)
            seconds, statuses = _timed_publish(fleet, state)
            assert statuses.count(Status.CHANGED) == hosts
            figures.add("one shared file changed", seconds)
            figures.entries["one shared file changed"] = _written(before, _entries(state))

            if check_round and index == 0 and shutil.which("nix-instantiate"):
                figures.notes["check"] = _check_cost(fleet, root / "checked")
            if index == 0:
                figures.notes["cli"] = _cli_no_change(fleet, state)
            shutil.rmtree(root / "copy", ignore_errors=True)
            shutil.rmtree(root / "copy2", ignore_errors=True)
    return figures


def _check_cost(fleet: Path, state: Path) -> str:
    """A cold publish with the default check (nix-instantiate --parse of every .nix file)."""
    toml = fleet / "fleet.toml"
    toml.write_text(toml.read_text().replace("[publish]\ncheck = []\n", "[publish]\n", 1))
    try:
        seconds, statuses = _timed_publish(fleet, state)
    finally:
        toml.write_text(toml.read_text().replace("[publish]\n", "[publish]\ncheck = []\n", 1))
    assert Status.FAILED not in statuses
    return f"{seconds:.2f} s"


def _cli_no_change(fleet: Path, state: Path) -> str:
    """`herald publish` as a command, no change: the publisher plus the interpreter's start."""
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "herald", "publish", "--fleet", str(fleet), "--state", str(state)],
        check=True,
        capture_output=True,
    )
    return f"{time.perf_counter() - started:.2f} s"


def section(big: Figures, small: Figures, rounds: int) -> str:
    cold, copy = big.median("cold"), big.median("cold: cp -rL")
    rows = [
        ("cold publish", "cold", f"≤ 2 x cp -rL ({2 * copy:.2f} s)", cold <= 2 * copy),
        ("no-change publish", "no change", "≤ 0.5 s", big.median("no change") <= 0.5),
        (
            "one host changed",
            "one host changed",
            "≤ 0.5 s, one new release",
            big.median("one host changed") <= 0.5,
        ),
        (
            "one shared file changed",
            "one shared file changed",
            f"≤ 15% of cold ({0.15 * cold:.2f} s)",
            big.median("one shared file changed") <= 0.15 * cold,
        ),
    ]
    lines = [
        "## Publish",
        "",
        f"`bench/publish.py`: a synthetic fleet of {big.hosts} hosts, each with 20 files of its own and 20",
        "shared files reached through a `common -> ../../common` symlink. Publisher time in process,",
        f"median (worst) of {rounds} rounds; `cp -rL hosts/` of the same fleet is the baseline, run",
        "alternately with herald in the same rounds; every step starts after a `sync`, so that none",
        "pays for what an earlier one left to write back. Entries = directory entries created or replaced.",
        "",
        "| scenario | herald | cp -rL | herald / cp -rL | entries written | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    baselines = {"cold": "cold: cp -rL", "no change": "no change: cp -rL"}
    for label, key, target, met in rows:
        base = baselines.get(key, "no change: cp -rL")
        ratio = big.median(key) / big.median(base)
        lines.append(
            f"| {label} | {big.median(key):.2f} s ({big.worst(key):.2f}) | {big.median(base):.2f} s "
            f"| {ratio:.2f} | {big.entries[key]} | {target} | {'yes' if met else '**no**'} |"
        )
    cli = big.notes.get("cli", "-")
    check = big.notes.get("check", "nix not installed")
    no_change, copy_again = small.median("no change"), small.median("no change: cp -rL")
    lines += [
        "",
        (
            f"cp -rL wrote {big.entries['cold: cp -rL']} entries for the copy. `herald publish` as a command "
            f"with no change: {cli} (the interpreter's start included). A cold publish with the default "
            f"check (`nix-instantiate --parse` of every changed .nix file): {check}."
        ),
        "",
        f"### {small.hosts} hosts, beside bento (FINDINGS.md: the seed's shell implementation)",
        "",
        "| scenario | bento | herald | cp -rL |",
        "|---|---|---|---|",
        f"| no-change deploy | ~15 s | {no_change:.2f} s | {copy_again:.2f} s |",
        f"| one host changed | ~16 s | {small.median('one host changed'):.2f} s | - |",
        f"| cold | - | {small.median('cold'):.2f} s | {small.median('cold: cp -rL'):.2f} s |",
        "",
        "bento's figures are from FINDINGS.md (same kind of machine, stand-ins for Nix), not re-run here.",
        "",
    ]
    return "\n".join(lines)


def main(hosts: int = 1000, rounds: int = 3) -> str:
    big = run(hosts, rounds)
    small = run(200, rounds, check_round=False)
    return section(big, small, rounds)


if __name__ == "__main__":
    print(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000))
