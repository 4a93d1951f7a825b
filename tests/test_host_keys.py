"""SSH keys over time: the server's host key rotated under a running fleet, no host touched; a
successor only from a connection the agent already trusts; a host's own key replaced without
a lockout, the old one refused once fleet.toml's new key is published."""

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest
from helpers import Agent, Fleet, Serve, Watcher, herald, make_agent, sftp_login, start_serve, wait_until
from openssh import remove_host_users

from protocol.hostkeys import ANSWER, STATEMENT
from protocol.messages import Phase

OWN = "omega"  # OpenSSH tests elsewhere create and remove alpha..delta: this one is ours


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """The example fleet and a host of this module's own, whose OpenSSH user is removed after."""
    made = Fleet.create(tmp_path)
    made.add_host(OWN, tmp_path)
    yield made
    remove_host_users([OWN])


def host_key_cmd(state: Path, *args: str) -> str:
    done = herald("server", "host-key", *args, "--state", str(state))
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def trusted_by(agent_home: Path) -> list[str]:
    """The keys an agent trusts beyond agent.toml's (client.hostkeys' file), and those retired."""
    path = agent_home / "state" / "server-keys.json"
    if not path.exists():
        return []
    saved = json.loads(path.read_text())
    return [item["key"] for item in saved["learned"]]


def retired_by(agent_home: Path) -> list[str]:
    path = agent_home / "state" / "server-keys.json"
    return json.loads(path.read_text())["retired"] if path.exists() else []


def serve_key(state: Path) -> str:
    return json.loads((state / "run" / "serve.json").read_text())["sftp_host_key"]


def retired_everywhere(state: Path, agents: dict[str, Agent], old: str) -> None:
    """`herald server host-key retire`: its private half goes, and every agent drops it."""
    host_key_cmd(state, "retire")
    assert not (state / "sftp" / "ssh_host_ed25519_key.old").exists()
    for host, agent in agents.items():
        wait_until(lambda a=agent: old in retired_by(a.home), f"{host} drops the old key", timeout=30)


def test_a_fleet_follows_a_server_host_key_rotation_with_no_host_touched(
    fleet: Fleet, state: Path, logs: Path, tmp_path: Path
):
    """rotate -> every agent answers that it trusts the successor -> switch (the running serve
    takes it on SIGHUP) -> a publish reaches every host, whose confirmation opens a new
    connection to the new key -> retire: agents drop the old key, and one presenting it is refused."""
    serve = start_serve(fleet, state, logs)
    watcher = Watcher(serve.mqtt, state)
    agents = {host: make_agent(fleet, host, serve, tmp_path, poll="2s").start() for host in fleet.hosts}
    try:
        for host in fleet.hosts:
            watcher.wait_state(host, lambda s: s.phase is Phase.IDLE and s.deployed_generation == 1, "at 1")
        configs = {host: agent.config.read_text() for host, agent in agents.items()}
        old = serve.host_key

        rotated = host_key_cmd(state, "rotate")
        new = " ".join((state / "sftp" / "ssh_host_ed25519_key.next.pub").read_text().split()[:2])
        assert f"announced the successor {new}" in rotated
        for host in fleet.hosts:
            assert new in (state / "chroot" / host / STATEMENT).read_text()

        def everyone_trusts_it() -> bool:
            return herald("server", "host-key", "status", "--state", str(state)).returncode == 0

        wait_until(everyone_trusts_it, "every agent trusts the successor", timeout=60)
        for host, agent in agents.items():
            assert trusted_by(agent.home) == [new], host
            answer = json.loads((state / "chroot" / host / "logs" / ANSWER).read_text())
            assert sorted(answer["trusted"]) == sorted([old, new])

        host_key_cmd(state, "switch")
        wait_until(lambda: serve_key(state) == new, "serve presents the new key")

        for host in fleet.hosts:
            fleet.edit(host, "files/etc/motd", "after the switch\n")
        os.kill(serve.proc.pid, signal.SIGHUP)
        for host in fleet.hosts:  # deployed, and confirmed over a new connection: the new key
            watcher.wait_state(
                host, lambda s: s.phase is Phase.IDLE and s.deployed_generation == 2, "at 2", timeout=60
            )
        for host in fleet.hosts:
            assert Phase.ROLLED_BACK not in [s.phase for s in watcher.states(host)]

        retired_everywhere(state, agents, old)
        assert {host: agent.config.read_text() for host, agent in agents.items()} == configs  # untouched
        for agent in agents.values():
            agent.stop()
        once = agents["beta"].once()  # a new process, a new connection: agent.toml's key is retired
        assert once.returncode == 0, once.stdout + once.stderr
    finally:
        for agent in agents.values():
            agent.stop()
        watcher.close()
        serve.stop()


def test_a_successor_announced_over_an_untrusted_channel_is_refused(
    fleet: Fleet, state: Path, logs: Path, tmp_path: Path
):
    """An impostor on the server's address (its own state, its own key) announces its keys as
    successors in alpha's chroot: the agent never connects, so never reads the statement, and
    trusts nothing new; back on the real server it carries on with the key it pinned."""
    serve = start_serve(fleet, state, logs, mqtt="off")
    port = serve.sftp_port
    agent = make_agent(fleet, "alpha", serve, tmp_path)
    try:
        assert agent.once().returncode == 0
    finally:
        serve.stop()
    impostor_state = tmp_path / "impostor"
    assert (
        herald("publish", "--fleet", str(fleet.root), "--state", str(impostor_state), "--init").returncode
        == 0
    )
    impostor = start_serve(fleet, impostor_state, logs, mqtt="off", sftp=f"127.0.0.1:{port}")
    try:
        host_key_cmd(impostor_state, "rotate")
        (impostor_state / "chroot" / "alpha" / STATEMENT).write_text(
            json.dumps(
                {"format": 1, "keys": [impostor.host_key, serve.host_key], "retired": [serve.host_key]}
            )
        )
        refused = agent.once()
        assert refused.returncode == 1
        assert "not the one pinned in agent.toml" in refused.stderr
    finally:
        impostor.stop()
    assert trusted_by(agent.home) == []
    assert retired_by(agent.home) == []
    assert not (impostor_state / "chroot" / "alpha" / "logs" / ANSWER).exists()
    serve = start_serve(fleet, state, logs, mqtt="off", sftp=f"127.0.0.1:{port}")
    try:
        again = agent.once()
        assert again.returncode == 0, again.stderr
    finally:
        serve.stop()


def login(serve: Serve, user: str, key: Path) -> None:
    """Log in over SFTP with `key`; asyncssh.PermissionDenied if refused."""
    sftp_login(serve.sftp_port, user, key)


def test_a_hosts_new_key_takes_over_without_a_lockout_and_the_old_is_refused_after_publish(
    sftp_server: Serve, fleet: Fleet, state: Path, tmp_path: Path
):
    """`herald enrol --rotate` on the host makes <ssh_key>.next and prints its fleet.toml line;
    the agent keeps logging in with the old key until the admin publishes the new one, then with
    the new one, which becomes its ssh_key; the old key is refused from that publish on."""
    agent = make_agent(fleet, OWN, sftp_server, tmp_path)
    assert agent.once().returncode == 0
    key = fleet.keys[OWN]
    old_private = key.read_bytes()
    old_copy = tmp_path / "old-key"
    old_copy.write_bytes(old_private)
    old_copy.chmod(0o600)

    rotated = herald("enrol", "--rotate", "--config", str(agent.config))
    assert rotated.returncode == 0, rotated.stderr
    upcoming = Path(f"{key}.next")
    public = asyncssh.read_private_key(str(upcoming)).export_public_key().decode().strip()
    assert f'[hosts.{OWN}]\n  ssh_key = "{public}"' in rotated.stdout
    assert (upcoming.stat().st_mode & 0o777) == 0o600

    fleet.edit(OWN, "files/etc/motd", "before the key is published\n")
    assert herald("publish", "--fleet", str(fleet.root), "--state", str(state)).returncode == 0
    before = agent.once()  # the server refuses the new key yet: the old one logs in
    assert before.returncode == 0, before.stderr
    assert agent.deployed() == 2
    assert key.read_bytes() == old_private
    assert upcoming.exists()

    toml = fleet.root / "fleet.toml"
    old_public = asyncssh.import_private_key(old_private).export_public_key().decode().strip()
    toml.write_text(toml.read_text().replace(old_public, public))
    fleet.edit(OWN, "files/etc/motd", "after the key is published\n")
    assert herald("publish", "--fleet", str(fleet.root), "--state", str(state)).returncode == 0

    after = agent.once()
    assert after.returncode == 0, after.stderr
    assert agent.deployed() == 3
    assert not upcoming.exists()
    assert asyncssh.read_private_key(str(key)).export_public_key().decode().strip() == public
    assert Path(f"{key}.old").read_bytes() == old_private
    with pytest.raises(asyncssh.PermissionDenied):
        login(sftp_server, OWN, old_copy)
    login(sftp_server, OWN, key)
    assert agent.once().returncode == 0  # and it goes on, with no .next left
