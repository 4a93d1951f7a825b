"""A host's directory as the regular files it releases, links resolved inside the fleet repo.

Symlinks are followed only while they stay inside the repository (that is how hosts share
`common/`); a link leaving it, a dangling link, a link cycle, a device, a socket or a FIFO is an
error naming the host and the path. `.git` is skipped. Releases hold regular files only.

A directory reached by many hosts (`common/`) is listed once per run: pass the same `Listings`
to every call. This is the hot path of a publish that changes nothing, so it stays on plain
strings and `os.scandir`.
"""

import os
import stat
from operator import attrgetter
from pathlib import Path

import msgspec

from protocol.errors import ConfigError


class Source(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """One file of a release: where it goes (`path`) and where its content is (`real`).

    A Struct rather than a dataclass: one is made per file per run (a frozen dataclass took
    most of a microsecond more each)."""

    path: str
    real: str
    mode: int
    size: int
    mtime_ns: int
    inode: int


class Listings:
    """What one publish run learnt about the repository, shared by every host's walk."""

    def __init__(self) -> None:
        self.files: dict[str, list[Source]] = {}  # real directory -> its files, paths relative to it
        self.targets: dict[tuple[int, int], str] = {}  # (dev, inode) a link points at -> real path
        self.prefixed: dict[tuple[str, str], list[Source]] = {}  # (entry name, real dir) -> its files


class _Refused(Exception):  # noqa: N818 - internal: carries the path up to where the host is known
    def __init__(self, relpath: str, why: str) -> None:
        super().__init__(why)
        self.relpath = relpath
        self.why = why

    def under(self, name: str) -> "_Refused":
        return _Refused(f"{name}/{self.relpath}" if self.relpath else name, self.why)


def _kind(mode: int) -> str:
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    return "device"


def _resolve(entry: os.DirEntry[str], repo: str, listings: Listings) -> tuple[str, os.stat_result]:
    """The real path of a directory entry (links followed inside the repo) and its stat."""
    if not entry.is_symlink():
        return entry.path, entry.stat(follow_symlinks=False)
    try:
        info = os.stat(entry.path)  # noqa: PTH116 - follows the link, one system call
    except FileNotFoundError:
        raise _Refused(entry.name, "dangling symlink") from None
    except OSError as exc:  # ELOOP
        raise _Refused(entry.name, f"symlink loop ({exc.strerror})") from None
    target = (info.st_dev, info.st_ino)
    real = listings.targets.get(target)
    if real is None:  # realpath is costly: once per distinct target, not once per host
        real = os.path.realpath(entry.path, strict=True)
        if real != repo and not real.startswith(repo + "/"):
            raise _Refused(entry.name, f"symlink leaves the fleet repository (-> {real})")
        listings.targets[target] = real
    return real, info


def _list(real_dir: str, repo: str, ancestors: frozenset[str], listings: Listings) -> list[Source]:
    cached = listings.files.get(real_dir)
    if cached is not None:
        return cached
    found: list[Source] = []
    try:
        with os.scandir(real_dir) as listing:
            entries = list(listing)  # in directory order: materialise sorts the result once
    except OSError as exc:
        raise _Refused("", f"cannot list: {exc.strerror}") from None
    for entry in entries:
        name = entry.name
        if name == ".git":
            continue
        try:
            real, info = _resolve(entry, repo, listings)
        except OSError as exc:
            raise _Refused(name, f"cannot read: {exc.strerror}") from None
        if stat.S_ISDIR(info.st_mode):
            if real in ancestors:
                raise _Refused(name, "symlink cycle")
            try:
                below = _list(real, repo, ancestors | {real}, listings)
            except _Refused as refused:
                raise refused.under(name) from None
            found.extend(_under(name, real, below, listings))
        elif stat.S_ISREG(info.st_mode):
            found.append(
                Source(name, real, info.st_mode & 0o777, info.st_size, info.st_mtime_ns, info.st_ino)
            )
        else:
            raise _Refused(name, f"{_kind(info.st_mode)} files cannot be released")
    listings.files[real_dir] = found
    return found


def _under(name: str, real: str, below: list[Source], listings: Listings) -> list[Source]:
    """`below` as seen through the entry `name`; every host reaching `common/` the same way
    shares one list."""
    key = (name, real)
    prefixed = listings.prefixed.get(key)
    if prefixed is None:
        prefixed = [Source(f"{name}/{s.path}", s.real, s.mode, s.size, s.mtime_ns, s.inode) for s in below]
        listings.prefixed[key] = prefixed
    return prefixed


def materialise(repo: Path, host: str, directory: Path, listings: Listings | None = None) -> list[Source]:
    """Every regular file a host releases, sorted by release path. `repo` must be a real path
    (inventory.load_inventory resolves it)."""
    root = str(repo)
    top = os.fspath(directory)
    if os.path.islink(top):  # noqa: PTH114 - strings on the hot path
        top = os.path.realpath(top)
    if not top.startswith(root + "/"):
        raise ConfigError(f"host {host}: .: host directory leaves the fleet repository (-> {top})")
    try:
        found = _list(top, root, frozenset({top}), listings if listings is not None else Listings())
    except _Refused as refused:
        raise ConfigError(f"host {host}: {refused.relpath or '.'}: {refused.why}") from None
    return sorted(found, key=attrgetter("path"))
