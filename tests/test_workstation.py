"""Workstations and laptops: postponing on battery or a metered link, reboots, notices, history.

The agents run against a real `herald serve`; battery, /run/*-system links and the session bus
are directories the agent is pointed at; notify-send and the reboot command are recorders.
"""

import asyncio
import contextlib
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from helpers import Agent, Fleet, Serve, Watcher, herald, make_agent, start_serve, wait_until
from test_agent_loop import free_port, publish

from client.agent import Agent as AgentLoop
from client.workstation import SuspendWatch, on_battery, reboot_needed, until_window
from protocol.messages import Phase
from protocol.settings import AgentConfig, load

RECORDER = (
    "import json, os, sys; bus = os.environ.get('DBUS_SESSION_BUS_ADDRESS'); "
    "open(sys.argv[1], 'a').write(json.dumps([sys.argv[2:], bus]) + '\\n')"
)


def recorder(path: Path, *args: str) -> list[str]:
    """An argv that appends its arguments (and the session bus it was given) to `path`."""
    return [sys.executable, "-c", RECORDER, str(path), *args]


def recorded(path: Path) -> list[list]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def configure(agent: Agent, text: str) -> None:
    agent.config.write_text(agent.config.read_text() + "\n" + text)


# ---------------------------------------------------------------- fake machines


def power_supply(root: Path, *, ac: bool) -> Path:
    """A /sys/class/power_supply with a mains adapter and a battery."""
    for name, values in {
        "AC": {"type": "Mains", "online": "1" if ac else "0"},
        "BAT0": {"type": "Battery", "status": "Charging" if ac else "Discharging", "present": "1"},
    }.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for key, value in values.items():
            (root / name / key).write_text(value + "\n")
    return root


def nixos_system(root: Path, name: str, kernel: str) -> str:
    """A system in ROOT/nix/store/NAME whose kernel links name `kernel`; its path on the machine."""
    system = root / "nix" / "store" / name
    system.mkdir(parents=True)
    (system / "kernel").symlink_to(f"/nix/store/{kernel}-linux/bzImage")
    (system / "initrd").symlink_to(f"/nix/store/{kernel}-initrd/initrd")
    (system / "kernel-modules").symlink_to(f"/nix/store/{kernel}-modules")
    return f"/nix/store/{name}"


def boot(root: Path, system: str) -> None:
    """The machine booted `system`: booted-system, current-system and the profile name it."""
    (root / "run").mkdir(parents=True, exist_ok=True)
    (root / "nix" / "var" / "nix" / "profiles").mkdir(parents=True, exist_ok=True)
    (root / "nix" / "var" / "nix" / "profiles" / "system-1-link").symlink_to(system)
    (root / "nix" / "var" / "nix" / "profiles" / "system").symlink_to("system-1-link")
    for link in ("booted-system", "current-system"):
        (root / "run" / link).symlink_to(system)


# ---------------------------------------------------------------- the checks themselves


def test_reboot_needed_compares_the_booted_system_with_the_next_one(tmp_path: Path):
    root = tmp_path / "root"
    assert not reboot_needed(root)  # not NixOS: no links, never a reboot
    old = nixos_system(root, "aaa-nixos-system", "6.6.1")
    same_kernel = nixos_system(root, "bbb-nixos-system", "6.6.1")
    new_kernel = nixos_system(root, "ccc-nixos-system", "6.6.9")
    boot(root, old)
    assert not reboot_needed(root)

    profile = root / "nix" / "var" / "nix" / "profiles"
    (profile / "system-2-link").symlink_to(same_kernel)
    (profile / "system").unlink()
    (profile / "system").symlink_to("system-2-link")
    assert not reboot_needed(root)  # another system, the same kernel, initrd and modules

    (profile / "system-3-link").symlink_to(new_kernel)
    (profile / "system").unlink()
    (profile / "system").symlink_to("system-3-link")
    assert reboot_needed(root)  # `boot` (or `switch`) to a new kernel: the next boot differs

    (profile / "system").unlink()  # no profile: /run/current-system decides
    assert not reboot_needed(root)
    (root / "run" / "current-system").unlink()
    (root / "run" / "current-system").symlink_to(new_kernel)
    assert reboot_needed(root)


def test_a_loop_of_links_is_no_reboot(tmp_path: Path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "booted-system").symlink_to("/run/current-system")
    (tmp_path / "run" / "current-system").symlink_to("/run/booted-system")
    assert not reboot_needed(tmp_path)


@pytest.mark.parametrize(
    ("window", "at", "expected"),
    [
        ("02:00-04:00", "03:10", 0),
        ("02:00-04:00", "04:00", 22 * 3600),
        ("02:00-04:00", "01:30", 1800),
        ("22:00-02:00", "23:59", 0),
        ("22:00-02:00", "01:59", 0),
        ("22:00-02:00", "02:00", 20 * 3600),
    ],
)
def test_the_reboot_window_may_cross_midnight(window: str, at: str, expected: float):
    moment = datetime(2026, 11, 25, int(at[:2]), int(at[3:]), tzinfo=datetime.now().astimezone().tzinfo)
    assert until_window(window, moment) == expected


def test_on_battery_needs_a_discharging_battery_and_no_mains(tmp_path: Path):
    assert not on_battery(tmp_path / "missing")  # unreadable: never postpones
    assert not on_battery(power_supply(tmp_path / "ac", ac=True))
    assert on_battery(power_supply(tmp_path / "battery", ac=False))
    desktop = tmp_path / "desktop"
    desktop.mkdir()
    assert not on_battery(desktop)


def test_a_suspend_is_noticed_from_the_two_clocks():
    clock = [100.0, 50.0]
    watch = SuspendWatch(source=lambda: (clock[0], clock[1]))
    clock[0] += 10
    clock[1] += 10
    assert watch.slept() == 0.0  # both clocks ran: awake
    clock[0] += 3600
    clock[1] += 2
    assert watch.slept() == 3598  # boot time ran on while monotonic time stood still


# ---------------------------------------------------------------- agents


def test_on_battery_an_update_is_postponed_and_applied_on_mains(
    fleet: Fleet, serve: Serve, state: Path, watcher: Watcher, tmp_path: Path
):
    supplies = power_supply(tmp_path / "power", ac=False)
    agent = make_agent(fleet, "alpha", serve, tmp_path)
    configure(agent, f'[postpone]\non_battery = true\npower_supply = "{supplies}"\nrecheck = "1s"\n')
    agent.start()
    try:
        postponed = watcher.wait_state(
            "alpha", lambda s: s.phase is Phase.POSTPONED, "the first generation postponed"
        )
        assert postponed.message == "generation 1 postponed: on battery"
        assert postponed.target_generation == 1
        time.sleep(2.5)  # two rechecks on battery: still nothing applied
        assert agent.rebuilds() == []

        power_supply(supplies, ac=True)  # plugged in: applied by the recheck alone, no message
        watcher.wait_state("alpha", lambda s: s.phase is Phase.IDLE and s.deployed_generation == 1, "applied")
        assert [record["args"][0] for record in agent.rebuilds()] == ["switch"]
    finally:
        agent.stop()


def test_a_metered_link_postpones_and_the_person_can_apply_anyway(fleet: Fleet, serve: Serve, tmp_path: Path):
    agent = make_agent(fleet, "gamma", serve, tmp_path)
    answer = tmp_path / "metered"
    answer.write_text("u 1\n")  # NetworkManager's Metered property through busctl: yes
    metered = [sys.executable, "-c", f"print(open({str(answer)!r}).read().strip())"]
    configure(agent, f"[postpone]\non_metered = true\nmetered = {json.dumps(metered)}\n")

    waits = agent.once()
    assert waits.returncode == 0, waits.stdout + waits.stderr  # postponed is not an error
    assert "postponed (deployed generation 0) generation 1 postponed: on a metered connection" in waits.stdout
    assert agent.rebuilds() == []

    answer.write_text("u 4\n")  # guess-no
    assert agent.once().returncode == 0
    assert len(agent.rebuilds()) == 1

    answer.write_text("yes\n")  # nmcli's answer reads the same
    fleet.edit("gamma", "configuration.nix", "{ ... }: { metered = true; }\n")
    publish(fleet, serve.state)
    assert "postponed: on a metered connection" in agent.once().stdout
    forced = herald("agent", "--config", str(agent.config), "--once", "--now")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert agent.deployed() == 2


def test_after_a_switch_to_a_new_kernel_a_reboot_is_reported_and_notified(
    fleet: Fleet, serve: Serve, watcher: Watcher, tmp_path: Path
):
    agent = make_agent(fleet, "alpha", serve, tmp_path)
    root = agent.home / "root"
    boot(root, nixos_system(root, "aaa-nixos-system", "6.6.1"))
    (agent.control / "system").write_text(nixos_system(root, "bbb-nixos-system", "6.6.9"))
    notices = tmp_path / "notices.jsonl"
    runtime = tmp_path / "run-user"
    (runtime / str(os.geteuid())).mkdir(parents=True)
    (runtime / str(os.geteuid()) / "bus").touch()
    (runtime / "not-a-user").mkdir()
    command = recorder(notices, "{summary}", "{body}", "{urgency}")
    configure(agent, f'[notify]\ncommand = {json.dumps(command)}\nruntime_dir = "{runtime}"\n')

    done = agent.once()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "a reboot is needed" in done.stdout
    state = watcher.wait_state("alpha", lambda s: s.deployed_generation == 1, "alpha reported")
    assert state.needs_reboot
    ((args, bus),) = recorded(notices)
    assert args[0] == "System updated to generation 1"
    assert "A restart is needed to finish the update." in args[1]
    assert args[2] == "normal"
    assert bus == f"unix:path={runtime / str(os.geteuid()) / 'bus'}"

    status = herald("status", "--state", str(serve.state), "--broker", serve.mqtt, "--json")
    assert status.returncode == 0, status.stderr
    (alpha,) = [host for host in json.loads(status.stdout) if host["host"] == "alpha"]
    assert alpha["state"]["needs_reboot"] is True

    (agent.control / "fail").touch()  # a failure is told too, and loudly
    assert herald("agent", "--config", str(agent.config), "--once").returncode == 0  # up to date
    fleet.edit("alpha", "configuration.nix", "{ ... }: { fails = true; }\n")
    publish(fleet, serve.state)
    assert agent.once().returncode == 1
    summary, body, urgency = recorded(notices)[-1][0]
    assert (summary, urgency) == ("System update failed", "critical")
    assert body == (  # the user is told it is tried again, and when
        "generation 2: rebuild failed with exit code 1; attempt 1 of 3: tried again at a check 1h from now"
    )
    assert len(recorded(notices)) == 2  # the up-to-date check told nobody anything


def test_inside_its_window_the_agent_reboots_once(fleet: Fleet, serve: Serve, tmp_path: Path):
    agent = make_agent(fleet, "beta", serve, tmp_path)
    root = agent.home / "root"
    boot(root, nixos_system(root, "aaa-nixos-system", "6.6.1"))
    (agent.control / "system").write_text(nixos_system(root, "bbb-nixos-system", "6.6.9"))
    reboots = tmp_path / "reboots.jsonl"
    start = datetime.now().astimezone() - timedelta(minutes=1)
    window = f"{start:%H:%M}-{start + timedelta(hours=2):%H:%M}"  # open now
    configure(agent, f'[reboot]\nwindow = "{window}"\ncommand = {json.dumps(recorder(reboots, "reboot"))}\n')
    agent.start()
    try:
        wait_until(lambda: recorded(reboots), "the reboot command ran")
        assert [record["args"][0] for record in agent.rebuilds()] == ["boot"]  # beta: boot
        assert agent.deployed() == 1  # the reboot came after the run, never during it
        wait_until(lambda: "a reboot is needed and the window" in agent.proc.output(), "logged")
        time.sleep(2)
        assert len(recorded(reboots)) == 1  # once: a reboot restarts the agent
    finally:
        agent.stop()


def test_outside_its_window_a_needed_reboot_is_only_reported(
    fleet: Fleet, serve: Serve, watcher: Watcher, tmp_path: Path
):
    agent = make_agent(fleet, "beta", serve, tmp_path)
    root = agent.home / "root"
    boot(root, nixos_system(root, "aaa-nixos-system", "6.6.1"))
    (agent.control / "system").write_text(nixos_system(root, "bbb-nixos-system", "6.6.9"))
    closed = datetime.now().astimezone() + timedelta(hours=3)
    reboots = tmp_path / "reboots.jsonl"
    window = f"{closed:%H:%M}-{closed + timedelta(hours=1):%H:%M}"
    configure(agent, f'[reboot]\nwindow = "{window}"\ncommand = {json.dumps(recorder(reboots, "reboot"))}\n')
    agent.start()
    try:
        watcher.wait_state("beta", lambda s: s.deployed_generation == 1 and s.needs_reboot, "reboot needed")
        time.sleep(2)  # inside the window the reboot follows the run at once (the test above)
        assert not reboots.exists()
    finally:
        agent.stop()


def fetch_page(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback test page
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def test_the_local_page_lists_the_last_updates_with_their_logs(
    fleet: Fleet, serve: Serve, state: Path, tmp_path: Path
):
    port = free_port()
    agent = make_agent(fleet, "gamma", serve, tmp_path, trigger=f"127.0.0.1:{port}").start()
    page = f"http://127.0.0.1:{port}/"
    try:
        wait_until(lambda: agent.deployed() == 1, "gamma at generation 1")
        (agent.control / "fail").touch()
        fleet.edit("gamma", "configuration.nix", "{ ... }: { history = 2; }\n")
        publish(fleet, state, serve)

        def two_runs() -> list[tuple[str, str, str]] | None:
            status, body = fetch_page(page)
            found = re.findall(
                r"<tr><td>[^<]+</td><td>(\d+)</td><td>([a-z-]+)</td><td><a href=\"([^\"]+)\">", body
            )
            return found if status == 200 and len(found) == 2 else None

        history = wait_until(two_runs, "two runs on the page")
        assert [(generation, result) for generation, result, _ in history] == [
            ("2", "failed"),
            ("1", "applied"),
        ]
        status, text = fetch_page(f"http://127.0.0.1:{port}{history[0][2]}")
        assert status == 200
        assert "herald agent" in text
        assert "rebuild failed with exit code 1" in text
        assert fetch_page(page + "logs/..%2F..%2Fdeployed.json")[0] == 404
        assert fetch_page(page + "logs/deployed.json")[0] == 404
    finally:
        agent.stop()


# ---------------------------------------------------------------- waking up


def test_after_a_suspend_the_agent_waits_for_the_server_then_checks(
    fleet: Fleet, state: Path, logs: Path, tmp_path: Path
):
    server = start_serve(fleet, state, logs, mqtt="off")
    agent = make_agent(fleet, "alpha", server, tmp_path, broker="", confirm="3s")
    config = load(agent.config, AgentConfig)
    clock = [1000.0, 1000.0]
    slept = asyncio.Event()

    async def scenario() -> None:
        nonlocal server
        loop = AgentLoop(config)
        loop.suspend = SuspendWatch(tick=0.1, source=lambda: (clock[0], clock[1]))
        running = asyncio.create_task(loop.run())
        try:
            await until(lambda: loop.reporter.state.log is not None, "alpha's first run reported")
            applied = loop.reporter.state
            assert (applied.phase, applied.deployed_generation) == (Phase.IDLE, 1)
            server.stop()  # the lid closes; the server goes out of reach
            fleet.edit("alpha", "configuration.nix", '{ ... }: { after = "resume"; }\n')
            assert herald("publish", "--fleet", str(fleet.root), "--state", str(state)).returncode == 0
            clock[0] += 8 * 3600  # eight hours asleep
            slept.set()
            await asyncio.sleep(3)  # awake, no server yet: no check that fails, nothing rolled back
            assert [r["args"][0] for r in agent.rebuilds()] == ["switch"]
            assert loop.reporter.state == applied  # not even a check that failed
            server = await asyncio.to_thread(
                start_serve, fleet, state, logs, mqtt="off", sftp=f"127.0.0.1:{server.sftp_port}"
            )
            await until(lambda: agent.deployed() == 2, "generation 2 after waking", timeout=60)
            assert [r["args"][0] for r in agent.rebuilds()] == ["switch", "switch"]
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running

    try:
        asyncio.run(scenario())
    finally:
        server.stop()
    assert slept.is_set()


async def until(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        await asyncio.sleep(0.05)
