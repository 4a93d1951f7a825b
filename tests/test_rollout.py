"""Rollouts with real agents: a new generation reaches the fleet wave by wave, held back through
each host's `current`, and the rebuild stand-in's records prove no host started it early.

Agents run as real `herald agent` processes, or many to a process (bench.agents_process, as the
benchmark runs them) where a test needs dozens. Soaks and polls are short.
"""

import base64
import json
import os
import secrets
import shutil
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from brokers import free_port
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from helpers import (
    REPO,
    TIMEOUT,
    Agent,
    Fleet,
    Proc,
    Serve,
    Watcher,
    current_generation,
    delete_from_fleet,
    herald,
    make_agent,
    read_release,
    start_serve,
    wait_until,
    write_release,
)

from herald.fleet import FleetView
from herald.rollouts import decide
from protocol.errors import ConfigError
from protocol.layout import StateDir
from protocol.messages import Online, Phase, State, encode, now
from protocol.release import Current
from protocol.settings import Health, RolloutPlan, RolloutWave, convert
from protocol.topics import Kind, Topics
from publisher.inventory import load_inventory
from publisher.publish import Status, publish, write_floors
from publisher.rollout import Book, order, read_book, resolve, resume, until_window, write_book


def plan_toml(*waves: str, budget: int = 1) -> str:
    return f"\n[rollout]\nbudget = {budget}\n" + "".join(f"\n[[rollout.waves]]\n{wave}\n" for wave in waves)


def with_plan(fleet: Fleet, *waves: str, budget: int = 1) -> None:
    with (fleet.root / "fleet.toml").open("a", encoding="utf-8") as toml:
        toml.write(plan_toml(*waves, budget=budget))


def book(state: Path) -> dict[str, Any]:
    path = state / "run" / "rollout.json"
    return json.loads(path.read_text()) if path.exists() else {}


def rollout(state: Path) -> dict[str, Any]:
    return book(state).get("rollout") or {}


def change(fleet: Fleet, note: str) -> None:
    with (fleet.root / "common" / "base.nix").open("a", encoding="utf-8") as module:
        module.write(f"# {note}\n")


def publish_cli(fleet: Fleet, state: Path, serve: Serve, *extra: str) -> str:
    done = herald(
        "publish", "--fleet", str(fleet.root), "--state", str(state), "--broker", serve.mqtt, *extra
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def rollout_cli(state: Path, *args: str) -> Any:
    return herald("rollout", *args, "--state", str(state))


def started_after_first(agent: Agent) -> list[float]:
    """When the stand-in rebuilt after the host's first deployment."""
    return [entry["t"] for entry in agent.rebuilds()[1:]]


def wave_started(state: Path, index: int) -> float:
    return rollout(state)["waves"][index]["started"]


def group(configs: list[Path], log: Path) -> Proc:
    """Many agents in one process, as bench/agent.py runs them."""
    env = os.environ | {"PYTHONPATH": str(REPO), "HERALD_BENCH_LOG": "INFO"}
    return Proc("agents", [sys.executable, "-m", "bench.agents_process", *map(str, configs)], log, env=env)


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310 - the test's own loopback page
        return answer.read().decode()


# ---------------------------------------------------------------- the plan, without processes


def test_waves_choose_hosts_by_name_tag_and_a_stable_hash_and_the_rest_come_last():
    tags = {f"h{n:02d}": (["db"] if n % 10 == 0 else []) for n in range(40)}
    plan = RolloutPlan(
        budget=2,
        waves=[
            RolloutWave(name="canary", hosts=["h07"]),
            RolloutWave(name="db", tags=["db"], soak="5m", health=Health.SOAK),
            RolloutWave(name="quarter", percent=25, budget=1),
        ],
    )
    waves = resolve(plan, tags, source="fleet.toml")
    assert [wave.name for wave in waves] == ["canary", "db", "quarter", "(rest)"]
    assert waves[0].hosts == ["h07"]
    assert waves[1].hosts == ["h00", "h10", "h20", "h30"]
    assert (waves[1].soak, waves[1].health, waves[2].budget) == (300.0, Health.SOAK, 1)
    first_quarter = set(order(list(tags))[:10])
    assert set(waves[2].hosts) == first_quarter - {"h07", "h00", "h10", "h20", "h30"}
    assert sorted(host for wave in waves for host in wave.hosts) == sorted(tags)  # each host once
    # The same hosts every time, and a host's place does not depend on the others' names
    assert resolve(plan, tags, source="fleet.toml") == waves
    assert order(["x", "h05", "h17"]) == [h for h in order([*tags, "x"]) if h in ("x", "h05", "h17")]


def test_a_wave_naming_a_host_the_fleet_lacks_is_one_line():
    plan = RolloutPlan(waves=[RolloutWave(name="canary", hosts=["zeta"])])
    with pytest.raises(Exception, match=r"rollout.waves\[0\] \(canary\): no host 'zeta'"):
        resolve(plan, {"alpha": []}, source="fleet.toml")


def test_a_plan_naming_a_host_the_fleet_lacks_stops_the_publish_before_any_release(fleet: Fleet, state: Path):
    publish(fleet.root, state)
    with_plan(fleet, 'name = "canary"\nhosts = ["zeta"]')
    change(fleet, "never written")
    with pytest.raises(ConfigError, match="no host 'zeta'"):
        publish(fleet.root, state)
    for host in fleet.hosts:
        assert os.listdir(state / "chroot" / host / "releases") == ["1"]


def test_a_maintenance_window_may_cross_midnight():
    at = datetime(2026, 11, 25, 23, 30).astimezone()
    assert until_window(None, at) == 0
    assert until_window("23:00-01:00", at) == 0
    assert until_window("02:00-04:00", at) == 2.5 * 3600
    assert until_window("23:45-23:50", at) == 15 * 60
    with pytest.raises(ConfigError, match="starts where it ends"):  # it would never open
        convert({"name": "w", "hosts": ["alpha"], "window": "02:00-02:00"}, RolloutWave, source="fleet.toml")


def test_a_held_release_is_kept_and_finding_it_again_writes_nothing(fleet: Fleet, state: Path):
    with_plan(fleet, 'name = "canary"\nhosts = ["alpha"]\nsoak = "1h"')
    publish(fleet.root, state)  # new hosts get their first release at once
    assert [current_generation(state, host) for host in fleet.hosts] == [1, 1, 1]
    change(fleet, "one")
    report = publish(fleet.root, state)
    assert [current_generation(state, host) for host in fleet.hosts] == [2, 1, 1]
    assert report.released == ["alpha"]
    assert "held back: wave 2 of 2" in {r.host: r for r in report.hosts}["beta"].message

    def written() -> dict[Path, int]:  # the chroots and the rollout (figures and caches are the publisher's)
        return {
            p: p.stat().st_mtime_ns for d in ("chroot", "run") for p in (state / d).rglob("*") if p.is_file()
        }

    before = written()
    again = publish(fleet.root, state)
    assert [r.status for r in again.hosts] == [Status.UNCHANGED] * 3
    assert written() == before
    change(fleet, "two")  # supersedes: beta's held generation 2 is replaced by 3, and pruned
    publish(fleet.root, state)
    assert sorted(os.listdir(state / "chroot" / "beta" / "releases")) == ["1", "3"]
    assert current_generation(state, "beta") == 1
    assert rollout(state)["hosts"]["beta"]["generation"] == 3
    gone = publish(fleet.root, state, rollout="off")  # the admin's "everything now"
    assert gone.released == ["beta", "gamma"]
    assert [current_generation(state, host) for host in fleet.hosts] == [3, 3, 3]
    assert rollout(state)["status"] == "superseded"


def test_abort_rollback_never_signs_a_previous_release_it_cannot_verify(fleet: Fleet, state: Path):
    """Whoever can write a chroot but holds no key (a compromised `herald serve`, a mirror) plants
    content as the release a rollback returns to: the rollback must not sign it."""
    with_plan(fleet, 'name = "canary"\nhosts = ["alpha", "beta"]\nsoak = "1h"')
    publish(fleet.root, state)
    change(fleet, "regret")
    assert publish(fleet.root, state).released == ["alpha", "beta"]
    manifest, signature = read_release(state, "alpha", 1)
    planted = json.loads(manifest)
    planted["source_rev"] = "planted"  # any change: the signature no longer verifies
    write_release(state, "alpha", 1, json.dumps(planted).encode(), signature)
    stranger = Ed25519PrivateKey.generate()  # and signed by a key the publisher never trusted
    forged = json.loads(read_release(state, "beta", 1)[0])
    forged["source_rev"] = "forged"
    data = json.dumps(forged).encode()
    write_release(state, "beta", 1, data, base64.b64encode(stranger.sign(data)))

    aborted = rollout_cli(state, "abort", "--rollback")
    assert aborted.returncode == 0, aborted.stdout + aborted.stderr
    assert "0 host(s) sent back" in aborted.stdout
    assert "2 kept what they run (alpha, beta)" in aborted.stdout
    assert "signature verifies against no key the publisher trusts" in aborted.stderr
    for host in ("alpha", "beta"):
        assert current_generation(state, host) == 2
        assert not (state / "chroot" / host / "releases" / "3").exists()


def test_what_an_abort_held_back_is_not_released_by_a_hosts_report_of_a_later_generation(
    fleet: Fleet, state: Path
):
    """A host that says it runs generation 50 (its own report, which serve records to publish
    above it) must not get the content an abort held back, nor restart a rollout for others."""
    with_plan(fleet, 'name = "canary"\nhosts = ["alpha"]\nsoak = "1h"')
    publish(fleet.root, state)
    change(fleet, "regret")
    publish(fleet.root, state)
    aborted = rollout_cli(state, "abort")
    assert aborted.returncode == 0, aborted.stdout + aborted.stderr
    write_floors(state / "run" / "reported.json", {"gamma": 50})
    report = publish(fleet.root, state)
    assert {r.host: r.status for r in report.hosts}["gamma"] is Status.UNCHANGED
    assert current_generation(state, "gamma") == 1
    assert rollout(state)["status"] == "aborted"  # no new rollout started by gamma's word
    assert "gamma" in book(state)["aborted"]


def test_a_host_removed_mid_rollout_and_given_its_name_again_starts_afresh(
    fleet: Fleet, state: Path, tmp_path: Path
):
    with_plan(fleet, 'name = "canary"\nhosts = ["alpha"]\nsoak = "1h"')
    publish(fleet.root, state)
    change(fleet, "held")
    publish(fleet.root, state)  # gamma's generation 2 is held back
    toml, saved = fleet.root / "fleet.toml", tmp_path / "gamma-saved"
    kept_toml = toml.read_text()
    shutil.copytree(fleet.root / "hosts" / "gamma", saved, symlinks=True)
    delete_from_fleet(fleet, "gamma")
    removed = herald("host", "remove", "gamma", "--state", str(state), "--fleet", str(fleet.root))
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert "gamma is in no rollout any more" in removed.stdout
    assert "gamma" not in rollout(state)["hosts"]
    assert all("gamma" not in wave["hosts"] for wave in rollout(state)["waves"])

    toml.write_text(kept_toml)  # a new machine given the same name
    shutil.copytree(saved, fleet.root / "hosts" / "gamma", symlinks=True)
    report = publish(fleet.root, state)
    assert {r.host: r.status for r in report.hosts}["gamma"] is Status.CHANGED
    current = current_generation(state, "gamma")
    assert (state / "chroot" / "gamma" / "releases" / str(current)).is_file()  # `current` names a release


def test_a_wave_no_host_can_pass_halts_and_a_canary_that_never_answers_fails_at_its_deadline(
    fleet: Fleet, state: Path
):
    """A compromised canary says `applying` for ever, with an online time far ahead of the
    server's clock: it holds its wave only until the deadline, then counts as failed, and the
    wave halts (none of its hosts is up to date) instead of waiting for ever."""
    with_plan(fleet, 'name = "canary"\nhosts = ["alpha"]\ndeadline = "10m"', budget=5)
    publish(fleet.root, state)
    change(fleet, "stalled")
    publish(fleet.root, state)
    layout = StateDir(state)
    plan = read_book(layout).rollout
    assert plan is not None
    target, started = plan.hosts["alpha"], plan.waves[0].started
    view = FleetView(Topics())
    busy = State(
        phase=Phase.APPLYING, deployed_generation=1, target_generation=target.generation, since=now()
    )
    view.update("herald/alpha/state", encode(busy))
    view.update("herald/alpha/online", encode(Online(online=True, at=datetime(9999, 1, 1).astimezone())))
    assert not view.hosts["alpha"].is_online(now())  # a time that far ahead proves nothing

    decide(plan, view, started + 60)
    assert (plan.status, target.outcome) == ("running", "")
    decide(plan, view, started + 601)
    assert target.outcome == "failed"
    assert "deadline of 600s" in target.message
    assert plan.status == "halted"
    assert "wave 1 (canary): none of its hosts is up to date: alpha" in plan.reason

    write_book(layout, Book(rollout=plan))
    resume(layout)  # the admin accepts the failure: the wave passes, the rest is given
    plan = read_book(layout).rollout
    assert plan is not None
    _, given = decide(plan, view, started + 602)
    assert sorted(given) == ["beta", "gamma"]


def test_a_host_given_its_release_and_not_yet_heard_from_stays_counted_when_a_rollout_is_replaced(
    fleet: Fleet, state: Path
):
    with_plan(fleet, 'name = "canary"\nhosts = ["alpha"]\nsoak = "1h"', 'name = "second"\nhosts = ["beta"]')
    publish(fleet.root, state)
    change(fleet, "first")
    publish(fleet.root, state)  # alpha given its release; no result yet
    first = rollout(state)["id"]
    write_floors(state / "run" / "reported.json", {"alpha": 50})  # alpha's release is lifted above 50
    fleet.edit("beta", "files/etc/motd", "beta changes again\n")  # and beta's change replaces the rollout
    publish(fleet.root, state)
    now_ = rollout(state)
    assert now_["id"] != first
    alpha = now_["hosts"]["alpha"]
    assert alpha["given"] is True
    assert alpha["generation"] > 50
    assert alpha["outcome"] == ""  # its result, when it comes, counts in the new rollout


# ---------------------------------------------------------------- real agents


@pytest.fixture
def big_fleet(fleet: Fleet, tmp_path: Path) -> Fleet:
    for n in range(30):
        fleet.add_host(f"h{n:02d}", tmp_path)
        (fleet.root / "hosts" / f"h{n:02d}" / "common").symlink_to("../../common")  # a change reaches all
    with_plan(
        fleet,
        'name = "canary"\nhosts = ["alpha"]\nsoak = "2s"',
        'name = "third"\npercent = 33\nsoak = "2s"',
        'name = "rest"\npercent = 100',
    )
    return fleet


def test_thirty_agents_go_through_three_waves_and_no_host_starts_before_its_wave(
    big_fleet: Fleet, state: Path, logs: Path, tmp_path: Path
):
    fleet = big_fleet
    serve = start_serve(fleet, state, logs)
    procs: list[Proc] = []
    try:
        agents = {host: make_agent(fleet, host, serve, tmp_path, poll="2s") for host in fleet.hosts}
        inventory = load_inventory(fleet.root)
        assert inventory.config.rollout is not None
        tags = {host.name: host.entry.tags for host in inventory.hosts}
        waves = resolve(inventory.config.rollout, tags, source="test")
        third, rest = waves[1].hosts, waves[2].hosts
        away = third[0]  # offline when its wave runs, back later
        grouped = [host for host in fleet.hosts if host != away]
        halves = [grouped[::2], grouped[1::2]]
        procs = [
            group([agents[h].config for h in half], logs / f"group{n}.log") for n, half in enumerate(halves)
        ]
        agents[away].start()
        wait_until(lambda: all(a.deployed() == 1 for a in agents.values()), "every host at generation 1", 120)
        agents[away].stop()
        watcher = Watcher(serve.mqtt, state)
        change(fleet, "the rollout")
        published = time.time()
        out = publish_cli(fleet, state, serve)
        assert "held back: wave 2 of 3 (third)" in out
        wait_until(lambda: agents["alpha"].deployed() == 2, "the canary applied generation 2")
        # An agent process restarted while the canary soaks: its hosts still run generation 1
        restarted = halves[1]
        procs[1].stop()
        procs[1] = group([agents[h].config for h in restarted], logs / "group1-again.log")
        wait_until(lambda: wave_started(state, 1), "wave 2 started", 60)
        wait_until(lambda: all(agents[h].deployed() == 2 for h in third if h != away), "wave 2 applied", 60)
        wait_until(lambda: wave_started(state, 2), "wave 3 started", 60)
        agents[away].start()  # back mid-rollout: gets its generation, and counts
        wait_until(lambda: rollout(state)["status"] == "done", "the rollout done", 90)
        wait_until(lambda: all(a.deployed() == 2 for a in agents.values()), "every host at generation 2", 60)

        # the agent writes deployed.json before it reports idle: wait for the rollout to see it
        wait_until(
            lambda: all(t["outcome"] == "done" for t in rollout(state)["hosts"].values()),
            "every host's outcome recorded",
        )
        done = rollout(state)
        assert {h: t["outcome"] for h, t in done["hosts"].items()} == dict.fromkeys(fleet.hosts, "done")
        starts = each_wave_in_order(done, agents)
        # Held hosts kept checking on their timer (and after their agent restarted), and stayed
        late = rest[0]
        checks = [
            s for s in watcher.states(late) if s.phase is Phase.CHECKING and s.since.timestamp() > published
        ]
        assert len(checks) >= 2, "the held host's timer did not poll while it waited"
        assert all(s.deployed_generation == 1 for s in checks if s.since.timestamp() < starts[2])
        assert done["hosts"][away]["at"] > starts[2]  # its outcome came when it returned

        visible_everywhere(state, serve, done)
        watcher.close()
    finally:
        for proc in procs:
            proc.stop()
        for agent in agents.values():
            agent.stop()
        serve.stop()


def each_wave_in_order(done: dict[str, Any], agents: dict[str, Agent]) -> list[float]:
    """Every host rebuilt once, after its wave started; each wave started after the one before
    it passed. The waves' start times."""
    starts = [wave["started"] for wave in done["waves"]]
    assert starts == sorted(starts)
    for index, wave in enumerate(done["waves"]):
        for host in wave["hosts"]:
            later = started_after_first(agents[host])
            assert len(later) == 1, f"{host} rebuilt {later} after its first deployment"
            assert later[0] >= wave["started"], f"{host} of wave {index + 1} started before it"
        if index:
            assert wave["started"] >= done["waves"][index - 1]["passed"]
    return starts


def visible_everywhere(state: Path, serve: Serve, done: dict[str, Any]) -> None:
    """herald rollout status, the page and the metrics show the finished rollout."""
    listed = rollout_cli(state, "status", "--broker", serve.mqtt)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert f"rollout {done['id']}: done" in listed.stdout
    page = fetch(serve.http)
    assert '<section id="rollout">' in page
    assert "3 rest" in page
    metrics = fetch(serve.http + "metrics")
    assert f'herald_rollout_status{{rollout="{done["id"]}",status="done"}} 1.0' in metrics
    assert f'herald_rollout_hosts{{name="third",progress="done",rollout="{done["id"]}",wave="2"}}' in metrics


@dataclass
class Small:
    start: Callable[[], Serve]
    serve: Serve | None = None
    agents: dict[str, Agent] = field(default_factory=dict)


@pytest.fixture
def small(fleet: Fleet, state: Path, logs: Path, tmp_path: Path):
    """The example fleet's three hosts with real agents, on fixed ports (a restart keeps them)."""
    ports = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"

    def start() -> Serve:
        return start_serve(fleet, state, logs, mqtt=ports[0], sftp=ports[1])

    made = Small(start)
    yield made
    for agent in made.agents.values():
        agent.stop()
    if made.serve is not None:
        made.serve.stop()


def boot(
    made: Small, fleet: Fleet, tmp_path: Path, hosts: tuple[str, ...] = ("alpha", "beta", "gamma")
) -> None:
    made.serve = made.start()
    made.agents = {h: make_agent(fleet, h, made.serve, tmp_path, poll="2s").start() for h in hosts}
    wait_until(lambda: all(a.deployed() == 1 for a in made.agents.values()), "generation 1 everywhere", 60)


def test_a_failing_canary_halts_within_its_soak_and_resume_after_a_fix_goes_on(
    small: Any, fleet: Fleet, state: Path, tmp_path: Path
):
    with_plan(fleet, 'name = "canary"\nhosts = ["alpha"]\nsoak = "5s"', 'name = "office"\ntags = ["office"]')
    boot(small, fleet, tmp_path)
    (small.agents["alpha"].control / "fail").touch()
    change(fleet, "broken")
    publish_cli(fleet, state, small.serve)
    wait_until(lambda: len(small.agents["alpha"].rebuilds()) == 2, "the canary tried generation 2")
    tried = small.agents["alpha"].rebuilds()[1]["t"]
    wait_until(lambda: rollout(state)["status"] == "halted", "halted", timeout=5)  # within one soak
    halted = rollout(state)
    assert halted["reason"] == "halted: 1 host(s) failed or rolled back, the rollout's budget of 1: alpha"
    assert time.time() - tried < 5 + 2
    shown = rollout_cli(state, "status", "--broker", small.serve.mqtt)
    assert shown.returncode == 1
    assert "halted" in shown.stdout
    assert "alpha: generation 2 failed" in shown.stdout
    time.sleep(3)  # well past the soak: nothing moves on
    assert [current_generation(state, h) for h in ("beta", "gamma")] == [1, 1]

    (small.agents["alpha"].control / "fail").unlink()  # the fix, published
    change(fleet, "fixed")
    out = publish_cli(fleet, state, small.serve)
    assert "held back" in out
    fixed = rollout(state)
    assert fixed["status"] == "paused"
    assert fixed["id"] != halted["id"]
    assert "was halted" in fixed["reason"]
    assert current_generation(state, "alpha") == 2  # nothing given while paused
    resumed = rollout_cli(state, "resume")
    assert resumed.returncode == 0
    assert "resumed" in resumed.stdout
    wait_until(lambda: rollout(state)["status"] == "done", "the fix rolled out", 60)
    wait_until(lambda: all(a.deployed() == 3 for a in small.agents.values()), "generation 3 everywhere")
    for host in ("beta", "gamma"):  # they never started the broken generation
        assert len(small.agents[host].rebuilds()) == 2
        assert small.agents[host].rebuilds()[1]["t"] > time.time() - 60


def test_abort_with_rollback_gives_the_canary_its_previous_content_and_holds_the_rest(
    small: Any, fleet: Fleet, state: Path, tmp_path: Path
):
    with_plan(fleet, 'name = "canary"\nhosts = ["alpha"]\nsoak = "1h"')
    boot(small, fleet, tmp_path)
    first = Current.decode((state / "chroot" / "alpha" / "current").read_bytes())
    change(fleet, "regret")
    publish_cli(fleet, state, small.serve)
    wait_until(lambda: small.agents["alpha"].deployed() == 2, "the canary applied generation 2")
    wait_until(lambda: rollout(state)["hosts"]["alpha"]["outcome"] == "done", "the canary done")
    aborted = rollout_cli(state, "abort", "--rollback")
    assert aborted.returncode == 0, aborted.stdout + aborted.stderr
    assert "1 host(s) sent back" in aborted.stdout
    back = Current.decode((state / "chroot" / "alpha" / "current").read_bytes())
    assert (back.generation, back.version) == (3, first.version)
    wait_until(lambda: small.agents["alpha"].deployed() == 3, "the canary applied its previous content")
    assert (
        json.loads(read_release(state, "alpha", 3)[0])["content"]
        == json.loads(read_release(state, "alpha", 1)[0])["content"]
    )
    again = publish_cli(fleet, state, small.serve)  # the repository still holds what was aborted
    assert "0 changed" in again
    assert rollout(state)["status"] == "aborted"
    time.sleep(2.5)  # a poll of the held hosts
    for host in ("beta", "gamma"):
        assert current_generation(state, host) == 1
        assert len(small.agents[host].rebuilds()) == 1


def test_a_server_restart_mid_wave_resumes_without_running_finished_waves_again(
    small: Any, fleet: Fleet, state: Path, tmp_path: Path
):
    with_plan(
        fleet,
        'name = "canary"\nhosts = ["alpha"]\nsoak = "1s"',
        'name = "second"\nhosts = ["beta"]\nsoak = "6s"',
        'name = "last"\nhosts = ["gamma"]',
    )
    boot(small, fleet, tmp_path)
    change(fleet, "restart")
    publish_cli(fleet, state, small.serve)
    wait_until(lambda: rollout(state)["waves"][1]["healthy"], "wave 2 soaking", 60)
    before = rollout(state)
    small.serve.stop()
    small.serve = small.start()
    wait_until(lambda: rollout(state)["status"] == "done", "the rollout done after the restart", 60)
    after = rollout(state)
    assert [w["started"] for w in after["waves"][:2]] == [w["started"] for w in before["waves"][:2]]
    assert after["waves"][0]["passed"] == before["waves"][0]["passed"]
    assert after["waves"][1]["passed"] >= before["waves"][1]["healthy"] + 6
    wait_until(lambda: small.agents["gamma"].deployed() == 2, "the last wave applied")
    assert [len(small.agents[h].rebuilds()) for h in ("alpha", "beta", "gamma")] == [2, 2, 2]


# ---------------------------------------------------------------- a compromised host


class Forger:
    """An MQTT client logged in as `host` with its own secret: a compromised host."""

    def __init__(self, serve: Serve, state: Path, host: str) -> None:
        self.host, self.topics = host, Topics()
        secret = (state / "chroot" / host / "credentials" / "broker.secret").read_text().strip()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"{host}.forger.{secrets.token_hex(4)}"
        )
        self.client.username_pw_set(host, secret)
        connected = threading.Event()
        self.client.on_connect = lambda *_args: connected.set()
        address, port = serve.mqtt.removeprefix("mqtt://").rsplit(":", 1)
        self.client.connect(address, int(port), keepalive=30)
        self.client.loop_start()
        assert connected.wait(TIMEOUT)

    def state(self, phase: Phase, *, deployed: int = 0, version: str | None = None, target: int = 0) -> None:
        payload = State(
            phase=phase,
            deployed_generation=deployed,
            deployed_version=version,
            target_generation=target,
            since=now(),
        )
        info = self.client.publish(self.topics.of(self.host, Kind.STATE), encode(payload), qos=1, retain=True)
        info.wait_for_publish(TIMEOUT)

    def online(self) -> None:
        from protocol.messages import Online  # noqa: PLC0415

        info = self.client.publish(
            self.topics.of(self.host, Kind.ONLINE), encode(Online(online=True, at=now())), qos=1, retain=True
        )
        info.wait_for_publish(TIMEOUT)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_a_hosts_false_reports_cannot_advance_or_halt_the_rollout_for_others(
    small: Any, fleet: Fleet, state: Path, tmp_path: Path
):
    with_plan(
        fleet,
        'name = "canary"\nhosts = ["alpha"]\nsoak = "3s"',
        'name = "second"\nhosts = ["beta"]\nsoak = "1s"',
        'name = "last"\nhosts = ["gamma"]',
        budget=2,
    )
    boot(small, fleet, tmp_path, hosts=("alpha", "beta"))  # gamma is the attacker: no agent
    small.agents["alpha"].control.joinpath("sleep").write_text("4")  # the canary takes its time
    change(fleet, "attacked")
    publish_cli(fleet, state, small.serve)
    forger = Forger(small.serve, state, "gamma")
    try:
        forger.online()
        held = rollout(state)["hosts"]["gamma"]
        alpha = rollout(state)["hosts"]["alpha"]
        # Before its wave: idle on the generation held for it, on the canary's, and a flood of failures
        forger.state(
            Phase.IDLE, deployed=held["generation"], version=held["version"], target=held["generation"]
        )
        forger.state(Phase.IDLE, deployed=alpha["generation"], version=alpha["version"])
        for _ in range(100):
            forger.state(Phase.FAILED, deployed=1, target=held["generation"])
        time.sleep(1)
        now_ = rollout(state)
        assert now_["hosts"]["gamma"]["outcome"] == ""
        assert now_["status"] == "running"
        assert not now_["waves"][1]["started"], "wave 2 started before the canary was done"
        # A generation far above the one served: released again above it, nothing restarts
        forger.state(Phase.IDLE, deployed=50, target=50)
        wait_until(lambda: rollout(state)["hosts"]["gamma"]["generation"] > 50, "gamma's release lifted")
        assert rollout(state)["id"] == now_["id"]
        assert current_generation(state, "gamma") == 1
        wait_until(lambda: rollout(state)["waves"][2]["started"], "the last wave started", 60)
        assert rollout(state)["waves"][1]["passed"] >= rollout(state)["hosts"]["beta"]["at"]
        target = rollout(state)["hosts"]["gamma"]["generation"]
        for _ in range(100):  # its own part, failed loudly: counts once
            forger.state(Phase.FAILED, deployed=1, target=target)
        wait_until(lambda: rollout(state)["hosts"]["gamma"]["outcome"] == "failed", "gamma's failure counted")
        time.sleep(0.5)
        final = rollout(state)
        # Counted once (budget 2 not spent); gamma, alone in the last wave, can only halt that wave
        # (nothing of the others': they passed already), and says so in one line naming itself.
        assert [h for h, t in final["hosts"].items() if t["outcome"] == "failed"] == ["gamma"]
        assert final["status"] == "halted"
        assert final["reason"].endswith("wave 3 (last): none of its hosts is up to date: gamma")
        assert all(wave["passed"] for wave in final["waves"][:2])
    finally:
        forger.close()
