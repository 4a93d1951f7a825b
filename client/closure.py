"""A delivered system (`deliver = "closure"`): what the host's Nix store lacks of the signed
closure, fetched over the kept-open SFTP session, verified, and imported; nothing evaluated.

    1. `nix-store --check-validity --print-invalid` of the closure: the paths to fetch.
    2. Each missing path's object (its zstd-compressed NAR) is downloaded from objects/ and must
       hash to the MANIFEST's `object`; decompressed as it arrives, its NAR must hash to
       `nar_sha256` and be `nar_size` long. Any mismatch refuses the release (ReleaseError)
       before anything is imported: a store takes nothing of a release that is wrong anywhere.
    3. `nix copy --from file://WORK` of the verified NARs, WORK being a binary cache the agent
       writes from the MANIFEST (a narinfo per path: its NAR hash, size and references), every
       path after its references. Nix checks each NAR against its narinfo again and registers
       whole paths only, so an import killed halfway leaves no partial one: the next run
       fetches what is still missing. (Twice as fast here as `nix-store --import` of the same.)

With a substituter named in the MANIFEST, `nix-store --realise` fetches the closure from that
binary cache instead (the cache's own signature checked by Nix, as the host's nix.conf says),
and every path's NAR hash in the store must then be the MANIFEST's: the signature decides which
paths, whoever serves them.
"""

import asyncio
import contextlib
import hashlib
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final, TextIO, cast

import asyncssh
import zstandard

from client import pause
from client.fetch import PARALLEL, Progress, download_object
from protocol.errors import HeraldError, ReleaseError, StorageError
from protocol.nixstore import parse_dump_db
from protocol.release import NAR_WINDOW, StorePath, System, import_order

_NIX: Final = ["nix", "--extra-experimental-features", "nix-command"]
_BATCHES: Final = 4  # `nix copy` runs per import: a killed one loses at most a quarter of the work
_PIECE: Final = 1 << 16  # decompressed bytes handed on at a time
_ARGS: Final = 1000  # store paths per nix-store command line (well below ARG_MAX)


@dataclass(frozen=True, slots=True)
class Imported:
    paths: int  # in the closure
    missing: int  # not in the host's store before
    downloaded_bytes: int  # objects fetched from the chroot (0 with a substituter)
    seconds: float  # asking the store, fetching, verifying and importing
    importing: float = 0.0  # of which the import (nix copy)

    def summary(self, system: System) -> str:
        source = f"substituter {system.substituter}" if system.substituter else "the chroot"
        return (
            f"system {system.path}: {self.missing} of {self.paths} store path(s) missing, "
            f"imported from {source} ({self.downloaded_bytes} bytes downloaded) in {self.seconds:.2f}s "
            f"(the import {self.importing:.2f}s)"
        )


def _store_option(store: str) -> list[str]:
    return ["--store", store] if store != "/" else []


def _run(argv: list[str], what: str, *, timeout: float, log: TextIO | None = None) -> str:
    """A nix-store command's stdout; StorageError (this host's store, tried again later) if it
    cannot run or fails."""
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise StorageError(f"cannot {what}: {argv[0]} not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise StorageError(f"cannot {what}: {argv[0]} gave no result within {timeout:g}s") from exc
    if log is not None and done.stderr.strip():
        log.write(done.stderr)
    if done.returncode != 0:
        last = [line for line in done.stderr.splitlines() if line.strip()][-1:] or [
            f"exit code {done.returncode}"
        ]
        raise StorageError(f"cannot {what}: {last[0]}")
    return done.stdout


def invalid(store: str, paths: Sequence[str], *, timeout: float) -> set[str]:
    """The `paths` the store does not hold (valid) yet."""
    missing: set[str] = set()
    for start in range(0, len(paths), _ARGS):
        argv = ["nix-store", *_store_option(store), "--check-validity", "--print-invalid"]
        out = _run([*argv, *paths[start : start + _ARGS]], "ask the Nix store what it holds", timeout=timeout)
        missing.update(out.split())
    return missing


def registrations(
    store: str, paths: Sequence[str], *, timeout: float
) -> dict[str, tuple[str, int, list[str]]]:
    """path -> (NAR sha256, NAR size, references) as the store registered them (`--dump-db`)."""
    found: dict[str, tuple[str, int, list[str]]] = {}
    for start in range(0, len(paths), _ARGS):
        argv = ["nix-store", *_store_option(store), "--dump-db", *paths[start : start + _ARGS]]
        out = _run(argv, "read the Nix store's hashes", timeout=timeout)
        try:
            found.update(parse_dump_db(out))
        except HeraldError as exc:
            raise StorageError(str(exc)) from None
    return found


async def realise(
    sftp: asyncssh.SFTPClient,
    system: System,
    *,
    store: str,
    work: Path,
    log: TextIO,
    timeout: float,
    progress: Progress | None = None,
) -> Imported:
    """Make the store hold every path of `system`'s closure, verified against the MANIFEST."""
    started = time.monotonic()
    paths = [entry.path for entry in system.closure]
    missing = await asyncio.to_thread(invalid, store, paths, timeout=timeout)
    wanted = [entry for entry in system.closure if entry.path in missing]
    if not wanted:
        await asyncio.to_thread(_hold, system, store=store, work=work, timeout=timeout)
        return Imported(len(paths), 0, 0, time.monotonic() - started)
    if system.substituter is not None:
        await asyncio.to_thread(_substitute, system, wanted, store=store, log=log, timeout=timeout)
        await asyncio.to_thread(_hold, system, store=store, work=work, timeout=timeout)
        return Imported(len(paths), len(wanted), 0, time.monotonic() - started)
    shutil.rmtree(work, ignore_errors=True)  # what a killed run left: fetched again
    try:
        (work / "nar").mkdir(mode=0o700, parents=True)
    except OSError as exc:
        raise StorageError(f"cannot write {work}: {exc.strerror}") from exc
    try:
        downloaded = await _download_all(sftp, wanted, work, progress or Progress())
        fetched = time.monotonic()
        order = import_order(wanted)
        await asyncio.to_thread(_import, system, order, work, store=store, log=log, timeout=timeout)
        importing = time.monotonic() - fetched
    finally:
        shutil.rmtree(work, ignore_errors=True)
    still = await asyncio.to_thread(invalid, store, [entry.path for entry in wanted], timeout=timeout)
    if still:
        raise StorageError(f"the import left {len(still)} path(s) missing, such as {min(still)}")
    await asyncio.to_thread(_hold, system, store=store, work=work, timeout=timeout)
    return Imported(len(paths), len(wanted), downloaded, time.monotonic() - started, importing)


def _hold(system: System, *, store: str, work: Path, timeout: float) -> None:
    """Keep the imported system from the host's collector until the switch makes the profile
    hold it: an indirect root beside WORK (`<state>/closure.root`), replaced by the next one."""
    link = work.with_name(f"{work.name}.root")
    argv = [
        "nix-store",
        *_store_option(store),
        "--realise",
        system.path,
        "--add-root",
        str(link),
        "--indirect",
    ]
    link.unlink(missing_ok=True)
    _run(argv, f"keep {system.path} from the collector", timeout=timeout)


class _Writer:
    """What zstandard's stream_writer hands each piece of output to."""

    def __init__(self, take: Callable[[bytes], int]) -> None:
        self.write = take


class _Nar:
    """Where a downloaded object goes: decompressed as it arrives into WORK/nar/<nar_sha256>.nar,
    its NAR hashed and sized; `check` (once the object's own hash was verified) says whether the
    NAR is the MANIFEST's. Decompression is bounded whatever the object holds (a chroot's files
    are not trusted before their hash is checked, and that is at their end): output goes out in
    pieces of 64 KiB, and the first byte past the NAR's size stops it; a frame asking for a
    window over NAR_WINDOW is refused."""

    def __init__(self, entry: StorePath, work: Path) -> None:
        self.entry = entry
        self.path = work / "nar" / f"{entry.nar_sha256}.nar"
        self._digest = hashlib.sha256()
        self._size = 0
        try:
            self._file = self.path.open("xb")
        except OSError as exc:
            raise StorageError(f"cannot write {self.path}: {exc.strerror}") from exc
        decompressor = zstandard.ZstdDecompressor(max_window_size=NAR_WINDOW)
        writer = cast("IO[bytes]", _Writer(self._take))  # zstandard needs only its write()
        self._stream = decompressor.stream_writer(writer, write_size=_PIECE, closefd=False)

    def write(self, data: bytes) -> None:
        """Compressed bytes, in order (client.fetch.Sink)."""
        try:
            self._stream.write(data)
        except zstandard.ZstdError as exc:
            raise ReleaseError(f"{self.entry.path}: its object is not a zstd-compressed NAR: {exc}") from None

    def _take(self, chunk: bytes) -> int:
        self._size += len(chunk)
        if self._size > self.entry.nar_size:
            raise ReleaseError(f"{self.entry.path}: NAR does not match its sha256 in MANIFEST")
        self._digest.update(chunk)
        try:
            self._file.write(chunk)
        except OSError as exc:
            raise StorageError(f"cannot write {self.path}: {exc.strerror}") from exc
        return len(chunk)

    def close(self) -> None:
        self._file.close()

    def check(self) -> None:
        if (self._size, self._digest.hexdigest()) != (self.entry.nar_size, self.entry.nar_sha256):
            raise ReleaseError(f"{self.entry.path}: NAR does not match its sha256 in MANIFEST")


async def _download_all(
    sftp: asyncssh.SFTPClient, wanted: list[StorePath], work: Path, progress: Progress
) -> int:
    """Every object of `wanted`, a few at a time, each checked as it lands: its own hash, then
    its NAR's. The first failure stops them all; nothing is imported before every one passed."""
    gate = asyncio.Semaphore(PARALLEL)
    total = 0

    async def one(entry: StorePath) -> None:
        nonlocal total
        async with gate:
            nar = _Nar(entry, work)
            await download_object(sftp, entry.path, entry.object, entry.size, nar, progress)
            nar.check()
        total += entry.size

    nars: dict[str, StorePath] = {}
    for entry in wanted:  # two paths with the same NAR (rare) share one
        nars.setdefault(entry.nar_sha256, entry)
    try:
        async with asyncio.TaskGroup() as group:
            for entry in nars.values():
                group.create_task(one(entry))
    except* HeraldError as failures:
        leaves = [exc for exc in failures.exceptions if isinstance(exc, HeraldError)]
        refused = [exc for exc in leaves if isinstance(exc, ReleaseError)]
        raise (refused or leaves or [StorageError(str(failures))])[0] from None
    except* OSError as failures:
        raise StorageError(f"cannot write {work}: {failures.exceptions[0]}") from None
    return total


def _narinfo(entry: StorePath) -> str:
    references = " ".join(reference.removeprefix("/nix/store/") for reference in entry.references)
    return (
        f"StorePath: {entry.path}\nURL: nar/{entry.nar_sha256}.nar\nCompression: none\n"
        f"NarHash: sha256:{entry.nar_sha256}\nNarSize: {entry.nar_size}\nReferences: {references}\n"
    )


def _import(
    system: System, order: list[StorePath], work: Path, *, store: str, log: TextIO, timeout: float
) -> None:
    """`work` as a binary cache of the closure (a narinfo for every path, from the MANIFEST; the
    verified NARs of the missing ones), copied into the store with `nix copy`, which checks each
    NAR against its narinfo again and registers whole paths only. In up to _BATCHES steps, every
    path after its references: an import killed halfway keeps what earlier steps registered."""
    (work / "nix-cache-info").write_text("StoreDir: /nix/store\n")
    for entry in system.closure:
        (work / f"{entry.path.removeprefix('/nix/store/').split('-', 1)[0]}.narinfo").write_text(
            _narinfo(entry)
        )
    size = -(-len(order) // _BATCHES)
    target = ["--to", store] if store != "/" else []
    for start in range(0, len(order), size):
        batch = order[start : start + size]
        argv = [*_NIX, "copy", "--no-check-sigs", "--from", f"file://{work}", *target]
        _run([*argv, *(entry.path for entry in batch)], "import the closure", timeout=timeout, log=log)
        later = {entry.nar_sha256 for entry in order[start + size :]}
        for entry in batch:  # in the store now: its NAR is not held twice while the rest goes in
            if entry.nar_sha256 not in later:
                (work / "nar" / f"{entry.nar_sha256}.nar").unlink(missing_ok=True)
        pause.at("import")


def _substitute(system: System, wanted: list[StorePath], *, store: str, log: TextIO, timeout: float) -> None:
    """`nix-store --realise` against the substituter, then every path it brought must be the
    MANIFEST's: NAR hash, size and references (a cache claiming other references would bring
    paths nobody signed). Those that are not are deleted again before the release is refused:
    a path left valid would never be looked at again, and a later release naming it would run
    it."""
    argv = ["nix-store", *_store_option(store), "--realise", system.path]
    argv += ["--option", "substituters", system.substituter or ""]
    _run(argv, f"fetch {system.path} from {system.substituter}", timeout=timeout, log=log)
    registered = registrations(store, [entry.path for entry in wanted], timeout=timeout)
    wrong = [
        entry
        for entry in wanted
        if (found := registered.get(entry.path)) is None
        or (found[0], found[1], sorted(found[2]))
        != (entry.nar_sha256, entry.nar_size, sorted(entry.references))
    ]
    if not wrong:
        return
    delete = ["nix-store", *_store_option(store), "--delete"]
    for entry in reversed(import_order(wanted)):  # what refers to a path goes before it
        with contextlib.suppress(StorageError):
            _run([*delete, entry.path], "delete a path the substituter got wrong", timeout=timeout, log=log)
    kept = [
        entry.path
        for entry in wrong
        if entry.path not in invalid(store, [e.path for e in wrong], timeout=timeout)
    ]
    left = f"; still in the store, delete it by hand: {' '.join(kept)}" if kept else ""
    raise ReleaseError(
        f"{wrong[0].path}: the substituter's NAR or references do not match the MANIFEST{left}"
    )
