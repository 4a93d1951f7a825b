"""Checks a host's release must pass before it is published. A release that fails is never served.

By default every changed `.nix` file is parsed with `nix-instantiate --parse` (when nix is
installed), in one call per host; a content that parsed once is remembered by its sha256. A
`check` template in fleet.toml replaces that; a `build` template may follow it.
"""

import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import msgspec
from loguru import logger

from protocol.files import write_atomic
from protocol.nixstore import STORE_PATH_RE
from protocol.settings import PublishSettings, seconds
from publisher.materialise import Source

MAX_LINES: Final = 12  # lines of a failing check's output kept, from its start
MAX_LINE: Final = 300  # characters kept of each (a parse error quotes a long string whole)


class Checker:
    def __init__(self, settings: PublishSettings, memo: Path) -> None:
        self.settings = settings
        self.timeout = seconds(settings.timeout)
        self.nix = shutil.which("nix-instantiate") if settings.check is None else None
        self._memo_path = memo
        try:
            self._parsed: set[str] = msgspec.msgpack.decode(memo.read_bytes(), type=set[str])
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            self._parsed = set()
        if settings.check is None and self.nix is None:
            logger.warning("nix-instantiate not found: .nix files are published without a parse check")

    @property
    def idle(self) -> bool:
        """True when no check or build would run: nothing to wait for."""
        nothing_to_check = self.nix is None if self.settings.check is None else not self.settings.check
        return nothing_to_check and not self.settings.build

    def check(self, host: str, flake: str | None, files: Sequence[tuple[Source, str]]) -> str | None:
        """None if the host's release passes; else the first lines of what failed."""
        if self.settings.check is None:
            failure = self._parse(files)
        elif self.settings.check:
            failure = self._run_in_tree(self.settings.check, host, flake, files)
        else:
            failure = None
        if failure is None and self.settings.build:
            failure = self._run_in_tree(self.settings.build, host, flake, files)
        return failure

    def _parse(self, files: Sequence[tuple[Source, str]]) -> str | None:
        todo = [
            (source, sha) for source, sha in files if source.path.endswith(".nix") and sha not in self._parsed
        ]
        if self.nix is None or not todo:
            return None
        argv = [self.nix, "--store", "dummy://", "--parse", *(source.real for source, _ in todo)]
        failure = _run(argv, cwd=None, timeout=self.timeout)
        if failure is None:
            self._parsed.update(sha for _, sha in todo)
        return failure

    def build_system(
        self, template: list[str], host: str, flake: str | None, files: Sequence[tuple[Source, str]]
    ) -> tuple[str, str | None]:
        """(store path, None) of the system `template` built from the host's release; ('', what
        failed) if it failed or its last line of output is not a store path."""
        printed: list[str] = []
        failure = self._run_in_tree(template, host, flake, files, stdout=printed)
        if failure is not None:
            return "", failure
        lines = [line.strip() for line in "".join(printed).splitlines() if line.strip()]
        path = lines[-1] if lines else ""
        if not STORE_PATH_RE.fullmatch(path):
            return "", f"{template[0]} printed no store path as its last line ({path[:200]!r})"
        return path, None

    def push(self, template: list[str], host: str, system: str) -> str | None:
        """`[publish] push` for a built system: None if it succeeded, else what failed."""
        argv = [part.format_map({"system": system, "host": host}) for part in template]  # checked when loaded
        return _run(argv, cwd=None, timeout=self.timeout)

    def _run_in_tree(
        self,
        template: list[str],
        host: str,
        flake: str | None,
        files: Sequence[tuple[Source, str]],
        stdout: list[str] | None = None,
    ) -> str | None:
        with tempfile.TemporaryDirectory(prefix=f"herald-check-{host}-") as tmp:
            tree = Path(tmp)
            for source, _ in files:
                target = tree / source.path
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source.real, target)
                target.chmod(source.mode)
            values = {"release": str(tree), "host": host, "flake": flake or host}
            try:
                argv = [part.format_map(values) for part in template]
            except (KeyError, ValueError, IndexError) as exc:
                return f"fleet.toml: publish: bad placeholder {exc} in {template}"
            return _run(argv, cwd=tree, timeout=self.timeout, stdout=stdout)

    def save(self) -> None:
        if self.settings.check is None and self.nix is not None:
            write_atomic(
                self._memo_path, msgspec.msgpack.encode(sorted(self._parsed)), mode=0o600, durable=False
            )


def _run(argv: list[str], *, cwd: Path | None, timeout: float, stdout: list[str] | None = None) -> str | None:
    try:
        done = subprocess.run(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        return f"{argv[0]}: command not found"
    except subprocess.TimeoutExpired:
        return f"{argv[0]}: no result within {timeout:g}s"
    if done.returncode == 0:
        if stdout is not None:
            stdout.append(done.stdout)
        return None
    lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()][:MAX_LINES]
    return "\n".join(map(_capped, lines)) or f"{argv[0]} exited with {done.returncode}"


def _capped(line: str) -> str:
    if len(line) <= MAX_LINE:
        return line
    return f"{line[:MAX_LINE]}... ({len(line) - MAX_LINE} more characters)"
