"""The release format: what the publisher writes into a chroot and what an agent verifies.

    current                 "<generation> <version>\\n", replaced atomically, written last
    objects/<sha256>        file contents, named by their hash
    releases/<generation>   the release: one line with the ed25519 signature of the MANIFEST
                            (base64), then the MANIFEST: this module's `Manifest`, JSON

`version` is the hash of what the host gets (files, modes, operation, flake); `generation` grows
by one whenever the version changes. Releases are named by generation, not version, so that a
host returning to an earlier content gets a new release instead of a rewritten old one.

A release is one file, the signature beside the MANIFEST it signs: publishing a change that every
host receives writes, and later prunes, one file per host instead of a directory and two files,
and an agent fetches it with one request.
"""

import base64
import functools
import hashlib
import re
from typing import Annotated, Final

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol.errors import ReleaseError
from protocol.messages import Timestamp, Version
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
PUBLISHER_KEY: Final = "publisher.pub"

MAX_MANIFEST: Final = 32 * 1024 * 1024
MAX_SIGNATURE: Final = 256  # the base64 line of an ed25519 signature is 88 bytes
MAX_RELEASE: Final = MAX_SIGNATURE + MAX_MANIFEST
MAX_CURRENT: Final = 256
_KEY_PREFIX: Final = "ed25519:"

Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]


class FileEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    """One regular file of a release: [path, mode, size, sha256]."""

    path: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    mode: Annotated[int, msgspec.Meta(ge=0, le=0o777)]
    size: Annotated[int, msgspec.Meta(ge=0)]
    sha256: Sha256


class Content(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What a host gets; its hash is the release's version."""

    operation: Operation
    flake: str | None = None
    files: list[FileEntry]

    def version(self) -> str:
        return hashlib.sha256(msgspec.json.encode(self)).hexdigest()


class Manifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    host: str
    generation: Annotated[int, msgspec.Meta(ge=1)]
    version: Version
    published_at: Timestamp
    source_rev: str | None = None
    content: Content


class Current(msgspec.Struct, frozen=True):
    generation: int
    version: str

    def encode(self) -> bytes:
        return f"{self.generation} {self.version}\n".encode()

    @classmethod
    def decode(cls, data: bytes) -> "Current":
        try:
            generation, version = data.decode("ascii").split()
            current = cls(int(generation), version)
        except ValueError as exc:
            raise ReleaseError(f"malformed `current` file: {data[:80]!r}") from exc
        if current.generation < 1 or len(version) != 64 or version.strip("0123456789abcdef"):
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


def encode_manifest(manifest: Manifest) -> bytes:
    return msgspec.json.encode(manifest)


def decode_manifest(data: bytes, *, host: str, current: Current) -> Manifest:
    """Decode and check a MANIFEST against the host and the `current` that named it."""
    if len(data) > MAX_MANIFEST:
        raise ReleaseError(f"MANIFEST too large ({len(data)} bytes)")
    try:
        manifest = msgspec.json.decode(data, type=Manifest)
    except (msgspec.DecodeError, UnicodeDecodeError, ValueError) as exc:
        raise ReleaseError(f"malformed MANIFEST: {exc}") from exc
    if manifest.host != host:
        raise ReleaseError(f"MANIFEST is for host {manifest.host!r}, not {host!r}")
    if (manifest.generation, manifest.version) != (current.generation, current.version):
        raise ReleaseError(
            f"MANIFEST is generation {manifest.generation}, `current` names {current.generation}"
        )
    if manifest.content.version() != manifest.version:
        raise ReleaseError("MANIFEST version does not match its content")
    check_content(manifest.content)
    return manifest


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


def verify_signature(manifest: bytes, signature: bytes, key: Ed25519PublicKey) -> None:
    try:
        key.verify(base64.b64decode(signature.strip(), validate=True), manifest)
    except (InvalidSignature, ValueError) as exc:
        raise ReleaseError("MANIFEST signature does not verify against the publisher key") from exc
