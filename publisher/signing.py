"""The publisher's ed25519 key: created on first run, kept 0600 in STATE/publisher/private/.

Only `herald publish` (and `serve` unless `publish = false`) and `herald key` read it: the
process that runs the broker and the SFTP server need not (README, "Least privilege").
"""

import base64
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.errors import ConfigError
from protocol.files import fsync_dir
from protocol.layout import StateDir
from protocol.release import encode_public_key


def settle_key(state: StateDir) -> None:
    """Move a key kept where herald 0.1 kept it, STATE/publisher/signing.key (and a rotation's
    pending signing.key.new beside it), into STATE/publisher/private/ (0700). A link moves as a
    link (a key kept in a secrets manager). Where both places hold one: the same key, and the old
    copy goes; two keys, and nothing is done but say so."""
    for name, path in (("signing.key", state.signing_key), ("signing.key.new", state.pending_key)):
        legacy = state.publisher / name
        if not os.path.lexists(legacy):
            continue
        if os.path.lexists(path):
            if _same_key(legacy, path):
                legacy.unlink()
                continue
            raise ConfigError(
                f"{legacy} and {path} are two different keys: keep the one agents trust (herald key "
                f"show), move the other away"
            )
        path.parent.mkdir(mode=0o700, exist_ok=True)
        legacy.rename(path)
        fsync_dir(path.parent)
        fsync_dir(state.publisher)


def _same_key(one: Path, other: Path) -> bool:
    try:
        return one.read_bytes() == other.read_bytes()
    except OSError:
        return False


class Signer:
    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public = encode_public_key(key.public_key())

    def sign(self, data: bytes) -> bytes:
        return base64.b64encode(self._key.sign(data)) + b"\n"

    @classmethod
    def load(cls, path: Path) -> "Signer":
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot load the publisher signing key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path}: the publisher signing key must be ed25519")
        return cls(key)

    @classmethod
    def create(cls, path: Path) -> "Signer":
        """A new key in `path` (0600, on disk before this returns)."""
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as stream:
            stream.write(pem)
            stream.flush()
            os.fsync(stream.fileno())
        tmp.replace(path)
        fsync_dir(path.parent)
        return cls(key)

    @classmethod
    def load_or_create(cls, path: Path) -> "Signer":
        return cls.load(path) if path.exists() else cls.create(path)
