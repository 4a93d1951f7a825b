"""deploy/git/post-receive: a push to the fleet repository publishes, recording the commit."""

import os
import subprocess
import sys
from pathlib import Path

from helpers import REPO, Fleet, current_generation, herald, need, read_release

from protocol.release import Current, decode_manifest

HOOK = REPO / "deploy" / "git" / "post-receive"


def git(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=Sysadmin", "-c", "user.email=admin@fleet.example", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout + done.stderr


def test_a_push_publishes_and_names_the_commit(fleet: Fleet, state: Path, tmp_path: Path):
    need("git")
    git("init", "-q", "-b", "main", cwd=fleet.root)
    git("add", "-A", cwd=fleet.root)
    git("commit", "-q", "-m", "fleet", cwd=fleet.root)
    bare = tmp_path / "fleet.git"
    git("clone", "-q", "--bare", str(fleet.root), str(bare), cwd=tmp_path)
    worktree = tmp_path / "worktree"
    git("clone", "-q", str(bare), str(worktree), cwd=tmp_path)
    (bare / "hooks" / "post-receive").write_bytes(HOOK.read_bytes())
    (bare / "hooks" / "post-receive").chmod(0o755)

    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "HERALD_FLEET": str(worktree),
        "HERALD_STATE": str(state),
        "HERALD_BROKER": "",
    }
    # The server's state exists before the hook runs: a hook never starts a new one.
    started = herald("publish", "--fleet", str(worktree), "--state", str(state), "--init")
    assert started.returncode == 0, started.stderr
    (fleet.root / "hosts" / "beta" / "files" / "etc" / "motd").write_text("pushed\n")
    git("commit", "-q", "-am", "beta: a new motd", cwd=fleet.root)
    commit = git("rev-parse", "HEAD", cwd=fleet.root).strip()
    output = git("push", "-q", str(bare), "main", cwd=fleet.root, env=env)

    assert f"herald: publishing {commit[:7]}" in output
    assert [current_generation(state, host) for host in fleet.hosts] == [1, 2, 1]
    chroot = state / "chroot" / "beta"
    current = Current.decode((chroot / "current").read_bytes())
    manifest = decode_manifest(read_release(state, "beta", 2)[0], host="beta", current=current)
    assert manifest.source_rev == commit
    assert (worktree / "hosts" / "beta" / "files" / "etc" / "motd").read_text() == "pushed\n"
