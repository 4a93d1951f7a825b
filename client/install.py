"""What herald put where in the root: install records, and making the root match one.

An install record lists the files herald installed from a release's `files/` (path below the
root, mode, sha256) and the directories it had to create for them. `converge` makes the root
hold exactly a target record's files:

- a file the target names is written unless it is already there as released (content, mode,
  owner): unchanged files are never rewritten;
- a file herald installed before (`known`) that the target no longer names is removed, but only
  while it is still exactly what herald put there; one changed locally since is left in place,
  no longer herald's, and reported;
- nothing else is ever touched: a release cannot name a file to delete, and a path herald never
  installed is never removed.

Each write goes to `.<name>.herald` beside its target, is fsynced, then renamed over it; the
temporary name is fixed, so a run killed between the two leaves a name the next run removes.
"""

import hashlib
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import msgspec

from protocol.release import Manifest

FILES: Final = "files/"
TEMPORARY: Final = ".herald"
_DIR_MODE: Final = 0o755


class InstalledFile(msgspec.Struct, frozen=True, array_like=True):
    """One file herald installed: [path below the root, mode, sha256]."""

    path: str
    mode: int
    sha256: str


class InstallRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The files of generation `generation` as herald installed them under `root`."""

    generation: int  # 0: nothing installed
    root: str
    files: list[InstalledFile] = []
    dirs: list[str] = []  # directories herald created for them, below the root

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


def missing_dirs(root: Path, record: InstallRecord) -> list[str]:
    """Directories below `root` that `record`'s files need and that do not exist yet."""
    needed: set[str] = set()
    for entry in record.files:
        parts = entry.path.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            needed.add("/".join(parts[:depth]))
    return sorted(path for path in needed if not (root / path).is_dir())


@dataclass(slots=True)
class Converged:
    """What `converge` did, and the record of what the root now holds."""

    record: InstallRecord
    written: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    replaced_local: list[str] = field(default_factory=list)  # herald's, changed locally, released again
    replaced_other: list[str] = field(default_factory=list)  # there before herald installed anything
    left_local: list[str] = field(default_factory=list)  # herald's, changed locally, no longer released
    unavailable: list[str] = field(default_factory=list)  # no good copy of the content to install

    def summary(self) -> str:
        parts = [f"{len(self.written)} file(s) written", f"{len(self.removed)} removed"]
        if self.replaced_local:
            parts.append(f"{len(self.replaced_local)} changed locally and replaced")
        if self.left_local:
            parts.append(f"{len(self.left_local)} changed locally and left in place")
        if self.unavailable:
            parts.append(f"{len(self.unavailable)} not available to install")
        return ", ".join(parts)


def converge(
    root: Path,
    target: InstallRecord,
    source: Path | None,
    known: Known,
    *,
    dirs: Iterable[str] = (),
) -> Converged:
    """Make the root hold exactly `target`'s files, their content read from `source` (the tree's
    files/ directory; checked against each sha256 before it is installed).

    `known` is what herald may have left at each path (the record being replaced, and during a
    recovery the one that was being installed too); `dirs` the directories herald created.
    Raises OSError when this machine's disk refuses a write: the caller undoes or retries.
    """
    wanted = target.paths()
    done = Converged(target)
    touched: set[Path] = set()
    herald_dirs = set(dirs)
    installed = [
        entry for entry in target.files if _install(root, entry, source, known, done, touched, herald_dirs)
    ]
    for path in sorted(set(known) - set(wanted)):
        _remove(root, path, known[path], done, touched)
    herald_dirs -= _remove_empty(root, herald_dirs, wanted)
    for directory in touched:
        _fsync_dir(directory)
    done.record = InstallRecord(
        generation=target.generation, root=target.root, files=installed, dirs=sorted(herald_dirs)
    )
    return done


def _install(
    root: Path,
    entry: InstalledFile,
    source: Path | None,
    known: Known,
    done: Converged,
    touched: set[Path],
    herald_dirs: set[str],
) -> bool:
    """Put `entry` in place unless it is there already; False if its content is not available."""
    path = root / entry.path
    _discard(path.with_name(f".{path.name}{TEMPORARY}"))
    present = _fingerprint(path)
    if present == (entry.mode, entry.sha256) and _ours(path):
        return True
    data = _content(source, entry)
    if data is None:
        done.unavailable.append(entry.path)
        return False
    if os.path.lexists(path):
        if entry.path not in known:
            done.replaced_other.append(entry.path)
        elif present not in known[entry.path]:
            done.replaced_local.append(entry.path)
    herald_dirs |= _make_parents(root, entry.path)
    _write(path, data, entry.mode)
    touched.add(path.parent)
    done.written.append(entry.path)
    return True


def _remove(
    root: Path, relative: str, left: set[tuple[int, str]], done: Converged, touched: set[Path]
) -> None:
    """Remove a file herald installed and no longer releases, if it is still as herald left it."""
    path = root / relative
    _discard(path.with_name(f".{path.name}{TEMPORARY}"))
    if not os.path.lexists(path):
        return
    if _fingerprint(path) in left:
        path.unlink()
        touched.add(path.parent)
        done.removed.append(relative)
    else:
        done.left_local.append(relative)


# ---------------------------------------------------------------- files


def _fingerprint(path: Path) -> tuple[int, str] | None:
    """(mode, sha256) of the regular file at `path`, never following a link; None for anything
    else (missing, a link, a directory, unreadable): nothing herald could have left there."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as stream:
        info = os.fstat(stream.fileno())
        if not stat.S_ISREG(info.st_mode):
            return None
        digest = hashlib.sha256()
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return stat.S_IMODE(info.st_mode), digest.hexdigest()


def _ours(path: Path) -> bool:
    """Owned by the agent's user, as a file herald writes is."""
    try:
        info = path.lstat()
    except OSError:
        return False
    return (info.st_uid, info.st_gid) == (os.geteuid(), os.getegid())


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


def _make_parents(root: Path, relative: str) -> set[str]:
    """Create the missing directories above `relative`; the ones created."""
    created: set[str] = set()
    root.mkdir(parents=True, exist_ok=True)
    parts = relative.split("/")[:-1]
    for depth in range(1, len(parts) + 1):
        directory = "/".join(parts[:depth])
        try:
            (root / directory).mkdir(mode=_DIR_MODE)
        except FileExistsError:
            continue
        created.add(directory)
    return created


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}{TEMPORARY}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _discard(path: Path) -> None:
    """Remove a temporary file a killed run left (never a directory)."""
    try:
        if not stat.S_ISDIR(path.lstat().st_mode):
            path.unlink()
    except FileNotFoundError:
        pass


def _remove_empty(root: Path, dirs: set[str], wanted: Mapping[str, InstalledFile]) -> set[str]:
    """rmdir the directories herald created that no wanted file needs and that are empty."""
    needed = {"/".join(path.split("/")[:depth]) for path in wanted for depth in range(1, path.count("/") + 1)}
    removed: set[str] = set()
    for directory in sorted(dirs - needed, key=lambda d: d.count("/"), reverse=True):
        try:
            (root / directory).rmdir()
        except FileNotFoundError:
            removed.add(directory)
        except OSError:
            continue  # not empty (someone else's files) or not a directory now: left
        else:
            removed.add(directory)
    return removed


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
