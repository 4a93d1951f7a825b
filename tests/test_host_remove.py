"""`herald host remove NAME`: every trace of a host leaves the server, with the embedded SFTP
server and with OpenSSH; a publish after its table was deleted by hand refuses and says so."""

import grp
import json
import os
import pwd
import tarfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest
from helpers import Fleet, Serve, Watcher, delete_from_fleet, herald, make_agent, sftp_login, start_serve
from openssh import remove_host_users, start_sshd

from protocol.messages import Phase
from protocol.topics import Kind

OWN = "omega"  # OpenSSH tests elsewhere create and remove alpha..delta: this one is ours


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    made = Fleet.create(tmp_path)
    made.add_host(OWN, tmp_path)
    made.edit(OWN, "files/etc/secret", "omega's own secret\n")  # private: stored in its chroot only
    yield made
    remove_host_users([OWN])


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
        return response.read().decode()


def refused(port: int, host: str, key: Path) -> bool:
    try:
        sftp_login(port, host, key)
    except (asyncssh.PermissionDenied, asyncssh.ChannelOpenError, asyncssh.SFTPError):
        return True
    return False


def retained_of(serve: Serve, state: Path, host: str) -> dict[str, bytes]:
    """Every retained message a new admin subscription gets for `host`."""
    fresh = Watcher(serve.mqtt, state)
    try:
        fresh.marker()
        return {kind.value: fresh.on(host, kind.value) for kind in Kind if fresh.on(host, kind.value)}
    finally:
        fresh.close()


def passwd_users(state: Path) -> set[str]:
    return {line.split(":", 1)[0] for line in (state / "broker" / "passwd").read_text().splitlines()}


def wait_converged(watcher: Watcher, hosts: list[str]) -> None:
    for host in hosts:
        watcher.wait_state(host, lambda s: s.phase is Phase.IDLE and s.deployed_generation == 1, "at 1")
        watcher.wait_for(lambda h=host: watcher.online(h), f"{host} online")


def refused_then_planned(state: Path, publish: tuple[str, ...], remove: tuple[str, ...]) -> None:
    """A publish refuses, naming `herald host remove`; its dry run plans and changes nothing."""
    refused_publish = herald(*publish)
    assert refused_publish.returncode == 2
    (line,) = refused_publish.stderr.strip().splitlines()
    assert f"hosts.{OWN}: not in fleet.toml any more" in line
    assert f"run `herald host remove {OWN}`" in line
    chroot = state / "chroot" / OWN
    planned = herald(*remove, "--dry-run")
    assert planned.returncode == 0, planned.stderr
    assert all(line.startswith("would ") for line in planned.stdout.splitlines()), planned.stdout
    assert f"would delete {chroot} and the pool entries only it used" in planned.stdout
    assert chroot.is_dir()
    assert OWN in passwd_users(state)


def test_a_removed_host_leaves_no_trace_with_the_embedded_server(
    fleet: Fleet, state: Path, logs: Path, tmp_path: Path
):
    serve = start_serve(fleet, state, logs)
    watcher = Watcher(serve.mqtt, state)
    agents = {host: make_agent(fleet, host, serve, tmp_path).start() for host in fleet.hosts}
    try:
        wait_converged(watcher, fleet.hosts)
        sent = herald("trigger", "--broker", serve.mqtt, "--state", str(state), "--expires", "never", OWN)
        assert sent.returncode == 0, sent.stderr
        assert set(retained_of(serve, state, OWN)) == {"desired", "command", "state", "online"}
        assert f'host="{OWN}"' in fetch(serve.http + "metrics")
        chroot = state / "chroot" / OWN
        uploaded = sorted(name for name in os.listdir(chroot / "logs") if name.endswith(".log"))
        assert uploaded

        delete_from_fleet(fleet, OWN)
        publish = ("publish", "--fleet", str(fleet.root), "--state", str(state))
        remove = ("host", "remove", OWN, "--state", str(state), "--fleet", str(fleet.root))
        refused_then_planned(state, publish, remove)

        archive = tmp_path / "archive"
        done = herald(*remove, "--archive-logs", str(archive))
        assert done.returncode == 0, done.stderr
        assert "herald serve closed 1 SFTP connection(s), dropped 1 MQTT session(s)" in done.stdout

        assert not chroot.exists()
        assert not (state / "ssh" / "authorized_keys" / OWN).exists()
        assert OWN not in passwd_users(state)
        assert OWN not in json.loads((state / "ssh" / "access.json").read_text())
        assert refused(serve.sftp_port, OWN, fleet.keys[OWN])
        assert retained_of(serve, state, OWN) == {}
        assert f'host="{OWN}"' not in fetch(serve.http + "metrics")
        assert OWN not in [entry["host"] for entry in json.loads(fetch(serve.http + "status.json"))]
        pool = [entry for entry in (state / "objects").iterdir() if entry.name != ".swept"]
        assert all(entry.stat().st_nlink > 1 for entry in pool)  # none left that no chroot links
        (kept,) = archive.iterdir()
        with tarfile.open(kept) as tar:
            assert (
                sorted(name.removeprefix(f"{OWN}/") for name in tar.getnames() if name.endswith(".log"))
                == uploaded
            )
        assert (kept.stat().st_mode & 0o777) == 0o600

        agents[OWN].stop()  # a clean stop would publish its state and online: refused, nothing retained
        assert retained_of(serve, state, OWN) == {}
        assert herald(*publish).returncode == 0  # and the fleet publishes again
        assert not chroot.exists()
    finally:
        for agent in agents.values():
            agent.stop()
        watcher.close()
        serve.stop()


def test_a_removed_host_leaves_no_trace_with_openssh(fleet: Fleet, state: Path, logs: Path, tmp_path: Path):
    """OpenSSH serves the chroots, `herald serve --sftp off` the broker: the host's sshd session
    (a process of its user) ends, its account and group go, and so does its Match entry."""
    sshd = start_sshd(fleet, state, tmp_path, logs)
    broker = start_serve(fleet, state, logs, sftp="off")
    watcher = Watcher(broker.mqtt, state)
    agent = make_agent(fleet, OWN, sshd.serve(), tmp_path, broker=broker.mqtt).start()
    try:
        wait_converged(watcher, [OWN])
        account = pwd.getpwnam(OWN)
        fragment = (state / "ssh" / "sshd_config").read_text()
        assert f",{OWN}" in fragment or f" {OWN}," in fragment

        delete_from_fleet(fleet, OWN)
        done = herald("host", "remove", OWN, "--state", str(state), "--fleet", str(fleet.root))
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"ended 1 process(es) of {OWN}" in done.stdout or "process(es) of" in done.stdout

        with pytest.raises(KeyError):
            pwd.getpwnam(OWN)
        with pytest.raises(KeyError):
            grp.getgrnam(OWN)
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    status = Path(f"/proc/{entry}/status").read_text()
                except OSError:
                    continue
                uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
                assert int(uid) != account.pw_uid, f"process {entry} still runs as {OWN}"
        assert OWN not in (state / "ssh" / "sshd_config").read_text().split("Match User ")[1].split()[
            0
        ].split(",")
        assert not (state / "chroot" / OWN).exists()
        assert not (state / "ssh" / "authorized_keys" / OWN).exists()
        assert OWN not in passwd_users(state)
        assert retained_of(broker, state, OWN) == {}
        assert refused(sshd.port, OWN, fleet.keys[OWN])
        publish = herald("publish", "--fleet", str(fleet.root), "--state", str(state))
        assert publish.returncode == 0, publish.stderr
    finally:
        agent.stop()
        watcher.close()
        broker.stop()
        sshd.stop()
