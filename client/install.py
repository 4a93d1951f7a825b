"""What herald put where in the root: install records.

An install record lists the files herald installed from a release's `files/` (path below the
root, mode, sha256), the directories it had to create for them, and what was at a path before
herald first wrote it (`displaced`: an admin's file or link, kept in the agent's state).
client.converge makes the root hold exactly a target record's files:

- a file the target names is written unless it is already there as released (content, mode,
  owner): unchanged files are never rewritten. A file or link herald had not installed is
  kept first (`Keeper`), so that it comes back when herald no longer releases the path, and
  when the apply that replaced it is undone;
- a file herald installed before (`known`) that the target no longer names is removed (or
  what it displaced put back), but only while it is still exactly what herald put there; one
  changed locally since is left in place, no longer herald's, and reported;
- nothing else is ever touched: a release cannot name a file to delete, and a path herald never
  installed is never removed.
"""

import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final

import msgspec

from client.rootfs import parents
from protocol.release import Manifest

FILES: Final = "files/"


class InstalledFile(msgspec.Struct, frozen=True, array_like=True):
    """One file herald installed: [path below the root, mode, sha256]."""

    path: str
    mode: int
    sha256: str


class Displaced(msgspec.Struct, frozen=True, array_like=True):
    """What was at `path` before herald first wrote it: a regular file or a link, its content
    (or the link's target) kept in the agent's state by sha256."""

    path: str
    kind: str  # "file" or "link"
    mode: int
    uid: int
    gid: int
    sha256: str


class InstallRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The files of generation `generation` as herald installed them under `root`."""

    generation: int  # 0: nothing installed
    root: str
    files: list[InstalledFile] = []
    dirs: list[str] = []  # directories herald created for them, below the root
    displaced: list[Displaced] = []  # what herald replaced at those paths, to put back

    def paths(self) -> dict[str, InstalledFile]:
        return {entry.path: entry for entry in self.files}


def record_of(manifest: Manifest, root: Path, dirs: Iterable[str] = ()) -> InstallRecord:
    """The record of what `manifest`'s files/ become under `root`."""
    files = [
        InstalledFile(entry.path.removeprefix(FILES), entry.mode, entry.sha256)
        for entry in manifest.content.files
        if entry.path.startswith(FILES)
    ]
    return InstallRecord(generation=manifest.generation, root=str(root), files=files, dirs=sorted(dirs))


def empty(root: Path) -> InstallRecord:
    return InstallRecord(generation=0, root=str(root))


Known = Mapping[str, set[tuple[int, str]]]


def known_of(*records: InstallRecord) -> dict[str, set[tuple[int, str]]]:
    """path -> every (mode, sha256) herald may have left there, from these records."""
    known: dict[str, set[tuple[int, str]]] = {}
    for record in records:
        for entry in record.files:
            known.setdefault(entry.path, set()).add((entry.mode, entry.sha256))
    return known


def displaced_of(*records: Iterable[Displaced]) -> dict[str, Displaced]:
    """path -> what herald displaced there (the first record that names it wins)."""
    found: dict[str, Displaced] = {}
    for entries in records:
        for entry in entries:
            found.setdefault(entry.path, entry)
    return found


def missing_dirs(root: Path, record: InstallRecord) -> list[str]:
    """Directories below `root` that `record`'s files need and that are not directories now
    (never following a link): the ones an install of it may create."""
    needed = {directory for entry in record.files for directory in parents(entry.path)}
    return sorted(path for path in needed if not _is_dir(root / path))


def _is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(path.lstat().st_mode)
    except OSError:
        return False
