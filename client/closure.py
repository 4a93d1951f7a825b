"""A delivered system (`deliver = "closure"`): what the host's Nix store lacks of the signed
closure, fetched over the kept-open SFTP session, verified, and imported; nothing evaluated.

    1. `nix-store --check-validity --print-invalid` of the closure: the paths to fetch.
    2. Each missing path's object (its zstd-compressed NAR) is downloaded from objects/ and must
       hash to the MANIFEST's `object`; decompressed, its NAR must hash to `nar_sha256` and be
       `nar_size` long. Any mismatch refuses the release (ReleaseError) before anything is
       imported: a store takes nothing of a release that is wrong anywhere.
    3. One `nix-store --import` of the verified NARs, every path after its references, in the
       export format Nix reads (each NAR, then its name, references and deriver). Nix registers
       a path only once it has read all of it, so an import killed halfway leaves whole paths
       and no partial one: the next run fetches what is still missing.

With a substituter named in the MANIFEST, `nix-store --realise` fetches the closure from that
binary cache instead (the cache's own signature checked by Nix, as the host's nix.conf says),
and every path's NAR hash in the store must then be the MANIFEST's: the signature decides which
paths, whoever serves them.
"""

import asyncio
import contextlib
import hashlib
import shutil
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final, TextIO

import asyncssh
import zstandard

from client import pause
from client.fetch import PARALLEL, Progress, download_object
from protocol.errors import HeraldError, ReleaseError, StorageError
from protocol.nixstore import parse_dump_db
from protocol.release import StorePath, System, import_order

_EXPORT_MAGIC: Final = 0x4558494E  # "NIXE": what follows a NAR in Nix's export format
_CHUNK: Final = 1 << 20
_ARGS: Final = 1000  # store paths per nix-store command line (well below ARG_MAX)


@dataclass(frozen=True, slots=True)
class Imported:
    paths: int  # in the closure
    missing: int  # not in the host's store before
    downloaded_bytes: int  # objects fetched from the chroot (0 with a substituter)

    def summary(self, system: System) -> str:
        source = f"substituter {system.substituter}" if system.substituter else "the chroot"
        return (
            f"system {system.path}: {self.missing} of {self.paths} store path(s) missing, "
            f"imported from {source} ({self.downloaded_bytes} bytes downloaded)"
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


def nar_hashes(store: str, paths: Sequence[str], *, timeout: float) -> dict[str, tuple[str, int]]:
    """path -> (NAR sha256, NAR size) as the store registered them (`nix-store --dump-db`)."""
    found: dict[str, tuple[str, int]] = {}
    for start in range(0, len(paths), _ARGS):
        argv = ["nix-store", *_store_option(store), "--dump-db", *paths[start : start + _ARGS]]
        try:
            registered = parse_dump_db(_run(argv, "read the Nix store's hashes", timeout=timeout))
        except HeraldError as exc:
            raise StorageError(str(exc)) from None
        found.update((path, (sha256, size)) for path, (sha256, size, _) in registered.items())
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
    paths = [entry.path for entry in system.closure]
    missing = await asyncio.to_thread(invalid, store, paths, timeout=timeout)
    wanted = [entry for entry in system.closure if entry.path in missing]
    if not wanted:
        return Imported(len(paths), 0, 0)
    if system.substituter is not None:
        await asyncio.to_thread(_substitute, system, wanted, store=store, log=log, timeout=timeout)
        return Imported(len(paths), len(wanted), 0)
    shutil.rmtree(work, ignore_errors=True)  # what a killed run left: fetched again
    try:
        work.mkdir(mode=0o700, parents=True)
    except OSError as exc:
        raise StorageError(f"cannot write {work}: {exc.strerror}") from exc
    try:
        downloaded = await _download_all(sftp, wanted, work, progress or Progress())
        await asyncio.to_thread(_verify_all, wanted, work)
        await asyncio.to_thread(_import, import_order(wanted), work, store=store, log=log, timeout=timeout)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    still = await asyncio.to_thread(invalid, store, [entry.path for entry in wanted], timeout=timeout)
    if still:
        raise StorageError(f"nix-store --import left {len(still)} path(s) missing, such as {min(still)}")
    return Imported(len(paths), len(wanted), downloaded)


async def _download_all(
    sftp: asyncssh.SFTPClient, wanted: list[StorePath], work: Path, progress: Progress
) -> int:
    gate = asyncio.Semaphore(PARALLEL)
    total = 0

    async def one(entry: StorePath) -> None:
        nonlocal total
        async with gate:
            await download_object(
                sftp, entry.path, entry.object, entry.size, work / f"{entry.object}.zst", progress
            )
        total += entry.size

    objects: dict[str, StorePath] = {}
    for entry in wanted:  # two paths with the same NAR (rare) share one object
        objects.setdefault(entry.object, entry)
    try:
        async with asyncio.TaskGroup() as group:
            for entry in objects.values():
                group.create_task(one(entry))
    except* HeraldError as failures:
        leaves = [exc for exc in failures.exceptions if isinstance(exc, HeraldError)]
        refused = [exc for exc in leaves if isinstance(exc, ReleaseError)]
        raise (refused or leaves or [StorageError(str(failures))])[0] from None
    except* OSError as failures:
        raise StorageError(f"cannot write {work}: {failures.exceptions[0]}") from None
    return total


def _verify_all(wanted: list[StorePath], work: Path) -> None:
    """Decompress each object to its NAR, which must be the MANIFEST's; nothing is imported
    before every one is."""
    for entry in wanted:
        nar = work / f"{entry.nar_sha256}.nar"
        if nar.exists():
            continue  # a path whose NAR another path shares, already checked
        digest, size = hashlib.sha256(), 0
        try:
            with (
                (work / f"{entry.object}.zst").open("rb") as packed,
                zstandard.ZstdDecompressor().stream_reader(packed) as source,
                nar.open("xb") as target,
            ):
                while chunk := source.read(_CHUNK):
                    size += len(chunk)
                    if size > entry.nar_size:
                        break
                    digest.update(chunk)
                    target.write(chunk)
        except zstandard.ZstdError as exc:
            nar.unlink(missing_ok=True)
            raise ReleaseError(f"{entry.path}: its object is not a zstd-compressed NAR: {exc}") from None
        except OSError as exc:
            nar.unlink(missing_ok=True)
            raise StorageError(f"cannot write {nar}: {exc.strerror}") from exc
        if size != entry.nar_size or digest.hexdigest() != entry.nar_sha256:
            nar.unlink(missing_ok=True)
            raise ReleaseError(f"{entry.path}: NAR does not match its sha256 in MANIFEST")


def _number(value: int) -> bytes:
    return struct.pack("<Q", value)


def _string(data: bytes) -> bytes:
    return _number(len(data)) + data + b"\0" * (-len(data) % 8)


def _import(order: list[StorePath], work: Path, *, store: str, log: TextIO, timeout: float) -> None:
    """One `nix-store --import` of the NARs in `work`, in `order`; its messages go to `log`."""
    log.flush()
    argv = ["nix-store", *_store_option(store), "--import"]
    try:
        process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log.fileno()
        )
    except OSError as exc:
        raise StorageError(f"cannot import the closure: {argv[0]}: {exc.strerror}") from exc
    stdin: IO[bytes] | None = process.stdin
    assert stdin is not None  # noqa: S101 - stdin=PIPE
    try:
        for entry in order:
            stdin.write(_number(1))
            with (work / f"{entry.nar_sha256}.nar").open("rb") as nar:
                shutil.copyfileobj(nar, stdin, _CHUNK)
            trailer = [_number(_EXPORT_MAGIC), _string(entry.path.encode())]
            trailer += [_number(len(entry.references)), *(_string(ref.encode()) for ref in entry.references)]
            trailer += [_string(b""), _number(0)]  # no deriver, no signature
            stdin.write(b"".join(trailer))
            pause.at("import")
        stdin.write(_number(0))
        stdin.close()
        returncode = process.wait(timeout=timeout)
    except (BrokenPipeError, subprocess.TimeoutExpired) as exc:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait()
        raise StorageError(f"nix-store --import did not take the closure: {exc}") from None
    finally:
        with contextlib.suppress(OSError):
            stdin.close()
    if returncode != 0:
        raise StorageError(
            f"nix-store --import failed with exit code {returncode} (its messages are in the log)"
        )


def _substitute(system: System, wanted: list[StorePath], *, store: str, log: TextIO, timeout: float) -> None:
    argv = ["nix-store", *_store_option(store), "--realise", system.path]
    argv += ["--option", "substituters", system.substituter or ""]
    _run(argv, f"fetch {system.path} from {system.substituter}", timeout=timeout, log=log)
    registered = nar_hashes(store, [entry.path for entry in wanted], timeout=timeout)
    for entry in wanted:
        if registered.get(entry.path) != (entry.nar_sha256, entry.nar_size):
            raise ReleaseError(f"{entry.path}: the substituter's NAR does not match its sha256 in MANIFEST")
