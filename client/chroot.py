"""The agent's own files in its chroot: the credentials it reads, the run logs it uploads.

The publisher keys it trusts (protocol.keychain) start from agent.toml's `publisher_key` or, without
one, the key in credentials/publisher.pub on first contact; credentials/publisher.keys, the key
statements, is read only when the trust may be behind: a release no trusted key signed, a
`current` that counts more statements than were followed, and (format-1 releases, whose
`current` counts none) before each new release.
"""

import contextlib
from pathlib import Path
from typing import Final

import asyncssh
from loguru import logger

from client.fetch import read_optional, read_small
from client.link import ServerLink
from client.report import Reporter
from client.store import Store
from protocol import formats, keychain
from protocol.credentials import Secret
from protocol.errors import NotYetError, ReleaseError
from protocol.files import write_atomic
from protocol.keychain import FROM_AGENT_TOML, FROM_FIRST_USE, Trust
from protocol.release import (
    BROKER_SECRET,
    CREDENTIALS,
    LOGS,
    PUBLISHER_KEY,
    PUBLISHER_KEYS,
    Current,
    decode_public_key,
    encode_public_key,
    release_format,
    signature_bytes,
    signed_by,
)
from protocol.settings import AgentConfig

KEEP_LOGS: Final = 20


class Chroot:
    def __init__(self, config: AgentConfig, store: Store, link: ServerLink, reporter: Reporter) -> None:
        self.config = config
        self.store = store
        self.link = link
        self.reporter = reporter
        self.log = logger.bind(host=config.host)
        self.secret_stale = True
        self.logs_listed = False  # the server's logs/ listed once since start

    async def credentials(self, sftp: asyncssh.SFTPClient) -> Trust:
        """The publisher keys trusted (pinned on first use if need be) and, when stale, the
        broker secret."""
        if self.secret_stale and self.reporter.url is not None:
            data = await read_small(sftp, f"{CREDENTIALS}/{BROKER_SECRET}", 1024)
            write_atomic(self.store.root / BROKER_SECRET, data, mode=0o600)
            self.reporter.set_secret(Secret(data.decode("utf-8", "replace").strip()))
            self.secret_stale = False
        trust = self.store.trust()
        if self.config.publisher_key is not None:
            root = encode_public_key(decode_public_key(self.config.publisher_key))
            if trust is None or trust.root != root or trust.origin != FROM_AGENT_TOML:
                # agent.toml's key is the root of trust: a changed pin starts the chain again from it
                trust = Trust.rooted(root, FROM_AGENT_TOML)
                self.store.set_trust(trust)
            return trust
        if trust is not None:
            return trust
        pinned = self.store.root / PUBLISHER_KEY  # herald 0.1 pinned here: that key stays the root
        if pinned.exists():
            text = pinned.read_bytes()
            key = encode_public_key(decode_public_key(text.decode("ascii", "replace")))
        else:
            text = await read_small(sftp, f"{CREDENTIALS}/{PUBLISHER_KEY}", 256)
            key = encode_public_key(decode_public_key(text.decode("ascii", "replace")))
            write_atomic(pinned, text, mode=0o600)
            self.log.info("pinned the publisher key on first use: {}", key)
        trust = Trust.rooted(key, FROM_FIRST_USE)
        self.store.set_trust(trust)
        return trust

    @staticmethod
    def behind(trust: Trust, current: Current) -> bool:
        """Whether `current` counts key statements this agent has not followed."""
        return current.keys is not None and current.keys > (trust.seq or 0)

    async def follow(self, sftp: asyncssh.SFTPClient, trust: Trust) -> Trust:
        """Read credentials/publisher.keys and follow it from `trust`; NotYetError (reported, the
        trust kept) for a statement refused."""
        data = await read_optional(sftp, f"{CREDENTIALS}/{PUBLISHER_KEYS}", keychain.MAX_KEYS)
        try:
            followed, changes = keychain.follow(trust, keychain.parse(data or b""))
        except NotYetError as exc:
            self.log.error("{}", exc)
            raise
        for change in changes:
            self.log.warning("{}", change)
        if followed != trust:
            self.store.set_trust(followed)
        return followed

    async def verify(
        self, sftp: asyncssh.SFTPClient, trust: Trust, data: bytes, signature: bytes, *, followed: bool
    ) -> Trust:
        """The trust under which `data` verifies, its statements followed if the signer is not
        trusted yet (unless `followed` already). ReleaseError for a malformed signature or one
        by a retired key (refused); NotYetError for a key nobody told this agent of (yet)."""
        raw = signature_bytes(signature)
        if signed_by(data, raw, trust.trusted) is not None:
            return trust
        if not followed:
            trust = await self.follow(sftp, trust)
            if signed_by(data, raw, trust.trusted) is not None:
                return trust
        retired = signed_by(data, raw, [entry.key for entry in trust.retired])
        if retired is not None:
            raise ReleaseError(
                f"MANIFEST is signed by publisher key {retired}, retired by {trust.retired_by(retired)}"
            )
        try:
            newer = release_format(data) > formats.RELEASE
        except ReleaseError:
            newer = False
        if newer:  # a later format may sign otherwise: say what the agent can act on
            raise NotYetError(formats.newer_release(release_format(data)))
        raise NotYetError(
            f"MANIFEST signature does not verify against any publisher key this agent trusts "
            f"({len(trust.keys)}, key statements followed to {trust.seq or 0}); not applied until one does"
        )

    async def upload_log(self, path: Path) -> None:
        """Upload a run's log; keep the newest KEEP_LOGS here and on the server.

        The agent is the only writer of its `logs/`, so one listing per run of the agent is
        enough: after it, the names to remove there are the names pruned here (a listing makes
        the server stat every entry, and it would be most of a no-change cycle's requests).
        """
        expired = [old.name for old in sorted(self.store.logs.glob("*.log"))[:-KEEP_LOGS]]
        try:
            sftp = await self.link.sftp()
            async with sftp.open(f"{LOGS}/{path.name}", "wb") as remote:
                await remote.write(path.read_bytes())
            remove = expired
            if not self.logs_listed:
                names = sorted(name for name in await sftp.listdir(LOGS) if name.endswith(".log"))
                remove = names[:-KEEP_LOGS]
            for name in remove:
                with contextlib.suppress(asyncssh.SFTPNoSuchFile):
                    await sftp.remove(f"{LOGS}/{name}")
            self.logs_listed = True
        except Exception as exc:  # noqa: BLE001 - asyncssh raises many kinds; a log upload never stops the agent
            self.logs_listed = False
            self.log.warning("log {} not uploaded: {}", path.name, exc)
        for name in expired:
            (self.store.logs / name).unlink(missing_ok=True)
