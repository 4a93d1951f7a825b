"""The agent restarts itself after a deployment that changed agent.toml or herald, and only into
an agent that starts: a released agent.toml that does not load, or a herald that does not import,
is rolled back before anything restarts (a restarted agent that exits 2 for ever leaves no agent
to roll anything back)."""

import os
from pathlib import Path

import pytest
from helpers import HERALD, REPO, Agent, Fleet, Proc, Serve, Watcher, herald, make_agent

from protocol.messages import Phase

CONFIG = "etc/herald/agent.toml"
SITE = "usr/lib/herald-site"  # on the agent's PYTHONPATH: a herald package released here comes first


def publish(fleet: Fleet, state: Path) -> None:
    done = herald("publish", "--fleet", str(fleet.root), "--state", str(state))
    assert done.returncode == 0, done.stdout + done.stderr


def start(agent: Agent, monkeypatch: pytest.MonkeyPatch) -> Proc:
    """The agent as the host runs it: its agent.toml in the root (released by the fleet), from a
    directory of its own, its path the site a release may put a herald package in, then this
    checkout."""
    root = agent.home / "root"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / SITE), str(REPO)]))
    with monkeypatch.context() as patch:
        patch.chdir(agent.home)
        agent.proc = Proc(
            "agent-alpha", [*HERALD, "agent", "--config", str(root / CONFIG)], agent.home / "agent.log", env
        )
    return agent.proc


@pytest.mark.parametrize("broken", ["agent.toml", "herald"])
def test_a_deployment_whose_agent_would_not_start_is_rolled_back_and_the_agent_keeps_running(
    fleet: Fleet, serve: Serve, state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broken: str
):
    agent = make_agent(fleet, "alpha", serve, tmp_path)
    # The rebuild stand-in is herald's own code: it runs with this checkout first on its path.
    text = agent.config.read_text().replace('= ["', f'= ["env", "PYTHONPATH={REPO}", "')
    (agent.home / "root" / "etc" / "herald").mkdir(parents=True)
    (agent.home / "root" / CONFIG).write_text(text)
    fleet.edit("alpha", f"files/{CONFIG}", text)  # the fleet manages the agent's settings
    publish(fleet, state)
    watcher = Watcher(serve.mqtt, state)
    proc = start(agent, monkeypatch)
    try:
        watcher.wait_state("alpha", lambda s: s.phase is Phase.IDLE and s.deployed_generation == 2, "gen 2")
        if broken == "agent.toml":
            fleet.edit("alpha", f"files/{CONFIG}", text.replace('poll = "1h"', 'poll = "soon"'))
            said = "poll"
        else:
            fleet.edit(
                "alpha",
                f"files/{SITE}/herald-9.9.9.dist-info/METADATA",
                "Metadata-Version: 2.1\nName: herald\nVersion: 9.9.9\n",
            )
            fleet.edit(
                "alpha", f"files/{SITE}/herald/__init__.py", 'raise ImportError("this herald is broken")\n'
            )
            said = "ImportError: this herald is broken"
        done = herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--broker", serve.mqtt)
        assert done.returncode == 0, done.stdout + done.stderr
        rolled = watcher.wait_state(
            "alpha", lambda s: s.phase is Phase.ROLLED_BACK and s.target_generation == 3, "rolled back", 60
        )
        assert rolled.message.startswith("rolled back: the new agent would not start: "), rolled.message
        assert said in rolled.message
        assert rolled.deployed_generation == 2
        assert (agent.home / "root" / CONFIG).read_text() == text
        assert not (agent.home / "root" / SITE / "herald").exists()
        assert proc.alive()
        assert proc.output().count("starting; state in") == 1  # never restarted
        assert rolled.agent_version != "9.9.9"
    finally:
        watcher.close()
        agent.stop()
