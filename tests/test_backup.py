"""`herald state backup` and `herald state restore`: the server comes back from an older backup
and generations never go backwards: every host applies the next one."""

import os
import re
import shutil
import signal
import tarfile
from pathlib import Path

from helpers import Fleet, Serve, Watcher, herald, make_agent, start_serve, wait_until

from protocol.messages import Phase


def at(watcher: Watcher, hosts: list[str], generation: int, timeout: float = 60) -> None:
    for host in hosts:
        watcher.wait_state(
            host,
            lambda s: s.phase is Phase.IDLE and s.deployed_generation == generation,
            f"deployed {generation}",
            timeout,
        )


def publish_everywhere(fleet: Fleet, serve: Serve, text: str) -> None:
    """A change of common/, which every host releases, published by `serve` (SIGHUP)."""
    (fleet.root / "common" / "backup-test.nix").write_text(f"{{ ... }}: {{ }} # {text}\n")
    os.kill(serve.proc.pid, signal.SIGHUP)


def same_ports(fleet: Fleet, state: Path, logs: Path, serve: Serve) -> Serve:
    """`herald serve` again where the agents know it: the same MQTT and SFTP ports."""
    mqtt = serve.mqtt.removeprefix("mqtt://")
    return start_serve(fleet, state, logs, mqtt=mqtt, sftp=f"127.0.0.1:{serve.sftp_port}")


def run_fleet_to_three(fleet: Fleet, state: Path, logs: Path, tmp_path: Path, backup: Path):
    """Serve and agents at generation 1, backed up; then two publishes: every host at 3."""
    serve = start_serve(fleet, state, logs)
    watcher = Watcher(serve.mqtt, state)
    agents = {host: make_agent(fleet, host, serve, tmp_path).start() for host in fleet.hosts}
    at(watcher, fleet.hosts, 1)
    done = herald("state", "backup", "--state", str(state), str(backup))
    assert done.returncode == 0, done.stderr
    assert (backup.stat().st_mode & 0o777) == 0o600
    publish_everywhere(fleet, serve, "two")
    at(watcher, fleet.hosts, 2)
    publish_everywhere(fleet, serve, "three")
    at(watcher, fleet.hosts, 3)
    return serve, watcher, agents


def test_an_older_backup_restored_over_the_state_gives_every_host_a_newer_generation(
    fleet: Fleet, state: Path, logs: Path, tmp_path: Path
):
    """Restored over the state it replaces: the hosts' logs there (`...-g3-applied.log`) say
    they ran 3, so the first publish after the restore is 4 for every host."""
    backup = tmp_path / "state.tar.gz"
    serve, watcher, agents = run_fleet_to_three(fleet, state, logs, tmp_path, backup)
    try:
        serve.stop()
        refused = herald("state", "restore", str(backup), "--state", str(state))
        assert refused.returncode == 2
        assert "pass --force" in refused.stderr
        restored = herald("state", "restore", str(backup), "--state", str(state), "--force")
        assert restored.returncode == 0, restored.stderr
        assert "new generations start above: alpha 3, beta 3, gamma 3" in restored.stdout
        assert [int((state / "chroot" / h / "current").read_text().split()[0]) for h in fleet.hosts] == [
            1
        ] * 3
        serve = same_ports(fleet, state, logs, serve)
        at(watcher, fleet.hosts, 4)
        for agent in agents.values():
            assert agent.deployed() == 4
    finally:
        for agent in agents.values():
            agent.stop()
        watcher.close()
        serve.stop()


def test_a_state_lost_with_its_disk_comes_back_and_the_hosts_reports_lift_its_generations(
    fleet: Fleet, state: Path, logs: Path, tmp_path: Path
):
    """The disk died: the backup is restored into an empty directory, with no log newer than it
    and the embedded broker gone with the process. The hosts refuse what the restored server
    offers (older than what they run) and say which generation they run; serve releases every
    host again above it, and every host applies that."""
    backup = tmp_path / "state.tar"
    serve, watcher, agents = run_fleet_to_three(fleet, state, logs, tmp_path, backup)
    try:
        serve.stop()
        shutil.rmtree(state)
        restored = herald("state", "restore", str(backup), "--state", str(state))
        assert restored.returncode == 0, restored.stderr
        serve = same_ports(fleet, state, logs, serve)
        at(watcher, fleet.hosts, 4)
        for host, agent in agents.items():
            assert agent.deployed() == 4, host
            applied = agent.rebuilds()
            assert len(applied) == 4, host  # 1, 2, 3, 4: nothing older applied again
    finally:
        for agent in agents.values():
            agent.stop()
        watcher.close()
        serve.stop()


def test_a_backup_is_its_owners_only_and_holds_no_link_a_host_planted(
    fleet: Fleet, state: Path, tmp_path: Path
):
    """A host writes its logs/ (with OpenSSH it can make links there): a backup, which root
    makes and may restore into that chroot, holds only the regular files it finds there, never
    what a link names."""
    assert herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--init").returncode == 0
    logs = state / "chroot" / "alpha" / "logs"
    (logs / "20260101T000000Z-g1-applied.log").write_text("a log\n")
    secret = tmp_path / "not-the-hosts"
    secret.write_text("root's secret\n")
    (logs / "planted-symlink.log").symlink_to(secret)
    os.link(secret, logs / "planted-hardlink.log")
    os.mkfifo(logs / "planted-fifo.log")
    backup = tmp_path / "state.tar"
    done = herald("state", "backup", "--state", str(state), str(backup))
    assert done.returncode == 0, done.stderr
    assert (backup.stat().st_mode & 0o777) == 0o600
    with tarfile.open(backup) as archive:
        names = archive.getnames()
        assert "chroot/alpha/logs/20260101T000000Z-g1-applied.log" in names
        assert not [name for name in names if "planted" in name]
        assert "publisher/private/signing.key" in names
        assert "sftp/ssh_host_ed25519_key" in names or not (state / "sftp").exists()
        assert not [name for name in names if name.startswith(("publisher/tree", "publisher/hashes"))]
        for member in archive.getmembers():
            if member.isfile():
                data = archive.extractfile(member)
                assert data is not None
                assert b"root's secret" not in data.read()


def test_a_host_that_sees_a_release_before_its_announcement_is_not_taken_for_one_ahead(
    fleet: Fleet, state: Path, logs: Path, tmp_path: Path
):
    """`herald publish` (its own unit, or a publish that has not announced yet) writes `current`
    before serve's broker hears of it: a host whose timer finds it first reports the new
    generation. That is the one served, not a generation above it (as after a restore): serve
    must not release the host again above it, a new generation and a rebuild for no change."""
    serve = start_serve(fleet, state, logs)
    watcher = Watcher(serve.mqtt, state)
    alpha = make_agent(fleet, "alpha", serve, tmp_path, poll="2s").start()
    try:
        at(watcher, ["alpha"], 1)
        (fleet.root / "common" / "unannounced.nix").write_text("{ ... }: { }\n")
        done = herald("publish", "--fleet", str(fleet.root), "--state", str(state))  # no --broker
        assert done.returncode == 0, done.stdout + done.stderr
        at(watcher, ["alpha"], 2)  # found by its timer
        watcher.marker()  # serve's broker has routed that state (and told serve) by now
        os.kill(serve.proc.pid, signal.SIGHUP)  # a publish with nothing changed
        wait_until(lambda: len(re.findall(r"\d+ unchanged", serve.proc.output())) >= 2, "published again")
        assert "above the" not in serve.proc.output()
        assert not (state / "run" / "reported.json").exists()
        assert int((state / "chroot" / "alpha" / "current").read_text().split()[0]) == 2
        assert len(alpha.rebuilds()) == 2
    finally:
        alpha.stop()
        watcher.close()
        serve.stop()
