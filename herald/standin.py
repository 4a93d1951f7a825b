"""A stand-in for nixos-rebuild, for `herald demo` and the tests.

    python -m herald.standin --record FILE [--control DIR] ARG...

Appends one JSON line to FILE: the time it started and its arguments. If DIR/sleep exists, it
then sleeps that many seconds; if DIR/fail exists it exits 1; if DIR/hang exists it sleeps
until killed. It never touches the system.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(prog="herald.standin")
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--control", type=Path)
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
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
