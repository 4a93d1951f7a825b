"""The agent's one SSH connection and SFTP session to its chroot, kept open and reused.

The server's host key is pinned from agent.toml: an unknown or changed key is refused.
"""

import asyncio
from types import TracebackType
from typing import Self

import asyncssh
from loguru import logger

from protocol.errors import ConfigError, UnreachableError
from protocol.settings import AgentConfig
from protocol.ssh import CIPHERS

_CONNECT_TIMEOUT = 15


class ServerLink:
    def __init__(self, config: AgentConfig) -> None:
        self._config = config
        self._conn: asyncssh.SSHClientConnection | None = None
        self._sftp: asyncssh.SFTPClient | None = None
        self._lock = asyncio.Lock()
        try:
            self._host_key = asyncssh.import_public_key(config.server.host_key)
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise ConfigError(f"agent.toml: server.host_key: {exc}") from exc
        try:
            self._client_key = asyncssh.read_private_key(config.ssh_key)
        except (OSError, asyncssh.KeyImportError, ValueError) as exc:
            raise ConfigError(f"agent.toml: ssh_key: cannot load {config.ssh_key}: {exc}") from exc

    async def sftp(self) -> asyncssh.SFTPClient:
        """The open SFTP session, connecting first if there is none."""
        async with self._lock:
            if self._sftp is not None and self._conn is not None and not self._conn.is_closed():
                return self._sftp
            await self._close()
            server = self._config.server
            where = f"{server.address}:{server.port}"
            try:
                self._conn = await asyncssh.connect(
                    server.address,
                    server.port,
                    username=self._config.host,
                    client_keys=[self._client_key],
                    known_hosts=([self._host_key], [], []),
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
                    f"SFTP server {where}: its host key is not the one pinned in agent.toml "
                    "(server.host_key); if the server's key changed on purpose, update agent.toml"
                ) from exc
            except asyncssh.PermissionDenied as exc:
                await self._close()
                refused = f"our key {self._config.ssh_key} was refused for user {self._config.host}"
                raise UnreachableError(f"SFTP server {where}: {refused}") from exc
            except TimeoutError as exc:
                await self._close()
                raise UnreachableError(
                    f"SFTP server {where}: no answer within {_CONNECT_TIMEOUT}s "
                    "(is server.port its SSH port?)"
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
            logger.debug("connected to SFTP server {}", where)
            return self._sftp

    async def drop(self) -> None:
        """Forget the connection after an error, so the next call reconnects."""
        async with self._lock:
            await self._close()

    async def _close(self) -> None:
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
