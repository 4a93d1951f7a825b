"""Making the root hold exactly an install record's files (client.install).

Every path is reached through client.rootfs (no link followed, no directory someone else may
write). A path that cannot be written or removed is reported in `failed` and the others go on;
only this machine's storage failing (full, out of quota, I/O errors) stops a converge
(`StorageFull`): the caller undoes and retries later.
"""

import errno
import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

from client import pause
from client.install import Displaced, InstalledFile, InstallRecord, Known
from client.rootfs import Dirs, Present, Refused, discard_temporary, link, look, parents, remove, write

# This machine's storage, not one path: stops the converge (undone, retried with backoff).
_STORAGE_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO})


class Keeper(Protocol):
    """Where displaced files are kept: in the agent's state, durably, and listed in the journal
    before the path is replaced (client.transition)."""

    def keep(self, entry: Displaced, data: bytes) -> None: ...

    def content(self, entry: Displaced) -> bytes | None: ...


class StorageFull(OSError):  # noqa: N818 - a condition of the machine, named as the log says it
    """This machine's storage refused a write (full, out of quota, failing)."""


@dataclass(slots=True)
class Converged:
    """What `converge` did, and the record of what the root now holds."""

    record: InstallRecord
    written: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    replaced_local: list[str] = field(default_factory=list)  # herald's, changed locally, released again
    replaced_other: list[str] = field(default_factory=list)  # there before herald: kept, put back later
    restored: list[str] = field(default_factory=list)  # what herald had displaced, put back
    left_local: list[str] = field(default_factory=list)  # herald's, changed locally, no longer released
    unavailable: list[str] = field(default_factory=list)  # no good copy of the content to install
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, why) not written or removed

    def summary(self) -> str:
        parts = [f"{len(self.written)} file(s) written", f"{len(self.removed)} removed"]
        if self.restored:
            parts.append(f"{len(self.restored)} put back as they were before herald")
        if self.replaced_local:
            parts.append(f"{len(self.replaced_local)} changed locally and replaced")
        if self.left_local:
            parts.append(f"{len(self.left_local)} changed locally and left in place")
        if self.unavailable:
            parts.append(f"{len(self.unavailable)} not available to install")
        if self.failed:
            parts.append(f"{len(self.failed)} could not be changed")
        return ", ".join(parts)

    def failures(self, limit: int = 5) -> str:
        """'/a (why); /b (why)' for the state's message: what could not be changed."""
        shown = "; ".join(f"/{path} ({why})" for path, why in self.failed[:limit])
        more = len(self.failed) - limit
        return shown + (f"; and {more} more" if more > 0 else "")


def converge(
    root: Path,
    target: InstallRecord,
    source: Path | None,
    known: Known,
    *,
    dirs: Iterable[str] = (),
    displaced: Mapping[str, Displaced] | None = None,
    keeper: Keeper | None = None,
    point: str = "",
    stop_on_full: bool = True,
) -> Converged:
    """Make the root hold exactly `target`'s files, their content read from `source` (the tree's
    files/ directory; checked against each sha256 before it is installed).

    `known` is what herald may have left at each path (the record being replaced, and during a
    recovery the one that was being installed too); `dirs` the directories herald created;
    `displaced` what herald replaced at a path, put back when the path is no longer wanted;
    `keeper` keeps what a write is about to replace (without one, nothing herald did not install
    is replaced). `point` names this converge for client.pause (tests).
    Raises StorageFull when this machine's storage refuses a write (the caller undoes and
    retries later), unless not `stop_on_full` (an undo: it goes on, every failure reported).
    """
    run = _Run(root, known, source, dict(displaced or {}), keeper, point, stop_on_full=stop_on_full)
    with run.dirs:
        installed = [held for entry in target.files if (held := run.install(entry)) is not None]
        wanted = target.paths()
        for path in sorted(set(known) - set(wanted)):
            run.remove(path)
        herald_dirs = (set(dirs) | run.dirs.created) - run.remove_empty(set(dirs) | run.dirs.created, wanted)
    done = run.done
    kept = [run.displaced[entry.path] for entry in installed if entry.path in run.displaced]
    done.record = InstallRecord(
        generation=target.generation,
        root=target.root,
        files=installed,
        dirs=sorted(herald_dirs),
        displaced=sorted(kept, key=lambda entry: entry.path),
    )
    return done


class _Run:
    """One converge: its directories, and what it did."""

    def __init__(
        self,
        root: Path,
        known: Known,
        source: Path | None,
        displaced: dict[str, Displaced],
        keeper: Keeper | None,
        point: str,
        *,
        stop_on_full: bool,
    ) -> None:
        self.dirs = Dirs(root)
        self.stop_on_full = stop_on_full
        self.known = known
        self.source = source
        self.displaced = displaced
        self.keeper = keeper
        self.point = point
        self.done = Converged(InstallRecord(generation=0, root=str(root)))
        self._seen: set[str] = set()

    def _dir(self, relative: str, *, create: bool) -> int:
        directory = relative.rpartition("/")[0]
        fd = self.dirs.get(directory, create=create)
        if directory not in self._seen:
            self._seen.add(directory)
            discard_temporary(fd)  # left by a run killed mid-write
        return fd

    def _changed(self, relative: str) -> None:
        self.dirs.touched(relative.rpartition("/")[0])
        if self.point:
            pause.at(self.point)

    def _failed(self, relative: str, exc: Exception) -> None:
        if self.stop_on_full and isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
            raise StorageFull(exc.errno, f"/{relative}: {exc.strerror}") from exc
        why = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
        self.done.failed.append((relative, why))

    def install(self, entry: InstalledFile) -> InstalledFile | None:
        """Put `entry` in place unless it is there already; what the record says of the path
        afterwards (None: nothing of herald's is there)."""
        name = entry.path.rpartition("/")[2]
        present: Present | None = None
        try:
            fd = self._dir(entry.path, create=True)
            present = look(fd, name)
            if present is not None and present.fingerprint == (entry.mode, entry.sha256) and _ours(present):
                return entry
            data = _content(self.source, entry)
            if data is None:
                self.done.unavailable.append(entry.path)
                return self._left(entry.path, present)
            if present is not None:
                self._before_replacing(fd, entry.path, name, present)
            write(fd, name, data, entry.mode)
        except (OSError, Refused) as exc:
            self._failed(entry.path, exc)
            return self._left(entry.path, present)
        self._changed(entry.path)
        self.done.written.append(entry.path)
        return entry

    def _before_replacing(self, fd: int, relative: str, name: str, present: Present) -> None:
        """Classify what a write replaces; keep it first if herald never installed it."""
        if relative in self.known:  # herald's path (what it displaced there, if anything, is kept)
            if present.fingerprint not in self.known[relative]:
                self.done.replaced_local.append(relative)
            return
        if present.kind == "other":
            raise Refused("something other than a file or a link is there")
        if self.keeper is None:
            raise Refused("there before herald, and nowhere to keep it")
        kept = look(fd, name, keep_data=True)
        if kept is None or kept.data is None or kept.kind == "other":
            raise Refused("changed while herald looked at it")
        entry = Displaced(relative, kept.kind, kept.mode, kept.uid, kept.gid, kept.sha256)
        self.keeper.keep(entry, kept.data)
        self.displaced[relative] = entry
        self.done.replaced_other.append(relative)

    def _left(self, relative: str, present: Present | None) -> InstalledFile | None:
        """After a write that did not happen: herald's file still there stays in the record, as
        it is; anything else is not herald's."""
        if present is not None and present.fingerprint in self.known.get(relative, set()):
            return InstalledFile(relative, present.mode, present.sha256)
        if relative not in self.known:
            self.displaced.pop(relative, None)  # not replaced after all: the original is in place
        return None

    def remove(self, relative: str) -> None:
        """Remove a file herald installed and no longer releases (or put back what it displaced),
        if it is still as herald left it."""
        name = relative.rpartition("/")[2]
        original = self.displaced.pop(relative, None)
        try:
            fd = self._dir(relative, create=False)
            present = look(fd, name)
            if present is None:
                return
            if original is not None and (present.kind, present.sha256) == (original.kind, original.sha256):
                return  # the original is there already (an undo before herald's write landed)
            if present.fingerprint not in self.known[relative]:
                self.done.left_local.append(relative)
                return
            if original is not None:
                self._put_back(fd, name, original)
                self.done.restored.append(relative)
            else:
                remove(fd, name)
                self.done.removed.append(relative)
        except FileNotFoundError:
            return  # its directory is gone: so is the file
        except (OSError, Refused) as exc:
            self._failed(relative, exc)
            return
        self._changed(relative)

    def _put_back(self, fd: int, name: str, original: Displaced) -> None:
        data = self.keeper.content(original) if self.keeper is not None else None
        if data is None:
            raise Refused(f"the copy of what was there before herald ({original.sha256[:12]}) is lost")
        owner: tuple[int, int] | None = (original.uid, original.gid)
        if owner == (os.geteuid(), os.getegid()):
            owner = None
        if original.kind == "link":
            link(fd, name, data, owner)
        else:
            write(fd, name, data, original.mode, owner)

    def remove_empty(self, dirs: set[str], wanted: Mapping[str, InstalledFile]) -> set[str]:
        """rmdir the directories herald created that no wanted file needs and that are empty."""
        needed = {directory for path in wanted for directory in parents(path)}
        removed: set[str] = set()
        for directory in sorted(dirs - needed, key=lambda d: d.count("/"), reverse=True):
            parent, _, name = directory.rpartition("/")
            try:
                os.rmdir(name, dir_fd=self.dirs.get(parent))
            except FileNotFoundError:
                removed.add(directory)
            except (OSError, Refused):
                continue  # not empty (someone else's files), not a directory now, or refused: left
            else:
                removed.add(directory)
                self.dirs.touched(parent)
        return removed


def _ours(present: Present) -> bool:
    """Owned by the agent's user, as a file herald writes is."""
    return (present.uid, present.gid) == (os.geteuid(), os.getegid())


def _content(source: Path | None, entry: InstalledFile) -> bytes | None:
    """The released content of `entry` from the tree, if it still hashes to what was released."""
    if source is None:
        return None
    try:
        fd = os.open(source / entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as stream:
        data = stream.read()
    return data if hashlib.sha256(data).hexdigest() == entry.sha256 else None
