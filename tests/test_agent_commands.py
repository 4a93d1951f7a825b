"""Commands that arrive while the agent is busy: each does what it was sent for, or says why not."""

from pathlib import Path

from helpers import Fleet, Serve, Watcher, herald, make_agent, wait_until

from protocol.messages import Phase


def publish(fleet: Fleet, state: Path, serve: Serve) -> None:
    done = herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--broker", serve.mqtt)
    assert done.returncode == 0, done.stdout + done.stderr


def trigger(serve: Serve, state: Path, action: str) -> None:
    done = herald("trigger", "--broker", serve.mqtt, "--state", str(state), "--action", action, "alpha")
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_rollback_sent_during_an_apply_never_rolls_back_the_new_generation_and_a_waiting_force_runs(
    fleet: Fleet, serve: Serve, state: Path, watcher: Watcher, tmp_path: Path
):
    """The admin sends `rollback` (to leave generation 2) and then `rebuild` while generation 3
    is being applied. The worker ran the rollback after the apply and rolled back generation 3,
    which nobody asked for, and dropped the waiting `rebuild`. The rollback names the generation
    deployed when it arrived: refused, and said so, since another was deployed meanwhile; the
    `rebuild` runs after it."""
    agent = make_agent(fleet, "alpha", serve, tmp_path).start()
    try:
        watcher.wait_state("alpha", lambda s: s.phase is Phase.IDLE and s.deployed_generation == 1, "gen 1")
        fleet.edit("alpha", "files/etc/motd", "generation two\n")
        publish(fleet, state, serve)
        watcher.wait_state("alpha", lambda s: s.phase is Phase.IDLE and s.deployed_generation == 2, "gen 2")

        (agent.control / "sleep").write_text("3")
        fleet.edit("alpha", "files/etc/motd", "generation three\n")
        publish(fleet, state, serve)
        wait_until(lambda: len(agent.rebuilds()) == 3, "generation 3's rebuild running")
        trigger(serve, state, "rollback")
        trigger(serve, state, "rebuild")

        refused = watcher.wait_for(
            lambda: next(
                (s for s in watcher.states("alpha") if s.message.startswith("rollback refused")), None
            ),
            "the rollback refused",
            30,
        )
        assert refused.message == (
            "rollback refused: it was sent for generation 2, and generation 3 was deployed since; "
            "send it again to roll that back"
        )
        wait_until(lambda: len(agent.rebuilds()) == 4, "the forced rebuild", 30)
        watcher.wait_state(
            "alpha", lambda s: s.phase is Phase.IDLE and s.deployed_generation == 3, "gen 3 again", 30
        )
        assert [record["args"][0] for record in agent.rebuilds()] == ["switch"] * 4
        assert (agent.home / "root" / "etc" / "motd").read_text() == "generation three\n"
    finally:
        agent.stop()
