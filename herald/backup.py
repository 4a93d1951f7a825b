"""`herald state backup` and `herald state restore`: the server's state as one archive.

A backup is a tar archive (gzip when its name ends in .gz or .tgz), written under the publish
lock so that no publish is half in it, readable by its owner only (it holds the signing key and
the broker secrets). It holds what cannot be made again: the publisher's key and generations,
the broker's users and secrets, the SSH side (authorized keys, the embedded server's host keys),
and every chroot: `current`, releases, objects (the shared pool once, by hard link), credentials
and the hosts' logs. It leaves out what is derived (the hash cache, the export of the fleet
repository, run/) and each host's backups/ (that host's own restic or duplicity target: back
those up as their hosts' data, or let the hosts re-upload).

A restore never lets generations go backwards: hosts run what was published after the backup,
and an agent refuses a generation below the one it runs. So restore learns, per host, the highest
generation the host is known to have had: from the names of the logs it uploaded
(`...-g<N>-applied.log`) in the chroots restored and in the state being replaced, and from the
hosts' retained `state` messages when a broker is reachable. It writes them to
STATE/publisher/floor.json; the publisher releases every host below its floor again above it,
and `herald serve` does the same for a host whose state reports a generation above the one it
serves (herald.serve), which covers hosts that report only after the server is back.
"""

import contextlib
import os
import shutil
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import msgspec

from herald import hostlogs
from herald.output import console, warn
from protocol.credentials import read_secret
from protocol.errors import ConfigError, UnreachableError
from protocol.files import fsync_dir
from protocol.layout import StateDir
from protocol.mqtt import BrokerURL
from protocol.release import LOG_NAME, LOGS
from protocol.topics import ADMIN_USER, Topics, is_host_name
from publisher.accounts import host_accounts
from publisher.publish import publish_lock, read_floors, write_floors

MANIFEST: Final = "herald-backup.json"
FORMAT: Final = 1
_MAX_GENERATION: Final = 2**53 - 1
# Below each of these top-level entries of STATE, what a backup leaves out.
_TOP: Final = {
    "publisher": {"hashes.msgpack", "parsed.msgpack", "tree", "tree.index", "tree.rev", "lock"},
    "broker": set(),
    "ssh": set(),
    "sftp": set(),
    "objects": {".swept"},
    "chroot": set(),
}
_CHROOT_SKIPPED: Final = {"backups"}


class BackupInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The archive's first member: what it is, and the generations it holds."""

    format: int = FORMAT
    created_at: float
    generations: dict[str, int]


def _kept(parts: tuple[str, ...]) -> bool:
    """Whether the entry at `parts` (below STATE) belongs in a backup."""
    if len(parts) == 2 and parts[1] in _TOP[parts[0]]:
        return False
    if parts[0] == "chroot" and len(parts) == 3 and parts[2] in _CHROOT_SKIPPED:
        return False
    return not parts[-1].startswith(".tmp-")  # a publish's temporary name, left by a crash


def _members(state: StateDir) -> Iterator[tuple[Path, tuple[str, ...]]]:
    """(path, its parts below STATE) of everything a backup holds, directories first."""
    root = state.root
    for top in _TOP:
        base = root / top
        if not base.is_dir():
            continue
        yield base, (top,)
        for directory, dirs, files in os.walk(base):
            here = Path(directory)
            parts = here.relative_to(root).parts
            dirs[:] = sorted(name for name in dirs if _kept((*parts, name)))
            for name in [*dirs, *sorted(files)]:
                if _kept((*parts, name)):
                    yield here / name, (*parts, name)


def _host_written(parts: tuple[str, ...]) -> bool:
    """Below chroot/<host>/logs/: what the host wrote (with OpenSSH: links, FIFOs...)."""
    return len(parts) >= 4 and parts[0] == "chroot" and parts[2] == LOGS


def add_host_file(archive: tarfile.TarFile, path: Path, name: str) -> bool:
    """Add a file a host wrote, by the rules of herald.hostlogs: only a regular file with one
    link, opened without following links; False (and nothing added) for anything else."""
    try:
        if hostlogs.not_a_log(os.lstat(path)) is not None:
            return False
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as stream:
        info = os.fstat(fd)
        if hostlogs.not_a_log(info) is not None:
            return False
        member = tarfile.TarInfo(name)
        member.size, member.mtime, member.mode = info.st_size, int(info.st_mtime), info.st_mode & 0o777
        member.uid, member.gid = info.st_uid, info.st_gid
        archive.addfile(member, stream)
    return True


def _generations(state: StateDir) -> dict[str, int]:
    found: dict[str, int] = {}
    try:
        hosts = [name for name in os.listdir(state.chroots) if is_host_name(name)]
    except OSError:
        return found
    for host in hosts:
        with contextlib.suppress(OSError, ValueError, IndexError):
            found[host] = int((state.chroot(host) / "current").read_text(encoding="ascii").split()[0])
    return found


def backup(state_dir: Path, target: Path) -> tuple[int, int]:
    """Write the archive; (hosts, members) in it."""
    state = StateDir(state_dir)  # read as it is (a snapshot may be read-only): either key place
    key = state.signing_key if state.signing_key.exists() else state.publisher / "signing.key"
    if not (state.root / "chroot").is_dir() or not key.exists():
        raise ConfigError(f"--state {state_dir}: not a herald state directory (no chroot/ or signing key)")
    gzip = target.name.endswith((".gz", ".tgz"))
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    count = 0
    with publish_lock(state.publisher / "lock"):
        generations = _generations(state)
        info = BackupInfo(created_at=time.time(), generations=generations)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # secrets inside: the owner's only
        try:
            with (
                os.fdopen(fd, "wb") as stream,
                (
                    tarfile.open(fileobj=stream, mode="w:gz")
                    if gzip
                    else tarfile.open(fileobj=stream, mode="w")
                ) as archive,
            ):
                data = msgspec.json.encode(info)
                member = tarfile.TarInfo(MANIFEST)
                member.size, member.mtime, member.mode = len(data), int(info.created_at), 0o600
                archive.addfile(member, _Bytes(data))
                for path, parts in _members(state):
                    name = "/".join(parts)
                    if _host_written(parts):
                        if os.path.isdir(path) and not os.path.islink(path):  # noqa: PTH112, PTH114
                            continue  # a directory a host made in its logs/: not a log
                        count += add_host_file(archive, path, name)
                        continue
                    archive.add(path, arcname=name, recursive=False)  # hard links stay links
                    count += 1
                archive.close()
                stream.flush()
                os.fsync(stream.fileno())
            tmp.replace(target)
            fsync_dir(target.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return len(generations), count


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def read(self, size: int = -1) -> bytes:
        chunk, self._data = (self._data, b"") if size < 0 else (self._data[:size], self._data[size:])
        return chunk


def _running_server(state: Path) -> int | None:
    """The PID of a `herald serve` that runs on this state directory, if one does."""
    try:
        info = msgspec.json.decode((state / "run" / "serve.json").read_bytes())
        pid = int(info["pid"])
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError, TypeError, msgspec.DecodeError):
        return None
    return pid


def logged_generations(state: Path) -> dict[str, int]:
    """Per host, the highest generation in the names of the logs it uploaded: only names are read
    (listdir), never contents, and only names as an agent makes them (protocol.release.LOG_NAME)."""
    found: dict[str, int] = {}
    chroots = StateDir(state).chroots
    try:
        hosts = [name for name in os.listdir(chroots) if is_host_name(name)]
    except OSError:
        return found
    for host in hosts:
        try:
            names = os.listdir(chroots / host / LOGS)
        except OSError:
            continue
        for name in names:
            match = LOG_NAME.fullmatch(name)
            if match is not None and len(match[2]) <= 16:  # a host names its files: bounded
                found[host] = min(max(found.get(host, 0), int(match[2])), _MAX_GENERATION)
    return found


def restore(archive_path: Path, state_dir: Path, *, force: bool) -> tuple[Path | None, dict[str, int]]:
    """Bring the archive back into `state_dir`: (where the replaced state went, the floors learned
    from logs). The state directory replaced (with `force`) is moved aside, never deleted."""
    state_dir = state_dir.absolute()
    pid = _running_server(state_dir)
    if pid is not None:
        raise ConfigError(f"herald serve (pid {pid}) runs on {state_dir}: stop it first, then restore")
    occupied = state_dir.exists() and any(state_dir.iterdir())
    if occupied and not force:
        raise ConfigError(
            f"--state {state_dir} is not empty; pass --force to replace it (it is moved aside, not deleted)"
        )
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = state_dir.with_name(f".{state_dir.name}.restore-{os.getpid()}")
    staging.mkdir(mode=0o755)
    try:
        _extract(archive_path, staging)
        floors = logged_generations(staging)
        aside: Path | None = None
        with publish_lock(state_dir / "publisher" / "lock") if occupied else contextlib.nullcontext():
            # A publish (a timer's, a hook's) waits, or has finished: none writes into the state
            # being moved, and the first one after it finds the floors in place.
            if occupied:
                for host, generation in logged_generations(state_dir).items():
                    floors[host] = max(floors.get(host, 0), generation)
                for host, generation in read_floors(state_dir / "publisher" / "floor.json").items():
                    floors[host] = max(floors.get(host, 0), generation)
            add_floors(staging, floors)
            if occupied:
                # Kept in one directory beside it, which a unit can hide from `herald serve` (the
                # old state holds the signing key): STATE.before-restore/<time>.
                kept = state_dir.with_name(f"{state_dir.name}.before-restore")
                kept.mkdir(mode=0o700, exist_ok=True)
                stamp = time.strftime("%Y%m%dT%H%M%S")
                aside = next(
                    kept / name
                    for name in (stamp, *(f"{stamp}.{n}" for n in range(1, 1000)))
                    if not (kept / name).exists()
                )
                state_dir.rename(aside)
            elif state_dir.exists():
                state_dir.rmdir()
            staging.rename(state_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(state_dir.parent)
    return aside, floors


def add_floors(state_dir: Path, learned: dict[str, int]) -> dict[str, int]:
    """Raise STATE/publisher/floor.json to `learned` where it is lower; the floors now."""
    path = StateDir(state_dir).publisher / "floor.json"
    floors = read_floors(path)
    for host, generation in learned.items():
        floors[host] = max(floors.get(host, 0), generation)
    if floors:
        write_floors(path, floors)
    return floors


def _extract(archive_path: Path, into: Path) -> None:
    try:
        with tarfile.open(archive_path, mode="r:*") as archive:
            _extract_from(archive, archive_path, into)
    except (OSError, tarfile.TarError) as exc:
        raise ConfigError(f"{archive_path}: not restored: {exc}") from exc


def _extract_from(archive: tarfile.TarFile, archive_path: Path, into: Path) -> None:
    first = archive.next()
    if first is None or first.name != MANIFEST:
        raise ConfigError(f"{archive_path}: not a herald backup (no {MANIFEST} first)")
    stream = archive.extractfile(first)
    try:
        info = msgspec.json.decode(stream.read() if stream else b"", type=BackupInfo)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ConfigError(f"{archive_path}: {MANIFEST}: {exc}") from exc
    if info.format > FORMAT:
        raise ConfigError(
            f"{archive_path}: backup format {info.format} is newer than this herald ({FORMAT}): "
            "restore it with the herald that wrote it"
        )
    for member in archive:
        if member is first:
            continue
        top = member.name.split("/", 1)[0]
        if top not in _TOP:
            raise ConfigError(f"{archive_path}: unexpected member {member.name!r}")
        # The data filter: no absolute paths, no '..', no links out of the tree, no devices,
        # no setuid bits; files belong to whoever restores (provision gives chroots back).
        archive.extract(member, into, filter="data")


def cmd_backup(state: Path, target: Path) -> int:
    hosts, members = backup(state, target)
    console.print(
        f"wrote {target}: {hosts} host(s), {members} entries (readable by its owner only)", markup=False
    )
    return 0


def cmd_restore(archive_path: Path, state: Path, *, force: bool, broker: str | None, prefix: str) -> int:
    aside, floors = restore(archive_path, state, force=force)
    if broker is not None:
        floors = add_floors(state, _reported(state, BrokerURL.parse(broker), Topics(prefix)))
    console.print(f"restored {archive_path} into {state}", markup=False)
    if aside is not None:
        console.print(f"the state it replaced is in {aside}", markup=False)
    if floors:
        shown = ", ".join(f"{host} {generation}" for host, generation in sorted(floors.items())[:10])
        more = f" and {len(floors) - 10} more" if len(floors) > 10 else ""
        console.print(f"new generations start above: {shown}{more}", markup=False)
    if host_accounts():
        warn("OpenSSH serves these chroots: run `herald server provision` to give them to their host users")
    console.print(
        "start herald serve (or publish): hosts ahead of the backup get a new generation above theirs"
    )
    return 0


def _reported(state: Path, url: BrokerURL, topics: Topics) -> dict[str, int]:
    """Per host, the highest generation its retained state names (deployed or target); empty,
    with a warning, when the broker cannot be asked."""
    from herald.fleet import collect  # noqa: PLC0415 - MQTT only when a broker is named
    from herald.runner import run  # noqa: PLC0415

    try:
        view = run(collect(url, read_secret(StateDir(state).service_secret(ADMIN_USER)), topics))
    except (UnreachableError, ConfigError) as exc:
        warn(f"the hosts' retained states not read ({exc}); serve learns them as the hosts report")
        return {}
    return {
        host: min(max(item.state.deployed_generation, item.state.target_generation), _MAX_GENERATION)
        for host, item in view.hosts.items()
        if item.state is not None
    }
