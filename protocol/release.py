"""The release format: what the publisher writes into a chroot and what an agent verifies.

    current                 "<generation> <version>\\n", replaced atomically, written last
    objects/<sha256>        file contents, named by their hash; for a closure host, also the
                            zstd-compressed NARs of its system's closure (format 3, `System`)
    releases/<generation>   the release: one line with the ed25519 signature of the MANIFEST
                            (base64), then the MANIFEST: this module's `Manifest`, JSON

`version` is the hash of what the host gets (files, modes, operation, flake); `generation` grows
by one whenever the version changes. Releases are named by generation, not version, so that a
host returning to an earlier content gets a new release instead of a rewritten old one.

A release is one file, the signature beside the MANIFEST it signs: publishing a change that every
host receives writes, and later prunes, one file per host instead of a directory and two files,
and an agent fetches it with one request.

Formats (protocol.formats): a format-1 release is byte for byte what herald 0.1 wrote and reads
(its agents refuse unknown fields); from format 2 the MANIFEST names its format and `current`
carries `format=2 keys=<n>`, n being how many key statements credentials/publisher.keys holds.
Readers ignore fields and `current` tokens they do not know, and check the rest as strictly.
"""

import base64
import functools
import hashlib
import re
from typing import Annotated, Final

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol import formats
from protocol.errors import NotYetError, ReleaseError
from protocol.messages import Timestamp, Version
from protocol.nixstore import STORE_PATH
from protocol.settings import Operation

CURRENT: Final = "current"
OBJECTS: Final = "objects"
RELEASES: Final = "releases"
CREDENTIALS: Final = "credentials"
LOGS: Final = "logs"
# The name an agent gives a finished run's log in logs/ (client.store.log_name), which its state
# names: what an admin surface may look a log up by (`/logs/<host>/<name>` on the fleet page).
LOG_NAME: Final = re.compile(r"(\d{8}T\d{6}Z)-g(\d+)-(applied|failed|rolled-back)\.log")
MANIFEST: Final = "MANIFEST"
BROKER_SECRET: Final = "broker.secret"  # noqa: S105 - a file name, not a secret
PUBLISHER_KEY: Final = "publisher.pub"  # the key releases are signed with now (herald 0.1 pins it)
PUBLISHER_KEYS: Final = "publisher.keys"  # the key statements agents follow (protocol.keychain)

MAX_MANIFEST: Final = 32 * 1024 * 1024
MAX_SIGNATURE: Final = 256  # the base64 line of an ed25519 signature is 88 bytes
MAX_RELEASE: Final = MAX_SIGNATURE + MAX_MANIFEST
MAX_CURRENT: Final = 256
_KEY_PREFIX: Final = "ed25519:"

Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]


class FileEntry(msgspec.Struct, frozen=True, array_like=True):
    """One regular file of a release: [path, mode, size, sha256] (later formats may append)."""

    path: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    mode: Annotated[int, msgspec.Meta(ge=0, le=0o777)]
    size: Annotated[int, msgspec.Meta(ge=0)]
    sha256: Sha256


# \Z, not $: "$" lets a trailing newline through, which a narinfo line must never get.
StorePathName = Annotated[str, msgspec.Meta(pattern=f"^{STORE_PATH}\\Z")]
# The window a closure's zstd frames may ask of a decompressor (the publisher writes 4 MiB ones):
# an object is decompressed before its hash can be checked, so what it may ask is bounded.
NAR_WINDOW: Final = 1 << 23
NAR_WINDOW_LOG: Final = 22  # what the publisher writes

Substituter = Annotated[str, msgspec.Meta(pattern=r"^(https?|file|s3)://[^\s]{1,2000}\Z")]
MAX_CLOSURE: Final = 100_000  # store paths in one system's closure (a NixOS desktop has ~3,000)


class StorePath(msgspec.Struct, frozen=True, array_like=True):
    """One path of a system's closure: [path, nar_sha256, nar_size, references, object, size].

    `nar_sha256` and `nar_size` are the path's NAR (its serialisation, as `nix-store --dump`
    writes it and Nix hashes it); `object` and `size` the zstd-compressed NAR the chroot holds as
    objects/<object> (empty with a substituter, which serves the path itself)."""

    path: StorePathName
    nar_sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}\Z")]
    nar_size: Annotated[int, msgspec.Meta(ge=0)]
    references: list[StorePathName]
    object: Annotated[str, msgspec.Meta(pattern=r"^([0-9a-f]{64})?\Z")] = ""
    size: Annotated[int, msgspec.Meta(ge=0)] = 0


class System(msgspec.Struct, frozen=True, kw_only=True):
    """A system the publisher built (`deliver = "closure"`): the agent makes `path` its system
    (`bin/switch-to-configuration`) after importing what its store lacks of `closure`, from the
    chroot's objects or, when `substituter` is set, from that binary cache. The signature covers
    every path and hash: a cache or a chroot only serves what the MANIFEST names."""

    path: StorePathName
    closure: Annotated[list[StorePath], msgspec.Meta(max_length=MAX_CLOSURE)]
    substituter: Substituter | None = None


class Content(msgspec.Struct, frozen=True, kw_only=True):
    """What a host gets; its hash is the release's version. `system` (format 3, a host with
    `deliver = "closure"`) is left out of the encoding when unset, so that every other release
    keeps the version it had."""

    operation: Operation
    flake: str | None = None
    files: list[FileEntry]
    system: System | msgspec.UnsetType = msgspec.UNSET

    def version(self) -> str:
        return hashlib.sha256(msgspec.json.encode(self)).hexdigest()


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    """A MANIFEST as this herald reads it (any format up to formats.RELEASE) and writes it."""

    format: Annotated[int, msgspec.Meta(ge=1)] = 1
    host: str
    generation: Annotated[int, msgspec.Meta(ge=1)]
    version: Version
    published_at: Timestamp
    source_rev: str | None = None
    content: Content


class _ManifestV1(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Format 1, as herald 0.1 declared it (and refuses anything else): what `[publish] format = 1`
    writes, field for field, so that 0.1 agents apply the release that upgrades them."""

    host: str
    generation: Annotated[int, msgspec.Meta(ge=1)]
    version: Version
    published_at: Timestamp
    source_rev: str | None = None
    content: Content


class _Signed(msgspec.Struct, frozen=True, kw_only=True):
    """A MANIFEST with its content kept as the bytes that were signed: the version is the hash
    of those, so fields a later compatible format adds to the content still count."""

    format: Annotated[int, msgspec.Meta(ge=1)] = 1
    host: str
    generation: Annotated[int, msgspec.Meta(ge=1)]
    version: Version
    published_at: Timestamp
    source_rev: str | None = None
    content: msgspec.Raw


class _Format(msgspec.Struct, frozen=True):
    """Only the format number: read first, since a newer format may change everything else."""

    format: int = 1


_FORMAT = msgspec.json.Decoder(_Format)
_SIGNED = msgspec.json.Decoder(_Signed)
_CONTENT = msgspec.json.Decoder(Content)


class Current(msgspec.Struct, frozen=True):
    """`current`: "<generation> <version>" (format 1), then `name=value` tokens from format 2:
    `format=2 keys=<n>`. Unknown tokens are ignored; known ones must be well formed."""

    generation: int
    version: str
    format: int = 1
    keys: int | None = None  # how many key statements the chroot holds (from format 2)

    def encode(self) -> bytes:
        if self.format < 2:
            return f"{self.generation} {self.version}\n".encode()
        return f"{self.generation} {self.version} format={self.format} keys={self.keys or 0}\n".encode()

    @classmethod
    def decode(cls, data: bytes) -> "Current":
        try:
            generation, version, *tokens = data.decode("ascii").split()
            fields = dict(token.partition("=")[::2] for token in tokens)
            current = cls(
                int(generation),
                version,
                int(fields.get("format", "1")),
                int(fields["keys"]) if "keys" in fields else None,
            )
        except ValueError as exc:
            raise ReleaseError(f"malformed `current` file: {data[:80]!r}") from exc
        if current.generation < 1 or len(version) != 64 or version.strip("0123456789abcdef"):
            raise ReleaseError(f"malformed `current` file: {data[:80]!r}")
        if current.format < 1 or (current.keys is not None and current.keys < 0):
            raise ReleaseError(f"malformed `current` file: {data[:80]!r}")
        return current


def release_path(generation: int) -> str:
    return f"{RELEASES}/{generation}"


def encode_release(manifest: bytes, signature: bytes) -> bytes:
    """A release file: the signature line, then the MANIFEST it signs."""
    return signature.strip() + b"\n" + manifest


def split_release(data: bytes) -> tuple[bytes, bytes]:
    """(MANIFEST, signature) of a release file; nothing is trusted until the signature verifies."""
    signature, newline, manifest = data.partition(b"\n")
    if not newline or len(signature) > MAX_SIGNATURE:
        raise ReleaseError("malformed release: no signature line before the MANIFEST")
    return manifest, signature


_UNSAFE_PARTS: Final = frozenset(("", ".", ".."))


def check_path(path: str) -> None:
    """Refuse any release path that is not a plain relative path below the release root:
    no leading '/', no empty, '.' or '..' component, no backslash or NUL."""
    if not _safe(path):
        raise ReleaseError(f"unsafe path in MANIFEST: {path!r}")


@functools.lru_cache(maxsize=4096)  # a publish checks the same shared paths for every host
def _safe(path: str) -> bool:
    return "\\" not in path and "\0" not in path and _UNSAFE_PARTS.isdisjoint(path.split("/"))


def check_content(content: Content) -> None:
    """Paths safe, sorted, unique, and no file standing where another needs a directory."""
    directories: set[str] = set()
    previous = ""
    for entry in content.files:
        path = entry.path
        check_path(path)
        if path <= previous:
            what = "duplicate path" if path == previous else "files not sorted by path"
            raise ReleaseError(f"{what} in MANIFEST: {path!r}")
        previous = path
        cut = path.rfind("/")
        while cut > 0 and path[:cut] not in directories:
            directories.add(path[:cut])
            cut = path.rfind("/", 0, cut)
    for entry in content.files:
        if entry.path in directories:
            raise ReleaseError(f"MANIFEST names {entry.path!r} both as a file and as a directory")
    if content.system is not msgspec.UNSET:
        check_system(content.system)


def check_system(system: System) -> None:
    """A closure is closed, sorted and unique, holds the system, and names an object for every
    path unless a substituter serves them."""
    paths: set[str] = set()
    previous = ""
    for entry in system.closure:
        if entry.path <= previous:
            what = "duplicate store path" if entry.path == previous else "closure not sorted by path"
            raise ReleaseError(f"{what} in MANIFEST: {entry.path!r}")
        previous = entry.path
        paths.add(entry.path)
        if system.substituter is None and not entry.object:
            raise ReleaseError(f"MANIFEST names no object for {entry.path}")
    if system.path not in paths:
        raise ReleaseError(f"MANIFEST's closure does not hold its system {system.path}")
    for entry in system.closure:
        for reference in entry.references:
            if reference not in paths:
                raise ReleaseError(f"{entry.path} refers to {reference}, which the closure does not hold")


def import_order(closure: list[StorePath]) -> list[StorePath]:
    """`closure` (a whole closure, or the part a store lacks) with every path after the paths
    of it that it refers to: Nix registers a path only once its references are valid. A closure
    is acyclic but for a path's references to itself."""
    by_path = {entry.path: entry for entry in closure}
    order: list[StorePath] = []
    placed: set[str] = set()
    for root in closure:
        stack = [(root, iter(root.references))]
        if root.path in placed:
            continue
        placed.add(root.path)
        while stack:
            entry, references = stack[-1]
            for reference in references:
                if reference not in placed and reference in by_path:
                    placed.add(reference)
                    child = by_path[reference]
                    stack.append((child, iter(child.references)))
                    break
            else:
                stack.pop()
                order.append(entry)
    return order


def encode_manifest(manifest: Manifest) -> bytes:
    """The MANIFEST in its own format: format 1 exactly as herald 0.1 wrote it."""
    if manifest.format == 1:
        fields = msgspec.structs.asdict(manifest)
        del fields["format"]
        return msgspec.json.encode(_ManifestV1(**fields))
    return msgspec.json.encode(manifest)


def release_format(data: bytes) -> int:
    """The format a MANIFEST says it is in (1 when it says nothing, as herald 0.1's)."""
    try:
        return _FORMAT.decode(data).format
    except (msgspec.DecodeError, UnicodeDecodeError, ValueError) as exc:
        raise ReleaseError(f"malformed MANIFEST: {exc}") from exc


def decode_manifest(data: bytes, *, host: str, current: Current) -> Manifest:
    """Decode and check a MANIFEST against the host and the `current` that named it.

    A format newer than this herald reads is NotYetError (the agent says to upgrade it); fields
    a compatible later format added are ignored, the others checked as strictly as ever."""
    if len(data) > MAX_MANIFEST:
        raise ReleaseError(f"MANIFEST too large ({len(data)} bytes)")
    found = release_format(data)
    if found > formats.RELEASE:
        raise NotYetError(formats.newer_release(found))
    try:
        signed = _SIGNED.decode(data)
        content = _CONTENT.decode(signed.content)
    except (msgspec.DecodeError, UnicodeDecodeError, ValueError) as exc:
        raise ReleaseError(f"malformed MANIFEST: {exc}") from exc
    if signed.host != host:
        raise ReleaseError(f"MANIFEST is for host {signed.host!r}, not {host!r}")
    if (signed.generation, signed.version) != (current.generation, current.version):
        raise ReleaseError(
            f"MANIFEST is generation {signed.generation}, `current` names {current.generation}"
        )
    if hashlib.sha256(signed.content).hexdigest() != signed.version:
        raise ReleaseError("MANIFEST version does not match its content")
    check_content(content)
    if content.system is not msgspec.UNSET and signed.format < formats.CLOSURE:
        raise ReleaseError(
            f"MANIFEST of format {signed.format} names a system (format {formats.CLOSURE} does)"
        )
    return Manifest(
        format=signed.format,
        host=signed.host,
        generation=signed.generation,
        version=signed.version,
        published_at=signed.published_at,
        source_rev=signed.source_rev,
        content=content,
    )


# ---------------------------------------------------------------- signatures


def encode_public_key(key: Ed25519PublicKey) -> str:
    """'ed25519:<base64>' — the one-line form kept in agent.toml and credentials/."""
    return _KEY_PREFIX + base64.b64encode(key.public_bytes_raw()).decode()


def decode_public_key(text: str) -> Ed25519PublicKey:
    body = text.strip()
    if not body.startswith(_KEY_PREFIX):
        raise ReleaseError("publisher key must look like 'ed25519:<base64>'")
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(body[len(_KEY_PREFIX) :], validate=True))
    except ValueError as exc:
        raise ReleaseError(f"invalid publisher key: {exc}") from exc


def signature_bytes(signature: bytes) -> bytes:
    """The 64 bytes of a signature line; ReleaseError when it cannot be one."""
    try:
        raw = base64.b64decode(signature.strip(), validate=True)
    except ValueError as exc:
        raise ReleaseError("malformed MANIFEST signature: not base64") from exc
    if len(raw) != 64:
        raise ReleaseError("malformed MANIFEST signature: not an ed25519 signature")
    return raw


def signed_by(data: bytes, raw_signature: bytes, keys: list[str]) -> str | None:
    """The key of `keys` ('ed25519:...') whose signature `raw_signature` of `data` is, or None."""
    for text in keys:
        try:
            decode_public_key(text).verify(raw_signature, data)
        except (InvalidSignature, ReleaseError):
            continue
        return text
    return None


def verify_signature(manifest: bytes, signature: bytes, key: Ed25519PublicKey) -> None:
    try:
        key.verify(base64.b64decode(signature.strip(), validate=True), manifest)
    except (InvalidSignature, ValueError) as exc:
        raise ReleaseError("MANIFEST signature does not verify against the publisher key") from exc
