"""Apply a verified release: install `files/` into the root, then run the rebuild command."""

import asyncio
import contextlib
import os
import signal
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TextIO

from protocol.errors import RebuildError
from protocol.release import Manifest
from protocol.settings import AgentConfig, Operation

FILES: Final = "files/"
_KILL_GRACE: Final = 10.0


def operation_of(config: AgentConfig, manifest: Manifest) -> Operation:
    """switch, boot or test: agent.toml's choice, else the fleet's (fleet.toml, via MANIFEST)."""
    return Operation(config.rebuild.operation or manifest.content.operation)


def rebuild_argv(config: AgentConfig, manifest: Manifest, tree: Path) -> list[str]:
    """The rebuild command for this release, placeholders filled in."""
    flake = manifest.content.flake
    if config.rebuild.command is not None:
        template = config.rebuild.command
    elif flake is not None:
        template = ["nixos-rebuild", "{operation}", "--flake", "{dir}#{flake}"]
    else:
        template = ["nixos-rebuild", "{operation}", "-I", "nixos-config={dir}/configuration.nix"]
    operation = operation_of(config, manifest).value
    return _fill(
        template, "rebuild.command", operation=operation, dir=str(tree), host=config.host, flake=flake or ""
    )


def rollback_argv(config: AgentConfig) -> list[str]:
    """The command that returns the host to the system deployed before."""
    return _fill(config.rebuild.rollback, "rebuild.rollback", host=config.host)


def _fill(template: list[str], where: str, **values: str) -> list[str]:
    try:
        return [part.format_map(values) for part in template]
    except (KeyError, ValueError, IndexError) as exc:
        raise RebuildError(f"agent.toml: {where}: bad placeholder {exc}") from exc


def install_files(manifest: Manifest, tree: Path, root: Path) -> list[str]:
    """Copy the release's files/ into `root`, modes kept, each file replaced atomically. A file
    that is already there as the release has it (content, mode, owner) is left alone: it is not
    rewritten on every update, and whatever watches it is not woken for nothing. Returns the
    paths written."""
    installed = []
    for entry in manifest.content.files:
        if not entry.path.startswith(FILES):
            continue
        relative = entry.path.removeprefix(FILES)
        target = root / relative
        data = (tree / entry.path).read_bytes()
        if _holds(target, data, entry.mode):
            continue
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        tmp = target.with_name(f".{target.name}.herald-{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            tmp.chmod(entry.mode)
            tmp.replace(target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        installed.append("/" + relative)
    return installed


def _holds(target: Path, data: bytes, mode: int) -> bool:
    """True if `target` is a regular file of ours with exactly this content and mode."""
    try:
        info = target.lstat()
        if (
            not stat.S_ISREG(info.st_mode)
            or stat.S_IMODE(info.st_mode) != mode
            or (info.st_uid, info.st_gid) != (os.geteuid(), os.getegid())
            or info.st_size != len(data)
        ):
            return False
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as stream:
        return stream.read(len(data) + 1) == data


@dataclass(frozen=True, slots=True)
class RebuildResult:
    returncode: int | None  # None: killed at the timeout
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


async def run_rebuild(argv: list[str], *, timeout: float, log: TextIO) -> RebuildResult:
    """Run the rebuild command with its output into `log`; kill its process group at `timeout`."""
    started = time.monotonic()
    log.flush()
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log.fileno(),
            stderr=log.fileno(),
            start_new_session=True,
        )
    except OSError as exc:
        raise RebuildError(f"cannot start {argv[0]}: {exc.strerror}") from exc
    try:
        async with asyncio.timeout(timeout):
            returncode: int | None = await process.wait()
    except TimeoutError:
        await _kill(process)
        returncode = None
    except asyncio.CancelledError:
        await _kill(process)
        raise
    return RebuildResult(returncode, time.monotonic() - started)


async def _kill(process: asyncio.subprocess.Process) -> None:
    """SIGTERM the whole process group, SIGKILL whatever is left after a grace period."""
    for sig, grace in ((signal.SIGTERM, _KILL_GRACE), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await process.wait()
