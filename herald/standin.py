"""A stand-in for nixos-rebuild, for `herald demo` and the tests.

    python -m herald.standin --record FILE [--control DIR] [--root ROOT] OPERATION ARG...

Appends one JSON line to FILE: the time it started and its arguments. If DIR/sleep exists, it
then sleeps that many seconds; if DIR/fail exists it exits 1; if DIR/hang exists it sleeps
until killed. If DIR/system names a directory (a system with kernel, initrd and
kernel-modules links), it points ROOT/nix/var/nix/profiles/system at it for `switch` and
`boot`, and ROOT/run/current-system for `switch` and `test`, as nixos-rebuild does. It never
touches the system.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path


def activate(root: Path, system: str, operation: str) -> None:
    links = {
        "switch": ["nix/var/nix/profiles/system", "run/current-system"],
        "boot": ["nix/var/nix/profiles/system"],
    }
    for link in links.get(operation, ["run/current-system"] if operation == "test" else []):
        path = root / link
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.new")
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(system)
        temporary.replace(path)


def main() -> int:
    parser = argparse.ArgumentParser(prog="herald.standin")
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--control", type=Path)
    parser.add_argument("--root", type=Path)
    parser.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args()
    entry = {"t": time.time(), "pid": os.getpid(), "args": options.args}
    with options.record.open("a", encoding="utf-8") as record:
        record.write(json.dumps(entry) + "\n")
    print(f"stand-in rebuild: {' '.join(options.args)}")
    control = options.control
    if control is not None and (control / "sleep").exists():
        time.sleep(float((control / "sleep").read_text()))
    if control is not None and (control / "hang").exists():
        print("hanging on purpose", flush=True)
        time.sleep(3600)
    if control is not None and (control / "fail").exists():
        print("failing on purpose", file=sys.stderr)
        return 1
    if control is not None and options.root is not None and (control / "system").exists():
        activate(options.root, (control / "system").read_text().strip(), options.args[0])
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
