"""Attacks on the agent by a local user of its host: a shell, no root, and the loopback address the
agent's local page listens on. It may ask for a check; it must never change what is applied, nor
keep the agent from applying what the publisher released."""

import http.client
import os
import socket
import time
from pathlib import Path

import helpers
import pytest
from helpers import Fleet, Serve, Watcher, herald, make_agent

from client.page import CONNECTIONS, TIMEOUT
from protocol.messages import Phase


def _still_open(sock: socket.socket) -> bool:
    sock.setblocking(False)  # noqa: FBT003
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def test_a_local_user_cannot_stop_updates_by_holding_the_local_page(
    fleet: Fleet, state: Path, serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Actor: a local user on a host (alpha). The local page was a ThreadingHTTPServer with no
    timeout and no cap: every connection that sends nothing held a thread and a descriptor of the
    agent (root) for ever. The user opens 300 and keeps them, against an agent with 256
    descriptors (systemd's default is 1,024: more connections, same attack): a generation
    published afterwards must still be applied. The page serves CONNECTIONS at once, closes the
    rest at once and an idle one after TIMEOUT, and then serves the person again."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    page_port = probe.getsockname()[1]
    probe.close()
    agent = make_agent(fleet, "alpha", serve, tmp_path, trigger=f"127.0.0.1:{page_port}")
    monkeypatch.setattr(helpers, "HERALD", ["prlimit", "--nofile=256:256", *helpers.HERALD])
    agent.start()
    monkeypatch.undo()
    watcher = Watcher(serve.mqtt, state)
    held: list[socket.socket] = []
    try:
        watcher.wait_state("alpha", lambda s: s.deployed_generation == 1 and s.phase is Phase.IDLE, "gen 1")
        started = time.monotonic()
        for _ in range(300):
            try:
                held.append(socket.create_connection(("127.0.0.1", page_port), timeout=2))
            except OSError:
                break  # the agent accepts no more: out of descriptors
        time.sleep(0.5)
        assert agent.proc is not None
        print(f"the agent holds {len(os.listdir(f'/proc/{agent.proc.popen.pid}/fd'))} descriptors")
        open_now = sum(map(_still_open, held))
        fleet.edit("alpha", "files/etc/motd", "a new generation\n")
        done = herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--broker", serve.mqtt)
        assert done.returncode == 0, done.stderr
        watcher.wait_state("alpha", lambda s: s.deployed_generation == 2, "applied generation 2", timeout=45)
        print(f"generation 2 applied {time.monotonic() - started:.1f}s after the attack began")
        time.sleep(max(0.0, TIMEOUT + 1 - 0.5))
        open_later = sum(map(_still_open, held))
        page = http.client.HTTPConnection("127.0.0.1", page_port, timeout=5)
        page.request("GET", "/", headers={"Host": f"127.0.0.1:{page_port}"})
        answer = page.getresponse()
        page.close()
    finally:
        for sock in held:
            sock.close()
        watcher.close()
        agent.stop()
    print(f"the local user opened {len(held)}: {open_now} held at once, {open_later} after {TIMEOUT:g}s")
    assert len(held) >= 250  # delivered: the connections were made
    assert open_now <= CONNECTIONS
    assert open_later == 0
    assert answer.status == 200
