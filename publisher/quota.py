"""What a host may keep in its writable areas (logs/, backups/) of the embedded SFTP server.

One `Quota` per host, held by SFTPService and shared by every session of that host: they all run
on one event loop and each SFTP request is handled whole, so a check and the write it allows are
never interleaved with another session's request. Each area has an `Account` of the bytes and
entries (files and directories) on disk:

- counted from disk (an lstat of every entry, each inode once) when first needed, and again
  when it is idle (no handle of it open) and the count is over a minute old, so that files an
  admin removed stop counting; a count that could not see everything (a directory it cannot list,
  an entry it cannot lstat: the server running unprivileged, a mode a host set before the server
  kept owner bits) refuses every write of the area until a later count sees all: never less
  than what is on disk;
- before a write, what it can add is checked against the cap: past the end of the file for a
  positioned write; all of it with O_APPEND, where the kernel appends whatever offset the client
  sent; after the write, the account moves by what fstat says the file grew: what is on disk,
  never what the client claimed;
- a file removed or replaced while a handle holds it keeps counting until its last handle
  closes: its space is not free before;
- a new file or directory needs room under the entry cap.

The host's open handles are capped too: descriptors are the server's, shared by every host.
"""

import errno
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Final

import asyncssh
from loguru import logger

from protocol.hosttext import safe

HANDLES: Final = 64  # open files per host, across its sessions (an agent fetches 16 at once)
LOG_ENTRIES: Final = 100  # the agent keeps 20 logs
BACKUP_BYTES_PER_ENTRY: Final = 64 << 10  # restic writes packs of 4-16 MiB, an index, locks...
MIN_BACKUP_ENTRIES: Final = 10_000
_RECOUNT: Final = 60.0  # seconds


def entry_cap(area: str, cap: int) -> int:
    """How many files and directories an area may hold, from its byte cap."""
    if area == "backups":
        return max(MIN_BACKUP_ENTRIES, cap // BACKUP_BYTES_PER_ENTRY)
    return LOG_ENTRIES


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} bytes"


Inode = tuple[int, int]


def inode(info: os.stat_result) -> Inode:
    return info.st_dev, info.st_ino


@dataclass
class Account:
    """The bytes and entries of one area of one host, as on disk."""

    host: str
    name: str
    prefix: bytes  # the area's local path with a trailing '/'
    cap: int
    entries_cap: int
    used: int = 0
    entries: int = 0
    counted_at: float | None = None
    unseen: str = ""  # why the last count could not see everything; writes wait for a full count
    open: dict[Inode, int] = field(default_factory=dict)  # handles per inode, every session's

    def count(self) -> None:
        """Count from disk if never counted, or idle and counted over a minute ago (an idle area
        holds no removed-but-open file, which no listing shows)."""
        at = time.monotonic()
        if self.counted_at is not None and (self.open or at - self.counted_at < _RECOUNT):
            return
        used, entries, seen, unseen = 0, 0, set(), []

        def unlisted(exc: OSError) -> None:
            if exc.errno != errno.ENOENT:  # gone since its parent was listed: nothing to count
                where = os.fsdecode(exc.filename or b"").removeprefix(os.fsdecode(self.prefix))
                unseen.append(f"{self.name}/{where}: {exc.strerror}")

        for top, dirs, names in os.walk(self.prefix, onerror=unlisted):
            entries += len(dirs) + len(names)
            for name in names:
                try:
                    info = os.lstat(os.path.join(top, name))  # noqa: PTH118 - bytes paths
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    unlisted(exc)
                    continue
                if inode(info) not in seen:
                    seen.add(inode(info))
                    used += info.st_size
        self.used, self.entries, self.counted_at = used, entries, at
        self.unseen = unseen[0] if unseen else ""
        if unseen:
            logger.bind(host=self.host).warning(
                "{}/ cannot be counted whole, its writes are refused: {} entries unreadable, first {}",
                self.name,
                len(unseen),
                safe(self.unseen),
            )

    def room(self, adding: int) -> None:
        """Refuse a change that would add `adding` bytes past the cap."""
        self.count()
        self._seen_whole()
        if adding > 0 and self.used + adding > self.cap:
            raise asyncssh.SFTPFailure(
                f"{self.name}/ is full: {_size(self.used)} of its {_size(self.cap)} cap; remove files first"
            )

    def _seen_whole(self) -> None:
        if self.unseen:
            raise asyncssh.SFTPFailure(
                f"{self.name}/ cannot be counted ({self.unseen}): "
                "give its directories and files back their owner's permissions"
            )

    def grew(self, by: int) -> None:
        self.used = max(0, self.used + by)

    def new_entry(self) -> None:
        """Refuse a new file or directory past the entry cap."""
        self.count()
        self._seen_whole()
        if self.entries >= self.entries_cap:
            raise asyncssh.SFTPFailure(
                f"{self.name}/ holds {self.entries} files and directories, its cap; remove some first"
            )

    def added(self) -> None:
        self.entries += 1

    def gone(self, info: os.stat_result) -> None:
        """A name of the area was removed (or replaced); `info` is its lstat from before. Its
        bytes are free only if it was the inode's last name and no handle holds it."""
        self.entries = max(0, self.entries - 1)
        if not stat.S_ISDIR(info.st_mode) and info.st_nlink <= 1 and inode(info) not in self.open:
            self.grew(-info.st_size)

    def opened(self, key: Inode) -> None:
        self.open[key] = self.open.get(key, 0) + 1

    def closing(self, key: Inode, info: os.stat_result) -> None:
        """A handle of inode `key` is about to close; `info` is its fstat."""
        left = self.open.get(key, 1) - 1
        if left:
            self.open[key] = left
            return
        self.open.pop(key, None)
        if info.st_nlink == 0:  # removed while open: its space is freed now
            self.grew(-info.st_size)


class Quota:
    """One host's accounts and open handles, shared by all its sessions."""

    def __init__(self, host: str, root: bytes) -> None:
        self.host = host
        self.root = root
        self.accounts: dict[str, Account] = {}
        self.handles = 0

    def configure(self, areas: dict[str, int]) -> None:
        """The areas and byte caps the publisher allows now (they change with fleet.toml)."""
        for name in set(self.accounts) - set(areas):
            del self.accounts[name]
        for name, cap in areas.items():
            account = self.accounts.get(name)
            if account is None:
                prefix = self.root + b"/" + name.encode() + b"/"
                self.accounts[name] = Account(self.host, name, prefix, cap, entry_cap(name, cap))
            else:
                account.cap, account.entries_cap = cap, entry_cap(name, cap)

    def account_of(self, local: bytes) -> Account | None:
        return next((a for a in self.accounts.values() if local.startswith(a.prefix)), None)

    def may_open(self) -> None:
        if self.handles >= HANDLES:
            raise asyncssh.SFTPFailure(f"{HANDLES} files are open in this host's sessions; close some first")
