"""The agent's state directory: fetched trees, what is deployed, what failed.

<state>/trees/<generation>/           a verified release tree, never changed once renamed in
<state>/trees/<generation>.manifest   its MANIFEST (the index of what the agent already has)
<state>/release -> trees/<generation> the tree the last rebuild ran against
<state>/deployed.json                 the last generation applied successfully
<state>/previous.json                 the one deployed before it (what a rollback returns to)
<state>/failed.json                   the last generation that failed (not retried in a loop)
<state>/installed.json                what herald's files in the root are: the install record
<state>/journal.json                  an install, restore or rollback in progress (written before
                                      the root is touched; finished or undone at the next start)
<state>/rebuild.pid                   the rebuild command running for it (pid and start time)
<state>/commands.json                 ids of commands already executed
<state>/trust.json                    the publisher keys trusted, each with where it came from
                                      (agent.toml, first use, a key statement), the keys retired,
                                      and how far the key statements were followed
<state>/publisher.pub                 the publisher key pinned on first use by herald 0.1: the
                                      root of trust.json when that is made
<state>/broker.secret                 the broker secret read from the server (0600)
<state>/logs/                         one log per run, uploaded to the server's logs/
"""

import os
import shutil
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Final

import msgspec

from client.install import InstallRecord, empty, record_of
from protocol.errors import StorageError
from protocol.files import fsync_dir, write_atomic
from protocol.keychain import Trust
from protocol.messages import Phase, Timestamp, Version
from protocol.release import LOG_NAME, Manifest
from protocol.settings import Operation

_KEEP_COMMANDS: Final = 200


class Applied(msgspec.Struct, frozen=True, kw_only=True):
    generation: int
    version: Version
    at: Timestamp
    message: str = ""
    operation: Operation | None = None
    system: str | None = None  # the store path the operation left (for a rollback to return to)
    phase: Phase | None = None  # of a failed record: FAILED (None) or ROLLED_BACK


class Step(StrEnum):
    APPLY = "apply"  # installing a new generation and rebuilding: undone if interrupted
    RESTORE = "restore"  # returning to the generation before (failure, rollback): finished if interrupted


class Journal(msgspec.Struct, frozen=True, kw_only=True):
    """The transition in progress, written (durably) before the root is touched."""

    step: Step
    generation: int  # the generation applied, failed or rolled back from
    version: Version
    operation: Operation
    before: InstallRecord  # the files when the step began
    target: InstallRecord  # the files the step installs
    new_dirs: list[str] = []  # directories below the root the step may create
    system: str | None = None  # APPLY: the system before the rebuild; RESTORE: the one to return to
    switch_back: bool = False  # RESTORE: the system is still to be returned to `system`
    outcome: Applied | None = None  # RESTORE: the record of the generation that failed
    rolled_back: bool = False  # RESTORE for the rollback command: `previous` becomes deployed


class Rebuilding(msgspec.Struct, frozen=True):
    """The rebuild (or rollback) command running for the journal's step."""

    pid: int
    started: int  # its start time in clock ticks after boot (/proc/PID/stat), against pid reuse


class _Commands(msgspec.Struct):
    done: list[str] = []


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.trees = root / "trees"
        self.logs = root / "logs"
        self._root = str(root)
        self._records: dict[str, tuple[tuple[int, int, int], Applied]] = {}

    def prepare(self) -> None:
        for directory in (self.root, self.trees, self.logs):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    # ---------------------------------------------------------------- records

    def _read(self, name: str, kind: type[Applied]) -> Applied | None:
        """The record in `name`, decoded again only when the file was replaced (every state
        report asks for `deployed`; records are only ever replaced whole, under a new inode)."""
        path = os.path.join(self._root, name)  # noqa: PTH118 - hot path
        try:
            info = os.stat(path)  # noqa: PTH116 - hot path
            seen = (info.st_ino, info.st_mtime_ns, info.st_size)
            cached = self._records.get(name)
            if cached is not None and cached[0] == seen:
                return cached[1]
            with open(path, "rb") as stream:  # noqa: PTH123 - hot path
                record = msgspec.json.decode(stream.read(), type=kind)
        except FileNotFoundError:
            return None
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None  # a damaged record is treated as absent: the next check repairs it
        self._records[name] = (seen, record)
        return record

    def deployed(self) -> Applied | None:
        return self._read("deployed.json", Applied)

    def failed(self) -> Applied | None:
        return self._read("failed.json", Applied)

    def previous(self) -> Applied | None:
        return self._read("previous.json", Applied)

    def set_deployed(self, record: Applied) -> None:
        """Record a new deployment; the one it replaces becomes `previous`."""
        old = self.deployed()
        if old is not None and old.generation != record.generation:
            write_atomic(self.root / "previous.json", msgspec.json.encode(old), mode=0o600)
        write_atomic(self.root / "deployed.json", msgspec.json.encode(record), mode=0o600)
        (self.root / "failed.json").unlink(missing_ok=True)

    def rolled_back(self) -> None:
        """The previous deployment is the deployed one again."""
        previous = self.previous()
        if previous is not None:
            write_atomic(self.root / "deployed.json", msgspec.json.encode(previous), mode=0o600)
            (self.root / "previous.json").unlink(missing_ok=True)

    def set_failed(self, record: Applied) -> None:
        write_atomic(self.root / "failed.json", msgspec.json.encode(record), mode=0o600)

    def settle(
        self,
        installed: InstallRecord | None,
        *,
        deployed: Applied | None = None,
        keep: set[int] | None = None,
        rolled_back: bool = False,
        failed: Applied | None = None,
    ) -> None:
        """End a step: its outcome's records first, then what the root holds, then the journal
        (a step interrupted in between is recognised by its outcome being recorded)."""
        if deployed is not None:
            self.set_deployed(deployed)
            if keep is not None:
                self.prune(keep)
        if rolled_back:
            self.rolled_back()
        if failed is not None:
            self.set_failed(failed)
        if installed is not None:
            self.set_installed(installed)
        self.end()

    # ---------------------------------------------------------------- install records

    def installed(self, root: Path) -> InstallRecord:
        """What herald's files in `root` are. An agent that kept no record yet (an earlier
        version) installed all of its deployed generation's files/: that is the record."""
        try:
            record = msgspec.json.decode((self.root / "installed.json").read_bytes(), type=InstallRecord)
        except FileNotFoundError:
            deployed = self.deployed()
            manifest = self.manifest(deployed.generation) if deployed is not None else None
            return record_of(manifest, root) if manifest is not None else empty(root)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            return empty(root)  # damaged: herald forgets its files rather than remove one it guessed
        return record if record.root == str(root) else empty(root)

    def set_installed(self, record: InstallRecord) -> None:
        write_atomic(self.root / "installed.json", msgspec.json.encode(record), mode=0o600)

    def journal(self) -> Journal | None:
        try:
            return msgspec.json.decode((self.root / "journal.json").read_bytes(), type=Journal)
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            return None  # torn before it was complete: nothing was touched yet

    def begin(self, journal: Journal) -> None:
        """Record the step durably before anything of it happens."""
        write_atomic(self.root / "journal.json", msgspec.json.encode(journal), mode=0o600)

    def end(self) -> None:
        (self.root / "rebuild.pid").unlink(missing_ok=True)
        try:
            (self.root / "journal.json").unlink()
        except FileNotFoundError:
            return
        fsync_dir(self.root)

    def rebuilding(self) -> Rebuilding | None:
        try:
            return msgspec.json.decode((self.root / "rebuild.pid").read_bytes(), type=Rebuilding)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            return None

    def set_rebuilding(self, running: Rebuilding | None) -> None:
        """Not fsynced: after a power loss the command is gone anyway."""
        if running is None:
            (self.root / "rebuild.pid").unlink(missing_ok=True)
        else:
            write_atomic(self.root / "rebuild.pid", msgspec.json.encode(running), mode=0o600, durable=False)

    # ---------------------------------------------------------------- publisher keys

    def trust(self) -> Trust | None:
        """The publisher keys this agent trusts; None before the first is pinned. A damaged file
        is an error, not an absence: forgetting it would pin a key on first use again."""
        try:
            return msgspec.json.decode((self.root / "trust.json").read_bytes(), type=Trust)
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            path = self.root / "trust.json"
            raise StorageError(f"{path}: unreadable ({exc}); restore or remove it") from exc

    def set_trust(self, trust: Trust) -> None:
        write_atomic(self.root / "trust.json", msgspec.json.encode(trust), mode=0o600)

    # ---------------------------------------------------------------- commands

    def command_done(self, command_id: str) -> bool:
        return command_id in self._commands().done

    def mark_command(self, command_id: str) -> None:
        done = self._commands().done
        done.append(command_id)
        write_atomic(
            self.root / "commands.json", msgspec.json.encode(_Commands(done[-_KEEP_COMMANDS:])), mode=0o600
        )

    def _commands(self) -> _Commands:
        try:
            return msgspec.json.decode((self.root / "commands.json").read_bytes(), type=_Commands)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            return _Commands()

    # ---------------------------------------------------------------- trees

    def tree(self, generation: int) -> Path:
        return self.trees / str(generation)

    def manifest(self, generation: int) -> Manifest | None:
        try:
            return msgspec.json.decode((self.trees / f"{generation}.manifest").read_bytes(), type=Manifest)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            return None

    def staging(self, generation: int) -> Path:
        path = self.trees / f".staging-{generation}-{os.getpid()}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(mode=0o700)
        return path

    def commit_tree(self, staging: Path, manifest: Manifest, data: bytes) -> Path:
        """Rename a complete, verified staging dir into place as trees/<generation>."""
        final = self.tree(manifest.generation)
        # Not fsynced, like the tree's files: after a crash a lost or damaged index only means
        # fetching again (an unreadable one counts as absent; a reused file is hashed first).
        write_atomic(self.trees / f"{manifest.generation}.manifest", data, mode=0o600, durable=False)
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        return final

    def point_release(self, generation: int) -> None:
        """release -> trees/<generation>, swapped atomically."""
        link = self.root / "release"
        tmp = self.root / f".release.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(Path("trees") / str(generation))
        tmp.replace(link)

    def prune(self, keep: set[int]) -> None:
        """Drop trees other than `keep`, and staging dirs left by a crash."""
        for entry in self.trees.iterdir():
            stem = entry.name.removesuffix(".manifest")
            if entry.name.startswith(".staging-") or (stem.isdigit() and int(stem) not in keep):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)


class Run(msgspec.Struct, frozen=True):
    """One run, from its log's name."""

    at: datetime
    generation: int
    result: str  # applied, failed, rolled-back
    log: str


_LOG_RE: Final = LOG_NAME


def runs(logs: Path, limit: int) -> list[Run]:
    """The last `limit` finished runs, newest first."""
    try:
        names = sorted((entry.name for entry in logs.iterdir()), reverse=True)
    except OSError:
        return []
    found = []
    for name in names:
        if (match := _LOG_RE.fullmatch(name)) is not None:
            at = datetime.strptime(match[1], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
            found.append(Run(at, int(match[2]), match[3], name))
            if len(found) == limit:
                break
    return found


def read_log(logs: Path, name: str, limit: int = 1 << 20) -> str | None:
    """The text of the finished run's log `name` (its last `limit` bytes), or None."""
    if _LOG_RE.fullmatch(name) is None:
        return None
    try:
        with (logs / name).open("rb") as stream:
            stream.seek(max(0, (logs / name).stat().st_size - limit))
            return stream.read().decode("utf-8", "replace")
    except OSError:
        return None


def log_name(at: datetime, generation: int, result: str) -> str:
    """A log file name that sorts by time: 20261125T221500Z-g3-applied.log."""
    return f"{at.strftime('%Y%m%dT%H%M%SZ')}-g{generation}-{result}.log"
