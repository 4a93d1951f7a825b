"""Paths below the agent's root, reached without following a link or trusting a directory that
someone else can change.

Every directory is opened from the root down, one component at a time, with O_NOFOLLOW and
O_DIRECTORY, and every create, rename, chmod, chown and unlink is made relative to the
descriptor of its directory (`dir_fd`): a link anywhere in a path is refused, never followed.
A directory that anyone but the agent's user may write (another owner, a group or world write
bit, a POSIX ACL entry) is refused too, and everything below it: its owner could swap an entry
between herald's look and its write (a user's home: `~/.ssh` replaced by a link to
`/root/.ssh`). Below a directory only the agent's user can change, nothing moves between a look
and a write, so a check once per directory holds for the whole install. Refusals are `Refused`,
per path: the caller reports them and goes on with the others.

herald's temporary file in a directory is `TEMPORARY` (`.herald\\new`): a name with a backslash,
which no MANIFEST path may hold (protocol.release.check_path), so no release can name it, and
which no other tool makes. One per directory: a write goes there, is fsynced, then renamed over
its target; a run killed in between leaves it, and the next run that touches the directory
removes it.
"""

import contextlib
import errno
import hashlib
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Self

from protocol.files import write_all

TEMPORARY: Final = ".herald\\new"
DIR_MODE: Final = 0o755
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_ACL: Final = "system.posix_acl_access"
_ACL_USER, _ACL_GROUP, _ACL_MASK = 0x02, 0x08, 0x10
_ACL_WRITE: Final = 0o2


class Refused(Exception):  # noqa: N818 - a verdict on a path, not a failure of herald's
    """A path herald will not write or remove through, and why."""


def parents(relative: str) -> list[str]:
    """The directories above `relative`, outermost first: 'a/b/c' -> ['a', 'a/b']."""
    parts = relative.split("/")[:-1]
    return ["/".join(parts[:depth]) for depth in range(1, len(parts) + 1)]


@dataclass(frozen=True, slots=True)
class Present:
    """What is at a path: a regular file, a link, or something else (a directory, a device)."""

    kind: str  # "file", "link" or "other"
    mode: int
    uid: int
    gid: int
    sha256: str = ""  # of the content (file) or of the link's target (link)
    data: bytes | None = None  # the content or the link's target, when asked for

    @property
    def fingerprint(self) -> tuple[int, str] | None:
        """(mode, sha256) for a regular file: what an install record says herald left there."""
        return (self.mode, self.sha256) if self.kind == "file" else None


class Dirs:
    """Descriptors of the directories below `root` that one run uses, each opened once and
    checked once. Use as a context manager; `touched` are fsynced and all closed at its end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.created: set[str] = set()  # directories made by this run
        self._fds: dict[str, int] = {}
        self._touched: set[str] = set()
        self._uid, self._gid = os.geteuid(), os.getegid()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        try:
            for relative in sorted(self._touched):
                fd = self._fds.get(relative)
                if fd is not None:
                    os.fsync(fd)
        finally:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def touched(self, directory: str) -> None:
        """An entry of `directory` was created, replaced or removed: fsynced at the end."""
        self._touched.add(directory)

    def get(self, relative: str, *, create: bool = False) -> int:
        """The descriptor of directory `relative` ('' for the root), walked from the root;
        with `create`, missing directories are made (DIR_MODE). FileNotFoundError when one is
        missing and not to be made; Refused for a link, a non-directory or an unsafe owner."""
        fd = self._fds.get(relative)
        if fd is not None:
            return fd
        if not relative:
            return self._open_root(create=create)
        parent, _, name = relative.rpartition("/")
        parent_fd = self.get(parent, create=create)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except FileNotFoundError:
            if not create:
                raise
            os.mkdir(name, DIR_MODE, dir_fd=parent_fd)
            self.created.add(relative)
            self.touched(parent)
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                what = "a link" if _is_link(parent_fd, name) else "not a directory"
                raise Refused(f"/{relative} is {what}") from None
            raise
        self._keep(relative, fd)
        return fd

    def _open_root(self, *, create: bool) -> int:
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the admin's choice
        except FileNotFoundError:
            if not create:
                raise
            self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._keep("", fd)
        return fd

    def _keep(self, relative: str, fd: int) -> None:
        problem = self._unsafe(fd)
        if problem is not None:
            os.close(fd)
            where = f"/{relative}" if relative else f"the root {self.root}"
            raise Refused(f"{where} is {problem}: herald writes nothing below it")
        self._fds[relative] = fd

    def _unsafe(self, fd: int) -> str | None:
        """Why someone other than the agent's user could change entries of this directory."""
        info = os.fstat(fd)
        if info.st_uid != self._uid:
            return f"owned by uid {info.st_uid}"
        if info.st_mode & stat.S_IWOTH:
            return "writable by everyone"
        if info.st_mode & stat.S_IWGRP and info.st_gid != self._gid:
            return f"writable by group {info.st_gid}"
        if _acl_lets_others_write(fd, self._uid, self._gid):
            return "writable by others through its ACL"
        return None


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _acl_lets_others_write(fd: int, uid: int, gid: int) -> bool:
    """A POSIX access ACL naming a user or group (other than the agent's) with write, within
    its mask (the group bits of the mode, already checked)."""
    try:
        raw = os.getxattr(fd, _ACL)
    except OSError:
        return False  # none, or a filesystem without ACLs
    mask = _ACL_WRITE
    named = []
    for offset in range(4, len(raw) - 7, 8):
        tag, perm, who = struct.unpack_from("<HHI", raw, offset)
        if tag == _ACL_MASK:
            mask = perm
        elif (tag == _ACL_USER and who != uid) or (tag == _ACL_GROUP and who != gid):
            named.append(perm)
    return bool(mask & _ACL_WRITE) and any(perm & _ACL_WRITE for perm in named)


# ---------------------------------------------------------------- entries of one directory


def look(dir_fd: int, name: str, *, keep_data: bool = False) -> Present | None:
    """What is at `name`, never following a link; None when nothing is."""
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        target = os.fsencode(os.readlink(name, dir_fd=dir_fd))
        sha256 = hashlib.sha256(target).hexdigest()
        return Present("link", 0o777, info.st_uid, info.st_gid, sha256, target if keep_data else None)
    if not stat.S_ISREG(info.st_mode):
        return Present("other", stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid)
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as stream:
        info = os.fstat(stream.fileno())
        digest = hashlib.sha256()
        chunks = []
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
            if keep_data:
                chunks.append(chunk)
    data = b"".join(chunks) if keep_data else None
    return Present("file", stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid, digest.hexdigest(), data)


def discard_temporary(dir_fd: int) -> None:
    """Remove the temporary file a killed run left in this directory (never a directory)."""
    try:
        info = os.stat(TEMPORARY, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode):
        os.unlink(TEMPORARY, dir_fd=dir_fd)


def write(dir_fd: int, name: str, data: bytes, mode: int, owner: tuple[int, int] | None = None) -> None:
    """Replace `name` with a regular file holding `data` (fsynced first), mode `mode`."""
    discard_temporary(dir_fd)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(TEMPORARY, flags, 0o600, dir_fd=dir_fd)
    try:
        try:
            write_all(fd, data)
            if owner is not None:
                os.fchown(fd, *owner)
            os.fchmod(fd, mode)  # after fchown, which clears setuid bits
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(TEMPORARY, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        _unlink_quietly(dir_fd, TEMPORARY)
        raise


def link(dir_fd: int, name: str, target: bytes, owner: tuple[int, int] | None = None) -> None:
    """Replace `name` with a symbolic link to `target` (putting back one herald displaced)."""
    discard_temporary(dir_fd)
    os.symlink(target, TEMPORARY, dir_fd=dir_fd)
    try:
        if owner is not None:
            os.chown(TEMPORARY, *owner, dir_fd=dir_fd, follow_symlinks=False)
        os.rename(TEMPORARY, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        _unlink_quietly(dir_fd, TEMPORARY)
        raise


def remove(dir_fd: int, name: str) -> None:
    os.unlink(name, dir_fd=dir_fd)


def _unlink_quietly(dir_fd: int, name: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=dir_fd)
