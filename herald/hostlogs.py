"""A host's logs/ on the server, read as hostile data: for `herald logs`, the fleet page and the
SFTP-only fleet view.

STATE/chroot/<host>/logs/ is written by the host (with OpenSSH it can make links, FIFOs and
directories there), while what reads it runs as root. So every entry is lstat'ed, and only
regular files with one link are listed or read, opened with O_NOFOLLOW (and O_NONBLOCK, so a
FIFO swapped in cannot block) below a directory opened with O_NOFOLLOW, and checked again on the
descriptor. A name is one path component, never a path. Anything else is reported to `on_skip`
and never opened. Callers show names and contents through protocol.hosttext.safe.
"""

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from protocol.errors import ConfigError
from protocol.layout import StateDir
from protocol.release import LOG_NAME, LOGS

SHOWN: Final = 4 << 20  # bytes of one log read at most: its end, where a rebuild says what failed
_OPEN: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_DIRECTORY: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class LogFile:
    name: str  # as on disk (undecodable bytes as surrogates)
    size: int
    mtime: datetime


@dataclass(frozen=True, slots=True)
class LastRun:
    """A host's newest log named as an agent names it: what the SFTP-only fleet view shows."""

    name: str
    at: datetime  # when the run started, from the name
    generation: int
    result: str  # applied, failed, rolled-back


def not_a_log(info: os.stat_result) -> str | None:
    """Why an entry of a host's logs/ is neither listed nor read; None for a log."""
    mode = info.st_mode
    if stat.S_ISLNK(mode):
        return "a symbolic link (the host may have made it; links are never followed)"
    if stat.S_ISREG(mode):
        if info.st_nlink != 1:
            return f"a hard link ({info.st_nlink} names: its contents may be any other file's)"
        return None
    kinds = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket"}
    return next((kind for test, kind in kinds.items() if test(mode)), "a device or other special file")


def one_component(name: str) -> bool:
    """True if `name` can only name an entry of the directory itself, never a path."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


class HostLogs:
    """The logs of one host; `on_skip(name, why)` hears of every entry that is not a log."""

    def __init__(self, state: Path, host: str, on_skip: Callable[[str, str], None] | None = None) -> None:
        self.host = host
        self.path = StateDir(state).chroot(host) / LOGS
        self._on_skip = on_skip or (lambda _name, _why: None)

    def _directory(self) -> int:
        try:
            return os.open(self.path, _DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            raise ConfigError(
                f"{self.path}: no such host chroot (is {self.host} in fleet.toml, and published?)"
            ) from None
        except OSError as exc:  # e.g. a confined `herald serve` without CAP_DAC_READ_SEARCH (OpenSSH)
            raise ConfigError(f"{self.path}: {exc.strerror}") from None

    def listed(self) -> list[LogFile]:
        """The logs, newest first (an agent's names sort by time)."""
        directory = self._directory()
        found = []
        try:
            for name in os.listdir(directory):
                try:
                    info = os.lstat(name, dir_fd=directory)
                except FileNotFoundError:
                    continue
                why = not_a_log(info)
                if why is None:
                    found.append(LogFile(name, info.st_size, datetime.fromtimestamp(info.st_mtime, UTC)))
                else:
                    self._on_skip(name, why)
        finally:
            os.close(directory)
        return sorted(found, key=lambda log: log.name, reverse=True)

    def last_run(self) -> LastRun | None:
        """The newest entry named as an agent names a finished run's log, if it is a log."""
        try:
            directory = self._directory()
        except ConfigError:
            return None
        try:
            names = sorted((name for name in os.listdir(directory) if LOG_NAME.fullmatch(name)), reverse=True)
            for name in names:
                try:
                    if not_a_log(os.lstat(name, dir_fd=directory)) is None:
                        match = LOG_NAME.fullmatch(name)
                        assert match is not None  # noqa: S101 - filtered above
                        at = datetime.strptime(match[1], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
                        return LastRun(name, at, int(match[2]), match[3])
                except FileNotFoundError:
                    continue
        except OSError:
            return None
        finally:
            os.close(directory)
        return None

    def read(self, name: str) -> bytes | None:
        """Up to the last SHOWN bytes of the log `name`, or None if there is no such log (or
        what has that name is not one: on_skip says what it is)."""
        if not one_component(name):
            self._on_skip(name, "not a name in logs/")
            return None
        directory = self._directory()
        try:
            try:
                why = not_a_log(os.lstat(name, dir_fd=directory))
            except OSError:
                return None
            if why is not None:
                self._on_skip(name, why)
                return None
            try:
                fd = os.open(name, _OPEN, dir_fd=directory)
            except OSError as exc:
                self._on_skip(name, f"cannot be opened as a plain file ({exc.strerror})")
                return None
        finally:
            os.close(directory)
        try:
            info = os.fstat(fd)
            why = not_a_log(info)
            if why is not None:  # swapped between the lstat and the open
                self._on_skip(name, why)
                return None
            start = max(0, info.st_size - SHOWN)
            chunks, offset = [], start
            while chunk := os.pread(fd, min(1 << 20, info.st_size - offset), offset):
                chunks.append(chunk)
                offset += len(chunk)
        finally:
            os.close(fd)
        data = b"".join(chunks)
        return f"[the first {start} bytes are not shown]\n".encode() + data if start else data
