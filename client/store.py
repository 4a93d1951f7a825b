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
<state>/displaced/<sha256>            what herald replaced that it had not installed, to put back
                                      (these records and the journal: client.records)
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
from pathlib import Path
from typing import Final

import msgspec

from client.install import InstallRecord, empty, record_of
from client.records import Records
from protocol.errors import StorageError
from protocol.files import write_atomic
from protocol.keychain import Trust
from protocol.release import LOG_NAME, Manifest

_KEEP_COMMANDS: Final = 200


class _Commands(msgspec.Struct):
    done: list[str] = []


class Store(Records):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.trees = root / "trees"
        self.logs = root / "logs"

    def prepare(self) -> None:
        for directory in (self.root, self.trees, self.logs):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def installed(self, root: Path) -> InstallRecord:
        """What herald's files in `root` are. An agent that kept no record yet (an earlier
        version) installed all of its deployed generation's files/: that is the record."""
        record = self.installed_record(root)
        if record is not None:
            return record
        deployed = self.deployed()
        manifest = self.manifest(deployed.generation) if deployed is not None else None
        return record_of(manifest, root) if manifest is not None else empty(root)

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
