"""Built systems for hosts with `deliver = "closure"`: build, list the closure, store its NARs.

    [publish] system  (or the default)  ->  /nix/store/...-nixos-system-<host>
    nix-store --query --requisites      ->  the closure
    nix-store --dump-db                 ->  each path's NAR sha256, size and references
    nix-store --dump | zstd             ->  STATE/objects/<sha256>, once per store path

The compressed NARs (zstd) live in the pool (publisher.chroot.Pool) and are hard-linked into the
chroot of every host whose closure holds them, and only there: a host reads the NARs of its own
system and never learns another host's store paths. STATE/publisher/nars.msgpack remembers
which object holds which path's NAR (a store path never changes), so a publish compresses only
paths no earlier publish stored.

Every kept release's system is a GC root (STATE/publisher/roots/<host>-<generation>, an
indirect root of the server's store): the paths a kept release names stay until it is pruned.
"""

import contextlib
import hashlib
import os
import re
import subprocess
import tempfile
import threading
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Final

import msgspec
import zstandard

from protocol.errors import PublishError
from protocol.files import write_atomic
from protocol.nixstore import parse_dump_db
from protocol.release import NAR_WINDOW_LOG, StorePath, System
from publisher.chroot import Pool

# zstd, not xz: decompressing is what a small host pays, ~700 MB/s against xz's ~25 here; a level
# above the default costs the publisher once per store path.
_ZSTD_LEVEL: Final = 9
_CHUNK: Final = 1 << 20
_ARGS: Final = 1000
_ROOT_NAME: Final = re.compile(r"(?P<host>[a-z][a-z0-9-]*)-(?P<generation>[0-9]+)")


def default_system_command(flake: str | None) -> list[str]:
    """`[publish] system` unset: build the host's NixOS system from its release directory."""
    if flake is not None:
        return [
            "nix",
            "--extra-experimental-features",
            "nix-command flakes",
            "build",
            "--no-link",
            "--print-out-paths",
            "{release}#nixosConfigurations.{flake}.config.system.build.toplevel",
        ]
    return [
        "nix-build",
        "<nixpkgs/nixos>",
        "-A",
        "system",
        "-I",
        "nixos-config={release}/configuration.nix",
        "--no-out-link",
    ]


def _nix(argv: list[str], *, timeout: float) -> bytes:
    try:
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise PublishError(f"{argv[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise PublishError(f"{argv[0]} {argv[1]}: no result within {timeout:g}s") from None
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").splitlines()
        last = [line for line in lines if line.strip() and not line.startswith("warning:")][-1:]
        raise PublishError(f"{' '.join(argv[:2])}: {last[0] if last else f'exit code {done.returncode}'}")
    return done.stdout


class _Nar(msgspec.Struct, frozen=True, array_like=True):
    nar_sha256: str
    nar_size: int
    object: str
    size: int


class Closures:
    """The systems of one publish run, and the NARs they need in the pool."""

    def __init__(self, pool: Pool, index: Path, *, timeout: float) -> None:
        self.pool = pool
        self.index = index
        self.timeout = timeout
        try:
            self._nars = msgspec.msgpack.decode(index.read_bytes(), type=dict[str, _Nar])
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            self._nars = {}
        self._lock = threading.Lock()
        self._storing: dict[str, threading.Lock] = {}
        self.stored = 0  # NARs compressed this run

    def system(self, path: str, substituter: str | None) -> System:
        """The signed description of the system at `path`: its closure, each path's NAR in the
        pool (unless a substituter serves them)."""
        requisites = (
            _nix(["nix-store", "--query", "--requisites", path], timeout=self.timeout).decode().split()
        )
        info: dict[str, tuple[str, int, list[str]]] = {}
        for start in range(0, len(requisites), _ARGS):
            dumped = _nix(
                ["nix-store", "--dump-db", *requisites[start : start + _ARGS]], timeout=self.timeout
            )
            info.update(parse_dump_db(dumped.decode()))
        closure = []
        for name in sorted(requisites):
            if name not in info:
                raise PublishError(f"nix-store --dump-db gave no registration for {name}")
            nar_sha256, nar_size, references = info[name]
            nar = None if substituter is not None else self._object(name, nar_sha256, nar_size)
            closure.append(
                StorePath(
                    name,
                    nar_sha256,
                    nar_size,
                    sorted(references),
                    nar.object if nar else "",
                    nar.size if nar else 0,
                )
            )
        return System(path=path, closure=closure, substituter=substituter)

    def _object(self, path: str, nar_sha256: str, nar_size: int) -> _Nar:
        with self._lock:
            lock = self._storing.setdefault(path, threading.Lock())
        with lock:  # hosts sharing a path store it once
            known = self._nars.get(path)
            if known is not None and known.nar_sha256 == nar_sha256 and self.pool.holds(known.object):
                return known
            nar = self._store(path, nar_sha256, nar_size)
            with self._lock:
                self._nars[path] = nar
            return nar

    def _store(self, path: str, nar_sha256: str, nar_size: int) -> _Nar:
        """`nix-store --dump` of `path`, checked against the store's NAR hash, zstd into the pool."""
        fd, name = tempfile.mkstemp(prefix=".tmp-nar.", dir=self.pool.path)
        os.close(fd)
        tmp = Path(name)
        try:
            dumped, nar, sha256, compressed = self._compress(path, tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if dumped != 0 or nar != (nar_sha256, nar_size):
            tmp.unlink(missing_ok=True)
            why = (
                "failed" if dumped != 0 else "does not hash to what the store registered (nix-store --verify)"
            )
            raise PublishError(f"nix-store --dump {path} {why}")
        tmp.chmod(0o644)
        tmp.replace(self.pool.path / sha256)
        self.stored += 1
        return _Nar(nar_sha256, nar_size, sha256, compressed)

    def _compress(self, path: str, tmp: Path) -> tuple[int, tuple[str, int], str, int]:
        """(exit code of nix-store --dump, (NAR sha256, NAR size), sha256 and size of its zstd)."""
        nar_digest, digest, size, compressed = hashlib.sha256(), hashlib.sha256(), 0, 0
        parameters = zstandard.ZstdCompressionParameters.from_level(_ZSTD_LEVEL, window_log=NAR_WINDOW_LOG)
        compressor = zstandard.ZstdCompressor(compression_params=parameters).compressobj()
        argv = ["nix-store", "--dump", path]
        dump = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert dump.stdout is not None  # noqa: S101 - stdout=PIPE
        try:
            with tmp.open("wb") as out:
                while chunk := dump.stdout.read(_CHUNK):
                    nar_digest.update(chunk)
                    size += len(chunk)
                    data = compressor.compress(chunk)
                    digest.update(data)
                    compressed += len(data)
                    out.write(data)
                data = compressor.flush()
                digest.update(data)
                compressed += len(data)
                out.write(data)
            returncode = dump.wait(timeout=self.timeout)
        except BaseException:
            dump.kill()
            dump.wait()
            raise
        return returncode, (nar_digest.hexdigest(), size), digest.hexdigest(), compressed

    def save(self) -> None:
        """Remember the NARs the pool still holds (a pruned one is stored again when needed)."""
        kept = {path: nar for path, nar in self._nars.items() if (self.pool.path / nar.object).exists()}
        write_atomic(self.index, msgspec.msgpack.encode(kept), mode=0o600, durable=False)


# ---------------------------------------------------------------- GC roots


def add_root(roots: Path, host: str, generation: int, path: str, *, timeout: float) -> None:
    """Keep `path` (and its closure) in the server's store while the release is kept."""
    roots.mkdir(mode=0o700, parents=True, exist_ok=True)
    link = roots / f"{host}-{generation}"
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    _nix(["nix-store", "--realise", path, "--add-root", str(link), "--indirect"], timeout=timeout)


def prune_roots(roots: Path, kept: Mapping[str, Collection[int]]) -> None:
    """Drop the roots of releases that are gone: `kept` holds, for each host it names, the
    generations whose releases are still there."""
    try:
        names = os.listdir(roots)
    except FileNotFoundError:
        return
    for name in names:
        match = _ROOT_NAME.fullmatch(name)
        if match and match["host"] in kept and int(match["generation"]) not in kept[match["host"]]:
            with contextlib.suppress(FileNotFoundError):
                (roots / name).unlink()
