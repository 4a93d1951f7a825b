"""The agent's own files in its chroot: the credentials it reads, the run logs it uploads."""

import contextlib
from pathlib import Path
from typing import Final

import asyncssh
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from loguru import logger

from client.fetch import read_small
from client.link import ServerLink
from client.report import Reporter
from client.store import Store
from protocol.credentials import Secret
from protocol.files import write_atomic
from protocol.release import BROKER_SECRET, CREDENTIALS, LOGS, PUBLISHER_KEY, decode_public_key
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

    async def credentials(self, sftp: asyncssh.SFTPClient) -> Ed25519PublicKey:
        """The publisher key (agent.toml, else pinned on first use) and, when stale, the broker secret."""
        if self.secret_stale and self.reporter.url is not None:
            data = await read_small(sftp, f"{CREDENTIALS}/{BROKER_SECRET}", 1024)
            write_atomic(self.store.root / BROKER_SECRET, data, mode=0o600)
            self.reporter.set_secret(Secret(data.decode("utf-8", "replace").strip()))
            self.secret_stale = False
        if self.config.publisher_key is not None:
            return decode_public_key(self.config.publisher_key)
        pinned = self.store.root / PUBLISHER_KEY
        if pinned.exists():
            return decode_public_key(pinned.read_text(encoding="ascii"))
        text = await read_small(sftp, f"{CREDENTIALS}/{PUBLISHER_KEY}", 256)
        key = decode_public_key(text.decode("ascii", "replace"))
        write_atomic(pinned, text, mode=0o600)
        self.log.info("pinned the publisher key on first use: {}", text.decode("ascii", "replace").strip())
        return key

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
