"""The embedded SFTP server: each host sees its own chroot, read-only but for logs/ (and backups/).

Stock `asyncssh.SFTPServer(chroot=...)` maps paths without containing them (FINDINGS.md): it
follows links out of the chroot and allows every write. This server

- maps every path lexically below the host's chroot and then requires `realpath` to be the same
  path: no symlink is ever followed, whoever made it;
- refuses `symlink`, `link` and `readlink`;
- allows writes, `setstat`, `remove`, `rename`, `mkdir` and `rmdir` only strictly below `logs/`
  (and `backups/` for hosts that have one), and opens only regular files, with O_NOFOLLOW;
- keeps each host within its caps of bytes, entries and open files, counted per host across
  all its sessions from what is on disk (publisher/quota.py);
- authenticates a host by the key published for it (STATE/ssh/authorized_keys/<host>), so a
  publish that adds or changes a key takes effect without a restart, and caps connections, logged
  in or not (publisher/sshgate.py);
- offers nothing but the sftp subsystem: no shell, exec, scp, forwarding or agent; and of
  asyncssh's SFTP extensions none that does unbounded work in one request; answers at most
  READ_MAX bytes to a READ, and reads no request while a session's answers cannot leave
  (publisher/sftpfixes.py).
"""

import asyncio
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
from protocol.listen import cannot_listen
from protocol.ssh import CIPHERS
from publisher.quota import Account, Inode, Quota, inode
from publisher.sftpfixes import READ_MAX
from publisher.sshgate import LOGIN_TIMEOUT, Admission, Gate

_DEFAULT_LOGS_CAP: Final = 64 << 20
_WRITE_FLAGS: Final = asyncssh.FXF_WRITE | asyncssh.FXF_CREAT | asyncssh.FXF_TRUNC | asyncssh.FXF_APPEND


def load_access(state: StateDir, host: str) -> Access | None:
    try:
        table = msgspec.json.decode(state.access.read_bytes(), type=dict[str, Access])
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None
    return table.get(host)


@dataclass(frozen=True, slots=True)
class _Handle:
    """An open file of one session: its inode, and the account it counts in (files of logs/
    and backups/, read or written)."""

    key: Inode
    account: Account | None
    writable: bool
    append: bool


class ChrootSFTPServer(asyncssh.SFTPServer):
    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], root: Path, quota: Quota) -> None:
        super().__init__(chan)
        self._root = os.fsencode(os.path.realpath(root))
        self._quota = quota  # shared by every session of this host
        self._handles: dict[int, _Handle] = {}
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

    def _writable(self, path: bytes) -> tuple[bytes, Account]:
        local = self.map_path(path)
        account = self._quota.account_of(local)
        if account is None:
            self._log.warning("refused a write to {!r}: only logs/ (and backups/) are writable", path)
            raise SFTPPermissionDenied("only logs/ (and backups/, where enabled) are writable")
        return local, account

    # ---------------------------------------------------------------- files

    def open(self, path: bytes, pflags: int, attrs: SFTPAttrs) -> object:
        self._quota.may_open()
        if not pflags & _WRITE_FLAGS:
            local = self.map_path(path)
            return self._opened(os.open(local, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), local, pflags)
        local, account = self._writable(path)
        flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        flags |= os.O_RDWR if pflags & asyncssh.FXF_READ else 0
        flags |= os.O_CREAT if pflags & asyncssh.FXF_CREAT else 0
        flags |= os.O_APPEND if pflags & asyncssh.FXF_APPEND else 0
        flags |= os.O_EXCL if pflags & asyncssh.FXF_EXCL else 0
        if flags & os.O_RDWR:
            flags &= ~os.O_WRONLY
        new = not os.path.lexists(local)
        if new and flags & os.O_CREAT:
            account.new_entry()
        fd = self._opened(os.open(local, flags, 0o640), local, pflags)
        if new:
            account.added()
        if pflags & asyncssh.FXF_TRUNC:
            size = os.fstat(fd).st_size
            os.ftruncate(fd, 0)
            account.grew(-size)
        return fd

    def _opened(self, fd: int, local: bytes, pflags: int) -> int:
        """Record a new descriptor; refuse (and close) anything but a regular file."""
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise SFTPPermissionDenied("only regular files can be opened")
        account = self._quota.account_of(local)
        if account is not None:
            account.opened(inode(info))
        writable = bool(pflags & _WRITE_FLAGS)
        self._handles[fd] = _Handle(inode(info), account, writable, bool(pflags & asyncssh.FXF_APPEND))
        self._quota.handles += 1
        return fd

    def open56(self, path: bytes, desired_access: int, flags: int, attrs: SFTPAttrs) -> object:
        raise SFTPOpUnsupported("SFTP v5+ open is not supported")

    def close(self, file_obj: object) -> None:
        fd = _fd(file_obj)
        handle = self._handles.pop(fd, None)
        if handle is not None:
            self._quota.handles -= 1
            if handle.account is not None:
                handle.account.closing(handle.key, os.fstat(fd))
        os.close(fd)

    def read(self, file_obj: object, offset: int, size: int) -> bytes:
        return os.pread(_fd(file_obj), min(size, READ_MAX), offset)  # a short read asks again

    def _for_writing(self, fd: int) -> Account:
        handle = self._handles.get(fd)
        if handle is None or not handle.writable or handle.account is None:
            raise SFTPPermissionDenied("only files opened for writing in logs/ or backups/ can change")
        return handle.account

    def write(self, file_obj: object, offset: int, data: bytes) -> int:
        fd = _fd(file_obj)
        account = self._for_writing(fd)
        before = os.fstat(fd).st_size
        end = before + len(data) if self._handles[fd].append else offset + len(data)
        account.room(end - before)  # with O_APPEND the kernel appends, whatever the offset
        try:
            return os.pwrite(fd, data, offset)
        finally:
            account.grew(os.fstat(fd).st_size - before)

    def fstat(self, file_obj: object) -> os.stat_result:
        return os.fstat(_fd(file_obj))

    def fsetstat(self, file_obj: object, attrs: SFTPAttrs) -> None:
        fd = _fd(file_obj)
        account = self._for_writing(fd)
        before = os.fstat(fd).st_size
        if attrs.size is not None:
            account.room(attrs.size - before)
        try:
            _apply(fd, attrs)
        finally:
            account.grew(os.fstat(fd).st_size - before)

    async def fsync(self, file_obj: object) -> None:
        await asyncio.to_thread(os.fsync, _fd(file_obj))  # as long as the disk takes: not on the loop

    # ---------------------------------------------------------------- names

    def lstat(self, path: bytes) -> os.stat_result:
        return os.lstat(self.map_path(path))

    def stat(self, path: bytes) -> os.stat_result:
        return os.lstat(self.map_path(path))  # no link is ever followed

    def setstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        self.lsetstat(path, attrs)

    def lsetstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        local, account = self._writable(path)
        before = _size(local)
        if attrs.size is not None:
            account.room(attrs.size - before)
        try:
            _apply(local, attrs)
        finally:
            account.grew(_size(local) - before)

    def remove(self, path: bytes) -> None:
        local, account = self._writable(path)
        account.count()
        info = os.lstat(local)
        os.remove(local)  # noqa: PTH107
        account.gone(info)

    def mkdir(self, path: bytes, attrs: SFTPAttrs) -> None:
        local, account = self._writable(path)
        account.new_entry()
        os.mkdir(local, 0o750)  # noqa: PTH102
        account.added()

    def rmdir(self, path: bytes) -> None:
        local, account = self._writable(path)
        account.count()
        info = os.lstat(local)
        os.rmdir(local)  # noqa: PTH106
        account.gone(info)

    def rename(self, oldpath: bytes, newpath: bytes) -> None:
        old, new, _ = self._same_area(oldpath, newpath)
        if os.path.lexists(new):
            raise asyncssh.SFTPFileAlreadyExists("target exists")
        os.rename(old, new)  # noqa: PTH104

    def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        old, new, account = self._same_area(oldpath, newpath)
        account.count()
        try:
            replaced: os.stat_result | None = os.lstat(new)
        except FileNotFoundError:
            replaced = None
        if replaced is not None and inode(replaced) == inode(os.lstat(old)):
            return  # two names of one file: rename(2) does nothing
        os.replace(old, new)  # noqa: PTH105
        if replaced is not None:
            account.gone(replaced)

    def _same_area(self, oldpath: bytes, newpath: bytes) -> tuple[bytes, bytes, Account]:
        (old, area), (new, target) = self._writable(oldpath), self._writable(newpath)
        if area is not target:
            raise SFTPPermissionDenied("files cannot move between logs/ and backups/")
        return old, new, area

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
        # The owner's bits stay: a directory the server cannot list (or a file it cannot open)
        # would hide its bytes from the quota's count when the server runs unprivileged.
        directory = stat.S_ISDIR((os.fstat(target) if isinstance(target, int) else os.lstat(target)).st_mode)
        os.chmod(target, attrs.permissions & 0o770 | (0o700 if directory else 0o600))  # noqa: PTH101
    if attrs.atime is not None and attrs.mtime is not None:
        os.utime(target, (attrs.atime, attrs.mtime))


def _fd(file_obj: object) -> int:
    if not isinstance(file_obj, int):
        raise asyncssh.SFTPInvalidHandle("invalid handle")
    return file_obj


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
        self._quotas: dict[str, Quota] = {}  # per host, shared by all its sessions
        self._admission = Admission()

    @property
    def public_host_key(self) -> str:
        return self.host_key.export_public_key("openssh").decode().strip()

    def _session(self, chan: asyncssh.SSHServerChannel[bytes]) -> ChrootSFTPServer:
        host = chan.get_extra_info("username")
        access = load_access(self._state, host) or Access(areas={"logs": _DEFAULT_LOGS_CAP})
        root = self._state.chroot(host)
        quota = self._quotas.get(host)
        if quota is None:
            quota = self._quotas[host] = Quota(host, os.fsencode(os.path.realpath(root)))
        quota.configure(access.areas)  # caps change with fleet.toml: read at each session
        return ChrootSFTPServer(chan, root, quota)

    def drop(self, host: str) -> int:
        """Close every connection `host` holds (`herald host remove`); how many there were."""
        held = list(self._admission.hosts.get(host, ()))
        for conn in held:
            conn.disconnect(asyncssh.DISC_BY_APPLICATION, "this host was removed from the fleet")
        self._quotas.pop(host, None)
        return len(held)

    def reload_host_key(self) -> bool:
        """Present the host key now on disk to new connections (`herald server host-key switch`);
        whether it changed."""
        key = load_host_key(self._state.sftp_host_key)
        if key.export_public_key() == self.host_key.export_public_key():
            return False
        self.host_key = key
        if self._server is not None:
            self._server.update(server_host_keys=[key])
        return True

    async def start(self) -> None:
        try:
            self._server = await self._listen()
        except OSError as exc:
            raise cannot_listen(
                "the SFTP server", self.host, self.port, "--sftp, or sftp in server.toml", exc
            ) from exc
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("SFTP server listening on {}:{}", self.host, self.port)

    async def _listen(self) -> asyncssh.SSHAcceptor:
        return await asyncssh.create_server(
            lambda: Gate(self._state, self._admission),
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
            login_timeout=LOGIN_TIMEOUT,
            keepalive_interval=60,
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
