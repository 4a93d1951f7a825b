"""The sysadmin's view: status in every phase, triggers, staged rollouts, logs, metrics, the page."""

import json
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import pytest
from helpers import Fleet, Serve, Watcher, herald, make_agent, need, start_serve, wait_until

from protocol.messages import Phase


@pytest.fixture
def fleet5(fleet: Fleet, tmp_path: Path) -> Fleet:
    """The example fleet plus delta and epsilon."""
    fleet.add_host("delta", tmp_path)
    fleet.add_host("epsilon", tmp_path)
    return fleet


def status_json(serve: Serve, state: Path, fleet: Fleet) -> tuple[int, dict[str, str]]:
    done = herald(
        "status", "--broker", serve.mqtt, "--state", str(state), "--fleet", str(fleet.root), "--json"
    )
    rows = json.loads(done.stdout)
    return done.returncode, {row["host"]: row["status"] for row in rows}


def publish(fleet: Fleet, state: Path, serve: Serve) -> None:
    done = herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--broker", serve.mqtt)
    assert done.returncode == 0, done.stdout + done.stderr


def test_status_shows_each_phase(fleet5: Fleet, logs: Path, state: Path, tmp_path: Path):
    serve = start_serve(fleet5, state, logs)
    watcher = Watcher(serve.mqtt, state)
    agents = {}
    try:
        agents["alpha"] = make_agent(fleet5, "alpha", serve, tmp_path)
        agents["beta"] = make_agent(fleet5, "beta", serve, tmp_path)
        (agents["beta"].control / "fail").touch()
        agents["gamma"] = make_agent(fleet5, "gamma", serve, tmp_path, confirm="2s")
        config = agents["gamma"].config
        config.write_text(config.read_text().replace('window = "2s"', 'window = "2s"\nhealth = ["false"]'))
        for agent in agents.values():
            agent.start()
        delta = make_agent(fleet5, "delta", serve, tmp_path)
        assert delta.once().returncode == 0  # reports, then leaves: offline

        watcher.wait_state(
            "alpha", lambda s: s.phase is Phase.IDLE and s.deployed_generation == 1, "alpha at 1"
        )
        watcher.wait_state("beta", lambda s: s.phase is Phase.FAILED, "beta failed")
        watcher.wait_state(
            "gamma", lambda s: s.phase is Phase.IDLE and s.deployed_generation == 1, "gamma at 1"
        )
        fleet5.edit("gamma", "configuration.nix", "{ ... }: { gamma = 2; }\n")
        publish(fleet5, state, serve)
        watcher.wait_state("gamma", lambda s: s.phase is Phase.ROLLED_BACK, "gamma rolled back")

        code, statuses = status_json(serve, state, fleet5)
        assert statuses == {
            "alpha": "up to date",
            "beta": "failed",
            "gamma": "rolled back",
            "delta": "offline",
            "epsilon": "never seen",
        }
        assert code == 1  # a host failed
        table = herald("status", "--broker", serve.mqtt, "--state", str(state), "--fleet", str(fleet5.root))
        assert "rebuild failed with exit code 1" in table.stdout
        assert table.returncode == 1
    finally:
        watcher.close()
        for agent in agents.values():
            agent.stop()
        serve.stop()


def test_a_trigger_for_an_offline_host_reaches_it_once_when_it_returns(
    fleet: Fleet, serve: Serve, state: Path, tmp_path: Path
):
    agent = make_agent(fleet, "alpha", serve, tmp_path)
    assert agent.once().returncode == 0
    done = herald("trigger", "--broker", serve.mqtt, "--state", str(state), "--action", "rebuild", "alpha")
    assert done.returncode == 0, done.stderr
    assert "alpha  sent" in done.stdout or "sent" in done.stdout
    agent.start()
    try:
        wait_until(lambda: len(agent.rebuilds()) == 2, "the rebuild when alpha came back")
        agent.stop()
        agent.start()  # the retained command is delivered again: it must not run again
        assert agent.proc is not None
        wait_until(lambda: "connected to broker" in agent.proc.output(), "alpha reconnected")
        watcher = Watcher(serve.mqtt, state)
        watcher.marker()
        watcher.close()
        assert len(agent.rebuilds()) == 2
    finally:
        agent.stop()


def test_a_staged_rollout_stops_after_the_first_failing_batch(
    fleet: Fleet, serve: Serve, state: Path, watcher: Watcher, agents
):
    for host in fleet.hosts:
        watcher.wait_state(
            host, lambda s: s.phase is Phase.IDLE and s.deployed_generation == 1, f"{host} at 1"
        )
    (agents["beta"].control / "fail").touch()
    done = herald(
        "trigger", "--broker", serve.mqtt, "--state", str(state), "--fleet", str(fleet.root),
        "--all", "--action", "rebuild", "--batch", "1", "--stop-on-failure", "--timeout", "60s",
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    answers = {line.split()[0]: line.split()[1] for line in done.stdout.splitlines()[1:] if line.strip()}
    assert answers == {"alpha": "ok", "beta": "failed", "gamma": "not"}  # "not sent"
    assert [len(agents[host].rebuilds()) for host in ("alpha", "beta", "gamma")] == [2, 2, 1]


def test_trigger_waits_and_tags_select_hosts(
    fleet: Fleet, serve: Serve, state: Path, watcher: Watcher, agents
):
    for host in fleet.hosts:
        watcher.wait_state(host, lambda s: s.phase is Phase.IDLE, f"{host} idle")
    done = herald(
        "trigger", "--broker", serve.mqtt, "--state", str(state), "--fleet", str(fleet.root),
        "--tag", "office", "--wait", "--timeout", "60s", timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    answered = sorted(line.split()[0] for line in done.stdout.splitlines()[1:] if line.strip())
    assert answered == ["alpha", "beta"]  # fleet.toml tags alpha and beta "office"
    refused = herald("trigger", "--broker", serve.mqtt, "--state", str(state), "--all")
    assert refused.returncode == 2
    assert "--all and --tag need --fleet" in refused.stderr


def test_logs_lists_newest_first_and_prints_the_last(fleet: Fleet, serve: Serve, state: Path, tmp_path: Path):
    agent = make_agent(fleet, "alpha", serve, tmp_path)
    assert agent.once().returncode == 0
    assert (
        herald(
            "trigger", "--broker", serve.mqtt, "--state", str(state), "--action", "rebuild", "alpha"
        ).returncode
        == 0
    )
    agent.start()
    try:
        wait_until(lambda: len(list((state / "chroot" / "alpha" / "logs").glob("*.log"))) == 2, "two logs")
    finally:
        agent.stop()
    listing = herald("logs", "--state", str(state), "alpha")
    names = [line.split()[0] for line in listing.stdout.splitlines()]
    assert len(names) == 2
    assert names == sorted(names, reverse=True)
    last = herald("logs", "--state", str(state), "--last", "1", "alpha")
    assert names[0] in last.stdout
    assert names[1] not in last.stdout
    assert "stand-in rebuild" in last.stdout
    missing = herald("logs", "--state", str(state), "zeta")
    assert missing.returncode == 2


def test_metrics_and_the_page_show_the_fleet(
    fleet: Fleet, serve: Serve, state: Path, watcher: Watcher, tmp_path
):
    agent = make_agent(fleet, "alpha", serve, tmp_path).start()
    try:
        watcher.wait_state(
            "alpha", lambda s: s.phase is Phase.IDLE and s.deployed_generation == 1, "alpha at 1"
        )

        def metric_shows_alpha() -> str | None:
            with urllib.request.urlopen(serve.http + "metrics", timeout=10) as response:  # noqa: S310 - loopback
                text = response.read().decode()
            return text if 'herald_host_deployed_generation{host="alpha"} 1.0' in text else None

        text = wait_until(metric_shows_alpha, "alpha in /metrics")
        assert 'herald_host_status{host="alpha",status="up to date"} 1.0' in text
        assert 'herald_host_status{host="beta",status="never seen"} 1.0' in text
        assert "herald_publish_runs_total 1.0" in text

        chromium = need("chromium")
        with tempfile.TemporaryDirectory() as profile:
            dom = subprocess.run(
                [
                    chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-quic", f"--user-data-dir={profile}", "--dump-dom", serve.http,
                ],
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
        assert dom.returncode == 0, dom.stderr[-2000:]
        rows = {
            host: dom.stdout.split(f'<tr id="host-{host}">')[1].split("</tr>")[0]
            for host in ("alpha", "beta", "gamma")
        }
        assert '<td class="status-up-to-date">up to date</td>' in rows["alpha"]
        assert "<td>1</td>" in rows["alpha"]
        assert '<td class="status-never-seen">never seen</td>' in rows["beta"]
    finally:
        agent.stop()
