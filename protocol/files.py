"""Durable file writes shared by the publisher and the agent: temp name, fsync, rename."""

import contextlib
import ctypes
import os
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)


def sync_filesystem(path: Path) -> None:
    """Flush everything written to the filesystem holding `path` (syncfs(2)): one call instead
    of an fsync per file, for a publish that writes thousands of small files."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno), str(path))
    finally:
        os.close(fd)


def fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd`: a short write (a disk filling up) is continued until it fails."""
    rest = memoryview(data)
    while rest:
        rest = rest[os.write(fd, rest) :]


def write_atomic(path: Path | str, data: bytes, *, mode: int = 0o644, durable: bool = True) -> None:
    """Replace `path` with `data` so that a reader sees the old content or the new, never a mix.

    Plain system calls on strings: the publisher replaces a thousand `current` files in a run."""
    directory, name = os.path.split(os.fspath(path))
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")  # noqa: PTH118
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        try:
            write_all(fd, data)
            if durable:
                os.fsync(fd)
            os.fchmod(fd, mode)  # the umask may have narrowed it
        finally:
            os.close(fd)
        os.replace(tmp, path)  # noqa: PTH105
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # noqa: PTH108
        raise
    if durable:
        fsync_dir(directory or ".")


class Flusher:
    """Makes a batch of new files durable: an fsync per file and directory when they are few,
    one syncfs when they are many. An fsync costs about as much as creating the file, while a
    syncfs also flushes whatever else is waiting on that filesystem."""

    def __init__(self, root: Path, *, many: int = 200) -> None:
        self.root = root
        self.many = many
        self._files: list[str] = []
        self._dirs: set[str] = set()

    def wrote(self, path: Path | str, *, directory: bool = False) -> None:
        """`path` was created or replaced (a directory, with `directory`); its parent changed."""
        path = os.fspath(path)
        (self._dirs.add if directory else self._files.append)(path)
        self._dirs.add(os.path.dirname(path))  # noqa: PTH120

    def flush(self) -> None:
        if len(self._files) + len(self._dirs) > self.many:
            sync_filesystem(self.root)
        else:
            for path in self._files:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                except FileNotFoundError:
                    continue  # written and removed again in the same run
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            for directory in self._dirs:
                fsync_dir(directory)
        self._files.clear()
        self._dirs.clear()
