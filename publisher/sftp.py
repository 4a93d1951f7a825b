"""The embedded SFTP server: each host sees its own chroot, read-only but for logs/.

Stock `asyncssh.SFTPServer(chroot=...)` maps paths without containing them (FINDINGS.md): it
follows links out of the chroot and allows every write. This server

- maps every path lexically below the host's chroot and then requires `realpath` to be the same
  path: no symlink is ever followed, whoever made it;
- refuses `symlink`, `link` and `readlink`;
- allows writes, `setstat`, `remove`, `rename`, `mkdir` and `rmdir` only strictly below `logs/`,
  and opens files with O_NOFOLLOW;
- authenticates a host by the key published for it (STATE/ssh/authorized_keys/<host>), so a
  publish that adds or changes a key takes effect without a restart;
- offers nothing but the sftp subsystem: no shell, exec, scp, forwarding or agent.
"""

import os
import posixpath
from pathlib import Path
from typing import Final

import asyncssh
from asyncssh import SFTPAttrs, SFTPOpUnsupported, SFTPPermissionDenied
from loguru import logger

from protocol.layout import StateDir
from protocol.release import LOGS
from protocol.settings import check_ssh_public_key
from protocol.topics import is_host_name

_WRITE_FLAGS: Final = asyncssh.FXF_WRITE | asyncssh.FXF_CREAT | asyncssh.FXF_TRUNC | asyncssh.FXF_APPEND


class ChrootSFTPServer(asyncssh.SFTPServer):
    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], root: Path) -> None:
        super().__init__(chan)
        self._root = os.fsencode(os.path.realpath(root))
        self._logs = self._root + b"/" + LOGS.encode() + b"/"
        self._writable_files: set[int] = set()
        self._log = logger.bind(host=chan.get_extra_info("username"))

    # ---------------------------------------------------------------- paths

    def map_path(self, path: bytes) -> bytes:
        normal = posixpath.normpath(posixpath.join(b"/", path))  # '..' cannot climb above '/'
        local = self._root if normal == b"/" else self._root + normal
        if os.path.realpath(local) != local:
            self._log.warning("refused {!r}: links are not followed", path)
            raise SFTPPermissionDenied("links are not followed")
        return local

    def reverse_map_path(self, path: bytes) -> bytes:
        if path == self._root:
            return b"/"
        if path.startswith(self._root + b"/"):
            return path[len(self._root) :]
        raise asyncssh.SFTPNoSuchFile("not found")

    def _writable(self, path: bytes) -> bytes:
        local = self.map_path(path)
        if not local.startswith(self._logs):
            self._log.warning("refused a write to {!r}: only logs/ is writable", path)
            raise SFTPPermissionDenied("only logs/ is writable")
        return local

    # ---------------------------------------------------------------- files

    def open(self, path: bytes, pflags: int, attrs: SFTPAttrs) -> object:
        if pflags & _WRITE_FLAGS:
            local = self._writable(path)
            flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
            flags |= os.O_RDWR if pflags & asyncssh.FXF_READ else 0
            flags |= os.O_CREAT if pflags & asyncssh.FXF_CREAT else 0
            flags |= os.O_TRUNC if pflags & asyncssh.FXF_TRUNC else 0
            flags |= os.O_APPEND if pflags & asyncssh.FXF_APPEND else 0
            flags |= os.O_EXCL if pflags & asyncssh.FXF_EXCL else 0
            if flags & os.O_RDWR:
                flags &= ~os.O_WRONLY
            fd = os.open(local, flags, 0o640)
            self._writable_files.add(fd)
            return fd
        return os.open(self.map_path(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def open56(self, path: bytes, desired_access: int, flags: int, attrs: SFTPAttrs) -> object:
        raise SFTPOpUnsupported("SFTP v5+ open is not supported")

    def close(self, file_obj: object) -> None:
        fd = _fd(file_obj)
        self._writable_files.discard(fd)
        os.close(fd)

    def read(self, file_obj: object, offset: int, size: int) -> bytes:
        return os.pread(_fd(file_obj), size, offset)

    def write(self, file_obj: object, offset: int, data: bytes) -> int:
        fd = _fd(file_obj)
        if fd not in self._writable_files:
            raise SFTPPermissionDenied("file not open for writing")
        return os.pwrite(fd, data, offset)

    def fstat(self, file_obj: object) -> os.stat_result:
        return os.fstat(_fd(file_obj))

    def fsetstat(self, file_obj: object, attrs: SFTPAttrs) -> None:
        if _fd(file_obj) not in self._writable_files:
            raise SFTPPermissionDenied("only files in logs/ opened for writing can change")
        _apply(_fd(file_obj), attrs)

    def fsync(self, file_obj: object) -> None:
        os.fsync(_fd(file_obj))

    # ---------------------------------------------------------------- names

    def lstat(self, path: bytes) -> os.stat_result:
        return os.lstat(self.map_path(path))

    def stat(self, path: bytes) -> os.stat_result:
        return os.lstat(self.map_path(path))  # no link is ever followed

    def setstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        self.lsetstat(path, attrs)

    def lsetstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        _apply(self._writable(path), attrs)

    def remove(self, path: bytes) -> None:
        os.remove(self._writable(path))  # noqa: PTH107

    def mkdir(self, path: bytes, attrs: SFTPAttrs) -> None:
        os.mkdir(self._writable(path), 0o750)  # noqa: PTH102

    def rmdir(self, path: bytes) -> None:
        os.rmdir(self._writable(path))  # noqa: PTH106

    def rename(self, oldpath: bytes, newpath: bytes) -> None:
        old, new = self._writable(oldpath), self._writable(newpath)
        if os.path.lexists(new):
            raise asyncssh.SFTPFileAlreadyExists("target exists")
        os.rename(old, new)  # noqa: PTH104

    def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        os.replace(self._writable(oldpath), self._writable(newpath))  # noqa: PTH105

    def readlink(self, path: bytes) -> bytes:
        raise SFTPPermissionDenied("links are not served")

    def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        raise SFTPPermissionDenied("links cannot be created")

    def link(self, oldpath: bytes, newpath: bytes) -> None:
        raise SFTPPermissionDenied("links cannot be created")


def _apply(target: bytes | int, attrs: SFTPAttrs) -> None:
    """Apply a SETSTAT to a path already checked to hold no link, or to an open descriptor."""
    if attrs.uid is not None or attrs.gid is not None:
        raise SFTPPermissionDenied("ownership cannot change")
    if attrs.size is not None:
        os.truncate(target, attrs.size)
    if attrs.permissions is not None:
        os.chmod(target, attrs.permissions & 0o770)  # noqa: PTH101
    if attrs.atime is not None and attrs.mtime is not None:
        os.utime(target, (attrs.atime, attrs.mtime))


def _fd(file_obj: object) -> int:
    if not isinstance(file_obj, int):
        raise asyncssh.SFTPInvalidHandle("invalid handle")
    return file_obj


class _Gate(asyncssh.SSHServer):
    """Public-key authentication against the keys the publisher wrote for each host."""

    def __init__(self, state: StateDir) -> None:
        self._state = state

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        if not is_host_name(username) or not self._state.chroot(username).is_dir():
            return False
        try:
            lines = self._state.authorized_keys(username).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return False
        offered = check_ssh_public_key(key.export_public_key("openssh").decode())
        for line in lines:
            try:
                if check_ssh_public_key(line) == offered:
                    return True
            except ValueError:
                continue
        logger.bind(host=username).warning("SSH key refused: not the key published for this host")
        return False


def load_host_key(path: Path) -> asyncssh.SSHKey:
    """The server's host key, created on first start (with a .pub beside it for agents to pin)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = asyncssh.generate_private_key("ssh-ed25519")
        key.write_private_key(str(path))
        path.chmod(0o600)
        key.write_public_key(str(path) + ".pub")
        return key
    return asyncssh.read_private_key(str(path))


class SFTPService:
    """The embedded SFTP server over STATE/chroot/<host>/."""

    def __init__(self, state: Path, *, host: str, port: int) -> None:
        self._state = StateDir(state)
        self.host = host
        self.port = port
        self.host_key = load_host_key(self._state.sftp_host_key)
        self._server: asyncssh.SSHAcceptor | None = None

    @property
    def public_host_key(self) -> str:
        return self.host_key.export_public_key("openssh").decode().strip()

    def _session(self, chan: asyncssh.SSHServerChannel[bytes]) -> ChrootSFTPServer:
        return ChrootSFTPServer(chan, self._state.chroot(chan.get_extra_info("username")))

    async def start(self) -> None:
        self._server = await asyncssh.create_server(
            lambda: _Gate(self._state),
            self.host,
            self.port,
            server_host_keys=[self.host_key],
            sftp_factory=self._session,
            allow_scp=False,
            allow_pty=False,
            agent_forwarding=False,
            x11_forwarding=False,
            login_timeout=30,
            keepalive_interval=60,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("SFTP server listening on {}:{}", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
