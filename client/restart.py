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

A restart into an agent that cannot start would leave no agent to roll anything back, so before
a deployment that changed any of them counts as confirmed, the agent runs the one that would
start, with `--check-config` (agent.toml loaded strictly, the agent's modules imported), in a
subprocess bounded in time (`new_agent_problem`); if it fails, the deployment is rolled back.
"""

import asyncio
import contextlib
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
CHECK_TIMEOUT: Final = 60.0
_SAID: Final = 400  # characters of the check's output kept for the state message


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


def restarted_argv(root: Path, restart_command: list[str] | None) -> list[str]:
    """The command line the restarted agent runs: with a service manager restarting it, the
    herald the system provides now (the unit's new package) if there is one, with this
    process's arguments; else this process's own command line (`execute_again`)."""
    provided = root / _PROVIDED
    if restart_command is not None and os.path.lexists(provided):
        return [os.path.realpath(provided), *sys.argv[1:]]
    return [sys.executable, *sys.orig_argv[1:]]


async def new_agent_problem(argv: list[str], timeout: float = CHECK_TIMEOUT) -> str | None:
    """Run `argv --check-config`: None if the agent it names would start, else why not."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            "--check-config",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as exc:
        return f"the new agent would not start: {argv[0]}: {exc.strerror}"
    try:
        async with asyncio.timeout(timeout):
            output, _ = await process.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        return f"the new agent would not start: its check did not end within {timeout:g}s"
    if process.returncode == 0:
        return None
    lines = [line for line in output.decode("utf-8", "replace").splitlines() if line.strip()]
    said = lines[-1].strip()[-_SAID:] if lines else f"exit code {process.returncode}"
    return f"the new agent would not start: {said}"


def execute_again() -> NoReturn:
    """Replace this process with the same command line (same pid, same environment)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])  # noqa: S606 - our own argv
