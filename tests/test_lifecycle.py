"""One host over many generations, as a real host lives them: every step must leave the root
holding exactly what the deployed generation released, the system it recorded, and a status
that tells the truth.

Real servers and processes throughout (herald serve, or OpenSSH with herald serve as the broker;
the agent; real Nix profiles and store paths built here). The one stand-in is the rebuild
command (herald.standin), which sets the Nix profile and runs the built system's own
switch-to-configuration as nixos-rebuild would; each built system's switch-to-configuration
records what it was asked to do.
"""

import hashlib
import json
import os
import random
import re
import signal
import stat
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
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
    read_release,
    start_serve,
    wait_until,
)
from openssh import OpenSSH, remove_host_users, start_sshd
from reliability import Row, record
from test_agent_loop import free_port

from client.restart import changes, identity
from protocol.messages import Online, Phase, State, decode

NIX_OPTIONS = ["--option", "sandbox", "false", "--option", "build-users-group", ""]
NIX_OPTIONS += ["--option", "substituters", ""]

# Systems built by Nix without nixpkgs: a store path whose bin/switch-to-configuration records its
# operation and, for switch and test, points ROOT/run/current-system at itself.
SYSTEMS_NIX = r"""
{ root, names }:
map (name: derivation {
  inherit name root;
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/usr/bin:/bin";
  args = [ "-c" ''
    mkdir -p $out/bin
    cat > $out/bin/switch-to-configuration <<EOF
    #!/bin/sh
    set -e
    echo "\$1 $out" >> $root/switched
    case "\$1" in
      switch|test)
        mkdir -p $root/run
        ln -sfn $out $root/run/.current-system.new
        mv -T $root/run/.current-system.new $root/run/current-system;;
    esac
    EOF
    chmod +x $out/bin/switch-to-configuration
  '' ];
}) names
"""

HOST = "omega"  # a host of its own: sessions that provision OpenSSH remove alpha..delta at their end
CONFIG = "etc/herald/agent.toml"  # where the agent's own settings live, installed by herald
SITE = "usr/lib/herald-site"  # on the agent's PYTHONPATH: a newer herald package lands here
STEP = 40.0


def build_systems(where: Path, root: Path, count: int) -> list[str]:
    """`count` distinct systems (real store paths), built with nix-build as root."""
    need_root()
    need("nix-build")
    need("nix-env")
    expression = where / "systems.nix"
    expression.write_text(SYSTEMS_NIX)
    names = "[ " + " ".join(f'"system-{index}"' for index in range(count)) + " ]"
    built = subprocess.run(
        [
            "nix-build",
            str(expression),
            "--no-out-link",
            "--argstr",
            "root",
            str(root),
            "--arg",
            "names",
            names,
            *NIX_OPTIONS,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    paths = built.stdout.split()
    assert len(paths) == count, built.stdout
    return paths


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def released(state: Path, generation: int) -> dict[str, tuple[int, str]]:
    """What generation `generation` releases into the root: path -> (mode, sha256)."""
    manifest = json.loads(read_release(state, HOST, generation)[0])
    return {
        path.removeprefix("files/"): (mode, sha256)
        for path, mode, _size, sha256 in manifest["content"]["files"]
        if path.startswith("files/")
    }


def managed(root: Path, others: set[str]) -> dict[str, tuple[int, str]]:
    """Every file in the root but the system's links (run/, nix/) and the files known not to be
    herald's: path -> (mode, sha256). A leftover temporary file shows up here too."""
    found: dict[str, tuple[int, str]] = {}
    for directory, dirs, files in os.walk(root):
        relative_dir = Path(directory).relative_to(root)
        if relative_dir == Path():
            dirs[:] = [d for d in dirs if d not in ("run", "nix")]
        for name in files + [d for d in dirs if (Path(directory) / d).is_symlink()]:
            path = Path(directory) / name
            relative = str(relative_dir / name) if relative_dir != Path() else name
            if relative in others or name == "switched":
                continue
            info = path.lstat()
            assert stat.S_ISREG(info.st_mode), f"/{relative} is not a regular file"
            found[relative] = (stat.S_IMODE(info.st_mode), digest(path))
    return found


@dataclass
class Host:
    """Alpha's agent, its root, its server, and what the test knows of them."""

    fleet: Fleet
    state: Path
    tmp: Path
    logs: Path
    serve: Serve  # what agents are pointed at (for OpenSSH: sshd's port and key, serve's broker)
    broker: Serve  # the herald serve process (embedded SFTP, or the broker beside OpenSSH)
    openssh: bool
    agent: Agent
    systems: list[str]
    watcher: Watcher
    page: str
    slow: Path
    sshd: OpenSSH | None  # while it exists, every publish's check takes longer than the confirm window
    others: set[str] = field(default_factory=set)  # files in the root that are not herald's
    releases: dict[int, dict[str, tuple[int, str]]] = field(default_factory=dict)  # as published
    proc: Proc | None = None

    @property
    def root(self) -> Path:
        return self.agent.home / "root"

    @property
    def control(self) -> Path:
        return self.agent.control

    # ------------------------------------------------------------ acting

    def start(self, pause: str = "") -> Path:
        """Start the agent; with `pause`, to stop for good at that point (client.pause). The
        file it writes when it gets there."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.root / SITE), env.get("PYTHONPATH")]))
        marker = self.agent.home / f"paused-{time.monotonic_ns()}"
        if pause:
            env |= {"HERALD_TEST_PAUSE": pause, "HERALD_TEST_PAUSE_FILE": str(marker)}
        argv = [*HERALD, "agent", "--config", str(self.root / CONFIG)]
        self.proc = Proc(f"agent-{HOST}", argv, self.agent.home / "agent.log", env)
        self.agent.proc = self.proc
        return marker

    def publish(self, system: int, *, announce: bool = True) -> int:
        """Publish the fleet as edited, the rebuild stand-in set to switch to `systems[system]`."""
        (self.control / "system").write_text(self.systems[system])
        broker = ["--broker", self.broker.mqtt] if announce else []
        done = herald("publish", "--fleet", str(self.fleet.root), "--state", str(self.state), *broker)
        assert done.returncode == 0, done.stdout + done.stderr
        generation = current_generation(self.state, HOST)
        self.releases[generation] = released(self.state, generation)  # the server keeps only 3
        return generation

    def edit(self, path: str, text: str, mode: int | None = None) -> None:
        self.fleet.edit(HOST, f"files/{path}", text)
        if mode is not None:
            (self.fleet.root / "hosts" / HOST / "files" / path).chmod(mode)

    def remove(self, path: str) -> None:
        (self.fleet.root / "hosts" / HOST / "files" / path).unlink()

    def configure(self, text: str) -> None:
        self.fleet.edit(HOST, "configuration.nix", f"{{ ... }}: {{ {text} }}\n")

    def trigger(self, action: str = "check") -> None:
        done = herald(
            "trigger", "--broker", self.broker.mqtt, "--state", str(self.state), "--action", action, HOST
        )
        assert done.returncode == 0, done.stdout + done.stderr

    def press_update_now(self) -> None:
        """The local page's button: a check without any new connection to the server."""
        with urllib.request.urlopen(self.page, timeout=10) as response:  # noqa: S310 - loopback
            token = re.search(r'name="token" value="([^"]+)"', response.read().decode())
        assert token is not None
        request = urllib.request.Request(self.page + "check", data=f"token={token[1]}".encode())  # noqa: S310
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            assert response.status == 200

    # ------------------------------------------------------------ looking

    def wait(self, what: str, check, timeout: float = STEP) -> State:
        return self.watcher.wait_state(HOST, check, what, timeout)

    def seen(self, since: int, check, what: str, timeout: float = STEP) -> State:
        """The first state reported after the first `since` that passes `check`."""

        def found() -> State | None:
            return next((s for s in self.watcher.states(HOST)[since:] if check(s)), None)

        result: State = self.watcher.wait_for(found, f"{HOST}: {what}", timeout)
        return result

    def settled(self, generation: int, phase: Phase, deployed: int, timeout: float = STEP) -> State:
        return self.wait(
            f"{phase} at generation {generation} (deployed {deployed})",
            lambda s: (
                s.phase is phase and s.target_generation == generation and s.deployed_generation == deployed
            ),
            timeout,
        )

    def record(self, name: str) -> dict:
        path = self.agent.home / "state" / name
        return json.loads(path.read_text()) if path.exists() else {}

    def system(self, link: str) -> str:
        """The store path a system link in the root points to, through the profile's links."""
        path = self.root / link
        while True:
            target = str(path.readlink())
            if target.startswith("/nix/store/"):
                return target
            path = path.parent / target

    def status(self) -> str:
        done = herald("status", "--broker", self.broker.mqtt, "--state", str(self.state), "--json")
        (host,) = [row for row in json.loads(done.stdout) if row["host"] == HOST]
        return host["status"]

    def check(self, deployed: int, system: int, status: str) -> None:
        """The root holds exactly what `deployed` released; the system is `systems[system]`
        (running and recorded); `herald status` says `status`."""
        assert self.record("deployed.json")["generation"] == deployed
        assert managed(self.root, self.others) == self.releases[deployed]
        assert not (self.agent.home / "state" / "journal.json").exists()
        assert self.system("run/current-system") == self.systems[system]
        assert self.system("nix/var/nix/profiles/system") == self.systems[system]
        assert self.record("deployed.json")["system"] == self.systems[system]
        assert wait_until(lambda: self.status() == status, f"herald status says {status}", 15)

    def switches(self) -> list[str]:
        path = self.root / "switched"
        return path.read_text().splitlines() if path.exists() else []


def add_host(fleet: Fleet, where: Path) -> None:
    fleet.add_host(HOST, where)
    fleet.edit(HOST, "files/etc/motd", f"Welcome to {HOST}.\n")


def serve_beside_openssh(fleet: Fleet, state: Path, logs: Path, mqtt: str = "127.0.0.1:0") -> Serve:
    return start_serve(fleet, state, logs, mqtt=mqtt, sftp="off")


@pytest.fixture(params=["embedded", "openssh"])
def host(request, fleet: Fleet, state: Path, logs: Path, tmp_path: Path):
    add_host(fleet, tmp_path)
    systems = build_systems(tmp_path, tmp_path / "agents" / HOST / "root", 8)
    slow = tmp_path / "slow-check"
    # A check that takes longer than the confirmation window when `slow` exists: a server that
    # publishes before it listens keeps agents from confirming while it runs.
    with (fleet.root / "fleet.toml").open("a") as toml:
        toml.write(f'\n[publish]\ncheck = ["sh", "-c", "test -e {slow} && sleep 12; exit 0"]\n')
    openssh = request.param == "openssh"
    sshd = None
    if openssh:
        sshd = start_sshd(fleet, state, tmp_path, logs)
        broker = serve_beside_openssh(fleet, state, logs)
        serve = Serve(broker.proc, state, broker.mqtt, sshd.port, sshd.host_key)
    else:
        broker = serve = start_serve(fleet, state, logs)
    page_port = free_port()
    agent = make_agent(fleet, HOST, serve, tmp_path, confirm="10s", trigger=f"127.0.0.1:{page_port}")
    text = agent.config.read_text()
    text = re.sub(r"\nrollback = .*\n", "\n", text)  # herald's own exact rollback, not a stand-in
    text = text.replace(
        'window = "10s"', f'window = "10s"\nhealth = ["sh", "-c", "test ! -e {agent.control}/unhealthy"]'
    )
    root = agent.home / "root"
    (root / "etc" / "herald").mkdir(parents=True)
    (root / CONFIG).write_text(text)  # as the machine had it before herald managed it
    (root / "etc" / "local.conf").write_text("the host's own file, never herald's\n")
    fleet.edit(HOST, f"files/{CONFIG}", text)  # the fleet manages the agent's settings too
    watcher = Watcher(broker.mqtt, state)
    page = f"http://127.0.0.1:{page_port}/"
    made = Host(
        fleet, state, tmp_path, logs, serve, broker, openssh, agent, systems, watcher, page, slow, sshd
    )
    made.others = {"etc/local.conf"}
    yield made
    if made.proc is not None:
        made.proc.stop()
    watcher.close()
    made.broker.stop()
    if sshd is not None:
        sshd.stop()
        remove_host_users([HOST])


# ---------------------------------------------------------------- the walk


@pytest.mark.timeout(900)
def test_one_host_through_many_generations(host: Host):
    walk: dict = {}
    for step in STEPS:
        step(host, walk)


def first_deployment(host: Host, walk: dict) -> None:
    """The first deployment (never rolled back), over a root that already had files."""
    generation = host.publish(0)
    host.start()
    host.settled(generation, Phase.IDLE, generation)
    host.check(generation, 0, "up to date")
    assert (host.root / "etc" / "local.conf").exists()

    walk["generation"] = generation


def files_added(host: Host, walk: dict) -> None:
    """Two files added."""
    host.edit("etc/added", "added\n")
    host.edit("etc/tweaked", "tweaked\n")
    host.configure("step = 2;")
    generation = host.publish(1)
    host.settled(generation, Phase.IDLE, generation)
    host.check(generation, 1, "up to date")

    walk["generation"] = generation


def mode_changed(host: Host, walk: dict) -> None:
    """A mode changed, and nothing else: the same system again (Nix adds no profile generation)."""
    host.edit("etc/added", "added\n", mode=0o600)
    generation = host.publish(1)
    host.settled(generation, Phase.IDLE, generation)
    host.check(generation, 1, "up to date")
    assert (host.root / "etc" / "added").stat().st_mode & 0o777 == 0o600

    walk["generation"] = generation


def files_deleted(host: Host, walk: dict) -> None:
    """Both deleted; one was changed on the host meanwhile: left in place, reported, not herald's."""
    (host.root / "etc" / "tweaked").write_text("changed on the host\n")
    host.remove("etc/added")
    host.remove("etc/tweaked")
    host.configure("step = 4;")
    generation = host.publish(2)
    state = host.settled(generation, Phase.IDLE, generation)
    assert "left in place, changed locally: /etc/tweaked" in state.message
    assert not (host.root / "etc" / "added").exists()
    assert (host.root / "etc" / "tweaked").read_text() == "changed on the host\n"
    host.others.add("etc/tweaked")
    host.check(generation, 2, "up to date")

    walk["generation"] = generation


def file_renamed(host: Host, walk: dict) -> None:
    """A file renamed, into a directory herald creates."""
    walk["motd"] = motd = (host.fleet.root / "hosts" / HOST / "files" / "etc" / "motd").read_text()
    host.remove("etc/motd")
    host.edit("etc/motd.d/welcome", motd)
    host.configure("step = 5;")
    generation = host.publish(3)
    host.settled(generation, Phase.IDLE, generation)
    host.check(generation, 3, "up to date")
    walk["before"] = generation

    walk["generation"] = generation


def only_files_changed(host: Host, walk: dict) -> None:
    """Only files/ changed: the same system set again, so the profile gets no new generation."""
    motd = walk["motd"]
    host.edit("etc/motd.d/welcome", motd + "only files changed\n")
    generation = host.publish(3)
    host.settled(generation, Phase.IDLE, generation)
    host.check(generation, 3, "up to date")
    profiles = host.root / "nix" / "var" / "nix" / "profiles"
    links = sorted(p.name for p in profiles.iterdir() if p.name.startswith("system-"))
    assert links == ["system-1-link", "system-2-link", "system-3-link", "system-4-link"]

    walk["generation"] = generation


def rollback_command(host: Host, walk: dict) -> None:
    """The rollback command: back to generation 5's files and its exact system (system 3), where "one
    profile generation back" would have gone to system 2."""
    generation = walk["generation"]
    profiles = host.root / "nix" / "var" / "nix" / "profiles"
    assert str((profiles / "system-3-link").readlink()) == host.systems[2]
    host.trigger("rollback")
    state = host.settled(generation, Phase.ROLLED_BACK, walk["before"])
    assert state.message == f"rolled back from generation {generation} to {walk['before']}"
    assert host.switches()[-1] == f"switch {host.systems[3]}"
    host.check(walk["before"], 3, "rolled back")
    since = len(host.watcher.states(HOST))
    host.trigger("check")  # a rolled-back generation is not applied again by itself
    host.seen(since, lambda s: s.phase is Phase.CHECKING, "the check")
    host.seen(since, lambda s: s.phase is Phase.ROLLED_BACK, "still rolled back")
    host.check(walk["before"], 3, "rolled back")


def after_the_rollback(host: Host, walk: dict) -> None:
    """A new generation after it."""
    host.configure("step = 8;")
    generation = host.publish(4)
    host.settled(generation, Phase.IDLE, generation)
    host.check(generation, 4, "up to date")
    walk["good"] = generation

    walk["generation"] = generation


def failed_rebuild(host: Host, walk: dict) -> None:
    """A failed rebuild: its new file does not stay behind; nor its system, if it moved."""
    host.edit("etc/failing", "from a generation that fails\n")
    (host.control / "fail").touch()
    generation = host.publish(5)
    state = host.settled(generation, Phase.FAILED, walk["good"])
    assert "rebuild failed with exit code 1" in state.message
    host.check(walk["good"], 4, "failed")
    (host.control / "fail").unlink()
    # A switch whose activation fails after the system moved: back to exactly the system before.
    host.configure("step = 9;")
    (host.control / "fail-after").touch()
    generation = host.publish(5)
    state = host.settled(generation, Phase.FAILED, walk["good"])
    assert "rebuild failed with exit code 1" in state.message
    assert host.switches()[-2:] == [f"switch {host.systems[5]}", f"switch {host.systems[4]}"]
    host.check(walk["good"], 4, "failed")
    (host.control / "fail-after").unlink()
    host.remove("etc/failing")

    walk["generation"] = generation


def not_confirmed(host: Host, walk: dict) -> None:
    """A switch that is not confirmed: back to the exact system and the files before it."""
    host.edit("etc/unconfirmed", "from a switch that is not confirmed\n")
    host.configure("step = 10;")
    (host.control / "unhealthy").touch()
    generation = host.publish(6)
    state = host.settled(generation, Phase.ROLLED_BACK, walk["good"], timeout=STEP + 10)
    assert "rolled back: health command sh exited with 1" in state.message
    assert host.switches()[-2:] == [f"switch {host.systems[6]}", f"switch {host.systems[4]}"]
    host.check(walk["good"], 4, "rolled back")
    (host.control / "unhealthy").unlink()
    host.remove("etc/unconfirmed")

    walk["generation"] = generation


def server_restart(host: Host, walk: dict) -> None:
    """The server restarts inside the confirmation window, with a long publish to run."""
    host.configure("step = 11;")
    (host.control / "sleep").write_text("2")
    generation = host.publish(7)
    wait_until(
        lambda: len(host.agent.rebuilds()) and host.agent.rebuilds()[-1].get("system") == host.systems[7],
        "the switch started",
    )
    host.broker.stop()
    host.slow.touch()
    host.fleet.edit("gamma", "configuration.nix", "{ ... }: { slow = true; }\n")
    mqtt = host.broker.mqtt.removeprefix("mqtt://")
    if host.openssh:
        host.broker = serve_beside_openssh(host.fleet, host.state, host.logs, mqtt)
    else:
        sftp = f"127.0.0.1:{host.serve.sftp_port}"
        host.broker = host.serve = start_serve(host.fleet, host.state, host.logs, mqtt=mqtt, sftp=sftp)
    host.settled(generation, Phase.IDLE, generation)
    host.check(generation, 7, "up to date")
    host.slow.unlink()
    (host.control / "sleep").unlink()

    walk["generation"] = generation


def descriptors_exhausted(host: Host, walk: dict) -> None:
    """The server runs out of file descriptors in the middle of a fetch: the host reports the server busy
    and tries again, and applies the generation once the server recovers."""
    for index in range(6):
        host.edit(f"srv/data/{index}", os.urandom(8).hex() + "\n")
    host.press_update_now()  # nothing new yet: the connection is there to be measured
    host.seen(len(host.watcher.states(HOST)) - 1, lambda s: s.message == "up to date", "checked")
    generation = host.publish(7, announce=False)
    seen = len(host.watcher.states(HOST))
    limited = starve_descriptors(host)
    try:
        host.press_update_now()
        busy = host.seen(seen, lambda s: s.message.startswith("server unreachable or busy"), "busy")
    finally:
        restore_descriptors(limited)
    expected = "Session request failed" if host.openssh else "Too many open files"
    assert expected in busy.message, busy.message
    host.settled(generation, Phase.IDLE, generation)
    states = host.watcher.states(HOST)[seen:]
    assert not [s for s in states if s.phase is Phase.FAILED], [s.message for s in states]
    assert not (host.agent.home / "state" / "failed.json").exists()
    host.check(generation, 7, "up to date")

    walk["generation"] = generation


def killed_during_install(host: Host, walk: dict) -> None:
    """kill -9 in the middle of an install, after a file picked at random of the 80 it writes
    (the agent stops there: client.pause): finished or undone at the next start."""
    assert host.proc is not None
    host.proc.stop()  # started again below, to stop inside the install
    for index in range(80):
        host.edit(f"srv/many/{index:03d}", f"{index} {random.random()}\n")
    generation = host.publish(7, announce=False)
    point, rebuilds = f"install:{random.randint(1, 80)}", len(host.agent.rebuilds())
    assert kill_there(host.agent, host.start(pause=point)) == point
    journal = json.loads((host.agent.home / "state" / "journal.json").read_text())
    assert (journal["step"], journal["generation"]) == ("apply", generation)  # inside the install
    assert len(host.agent.rebuilds()) == rebuilds  # before its rebuild
    host.start()
    host.settled(generation, Phase.IDLE, generation)
    host.check(generation, 7, "up to date")

    walk["generation"] = generation


def agent_toml_changed(host: Host, walk: dict) -> None:
    """A generation that changes agent.toml: the agent restarts itself with it."""
    assert host.proc is not None
    pid, starts = host.proc.pid, host.proc.output().count("starting; state in")
    config = (host.root / CONFIG).read_text().replace('poll = "1h"', 'poll = "2h"')
    host.edit(CONFIG, config)
    generation = host.publish(7)
    host.wait("restarting", lambda s: s.message == "restarting: agent.toml changed")
    wait_until(
        lambda: host.proc.output().count("starting; state in") == starts + 1, "the agent started again"
    )
    assert host.proc.pid == pid  # executed itself again: the same process
    assert host.proc.alive()
    host.settled(generation, Phase.IDLE, generation)
    host.check(generation, 7, "up to date")

    walk["generation"] = generation


def package_changed(host: Host, walk: dict) -> None:
    """A generation that brings a newer herald package: restarted, it reports the new version."""
    host.edit(
        f"{SITE}/herald-9.9.9.dist-info/METADATA", "Metadata-Version: 2.1\nName: herald\nVersion: 9.9.9\n"
    )
    generation = host.publish(7)
    state = host.wait("the new version", lambda s: s.agent_version == "9.9.9" and s.phase is Phase.IDLE, STEP)
    assert state.deployed_generation == generation
    host.check(generation, 7, "up to date")

    walk["generation"] = generation


def clean_stop(host: Host, walk: dict) -> None:
    """A clean stop: the agent itself says so, a retained state `stopped` and online=false
    published before it disconnects (a clean DISCONNECT discards the will), so the host shows
    stopped at once, not online until its heartbeat ages (three minutes). Asserted by the order
    of events: both are at the broker before the process has exited, and nothing after them."""
    assert host.proc is not None
    host.watcher.marker()
    seen = len(host.watcher.messages)
    os.kill(host.proc.pid, signal.SIGTERM)
    assert host.proc.popen.wait(15) == 0
    host.watcher.marker()  # everything the broker had when the agent exited has arrived
    prefix = f"{host.watcher.topics.prefix}/{HOST}/"
    said = [(topic.removeprefix(prefix), payload) for _, topic, payload, _ in host.watcher.messages[seen:]]
    said = [(kind, payload) for kind, payload in said if kind in ("state", "online")]
    assert [kind for kind, _ in said[-2:]] == ["state", "online"], said
    assert decode(said[-2][1], State).phase is Phase.STOPPED
    assert decode(said[-1][1], Online).online is False
    host.check(walk["generation"], 7, "stopped")


STEPS = (
    first_deployment,
    files_added,
    mode_changed,
    files_deleted,
    file_renamed,
    only_files_changed,
    rollback_command,
    after_the_rollback,
    failed_rebuild,
    not_confirmed,
    server_restart,
    descriptors_exhausted,
    killed_during_install,
    agent_toml_changed,
    package_changed,
    clean_stop,
)


def starve_descriptors(host: Host) -> list[tuple[int, int]]:
    """Leave the SFTP server one descriptor to spare: it can open a file, not two at once.
    Returns (pid, soft limit before) for each process limited.

    The embedded server is one process. OpenSSH serves each connection from a process of its
    own, running as the host's user (which root here may not limit: no CAP_SYS_RESOURCE): the
    listener is limited instead, which every new session inherits, and the host's session ended,
    so that the agent's next connection is a new one (it then fails to start its session, or to
    open files)."""
    if not host.openssh:
        pid = host.serve.proc.pid
        return [(pid, _limit(pid, len(os.listdir(f"/proc/{pid}/fd")) + 1))]
    assert host.sshd is not None
    listener = host.sshd.proc.pid
    pids = [pid for pid in descendants(listener) if Path(f"/proc/{pid}").stat().st_uid != 0]
    counts = [len(os.listdir(f"/proc/{pid}/fd")) for pid in pids]
    assert counts, f"no process of this test's sshd serves {HOST}: {descendants(listener)}"
    # One more than a settled session holds: a new one cannot even start its SFTP subsystem.
    # (Its SFTP child inherits the limit with 3 descriptors of its own, so any limit that lets
    # the session start leaves room for all 8 files an agent opens at once: only the embedded
    # server, one process for every host, runs out in the middle of a fetch.)
    limited = [(listener, _limit(listener, max(counts) + 1))]
    for pid in descendants(listener):  # the session ends (its monitor holds the connection too)
        os.kill(pid, signal.SIGKILL)
    return limited


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (this test's own sshd: others run OpenSSH tests with the same
    host users at the same time)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat_line = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat_line[stat_line.rfind(")") + 2 :].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _limit(pid: int, soft: int) -> int:
    """Set the soft limit on open files of `pid`; the soft limit it had."""
    before = int(re.search(r"Max open files\s+(\d+)", Path(f"/proc/{pid}/limits").read_text())[1])
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={soft}:"], check=True)
    return before


def restore_descriptors(limited: list[tuple[int, int]]) -> None:
    for pid, soft in limited:
        subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={soft}:"], check=False)


def test_the_agent_knows_when_what_it_would_run_as_changed(tmp_path: Path):
    config, root = tmp_path / "agent.toml", tmp_path / "root"
    config.write_text("host = 'omega'\n")
    sw = root / "run" / "current-system" / "sw" / "bin"
    sw.mkdir(parents=True)
    (tmp_path / "herald-1").write_text("")
    (tmp_path / "herald-2").write_text("")
    (sw / "herald").symlink_to(tmp_path / "herald-1")
    before = identity(config, root)
    assert changes(before, identity(config, root)) == []
    (sw / "herald").unlink()
    (sw / "herald").symlink_to(tmp_path / "herald-2")  # the system provides another herald
    assert changes(before, identity(config, root)) == [f"the system's herald is now {tmp_path / 'herald-2'}"]
    config.write_text("host = 'omega'\npoll = '2h'\n")
    assert changes(before, identity(config, root))[0] == "agent.toml changed"
    config.unlink()  # being replaced: not a reason by itself
    assert changes(before, identity(config, root)) == [f"the system's herald is now {tmp_path / 'herald-2'}"]


# ---------------------------------------------------------------- a kill at a named point


def start_paused(agent: Agent, point: str) -> Path:
    """Start `agent` to stop for good at pause point `point` (client.pause: `install:37` is the
    37th file the install changes); the file it writes when it got there."""
    marker = agent.home / f"paused-{time.monotonic_ns()}"
    env = dict(os.environ, HERALD_TEST_PAUSE=point, HERALD_TEST_PAUSE_FILE=str(marker))
    argv = [*HERALD, "agent", "--config", str(agent.config)]
    agent.proc = Proc(f"agent-{agent.host}", argv, agent.home / "agent.log", env)
    return marker


def kill_there(agent: Agent, marker: Path, timeout: float = STEP) -> str:
    """Wait until the agent stopped at its point, then kill -9 it there; the point."""
    assert agent.proc is not None
    proc = agent.proc
    wait_until(lambda: marker.exists() or not proc.alive(), f"the agent at its pause point {marker}", timeout)
    assert proc.alive(), f"the agent exited before its pause point:\n{proc.output()[-3000:]}"
    proc.stop(sig=signal.SIGKILL)
    return marker.read_text().strip()


def exact_agent(fleet: Fleet, serve: Serve, tmp_path: Path, count: int) -> tuple[Agent, list[str]]:
    """An agent for a host of its own that rolls back with herald's exact rollback (nix-env and
    switch-to-configuration of real store paths built here), and `count` such systems."""
    add_host(fleet, tmp_path)
    agent = make_agent(fleet, HOST, serve, tmp_path, confirm="5s")
    agent.config.write_text(re.sub(r"\nrollback = .*\n", "\n", agent.config.read_text()))
    systems = build_systems(tmp_path, agent.home / "root", count)
    return agent, systems


def links(agent: Agent) -> tuple[str, str]:
    """Where the system profile and /run/current-system of the agent's root point."""
    root = agent.home / "root"

    def resolve(path: Path) -> str:
        while not str(target := path.readlink()).startswith("/nix/store/"):
            path = path.parent / target
        return str(target)

    return resolve(root / "nix/var/nix/profiles/system"), resolve(root / "run/current-system")


def publish_for(fleet: Fleet, state: Path, agent: Agent, system: str, broker: str = "") -> int:
    (agent.control / "system").write_text(system)
    announce = ["--broker", broker] if broker else []
    done = herald("publish", "--fleet", str(fleet.root), "--state", str(state), *announce)
    assert done.returncode == 0, done.stdout + done.stderr
    return current_generation(state, HOST)


def test_a_switch_that_set_the_profile_then_failed_returns_both_links(
    fleet: Fleet, serve: Serve, state: Path, tmp_path: Path
):
    """A switch whose nix-env set the system profile, then failed before /run/current-system
    changed. "Did the system move?" looked at /run/current-system only: not moved, nothing
    restored, and the next boot would have started the failed system. Both links are recorded
    before the rebuild, and each that moved goes back (the profile, with its boot entry)."""
    agent, systems = exact_agent(fleet, serve, tmp_path, 2)
    generation = publish_for(fleet, state, agent, systems[0])
    assert agent.once().returncode == 0
    assert links(agent) == (systems[0], systems[0])

    fleet.edit(HOST, "configuration.nix", "{ ... }: { fails = true; }\n")
    (agent.control / "fail-after-profile").touch()
    publish_for(fleet, state, agent, systems[1])
    done = agent.once()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "rebuild failed with exit code 1" in done.stdout
    assert links(agent) == (systems[0], systems[0])
    switched = (agent.home / "root" / "switched").read_text().splitlines()
    assert switched[-1] == f"boot {systems[0]}"  # the boot entry back too; nothing activated
    assert agent.deployed() == generation


def test_a_forced_rebuild_killed_after_the_system_moved_is_undone(
    fleet: Fleet, serve: Serve, state: Path, watcher: Watcher, tmp_path: Path
):
    """A `rebuild` command re-applies what is deployed; this time the rebuild makes another
    system, and the agent is killed after the switch, before anything was recorded. Recovery
    matched the journal to deployed.json by (generation, version), which the forced re-apply
    shares with what is deployed: "only the bookkeeping was left", and the host ran a system
    nobody recorded. A journal is finished only when deployed.json names its id."""
    agent, systems = exact_agent(fleet, serve, tmp_path, 2)
    generation = publish_for(fleet, state, agent, systems[0])
    assert agent.once().returncode == 0
    (agent.control / "system").write_text(systems[1])  # the same release now builds another system
    marker = start_paused(agent, "rebuilt")
    watcher.wait_state(HOST, lambda s: s.phase is Phase.IDLE and s.deployed_generation == generation, "up")
    done = herald("trigger", "--broker", serve.mqtt, "--state", str(state), "--action", "rebuild", HOST)
    assert done.returncode == 0, done.stdout + done.stderr
    assert kill_there(agent, marker) == "rebuilt:1"
    assert links(agent) == (systems[1], systems[1])  # the forced rebuild moved the system
    assert (agent.home / "state" / "journal.json").exists()

    agent.start()
    try:
        wait_until(lambda: not (agent.home / "state" / "journal.json").exists(), "the recovery", STEP)
        assert links(agent) == (systems[0], systems[0])
        deployed = json.loads((agent.home / "state" / "deployed.json").read_text())
        assert (deployed["generation"], deployed["system"]) == (generation, systems[0])
    finally:
        agent.stop()


def test_a_rollback_whose_switch_back_failed_is_finished_as_a_failure_after_a_kill(
    fleet: Fleet, serve: Serve, state: Path, watcher: Watcher, tmp_path: Path
):
    """The rollback command's switch back fails; the agent is killed while it puts the files
    back. The journal had been rewritten as "switched back" before the files were put back, so
    recovery finished it as a rollback that succeeded: generation 1 recorded as deployed, its
    files installed, while the system stayed generation 2's. The failure is journaled, and
    recovery finishes it as the failure it was: generation 2 stays deployed, with its files."""
    agent = make_agent(fleet, "alpha", serve, tmp_path)
    assert agent.once().returncode == 0
    fleet.edit("alpha", "files/etc/motd", "generation two\n")
    fleet.edit("alpha", "files/etc/added", "added in generation two\n")
    done = herald("publish", "--fleet", str(fleet.root), "--state", str(state))
    assert done.returncode == 0, done.stdout + done.stderr
    assert agent.once().returncode == 0
    release = released_as(state, "alpha", 2)
    root = agent.home / "root"
    assert managed(root, set()) == release

    (agent.control / "fail").touch()  # the rollback command (the stand-in) fails
    # Back to generation 1 writes /etc/motd and removes /etc/added (2 changes); the switch back
    # fails; returning to generation 2 writes /etc/added again: killed after that, the 3rd.
    marker = start_paused(agent, "restore:3")
    watcher.wait_state("alpha", lambda s: s.phase is Phase.IDLE and s.deployed_generation == 2, "up")
    done = herald("trigger", "--broker", serve.mqtt, "--state", str(state), "--action", "rollback", "alpha")
    assert done.returncode == 0, done.stdout + done.stderr
    assert kill_there(agent, marker) == "restore:3"
    assert (agent.home / "state" / "journal.json").exists()

    agent.start()
    try:
        line = wait_until(
            lambda: next((ln for ln in agent.proc.output().splitlines() if "interrupted return" in ln), None),
            "the recovery's log line",
            STEP,
        )
        assert "rollback failed" in line
        assert agent.deployed() == 2
        assert managed(root, set()) == release
        assert not (agent.home / "state" / "journal.json").exists()
    finally:
        agent.stop()


def released_as(state: Path, host: str, generation: int) -> dict[str, tuple[int, str]]:
    manifest = json.loads(read_release(state, host, generation)[0])
    return {
        path.removeprefix("files/"): (mode, sha256)
        for path, mode, _size, sha256 in manifest["content"]["files"]
        if path.startswith("files/")
    }


# ---------------------------------------------------------------- kill -9 anywhere in an apply

# Where the kills land: inside the install (after a file picked at random), during the rebuild
# (the command still running), inside the restore after a failed rebuild (after a file picked at
# random), and in the bookkeeping (the deployment recorded, what the root holds not yet).
KILLS = (["install"] * 8) + (["rebuild"] * 4) + (["restore"] * 4) + (["settle"] * 4)


@dataclass
class Kills:
    """One host whose agent is killed over and over, and what it was released."""

    fleet: Fleet
    state: Path
    watcher: Watcher
    agent: Agent
    rng: random.Random
    others: set[str]
    releases: dict[int, dict[str, tuple[int, str]]] = field(default_factory=dict)  # as published

    @property
    def root(self) -> Path:
        return self.agent.home / "root"

    @property
    def journal(self) -> Path:
        return self.agent.home / "state" / "journal.json"

    def new_generation(self) -> tuple[int, int]:
        """About 60 files added, changed and removed at once (the rest left as they are); the
        generation and how many files its install changes."""
        many = self.fleet.root / "hosts" / HOST / "files" / "srv" / "many"
        before = self.releases.get(current_generation(self.state, HOST), {})
        for index in range(90):
            path = many / f"{index:02d}"
            if self.rng.random() < 0.35 and path.exists():
                path.unlink()
            elif self.rng.random() < 0.7:
                self.fleet.edit(HOST, f"files/srv/many/{index:02d}", f"{index} {self.rng.random()}\n")
                path.chmod(self.rng.choice([0o644, 0o600, 0o640]))
        done = herald("publish", "--fleet", str(self.fleet.root), "--state", str(self.state))
        assert done.returncode == 0, done.stdout + done.stderr
        generation = current_generation(self.state, HOST)
        self.releases[generation] = after = released(self.state, generation)  # the server keeps 3
        return generation, len({p for p in after if after[p] != before.get(p)} | (set(before) - set(after)))

    def during_rebuild(self, generation: int) -> None:
        """Killed while the rebuild command runs (it runs on, in a session of its own)."""
        rebuilds = len(self.agent.rebuilds())
        (self.agent.control / "sleep").write_text("1")
        self.agent.start()
        wait_until(lambda: len(self.agent.rebuilds()) > rebuilds, "the rebuild started", STEP)
        assert self.agent.proc is not None
        self.agent.proc.stop(sig=signal.SIGKILL)
        (self.agent.control / "sleep").unlink()
        step = json.loads(self.journal.read_text())
        assert (step["step"], step["generation"]) == ("apply", generation)

    def at_point(self, kind: str, generation: int, changes: int) -> None:
        """Killed where the agent stopped: after a file of the install or of the restore picked
        at random, or inside the bookkeeping (the deployment recorded, the rest not)."""
        point = {
            "install": f"install:{self.rng.randint(1, changes)}",
            "restore": f"restore:{self.rng.randint(1, changes)}",
            "settle": "settle:1",
        }[kind]
        assert kill_there(self.agent, start_paused(self.agent, point)) == point
        step = json.loads(self.journal.read_text())
        expected = "restore" if kind == "restore" else "apply"
        assert (step["step"], step["generation"]) == (expected, generation), (kind, step)
        if kind == "settle":
            assert self.agent.deployed() == generation

    def settled(self, phase: Phase, target: int, deployed: int) -> None:
        self.watcher.wait_state(
            HOST,
            lambda s: (
                s.phase is phase and s.target_generation == target and s.deployed_generation == deployed
            ),
            f"{phase} at generation {target}, {deployed} deployed",
            STEP,
        )
        assert managed(self.root, self.others) == self.releases[deployed]
        assert not self.journal.exists()
        assert (self.root / "etc" / "local.conf").read_text() == "not herald's\n"


@pytest.mark.faults
@pytest.mark.timeout(900)
def test_killed_anywhere_in_an_apply_the_next_start_finishes_or_undoes_it(
    fleet: Fleet, serve: Serve, state: Path, watcher: Watcher, tmp_path: Path
):
    """kill -9 at a known point of each step (client.pause stops the agent there, so that every
    kill is asserted, from the journal, to land inside its step): the next start finishes or
    undoes it, and the root holds exactly what the recorded generation released."""
    add_host(fleet, tmp_path)
    agent = make_agent(fleet, HOST, serve, tmp_path, confirm="5s")
    (agent.home / "root" / "etc").mkdir(parents=True)
    (agent.home / "root" / "etc" / "local.conf").write_text("not herald's\n")
    kills = Kills(fleet, state, watcher, agent, random.Random(20261202), {"etc/local.conf"})
    deployed, _ = kills.new_generation()
    assert agent.once().returncode == 0
    times = []
    for kind in KILLS:
        generation, changes = kills.new_generation()
        if kind == "rebuild":
            kills.during_rebuild(generation)
        else:
            if kind == "restore":
                (agent.control / "fail").touch()
            kills.at_point(kind, generation, changes)
        restarted = time.monotonic()
        agent.start()
        if kind == "restore":  # the failed generation stays failed, the one before deployed
            kills.settled(Phase.FAILED, generation, deployed)
            (agent.control / "fail").unlink()
        else:
            kills.settled(Phase.IDLE, generation, generation)
            deployed = generation
        times.append(time.monotonic() - restarted)
        agent.stop()
    record(
        Row(
            "kill -9 the agent inside an install, rebuild, restore or bookkeeping",
            len(KILLS),
            len(times),
            times,
        )
    )
