"""Where things live in the server's state directory (the `--state DIR` of publish and serve).

STATE/chroot/<host>/            served to <host> over SFTP (protocol.release describes it)
STATE/objects/<sha256>          contents anyone may read, hard-linked into the chroots
STATE/publisher/                hash cache, generations, lock, the statements agents follow
STATE/publisher/private/        the signing key alone (0700): a unit hides this from serve
STATE/broker/passwd             user:$7$hash lines, Mosquitto's format
STATE/broker/<user>.secret      secrets of the publisher and admin users (0600)
STATE/ssh/authorized_keys/<host> the key each host logs in with, from fleet.toml at publish
STATE/ssh/access.json           what each host may write (logs/, backups/) and how much
STATE/sftp/ssh_host_ed25519_key the embedded SFTP server's host key
"""

from dataclasses import dataclass
from pathlib import Path

import msgspec


class Access(msgspec.Struct, frozen=True):
    """STATE/ssh/access.json, per host, written by the publisher and read by the embedded SFTP
    server: the directories the host may write and each one's size cap in bytes."""

    areas: dict[str, int]


@dataclass(frozen=True, slots=True)
class StateDir:
    root: Path

    def chroot(self, host: str) -> Path:
        return self.root / "chroot" / host

    @property
    def chroots(self) -> Path:
        return self.root / "chroot"

    @property
    def objects(self) -> Path:
        return self.root / "objects"

    @property
    def publisher(self) -> Path:
        return self.root / "publisher"

    @property
    def private(self) -> Path:
        """The signing key's own directory: a unit can hide it from `herald serve` for good
        (InaccessiblePaths), as a rotation renames files inside it, never the directory."""
        return self.publisher / "private"

    @property
    def signing_key(self) -> Path:
        return self.private / "signing.key"

    @property
    def pending_key(self) -> Path:
        """A key being rotated in (publisher.keyring.rotate)."""
        return self.private / "signing.key.new"

    @property
    def broker(self) -> Path:
        return self.root / "broker"

    @property
    def passwd(self) -> Path:
        return self.broker / "passwd"

    def service_secret(self, user: str) -> Path:
        return self.broker / f"{user}.secret"

    @property
    def authorized_keys_dir(self) -> Path:
        return self.root / "ssh" / "authorized_keys"

    def authorized_keys(self, host: str) -> Path:
        return self.authorized_keys_dir / host

    @property
    def access(self) -> Path:
        return self.root / "ssh" / "access.json"

    @property
    def sftp_host_key(self) -> Path:
        return self.root / "sftp" / "ssh_host_ed25519_key"
