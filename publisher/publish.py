"""`herald publish`: fleet repository -> one signed release per changed host.

A host whose files fail to materialise keeps its previous release and is reported failed; the
others are published. Errors in fleet.toml or the hosts/ tree stop the run before anything is
written.
"""

import fcntl
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Final, Literal, TypeVar

import msgspec
from loguru import logger

from protocol import formats
from protocol.credentials import Secret, format_passwd, hash_secret, new_secret, parse_passwd, read_secret
from protocol.errors import ConfigError, HeraldError, ReleaseError
from protocol.files import Flusher, write_atomic
from protocol.layout import Access, StateDir
from protocol.messages import now
from protocol.release import Content, Current, FileEntry, Manifest, System, check_content, encode_manifest
from protocol.settings import Deliver, PublishSettings, RolloutPlan, seconds, size_bytes
from protocol.topics import SERVICE_USERS, is_host_name
from publisher.accounts import host_accounts
from publisher.check import Checker
from publisher.chroot import Chroot, Listed, Pool
from publisher.closure import Closures, add_root, default_system_command, prune_roots
from publisher.figures import add_run
from publisher.hashcache import HashCache, tree_key
from publisher.holdback import Gate
from publisher.inventory import Host, Inventory, load_inventory
from publisher.keyring import Keys, load_keys, recount
from publisher.keys import authorized_key_line
from publisher.materialise import Listings, Source, materialise
from publisher.modes import Declarations
from publisher.revision import Revision
from publisher.signing import Signer, settle_key

_T = TypeVar("_T")
_FILE_WORKERS: Final = 2  # hosts written at once (more made a cold publish slower here)
_MAX_GENERATION: Final = 2**53 - 1  # protocol.messages.Generation's bound, less the one added


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
    modes: tuple[str, ...] = ()  # "files/etc/motd 0644 -> 0600" for each file whose mode changed


@dataclass(slots=True)
class Report:
    hosts: list[HostResult] = field(default_factory=list)
    seconds: float = 0.0
    files_hashed: int = 0
    dry_run: bool = False
    source_rev: str | None = None
    released: list[str] = field(default_factory=list)  # hosts whose `current` changed: to announce

    def of(self, status: Status) -> list[HostResult]:
        return [result for result in self.hosts if result.status is status]


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


def read_floors(path: Path) -> dict[str, int]:
    """STATE/publisher/floor.json (or STATE/run/reported.json): per host, the highest generation
    it is known to have run (herald.backup, herald.serve). The shape of generations.json."""
    try:
        return msgspec.json.decode(path.read_bytes(), type=_Generations).hosts
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return {}


def write_floors(path: Path, floors: Mapping[str, int]) -> None:
    write_atomic(path, msgspec.json.encode(_Generations(dict(floors))), mode=0o600)


@dataclass(frozen=True, slots=True)
class _Plan:
    """A host whose content changed: what its next release holds."""

    host: Host
    chroot: Chroot
    sources: list[Source]
    entries: list[FileEntry]
    content: Content
    version: str
    # the generation `current` names, its files and the objects of its closure
    previous: tuple[int, list[Listed], list[str]] | None
    generation: int
    diff: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]
    modes: tuple[str, ...]
    release_format: int = 1  # protocol.formats.RELEASE, or [publish] format
    key: bytes = b""  # the hash cache's key of the host's tree
    current: Current | None = None

    def result(self, message: str = "", objects_written: int = 0) -> HostResult:
        return HostResult(
            self.host.name,
            Status.CHANGED,
            self.generation,
            self.version,
            message,
            *self.diff,
            objects_written=objects_written,
            modes=self.modes,
        )


Progress = Callable[[str, int, int], None]


class Publisher:
    """One publish run: plan every host, check the changed ones, write, then switch `current`."""

    def __init__(
        self,
        fleet: Path,
        state: Path,
        *,
        progress: Progress | None = None,
        keep: int | None = None,
        allow_dirty: bool = False,
        rollout: RolloutPlan | Literal["off"] | None = None,
    ) -> None:
        self.rollout = rollout  # None: fleet.toml's [rollout]; "off": every release given at once
        self.keep = keep  # releases kept per host; None: fleet.toml's [publish] keep
        self.fleet = fleet
        self.allow_dirty = allow_dirty  # publish a git work tree with uncommitted changes, marked dirty
        self.state = StateDir(state)
        self._progress = progress or (lambda _stage, _done, _total: None)
        self._seen: set[str] = set()  # real paths released this run: what the hash cache keeps
        self._flusher = Flusher(self.state.root)
        self._format: int | None = None  # fleet.toml's [publish] format; None: each host keeps its own
        self._channel_inputs: tuple[object, ...] | None = None  # Publisher._inputs, once per run

    def run(self, *, dry_run: bool = False) -> Report:
        """Publish every host whose content changed (or, with dry_run, say which would)."""
        started = time.monotonic()
        self._seen = set()
        self._channel_inputs = None
        # The lock first, then what it protects: the revision read, the inventory, the hash
        # cache. A dry run locks too when it can (it brings the export up to date), else it
        # reads a temporary export and writes nothing to the state directory.
        locking = not dry_run or os.access(self.state.root, os.W_OK)
        if not self.state.root.exists():
            load_inventory(self.fleet)  # a broken fleet is one line before the state directory is made
        with (
            publish_lock(self.state.publisher / "lock") if locking else nullcontext(),
            Revision(
                self.fleet, self.state.publisher if locking else None, allow_dirty=self.allow_dirty
            ) as revision,
        ):
            if locking and not dry_run:
                settle_key(self.state)  # herald 0.1's key place, where no unit can hide it, first
            inventory = load_inventory(revision.root)
            self._refuse_removed(inventory)
            report = Report(dry_run=dry_run, source_rev=revision.rev)
            cache = HashCache(self.state.publisher / "hashes.msgpack")
            generations = self._generations()
            self._format = inventory.config.publish.format
            waves = (
                inventory.config.rollout
                if self.rollout is None
                else None
                if self.rollout == "off"
                else self.rollout
            )
            gate = Gate(
                self.state, waves, source=str(inventory.root / "fleet.toml"), off=self.rollout == "off"
            )
            gate.check({host.name: host.entry.tags for host in inventory.hosts})
            results, plans = self._plan(inventory, cache, generations, gate)
            revision.confirm()  # a dirty work tree stops the run here, before any check or write
            checker = Checker(inventory.config.publish, self.state.publisher / "parsed.msgpack")
            for plan, failure in self._check(checker, plans):
                if failure is not None:
                    logger.bind(host=plan.host.name).error(
                        "not published: check failed: {}", failure.splitlines()[0]
                    )
                    results[plan.host.name] = HostResult(
                        plan.host.name, Status.FAILED, message=f"check failed: {failure}"
                    )
                elif dry_run:
                    results[plan.host.name] = plan.result("dry run")
                else:
                    results[plan.host.name] = plan.result()
            passed = [plan for plan in plans if results[plan.host.name].status is Status.CHANGED]
            closures = None
            if not dry_run and any(plan.host.entry.deliver is Deliver.CLOSURE for plan in passed):
                closures = Closures(
                    Pool(self.state.objects, self._flusher),
                    self.state.publisher / "nars.msgpack",
                    timeout=float(seconds(inventory.config.publish.timeout)),
                )
                passed = self._deliver(inventory, checker, closures, passed, results, cache)
            if not dry_run:
                self._write(inventory, passed, results, report, generations, gate)
                checker.save()
                if closures is not None:
                    closures.save()
                cache.save(keep=self._seen, hosts={host.name for host in inventory.hosts})
                self._flusher.flush()
                outcomes = [result.status for result in results.values()]
                add_run(  # for /metrics: every run counts, however started
                    self.state.publisher / "figures.json",
                    changed=outcomes.count(Status.CHANGED),
                    failed=outcomes.count(Status.FAILED),
                    seconds=time.monotonic() - started,
                    at=time.time(),
                )
        report.hosts = [results[host.name] for host in inventory.hosts]
        report.files_hashed = cache.hashed
        report.seconds = time.monotonic() - started
        return report

    def _refuse_removed(self, inventory: Inventory) -> None:
        """A host whose table left fleet.toml while its chroot is still here: ConfigError.

        Removing a host deletes what no publish can bring back (its logs, its backups/, the
        generations it ran) and, with OpenSSH, needs root for its account; a publish runs
        unattended, from a hook after any merge. `herald host remove` does it, with a dry run
        and the logs archived first if asked."""
        try:
            names = os.listdir(self.state.chroots)
        except OSError:
            return
        known = {host.name for host in inventory.hosts}
        gone = sorted(name for name in names if is_host_name(name) and name not in known)
        if gone:
            more = f" (and {len(gone) - 1} more)" if len(gone) > 1 else ""
            raise ConfigError(
                f"{inventory.root / 'fleet.toml'}: hosts.{gone[0]}{more}: not in fleet.toml any more, but "
                f"its chroot, keys and secrets are still on this server; run `herald host remove "
                f"{gone[0]}` (--dry-run shows what it removes), or put its table back"
            )

    def _floors(self) -> dict[str, int]:
        """Per host, a generation it is known to run: one above this server's current makes the
        next publish release it again above, even when its content did not change. floor.json
        holds what a restore learned, run/reported.json what hosts told `serve` since."""
        floors = read_floors(self.state.publisher / "floor.json")
        for host, generation in read_floors(self.state.root / "run" / "reported.json").items():
            floors[host] = max(floors.get(host, 0), generation)
        return floors

    def _generations(self) -> dict[str, int]:
        try:
            data = (self.state.publisher / "generations.json").read_bytes()
            return msgspec.json.decode(data, type=_Generations).hosts
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            return {}

    def _unchanged(self, current: Current, version: str | None, aborted: str, *, behind: bool) -> bool:
        """Nothing to release: the host's content is what `current` (or the rollout's held
        release) names, in the format wanted, at a generation no host outran; or it is what an
        abort held back, which is never released again, not even to lift or reformat it."""
        if version is None:
            return False
        if aborted and version == aborted:
            return True
        return version == current.version and self._kept(current) and not behind

    def _plan(
        self, inventory: Inventory, cache: HashCache, generations: dict[str, int], gate: Gate
    ) -> tuple[dict[str, HostResult], list[_Plan]]:
        """Materialise and hash every host; unchanged and broken hosts are settled here.
        A declaration of fleet.toml's `files` that matches no file stops the run (ConfigError)."""
        results: dict[str, HostResult] = {}
        plans: list[_Plan] = []
        listings = Listings()  # shared directories are listed once per run
        accounts = host_accounts()
        chroots = os.fspath(self.state.chroots)
        declared = Declarations(inventory)
        floors = self._floors()
        for index, host in enumerate(inventory.hosts, 1):
            self._progress("reading", index, len(inventory.hosts))
            chroot = Chroot(f"{chroots}/{host.name}", self._flusher, accounts.get(host.name))
            modes = declared.of[host.name]
            ahead = min(floors.get(host.name, 0), _MAX_GENERATION)
            try:
                sources = materialise(inventory.root, host.name, host.directory, listings)
                # A release a rollout holds back is the host's next: content equal to it is unchanged.
                current = gate.head(host.name) or chroot.current()
                aborted = gate.aborted.get(host.name, "")  # what an abort held back: not released again
                behind = current is not None and current.generation < ahead  # the host runs a later one
                # The declared modes are part of the key: a change of fleet.toml's `files` alone
                # must not keep the version the files had (a cache hit also means that the host's
                # own declarations all matched when it was stored: they and the paths are the key).
                key = tree_key(_kind(host, modes.key, self._inputs(inventory)), sources)
                if current is not None and self._unchanged(
                    current, cache.version(host.name, key), aborted, behind=behind
                ):
                    self._seen.update(source.real for source in sources)
                    results[host.name] = HostResult(
                        host.name, Status.UNCHANGED, current.generation, current.version
                    )
                    continue
                decided = declared.decide(host.name, sources)
                if decided is None:
                    continue  # a declaration of its own covers none of its files: the run stops below
                entries = [
                    FileEntry(s.path, mode, s.size, cache.sha256(s))
                    for s, mode in zip(sources, decided[0], strict=True)
                ]
                content = Content(operation=host.entry.operation, flake=host.flake, files=entries)
                version = content.version()
                _remember(cache, host, key, version, sources)
                if current is None or current.version != version:
                    check_content(content)  # what agents enforce, enforced before anything is served
            except (HeraldError, OSError) as exc:
                logger.bind(host=host.name).error("not published: {}", exc)
                results[host.name] = HostResult(host.name, Status.FAILED, message=str(exc))
                continue
            self._seen.update(source.real for source in sources)
            if current is not None and self._unchanged(current, version, aborted, behind=behind):
                results[host.name] = HostResult(
                    host.name, Status.UNCHANGED, current.generation, current.version
                )
                continue
            _say_behind(host.name, ahead, current, behind=behind)
            previous = _listed(chroot, current.generation) if current else None
            generation = max(current.generation if current else 0, generations.get(host.name, 0), ahead) + 1
            listed = previous[1] if previous else []
            declared.released(host.name, decided[1], listed)
            diff, changes = _diff(listed, entries), _mode_changes(listed, entries)
            plans.append(
                _Plan(
                    host,
                    chroot,
                    sources,
                    entries,
                    content,
                    version,
                    previous,
                    generation,
                    diff,
                    changes,
                    release_format=self._format_for(current),
                    key=key,
                    current=current,
                )
            )
        declared.check()  # before anything is said about the plans: an error is one line
        for plan in plans:
            _notes(plan)
        if warning := declared.warning():
            logger.warning(warning)
        return results, plans

    def _check(self, checker: Checker, plans: list[_Plan]) -> list[tuple[_Plan, str | None]]:
        """Every changed host's check, in parallel, bounded by the core count."""
        if checker.idle:
            return [(plan, None) for plan in plans]
        done: list[tuple[_Plan, str | None]] = []
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="check") as pool:
            futures = {
                pool.submit(checker.check, plan.host.name, plan.host.flake, _files(plan)): plan
                for plan in plans
            }
            for future in as_completed(futures):
                done.append((futures[future], future.result()))
                self._progress("checking", len(done), len(plans))
        order = {id(plan): index for index, plan in enumerate(plans)}
        return sorted(done, key=lambda item: order[id(item[0])])

    def _deliver(
        self,
        inventory: Inventory,
        checker: Checker,
        closures: Closures,
        plans: list[_Plan],
        results: dict[str, HostResult],
        cache: HashCache,
    ) -> list[_Plan]:
        """Build the system of each closure host that passed its check, in parallel (one store:
        what several hosts share is built once), and put it in its plan; a host whose build
        fails is not published, as one whose check fails."""
        build = partial(
            self._build, settings=inventory.config.publish, checker=checker, closures=closures, cache=cache
        )
        kept: list[_Plan] = []
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="build") as pool:
            for index, outcome in enumerate(pool.map(build, plans), 1):
                self._progress("building", index, len(plans))
                if isinstance(outcome, HostResult):
                    if outcome.status is Status.FAILED:
                        logger.bind(host=outcome.host).error(
                            "not published: {}", outcome.message.splitlines()[0]
                        )
                    results[outcome.host] = outcome
                else:
                    kept.append(outcome)
                    results[outcome.host.name] = outcome.result()
        if closures.stored:
            logger.info("closures: {} NAR(s) stored", closures.stored)
        return kept

    def _build(
        self,
        plan: _Plan,
        *,
        settings: PublishSettings,
        checker: Checker,
        closures: Closures,
        cache: HashCache,
    ) -> _Plan | HostResult:
        """One host's system built and described (publisher.closure); its result if it failed or
        came out as the system its current release names already."""
        name, roots = plan.host.name, self.state.publisher / "roots"
        if plan.host.entry.deliver is not Deliver.CLOSURE:
            return plan
        if self._format is not None and self._format < formats.CLOSURE:
            message = f"deliver = 'closure' needs release format {formats.CLOSURE}, not {self._format}"
            return HostResult(name, Status.FAILED, message=message)
        system = _built(plan, settings, checker, closures, roots)
        if isinstance(system, str):
            return HostResult(name, Status.FAILED, message=system)
        content = msgspec.structs.replace(plan.content, system=system)
        version = content.version()
        cache.remember(name, plan.key, version, plan.sources)
        if plan.current is not None and version == plan.current.version and self._kept(plan.current):
            prune_roots(roots, {name: _generations_in(plan.chroot)})
            return HostResult(name, Status.UNCHANGED, plan.current.generation, plan.current.version)
        release_format = max(plan.release_format, formats.CLOSURE)
        return replace(plan, content=content, version=version, release_format=release_format)

    def _write(
        self,
        inventory: Inventory,
        plans: list[_Plan],
        results: dict[str, HostResult],
        report: Report,
        generations: dict[str, int],
        gate: Gate,
    ) -> None:
        """Write releases, then switch every `current` at once (those the rollout lets), then prune."""
        keys = load_keys(self.state)
        signer = keys.signer
        pool = Pool(self.state.objects, self._flusher)
        switches: list[tuple[_Plan, Manifest]] = []
        keep = self.keep or inventory.config.publish.keep
        # Creating, renaming and removing files is most of a publish that changes many hosts,
        # and it waits on the filesystem rather than on the interpreter: hosts are written a
        # few at a time (their chroots are separate directories; the pool takes a lock).
        shared = _shared(plans)
        with ThreadPoolExecutor(max_workers=_FILE_WORKERS, thread_name_prefix="write") as files:
            write = partial(
                _attempt, self._write_release, signer=signer, pool=pool, shared=shared, rev=report.source_rev
            )
            writes = files.map(write, plans)
            for index, (plan, outcome) in enumerate(zip(plans, writes, strict=True), 1):
                self._progress("writing", index, len(plans))
                name = plan.host.name
                if isinstance(outcome, Exception):
                    logger.bind(host=name).error("not published: {}", outcome)
                    message = f"writing the release failed: {outcome}"
                    results[name] = HostResult(name, Status.FAILED, message=message)
                    continue
                manifest, written = outcome
                results[name] = plan.result(objects_written=written)
                switches.append((plan, manifest))
                logger.bind(host=name).info("generation {} ({} objects written)", plan.generation, written)
            created = self._credentials(inventory, keys)
            if switches:
                # Every object and release is on disk before any `current` names it; then the
                # renames of `current` are made durable too.
                self._flusher.flush()
                releases = {plan.host.name: _current(plan, None) for plan, _ in switches}
                tags = {host.name: host.entry.tags for host in inventory.hosts}
                go = gate.admit(releases, tags, report.source_rev)
                list(
                    files.map(
                        partial(_switch, keys=keys.count), [s for s in switches if s[0].host.name in go]
                    )
                )
                report.released = [name for name in releases if name in go] + gate.given
                for plan, _ in switches:
                    generations[plan.host.name] = plan.generation
                    if plan.host.name not in go:
                        results[plan.host.name] = plan.result(gate.notes.get(plan.host.name, "held back"))
                self._flusher.flush()
                prune = partial(_prune, keep=keep, go=go)
                unlinked: set[str] = set().union(*files.map(prune, switches))
            elif self.rollout == "off":  # no new release, and still: what a rollout holds back goes now
                gate.admit({}, {}, report.source_rev)
                report.released = gate.given
        if switches:
            prune_roots(
                self.state.publisher / "roots",
                {plan.host.name: _generations_in(plan.chroot) for plan, _ in switches},
            )
            pool.prune(unlinked)
            generations_file = self.state.publisher / "generations.json"
            data = msgspec.json.encode(_Generations(generations))
            write_atomic(generations_file, data, mode=0o600, durable=False)
            self._flusher.wrote(generations_file)
        self._write_broker_users([host.name for host in inventory.hosts], created)
        self._write_authorized_keys(inventory)
        self._write_access(inventory)

    def _inputs(self, inventory: Inventory) -> tuple[object, ...]:
        """(substituter, the server's `<nixpkgs>`): besides its files, what a closure host's
        system depends on. A flake's inputs are in its flake.lock, in the release; a classic
        configuration built by the default command reads `<nixpkgs>`, so a channel update
        builds those hosts again. Looked up once per run, and only when such a host exists."""
        if self._channel_inputs is None:
            settings = inventory.config.publish
            classic = settings.system is None and any(
                host.entry.deliver is Deliver.CLOSURE and host.flake is None for host in inventory.hosts
            )
            self._channel_inputs = (settings.substituter, _channel() if classic else None)
        return self._channel_inputs

    def _kept(self, current: Current) -> bool:
        """Whether the host's release stays in its format (else it is released again in the new one)."""
        return self._format is None or current.format == self._format

    def _format_for(self, current: Current | None) -> int:
        """[publish] format, else the host's own (a newer one than this herald writes: the newest
        it does; a closure host's that is a source host again: the newest a source release
        needs), else, for a new host, that. Publisher._build raises it for a closure host."""
        if self._format is not None:
            return self._format
        return min(current.format, formats.SOURCE) if current is not None else formats.SOURCE

    def _credentials(self, inventory: Inventory, keys: Keys) -> dict[str, Secret]:
        """Every chroot's layout, publisher key, key statements and broker secret; the secrets
        created now. When the key or the statements changed, a format-2 `current` counts them."""
        distributed = self.state.publisher / "distributed.pub"  # the key and chain last placed everywhere
        key_changed = not distributed.exists() or distributed.read_text(encoding="ascii") != keys.mark
        created: dict[str, Secret] = {}
        accounts = host_accounts()
        chroots = os.fspath(self.state.chroots)
        for host in inventory.hosts:
            chroot = Chroot(f"{chroots}/{host.name}", self._flusher, accounts.get(host.name))
            chroot.ensure_layout(backups=host.entry.backups is not None)
            secret = chroot.ensure_credentials(keys.signer.public, key_changed=key_changed, chain=keys.chain)
            if key_changed:
                recount(chroot, keys.count)
            if secret is not None:
                created[host.name] = secret
        if key_changed:
            write_atomic(distributed, keys.mark.encode(), mode=0o600, durable=False)
            self._flusher.wrote(distributed)
        return created

    @staticmethod
    def _write_release(
        plan: _Plan, *, signer: Signer, pool: Pool, shared: set[str], rev: str | None
    ) -> tuple[Manifest, int]:
        """Objects and releases/<generation>/ of one host; not yet named by `current`."""
        chroot = plan.chroot
        chroot.ensure_layout()
        present = chroot.object_names()
        missing = [
            (source, entry)
            for source, entry in zip(plan.sources, plan.entries, strict=True)
            if entry.sha256 not in present
        ]
        private = {entry.sha256 for entry in plan.entries if not entry.mode & 0o004}
        # Content that turns private may be here already, stored for everyone to read (a link to
        # the pool) by a release that had it public: it is stored again, for this host only.
        # Content private in the previous release was made so then.
        was_private = (
            {file[3] for file in plan.previous[1] if not file[1] & 0o004} if plan.previous else set()
        )
        exposed = {
            entry.sha256: source
            for source, entry in zip(plan.sources, plan.entries, strict=True)
            if entry.sha256 in private and entry.sha256 in present and entry.sha256 not in was_private
        }
        written = sum(chroot.keep_private(source, sha256) for sha256, source in exposed.items())
        written += sum(
            chroot.write_object(
                source,
                entry.sha256,
                pool,
                private=entry.sha256 in private,
                shared=entry.sha256 in shared,
                present=present,
            )
            for source, entry in missing
        )
        written += sum(chroot.link_object(pool, sha256, present) for sha256 in _nars(plan.content))
        manifest = Manifest(
            format=plan.release_format,
            host=plan.host.name,
            generation=plan.generation,
            version=plan.version,
            published_at=now(),
            source_rev=rev,
            content=plan.content,
        )
        data = encode_manifest(manifest)
        chroot.write_release(manifest, data, signer.sign(data))
        return manifest, written

    def _write_authorized_keys(self, inventory: Inventory) -> None:
        """STATE/ssh/authorized_keys/<host>: the key each host logs in with; removed hosts lose theirs."""
        directory = self.state.authorized_keys_dir
        directory.mkdir(parents=True, exist_ok=True)
        wanted = {host.name: authorized_key_line(host) for host in inventory.hosts}
        index = self.state.publisher / "authorized_keys.msgpack"  # what the files held after the last run
        try:
            if msgspec.msgpack.decode(index.read_bytes(), type=dict[str, str]) == wanted:
                return
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            pass
        for entry in directory.iterdir():
            if entry.name not in wanted:
                entry.unlink()
        for name, line in wanted.items():
            path = directory / name
            if not path.exists() or path.read_text(encoding="utf-8") != line:
                write_atomic(path, line.encode(), mode=0o644, durable=False)
                self._flusher.wrote(path)
        write_atomic(index, msgspec.msgpack.encode(wanted), mode=0o600, durable=False)

    def _write_access(self, inventory: Inventory) -> None:
        """STATE/ssh/access.json: what each host may write through the embedded SFTP server."""
        table = {
            host.name: Access(
                areas={"logs": size_bytes(host.entry.logs)}
                | ({"backups": size_bytes(host.entry.backups)} if host.entry.backups else {})
            )
            for host in inventory.hosts
        }
        path = self.state.access
        data = msgspec.json.encode(table)
        if not path.exists() or path.read_bytes() != data:
            write_atomic(path, data, mode=0o644, durable=False)
            self._flusher.wrote(path)

    def _write_broker_users(self, hosts: list[str], created: dict[str, Secret]) -> None:
        """STATE/broker/passwd: one hash per host and per service user; removed hosts dropped.

        A secret is hashed when it is new or has no entry yet; the others keep their hash.
        """
        try:
            old = parse_passwd(self.state.passwd.read_text(encoding="utf-8"))
        except FileNotFoundError:
            old = {}
        users: dict[str, str] = {}
        for host in hosts:
            if host in created:
                users[host] = hash_secret(created[host])
            elif host in old:
                users[host] = old[host]
            else:
                users[host] = hash_secret(Chroot(self.state.chroot(host)).broker_secret())
        for user in SERVICE_USERS:
            path = self.state.service_secret(user)
            if not path.exists():
                secret = new_secret()
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(path, f"{secret.reveal()}\n".encode(), mode=0o600)
                users[user] = hash_secret(secret)
            else:
                users[user] = old.get(user) or hash_secret(read_secret(path))
        if users != old:
            write_atomic(self.state.passwd, format_passwd(users).encode(), mode=0o600)


def _built(
    plan: _Plan, settings: PublishSettings, checker: Checker, closures: Closures, roots: Path
) -> System | str:
    """The host's system, built, rooted in the server's store and pushed; else what failed."""
    name = plan.host.name
    template = settings.system or default_system_command(plan.host.flake)
    path, failure = checker.build_system(template, name, plan.host.flake, _files(plan))
    if failure is not None:
        return f"build failed: {failure}"
    try:
        system = closures.system(path, settings.substituter)
        add_root(roots, name, plan.generation, path, timeout=closures.timeout)
    except (HeraldError, OSError) as exc:
        return f"build failed: {exc}"
    if settings.push and (failure := checker.push(settings.push, name, path)) is not None:
        return f"push failed: {failure}"
    return system


def _remember(cache: HashCache, host: Host, key: bytes, version: str, sources: list[Source]) -> None:
    """Keep a source host's version for its key; a closure host's is known once its system is
    built (Publisher._build)."""
    if host.entry.deliver is Deliver.SOURCE:
        cache.remember(host.name, key, version, sources)


def _kind(host: Host, modes: object, inputs: tuple[object, ...]) -> tuple[object, ...]:
    """What besides its files a host's version depends on: for a closure host, how it is
    delivered and what its build reads from outside the release (Publisher._inputs) too; a
    source host's key stays what it was before closures existed."""
    kind: tuple[object, ...] = (host.entry.operation, host.flake, modes)
    if host.entry.deliver is Deliver.CLOSURE:
        kind += (Deliver.CLOSURE.value, *inputs[: 1 if host.flake is not None else 2])
    return kind


def _channel() -> str | None:
    """The store path `<nixpkgs>` resolves to on this server (a channel update changes it), or
    None without one."""
    try:
        done = subprocess.run(
            ["nix-instantiate", "--find-file", "nixpkgs"],  # noqa: S607 - nix from PATH
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return os.path.realpath(done.stdout.strip()) if done.returncode == 0 and done.stdout.strip() else None


def _say_behind(host: str, ahead: int, current: Current | None, *, behind: bool) -> None:
    if not behind:
        return
    logger.bind(host=host).warning(
        "reported generation {}, above this server's {}: released again above it",
        ahead,
        current.generation if current else 0,
    )


def _notes(plan: _Plan) -> None:
    """What to say about a host that changes (said when it changes, not on every run)."""
    log = logger.bind(host=plan.host.name)
    if plan.modes:
        log.info("modes: {}", ", ".join(plan.modes))
    if plan.host.flake is not None and os.path.lexists(f"{plan.host.directory}/configuration.nix"):
        log.warning(
            "has flake.nix and configuration.nix: the agent builds the flake (nixosConfigurations.{}); "
            "configuration.nix applies only if the flake imports it",
            plan.host.flake,
        )


def _listed(chroot: Chroot, generation: int) -> tuple[int, list[Listed], list[str]] | None:
    try:
        return generation, *chroot.listing(generation)
    except ReleaseError:
        return None  # diffed against nothing; pruning reads it again and says why it cannot


def _diff(
    old: list[Listed], new: list[FileEntry]
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(added, modified, removed) paths between two file lists."""
    before = {path: rest for path, *rest in old}
    after = {entry.path: [entry.mode, entry.size, entry.sha256] for entry in new}
    added = tuple(sorted(after.keys() - before.keys()))
    removed = tuple(sorted(before.keys() - after.keys()))
    modified = tuple(sorted(path for path in after.keys() & before.keys() if after[path] != before[path]))
    return added, modified, removed


def _mode_changes(old: list[Listed], entries: list[FileEntry]) -> tuple[str, ...]:
    """'path 0644 -> 0600' for each file of both releases whose mode differs."""
    before = {path: mode for path, mode, _, _ in old}
    return tuple(
        f"{entry.path} {before[entry.path]:04o} -> {entry.mode:04o}"
        for entry in entries
        if before.get(entry.path, entry.mode) != entry.mode
    )


def _shared(plans: list[_Plan]) -> set[str]:
    """Content more than one of these hosts releases: what goes through the pool."""
    seen: set[str] = set()
    shared: set[str] = set()
    for plan in plans:
        for sha256 in {entry.sha256 for entry in plan.entries}:
            (shared if sha256 in seen else seen).add(sha256)
    return shared


def _attempt(write: Callable[..., _T], plan: "_Plan", **kwargs: object) -> _T | HeraldError | OSError:
    """`write(plan, **kwargs)`, or the error that stopped it: one host's failure is its own."""
    try:
        return write(plan, **kwargs)
    except (HeraldError, OSError) as exc:
        return exc


def _current(plan: "_Plan", keys: int | None) -> Current:
    counted = keys if plan.release_format >= 2 else None  # a format-1 `current` is two words
    return Current(plan.generation, plan.version, plan.release_format, counted)


def _switch(item: tuple["_Plan", Manifest], *, keys: int) -> None:
    item[0].chroot.set_current(_current(item[0], keys))


def _prune(item: tuple["_Plan", Manifest], *, keep: int, go: set[str]) -> set[str]:
    plan, manifest = item
    held = () if plan.host.name in go else (plan.generation,)  # written, not yet named by `current`
    known = {
        manifest.generation: [entry.sha256 for entry in manifest.content.files] + _nars(manifest.content)
    }
    if plan.previous is not None:
        generation, files, nars = plan.previous
        known[generation] = [file[3] for file in files] + nars
    try:
        return plan.chroot.prune(keep, known, held)
    except (HeraldError, OSError) as exc:
        logger.bind(host=plan.host.name).warning("published; pruning old releases failed: {}", exc)
        return set()


def _generations_in(chroot: Chroot) -> set[int]:
    """The generations of the releases a chroot keeps."""
    try:
        return {int(name) for name in os.listdir(chroot.releases) if name.isdigit()}
    except FileNotFoundError:
        return set()


def _nars(content: Content) -> list[str]:
    """The objects of a content's system closure (none without one, or with a substituter)."""
    if content.system is msgspec.UNSET:
        return []
    return [entry.object for entry in content.system.closure if entry.object]


def _files(plan: _Plan) -> list[tuple[Source, str]]:
    return [(source, entry.sha256) for source, entry in zip(plan.sources, plan.entries, strict=True)]


def publish(
    fleet: Path,
    state: Path,
    *,
    dry_run: bool = False,
    progress: Progress | None = None,
    keep: int | None = None,
    allow_dirty: bool = False,
    rollout: RolloutPlan | Literal["off"] | None = None,
) -> Report:
    return Publisher(
        fleet, state, progress=progress, keep=keep, allow_dirty=allow_dirty, rollout=rollout
    ).run(dry_run=dry_run)
