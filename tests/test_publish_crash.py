"""Crash safety: publish killed with SIGKILL at random moments never leaves a half release served."""

import fcntl
import hashlib
import os
import random
import signal
import subprocess
import time
from pathlib import Path

from helpers import HERALD, read_release, wait_until

from bench.fleetgen import host_name, make_fleet
from protocol.release import Current, decode_manifest, decode_public_key, verify_signature

HOSTS = 30
RUNS = 30


def verify(state: Path, host: str) -> int:
    """The generation `current` names, after checking every file of that release. 0 if none yet."""
    chroot = state / "chroot" / host
    try:
        current = Current.decode((chroot / "current").read_bytes())
    except FileNotFoundError:
        return 0
    data, signature = read_release(state, host, current.generation)
    verify_signature(
        data, signature, decode_public_key((chroot / "credentials" / "publisher.pub").read_text())
    )
    manifest = decode_manifest(data, host=host, current=current)
    for entry in manifest.content.files:
        content = (chroot / "objects" / entry.sha256).read_bytes()
        assert (len(content), hashlib.sha256(content).hexdigest()) == (entry.size, entry.sha256), entry.path
    return current.generation


def publish(fleet: Path, state: Path) -> subprocess.Popen[bytes]:
    argv = [*HERALD, "publish", "--fleet", str(fleet), "--state", str(state), "--init"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_publish_killed_at_any_moment_leaves_complete_releases_and_the_next_run_finishes(tmp_path: Path):
    fleet, state = tmp_path / "fleet", tmp_path / "state"
    hosts = make_fleet(fleet, HOSTS)
    # No parse check: the runs are spent writing, where a kill can do harm.
    (fleet / "fleet.toml").write_text("[publish]\ncheck = []\n\n" + (fleet / "fleet.toml").read_text())
    shared = fleet / "common" / "module03.nix"
    started = time.monotonic()
    assert publish(fleet, state).wait(120) == 0
    duration = time.monotonic() - started
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    killed_mid_run = 0
    for run in range(RUNS):
        shared.write_text(f"{{ ... }}: {{ run = {run}; }}\n")  # every host changes
        (fleet / "hosts" / hosts[run % HOSTS] / f"extra{run}.nix").write_text("{ }\n")
        proc = publish(fleet, state)
        time.sleep(rng.uniform(0, duration))
        if proc.poll() is None:
            killed_mid_run += 1
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
        for host in hosts:
            verify(state, host)
    assert killed_mid_run >= RUNS // 3, f"only {killed_mid_run} of {RUNS} runs were killed before finishing"

    assert publish(fleet, state).wait(120) == 0
    expected = shared.read_bytes()
    for host in hosts:
        assert verify(state, host) >= 2
        chroot = state / "chroot" / host
        current = Current.decode((chroot / "current").read_bytes())
        manifest = decode_manifest(
            read_release(state, host, current.generation)[0], host=host, current=current
        )
        entry = next(e for e in manifest.content.files if e.path == "common/module03.nix")
        assert (chroot / "objects" / entry.sha256).read_bytes() == expected
        assert not any(p.name.startswith(".tmp-") for p in (chroot / "releases").iterdir())


def test_two_publishes_at_once_are_serialised(tmp_path: Path):
    fleet, state = tmp_path / "fleet", tmp_path / "state"
    make_fleet(fleet, 10)
    (state / "publisher").mkdir(parents=True)
    lock = os.open(state / "publisher" / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as if another publish were running
    proc = subprocess.Popen(
        [*HERALD, "publish", "--fleet", str(fleet), "--state", str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: (state / "publisher").exists() and proc.poll() is None, "second publish waiting")
        time.sleep(1.0)  # it must still be waiting: nothing written while the lock is held
        assert proc.poll() is None
        assert not (state / "chroot").exists()
    finally:
        os.close(lock)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "another publish is running" in err
    assert verify(state, host_name(0)) == 1
