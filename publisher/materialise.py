"""A host's directory as the regular files it releases, links resolved inside the fleet repo.

Symlinks are followed only while they stay inside the repository (that is how hosts share
`common/`); a link leaving it, a dangling link, a link cycle, a device, a socket or a FIFO is an
error naming the host and the path. `.git` is skipped. Releases hold regular files only.
"""

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Source:
    """One file of a release: where it goes (`path`) and where its content is (`real`)."""

    path: str
    real: str
    mode: int
    size: int
    mtime_ns: int
    inode: int


class _Walk:
    def __init__(self, repo: Path, host: str) -> None:
        self.repo = repo
        self.host = host
        self.found: list[Source] = []

    def refuse(self, relpath: str, why: str) -> ConfigError:
        return ConfigError(f"host {self.host}: {relpath or '.'}: {why}")

    def resolve(self, entry: os.DirEntry[str], relpath: str) -> tuple[Path, os.stat_result]:
        """The real path of a directory entry (links followed inside the repo) and its stat."""
        try:
            if not entry.is_symlink():
                return Path(entry.path), entry.stat(follow_symlinks=False)
            real = Path(entry.path).resolve(strict=True)
            if not real.is_relative_to(self.repo):
                raise self.refuse(relpath, f"symlink leaves the fleet repository (-> {real})")
            return real, real.stat()
        except FileNotFoundError as exc:
            raise self.refuse(relpath, "dangling symlink") from exc
        except RuntimeError as exc:  # resolve() on a symlink loop
            raise self.refuse(relpath, "symlink loop") from exc
        except OSError as exc:
            raise self.refuse(relpath, f"cannot read: {exc.strerror}") from exc

    def walk(self, real_dir: Path, rel: str, ancestors: frozenset[Path]) -> None:
        try:
            entries = sorted(os.scandir(real_dir), key=lambda entry: entry.name)
        except OSError as exc:
            raise self.refuse(rel, f"cannot list: {exc.strerror}") from exc
        for entry in entries:
            if entry.name == ".git":
                continue
            relpath = f"{rel}/{entry.name}" if rel else entry.name
            real, info = self.resolve(entry, relpath)
            if stat.S_ISDIR(info.st_mode):
                if real in ancestors:
                    raise self.refuse(relpath, "symlink cycle")
                self.walk(real, relpath, ancestors | {real})
            elif stat.S_ISREG(info.st_mode):
                mode = info.st_mode & 0o777
                self.found.append(
                    Source(relpath, str(real), mode, info.st_size, info.st_mtime_ns, info.st_ino)
                )
            else:
                raise self.refuse(relpath, f"{_kind(info.st_mode)} files cannot be released")


def _kind(mode: int) -> str:
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    return "device"


def materialise(repo: Path, host: str, directory: Path) -> list[Source]:
    """Every regular file a host releases, sorted by release path."""
    walk = _Walk(repo.resolve(), host)
    top = directory.resolve()
    if not top.is_relative_to(walk.repo):
        raise walk.refuse("", f"host directory leaves the fleet repository (-> {top})")
    walk.walk(top, "", frozenset({top}))
    walk.found.sort(key=lambda source: source.path)
    return walk.found
