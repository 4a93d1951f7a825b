"""The agent's one SSH connection and SFTP session to its chroot, kept open and reused.

**The server's host key** must be one this agent trusts (client.hostkeys): agent.toml's
server.host_key, or a successor the server announced in its chroot's `server-keys` over a
session authenticated by a key already trusted. The statement is read on every new connection
and, on the kept-open one, again once per `poll`; when the keys trusted change, the agent says so
in its logs/ (protocol.hostkeys) for `herald server host-key status`.

**The host's own key**: with `<ssh_key>.next` present (`herald enrol --rotate` makes it), the
agent logs in with it first and falls back to `ssh_key` while the server still refuses it; once
the server takes it (fleet.toml names it and was published), it becomes `ssh_key` (the old key
is kept as `<ssh_key>.old`). So the host is never locked out, whichever side changes first.
"""

import asyncio
import math
import os
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import asyncssh
from loguru import logger

from client.fetch import read_small
from client.hostkeys import Trust
from protocol.errors import ConfigError, UnreachableError
from protocol.files import fsync_dir, write_atomic
from protocol.hostkeys import ANSWER, MAX_SIZE, STATEMENT, decode_statement
from protocol.release import LOGS
from protocol.settings import AgentConfig, check_ssh_public_key, seconds
from protocol.ssh import CIPHERS

_CONNECT_TIMEOUT = 15
NEXT_KEY = ".next"
OLD_KEY = ".old"


def _read_key(path: str) -> asyncssh.SSHKey:
    try:
        return asyncssh.read_private_key(path)
    except (OSError, asyncssh.KeyImportError, ValueError) as exc:
        raise ConfigError(f"agent.toml: ssh_key: cannot load {path}: {exc}") from exc


class ServerLink:
    def __init__(self, config: AgentConfig) -> None:
        self._config = config
        self._conn: asyncssh.SSHClientConnection | None = None
        self._sftp: asyncssh.SFTPClient | None = None
        self._lock = asyncio.Lock()
        self.log = logger.bind(host=config.host)
        try:
            self.trust = Trust.load(Path(config.state_dir), config.server.host_key)
        except ValueError as exc:
            raise ConfigError(f"agent.toml: server.host_key: {exc}") from exc
        self._client_key = _read_key(config.ssh_key)
        self._every = float(seconds(config.poll))  # how often the kept-open session reads the statement
        self._statement_read = -math.inf
        self._reconnect = False  # the statement retired the key this connection proved
        self._retired_over: str | None = None  # the last such key: reconnected for it once already

    async def sftp(self) -> asyncssh.SFTPClient:
        """The open SFTP session, connecting first if there is none."""
        async with self._lock:
            if self._sftp is not None and self._conn is not None and not self._conn.is_closed():
                if time.monotonic() - self._statement_read >= self._every:
                    await self._read_statement()
                if not self._reconnect:
                    return self._sftp
            await self._close()
            await self._connect()
            assert self._sftp is not None  # noqa: S101 - set by _connect
            await self._read_statement()
            return self._sftp

    async def _connect(self) -> None:
        """Log in with `<ssh_key>.next` if there is one and the server takes it, else `ssh_key`."""
        upcoming = f"{self._config.ssh_key}{NEXT_KEY}"
        if os.path.exists(upcoming):  # noqa: PTH110
            try:
                await self._connect_with(_read_key(upcoming), upcoming)
            except UnreachableError as exc:
                if not isinstance(exc.__cause__, asyncssh.PermissionDenied):
                    raise
                self.log.debug(
                    "the server does not take {} yet; logging in with {}", upcoming, self._config.ssh_key
                )
            else:
                self._promote(upcoming)
                return
        await self._connect_with(self._client_key, self._config.ssh_key)

    def _promote(self, upcoming: str) -> None:
        """The server takes the new key: it becomes ssh_key (the old one kept as .old)."""
        current = Path(self._config.ssh_key)
        try:
            write_atomic(f"{current}{OLD_KEY}", current.read_bytes(), mode=0o600)
            Path(upcoming).replace(current)
            fsync_dir(current.parent)
        except OSError as exc:
            self.log.warning(
                "the server takes {}, but it cannot become {} ({}); logging in with it first from now on",
                upcoming,
                current,
                exc.strerror,
            )
            return
        self._client_key = _read_key(str(current))
        public = self._client_key.export_public_key().decode().strip()
        self.log.info(
            "the server takes the new SSH key: it is {} now ({}); the old is {}{}",
            current,
            public,
            current,
            OLD_KEY,
        )

    async def _connect_with(self, client_key: asyncssh.SSHKey, key_path: str) -> None:
        server = self._config.server
        where = f"{server.address}:{server.port}"
        try:
            self._conn = await asyncssh.connect(
                server.address,
                server.port,
                username=self._config.host,
                client_keys=[client_key],
                known_hosts=(self.trust.ssh_keys(), [], []),
                config=None,
                agent_path=None,
                preferred_auth="publickey",
                encryption_algs=CIPHERS,
                connect_timeout=_CONNECT_TIMEOUT,
                keepalive_interval=30,
                keepalive_count_max=3,
            )
            # A server can accept the connection and never start the session (out of
            # descriptors, overloaded): that is unreachable too, not a wait forever.
            async with asyncio.timeout(_CONNECT_TIMEOUT):
                self._sftp = await self._conn.start_sftp_client()
        except asyncssh.HostKeyNotVerifiable as exc:
            await self._close()
            raise UnreachableError(
                f"SFTP server {where}: its host key is not the one pinned in agent.toml (server.host_key) "
                "nor a successor the server announced over a trusted connection; if the server's key "
                "changed on purpose without `herald server host-key rotate`, update agent.toml"
            ) from exc
        except asyncssh.PermissionDenied as exc:
            await self._close()
            refused = f"our key {key_path} was refused for user {self._config.host}"
            raise UnreachableError(f"SFTP server {where}: {refused}") from exc
        except TimeoutError as exc:
            await self._close()
            raise UnreachableError(
                f"SFTP server {where}: no answer within {_CONNECT_TIMEOUT}s (is server.port its SSH port?)"
            ) from exc
        except (asyncssh.ConnectionLost, asyncssh.ProtocolError) as exc:
            await self._close()  # something else listens there, or the server dropped us (MaxStartups)
            raise UnreachableError(
                f"SFTP server {where}: {exc.reason or exc.__class__.__name__} before the SSH login "
                "(is server.port its SSH port?)"
            ) from exc
        except (OSError, asyncssh.Error) as exc:
            await self._close()
            raise UnreachableError(f"SFTP server {where}: {exc or exc.__class__.__name__}") from exc
        self.log.debug("connected to SFTP server {}", where)

    async def _read_statement(self) -> None:
        """Learn from the chroot's `server-keys`, over this session, whose server proved a trusted
        key; answer in logs/ when the keys trusted change. Never fails the connection."""
        assert self._conn is not None  # noqa: S101 - connected
        assert self._sftp is not None  # noqa: S101
        self._statement_read = time.monotonic()
        proven = self._conn.get_server_host_key()
        if proven is None:
            return
        over = check_ssh_public_key(proven.export_public_key("openssh").decode())
        try:
            data = await read_small(self._sftp, STATEMENT, MAX_SIZE)
        except UnreachableError as exc:
            if not isinstance(exc.__cause__, asyncssh.SFTPNoSuchFile):
                self.log.debug("{} not read: {}", STATEMENT, exc)
            return
        except Exception as exc:  # noqa: BLE001 - too large, refused: the statement is optional
            self.log.warning("{} not read: {}", STATEMENT, exc)
            return
        try:
            statement = decode_statement(data)
        except ValueError as exc:
            self.log.warning("{} ignored: {}", STATEMENT, exc)
            return
        for line in self.trust.learn(statement, over=over):
            self.log.info("server host keys: {}", line)
        self._reconnect = over in statement.retired and over != self._retired_over
        if over in statement.retired and self._reconnect:
            # A new connection proves another trusted key, and the retirement is taken over it;
            # should the server still prove this one, it is kept (never a lockout).
            self._retired_over = over
            self.log.info("server host keys: the server retired the key of this connection: reconnecting")
        answer = self.trust.answer()
        if answer is None:
            return
        try:
            async with self._sftp.open(f"{LOGS}/{ANSWER}", "wb") as remote:
                await remote.write(answer)
        except (OSError, asyncssh.Error) as exc:
            self.log.warning("could not tell the server which host keys this agent trusts: {}", exc)
            return
        self.trust.answered()

    async def drop(self) -> None:
        """Forget the connection after an error, so the next call reconnects."""
        async with self._lock:
            await self._close()

    async def _close(self) -> None:
        self._reconnect = False
        if self._sftp is not None:
            self._sftp.exit()
            self._sftp = None
        if self._conn is not None:
            self._conn.close()
            await self._conn.wait_closed()
            self._conn = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.drop()
