"""Faults and load: processes killed, servers gone, disks full, clocks wrong, a long soak.

Every scenario is bounded in count and time, runs on loopback, and asserts that the fleet
converges with nothing lost, nothing applied half-fetched and nothing applied twice. Each
computes its figures for the reliability table (tests/reliability.py) before it asserts.
"""

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    HERALD,
    Agent,
    Fleet,
    Proc,
    Serve,
    Watcher,
    current_generation,
    herald,
    make_agent,
    need,
    need_root,
    start_serve,
    wait_until,
)
from reliability import Row, record
from test_agent_loop import publish

from bench.agent import AGENTS_PER_PROCESS, agent_configs, make_fleet
from protocol.messages import Phase, now

pytestmark = pytest.mark.faults

# The rebuild stand-in of the kill tests: records whether every file of the tree it was given
# matches the tree's MANIFEST, then takes as long as control/sleep says. (No braces: the agent
# fills {placeholders} in every word of the command.)
VERIFY = """
import hashlib, json, pathlib, sys, time
record, tree, control = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
manifest = json.loads(pathlib.Path(str(tree) + ".manifest").read_bytes())
complete = all(
    (tree / path).is_file() and hashlib.sha256((tree / path).read_bytes()).hexdigest() == digest
    for path, _mode, _size, digest in manifest["content"]["files"]
)
with open(record, "a") as out:
    out.write(json.dumps(dict(tree=str(tree), complete=complete, t=time.time())) + "\\n")
if (control / "sleep").exists():
    time.sleep(float((control / "sleep").read_text()))
"""


def verifying(agent: Agent) -> Agent:
    """Make `agent`'s rebuild the verifying stand-in; operation boot (no confirmation step)."""
    command = [sys.executable, "-c", VERIFY, str(agent.home / "applied.jsonl"), "{dir}", str(agent.control)]
    lines = agent.config.read_text().splitlines()
    at = lines.index("[rebuild]") + 1
    lines[at] = f"command = {json.dumps(command)}"
    lines.insert(at + 1, 'operation = "boot"')
    agent.config.write_text("\n".join(lines) + "\n")
    return agent


def applied(agent: Agent) -> list[dict]:
    path = agent.home / "applied.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def new_blobs(fleet: Fleet, host: str, count: int = 16, size: int = 512 * 1024) -> None:
    """Incompressible files for `host`, new each time: a fetch that takes a while."""
    for index in range(count):
        fleet.edit(host, f"files/srv/blob/{index:02d}", "")
        (fleet.root / "hosts" / host / "files" / "srv" / "blob" / f"{index:02d}").write_bytes(
            os.urandom(size)
        )


def staging(agent: Agent) -> list[Path]:
    trees = agent.home / "state" / "trees"
    return (
        [entry for entry in trees.iterdir() if entry.name.startswith(".staging-")] if trees.exists() else []
    )


def poll_fast(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        time.sleep(0.002)


# ---------------------------------------------------------------- kill -9 the agent


KILLS = 20


@pytest.mark.timeout(900)
@pytest.mark.parametrize("moment", ["fetch", "apply"])
def test_an_agent_killed_during_fetch_or_apply_converges_and_never_applies_a_partial_tree(
    moment: str, fleet: Fleet, serve: Serve, state: Path, watcher: Watcher, tmp_path: Path
):
    rng = random.Random(20261125)
    agent = verifying(make_agent(fleet, "alpha", serve, tmp_path))
    (agent.control / "sleep").write_text("0.6")  # the "rebuild" takes 0.6 s: kills land inside it
    trees = agent.home / "state" / "trees"

    # Calibrate: how long does a fetch of this size take here, start to commit?
    new_blobs(fleet, "alpha")
    publish(fleet, state, serve)
    generation = current_generation(state, "alpha")
    agent.start()
    poll_fast(lambda: staging(agent), "the first fetch started")
    began = time.monotonic()
    poll_fast((trees / str(generation)).is_dir, "the first fetch committed")
    fetch_seconds = time.monotonic() - began
    wait_until(lambda: agent.deployed() == generation, "the first generation applied")
    agent.stop()

    kills, converge, attempts = 0, [], 0
    while kills < KILLS and attempts < 2 * KILLS:
        attempts += 1
        new_blobs(fleet, "alpha")
        publish(fleet, state, serve)
        generation = current_generation(state, "alpha")
        agent.start()
        if moment == "fetch":
            poll_fast(lambda: staging(agent), "the fetch started")
            time.sleep(rng.uniform(0, fetch_seconds * 0.9))
        else:
            poll_fast(
                lambda g=generation: any(r["tree"].endswith(f"/{g}") for r in applied(agent)), "rebuild"
            )
            time.sleep(rng.uniform(0, 0.6))
        assert agent.proc is not None
        agent.proc.stop(sig=signal.SIGKILL)
        committed = (trees / str(generation)).is_dir()
        if (moment == "fetch") != committed and agent.deployed() != generation:
            kills += 1  # the kill landed where this test aims (else: try again, not counted)

        # Nothing half-fetched was ever handed to the rebuild, and what is recorded is whole.
        assert all(run["complete"] for run in applied(agent)), applied(agent)
        assert agent.deployed() in (generation - 1, generation)
        release = agent.home / "state" / "release"
        if release.is_symlink():
            assert (agent.home / "state" / f"{release.readlink()}.manifest").exists()

        restarted = time.monotonic()
        agent.start()
        wait_until(lambda g=generation: agent.deployed() == g, f"generation {generation} after the kill")
        watcher.wait_state(
            "alpha",
            lambda s, g=generation: s.phase is Phase.IDLE and s.deployed_generation == g,
            "the reported state matches what is deployed",
        )
        converge.append(time.monotonic() - restarted)
        agent.stop()
        assert staging(agent) == []  # a killed fetch leaves nothing behind once the agent has run

    # Every attempt killed the agent and restarted it; `kills` counts those that landed inside
    # the fetch (or apply) the test aims at.
    record(Row(f"kill -9 the agent during {moment} ({kills} inside it)", attempts, len(converge), converge))
    assert kills == KILLS, f"only {kills} of {attempts} kills landed during the {moment}"
    assert all(run["complete"] for run in applied(agent))


# ---------------------------------------------------------------- many agents


def big_fleet(root: Path, hosts: int) -> Fleet:
    keys = make_fleet(root, hosts, files=2)
    (root / "fleet" / "shared.nix").write_text("{ ... }: { }\n")
    for name in keys:
        (root / "fleet" / "hosts" / name / "shared.nix").symlink_to("../../shared.nix")
    return Fleet(root / "fleet", keys)


def agent_processes(root: Path, fleet: Fleet, serve: Serve, logs: Path) -> list[Proc]:
    info = {"sftp_port": serve.sftp_port, "sftp_host_key": serve.host_key, "mqtt": serve.mqtt}
    configs = [str(path) for path in agent_configs(root, fleet.keys, info)]
    return [
        Proc(
            f"agents-{index}",
            [sys.executable, "-m", "bench.agents_process", *configs[index : index + AGENTS_PER_PROCESS]],
            logs / f"agents-{index}.log",
        )
        for index in range(0, len(configs), AGENTS_PER_PROCESS)
    ]


def rebuilds(root: Path, host: str) -> list[tuple[float, int]]:
    """(start time, generation) of each rebuild the host ran."""
    path = root / "agents" / host / "started"
    if not path.exists():
        return []
    runs = []
    for line in path.read_text().splitlines():
        at, tree = line.split()
        runs.append((float(at), int(tree.rsplit("/", 1)[1])))
    return runs


def at_generation(root: Path, fleet: Fleet, generation: int) -> bool:
    return all((runs := rebuilds(root, host)) and runs[-1][1] == generation for host in fleet.hosts)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.mark.timeout(600)
def test_200_agents_converge_after_the_broker_is_killed_and_restarted(tmp_path: Path, logs: Path):
    root, state = tmp_path, tmp_path / "state"
    fleet = big_fleet(root, 200)
    serve = start_serve(fleet, state, logs, http="off")
    workers = agent_processes(root, fleet, serve, logs)
    try:
        wait_until(lambda: at_generation(root, fleet, 1), "200 agents at generation 1", timeout=300)
        serve.proc.stop(sig=signal.SIGKILL)  # the embedded broker (and SFTP) gone at once
        (root / "fleet" / "shared.nix").write_text('{ ... }: { after = "the crash"; }\n')
        restarted = time.time()
        serve = start_serve(
            fleet, state, logs, mqtt=serve.mqtt.removeprefix("mqtt://"), sftp=f"127.0.0.1:{serve.sftp_port}"
        )
        with_deadline = time.monotonic() + 90
        while not at_generation(root, fleet, 2) and time.monotonic() < with_deadline:
            time.sleep(0.5)
        times = [rebuilds(root, h)[-1][0] - restarted for h in fleet.hosts if rebuilds(root, h)[-1][1] == 2]
        lost = len(fleet.hosts) - len(times)
        record(Row("kill -9 the broker under 200 agents", 1, len(times), times, lost=lost))
        assert lost == 0, f"{lost} agents not at generation 2 within 90 s of the restart"
        assert max(times) <= 60, f"the last agent needed {max(times):.0f}s"
        assert all(w.alive() for w in workers)
    finally:
        for worker in workers:
            worker.stop()
        serve.stop()


SOAK_AGENTS = 200
SOAK_PUBLISHES = 50
SOAK_SECONDS = 300.0


@pytest.mark.timeout(1200)
def test_soak_200_agents_50_publishes_nothing_lost_nothing_twice_no_growth(tmp_path: Path, logs: Path):
    root, state = tmp_path, tmp_path / "state"
    fleet = big_fleet(root, SOAK_AGENTS)
    serve = start_serve(fleet, state, logs, http="off")
    workers = agent_processes(root, fleet, serve, logs)
    pids = {"herald serve": serve.proc.pid} | {w.name: w.pid for w in workers}
    try:
        wait_until(lambda: at_generation(root, fleet, 1), "every agent at generation 1", timeout=300)
        started = time.monotonic()
        warm: dict[str, int] = {}
        for index in range(SOAK_PUBLISHES):
            (root / "fleet" / "shared.nix").write_text(f"{{ ... }}: {{ soak = {index}; }}\n")
            done = herald(
                "publish", "--fleet", str(fleet.root), "--state", str(state), "--broker", serve.mqtt
            )
            assert done.returncode == 0, done.stdout + done.stderr
            last = time.time()  # the newest generation is announced
            if index == SOAK_PUBLISHES // 5:
                warm = {name: rss_kib(pid) for name, pid in pids.items()}  # after warm-up
            time.sleep(max(0.0, started + (index + 1) * SOAK_SECONDS / SOAK_PUBLISHES - time.monotonic()))
        final = current_generation(state, "host000")
        deadline = time.monotonic() + 120
        while not at_generation(root, fleet, final) and time.monotonic() < deadline:
            time.sleep(0.5)
        end = {name: rss_kib(pid) for name, pid in pids.items()}

        lost = duplicates = 0
        times = []
        applies = []
        for host in fleet.hosts:
            runs = rebuilds(root, host)
            generations = [generation for _, generation in runs]
            duplicates += len(generations) - len(set(generations))
            assert generations == sorted(generations), f"{host} went back: {generations}"
            if generations[-1] != final:
                lost += 1
            else:
                times.append(max(0.0, runs[-1][0] - last))
            applies.append(len(generations) - 1)
        record(
            Row(
                f"soak: {SOAK_AGENTS} agents, {SOAK_PUBLISHES} publishes in {SOAK_SECONDS:.0f} s "
                f"(each agent applied {statistics.median(applies):.0f} of them, median)",
                SOAK_AGENTS * SOAK_PUBLISHES,
                len(times),
                times,
                lost=lost,
                duplicates=duplicates,
            )
        )
        assert lost == 0
        assert duplicates == 0
        growth = {name: end[name] / warm[name] - 1 for name in pids}
        print("RSS growth after warm-up:", {name: f"{value:+.1%}" for name, value in growth.items()})
        assert all(value < 0.10 for value in growth.values()), growth
        assert all(w.alive() for w in workers)
    finally:
        for worker in workers:
            worker.stop()
        serve.stop()


# ---------------------------------------------------------------- the server away


@pytest.mark.timeout(600)
def test_sftp_down_for_60s_during_a_publish_agents_back_off_then_converge(
    fleet: Fleet, state: Path, logs: Path, tmp_path: Path
):
    server = start_serve(fleet, state, logs, mqtt="off")
    agents = [make_agent(fleet, host, server, tmp_path, poll="2s", broker="").start() for host in fleet.hosts]
    try:
        for agent in agents:
            wait_until(lambda a=agent: a.deployed() == 1, f"{agent.host} at generation 1")
        server.stop()
        for host in fleet.hosts:
            fleet.edit(host, "files/etc/motd", "published while the server was away\n")
        assert herald("publish", "--fleet", str(fleet.root), "--state", str(state)).returncode == 0
        outage = 60.0
        time.sleep(outage)  # the outage itself: what is under test is what the agents do meanwhile
        tries = {a.host: a.proc.output().count("next try in") for a in agents if a.proc is not None}
        back = time.time()
        server = start_serve(fleet, state, logs, mqtt="off", sftp=f"127.0.0.1:{server.sftp_port}")
        for agent in agents:
            wait_until(lambda a=agent: a.deployed() == 2, f"{agent.host} at generation 2", timeout=150)
        times = [agent.rebuilds()[-1]["t"] - back for agent in agents]
        record(Row("SFTP server down 60 s during a publish", len(agents), len(times), times))
        # A 2 s poll would have tried 30 times; backoff (2, 4, 8 ... s) tries about 6 times.
        assert all(1 <= count <= 8 for count in tries.values()), tries
    finally:
        for agent in agents:
            agent.stop()
        server.stop()


def test_an_agent_offline_through_3_publishes_applies_only_the_newest_once(
    fleet: Fleet, serve: Serve, state: Path, watcher: Watcher, tmp_path: Path
):
    agent = make_agent(fleet, "beta", serve, tmp_path)
    assert agent.once().returncode == 0
    for index in range(3):
        fleet.edit("beta", "configuration.nix", f"{{ ... }}: {{ offline = {index}; }}\n")
        publish(fleet, state, serve)
    newest = current_generation(state, "beta")
    assert newest == 4
    back = time.monotonic()
    agent.start()
    try:
        watcher.wait_state(
            "beta", lambda s: s.deployed_generation == newest and s.phase is Phase.IDLE, "beta at the newest"
        )
        took = time.monotonic() - back
        check = herald("trigger", "--broker", serve.mqtt, "--state", str(state), "beta", "--wait")
        assert check.returncode == 0, check.stdout + check.stderr  # a check after: up to date, no apply
        dirs = [record["args"][1] for record in agent.rebuilds()]
        record_row = Row("agent offline through 3 publishes", 1, int(agent.deployed() == newest), [took])
        record_row.duplicates = len(dirs) - len(set(dirs))
        record(record_row)
        assert [Path(d).name for d in dirs] == ["1", "4"]  # generations 2 and 3 never applied
    finally:
        agent.stop()


# ---------------------------------------------------------------- this machine


def test_a_full_state_disk_is_a_clear_error_keeps_the_deployment_and_recovers(
    fleet: Fleet, serve: Serve, state: Path, tmp_path: Path
):
    need_root()
    agent = make_agent(fleet, "alpha", serve, tmp_path)
    disk = agent.home / "state"
    disk.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "herald-test", str(disk)], check=True)
    try:
        assert agent.once().returncode == 0
        before = {
            p.relative_to(disk): p.read_bytes() for p in (disk / "trees" / "1").rglob("*") if p.is_file()
        }
        fleet.edit("alpha", "files/srv/big", "")
        (fleet.root / "hosts" / "alpha" / "files" / "srv" / "big").write_bytes(os.urandom(3 << 20))
        publish(fleet, state)

        full = agent.once()
        lines = (full.stdout + full.stderr).strip().splitlines()
        assert full.returncode != 0
        assert "No space left on device" in lines[-1], lines
        assert agent.deployed() == 1
        assert {
            p.relative_to(disk): p.read_bytes() for p in (disk / "trees" / "1").rglob("*") if p.is_file()
        } == before
        assert staging(agent) == []
        assert len(agent.rebuilds()) == 1  # nothing half-fetched reached the rebuild

        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        recovered = agent.once()
        assert recovered.returncode == 0, recovered.stdout + recovered.stderr
        assert agent.deployed() == 2
        record(Row("agent state disk full, then space again", 1, 1))
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def libfaketime() -> str:
    need("faketime")
    for candidate in Path("/usr/lib").glob("*/faketime/libfaketime.so.1"):
        return str(candidate)
    pytest.fail("faketime is installed but libfaketime.so.1 was not found")


@pytest.mark.parametrize("skew", ["+1h", "-1h"])
def test_an_agent_whose_clock_is_an_hour_off_decides_by_generations(
    skew: str, fleet: Fleet, serve: Serve, state: Path, watcher: Watcher, tmp_path: Path
):
    agent = make_agent(fleet, "gamma", serve, tmp_path, confirm="5s")
    env = os.environ | {
        "LD_PRELOAD": libfaketime(),
        "FAKETIME": skew,
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_DONT_RESET": "1",
    }
    agent.proc = Proc(
        "agent-gamma", [*HERALD, "agent", "--config", str(agent.config)], agent.home / "agent.log", env
    )
    try:
        first = watcher.wait_state("gamma", lambda s: s.deployed_generation == 1, "gamma at generation 1")
        offset = (first.since - now()).total_seconds()
        assert abs(offset - (3600 if skew == "+1h" else -3600)) < 300, (
            f"the agent's clock is off by {offset:.0f}s"
        )

        fleet.edit("gamma", "configuration.nix", "{ ... }: { skewed = true; }\n")
        began = time.monotonic()
        publish(fleet, state, serve)
        watcher.wait_state("gamma", lambda s: s.deployed_generation == 2 and s.phase is Phase.IDLE, "at 2")
        took = time.monotonic() - began
        done = herald(
            "trigger", "--broker", serve.mqtt, "--state", str(state), "--action", "rebuild", "gamma", "--wait"
        )
        assert done.returncode == 0, done.stdout + done.stderr
        applied = [Path(r["args"][1]).name for r in agent.rebuilds()]
        record(  # the third rebuild is the one `trigger --action rebuild` asked for
            Row(
                f"agent clock {skew[0]}1 h off",
                1,
                int(agent.deployed() == 2),
                [took],
                duplicates=max(0, len(applied) - 3),
            )
        )
        assert applied == ["1", "2", "2"]
        assert agent.deployed() == 2
    finally:
        agent.stop()
