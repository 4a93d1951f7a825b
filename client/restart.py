"""The agent restarts itself when a deployment changed what it runs as.

The unit keeps `restartIfChanged = false`: the agent must survive the switch it runs, so nothing
restarts it then. Instead it compares, at start and after each confirmed deployment:

- agent.toml's bytes (the file it was started with);
- the version of the herald package that Python would import now (a package replaced in place,
  or a newer one earlier on the path);
- the package the system provides (`/run/current-system/sw/bin/herald`, under the agent's
  root), where NixOS installs a new herald as a new store path and leaves the running one be.

If any differs it restarts: `[restart] command` if set (the NixOS module asks systemd, which
then starts the unit's new ExecStart), else it executes itself again with the same arguments.
"""

import hashlib
import importlib
import importlib.metadata
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NoReturn

_PACKAGE: Final = "herald"
_PROVIDED: Final = "run/current-system/sw/bin/herald"


@dataclass(frozen=True, slots=True)
class Identity:
    config: str  # sha256 of agent.toml ("" when unreadable or not known)
    version: str  # of the herald package Python would import now
    provided: str  # where the system's herald resolves to ("" when there is none)


def identity(config_path: Path | None, root: Path) -> Identity:
    """What a restarted agent would run as, now."""
    try:
        config = hashlib.sha256(config_path.read_bytes()).hexdigest() if config_path else ""
    except OSError:
        config = ""  # being replaced: not a reason to restart by itself
    importlib.invalidate_caches()
    try:
        version = importlib.metadata.version(_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = ""
    program = root / _PROVIDED
    provided = os.path.realpath(program) if os.path.lexists(program) else ""
    return Identity(config, version, provided)


def changes(before: Identity, after: Identity) -> list[str]:
    """What changed, in words; [] for nothing (or only something that became unreadable)."""
    found = []
    if after.config and after.config != before.config:
        found.append("agent.toml changed")
    if after.version and after.version != before.version:
        found.append(f"herald {before.version or '?'} -> {after.version}")
    elif after.provided and after.provided != before.provided:
        found.append(f"the system's herald is now {after.provided}")
    return found


def execute_again() -> NoReturn:
    """Replace this process with the same command line (same pid, same environment)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])  # noqa: S606 - our own argv
