"""The least-privilege split the NixOS module sets up (nix/server.nix, README "The publisher
key"): `herald publish` runs on its own and alone reads the signing key; `herald serve` (broker,
page, rollouts) runs as root with no capabilities, the key absent from its mount namespace and
only chroot/ and run/ (and sftp/) writable, as the module's unit says. The fleet converges, takes
a change, and moves through a rollout's waves with serve confined so."""

import json
import urllib.request
from pathlib import Path

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


def confined(sftp: str, state: Path, denied: Path) -> tuple[str, ...]:
    """What nix/server.nix's herald-serve unit does to `herald serve` (evaluated here with the
    stand-in for nixpkgs, tests/nixos.nix), for a command that execs it (same PID): the state
    read-only (ProtectSystem=strict) but its ReadWritePaths, its InaccessiblePaths hidden by an
    empty file, its CapabilityBoundingSet, and NoNewPrivileges."""
    values = (
        f'{{ enable = true; fleet = "/srv/fleet"; fleetToml = {EXAMPLE_FLEET}/fleet.toml; sftp = "{sftp}"; }}'
    )
    unit = nixos("server", f"{{ services.herald.server = {values}; }}")["systemd"]["services"]["herald-serve"]
    config = unit["serviceConfig"]
    assert config["ProtectSystem"] == "strict"
    assert config["NoNewPrivileges"] is True

    def here(path: str) -> Path:
        return state / Path(path.removeprefix("-")).relative_to(MODULE_STATE)

    steps = [f"mount --bind {state} {state}", f"mount -o remount,bind,ro {state}"]
    steps += [
        f"if [ -e {path} ]; then mount --bind {denied} {path}; fi"
        for path in map(here, config["InaccessiblePaths"])
    ]
    for path in map(here, config["ReadWritePaths"]):
        steps += [f"mount --bind {path} {path}", f"mount -o remount,bind,rw {path}"]
    caps = "".join(
        f",+{name.removeprefix('CAP_').lower()}" for name in config["CapabilityBoundingSet"].split()
    )
    steps.append(f'exec setpriv --no-new-privs --bounding-set=-all{caps} --inh-caps=-all -- "$@"')
    return ("unshare", "--mount", "--propagation", "private", "sh", "-ec", " && ".join(steps), "confined")


def start_confined(
    sftp: str, fleet: Fleet, state: Path, logs: Path, tmp_path: Path
) -> tuple[Serve, Serve, OpenSSH | None]:
    """Generation 1 published, and serve confined as the module runs it: (serve, the SFTP
    server the agents use, sshd if OpenSSH serves the chroots)."""
    denied = tmp_path / "inaccessible"
    denied.touch(mode=0o000)
    config = tmp_path / "server.toml"
    config.write_text(f'fleet = "{fleet.root}"\nstate = "{state}"\npublish = false\n')
    if sftp == "openssh":
        sshd = start_sshd(fleet, state, tmp_path, logs)  # provisions, and publishes generation 1
        serve = start_serve(fleet, state, logs, sftp="off", config=config, wrap=confined(sftp, state, denied))
        return serve, sshd.serve(), sshd
    # No host accounts, as on a server that never ran OpenSSH for herald (an OpenSSH test of
    # this session made them; with them the publisher gives logs/ to the hosts' users).
    remove_host_users(fleet.hosts)
    done = herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--init")
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("run", "sftp"):  # the module's tmpfiles rules make them
        (state / name).mkdir(exist_ok=True)
    serve = start_serve(fleet, state, logs, config=config, wrap=confined(sftp, state, denied))
    return serve, serve, None


@pytest.mark.parametrize("sftp", ["embedded", "openssh"])
def test_a_confined_serve_and_a_publish_of_its_own_keep_the_fleet_moving(
    sftp: str, fleet: Fleet, state: Path, logs: Path, tmp_path: Path
):
    """With OpenSSH the hosts' uploads belong to their users: serve keeps CAP_DAC_READ_SEARCH to
    show their logs on the page, as the module gives it. The embedded server needs none."""
    with (fleet.root / "fleet.toml").open("a", encoding="utf-8") as toml:
        toml.write(PLAN)
    key = state / "publisher" / "signing.key"
    serve, server, sshd = start_confined(sftp, fleet, state, logs, tmp_path)
    watcher = Watcher(serve.mqtt, state)
    agents = [make_agent(fleet, host, server, tmp_path, broker=serve.mqtt).start() for host in fleet.hosts]
    try:
        status = Path(f"/proc/{serve.proc.pid}/status").read_text()
        allowed = 1 << 2 if sftp == "openssh" else 0  # CAP_DAC_READ_SEARCH is capability 2
        assert f"CapBnd:\t{allowed:016x}" in status
        assert f"CapEff:\t{allowed:016x}" in status
        assert Path(f"/proc/{serve.proc.pid}/root{key}").read_bytes() == b""  # another file, for serve
        assert key.read_bytes()  # the key itself, outside
        for host in fleet.hosts:
            watcher.wait_state(host, lambda s: s.deployed_generation == 1 and s.phase is Phase.IDLE, "at 1")

        with (fleet.root / "common" / "base.nix").open("a", encoding="utf-8") as module:
            module.write("# a change, published by the publish unit\n")
        done = herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--broker", serve.mqtt)
        assert done.returncode == 0, done.stdout + done.stderr
        # The publish gave generation 2 to the canary only; the confined serve gives the rest.
        for host in fleet.hosts:
            watcher.wait_state(
                host, lambda s: s.deployed_generation == 2 and s.phase is Phase.IDLE, "at 2", 2 * TIMEOUT
            )
        started = {agent.host: agent.rebuilds()[-1]["t"] for agent in agents}
        assert all(started["alpha"] < started[host] for host in fleet.hosts if host != "alpha")
        book = state / "run" / "rollout.json"
        wait_until(lambda: json.loads(book.read_text())["rollout"]["status"] == "done", "the rollout done")

        assert 'herald_host_deployed_generation{host="gamma"} 2' in fetch(serve.http + "metrics")
        log = watcher.states("alpha")[-1].log  # uploaded by the host (with OpenSSH: its user's file)
        assert log is not None
        assert "generation 2" in fetch(f"{serve.http}logs/alpha/{log}")
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
