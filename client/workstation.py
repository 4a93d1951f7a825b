"""For machines with a person in front of them: reboots, battery, metered links, suspend, notices.

Each check reads what the system already publishes (sysfs, the /run/*-system links,
NetworkManager) and fails towards doing the update: a value that cannot be read never
postpones anything, and never reboots anything.
"""

import asyncio
import os
import pwd
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final

from loguru import logger

from protocol.settings import AgentNotify, AgentPostpone, seconds

_SYSTEM_PARTS: Final = ("kernel", "initrd", "kernel-modules")
_MAX_LINKS: Final = 40
_AC_TYPES: Final = frozenset({"Mains", "USB", "Wireless"})
_METERED: Final = frozenset({"u 1", "u 3", "yes", "yes (guessed)"})
_COMMAND_TIMEOUT: Final = 10.0

# ---------------------------------------------------------------- reboot needed


def _resolve(root: Path, path: str) -> Path | None:
    """`path` (absolute, as seen on the machine) with its symlinks followed inside `root`."""
    parts = [part for part in path.split("/") if part]
    here = root
    hops = 0
    while parts:
        part = parts.pop(0)
        candidate = here / part
        if candidate.is_symlink():
            hops += 1
            if hops > _MAX_LINKS:
                return None
            target = str(candidate.readlink())
            parts = [p for p in target.split("/") if p] + parts
            if target.startswith("/"):
                here = root
        elif part == "..":
            here = here.parent if here != root else root
        else:
            here = candidate
    return here


def _system(root: Path, path: str) -> tuple[str, ...] | None:
    """What the kernel, initrd and kernel-modules links of the system at `path` point to."""
    system = _resolve(root, path)
    if system is None or not system.is_dir():
        return None
    try:
        return tuple(str((system / part).readlink()) for part in _SYSTEM_PARTS)
    except OSError:
        return None


def reboot_needed(root: Path) -> bool:
    """Does the system that boots next run another kernel, initrd or kernel modules than now?

    The next boot's system is the system profile (what `switch` and `boot` set); without one,
    /run/current-system. Not NixOS, or any link missing: False.
    """
    booted = _system(root, "/run/booted-system")
    if booted is None:
        return False
    profile = "/nix/var/nix/profiles/system"
    following = _system(root, profile if _resolve(root, profile) is not None else "/run/current-system")
    if following is None:
        following = _system(root, "/run/current-system")
    return following is not None and following != booted


# ---------------------------------------------------------------- reboot window


def parse_window(window: str) -> tuple[int, int]:
    """Minutes after midnight of the start and end of '02:00-04:00'."""
    start, _, end = window.partition("-")
    return tuple(int(t[:2]) * 60 + int(t[3:]) for t in (start, end))  # type: ignore[return-value]


def until_window(window: str, at: datetime) -> float:
    """Seconds until `window` (local time) opens; 0 inside it. A window may cross midnight."""
    start, end = parse_window(window)
    minute = at.hour * 60 + at.minute
    inside = start <= minute < end if start <= end else (minute >= start or minute < end)
    if inside:
        return 0.0
    opens = at.replace(hour=start // 60, minute=start % 60, second=0, microsecond=0)
    if opens <= at:
        opens += timedelta(days=1)
    return (opens - at).total_seconds()


# ---------------------------------------------------------------- power and network


def on_battery(power_supply: Path) -> bool:
    """No mains (or USB, wireless) supply online, and a battery discharging."""
    ac_online = False
    discharging = False
    try:
        supplies = list(power_supply.iterdir())
    except OSError:
        return False
    for supply in supplies:
        kind = _read(supply / "type")
        if kind in _AC_TYPES and _read(supply / "online") == "1":
            ac_online = True
        elif kind == "Battery" and _read(supply / "status") == "Discharging":
            discharging = True
    return discharging and not ac_online


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return ""


async def metered(argv: list[str]) -> bool:
    """Is the machine's connection metered? Anything unreadable counts as not metered."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError as exc:
        logger.debug("metered check {} not run: {}", argv[0], exc)
        return False
    try:
        async with asyncio.timeout(_COMMAND_TIMEOUT):
            output, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return False
    return proc.returncode == 0 and output.decode(errors="replace").strip() in _METERED


async def postpone_reason(policy: AgentPostpone) -> str | None:
    """Why a new generation should wait now, or None."""
    if policy.on_battery and on_battery(Path(policy.power_supply)):
        return "on battery"
    if policy.on_metered and await metered(policy.metered):
        return "on a metered connection"
    return None


# ---------------------------------------------------------------- suspend


def clocks() -> tuple[float, float]:
    """(time since boot including suspend, monotonic time without it)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME), time.monotonic()


class SuspendWatch:
    """Notices that the machine slept: boot time ran on while monotonic time stood still."""

    def __init__(
        self, tick: float = 10.0, threshold: float = 5.0, source: Callable[[], tuple[float, float]] = clocks
    ) -> None:
        self.tick = tick  # how often to look
        self.threshold = threshold
        self.source = source
        self._last = self.source()

    def slept(self) -> float:
        """Seconds asleep since the last call (0.0 if under the threshold)."""
        boot, mono = self.source()
        asleep = (boot - self._last[0]) - (mono - self._last[1])
        self._last = (boot, mono)
        return asleep if asleep >= self.threshold else 0.0


# ---------------------------------------------------------------- notifications


class Notifier:
    """Desktop notifications on every session bus under runtime_dir, as the session's user."""

    def __init__(self, config: AgentNotify, host: str) -> None:
        self.config = config
        self.log = logger.bind(host=host)

    def sessions(self) -> list[tuple[int, Path]]:
        """(uid, bus socket) for every user with a session bus."""
        try:
            entries = list(Path(self.config.runtime_dir).iterdir())
        except OSError:
            return []
        return sorted((int(e.name), e / "bus") for e in entries if e.name.isdigit() and (e / "bus").exists())

    async def send(self, summary: str, body: str, urgency: str = "normal") -> int:
        """Show the notice; returns how many sessions were told. Never raises."""
        if self.config.command is None:
            return 0
        told = 0
        for uid, bus in self.sessions():
            values = {"summary": summary, "body": body, "urgency": urgency}
            argv = [word.format_map(values) for word in self.config.command]
            if await self._run(argv, uid, bus):
                told += 1
        return told

    async def _run(self, argv: list[str], uid: int, bus: Path) -> bool:
        env = {
            "DBUS_SESSION_BUS_ADDRESS": f"unix:path={bus}",
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        }
        user: dict[str, int] = {}
        if os.geteuid() == 0 and uid != 0:
            try:
                account = pwd.getpwuid(uid)
            except KeyError:
                self.log.warning("notification for uid {} skipped: no such user", uid)
                return False
            env |= {"HOME": account.pw_dir, "USER": account.pw_name}
            user = {"user": uid, "group": account.pw_gid}
        elif os.geteuid() != 0 and uid != os.geteuid():
            return False  # another user's session: not ours to write to
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                env=env,
                **user,  # type: ignore[arg-type]
            )
        except OSError as exc:
            self.log.warning("notification not sent: {}: {}", argv[0], exc.strerror)
            return False
        try:
            async with asyncio.timeout(seconds(self.config.timeout)):
                code = await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            self.log.warning("notification command {} killed after {}", argv[0], self.config.timeout)
            return False
        if code != 0:
            self.log.warning("notification command {} exited with {}", argv[0], code)
        return code == 0
