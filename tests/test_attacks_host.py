"""Attacks on the agent by a local user of its host: a shell, no root, and the loopback address the
agent's local page listens on. It may ask for a check; it must never change what is applied, nor
keep the agent from applying what the publisher released, nor make the agent (root) write or
delete a file of its choosing."""

import hashlib
import http.client
import os
import socket
import time
from pathlib import Path

import helpers
import pytest
from helpers import Fleet, Serve, Watcher, herald, make_agent

from client.converge import converge
from client.install import InstalledFile, InstallRecord, known_of
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


def test_a_local_user_cannot_make_herald_write_or_delete_through_a_link_in_a_directory_of_theirs(
    fleet: Fleet, state: Path, serve: Serve, tmp_path: Path
):
    """Actor: a local user on a host (alice, uid 1000, owning her home). The fleet releases
    /home/alice/.ssh/authorized_keys. O_NOFOLLOW guarded only the last component: alice replaced
    ~/.ssh with a link to /root/.ssh, and the next apply wrote her keys into root's
    authorized_keys; a later generation that dropped the file deleted root's copy. herald now
    opens every directory from the root down with O_NOFOLLOW and refuses a directory anyone but
    root may write (alice could swap its entries between herald's look and its write): the file
    is reported, the rest of the generation applied, root's keys untouched, then and later."""
    helpers.need_root()
    agent = make_agent(fleet, "alpha", serve, tmp_path)
    root = agent.home / "root"
    (root / "root" / ".ssh").mkdir(parents=True)
    root_keys = root / "root" / ".ssh" / "authorized_keys"
    root_keys.write_text("ssh-ed25519 AAAA root's own key\n")
    home = root / "home" / "alice"
    home.mkdir(parents=True)
    os.chown(home, 1000, 1000)
    (home / ".ssh").symlink_to("/".join([".."] * 2) + "/root/.ssh")  # alice's link to /root/.ssh
    os.lchown(home / ".ssh", 1000, 1000)
    fleet.edit("alpha", "files/home/alice/.ssh/authorized_keys", "ssh-ed25519 AAAA alice's key\n")
    fleet.edit("alpha", "files/etc/motd", "generation two\n")
    assert herald("publish", "--fleet", str(fleet.root), "--state", str(state)).returncode == 0

    done = agent.once()
    assert done.returncode == 0, done.stdout + done.stderr
    assert root_keys.read_text() == "ssh-ed25519 AAAA root's own key\n"
    assert "alpha: idle (deployed generation 2)" in done.stdout
    assert "not written: /home/alice/.ssh/authorized_keys (/home/alice is owned by uid 1000" in done.stdout
    assert (root / "etc" / "motd").read_text() == "generation two\n"

    (fleet.root / "hosts/alpha/files/home/alice/.ssh/authorized_keys").unlink()
    assert herald("publish", "--fleet", str(fleet.root), "--state", str(state)).returncode == 0
    assert agent.once().returncode == 0
    assert agent.deployed() == 3
    assert root_keys.read_text() == "ssh-ed25519 AAAA root's own key\n"


def test_herald_removes_nothing_through_a_link_planted_where_its_file_was(tmp_path: Path):
    """The install code itself, against a temporary root: herald installed
    /home/alice/.ssh/authorized_keys (an older agent did, or the directory was root's then).
    alice replaces ~/.ssh with a link to /root/.ssh, where the same content sits; the generation
    that no longer releases the file must not remove root's. Nor is a link in a path root owns
    ever followed: it is refused, and named."""
    helpers.need_root()
    root = tmp_path / "root"
    keys = "ssh-ed25519 AAAA alice's key\n"
    (root / "root" / ".ssh").mkdir(parents=True)
    (root / "root" / ".ssh" / "authorized_keys").write_text(keys)
    (root / "root" / ".ssh" / "authorized_keys").chmod(0o644)
    home = root / "home" / "alice"
    home.mkdir(parents=True)
    os.chown(home, 1000, 1000)
    (home / ".ssh").symlink_to(root / "root" / ".ssh")
    recorded = InstallRecord(
        generation=1,
        root=str(root),
        files=[
            InstalledFile("home/alice/.ssh/authorized_keys", 0o644, hashlib.sha256(keys.encode()).hexdigest())
        ],
    )
    done = converge(root, InstallRecord(generation=2, root=str(root)), None, known_of(recorded))
    assert (root / "root" / ".ssh" / "authorized_keys").read_text() == keys
    assert done.removed == []
    assert [path for path, _ in done.failed] == ["home/alice/.ssh/authorized_keys"]

    (root / "etc").mkdir()
    (root / "etc" / "app").symlink_to(root / "root")  # a link in a path only root can change
    source = tmp_path / "tree" / "files"
    (source / "etc" / "app").mkdir(parents=True)
    (source / "etc" / "app" / ".profile").write_text("released\n")
    target = InstallRecord(
        generation=3,
        root=str(root),
        files=[InstalledFile("etc/app/.profile", 0o644, hashlib.sha256(b"released\n").hexdigest())],
    )
    done = converge(root, target, source, known_of())
    assert done.failed == [("etc/app/.profile", "/etc/app is a link")]
    assert not (root / "root" / ".profile").exists()
