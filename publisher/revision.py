"""What a publish reads: a fixed revision of the fleet repository, not a tree that moves under it.

When the fleet is a git work tree (`--fleet` holds `.git`), a publish, holding the publish lock,
reads the commit HEAD names at that moment from a tree of its own, STATE/publisher/tree, which
`git read-tree --reset -u` brings to that commit through a private index
(STATE/publisher/tree.index): only the files that differ between the two commits are written
(and the directories they leave empty removed), so every other file keeps its inode and mtime
and the hash cache (publisher.hashcache) still knows it; when the commit did not move, the
export is not touched at all. Nothing is written to the fleet repository (no worktree
registered, its index and HEAD untouched), and a `git reset --hard` there
(deploy/git/post-receive) cannot mix two commits into one release.

A work tree that differs from its commit (tracked files changed, or files git does not ignore
and does not track) is refused: what would be published is not what the admin sees. With
`allow_dirty` such a tree is published as it is, and the release's source is `<commit>-dirty`.
The check (`git status`) runs beside the planning, which reads the export, and is waited for
before anything is written.

Without `.git`, the directory is published as it is and has no source revision.
"""

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Final, Self

from loguru import logger

from protocol.errors import ConfigError
from protocol.files import write_atomic

DIRTY: Final = "-dirty"  # the suffix of a source revision read from a dirty work tree, as git describe
_TIMEOUT: Final = 300


def _env(**extra: str) -> dict[str, str]:
    """The environment for git: none of the caller's GIT_* (a hook runs with GIT_DIR set)."""
    return {key: value for key, value in os.environ.items() if not key.startswith("GIT_")} | extra


def _git(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    command = next(arg for arg in args if not arg.startswith("-"))
    try:
        done = subprocess.run(
            ["git", *args],  # noqa: S607 - git from PATH
            cwd=cwd,
            env=env or _env(),
            capture_output=True,
            text=True,
            timeout=_TIMEOUT,
            check=False,
            # The export's modes are git's (0644, 0755), whatever the publisher's umask: the
            # Nix files keep the checkout's mode in a release, and a umask must not change it.
            umask=0o022,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"{cwd}: git {command} failed: {exc}") from exc
    if done.returncode != 0:
        why = done.stderr.strip().splitlines()
        raise ConfigError(f"{cwd}: git {command}: {why[-1] if why else f'exit {done.returncode}'}")
    return done.stdout


def is_git(fleet: Path) -> bool:
    return (fleet / ".git").exists()


class Revision:
    """One publish run's view of the fleet. `root` is the directory to read; `rev` the source
    revision to name (None when the fleet is not a git work tree)."""

    def __init__(self, fleet: Path, publisher: Path | None, *, allow_dirty: bool = False) -> None:
        """`publisher` is STATE/publisher, where the export lives; None exports into a temporary
        directory (a dry run before the state directory exists)."""
        self.fleet = fleet.resolve()
        self._publisher = publisher
        self._allow_dirty = allow_dirty
        self._status: subprocess.Popen[str] | None = None
        self._temporary: tempfile.TemporaryDirectory[str] | None = None
        self.root = self.fleet
        self.rev: str | None = None
        self.dirty = False
        self._lines: list[str] | None = None  # git status' answer, once read

    def open(self) -> Self:
        """Fix the revision (call it holding the publish lock). With allow_dirty, a dirty tree
        is known now and read as it is; otherwise the export is read and `confirm` refuses a
        dirty tree later."""
        if not is_git(self.fleet):
            return self
        commit = _git("rev-parse", "--verify", "HEAD^{commit}", cwd=self.fleet).strip()
        self._status = subprocess.Popen(
            ["git", "status", "--porcelain", "--untracked-files=normal"],  # noqa: S607
            cwd=self.fleet,
            # No optional locks: a status refreshes the work tree's index when it may, and its
            # index.lock would make the hook's `git reset --hard` fail.
            env=_env(GIT_OPTIONAL_LOCKS="0"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        if self._allow_dirty:
            self.dirty = bool(self._changes())
            if self.dirty:
                self.rev = commit + DIRTY
                logger.warning("publishing the work tree of {} with its uncommitted changes", self.fleet)
                return self
        self.root = self._export(commit)
        self.rev = commit
        return self

    def confirm(self) -> None:
        """ConfigError if the work tree differs from its commit and that is not allowed. Call it
        before anything is written."""
        if self._status is None or self._allow_dirty:
            return
        changes = self._changes()
        if changes:
            shown = ", ".join(line[3:] for line in changes[:3]) + (" ..." if len(changes) > 3 else "")
            raise ConfigError(
                f"{self.fleet}: the work tree has changes not committed ({shown}); commit them, or "
                "publish them as they are with --allow-dirty (the release is marked dirty)"
            )

    def _changes(self) -> list[str]:
        assert self._status is not None  # noqa: S101 - set by open
        if self._lines is not None:
            return self._lines
        try:
            out, err = self._status.communicate(timeout=_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            self._status.kill()
            raise ConfigError(f"{self.fleet}: git status took more than {_TIMEOUT}s") from exc
        if self._status.returncode != 0:
            why = err.strip().splitlines()
            raise ConfigError(f"{self.fleet}: git status: {why[-1] if why else 'failed'}")
        self._lines = out.splitlines()
        return self._lines

    def _export(self, commit: str) -> Path:
        if self._publisher is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="herald-export-")
            where = Path(self._temporary.name)
        else:
            where = self._publisher.absolute()
        tree, index, named = where / "tree", where / "tree.index", where / "tree.rev"
        try:
            if named.read_text(encoding="ascii").strip() == commit and tree.is_dir():
                return tree
        except OSError:
            pass
        tree.mkdir(parents=True, exist_ok=True)
        git_dir = _git("rev-parse", "--absolute-git-dir", cwd=self.fleet).strip()
        # --reset: whatever a crash left half written is overwritten, not a merge conflict.
        _git(
            f"--git-dir={git_dir}",
            f"--work-tree={tree}",
            "read-tree",
            "--reset",
            "-u",
            commit,
            cwd=tree,
            env=_env(GIT_INDEX_FILE=str(index)),
        )
        write_atomic(named, f"{commit}\n".encode(), mode=0o600, durable=False)
        return tree

    def close(self) -> None:
        if self._status is not None and self._status.poll() is None:
            self._status.kill()
            self._status.wait()
        if self._temporary is not None:
            self._temporary.cleanup()

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(self, *_: object) -> None:
        self.close()
