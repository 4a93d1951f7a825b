"""Faults that do not end by themselves are bounded or said plainly: what is wrong, what to do."""

from pathlib import Path

from helpers import Agent, Fleet, Serve, Watcher, herald, make_agent, wait_until

from protocol.messages import Phase


def publish(fleet: Fleet, state: Path) -> None:
    done = herald("publish", "--fleet", str(fleet.root), "--state", str(state))
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_file_missing_on_the_server_is_named_as_such_and_applied_once_it_is_back(
    fleet: Fleet, serve: Serve, state: Path, tmp_path: Path
):
    """An object the signed MANIFEST names is missing from the chroot (pruned under a fetch, or a
    damaged chroot): it was "server unreachable or busy", retried for ever with nothing to act
    on. The agent says the server is missing it and what to do, marks nothing failed, and
    applies the generation once the file is back."""
    agent = make_agent(fleet, "alpha", serve, tmp_path)
    assert agent.once().returncode == 0
    fleet.edit("alpha", "files/etc/motd", "generation two\n")
    publish(fleet, state)
    objects = state / "chroot" / "alpha" / "objects"
    (missing,) = [path for path in objects.iterdir() if path.read_bytes() == b"generation two\n"]
    kept = missing.read_bytes()
    missing.unlink()

    done = agent.once()
    assert done.returncode != 0
    said = done.stdout + done.stderr
    assert "the server is missing a file of generation 2" in said, said
    assert "alpha's chroot on the server is damaged: publish a change to this host" in said, said
    assert not (agent.home / "state" / "failed.json").exists()

    missing.write_bytes(kept)
    missing.chmod(0o644)
    assert agent.once().returncode == 0
    assert agent.deployed() == 2


def failing_agent(fleet: Fleet, serve: Serve, state: Path, tmp_path: Path) -> Agent:
    agent = make_agent(fleet, "alpha", serve, tmp_path, poll="3s")
    assert agent.once().returncode == 0
    (agent.control / "fail").touch()
    fleet.edit("alpha", "configuration.nix", "{ ... }: { second = true; }\n")
    publish(fleet, state)
    return agent.start()


def test_a_rebuild_that_failed_once_is_tried_again_by_itself(
    fleet: Fleet, serve: Serve, state: Path, watcher: Watcher, tmp_path: Path
):
    """A rebuild that fails for a reason that passes (a binary cache down) marked the generation
    failed until a new one was published. It is tried again at a check a poll later."""
    agent = failing_agent(fleet, serve, state, tmp_path)
    try:
        failed = watcher.wait_state("alpha", lambda s: s.phase is Phase.FAILED, "the first attempt", 30)
        assert "rebuild failed with exit code 1; attempt 1 of 3: tried again at a check 3s from now" in (
            failed.message
        )
        (agent.control / "fail").unlink()
        watcher.wait_state(
            "alpha", lambda s: s.phase is Phase.IDLE and s.deployed_generation == 2, "applied", 30
        )
        assert len(agent.rebuilds()) == 3  # generation 1, then generation 2 twice
    finally:
        agent.stop()


def test_a_rebuild_that_keeps_failing_is_tried_three_times_then_says_what_to_do(
    fleet: Fleet, serve: Serve, state: Path, watcher: Watcher, tmp_path: Path
):
    agent = failing_agent(fleet, serve, state, tmp_path)
    try:
        last = watcher.wait_state(
            "alpha",
            lambda s: s.phase is Phase.FAILED and "3 attempts failed" in s.message,
            "three attempts",
            60,
        )
        assert last.message.endswith(
            "3 attempts failed: tried again for a new generation or `herald trigger --action rebuild alpha`"
        )
        checks = len(watcher.states("alpha"))
        wait_until(lambda: len(watcher.states("alpha")) >= checks + 6, "three more checks", 30)
        assert len(agent.rebuilds()) == 4  # generation 1, then generation 2 three times, no more
        assert watcher.states("alpha")[-1].message == last.message
    finally:
        agent.stop()
