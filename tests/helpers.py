"""Real processes for the tests: `herald serve`, agents, an MQTT watcher. Nothing is mocked.

Every wait is bounded and waits on something observable (a file, a message, a process exit).
"""

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import paho.mqtt.client as mqtt
import pytest

from protocol.messages import Desired, Online, State, decode
from protocol.release import encode_release, split_release
from protocol.topics import ADMIN_USER, Topics

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_FLEET = REPO / "deploy" / "example-fleet"
HERALD = [sys.executable, "-m", "herald"]
TIMEOUT = 30.0


def need(program: str) -> str:
    """The path of a system program a test needs. Under CI=true a missing one fails the test:
    .ci/run installs it, and a test that silently skips in CI proves nothing."""
    path = shutil.which(program)
    if path is not None:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail(f"{program} is required under CI=true (.ci/run installs it)")
    pytest.skip(f"{program} is not installed")


def need_root() -> None:
    """Some tests act as root (mknod, chroots). CI runs as root, so there they never skip."""
    if os.geteuid() == 0:
        return
    if os.environ.get("CI") == "true":
        pytest.fail("this test needs root; CI runs as root")
    pytest.skip("needs root")


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        time.sleep(0.05)


class Proc:
    """A child process with its output in a log file, stopped by its own PID."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        return self.popen.returncode


def herald(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run one herald command to completion."""
    return subprocess.run([*HERALD, *args], capture_output=True, text=True, timeout=timeout, check=False)


# ---------------------------------------------------------------- fleet


@dataclass
class Fleet:
    """A copy of the example fleet whose hosts have keys made for this test."""

    root: Path
    keys: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def create(cls, where: Path) -> "Fleet":
        root = where / "fleet"
        shutil.copytree(EXAMPLE_FLEET, root, symlinks=True)
        fleet = cls(root)
        text = (root / "fleet.toml").read_text(encoding="utf-8")
        entries = tomllib.loads(text)["hosts"]
        (where / "keys").mkdir()
        for host in sorted(entries):
            key = asyncssh.generate_private_key("ssh-ed25519")
            path = where / "keys" / host
            key.write_private_key(str(path))
            fleet.keys[host] = path
            text = text.replace(entries[host]["ssh_key"], key.export_public_key().decode().strip())
        (root / "fleet.toml").write_text(text, encoding="utf-8")
        return fleet

    @property
    def hosts(self) -> list[str]:
        return sorted(self.keys)

    def add_host(self, name: str, where: Path) -> None:
        """A new host with a configuration.nix and its own key, in hosts/ and fleet.toml."""
        key = asyncssh.generate_private_key("ssh-ed25519")
        path = where / "keys" / name
        key.write_private_key(str(path))
        self.keys[name] = path
        (self.root / "hosts" / name).mkdir()
        (self.root / "hosts" / name / "configuration.nix").write_text(
            f'{{ ... }}: {{ networking.hostName = "{name}"; }}\n'
        )
        with (self.root / "fleet.toml").open("a") as toml:
            toml.write(f'\n[hosts.{name}]\nssh_key = "{key.export_public_key().decode().strip()}"\n')

    def edit(self, host: str, relpath: str, text: str) -> None:
        path = self.root / "hosts" / host / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def current_generation(state: Path, host: str) -> int:
    path = state / "chroot" / host / "current"
    return int(path.read_text().split()[0]) if path.exists() else 0


def delete_from_fleet(fleet: Fleet, host: str) -> None:
    """What the admin does in the fleet repository: the host's table and directory go."""
    toml = fleet.root / "fleet.toml"
    text = toml.read_text()
    start = text.index(f"[hosts.{host}]")
    end = text.find("\n[", start + 1)
    toml.write_text(text[:start] + (text[end + 1 :] if end >= 0 else ""))
    for path in sorted((fleet.root / "hosts" / host).rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
    (fleet.root / "hosts" / host).rmdir()


def sftp_login(port: int, user: str, key: Path) -> None:
    """Log in over SFTP with `key` and stat the chroot; asyncssh's error if refused."""

    async def attempt() -> None:
        async with (
            asyncssh.connect(
                "127.0.0.1",
                port,
                username=user,
                client_keys=[asyncssh.read_private_key(str(key))],
                known_hosts=None,
                config=None,
                agent_path=None,
            ) as conn,
            conn.start_sftp_client() as sftp,
        ):
            await sftp.stat(".")

    asyncio.run(attempt())


def read_release(state: Path, host: str, generation: int) -> tuple[bytes, bytes]:
    """(MANIFEST, signature) of releases/<generation> in the host's chroot, not yet verified."""
    return split_release((state / "chroot" / host / "releases" / str(generation)).read_bytes())


def write_release(state: Path, host: str, generation: int, manifest: bytes, signature: bytes) -> None:
    """Put a release file where the publisher would, as a forged or tampered release would be."""
    (state / "chroot" / host / "releases" / str(generation)).write_bytes(encode_release(manifest, signature))


# ---------------------------------------------------------------- Nix


def nix_eval(expression: str) -> Any:
    """The JSON value of a Nix expression, evaluated in the repository (no store is written)."""
    nix = need("nix-instantiate")
    done = subprocess.run(
        [nix, "--store", "dummy://", "--eval", "--strict", "--json", "--expr", expression],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def nixos(module: str, values: str) -> dict[str, Any]:
    """The `config` a NixOS module of nix/ makes from option `values` (a Nix attribute set),
    evaluated with tests/nixos.nix, the stand-in for nixpkgs; its assertions must all hold."""
    config: dict[str, Any] = nix_eval(
        f"import ./tests/nixos.nix {{ module = ./nix/{module}.nix; values = {values}; }}"
    )
    failed = [entry["message"] for entry in config.get("assertions", []) if not entry["assertion"]]
    assert not failed, failed
    return config


# ---------------------------------------------------------------- server


@dataclass
class Serve:
    proc: Proc
    state: Path
    mqtt: str  # "" when the broker is off
    sftp_port: int
    host_key: str
    http: str = ""  # the fleet page's URL

    def stop(self) -> int:
        return self.proc.stop()


def start_serve(
    fleet: Fleet,
    state: Path,
    logs: Path,
    *,
    mqtt: str | None = "127.0.0.1:0",
    sftp: str = "127.0.0.1:0",
    broker: str | list[str] | None = None,
    http: str = "127.0.0.1:0",
    wrap: tuple[str, ...] = (),
    config: Path | None = None,
    env: dict[str, str] | None = None,
) -> Serve:
    """`herald serve` as a process; with `broker`, announcing on that external broker; `wrap`
    runs it through a command that execs it (same PID), e.g. `prlimit --nofile=256:256`;
    `config`, a server.toml under the flags."""
    run_file = state / "run" / "serve.json"
    run_file.unlink(missing_ok=True)
    argv = [
        *wrap,
        *HERALD,
        "serve",
        "--fleet",
        str(fleet.root),
        "--state",
        str(state),
        "--sftp",
        sftp,
        "--http",
        http,
    ]
    argv += ["--mqtt", mqtt] if mqtt is not None else []
    argv += ["--config", str(config)] if config is not None else []
    for url in [broker] if isinstance(broker, str) else broker or []:  # a cluster: each node
        argv += ["--broker", url]
    proc = Proc("serve", argv, logs / f"serve-{time.monotonic_ns()}.log", env=env)

    def ready() -> dict[str, Any] | None:
        if not proc.alive():
            raise AssertionError(f"herald serve exited:\n{proc.output()}")
        return json.loads(run_file.read_text()) if run_file.exists() else None

    info = wait_until(ready, "herald serve listening")
    return Serve(proc, state, info["mqtt"], info["sftp_port"], info["sftp_host_key"], info.get("http", ""))


# ---------------------------------------------------------------- agents


@dataclass
class Agent:
    host: str
    home: Path
    config: Path
    proc: Proc | None = None

    @property
    def record(self) -> Path:
        return self.home / "rebuilds.jsonl"

    @property
    def control(self) -> Path:
        return self.home / "control"

    def rebuilds(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def deployed(self) -> int:
        path = self.home / "state" / "deployed.json"
        return json.loads(path.read_text())["generation"] if path.exists() else 0

    def start(self) -> "Agent":
        self.proc = Proc(
            f"agent-{self.host}", [*HERALD, "agent", "--config", str(self.config)], self.home / "agent.log"
        )
        return self

    def once(self) -> subprocess.CompletedProcess[str]:
        return herald("agent", "--config", str(self.config), "--once")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


def make_agent(
    fleet: Fleet,
    host: str,
    serve: Serve,
    where: Path,
    *,
    broker: str | None = None,
    poll: str = "1h",
    confirm: str = "10s",
    trigger: str = "off",
) -> Agent:
    home = where / "agents" / host
    (home / "control").mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "herald.standin", "--record", str(home / "rebuilds.jsonl")]
    command += ["--control", str(home / "control"), "--root", str(home / "root")]
    command += ["{operation}", "{dir}", "{host}"]
    url = broker if broker is not None else serve.mqtt
    broker_section = f'[broker]\nurl = "{url}"\nkeepalive = 5\n' if url else ""
    config = home / "agent.toml"
    config.write_text(
        f"""\
host = "{host}"
trigger = "{trigger}"
ssh_key = "{fleet.keys[host]}"
state_dir = "{home / "state"}"
root = "{home / "root"}"
poll = "{poll}"

[server]
address = "127.0.0.1"
port = {serve.sftp_port}
host_key = "{serve.host_key}"

{broker_section}
[rebuild]
command = {json.dumps(command)}
rollback = {json.dumps([*command[:-3], "rollback"])}
timeout = "30s"

[confirm]
window = "{confirm}"
""",
        encoding="utf-8",
    )
    return Agent(host, home, config)


# ---------------------------------------------------------------- MQTT


class Watcher:
    """An admin MQTT client (paho, in its own thread) that records every message under the prefix."""

    def __init__(self, url: str, state: Path, topics: Topics | None = None) -> None:
        self.topics = topics or Topics()
        host, port = url.removeprefix("mqtt://").rsplit(":", 1)
        self.messages: list[tuple[float, str, bytes, bool]] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"{ADMIN_USER}.watcher-{os.getpid()}-{id(self)}"
        )
        secret = (state / "broker" / f"{ADMIN_USER}.secret").read_text().strip()
        self.client.username_pw_set(ADMIN_USER, secret)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self._connected = threading.Event()
        self.client.connect(host, int(port), keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(TIMEOUT):
            raise AssertionError("watcher did not connect")

    def _on_connect(
        self, client: mqtt.Client, _userdata: object, _flags: object, _rc: object, _props: object
    ) -> None:
        client.subscribe(f"{self.topics.prefix}/#", qos=1)
        self._connected.set()

    def _on_message(self, _client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((time.time(), message.topic, bytes(message.payload), bool(message.retain)))
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = predicate()
                if result:
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{what}: not within {timeout:g}s")
                self._cond.wait(remaining)

    def on(self, host: str, kind: str) -> list[bytes]:
        topic = f"{self.topics.prefix}/{host}/{kind}"
        return [payload for _, t, payload, _ in self.messages if t == topic and payload]

    def states(self, host: str) -> list[State]:
        return [decode(p, State) for p in self.on(host, "state")]

    def desired(self, host: str) -> list[Desired]:
        return [decode(p, Desired) for p in self.on(host, "desired")]

    def online(self, host: str) -> list[Online]:
        return [decode(p, Online) for p in self.on(host, "online")]

    def wait_state(
        self, host: str, check: Callable[[State], bool], what: str, timeout: float = TIMEOUT
    ) -> State:
        def found() -> State | None:
            states = self.states(host)
            return states[-1] if states and check(states[-1]) else None

        result: State = self.wait_for(found, f"{host}: {what}", timeout)
        return result

    def marker(self, timeout: float = TIMEOUT) -> None:
        """Publish a marker and wait for it: everything the broker routed before has arrived."""
        nonce = f"{time.monotonic_ns()}"
        topic = self.topics.confirm(ADMIN_USER, nonce)
        self.client.publish(topic, b"1", qos=1)
        self.wait_for(lambda: any(t == topic for _, t, _, _ in self.messages), "marker", timeout)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
