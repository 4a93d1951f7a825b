"""Check and fetch: read `current`, then download and verify a release into a staging tree.

Nothing here trusts the server beyond the pinned keys: the MANIFEST must carry a valid
signature by a publisher key the agent trusts (client.chroot), name this host and the
generation `current` names, and hold only safe relative paths; every file must hash to the
MANIFEST's sha256. Files the agent already holds (by hash) are copied locally; the others are
downloaded, a few at a time. Any violation rejects the whole release (ReleaseError), and the
staging tree is removed.

Only what the release itself says wrong is a ReleaseError. Every SFTP status from the server
(a file missing while the publisher replaces a release, "Too many open files", a failure) and
every lost connection is an UnreachableError: the server is away or busy, the generation is not
marked failed, and the agent tries again with backoff.
"""

import asyncio
import hashlib
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final, Protocol, TypeVar

import asyncssh

from client.store import Store
from protocol.errors import HeraldError, ReleaseError, StorageError, UnreachableError
from protocol.files import write_all
from protocol.release import (
    CURRENT,
    MAX_CURRENT,
    MAX_RELEASE,
    OBJECTS,
    Current,
    FileEntry,
    Manifest,
    decode_manifest,
    release_path,
    split_release,
)

# Files open at once on the server per agent, downloading. Each costs the server a descriptor
# (the embedded server holds every host's in one process): with the connection's own socket, an
# agent fetching holds at most PARALLEL + 1, so a server with LimitNOFILE=65536 (deploy/systemd,
# nix/server.nix) serves about 7,000 agents fetching at once (16 made it 3,800, and a fleet of 64
# changing at once exhausted the default 1,024). Reads within a file still go out together (a
# window of requests per file), so a few files in flight keep a link busy.
PARALLEL: Final = 8
T = TypeVar("T")
Verify = Callable[[bytes, bytes], Awaitable[None]]  # (MANIFEST, signature line): raises if untrusted
# The connection went away (the server stopped, the network changed): try again later.
_LOST = (
    asyncssh.SFTPConnectionLost,
    asyncssh.SFTPNoConnection,
    asyncssh.DisconnectError,
    ConnectionError,
    OSError,
)
REQUEST_TIMEOUT: Final = 30.0  # seconds without any answer from a server that is connected
_CHUNK: Final = 1 << 16
_ONE_REQUEST: Final = 1 << 14
_WINDOW: Final = 16 * _CHUNK  # at most 1 MiB of a file in memory


@dataclass(frozen=True, slots=True)
class Fetched:
    manifest: Manifest
    tree: Path
    downloaded: int  # files fetched from the server
    downloaded_bytes: int
    reused: int  # files copied from trees the agent already held


async def read_optional(sftp: asyncssh.SFTPClient, path: str, limit: int) -> bytes | None:
    """Like read_small, but None for a file the server does not have (one request)."""
    try:
        return await read_small(sftp, path, limit)
    except UnreachableError as exc:
        if isinstance(exc.__cause__, asyncssh.SFTPNoSuchFile):
            return None
        raise


async def read_small(sftp: asyncssh.SFTPClient, path: str, limit: int) -> bytes:
    """A whole file of at most `limit` bytes, in as few requests as the size allows.

    asyncssh's `read(n)` keeps asking past a short read and sends many requests at once for a
    large `n`; every one of them costs the server a packet. The first `_ONE_REQUEST` bytes are
    asked for in one request, which every SFTP server answers whole (their read lengths are
    32 KiB and more): a shorter answer is the whole file (open, read, close). Only a file that
    fills it is sized by `fstat` and its rest read exactly.
    """
    try:
        async with await _answer(sftp.open(path, "rb", block_size=0), path) as stream:
            data = _binary(await _answer(stream.read(min(limit + 1, _ONE_REQUEST)), path))
            if len(data) == _ONE_REQUEST <= limit:
                size = (await _answer(stream.stat(), path)).size or 0
                if size > limit:
                    raise ReleaseError(f"{path} is larger than {limit} bytes")
                data += await _read_exactly(stream, max(0, size - len(data)), len(data))
    except _LOST as exc:
        raise UnreachableError(f"connection lost while reading {path}: {exc}") from exc
    except asyncssh.SFTPNoSuchFile as exc:
        raise UnreachableError(f"{path} is missing on the server") from exc
    except asyncssh.SFTPError as exc:
        raise UnreachableError(f"server: {path}: {exc.reason}") from exc
    if len(data) > limit:
        raise ReleaseError(f"{path} is larger than {limit} bytes")
    return data


class Progress:
    """When the server last answered any request of this fetch."""

    def __init__(self) -> None:
        self.last = time.monotonic()


async def _answer(request: Awaitable[T], what: str, progress: Progress | None = None) -> T:
    """One SFTP request's answer. UnreachableError once the server has answered nothing for
    REQUEST_TIMEOUT: up, but not answering (a session process gone, out of descriptors). A request
    may wait longer behind others on a slow link, as long as answers keep coming."""
    progress = progress or Progress()
    task = asyncio.ensure_future(request)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=REQUEST_TIMEOUT)
            if done:
                progress.last = time.monotonic()
                return task.result()
            if time.monotonic() - progress.last >= REQUEST_TIMEOUT:
                raise UnreachableError(f"no answer from the server for {REQUEST_TIMEOUT:g}s ({what})")
    finally:
        task.cancel()


async def _read_exactly(
    stream: asyncssh.SFTPClientFile,
    size: int,
    offset: int = 0,
    *,
    probe_end: bool = False,
    progress: Progress | None = None,
) -> bytes:
    """`size` bytes from `offset`, one request per `_CHUNK`, all in flight at once; shorter only
    at the end of the file. With `probe_end` the last request asks for one byte more, so a file
    longer than `size` shows in the same round trip (the result is then `size + 1` long)."""
    starts = range(offset, offset + size, _CHUNK) or range(offset, offset + int(probe_end))
    if not starts:
        return b""
    last = starts[-1]
    shared = progress or Progress()
    parts = await asyncio.gather(
        *(
            _read_at(
                stream,
                start,
                min(_CHUNK, offset + size - start),
                probe_end=probe_end and start == last,
                progress=shared,
            )
            for start in starts
        )
    )
    return b"".join(parts)


async def _read_at(
    stream: asyncssh.SFTPClientFile, offset: int, size: int, *, probe_end: bool, progress: Progress
) -> bytes:
    data = b""
    extra = 1 if probe_end else 0
    while True:  # a short answer is asked again for the rest; an empty one is the end of the file
        request = stream.read(size + extra - len(data), offset + len(data))
        chunk = _binary(await _answer(request, "reading a file", progress))
        data += chunk
        if not chunk or len(data) >= size:
            return data


async def check(sftp: asyncssh.SFTPClient) -> Current:
    """What the server serves now: open, read and close `current` on the kept-open session."""
    return Current.decode(await read_small(sftp, CURRENT, MAX_CURRENT))


async def fetch(
    sftp: asyncssh.SFTPClient, current: Current, *, host: str, verify: Verify, store: Store
) -> Fetched:
    data, signature = split_release(await read_small(sftp, release_path(current.generation), MAX_RELEASE))
    await verify(data, signature)
    manifest = decode_manifest(data, host=host, current=current)

    have = _local_index(store)
    staging = store.staging(manifest.generation)
    try:
        counts = await _assemble(sftp, manifest.content.files, staging, have)
        tree = store.commit_tree(staging, manifest, data)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Fetched(manifest, tree, *counts)


def _local_index(store: Store) -> dict[str, Path]:
    """sha256 -> a local file with that content, from every tree the agent holds."""
    index: dict[str, Path] = {}
    for entry in store.trees.glob("*.manifest"):
        stem = entry.name.removesuffix(".manifest")
        manifest = store.manifest(int(stem)) if stem.isdigit() else None
        if manifest is not None:
            tree = store.tree(manifest.generation)
            for file in manifest.content.files:
                index.setdefault(file.sha256, tree / file.path)
    return index


async def _assemble(
    sftp: asyncssh.SFTPClient, files: list[FileEntry], staging: Path, have: dict[str, Path]
) -> tuple[int, int, int]:
    gate = asyncio.Semaphore(PARALLEL)
    progress = Progress()
    downloaded = downloaded_bytes = reused = 0

    async def one(entry: FileEntry) -> None:
        nonlocal downloaded, downloaded_bytes, reused
        target = staging / entry.path
        local = have.get(entry.sha256)
        if local is not None and _reuse(local, target, entry):
            reused += 1
            return
        async with gate:
            await _download(sftp, entry, target, progress)
        downloaded += 1
        downloaded_bytes += entry.size

    directories = {str(PurePosixPath(entry.path).parent) for entry in files} - {"."}
    try:
        for directory in directories:  # once each, not once per file
            (staging / directory).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot write the staging tree in {staging}: {exc}") from None
    try:
        async with asyncio.TaskGroup() as group:
            for entry in files:
                group.create_task(one(entry))
    except* HeraldError as failures:
        # The first verification or connection failure rejects the release; one line says why.
        raise _first(failures) from None
    except* OSError as failures:
        first = failures.exceptions[0]
        raise StorageError(f"cannot write the staging tree in {staging}: {first}") from None
    return downloaded, downloaded_bytes, reused


def _first(group: BaseExceptionGroup[HeraldError]) -> HeraldError:
    """What rejects the fetch: a verification failure if there is one (the release is wrong,
    whatever else happened), else the first error (the server or the connection)."""
    leaves = list(_leaves(group))
    for exc in leaves:
        if isinstance(exc, ReleaseError):
            return exc
    if leaves:
        return leaves[0]
    raise group


def _leaves(group: BaseExceptionGroup[HeraldError]) -> Iterator[HeraldError]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def _reuse(source: Path, target: Path, entry: FileEntry) -> bool:
    """Take a file from an earlier tree if it still hashes to what the MANIFEST names; False
    otherwise. Trees are never changed once in place, so a file with the same mode is shared
    with a hard link (creating a link costs a fraction of writing a file); else it is copied."""
    try:
        with source.open("rb") as src:
            data = src.read(entry.size + 1)
            mode = os.fstat(src.fileno()).st_mode & 0o7777
    except OSError:
        return False
    if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
        return False
    if mode == entry.mode:
        try:
            os.link(source, target)
        except OSError:
            pass  # links refused here: copy
        else:
            return True
    _write_new(target, data, entry.mode)
    return True


async def _download(sftp: asyncssh.SFTPClient, entry: FileEntry, target: Path, progress: Progress) -> None:
    await download_object(sftp, entry.path, entry.sha256, entry.size, _Local(target, entry.mode), progress)


class Sink(Protocol):
    """Where a download's bytes go, in order; closed however the download ends."""

    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...


async def download_object(
    sftp: asyncssh.SFTPClient, what: str, sha256: str, expected: int, out: Sink, progress: Progress
) -> None:
    """objects/<sha256> into `out`: `expected` bytes hashing to `sha256`, or ReleaseError
    naming `what` (a path of the release, a store path of its closure)."""
    path = f"{OBJECTS}/{sha256}"
    digest = hashlib.sha256()
    size = 0
    try:
        async with await _answer(sftp.open(path, "rb", block_size=0), path, progress) as stream:
            # The MANIFEST's size, a window at a time, and one byte more at the end: a file that
            # is shorter or longer than the MANIFEST says fails like one whose content differs.
            start = 0
            while True:
                want = min(_WINDOW, expected - start)
                last = start + want >= expected
                chunk = await _read_exactly(stream, want, start, probe_end=last, progress=progress)
                size += len(chunk)
                digest.update(chunk)
                if size > expected:
                    break
                out.write(chunk)
                start += want
                if last or len(chunk) < want:
                    break
    except _LOST as exc:
        raise UnreachableError(f"connection lost while fetching {what}: {exc}") from exc
    except asyncssh.SFTPNoSuchFile as exc:
        raise UnreachableError(f"{what}: object {sha256[:12]} is missing on the server") from exc
    except asyncssh.SFTPError as exc:
        raise UnreachableError(f"server: {what}: {exc.reason}") from exc
    finally:
        out.close()
    if size != expected or digest.hexdigest() != sha256:
        raise ReleaseError(f"{what}: content does not match its sha256 in MANIFEST")


class _Local:
    """A new file in the staging tree; its failures are the agent's disk's, not the server's."""

    def __init__(self, path: Path, mode: int) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc.strerror}") from exc
        try:
            os.fchmod(self._fd, mode)  # the MANIFEST's mode, whatever the umask
        except OSError as exc:
            os.close(self._fd)
            raise StorageError(f"cannot write {path}: {exc.strerror}") from exc

    def write(self, data: bytes) -> None:
        try:
            write_all(self._fd, data)
        except OSError as exc:
            raise StorageError(f"cannot write {self.path}: {exc.strerror}") from exc

    def close(self) -> None:
        os.close(self._fd)


def _binary(data: str | bytes) -> bytes:
    """asyncssh types reads as str | bytes; files opened "rb" give bytes."""
    if isinstance(data, bytes):
        return data
    raise TypeError("SFTP file was not opened in binary mode")


def _write_new(target: Path, data: bytes, mode: int) -> None:
    out = _Local(target, mode)
    try:
        out.write(data)
    finally:
        out.close()
