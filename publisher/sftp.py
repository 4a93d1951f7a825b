"""The embedded SFTP server: each host sees its own chroot, read-only but for logs/ (and backups/).

Stock `asyncssh.SFTPServer(chroot=...)` maps paths without containing them (FINDINGS.md): it
follows links out of the chroot and allows every write. This server

- maps every path lexically below the host's chroot and then requires `realpath` to be the same
  path: no symlink is ever followed, whoever made it;
- refuses `symlink`, `link` and `readlink`;
- allows writes, `setstat`, `remove`, `rename`, `mkdir` and `rmdir` only strictly below `logs/`
  (and `backups/` for hosts that have one), each within its size cap, and opens files with
  O_NOFOLLOW;
- authenticates a host by the key published for it (STATE/ssh/authorized_keys/<host>), so a
  publish that adds or changes a key takes effect without a restart;
- offers nothing but the sftp subsystem: no shell, exec, scp, forwarding or agent.
"""

import os
import posixpath
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import asyncssh
import msgspec
from asyncssh import SFTPAttrs, SFTPOpUnsupported, SFTPPermissionDenied
from loguru import logger

from protocol.layout import Access, StateDir
from protocol.settings import authorized_key, check_ssh_public_key
from protocol.ssh import CIPHERS
from protocol.topics import is_host_name

_DEFAULT_LOGS_CAP: Final = 64 << 20
_WRITE_FLAGS: Final = asyncssh.FXF_WRITE | asyncssh.FXF_CREAT | asyncssh.FXF_TRUNC | asyncssh.FXF_APPEND


def load_access(state: StateDir, host: str) -> Access | None:
    try:
        table = msgspec.json.decode(state.access.read_bytes(), type=dict[str, Access])
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None
    return table.get(host)


@dataclass
class _Area:
    """A writable directory of the chroot and its size cap; usage counted from disk once."""

    name: str
    prefix: bytes  # the directory's local path with a trailing '/'
    cap: int
    used: int | None = None

    def usage(self) -> int:
        if self.used is None:
            self.used = sum(
                os.lstat(os.path.join(top, name)).st_size  # noqa: PTH118
                for top, _, names in os.walk(self.prefix)
                for name in names
            )
        return self.used

    def grow(self, by: int) -> None:
        if by > 0 and self.usage() + by > self.cap:
            raise asyncssh.SFTPFailure(f"{self.name}/ is full (its cap is {self.cap >> 20} MiB)")
        self.used = self.usage() + by


class ChrootSFTPServer(asyncssh.SFTPServer):
    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], root: Path, access: Access) -> None:
        super().__init__(chan)
        self._root = os.fsencode(os.path.realpath(root))
        self._areas = [
            _Area(name, self._root + b"/" + name.encode() + b"/", cap) for name, cap in access.areas.items()
        ]
        self._writable_files: dict[int, _Area] = {}
        self._log = logger.bind(host=chan.get_extra_info("username"))

    # ---------------------------------------------------------------- paths

    def map_path(self, path: bytes) -> bytes:
        """The local path of `path`, lexically below the chroot; no part of it below the chroot
        may be a link (the chroot itself was resolved once). What `realpath(local) == local`
        says, with an lstat per part below the chroot instead of one per part from `/`."""
        normal = posixpath.normpath(posixpath.join(b"/", path))  # '..' cannot climb above '/'
        if normal == b"/":
            return self._root
        local = self._root + normal
        end = len(self._root)
        while end < len(local):
            end = local.find(b"/", end + 1)
            end = len(local) if end < 0 else end
            try:
                mode = os.lstat(local[:end]).st_mode
            except OSError:
                break  # missing (or not a directory): nothing below it exists to be a link
            if stat.S_ISLNK(mode):
                self._log.warning("refused {!r}: links are not followed", path)
                raise SFTPPermissionDenied("links are not followed")
        return local

    def reverse_map_path(self, path: bytes) -> bytes:
        if path == self._root:
            return b"/"
        if path.startswith(self._root + b"/"):
            return path[len(self._root) :]
        raise asyncssh.SFTPNoSuchFile("not found")

    def _writable(self, path: bytes) -> tuple[bytes, _Area]:
        local = self.map_path(path)
        for area in self._areas:
            if local.startswith(area.prefix):
                return local, area
        self._log.warning("refused a write to {!r}: only logs/ (and backups/) are writable", path)
        raise SFTPPermissionDenied("only logs/ (and backups/, where enabled) are writable")

    # ---------------------------------------------------------------- files

    def open(self, path: bytes, pflags: int, attrs: SFTPAttrs) -> object:
        if pflags & _WRITE_FLAGS:
            local, area = self._writable(path)
            flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
            flags |= os.O_RDWR if pflags & asyncssh.FXF_READ else 0
            flags |= os.O_CREAT if pflags & asyncssh.FXF_CREAT else 0
            flags |= os.O_APPEND if pflags & asyncssh.FXF_APPEND else 0
            flags |= os.O_EXCL if pflags & asyncssh.FXF_EXCL else 0
            if flags & os.O_RDWR:
                flags &= ~os.O_WRONLY
            before = _size(local)
            fd = os.open(local, flags, 0o640)
            if pflags & asyncssh.FXF_TRUNC:
                os.ftruncate(fd, 0)
                area.grow(-before)
            self._writable_files[fd] = area
            return fd
        return os.open(self.map_path(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def open56(self, path: bytes, desired_access: int, flags: int, attrs: SFTPAttrs) -> object:
        raise SFTPOpUnsupported("SFTP v5+ open is not supported")

    def close(self, file_obj: object) -> None:
        fd = _fd(file_obj)
        self._writable_files.pop(fd, None)
        os.close(fd)

    def read(self, file_obj: object, offset: int, size: int) -> bytes:
        return os.pread(_fd(file_obj), size, offset)

    def write(self, file_obj: object, offset: int, data: bytes) -> int:
        fd = _fd(file_obj)
        area = self._writable_files.get(fd)
        if area is None:
            raise SFTPPermissionDenied("file not open for writing")
        area.grow(offset + len(data) - os.fstat(fd).st_size)
        return os.pwrite(fd, data, offset)

    def fstat(self, file_obj: object) -> os.stat_result:
        return os.fstat(_fd(file_obj))

    def fsetstat(self, file_obj: object, attrs: SFTPAttrs) -> None:
        fd = _fd(file_obj)
        area = self._writable_files.get(fd)
        if area is None:
            raise SFTPPermissionDenied("only files opened for writing in logs/ or backups/ can change")
        if attrs.size is not None:
            area.grow(attrs.size - os.fstat(fd).st_size)
        _apply(fd, attrs)

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
        local, area = self._writable(path)
        if attrs.size is not None:
            area.grow(attrs.size - _size(local))
        _apply(local, attrs)

    def remove(self, path: bytes) -> None:
        local, area = self._writable(path)
        size = _size(local)
        os.remove(local)  # noqa: PTH107
        area.grow(-size)

    def mkdir(self, path: bytes, attrs: SFTPAttrs) -> None:
        os.mkdir(self._writable(path)[0], 0o750)  # noqa: PTH102

    def rmdir(self, path: bytes) -> None:
        os.rmdir(self._writable(path)[0])  # noqa: PTH106

    def rename(self, oldpath: bytes, newpath: bytes) -> None:
        old, new = self._same_area(oldpath, newpath)
        if os.path.lexists(new):
            raise asyncssh.SFTPFileAlreadyExists("target exists")
        os.rename(old, new)  # noqa: PTH104

    def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        old, new = self._same_area(oldpath, newpath)
        _, area = self._writable(newpath)
        replaced = _size(new)
        os.replace(old, new)  # noqa: PTH105
        area.grow(-replaced)

    def _same_area(self, oldpath: bytes, newpath: bytes) -> tuple[bytes, bytes]:
        (old, area), (new, target) = self._writable(oldpath), self._writable(newpath)
        if area is not target:
            raise SFTPPermissionDenied("files cannot move between logs/ and backups/")
        return old, new

    def readlink(self, path: bytes) -> bytes:
        raise SFTPPermissionDenied("links are not served")

    def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        raise SFTPPermissionDenied("links cannot be created")

    def link(self, oldpath: bytes, newpath: bytes) -> None:
        raise SFTPPermissionDenied("links cannot be created")


def _size(local: bytes) -> int:
    try:
        info = os.lstat(local)
    except FileNotFoundError:
        return 0
    return 0 if stat.S_ISDIR(info.st_mode) else info.st_size


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
        if any(authorized_key(line) == offered for line in lines):
            return True
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
        host = chan.get_extra_info("username")
        access = load_access(self._state, host) or Access(areas={"logs": _DEFAULT_LOGS_CAP})
        return ChrootSFTPServer(chan, self._state.chroot(host), access)

    async def start(self) -> None:
        self._server = await asyncssh.create_server(
            lambda: _Gate(self._state),
            self.host,
            self.port,
            server_host_keys=[self.host_key],
            encryption_algs=CIPHERS,
            sftp_factory=self._session,
            allow_scp=False,
            allow_pty=False,
            line_editor=False,  # on by default; SFTP has no lines to edit, only a layer per packet
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
