"""Rotating the server's SSH host key without touching a host (`herald server host-key ...`).

1. **rotate**: a successor is made (the embedded server's: STATE/sftp/ssh_host_ed25519_key.next)
   or named (`--key`: the one an admin made for sshd), and the statement (protocol.hostkeys)
   listing it is written to STATE/sftp/server-keys and into every chroot. Agents read it over
   their verified session and trust the successor too; each answers in its logs/.
2. **status**: which hosts trust every key of the statement (their answer says so).
3. **switch**: once all do, the embedded server takes the successor (the files are renamed; a
   running `serve` picks it up on SIGHUP). With OpenSSH: point sshd's HostKey at the new key.
4. **retire**: the old key is listed as retired (agents stop trusting it) and, for the embedded
   server, its private half deleted.

A host added while a rotation is under way gets the statement with its chroot (distribute, after
every publish), and agents trust a listed key only once a trusted key has proven the server.
"""

import os
import stat
from pathlib import Path
from typing import Final

from protocol.errors import ConfigError
from protocol.files import write_atomic
from protocol.hostkeys import (
    ANSWER,
    STATEMENT,
    ServerKeys,
    decode_answer,
    decode_statement,
    encode_statement,
)
from protocol.layout import StateDir
from protocol.release import LOGS
from protocol.settings import check_ssh_public_key
from protocol.topics import is_host_name

NEXT: Final = ".next"
OLD: Final = ".old"
_OPEN: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def statement_path(state: StateDir) -> Path:
    return state.sftp_host_key.parent / STATEMENT


def read_statement(state: StateDir) -> ServerKeys:
    try:
        return decode_statement(statement_path(state).read_bytes())
    except FileNotFoundError:
        return ServerKeys()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{statement_path(state)}: {exc}") from exc


def hosts(state: StateDir) -> list[str]:
    try:
        names = os.listdir(state.chroots)
    except OSError:
        return []
    return sorted(name for name in names if is_host_name(name) and (state.chroots / name).is_dir())


def write_statement(state: StateDir, statement: ServerKeys) -> int:
    """The statement, in STATE/sftp/ and in every chroot; how many chroots."""
    path = statement_path(state)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(path, encode_statement(statement), mode=0o644)
    return distribute(state)


def distribute(state: StateDir) -> int:
    """Copy STATE/sftp/server-keys into every chroot that lacks it or holds an older one (a stat
    per host, and nothing at all when no rotation was ever made); how many were written."""
    path = statement_path(state)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    written = 0
    for host in hosts(state):
        target = state.chroot(host) / STATEMENT
        try:
            info = os.lstat(target)
            if stat.S_ISREG(info.st_mode) and info.st_size == len(data) and target.read_bytes() == data:
                continue
        except FileNotFoundError:
            pass
        write_atomic(target, data, mode=0o644)  # the chroot's root is the publisher's (root's)
        written += 1
    return written


def public_key(text: str) -> str:
    """A key given as 'ssh-ed25519 AAAA...' or as the path of a .pub file."""
    candidate = text
    if not text.startswith(("ssh-", "ecdsa-", "sk-")):
        try:
            candidate = Path(text).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"--key {text}: neither a public key nor a readable file: {exc.strerror}"
            ) from exc
    try:
        return check_ssh_public_key(" ".join(candidate.split()[:2]))
    except ValueError as exc:
        raise ConfigError(f"--key {text}: {exc}") from exc


def _public(path: Path) -> str | None:
    import asyncssh  # noqa: PLC0415 - `herald publish` distributes statements and must not pay for asyncssh

    try:
        key = asyncssh.read_private_key(str(path))
    except FileNotFoundError:
        return None
    except (OSError, asyncssh.KeyImportError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the host key: {exc}") from exc
    return check_ssh_public_key(key.export_public_key("openssh").decode())


def _with(keys: list[str], *added: str) -> list[str]:
    return [*keys, *(key for key in added if key not in keys)]


def rotate(state: StateDir, key: str | None) -> str:
    """List a successor: the one given, else a new key for the embedded server. The successor."""
    statement = read_statement(state)
    current = _public(state.sftp_host_key)
    if key is None:
        if current is None:
            raise ConfigError(
                f"{state.sftp_host_key}: no embedded SFTP server key here; with OpenSSH, make sshd's new "
                "key (ssh-keygen) and name it with --key"
            )
        successor_path = Path(f"{state.sftp_host_key}{NEXT}")
        successor = _public(successor_path)
        if successor is None:
            import asyncssh  # noqa: PLC0415

            made = asyncssh.generate_private_key("ssh-ed25519")
            made.write_private_key(str(successor_path))
            successor_path.chmod(0o600)
            made.write_public_key(f"{successor_path}.pub")
            successor = check_ssh_public_key(made.export_public_key("openssh").decode())
    else:
        successor = public_key(key)
    listed = _with(statement.keys, *([current] if current else []), successor)
    retired = [old for old in statement.retired if old not in listed]
    write_statement(state, ServerKeys(keys=listed, retired=retired))
    return successor


def answers(state: StateDir) -> dict[str, set[str] | None]:
    """Per host, the keys its agent says it trusts (None: no answer, or one that does not read)."""
    found: dict[str, set[str] | None] = {}
    for host in hosts(state):
        data = _read_answer(state.chroot(host) / LOGS / ANSWER)
        try:
            found[host] = set(decode_answer(data).trusted) if data is not None else None
        except ValueError:
            found[host] = None
    return found


def _read_answer(path: Path) -> bytes | None:
    """The host wrote it: a regular file with one link, opened without following links, bounded."""
    try:
        fd = os.open(path, _OPEN)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or info.st_size > 64 * 1024:
            return None
        return os.read(fd, 64 * 1024)
    finally:
        os.close(fd)


def lagging(state: StateDir) -> list[str]:
    """The hosts whose agent does not yet trust every key the statement lists."""
    wanted = set(read_statement(state).keys)
    return [host for host, trusted in answers(state).items() if trusted is None or not wanted <= trusted]


def switch(state: StateDir, *, force: bool) -> tuple[str, str]:
    """The embedded server takes its successor: (new, old)."""
    successor_path = Path(f"{state.sftp_host_key}{NEXT}")
    successor, current = _public(successor_path), _public(state.sftp_host_key)
    if successor is None or current is None:
        raise ConfigError(
            f"{successor_path}: no successor to switch to: run herald server host-key rotate first"
        )
    waiting = lagging(state)
    if waiting and not force:
        shown = ", ".join(waiting[:10]) + (f" and {len(waiting) - 10} more" if len(waiting) > 10 else "")
        raise ConfigError(
            f"{len(waiting)} host(s) do not trust the successor yet ({shown}): they would be locked out; "
            "wait for them (herald server host-key status), or pass --force"
        )
    old_path = Path(f"{state.sftp_host_key}{OLD}")
    for suffix in ("", ".pub"):
        Path(f"{state.sftp_host_key}{suffix}").replace(f"{old_path}{suffix}")
        Path(f"{successor_path}{suffix}").replace(f"{state.sftp_host_key}{suffix}")
    statement = read_statement(state)
    write_statement(
        state, ServerKeys(keys=_with([successor], *statement.keys, current), retired=statement.retired)
    )
    return successor, current


def retire(state: StateDir, key: str | None) -> str:
    """List a key as retired (default: the embedded server's previous key, whose private half is
    then deleted). The key retired."""
    current = _public(state.sftp_host_key)
    old_path = Path(f"{state.sftp_host_key}{OLD}")
    if key is None:
        old = _public(old_path)
        if old is None:
            raise ConfigError(f"{old_path}: no previous embedded key; name the key to retire with --key")
    else:
        old = public_key(key)
    if old == current:
        raise ConfigError("that is the key the embedded SFTP server presents: switch first")
    statement = read_statement(state)
    write_statement(
        state,
        ServerKeys(keys=[k for k in statement.keys if k != old], retired=_with(statement.retired, old)[-8:]),
    )
    if _public(old_path) == old:
        for suffix in ("", ".pub"):
            Path(f"{old_path}{suffix}").unlink(missing_ok=True)
    return old
