"""Durable file writes shared by the publisher and the agent: temp name, fsync, rename."""

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


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644, durable: bool = True) -> None:
    """Replace `path` with `data` so that a reader sees the old content or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            if durable:
                os.fsync(stream.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed it  # noqa: PTH101
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


class Flusher:
    """Makes a batch of new files durable: an fsync per file and directory when they are few,
    one syncfs when they are many. An fsync costs about as much as creating the file, while a
    syncfs also flushes whatever else is waiting on that filesystem."""

    def __init__(self, root: Path, *, many: int = 200) -> None:
        self.root = root
        self.many = many
        self._files: list[Path] = []
        self._dirs: set[Path] = set()

    def wrote(self, path: Path, *, directory: bool = False) -> None:
        """`path` was created or replaced (a directory, with `directory`); its parent changed."""
        (self._dirs.add if directory else self._files.append)(path)
        self._dirs.add(path.parent)

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
