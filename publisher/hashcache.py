"""(path, size, mtime_ns, inode) -> sha256, kept between runs.

A publish that changed nothing reads no file contents. Like git's index, an entry is trusted
only if the file's mtime is older than the moment it was hashed by a safety margin: a file
written in the same instant it was hashed could change without its mtime moving.
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


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:  # noqa: PTH123 - a str path, read in chunks
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class HashCache:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._entries: dict[str, _Entry] = {}
        self._dirty = False
        self._this_run: dict[str, _Entry] = {}  # racy entries: good for this run, not saved
        self.hashed = 0  # files whose content was read this run
        try:
            self._entries = msgspec.msgpack.decode(path.read_bytes(), type=dict[str, _Entry])
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            self._entries = {}

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

    def save(self, keep: set[str]) -> None:
        """Write the cache, dropping files no longer in any release."""
        stale = self._entries.keys() - keep
        if not self._dirty and not stale:
            return
        for real in stale:
            del self._entries[real]
        tmp = self._path.with_name(f".{self._path.name}.{os.getpid()}")
        tmp.write_bytes(msgspec.msgpack.encode(self._entries))
        tmp.replace(self._path)
        self._dirty = False
