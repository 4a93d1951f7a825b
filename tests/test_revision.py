"""A publish reads a fixed revision of a git fleet: the commit HEAD names, never a work tree that
a hook's `git reset --hard` is rewriting; a dirty work tree only with --allow-dirty, marked."""

import json
import subprocess
import threading
import time
from pathlib import Path

from helpers import Fleet, herald, need, read_release, start_serve

from protocol.errors import ConfigError
from protocol.release import Current, decode_manifest
from publisher.hashcache import sha256_file
from publisher.inventory import load_inventory
from publisher.materialise import materialise
from publisher.publish import Status, publish

GIT = ["git", "-c", "user.name=Sysadmin", "-c", "user.email=admin@fleet.example"]


def git(*args: str, cwd: Path) -> str:
    done = subprocess.run([*GIT, *args], cwd=cwd, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def commit_all(root: Path, message: str) -> str:
    git("add", "-A", cwd=root)
    git("commit", "-q", "-m", message, cwd=root)
    return git("rev-parse", "HEAD", cwd=root)


def expected_contents(root: Path, commit: str, where: Path) -> dict[str, dict[str, str]]:
    """host -> {path: sha256} of what `commit` holds, read from git itself (git archive)."""
    where.mkdir()
    archive = subprocess.run(["git", "archive", commit], cwd=root, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
    inventory = load_inventory(where)
    return {
        host.name: {
            s.path: sha256_file(s.real) for s in materialise(inventory.root, host.name, host.directory)
        }
        for host in inventory.hosts
    }


def released(state: Path, host: str, generation: int) -> tuple[str | None, dict[str, str]]:
    """(source_rev, {path: sha256}) of a host's release."""
    data, _ = read_release(state, host, generation)
    current = Current(generation, json.loads(data)["version"])
    manifest = decode_manifest(data, host=host, current=current)
    return manifest.source_rev, {entry.path: entry.sha256 for entry in manifest.content.files}


def two_commits(fleet: Fleet) -> tuple[str, str]:
    """Commits A and B of the fleet that differ in many files of every host (a reset between
    them rewrites all of those, one after another)."""
    need("git")
    git("init", "-q", "-b", "main", cwd=fleet.root)
    for host in fleet.hosts:
        for index in range(40):
            fleet.edit(host, f"files/etc/part{index:02d}", f"A {host} {index}\n" * 200)
    first = commit_all(fleet.root, "A")
    for host in fleet.hosts:
        for index in range(40):
            fleet.edit(host, f"files/etc/part{index:02d}", f"B {host} {index}\n" * 200)
    second = commit_all(fleet.root, "B")
    return first, second


def test_a_publish_during_a_hooks_reset_hard_never_mixes_two_commits(
    fleet: Fleet, state: Path, tmp_path: Path
):
    """The old hook's `git reset --hard` (no lock) runs in a loop in the work tree while the
    publisher publishes in a loop, at least 50 times: every release written holds exactly the
    files of the commit it names. A publish that meets the work tree half reset is refused as
    dirty (nothing written), which is allowed; none may publish a mix."""
    first, second = two_commits(fleet)
    expected = {
        first: expected_contents(fleet.root, first, tmp_path / "a"),
        second: expected_contents(fleet.root, second, tmp_path / "b"),
    }
    assert publish(fleet.root, state, dry_run=False).of(Status.FAILED) == []  # --init's part
    stop = threading.Event()
    resets = 0

    def hook() -> None:
        nonlocal resets
        while not stop.is_set():
            for commit in (first, second):
                subprocess.run(["git", "reset", "-q", "--hard", commit], cwd=fleet.root, check=True)
                resets += 1

    thread = threading.Thread(target=hook, name="hook")
    thread.start()
    published = refused = 0
    refusals: list[str] = []
    deadline = time.monotonic() + 120
    try:
        while published + refused < 50 or published < 5:
            assert time.monotonic() < deadline, f"{published} published, {refused} refused in 120s"
            try:
                report = publish(fleet.root, state)
            except ConfigError as exc:
                refusals.append(str(exc))
                refused += 1
                continue
            published += 1
            assert report.of(Status.FAILED) == [], report.of(Status.FAILED)
    finally:
        stop.set()
        thread.join(60)
    assert resets >= 50
    assert all("changes not committed" in refusal for refusal in refusals), refusals
    checked = 0
    for host in fleet.hosts:
        for release in (state / "chroot" / host / "releases").iterdir():
            rev, files = released(state, host, int(release.name))
            assert rev in expected, rev
            assert files == expected[rev][host], f"{host} generation {release.name} is not {rev}"
            checked += 1
    assert checked >= len(fleet.hosts) * 2


def as_git_checks_out(root: Path) -> None:
    """The work tree's modes as a checkout makes them (0644, 0755), whatever made it: the files
    outside files/ keep their mode in a release, so that a publish of the work tree as it is
    differs from one of its commit only where its content does."""
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and ".git" not in path.parts:
            path.chmod(0o755 if path.stat().st_mode & 0o100 else 0o644)


def test_a_dirty_work_tree_is_published_only_when_allowed_and_then_marked(
    fleet: Fleet, state: Path, logs: Path
):
    need("git")
    as_git_checks_out(fleet.root)
    git("init", "-q", "-b", "main", cwd=fleet.root)
    commit = commit_all(fleet.root, "fleet")
    serve = start_serve(fleet, state, logs)
    try:
        fleet.edit("alpha", "files/etc/motd", "not committed\n")
        args = ("publish", "--fleet", str(fleet.root), "--state", str(state), "--broker", serve.mqtt)
        refused = herald(*args)
        assert refused.returncode == 2
        (line,) = refused.stderr.strip().splitlines()
        assert "the work tree has changes not committed (hosts/alpha/files/etc/motd)" in line
        assert "--allow-dirty" in line
        assert (state / "chroot" / "alpha" / "current").read_text().split()[0] == "1"

        allowed = herald(*args, "--allow-dirty")
        assert allowed.returncode == 0, allowed.stderr
        rev, files = released(state, "alpha", 2)
        assert rev == f"{commit}-dirty"
        assert "files/etc/motd" in files
        status = herald("status", "--broker", serve.mqtt, "--state", str(state))
        (row,) = [line for line in status.stdout.splitlines() if line.startswith("alpha")]
        assert "2 (dirty)" in row
        (row,) = [line for line in status.stdout.splitlines() if line.startswith("beta")]
        assert "dirty" not in row
    finally:
        serve.stop()


def test_a_no_change_publish_of_a_git_fleet_reads_no_file_and_a_commit_rewrites_only_its_files(
    fleet: Fleet, state: Path
):
    """The export is kept under the state directory and moved from commit to commit: files a
    commit did not change keep their inode and mtime, so the hash cache still knows them."""
    need("git")
    git("init", "-q", "-b", "main", cwd=fleet.root)
    first = commit_all(fleet.root, "fleet")
    assert publish(fleet.root, state).source_rev == first
    time.sleep(2.2)  # the hash cache trusts a file only once its mtime is 2 s old (publisher.hashcache)
    publish(fleet.root, state)
    again = publish(fleet.root, state)
    assert again.files_hashed == 0
    assert again.of(Status.CHANGED) == []

    tree = state / "publisher" / "tree"
    kept = tree / "hosts" / "beta" / "configuration.nix"
    before = kept.stat()
    fleet.edit("alpha", "files/etc/motd", "committed\n")
    second = commit_all(fleet.root, "alpha: motd")
    report = publish(fleet.root, state)
    assert report.source_rev == second
    assert [result.host for result in report.of(Status.CHANGED)] == ["alpha"]
    assert report.files_hashed == 1
    after = kept.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert git("status", "--porcelain", cwd=fleet.root) == ""  # nothing written to the fleet's repo
