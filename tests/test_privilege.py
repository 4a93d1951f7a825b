"""The least-privilege split the NixOS module sets up (nix/server.nix, README "The publisher
key"): `herald publish` runs on its own and alone reads the signing key; `herald serve` (broker,
page, rollouts) runs as root with no capabilities, the key absent from its mount namespace and
only chroot/ and run/ (and sftp/) writable, as the module's unit says. The fleet converges, takes
a change, and moves through a rollout's waves with serve confined so."""

import json
import os
import re
import shlex
import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    EXAMPLE_FLEET,
    TIMEOUT,
    Fleet,
    Serve,
    Watcher,
    herald,
    make_agent,
    nixos,
    start_serve,
    wait_until,
)
from openssh import OpenSSH, remove_host_users, start_sshd

from protocol.messages import Phase

MODULE_STATE = Path("/var/lib/herald")  # the module's default stateDir
PLAN = """
[rollout]
[[rollout.waves]]
name = "canary"
hosts = ["alpha"]
soak = "1s"
[[rollout.waves]]
name = "rest"
percent = 100
"""


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310 - the test's loopback page
        return answer.read().decode()


def unit(sftp: str) -> dict[str, Any]:
    """herald-serve's serviceConfig, as nix/server.nix makes it (evaluated with the stand-in for
    nixpkgs, tests/nixos.nix) for the module's default stateDir."""
    values = (
        f'{{ enable = true; fleet = "/srv/fleet"; fleetToml = {EXAMPLE_FLEET}/fleet.toml; sftp = "{sftp}"; }}'
    )
    units = nixos("server", f"{{ services.herald.server = {values}; }}")["systemd"]["services"]
    config: dict[str, Any] = units["herald-serve"]["serviceConfig"]
    assert config["ProtectSystem"] == "strict"
    assert config["NoNewPrivileges"] is True
    assert config["Type"] == "notify"
    return config


def here(path: str, state: Path) -> Path:
    """A path the unit names, in this test's state directory."""
    name = path.removeprefix("-")
    if name.startswith(f"{MODULE_STATE}."):  # a sibling: STATE.before-restore
        return state.with_name(state.name + name.removeprefix(str(MODULE_STATE)))
    return state / Path(name).relative_to(MODULE_STATE)


def prepare(config: dict[str, Any], state: Path) -> None:
    """The unit's ExecStartPre ("+": run outside its namespace), with this test's paths."""
    for line in config["ExecStartPre"]:
        if "#" in line:  # a script (tests/nixos.nix keeps its text in the name)
            script = line.split("#", 1)[1].replace(str(MODULE_STATE), str(state))
            script = re.sub(r"/nix/store/[0-9]{32}-coreutils/bin/", "", script)
            subprocess.run(["sh", "-ec", script], check=True)
            continue
        argv = shlex.split(line.removeprefix("+"))
        argv[0] = Path(argv[0]).name  # the store path of coreutils: this machine's own
        argv = [str(here(arg, state)) if arg.startswith(str(MODULE_STATE)) else arg for arg in argv]
        subprocess.run(argv, check=True)


def confined(config: dict[str, Any], state: Path, tmp_path: Path) -> tuple[str, ...]:
    """What the unit does to `herald serve`, for a command that execs it (same PID): the state
    read-only (ProtectSystem=strict) but its ReadWritePaths, its InaccessiblePaths hidden by an
    empty file or directory (mode 0), its CapabilityBoundingSet, and NoNewPrivileges."""
    empty_file, empty_dir = tmp_path / "inaccessible-file", tmp_path / "inaccessible-dir"
    empty_file.touch(mode=0)
    empty_dir.mkdir(mode=0)
    steps = [f"mount --bind {state} {state}", f"mount -o remount,bind,ro {state}"]
    for entry in config["InaccessiblePaths"]:
        path = here(entry, state)
        if not path.exists():
            assert entry.startswith("-"), f"{entry}: missing, and the unit would fail"
            continue
        steps.append(f"mount --bind {empty_dir if path.is_dir() else empty_file} {path}")
    for path in (here(entry, state) for entry in config["ReadWritePaths"]):
        steps += [f"mount --bind {path} {path}", f"mount -o remount,bind,rw {path}"]
    kept = config["CapabilityBoundingSet"].split()
    caps = "".join(f",+{name.removeprefix('CAP_').lower()}" for name in kept)
    steps.append(f'exec setpriv --no-new-privs --bounding-set=-all{caps} --inh-caps=-all -- "$@"')
    return ("unshare", "--mount", "--propagation", "private", "sh", "-ec", " && ".join(steps), "confined")


class Ready:
    """systemd's side of Type=notify: a datagram socket that hears READY=1."""

    def __init__(self, where: Path) -> None:
        self.path = where / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(TIMEOUT)

    def heard(self) -> bytes:
        try:
            return self.sock.recv(4096)
        finally:
            self.sock.close()


def start_confined(
    sftp: str, fleet: Fleet, state: Path, logs: Path, tmp_path: Path
) -> tuple[Serve, Serve, OpenSSH | None]:
    """Generation 1 published, and serve confined as the module runs it, told ready as systemd
    would be: (serve, the SFTP server the agents use, sshd if OpenSSH serves the chroots)."""
    config = unit(sftp)
    server_toml = tmp_path / "server.toml"
    server_toml.write_text(f'fleet = "{fleet.root}"\nstate = "{state}"\npublish = false\n')
    sshd = None
    if sftp == "openssh":
        sshd = start_sshd(fleet, state, tmp_path, logs)  # provisions, and publishes generation 1
    else:
        # No host accounts, as on a server that never ran OpenSSH for herald (an OpenSSH test of
        # this session made them; with them the publisher gives logs/ to the hosts' users).
        remove_host_users(fleet.hosts)
        done = herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--init")
        assert done.returncode == 0, done.stdout + done.stderr
    prepare(config, state)
    ready = Ready(tmp_path)
    serve = start_serve(
        fleet,
        state,
        logs,
        sftp="off" if sshd else "127.0.0.1:0",
        config=server_toml,
        wrap=confined(config, state, tmp_path),
        env=os.environ | {"NOTIFY_SOCKET": str(ready.path)},
    )
    assert ready.heard() == b"READY=1"
    return serve, sshd.serve() if sshd else serve, sshd


def publish_change(
    fleet: Fleet, state: Path, serve: Serve, watcher: Watcher, note: str, generation: int
) -> None:
    """A change to every host, published as the publish unit does; every host idle on `generation`."""
    with (fleet.root / "common" / "base.nix").open("a", encoding="utf-8") as module:
        module.write(f"# {note}\n")
    done = herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--broker", serve.mqtt)
    assert done.returncode == 0, done.stdout + done.stderr
    for host in fleet.hosts:
        watcher.wait_state(
            host,
            lambda s: s.deployed_generation == generation and s.phase is Phase.IDLE,
            f"at {generation}",
            2 * TIMEOUT,
        )


@pytest.mark.parametrize("sftp", ["embedded", "openssh"])
def test_a_confined_serve_and_a_publish_of_its_own_keep_the_fleet_moving(
    sftp: str, fleet: Fleet, state: Path, logs: Path, tmp_path: Path
):
    """With OpenSSH the hosts' uploads belong to their users: serve keeps CAP_DAC_READ_SEARCH to
    show their logs on the page, as the module gives it. The embedded server needs none."""
    with (fleet.root / "fleet.toml").open("a", encoding="utf-8") as toml:
        toml.write(PLAN)
    key = state / "publisher" / "private" / "signing.key"
    serve, server, sshd = start_confined(sftp, fleet, state, logs, tmp_path)
    watcher = Watcher(serve.mqtt, state)
    agents = [make_agent(fleet, host, server, tmp_path, broker=serve.mqtt).start() for host in fleet.hosts]
    try:
        status = Path(f"/proc/{serve.proc.pid}/status").read_text()
        allowed = 1 << 2 if sftp == "openssh" else 0  # CAP_DAC_READ_SEARCH is capability 2
        assert f"CapBnd:\t{allowed:016x}" in status
        assert f"CapEff:\t{allowed:016x}" in status
        hidden = Path(f"/proc/{serve.proc.pid}/root{key.parent}")  # the key's directory, for serve
        assert list(hidden.iterdir()) == []
        assert key.read_bytes()  # the key itself, outside
        for host in fleet.hosts:
            watcher.wait_state(host, lambda s: s.deployed_generation == 1 and s.phase is Phase.IDLE, "at 1")

        # The publish gives generation 2 to the canary only; the confined serve gives the rest.
        publish_change(fleet, state, serve, watcher, "a change, published by the publish unit", 2)
        started = {agent.host: agent.rebuilds()[-1]["t"] for agent in agents}
        assert all(started["alpha"] < started[host] for host in fleet.hosts if host != "alpha")
        book = state / "run" / "rollout.json"
        wait_until(lambda: json.loads(book.read_text())["rollout"]["status"] == "done", "the rollout done")

        assert 'herald_host_deployed_generation{host="gamma"} 2' in fetch(serve.http + "metrics")
        log = watcher.states("alpha")[-1].log  # uploaded by the host (with OpenSSH: its user's file)
        assert log is not None
        assert "generation 2" in fetch(f"{serve.http}logs/alpha/{log}")

        # A rotation replaces the key file in its directory: still nothing there for serve.
        rotated = herald("key", "rotate", "--state", str(state))
        assert rotated.returncode == 0, rotated.stdout + rotated.stderr
        assert list(hidden.iterdir()) == []
        publish_change(fleet, state, serve, watcher, "signed by the new key", 3)
    finally:
        for agent in agents:
            agent.stop()
        watcher.close()
        serve.stop()
        if sshd is not None:
            sshd.stop()
    output = serve.proc.output()
    for trouble in ("Permission denied", "Read-only file system", "ERROR", "Traceback"):
        assert trouble not in output, output
    assert not list(state.rglob("signing.key.*"))
    assert key.stat().st_mode & 0o777 == 0o600
