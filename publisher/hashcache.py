"""(path, size, mtime_ns, inode) -> sha256, kept between runs; and per host, the stat of all
its files -> the version they made.

A publish that changed nothing reads no file contents. Like git's index, an entry is trusted
only if the file's mtime is older than the moment it was hashed by a safety margin: a file
written in the same instant it was hashed could change without its mtime moving.

A host whose files all stat as they did when its version was last computed has that version
again: its files are not looked up one by one nor its content encoded and hashed (most of the
Python time per host of a publish that changes nothing). The same margin applies.
"""

import hashlib
import os
import time
from pathlib import Path
from typing import Final

import msgspec

from publisher.materialise import Source

_RACY_NS: Final = 2_000_000_000
_CHUNK: Final = 1 << 20


class _Entry(msgspec.Struct, array_like=True, frozen=True):
    size: int
    mtime_ns: int
    inode: int
    sha256: str


class _Tree(msgspec.Struct, array_like=True, frozen=True):
    key: bytes  # tree_key of the host's settings and files
    version: str


class _Saved(msgspec.Struct, frozen=True):
    files: dict[str, _Entry] = {}
    trees: dict[str, _Tree] = {}


def tree_key(settings: tuple[object, ...], sources: list[Source]) -> bytes:
    """A digest of what a host's version depends on, short of reading its files: its settings
    (operation, flake, and the modes fleet.toml declares for its files/) and its files' stats."""
    return hashlib.blake2b(msgspec.msgpack.encode((settings, sources)), digest_size=16).digest()


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:  # noqa: PTH123 - a str path, read in chunks
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class HashCache:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._dirty = False
        self._this_run: dict[str, _Entry] = {}  # racy entries: good for this run, not saved
        self.hashed = 0  # files whose content was read this run
        try:
            saved = msgspec.msgpack.decode(path.read_bytes(), type=_Saved)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            saved = _Saved()
        self._entries = saved.files
        self._trees = saved.trees

    def version(self, host: str, key: bytes) -> str | None:
        """The version `host` had when its files last gave `key`, if that is known."""
        tree = self._trees.get(host)
        return tree.version if tree is not None and tree.key == key else None

    def remember(self, host: str, key: bytes, version: str, sources: list[Source]) -> None:
        """Keep `host`'s version for `key`, unless one of its files is too recent to trust."""
        cutoff = time.time_ns() - _RACY_NS
        if all(source.mtime_ns < cutoff for source in sources):
            self._trees[host] = _Tree(key, version)
            self._dirty = True

    def sha256(self, source: Source) -> str:
        for known in (self._entries, self._this_run):
            entry = known.get(source.real)
            if (
                entry is not None
                and entry.size == source.size
                and entry.mtime_ns == source.mtime_ns
                and entry.inode == source.inode
            ):
                return entry.sha256
        digest = sha256_file(source.real)
        self.hashed += 1
        entry = _Entry(source.size, source.mtime_ns, source.inode, digest)
        if source.mtime_ns < time.time_ns() - _RACY_NS:
            self._entries[source.real] = entry
            self._dirty = True
        else:
            self._this_run[source.real] = entry
        return digest

    def save(self, keep: set[str], hosts: set[str]) -> None:
        """Write the cache, dropping files no longer in any release and hosts no longer in the fleet."""
        stale = self._entries.keys() - keep
        gone = self._trees.keys() - hosts
        if not self._dirty and not stale and not gone:
            return
        for real in stale:
            del self._entries[real]
        for host in gone:
            del self._trees[host]
        tmp = self._path.with_name(f".{self._path.name}.{os.getpid()}")
        tmp.write_bytes(msgspec.msgpack.encode(_Saved(self._entries, self._trees)))
        tmp.replace(self._path)
        self._dirty = False
