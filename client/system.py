"""The running NixOS system: which store path it is, and returning to exactly one.

Before a rebuild the agent records both system links, the system profile (what boots next) and
`/run/current-system` (what runs): a rebuild can move either, or one and then fail (nix-env set
the profile, then the activation failed before /run/current-system changed). After a failure
each link that moved goes back to exactly the path it had (`restore_commands`); a rollback
switches to exactly the recorded path:

    nix-env -p /nix/var/nix/profiles/system --set PATH     (switch and boot)
    PATH/bin/switch-to-configuration switch|boot|test

never "one profile generation back": Nix makes no new generation when a profile is set to the
path it has (a release that changes only files/, a forced rebuild), so `--rollback` can go back
two systems (FINDINGS.md). Paths are read under the agent's `root`, as every path it installs.

The same two commands switch to a system the publisher built (`deliver = "closure"`): switching
to a delivered path and returning to a recorded one are one act. `store` is the root of the Nix
store the systems are in: "/" on a host, another directory for a chroot store, whose paths are
run from below it and whose profile nix-env sets with `--store`.
"""

from pathlib import Path
from typing import Final

import msgspec

from protocol.settings import Operation

PROFILE: Final = "nix/var/nix/profiles/system"
CURRENT: Final = "run/current-system"
STORE: Final = "/nix/store/"
_MAX_LINKS: Final = 40


def system_link(operation: Operation) -> str:
    """Which link says what the operation changed: the profile for boot, else the running system."""
    return PROFILE if operation is Operation.BOOT else CURRENT


class Systems(msgspec.Struct, frozen=True, kw_only=True):
    """The store paths both system links point to (None: no such link)."""

    profile: str | None  # nix/var/nix/profiles/system: what boots next
    running: str | None  # run/current-system: what runs


def systems(root: Path) -> Systems:
    return Systems(profile=store_path(root, PROFILE), running=store_path(root, CURRENT))


def _set_profile(root: Path, system: str, store: str) -> list[str]:
    chroot_store = ["--store", store] if store != "/" else []
    return ["nix-env", *chroot_store, "--profile", str(root / PROFILE), "--set", system]


def _activate(system: str, operation: Operation, store: str) -> list[str]:
    executable = f"{system}/bin/switch-to-configuration"
    if store != "/":
        executable = str(Path(store) / executable.lstrip("/"))
    return [executable, operation.value]


def restore_commands(root: Path, before: Systems, now: Systems, store: str = "/") -> list[list[str]]:
    """The commands that put back each link that moved from `before` (none if none moved)."""
    profile = before.profile if before.profile is not None and now.profile != before.profile else None
    running = before.running if before.running is not None and now.running != before.running else None
    commands = []
    if profile is not None:
        commands.append(_set_profile(root, profile, store))
    if profile is not None and profile == running:
        commands.append(_activate(profile, Operation.SWITCH, store))
        return commands
    if profile is not None:
        commands.append(_activate(profile, Operation.BOOT, store))
    if running is not None:
        commands.append(_activate(running, Operation.TEST, store))
    return commands


def current_system(root: Path, operation: Operation) -> str | None:
    """The store path (as seen on the machine) that `operation` would replace, or None."""
    return store_path(root, system_link(operation))


def store_path(root: Path, link: str) -> str | None:
    """Follow `link` (a path below `root`) through links until a /nix/store path; None if it
    is not a link to one (not NixOS, or no system yet)."""
    here = root / link
    for _ in range(_MAX_LINKS):
        try:
            target = str(here.readlink())
        except OSError:
            return None
        if target.startswith(STORE):
            name = target.removeprefix(STORE).split("/", 1)[0]
            return STORE + name if name else None
        here = root / target.lstrip("/") if target.startswith("/") else here.parent / target
    return None


def rollback_commands(root: Path, system: str, operation: Operation, store: str = "/") -> list[list[str]]:
    """The commands that make `system` the one running (switch, test) or booting next (boot)."""
    commands = []
    if operation is not Operation.TEST:
        commands.append(_set_profile(root, system, store))
    commands.append(_activate(system, operation, store))
    return commands
