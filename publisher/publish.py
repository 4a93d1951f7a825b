"""`herald publish`: fleet repository -> one signed release per changed host.

A host whose files fail to materialise keeps its previous release and is reported failed; the
others are published. Errors in fleet.toml or the hosts/ tree stop the run before anything is
written.
"""

import fcntl
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import msgspec
from loguru import logger

from protocol.credentials import Secret, format_passwd, hash_secret, new_secret, parse_passwd, read_secret
from protocol.errors import HeraldError
from protocol.files import sync_filesystem, write_atomic
from protocol.layout import StateDir
from protocol.messages import now
from protocol.release import Content, Current, FileEntry, Manifest, check_content, encode_manifest
from protocol.settings import check_ssh_public_key
from protocol.topics import SERVICE_USERS
from publisher.chroot import Chroot, Pool
from publisher.hashcache import HashCache
from publisher.inventory import Host, Inventory, load_inventory
from publisher.materialise import materialise
from publisher.signing import Signer


class Status(StrEnum):
    CHANGED = "changed"
    UNCHANGED = "unchanged"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class HostResult:
    host: str
    status: Status
    generation: int = 0
    version: str = ""
    message: str = ""
    added: tuple[str, ...] = ()
    modified: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    objects_written: int = 0


@dataclass(slots=True)
class Report:
    hosts: list[HostResult] = field(default_factory=list)
    seconds: float = 0.0
    files_hashed: int = 0
    dry_run: bool = False
    source_rev: str | None = None

    def of(self, status: Status) -> list[HostResult]:
        return [result for result in self.hosts if result.status is status]


def source_revision(repo: Path) -> str | None:
    """The fleet repository's git commit, if it is a git work tree."""
    if not (repo / ".git").exists():
        return None
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],  # noqa: S607 - git from PATH
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


@contextmanager
def publish_lock(path: Path) -> Iterator[None]:
    """Serialise publish runs on one state dir; a second run waits for the first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another publish is running on {}; waiting for it", path.parent.parent)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class _Generations(msgspec.Struct):
    """The last generation per host, kept beside the chroots: a chroot wiped by hand must not
    restart a host at generation 1, which its agent would refuse as older than what it runs."""

    hosts: dict[str, int] = {}


class Publisher:
    def __init__(self, fleet: Path, state: Path, *, keep_releases: int = 3) -> None:
        self.fleet = fleet
        self.state = StateDir(state)
        self.keep_releases = keep_releases
        self._seen: set[str] = set()  # real paths released this run: what the hash cache keeps

    def run(self, *, dry_run: bool = False) -> Report:
        """Publish every host whose content changed (or, with dry_run, say which would)."""
        started = time.monotonic()
        self._seen = set()
        inventory = load_inventory(self.fleet)
        report = Report(dry_run=dry_run, source_rev=source_revision(inventory.root))
        cache = HashCache(self.state.publisher / "hashes.msgpack")
        if dry_run:
            report.hosts = [
                self._host(inventory, host, cache, report, None, {})[0] for host in inventory.hosts
            ]
        else:
            with publish_lock(self.state.publisher / "lock"):
                self._publish(inventory, cache, report)
        report.files_hashed = cache.hashed
        report.seconds = time.monotonic() - started
        return report

    def _publish(self, inventory: Inventory, cache: HashCache, report: Report) -> None:
        signer = Signer.load_or_create(self.state.signing_key)
        pool = Pool(self.state.objects)
        generations_file = self.state.publisher / "generations.json"
        try:
            generations = msgspec.json.decode(generations_file.read_bytes(), type=_Generations).hosts
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            generations = {}
        secrets: dict[str, tuple[Secret, bool]] = {}
        switches: list[tuple[Chroot, Current]] = []
        for host in inventory.hosts:
            chroot = Chroot(self.state.chroot(host.name))
            result, switch = self._host(inventory, host, cache, report, (signer, pool), generations)
            report.hosts.append(result)
            if switch is not None:
                switches.append((chroot, switch))
            chroot.ensure_layout()
            secrets[host.name] = chroot.ensure_credentials(signer.public)
        if switches:
            # Every object and release is on disk before any `current` names it; then the
            # renames of `current` are made durable too. Two syncfs calls, not one fsync per file.
            sync_filesystem(self.state.root)
            for chroot, switch in switches:
                chroot.set_current(switch)
                generations[chroot.path.name] = switch.generation
            sync_filesystem(self.state.root)
            for chroot, _ in switches:
                try:
                    chroot.prune(self.keep_releases)
                except (HeraldError, OSError) as exc:
                    logger.bind(host=chroot.path.name).warning(
                        "published; pruning old releases failed: {}", exc
                    )
        write_atomic(
            generations_file, msgspec.json.encode(_Generations(generations)), mode=0o600, durable=False
        )
        self._write_broker_users(secrets)
        self._write_authorized_keys(inventory)
        cache.save(keep=self._seen)
        sync_filesystem(self.state.root)

    def _host(
        self,
        inventory: Inventory,
        host: Host,
        cache: HashCache,
        report: Report,
        writer: tuple[Signer, Pool] | None,
        generations: dict[str, int],
    ) -> tuple[HostResult, Current | None]:
        """Plan one host and, unless `writer` is None (a dry run), write its objects and release.

        The release is not named by `current` yet: the caller switches every host at once.
        """
        chroot = Chroot(self.state.chroot(host.name))
        try:
            sources = materialise(inventory.root, host.name, host.directory)
            entries = [
                FileEntry(source.path, source.mode, source.size, cache.sha256(source)) for source in sources
            ]
            content = Content(operation=host.entry.operation, flake=host.flake, files=entries)
            check_content(content)  # what agents will enforce, enforced before anything is served
        except (HeraldError, OSError) as exc:
            logger.bind(host=host.name).error("not published: {}", exc)
            return HostResult(host.name, Status.FAILED, message=str(exc)), None
        self._seen.update(source.real for source in sources)

        version = content.version()
        current = chroot.current()
        if current is not None and current.version == version:
            return HostResult(host.name, Status.UNCHANGED, current.generation, version), None
        previous = chroot.manifest(current.generation) if current else None
        diff = _diff(previous.content.files if previous else [], entries)
        generation = max(current.generation if current else 0, generations.get(host.name, 0)) + 1
        if writer is None:
            return HostResult(host.name, Status.CHANGED, generation, version, "dry run", *diff), None
        signer, pool = writer

        manifest = Manifest(
            host=host.name,
            generation=generation,
            version=version,
            published_at=now(),
            source_rev=report.source_rev,
            content=content,
        )
        try:
            chroot.ensure_layout()
            private = {entry.sha256 for entry in entries if not entry.mode & 0o004}
            written = sum(
                chroot.write_object(source, entry.sha256, pool, private=entry.sha256 in private)
                for source, entry in zip(sources, entries, strict=True)
            )
            data = encode_manifest(manifest)
            chroot.write_release(manifest, data, signer.sign(data))
        except (HeraldError, OSError) as exc:
            logger.bind(host=host.name).error("not published: {}", exc)
            return HostResult(host.name, Status.FAILED, message=f"writing the release failed: {exc}"), None
        logger.bind(host=host.name).info("generation {} ({} objects written)", generation, written)
        result = HostResult(
            host.name, Status.CHANGED, generation, version, "", *diff, objects_written=written
        )
        return result, Current(generation, version)

    def _write_authorized_keys(self, inventory: Inventory) -> None:
        """STATE/ssh/authorized_keys/<host>: the key each host logs in with; removed hosts lose theirs."""
        directory = self.state.authorized_keys_dir
        directory.mkdir(parents=True, exist_ok=True)
        wanted = {
            host.name: f"{check_ssh_public_key(host.entry.ssh_key)} herald:{host.name}\n"
            for host in inventory.hosts
        }
        for entry in directory.iterdir():
            if entry.name not in wanted:
                entry.unlink()
        for name, line in wanted.items():
            path = directory / name
            if not path.exists() or path.read_text(encoding="utf-8") != line:
                write_atomic(path, line.encode(), mode=0o644, durable=False)

    def _write_broker_users(self, hosts: dict[str, tuple[Secret, bool]]) -> None:
        """STATE/broker/passwd: one hash per host and per service user; removed hosts dropped."""
        try:
            old = parse_passwd(self.state.passwd.read_text(encoding="utf-8"))
        except FileNotFoundError:
            old = {}
        secrets = dict(hosts)
        for user in SERVICE_USERS:
            path = self.state.service_secret(user)
            if path.exists():
                secrets[user] = (read_secret(path), False)
            else:
                secret = new_secret()
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(path, f"{secret.reveal()}\n".encode(), mode=0o600)
                secrets[user] = (secret, True)
        users = {
            user: hash_secret(secret) if created or user not in old else old[user]
            for user, (secret, created) in secrets.items()
        }
        if users != old:
            write_atomic(self.state.passwd, format_passwd(users).encode(), mode=0o600)


def _diff(
    old: list[FileEntry], new: list[FileEntry]
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(added, modified, removed) paths between two file lists."""
    before = {entry.path: entry for entry in old}
    after = {entry.path: entry for entry in new}
    added = tuple(sorted(after.keys() - before.keys()))
    removed = tuple(sorted(before.keys() - after.keys()))
    modified = tuple(sorted(path for path in after.keys() & before.keys() if after[path] != before[path]))
    return added, modified, removed


def publish(fleet: Path, state: Path, *, dry_run: bool = False, keep_releases: int = 3) -> Report:
    return Publisher(fleet, state, keep_releases=keep_releases).run(dry_run=dry_run)
