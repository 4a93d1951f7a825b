"""Run a verified release's rebuild command (client.install puts its `files/` in place first)."""

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TextIO

import msgspec

from client.system import rollback_commands
from protocol.errors import RebuildError
from protocol.release import Manifest
from protocol.settings import AgentConfig, Operation

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
    return fill(
        template, "rebuild.command", operation=operation, dir=str(tree), host=config.host, flake=flake or ""
    )


def rebuild_commands(config: AgentConfig, manifest: Manifest, tree: Path) -> list[list[str]]:
    """What applies the release: its rebuild command; for a delivered system (already in the
    store), the commands that make it the system, as an exact rollback does (client.system),
    or `rebuild.rollback` with {system} the delivered path."""
    system = manifest.content.system
    if system is msgspec.UNSET:
        return [rebuild_argv(config, manifest, tree)]
    operation = operation_of(config, manifest)
    if config.rebuild.rollback is not None:
        values = {"host": config.host, "system": system.path, "operation": operation.value}
        return [fill(config.rebuild.rollback, "rebuild.rollback", **values)]
    return rollback_commands(Path(config.root), system.path, operation, config.store)


def fill(template: list[str], where: str, **values: str) -> list[str]:
    try:
        return [part.format_map(values) for part in template]
    except (KeyError, ValueError, IndexError) as exc:
        raise RebuildError(f"agent.toml: {where}: bad placeholder {exc}") from exc


@dataclass(frozen=True, slots=True)
class RebuildResult:
    returncode: int | None  # None: killed at the timeout
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


async def run_rebuild(
    argv: list[str], *, timeout: float, log: TextIO, on_start: Callable[[int], None] | None = None
) -> RebuildResult:
    """Run the rebuild command with its output into `log`; kill its process group at `timeout`.
    `on_start` is told its pid (the process leads a session of its own, and outlives a killed agent)."""
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
    if on_start is not None:
        on_start(process.pid)
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
