"""One host's chroot on the server: the only tree that host can read.

    <chroot>/current                   "<generation> <version>", replaced last
    <chroot>/objects/<sha256>          contents, each written once; a closure host's NARs too
    <chroot>/releases/<generation>     signature line + MANIFEST (protocol.release)
    <chroot>/credentials/              broker.secret, publisher.pub, publisher.keys
    <chroot>/logs/                     the host's uploads

Every write goes to a temp name first and `current` is replaced last, so a reader never sees a
half-written release and a crash leaves the previous one served. What is written is reported to
a Flusher; the publisher makes it durable in one batch before any `current` names it.
"""

import contextlib
import functools
import hashlib
import os
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

import msgspec

from protocol.credentials import Secret, new_secret, read_secret
from protocol.errors import PublishError, ReleaseError
from protocol.files import Flusher, write_all, write_atomic
from protocol.release import (
    BROKER_SECRET,
    CREDENTIALS,
    CURRENT,
    LOGS,
    MAX_CURRENT,
    OBJECTS,
    PUBLISHER_KEY,
    PUBLISHER_KEYS,
    RELEASES,
    Current,
    Manifest,
    encode_release,
    split_release,
)
from publisher.materialise import Source

if TYPE_CHECKING:
    from collections.abc import Collection, Iterable

_CHUNK: Final = 1 << 20
_TMP: Final = ".tmp-"
BACKUPS: Final = "backups"
_SWEEP_EVERY: Final = 86400


Listed = tuple[str, int, int, str]  # a file entry of a MANIFEST: path, mode, size, sha256


class _Closure(msgspec.Struct):
    closure: list[tuple[str, str, int, list[str], str, int]] = []  # protocol.release.StorePath


class _Files(msgspec.Struct):
    files: list[Listed]
    system: _Closure | None = None


class _Listing(msgspec.Struct):
    content: _Files


_LISTING: Final = msgspec.json.Decoder(_Listing)


class Chroot:
    """`owner` is the host's (uid, gid) when its chroot is served by OpenSSH (publisher.accounts):
    the files only the host may read then belong to its group, and logs/ to the host."""

    def __init__(
        self, path: Path | str, flusher: Flusher | None = None, owner: tuple[int, int] | None = None
    ) -> None:
        self._at = os.fspath(path)  # the checks every run makes on every host use plain strings
        self.flusher = flusher
        self.owner = owner
        self._objects: set[str] | None = None  # what object_names listed, kept up to date since

    @functools.cached_property
    def path(self) -> Path:
        return Path(self._at)

    def _group(self, path: Path | str, *, user: bool = False) -> None:
        """Give `path` to the host's group (and, with `user`, to the host) in OpenSSH mode."""
        if self.owner is not None:
            os.chown(path, self.owner[0] if user else 0, self.owner[1], follow_symlinks=False)

    def _wrote(self, path: Path | str, *, directory: bool = False) -> None:
        if self.flusher is not None:
            self.flusher.wrote(path, directory=directory)

    @property
    def objects(self) -> Path:
        return self.path / OBJECTS

    @property
    def releases(self) -> Path:
        return self.path / RELEASES

    def current(self) -> Current | None:
        try:
            fd = os.open(f"{self._at}/{CURRENT}", os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return Current.decode(os.read(fd, MAX_CURRENT + 1))
        finally:
            os.close(fd)

    def _manifest_data(self, generation: int) -> bytes:
        path = self.releases / str(generation)
        try:
            return split_release(path.read_bytes())[0]
        except IsADirectoryError:  # a release of the layout before releases were single files
            return (path / "MANIFEST").read_bytes()

    def manifest(self, generation: int) -> Manifest | None:
        try:
            return msgspec.json.decode(self._manifest_data(generation), type=Manifest)
        except (OSError, ReleaseError, msgspec.DecodeError, msgspec.ValidationError):
            return None

    def listed(self, generation: int) -> list[Listed]:
        """A release's file entries, decoded without checking the rest: the publisher wrote it,
        and wants only these (for the diff of a new release and for pruning); agents check
        everything. ReleaseError if the release cannot be read."""
        return self.listing(generation)[0]

    def listing(self, generation: int) -> tuple[list[Listed], list[str]]:
        """A release's file entries and the objects of its system's closure (none without one)."""
        try:
            content = _LISTING.decode(self._manifest_data(generation)).content
        except (OSError, ReleaseError, msgspec.DecodeError, msgspec.ValidationError):
            raise ReleaseError(f"{self.releases / str(generation)}: unreadable MANIFEST") from None
        nars = [entry[4] for entry in content.system.closure if entry[4]] if content.system else []
        return content.files, nars

    def ensure_layout(self, *, backups: bool = False) -> None:
        logs, backups_dir = f"{self._at}/{LOGS}", f"{self._at}/{BACKUPS}"
        if os.path.isdir(logs) and (not backups or os.path.isdir(backups_dir)):  # noqa: PTH112 - hot path
            return
        for directory, mode in (
            (self.path, 0o755),
            (self.objects, 0o755),
            (self.releases, 0o755),
            (self.path / CREDENTIALS, 0o750),
            (self.path / LOGS, 0o750),
            *(((self.path / BACKUPS, 0o700),) if backups else ()),
        ):
            if not directory.is_dir():
                directory.mkdir(mode=mode, parents=True, exist_ok=True)
                directory.chmod(mode)
                if directory.name in (CREDENTIALS, LOGS, BACKUPS):
                    self._group(directory, user=directory.name != CREDENTIALS)
                self._wrote(directory, directory=True)

    def ensure_credentials(
        self, publisher_key: str, *, key_changed: bool, chain: bytes = b""
    ) -> Secret | None:
        """Place the publisher key and its statements (if missing or changed) and create the
        host's broker secret if it has none (deleting it rotates it). Returns the secret if one
        was created. The statements are written before the key: a chroot with the key has them."""
        credentials = f"{self._at}/{CREDENTIALS}"
        if key_changed or not os.path.exists(f"{credentials}/{PUBLISHER_KEY}"):  # noqa: PTH110 - hot path
            if chain:
                self.write_credential(PUBLISHER_KEYS, chain)
            self.write_credential(PUBLISHER_KEY, f"{publisher_key}\n".encode())
        if os.path.exists(f"{credentials}/{BROKER_SECRET}"):  # noqa: PTH110 - hot path
            return None
        secret_file = self.path / CREDENTIALS / BROKER_SECRET
        secret = new_secret()
        write_atomic(secret_file, f"{secret.reveal()}\n".encode(), mode=0o640, durable=False)
        self._group(secret_file)
        self._wrote(secret_file)
        return secret

    def write_credential(self, name: str, data: bytes) -> None:
        """credentials/<name>, readable by the host only (its group, with OpenSSH)."""
        path = self.path / CREDENTIALS / name
        write_atomic(path, data, mode=0o640, durable=False)
        self._group(path)
        self._wrote(path)

    def broker_secret(self) -> Secret:
        return read_secret(self.path / CREDENTIALS / BROKER_SECRET)

    def object_names(self) -> set[str]:
        """The objects present: one listing instead of a stat per file of the release. The set
        returned is the one write_object adds to and prune reads, so it is listed once."""
        if self._objects is None:
            try:
                self._objects = set(os.listdir(self.objects))
            except FileNotFoundError:
                self._objects = set()
        return self._objects

    def write_object(
        self, source: Source, sha256: str, pool: "Pool", *, private: bool, shared: bool, present: set[str]
    ) -> bool:
        """Store `source` as objects/<sha256> unless `present` (object_names) holds it; True if
        a file was added (and then added to `present`).

        Content anyone may read that other hosts release too (`shared`), or that the pool holds
        already, is a hard link to the pool: creating a link costs a small fraction of creating
        a file. Content only this host releases is stored here directly (a pool entry would be
        one more file, for nothing to share), and so is private content (files not readable by
        others, such as secrets), readable only inside this chroot.
        """
        if sha256 in present:
            return False
        present.add(sha256)
        target = f"{self._at}/{OBJECTS}/{sha256}"
        if not private and (shared or pool.holds(sha256)):
            try:
                os.link(pool.get(source, sha256), target)
            except OSError:
                pass  # another filesystem, or links refused: copy instead
            else:
                self._wrote(target)
                return True
        _store(source, sha256, Path(target), 0o640 if private else 0o644)
        if private:
            self._group(target)
        self._wrote(target)
        return True

    def link_object(self, pool: "Pool", sha256: str, present: set[str]) -> bool:
        """objects/<sha256> as a hard link to the pool's entry (a NAR of this host's closure,
        publisher.closure), unless `present` holds it; True if it was added."""
        if sha256 in present:
            return False
        target = f"{self._at}/{OBJECTS}/{sha256}"
        source = pool.path / sha256
        try:
            os.link(source, target)
        except FileExistsError:
            pass
        except OSError:  # another filesystem, or links refused: copy
            tmp = Path(f"{target}.{_TMP}{os.getpid()}")
            shutil.copyfile(source, tmp)
            tmp.chmod(0o644)
            tmp.replace(target)
        present.add(sha256)
        self._wrote(target)
        return True

    def keep_private(self, source: Source, sha256: str) -> bool:
        """Make objects/<sha256> readable by this host only, if it is not: stored again (not a
        link to the pool any more), 0640 and the host's group. True if it was stored again."""
        target = f"{self._at}/{OBJECTS}/{sha256}"
        info = os.lstat(target)
        if not info.st_mode & 0o004 and info.st_nlink == 1:
            return False
        _store(source, sha256, Path(target), 0o640)  # renamed over the link: the pool keeps its copy
        self._group(target)
        self._wrote(target)
        return True

    def write_release(self, manifest: Manifest, data: bytes, signature: bytes) -> None:
        """releases/<generation>: the signature, then the MANIFEST.

        Written in place: agents read only the release `current` names, and `current` is
        replaced after this release is complete and on disk. What a crash leaves here is
        rewritten by the next run, which computes the same generation.
        """
        final = f"{self._at}/{RELEASES}/{manifest.generation}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        try:
            fd = os.open(final, flags, 0o644)
        except IsADirectoryError:  # a release of the layout before releases were single files
            shutil.rmtree(final)
            fd = os.open(final, flags, 0o644)
        try:
            write_all(fd, encode_release(data, signature))
            os.fchmod(fd, 0o644)  # whatever the umask: the host's account reads it
        finally:
            os.close(fd)
        self._wrote(final)

    def set_current(self, current: Current) -> None:
        """Name a release whose files are already on disk (see publisher.publish)."""
        path = f"{self._at}/{CURRENT}"
        write_atomic(path, current.encode(), mode=0o644, durable=False)
        self._wrote(path)

    def prune(self, keep: int, known: dict[int, list[str]], held: "Collection[int]" = ()) -> set[str]:
        """Keep the newest `keep` releases at or below `current`, the ones a rollout holds back
        above it (`held`: not named by `current` yet), and the objects they name; drop the rest
        above `current` (leftovers of crashes, held releases a newer one replaced).

        `known` holds the objects of releases already in memory, by generation, so that they
        are not read again. Returns the names of the objects removed (their pool entries may
        now be unused).
        """
        current = self.current()
        names = os.listdir(self.releases)
        generations = sorted((int(name) for name in names if name.isdigit()), reverse=True)
        kept = [g for g in generations if current is None or g <= current.generation][:keep]
        kept += [g for g in generations if g in held and g not in kept]
        doomed = [
            name for name in names if name.startswith(_TMP) or (name.isdigit() and int(name) not in kept)
        ]
        if not doomed:
            return set()  # objects go when the last release naming them goes
        named: set[str] = set()
        for generation in kept:
            listed = known.get(generation)
            if listed is None:
                try:
                    files, nars = self.listing(generation)
                    listed = [file[3] for file in files] + nars
                except ReleaseError as exc:
                    raise ReleaseError(f"{exc}; not pruning") from None
            named.update(listed)
        releases, objects = str(self.releases), str(self.objects)
        for name in doomed:
            _remove_release(f"{releases}/{name}")
        present = self.object_names()
        removed = {name for name in present if name not in named}
        for name in removed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{objects}/{name}")  # noqa: PTH108 - a str path, a thousand times a run
        present -= removed
        return removed


def _remove_release(path: str) -> None:
    """A release is one file; a directory there (a release of the layout before releases were
    single files) is removed with what it holds."""
    try:
        os.unlink(path)  # noqa: PTH108 - a str path, a thousand times a run
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        shutil.rmtree(path, ignore_errors=True)


def _copy_hashing(source: str, target: Path) -> str:
    """Copy `source` to a new file `target`; the sha256 of what was copied."""
    digest = hashlib.sha256()
    with open(source, "rb") as src, open(target, "xb") as dst:  # noqa: PTH123
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            dst.write(chunk)
    return digest.hexdigest()


class Pool:
    """STATE/objects/<sha256>: one file per distinct content that anyone may read, hard-linked
    into the chroots that release it. An entry with one link left is named by no chroot."""

    def __init__(self, path: Path, flusher: Flusher | None = None) -> None:
        self.path = path
        self.flusher = flusher
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Hosts are written from a few threads at once: one lock per entry, so that a file
        # many hosts share is stored once while distinct files are stored side by side.
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._known: set[str] = set()  # entries present this run: a shared file is stat'ed once

    def holds(self, sha256: str) -> bool:
        if sha256 in self._known:
            return True
        if (self.path / sha256).exists():
            self._known.add(sha256)
            return True
        return False

    def get(self, source: Source, sha256: str) -> Path:
        pooled = self.path / sha256
        if sha256 in self._known:
            return pooled
        with self._locks_lock:
            lock = self._locks.setdefault(sha256, threading.Lock())
        with lock:
            if sha256 not in self._known and not pooled.exists():
                _store(source, sha256, pooled, 0o644)
                if self.flusher is not None:
                    self.flusher.wrote(pooled)
            self._known.add(sha256)
        return pooled

    def prune(self, candidates: set[str]) -> None:
        """Drop pool entries no chroot links any more: those of `candidates`, and once a day
        all of them (a crash between storing and linking leaves an entry nobody names)."""
        swept = self.path / ".swept"
        names: Iterable[str] = candidates
        if not swept.exists() or swept.stat().st_mtime < time.time() - _SWEEP_EVERY:
            names = os.listdir(self.path)
            swept.touch()
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                path = self.path / name
                if name != ".swept" and path.stat().st_nlink == 1:
                    path.unlink()


def _store(source: Source, sha256: str, target: Path, mode: int) -> None:
    """Copy `source` to `target` by way of a temp name, checking the content still hashes to
    `sha256`: a file edited since it was hashed fails here instead of being served under a
    name that is not its hash."""
    tmp = target.with_name(f"{_TMP}{sha256}.{os.getpid()}")
    try:
        copied = _copy_hashing(source.real, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if copied != sha256:
        tmp.unlink(missing_ok=True)
        raise PublishError(f"{source.path}: file changed while publishing; publish again")
    tmp.chmod(mode)
    tmp.replace(target)
