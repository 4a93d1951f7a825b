"""The running agent: confirmation and rollback, commands, the local page, outages, bad payloads."""

import contextlib
import os
import re
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from helpers import Agent, Fleet, Serve, Watcher, herald, make_agent, start_serve, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.messages import Phase
from protocol.topics import ADMIN_USER, PUBLISHER_USER


def publish(fleet: Fleet, state: Path, serve: Serve | None = None) -> None:
    broker = ["--broker", serve.mqtt] if serve is not None and serve.mqtt else []
    done = herald("publish", "--fleet", str(fleet.root), "--state", str(state), *broker)
    assert done.returncode == 0, done.stdout + done.stderr


def args_of(agent: Agent) -> list[str]:
    return [record["args"][0] for record in agent.rebuilds()]


# ---------------------------------------------------------------- confirm or roll back


def test_a_switch_that_fails_its_health_check_is_rolled_back(
    fleet: Fleet, serve: Serve, state: Path, tmp_path
):
    agent = make_agent(fleet, "alpha", serve, tmp_path, confirm="3s")
    assert agent.once().returncode == 0  # the first deployment is never rolled back
    agent.config.write_text(
        agent.config.read_text().replace('window = "3s"', 'window = "3s"\nhealth = ["false"]')
    )
    fleet.edit("alpha", "configuration.nix", "{ ... }: { broken = true; }\n")
    publish(fleet, state)

    done = agent.once()
    assert done.returncode == 1
    assert "rolled_back" in done.stdout
    assert "rolled back: health command false exited with 1" in done.stdout
    assert args_of(agent) == ["switch", "switch", "rollback"]
    assert agent.deployed() == 1
    (log,) = (state / "chroot" / "alpha" / "logs").glob("*-g2-rolled-back.log")
    assert "not confirmed yet: health command false exited with 1" in log.read_text()

    again = agent.once()  # a generation that was rolled back is not tried again by itself
    assert again.returncode == 1
    assert args_of(agent) == ["switch", "switch", "rollback"]


def test_the_confirmation_says_what_it_checked(
    fleet: Fleet, serve: Serve, state: Path, watcher: Watcher, tmp_path: Path
):
    """After a switch the log says what was confirmed: the broker and the health command only
    when there were ones to check."""
    full = make_agent(fleet, "alpha", serve, tmp_path)
    full.config.write_text(
        full.config.read_text().replace('window = "10s"', 'window = "10s"\nhealth = ["true"]')
    )
    bare = make_agent(fleet, "gamma", serve, tmp_path, broker="")
    full.start()
    try:
        watcher.wait_state(
            "alpha", lambda s: s.phase is Phase.IDLE and s.deployed_generation == 1, "alpha at 1"
        )
        assert bare.once().returncode == 0
        for host in ("alpha", "gamma"):
            fleet.edit(host, "configuration.nix", "{ ... }: { version = 2; }\n")
        publish(fleet, state, serve)
        watcher.wait_state(
            "alpha", lambda s: s.phase is Phase.IDLE and s.deployed_generation == 2, "alpha at 2"
        )
        assert bare.once().returncode == 0
    finally:
        full.stop()
    logs = state / "chroot"
    (alpha,) = (logs / "alpha" / "logs").glob("*-g2-applied.log")
    assert (
        "confirmed after the switch: the server answers, the broker answers and the health command "
        "true passed\n" in alpha.read_text()
    )
    (gamma,) = (logs / "gamma" / "logs").glob("*-g2-applied.log")
    assert (
        "confirmed after the switch: the server answers (no broker connection before the switch; "
        "no health command configured)\n" in gamma.read_text()
    )


def test_a_switch_after_which_the_server_is_unreachable_is_rolled_back(
    fleet: Fleet, serve: Serve, state: Path, tmp_path
):
    agent = make_agent(fleet, "beta", serve, tmp_path, confirm="4s")
    agent.config.write_text(
        agent.config.read_text().replace("boot", "switch")
    )  # beta's fleet default is boot
    agent.config.write_text(agent.config.read_text().replace("[rebuild]", '[rebuild]\noperation = "switch"'))
    assert agent.once().returncode == 0
    fleet.edit("beta", "configuration.nix", "{ ... }: { network.broken = true; }\n")
    publish(fleet, state)
    (agent.control / "sleep").write_text("1.5")  # time for the server to go away during the "switch"
    run = herald_async(agent)
    try:
        wait_until(lambda: len(agent.rebuilds()) == 2, "the second switch started")
        os.kill(serve.proc.pid, signal.SIGSTOP)  # the switch "broke the network": no answer at all
        out, _ = run.communicate(timeout=60)
    finally:
        os.kill(serve.proc.pid, signal.SIGCONT)
    assert run.returncode == 1
    assert "rolled back: " in out
    assert "unreachable" in out or "no answer within" in out
    assert args_of(agent) == ["switch", "switch", "rollback"]
    assert agent.deployed() == 1


def herald_async(agent: Agent):
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    return subprocess.Popen(
        [sys.executable, "-m", "herald", "agent", "--config", str(agent.config), "--once"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


# ---------------------------------------------------------------- commands


def command_payload(command_id: str, action: str) -> bytes:
    return (
        f'{{"id": "{command_id}", "action": "{action}", "issued_at": "2026-11-25T12:00:00Z", "by": "test"}}'
    ).encode()


def admin_client(serve: Serve, state: Path) -> mqtt.Client:
    host, port = serve.mqtt.removeprefix("mqtt://").rsplit(":", 1)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"herald-admin.{time.monotonic_ns()}")
    client.username_pw_set(ADMIN_USER, (state / "broker" / f"{ADMIN_USER}.secret").read_text().strip())
    client.connect(host, int(port))
    client.loop_start()
    return client


def test_a_command_runs_once_even_when_delivered_again(
    fleet: Fleet, serve: Serve, state: Path, watcher: Watcher, tmp_path
):
    agent = make_agent(fleet, "gamma", serve, tmp_path).start()
    try:
        watcher.wait_state(
            "gamma", lambda s: s.deployed_generation == 1 and s.phase is Phase.IDLE, "at generation 1"
        )
        admin = admin_client(serve, state)
        for _ in range(3):  # duplicate delivery of the same retained command
            admin.publish(
                "herald/gamma/command", command_payload("rebuild-1", "rebuild"), qos=1, retain=True
            ).wait_for_publish(10)
        wait_until(lambda: len(agent.rebuilds()) == 2, "the forced rebuild")
        agent.stop()  # the retained command is delivered again on reconnect
        agent.start()
        watcher.marker()
        admin.publish(
            "herald/gamma/command", command_payload("check-2", "check"), qos=1, retain=True
        ).wait_for_publish(10)
        wait_until(
            lambda: "command check-2" in agent.proc.output() if agent.proc else False,
            "the check command seen",
        )
        admin.loop_stop()
        admin.disconnect()
        assert len(agent.rebuilds()) == 2
        assert agent.proc is not None
        assert agent.proc.output().count("command rebuild-1") == 1
    finally:
        agent.stop()


def test_a_rollback_command_returns_to_the_previous_generation(
    fleet: Fleet, serve: Serve, state: Path, watcher: Watcher, tmp_path
):
    agent = make_agent(fleet, "alpha", serve, tmp_path).start()
    try:
        watcher.wait_state("alpha", lambda s: s.deployed_generation == 1, "at generation 1")
        fleet.edit("alpha", "configuration.nix", "{ ... }: { version = 2; }\n")
        publish(fleet, state, serve)
        watcher.wait_state("alpha", lambda s: s.deployed_generation == 2 and s.phase is Phase.IDLE, "at 2")
        done = herald(
            "trigger", "--broker", serve.mqtt, "--state", str(state), "--action", "rollback", "alpha"
        )
        assert done.returncode == 0, done.stderr
        rolled = watcher.wait_state("alpha", lambda s: s.phase is Phase.ROLLED_BACK, "rolled back")
        assert rolled.deployed_generation == 1
        assert rolled.message == "rolled back from generation 2 to 1"
        assert args_of(agent) == ["switch", "switch", "rollback"]
        assert (agent.home / "state" / "release").readlink() == Path("trees/1")
    finally:
        agent.stop()


# ---------------------------------------------------------------- the local page


def free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fetch(url: str, data: bytes | None = None, host: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, data=data)  # noqa: S310 - a loopback URL built here
    if host is not None:
        request.add_header("Host", host)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def test_the_local_page_shows_the_state_and_its_button_requests_a_check(
    fleet: Fleet, serve: Serve, state: Path, tmp_path
):
    port = free_port()
    agent = make_agent(fleet, "alpha", serve, tmp_path, trigger=f"127.0.0.1:{port}").start()
    page = f"http://127.0.0.1:{port}/"
    try:
        wait_until(lambda: agent.deployed() == 1, "alpha at generation 1")

        def shows_generation_1() -> str | None:
            status, body = fetch(page)
            found = status == 200 and re.search(r"deployed generation</th><td>1<", body)
            return body if found else None

        body = wait_until(shows_generation_1, "the page shows generation 1")
        assert "<h1>alpha</h1>" in body
        token = re.search(r'name="token" value="([^"]+)"', body)
        assert token is not None

        fleet.edit("alpha", "configuration.nix", "{ ... }: { page = true; }\n")
        publish(fleet, state)  # no announcement: only the button (or the 1h timer) can bring it
        assert fetch(page + "check", b"token=wrong")[0] == 403
        assert fetch(page + "check", f"token={token[1]}".encode(), host="evil.example:80")[0] == 403
        assert fetch(page, host="evil.example")[0] == 403
        time.sleep(1)
        assert agent.deployed() == 1
        assert fetch(page + "check", f"token={token[1]}".encode())[0] == 200  # after the 303
        wait_until(lambda: agent.deployed() == 2, "alpha at generation 2 after the button")
    finally:
        agent.stop()


def _ok(response: tuple[int, str]) -> tuple[int, str] | None:
    return response if response[0] == 200 else None


# ---------------------------------------------------------------- outages


def test_sftp_down_backs_off_keeps_the_page_and_recovers(fleet: Fleet, state: Path, logs: Path, tmp_path):
    server = start_serve(fleet, state, logs, mqtt="off")
    port = free_port()
    agent = make_agent(fleet, "alpha", server, tmp_path, poll="1s", trigger=f"127.0.0.1:{port}").start()
    assert agent.proc is not None
    try:
        wait_until(lambda: agent.deployed() == 1, "alpha at generation 1")
        server.stop()
        outage = 12.0
        time.sleep(outage)  # the outage itself: the thing under test is what the agent does meanwhile
        attempts = agent.proc.output().count("next try in")
        assert 1 <= attempts <= 6, f"{attempts} connection attempts in {outage}s with a 1s poll: no backoff?"
        assert fetch(f"http://127.0.0.1:{port}/")[0] == 200
        assert agent.proc.alive()

        fleet.edit("alpha", "configuration.nix", '{ ... }: { after = "the outage"; }\n')
        server = start_serve(fleet, state, logs, mqtt="off", sftp=f"127.0.0.1:{server.sftp_port}")
        wait_until(lambda: agent.deployed() == 2, "alpha recovered and applied generation 2", timeout=90)
    finally:
        agent.stop()
        server.stop()


# ---------------------------------------------------------------- hostile payloads

payloads = st.one_of(
    st.binary(max_size=300),
    st.dictionaries(
        st.sampled_from(["id", "action", "issued_at", "expires_at", "by", "generation", "version", "x"]),
        st.none() | st.integers() | st.text(max_size=40) | st.booleans(),
    ).map(lambda d: __import__("json").dumps(d).encode()),
)


def test_hostile_desired_and_command_payloads_never_stop_the_agent(
    fleet: Fleet, serve: Serve, state: Path, watcher: Watcher, tmp_path
):
    agent = make_agent(fleet, "beta", serve, tmp_path).start()
    host, port = serve.mqtt.removeprefix("mqtt://").rsplit(":", 1)
    clients = {}
    for user in (PUBLISHER_USER, ADMIN_USER):
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{user}.{time.monotonic_ns()}")
        client.username_pw_set(user, (state / "broker" / f"{user}.secret").read_text().strip())
        client.connect(host, int(port))
        client.loop_start()
        clients[user] = client
    try:
        watcher.wait_state("beta", lambda s: s.deployed_generation == 1, "at generation 1")

        @settings(max_examples=60, deadline=None)
        @given(payloads)
        def send(payload: bytes) -> None:
            clients[ADMIN_USER].publish("herald/beta/command", payload, qos=1).wait_for_publish(10)
            clients[PUBLISHER_USER].publish("herald/beta/desired", payload, qos=1).wait_for_publish(10)

        send()
        watcher.marker()
        assert agent.proc is not None
        assert agent.proc.alive()
        assert "dropped a message on herald/beta" in agent.proc.output()
        fleet.edit("beta", "configuration.nix", '{ ... }: { still = "listening"; }\n')
        publish(fleet, state, serve)
        wait_until(lambda: agent.deployed() == 2, "beta still applies a genuine announcement")
    finally:
        for client in clients.values():
            with contextlib.suppress(Exception):
                client.loop_stop()
                client.disconnect()
        agent.stop()


pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
