"""The agent's records of what it did to the host: deployments, install records, the journal.

<state>/deployed.json       the last generation applied successfully (and the journal that did it)
<state>/previous.json       the one deployed before it (what a rollback returns to)
<state>/failed.json         the last generation that failed (not retried in a loop)
<state>/installed.json      what herald's files in the root are: the install record
<state>/journal.json        an install, restore or rollback in progress (written before the root
                            is touched; finished or undone at the next start)
<state>/displaced/<sha256>  what herald replaced at a path it installed (an admin's file or
                            link), listed in the journal before it is replaced, put back later
<state>/rebuild.pid         the rebuild command running for the journal's step (pid, start time)

client.store's Store is these records plus the fetched trees, the trusted keys and the commands.
"""

import hashlib
import os
import secrets
from enum import StrEnum
from pathlib import Path

import msgspec

from client import pause
from client.install import Displaced, InstallRecord
from client.system import Systems
from protocol.files import fsync_dir, write_atomic
from protocol.messages import Phase, Timestamp, Version
from protocol.settings import Operation


class Applied(msgspec.Struct, frozen=True, kw_only=True):
    generation: int
    version: Version
    at: Timestamp
    message: str = ""
    operation: Operation | None = None
    system: str | None = None  # the store path the operation left (for a rollback to return to)
    phase: Phase | None = None  # of a failed record: FAILED (None) or ROLLED_BACK
    journal: str = ""  # deployed: the id of the journal whose step recorded it
    attempts: int = 0  # failed: rebuilds of this generation that failed in a row (0: not a rebuild)


class Step(StrEnum):
    APPLY = "apply"  # installing a new generation and rebuilding: undone if interrupted
    RESTORE = "restore"  # returning to the generation before (failure, rollback): finished if interrupted


def journal_id() -> str:
    return secrets.token_hex(8)


class Journal(msgspec.Struct, frozen=True, kw_only=True):
    """The transition in progress, written (durably) before the root is touched."""

    step: Step
    generation: int  # the generation applied, failed or rolled back from
    version: Version
    operation: Operation
    before: InstallRecord  # the files when the step began
    target: InstallRecord  # the files the step installs
    id: str = ""  # unique per step; deployed.json names it once the step is recorded (APPLY)
    new_dirs: list[str] = []  # directories below the root the step may create
    system: str | None = None  # APPLY: the system before the rebuild; RESTORE: the one to return to
    systems: Systems | None = None  # APPLY: both system links before; RESTORE: the links to restore
    displaced: list[Displaced] = []  # what the step replaced that herald had not installed
    switch_back: bool = False  # RESTORE: the system is still to be returned to `system`
    switch_failed: str = ""  # RESTORE: the switch back was tried and failed: why
    outcome: Applied | None = None  # RESTORE: the record of the generation that failed
    rolled_back: bool = False  # RESTORE for the rollback command: `previous` becomes deployed


class Rebuilding(msgspec.Struct, frozen=True):
    """The rebuild (or rollback) command running for the journal's step."""

    pid: int
    started: int  # its start time in clock ticks after boot (/proc/PID/stat), against pid reuse


class Records:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.displaced = root / "displaced"
        self._root = str(root)
        self._records: dict[str, tuple[tuple[int, int, int], Applied]] = {}

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

    # ---------------------------------------------------------------- deployments

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

    def rolled_back(self, journal: str = "") -> None:
        """The previous deployment is the deployed one again (recorded by step `journal`)."""
        previous = self.previous()
        if previous is not None:
            record = msgspec.structs.replace(previous, journal=journal)
            write_atomic(self.root / "deployed.json", msgspec.json.encode(record), mode=0o600)
            (self.root / "previous.json").unlink(missing_ok=True)

    def set_failed(self, record: Applied) -> None:
        write_atomic(self.root / "failed.json", msgspec.json.encode(record), mode=0o600)

    def settle(
        self,
        installed: InstallRecord | None,
        *,
        deployed: Applied | None = None,
        keep: set[int] | None = None,
        rolled_back: str | None = None,
        failed: Applied | None = None,
    ) -> None:
        """End a step: its outcome's records first, then what the root holds, then the journal
        (a step interrupted in between is recognised by its outcome naming the journal).
        `rolled_back` is the id of the step that makes `previous` deployed again."""
        if deployed is not None:
            self.set_deployed(deployed)
            if keep is not None:
                self.prune(keep)
        if rolled_back is not None:
            self.rolled_back(rolled_back)
        if failed is not None:
            self.set_failed(failed)
        pause.at("settle")
        if installed is not None:
            self.set_installed(installed)
            self.prune_displaced({entry.sha256 for entry in installed.displaced})
        self.end()

    def prune(self, keep: set[int]) -> None:
        """Drop what is kept for generations other than `keep` (client.store: the trees)."""

    # ---------------------------------------------------------------- install records

    def installed_record(self, root: Path) -> InstallRecord | None:
        """What herald's files in `root` are; None when no record was ever written."""
        try:
            record = msgspec.json.decode((self.root / "installed.json").read_bytes(), type=InstallRecord)
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            return InstallRecord(generation=0, root=str(root))  # damaged: forget rather than guess
        return record if record.root == str(root) else InstallRecord(generation=0, root=str(root))

    def set_installed(self, record: InstallRecord) -> None:
        write_atomic(self.root / "installed.json", msgspec.json.encode(record), mode=0o600)

    # ---------------------------------------------------------------- what herald displaced

    def keep_displaced(self, entry: Displaced, data: bytes) -> None:
        """Keep what herald is about to replace, durably, by its sha256."""
        self.displaced.mkdir(mode=0o700, exist_ok=True)
        write_atomic(self.displaced / entry.sha256, data, mode=0o600)

    def displaced_content(self, entry: Displaced) -> bytes | None:
        try:
            data = (self.displaced / entry.sha256).read_bytes()
        except OSError:
            return None
        return data if hashlib.sha256(data).hexdigest() == entry.sha256 else None

    def prune_displaced(self, keep: set[str]) -> None:
        """Drop the kept copies no record names any more (a journal's are kept by its step)."""
        journal = self.journal()
        if journal is not None:
            keep = keep | {entry.sha256 for entry in journal.displaced}
        try:
            names = os.listdir(self.displaced)
        except FileNotFoundError:
            return
        for name in names:
            if name not in keep:
                (self.displaced / name).unlink(missing_ok=True)

    # ---------------------------------------------------------------- the journal

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
