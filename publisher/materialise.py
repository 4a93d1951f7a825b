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


def materialise(repo: Path, host: str, directory: Path) -> list[Source]:
    """Every regular file a host releases, sorted by release path."""
    repo = repo.resolve()
    found: list[Source] = []

    def refuse(relpath: str, why: str) -> ConfigError:
        return ConfigError(f"host {host}: {relpath or '.'}: {why}")

    def walk(real_dir: Path, rel: str, ancestors: frozenset[Path]) -> None:
        try:
            entries = sorted(os.scandir(real_dir), key=lambda entry: entry.name)
        except OSError as exc:
            raise refuse(rel, f"cannot list: {exc.strerror}") from exc
        for entry in entries:
            if entry.name == ".git":
                continue
            relpath = f"{rel}/{entry.name}" if rel else entry.name
            real = Path(entry.path)
            try:
                if entry.is_symlink():
                    real = real.resolve(strict=True)
                    if not real.is_relative_to(repo):
                        raise refuse(relpath, f"symlink leaves the fleet repository (-> {real})")
                info = real.stat() if real != Path(entry.path) else entry.stat(follow_symlinks=False)
            except FileNotFoundError as exc:
                raise refuse(relpath, "dangling symlink") from exc
            except RuntimeError as exc:  # resolve() on a symlink loop
                raise refuse(relpath, "symlink loop") from exc
            except OSError as exc:
                raise refuse(relpath, f"cannot read: {exc.strerror}") from exc
            if stat.S_ISDIR(info.st_mode):
                if real in ancestors:
                    raise refuse(relpath, "symlink cycle")
                walk(real, relpath, ancestors | {real})
            elif stat.S_ISREG(info.st_mode):
                found.append(
                    Source(relpath, str(real), info.st_mode & 0o777, info.st_size, info.st_mtime_ns, info.st_ino)
                )
            else:
                kind = "socket" if stat.S_ISSOCK(info.st_mode) else "FIFO" if stat.S_ISFIFO(info.st_mode) else "device"
                raise refuse(relpath, f"{kind} files cannot be released")

    top = directory.resolve()
    if not top.is_relative_to(repo):
        raise refuse("", f"host directory leaves the fleet repository (-> {top})")
    walk(top, "", frozenset({top}))
    found.sort(key=lambda source: source.path)
    return found
