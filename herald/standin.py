"""A stand-in for nixos-rebuild, for `herald demo` and the tests.

    python -m herald.standin --record FILE [--control DIR] [--root ROOT] OPERATION ARG...

Appends one JSON line to FILE: the time it started, its arguments and the system it switches
to ("system", when DIR/system names one and it will not fail). If DIR/sleep exists, it then
sleeps that many seconds; if DIR/fail exists it exits 1; if DIR/hang exists it sleeps until
killed; if DIR/fail-after exists it switches (below), then exits 1, as a switch whose
activation failed; if DIR/fail-after-profile exists it sets only the system profile (for switch
and boot), then exits 1, as a switch whose `nix-env --set` ran and whose activation failed before
/run/current-system changed. If DIR/system names a directory (a system with kernel, initrd and kernel-modules
links), it points ROOT/nix/var/nix/profiles/system at it for `switch` and `boot`, and
ROOT/run/current-system for `switch` and `test`, as nixos-rebuild does. If that system is a
real store path with bin/switch-to-configuration, it does what nixos-rebuild does with it:
`nix-env --profile ROOT/nix/var/nix/profiles/system --set SYSTEM` (switch, boot), then
`SYSTEM/bin/switch-to-configuration OPERATION`. It never touches the machine's own system.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def activate(root: Path, system: str, operation: str, *, profile_only: bool = False) -> None:
    links = {
        "switch": ["nix/var/nix/profiles/system", "run/current-system"],
        "boot": ["nix/var/nix/profiles/system"],
    }
    chosen = links.get(operation, ["run/current-system"] if operation == "test" else [])
    for link in [link for link in chosen if not profile_only or link.endswith("profiles/system")]:
        path = root / link
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.new")
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(system)
        temporary.replace(path)


def activate_store_path(root: Path, system: str, operation: str, *, profile_only: bool = False) -> int:
    """As nixos-rebuild with a built system: set the profile (a new generation only if the path
    differs, as Nix does), then run the system's own switch-to-configuration."""
    if operation in ("switch", "boot"):
        profile = root / "nix/var/nix/profiles/system"
        profile.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["nix-env", "--profile", str(profile), "--set", system], check=True)  # noqa: S607
    if profile_only:
        return 0
    return subprocess.run([f"{system}/bin/switch-to-configuration", operation], check=False).returncode


def switch(root: Path, system: str, operation: str, *, profile_only: bool) -> int:
    """Make `system` the one `operation` switches to: a built store path as nixos-rebuild does,
    else the links alone."""
    if Path(system, "bin", "switch-to-configuration").exists():
        return activate_store_path(root, system, operation, profile_only=profile_only)
    activate(root, system, operation, profile_only=profile_only)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="herald.standin")
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--control", type=Path)
    parser.add_argument("--root", type=Path)
    parser.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args()
    control = options.control
    entry = {"t": time.time(), "pid": os.getpid(), "args": options.args}
    system = None
    if control is not None and options.root is not None and (control / "system").exists():
        system = (control / "system").read_text().strip()
        if not (control / "fail").exists():
            entry["system"] = system
    with options.record.open("a", encoding="utf-8") as record:
        record.write(json.dumps(entry) + "\n")
    print(f"stand-in rebuild: {' '.join(options.args)}")
    if control is not None and (control / "sleep").exists():
        time.sleep(float((control / "sleep").read_text()))
    if control is not None and (control / "hang").exists():
        print("hanging on purpose", flush=True)
        time.sleep(3600)
    if control is not None and (control / "fail").exists():
        print("failing on purpose", file=sys.stderr)
        return 1
    profile_only = control is not None and (control / "fail-after-profile").exists()
    if system is not None and options.root is not None:
        code = switch(options.root, system, options.args[0], profile_only=profile_only)
        if code != 0:
            return code
    if profile_only:
        print("set the system profile, then failing on purpose", file=sys.stderr)
        return 1
    if control is not None and (control / "fail-after").exists():
        print("activated, then failing on purpose", file=sys.stderr)
        return 1
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
