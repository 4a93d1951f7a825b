"""The whole path on loopback: publish -> chroot -> SFTP -> agent -> rebuild -> state and log.

Real `herald serve` (embedded amqtt and SFTP), real agent processes; the rebuild command is the
recording stand-in.
"""

import signal
from pathlib import Path

from helpers import (
    Agent,
    Fleet,
    Serve,
    Watcher,
    current_generation,
    herald,
    make_agent,
    start_serve,
    wait_until,
)

from protocol.messages import Phase


def at(generation: int):
    return lambda state: state.phase is Phase.IDLE and state.deployed_generation == generation


def test_a_change_reaches_its_host_and_only_its_host(
    fleet: Fleet, serve: Serve, state: Path, watcher: Watcher, agents: dict[str, Agent]
):
    for host in fleet.hosts:
        watcher.wait_state(host, at(1), "applied generation 1")

    operations = {"alpha": "switch", "beta": "boot", "gamma": "switch"}  # from fleet.toml
    for host, agent in agents.items():
        (rebuild,) = agent.rebuilds()
        operation, tree, name = rebuild["args"]
        assert (operation, name) == (operations[host], host)
        assert (Path(tree) / "common" / "base.nix").read_bytes() == (
            fleet.root / "common" / "base.nix"
        ).read_bytes()
        motd = fleet.root / "hosts" / host / "files" / "etc" / "motd"
        assert (agent.home / "root" / "etc" / "motd").read_bytes() == motd.read_bytes()
        (log,) = (state / "chroot" / host / "logs").glob("*-g1-applied.log")
        assert "stand-in rebuild" in log.read_text()
        assert watcher.online(host)[-1].online

    fleet.edit("alpha", "files/etc/motd", "alpha, second edition\n")
    done = herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--broker", serve.mqtt)
    assert done.returncode == 0, done.stderr
    watcher.wait_state("alpha", at(2), "applied generation 2")

    assert (agents["alpha"].home / "root" / "etc" / "motd").read_text() == "alpha, second edition\n"
    assert len(agents["alpha"].rebuilds()) == 2
    assert [len(agents[host].rebuilds()) for host in ("beta", "gamma")] == [1, 1]
    assert agents["alpha"].deployed() == 2
    state_alpha = watcher.states("alpha")[-1]
    assert state_alpha.log is not None
    assert (state / "chroot" / "alpha" / "logs" / state_alpha.log).exists()


def test_unchanged_hosts_get_no_new_generation_and_no_announcement(
    fleet: Fleet, serve: Serve, state: Path, watcher: Watcher
):
    watcher.wait_for(lambda: all(watcher.desired(h) for h in fleet.hosts), "first announcements")
    assert {h: [d.generation for d in watcher.desired(h)] for h in fleet.hosts} == {
        host: [1] for host in fleet.hosts
    }

    fleet.edit("gamma", "common-note.txt", "only gamma\n")
    done = herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--broker", serve.mqtt)
    assert done.returncode == 0, done.stderr
    watcher.wait_for(lambda: len(watcher.desired("gamma")) == 2, "gamma announced again")
    watcher.marker()
    generations = {h: [d.generation for d in watcher.desired(h)] for h in fleet.hosts}
    assert generations == {"alpha": [1], "beta": [1], "gamma": [1, 2]}
    assert [current_generation(state, h) for h in fleet.hosts] == [1, 1, 2]

    again = herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--broker", serve.mqtt)
    assert again.returncode == 0, again.stderr
    assert "3 unchanged" in again.stdout
    watcher.marker()
    assert {h: len(watcher.desired(h)) for h in fleet.hosts} == {"alpha": 1, "beta": 1, "gamma": 2}
    assert [current_generation(state, h) for h in fleet.hosts] == [1, 1, 2]


def test_agents_converge_on_their_timer_with_no_broker(fleet: Fleet, state: Path, logs: Path, tmp_path: Path):
    """No broker at all: a stopped agent catches up when it starts, a running one on its timer."""
    server = start_serve(fleet, state, logs, mqtt="off")
    dead_broker = "mqtt://127.0.0.1:9"  # discard port: nothing listens, every connect is refused
    agent = make_agent(fleet, "beta", server, tmp_path, broker=dead_broker, poll="2s").start()
    try:
        wait_until(lambda: agent.deployed() == 1, "beta applied generation 1")
        agent.stop()

        fleet.edit("beta", "files/etc/motd", "published while beta was stopped\n")
        done = herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--broker", dead_broker)
        assert done.returncode == 0, done.stderr
        assert "announcement skipped" in done.stderr
        assert current_generation(state, "beta") == 2

        agent.start()
        wait_until(lambda: agent.deployed() == 2, "beta caught up after its restart")

        fleet.edit("beta", "files/etc/motd", "published while beta was running\n")
        published = herald("publish", "--fleet", str(fleet.root), "--state", str(state))
        assert published.returncode == 0, published.stderr
        wait_until(lambda: agent.deployed() == 3, "beta caught up on its timer", timeout=20)
        assert (agent.home / "root" / "etc" / "motd").read_text() == "published while beta was running\n"
        assert [r["args"][0] for r in agent.rebuilds()] == ["boot", "boot", "boot"]
        assert agent.proc is not None
        assert agent.proc.alive()
        assert agent.proc.stop(signal.SIGTERM) == 0
    finally:
        agent.stop()
        server.stop()
