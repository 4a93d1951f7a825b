"""A RabbitMQ 3.10 cluster as real processes, for tests/test_rabbitmq.py.

Each node is `rabbitmq-server` run as root in the foreground with its own node name, ports,
data and log directories, config file and enabled-plugins file; the nodes share an Erlang cookie
(in the cluster's own HOME) and an epmd of their own on its own port, all on loopback. The system
service is never touched. Node 1 starts first; nodes 2 and 3 start after it, one at a time, and join it
through `classic_config` peer discovery. Everything is stopped by PID.

The users and permissions come from `herald broker export --format rabbitmq`, loaded with
`rabbitmqctl import_definitions`; the MQTT plugin's settings from its rabbitmq.conf fragment.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from brokers import free_port
from helpers import Fleet, Proc, Serve, need, start_serve, wait_until

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
START_TIMEOUT = 90.0
LOOPBACK = "-kernel inet_dist_use_interface {127,0,0,1}"


@dataclass
class Node:
    index: int
    name: str  # herald-N@localhost
    home: Path
    amqp: int
    mqtt: int
    dist: int
    proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt}"

    def vm_pid(self, missing: int | None = None) -> int:
        """The Erlang VM's PID, from the pid file the node writes at start."""
        try:
            return int((self.home / "pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            if missing is None:
                raise
            return missing

    def listening(self) -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.mqtt)) == 0


@dataclass
class Cluster:
    root: Path
    nodes: list[Node] = field(default_factory=list)
    epmd_port: int = 0
    epmd: Proc | None = None
    fragment: str = ""  # the MQTT plugin's lines from `herald broker export --format rabbitmq`
    started_in: float = 0.0

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def env(self, node: Node | None = None) -> dict[str, str]:
        """The environment of a node (or of the CLI): nothing from the system's RabbitMQ."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(self.root),  # .erlang.cookie
            "LANG": "C.UTF-8",
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_CONF_ENV_FILE": str(self.root / "rabbitmq-env.conf"),
            "RABBITMQ_CTL_ERL_ARGS": LOOPBACK,
        }
        if node is not None:
            env |= {
                "RABBITMQ_NODENAME": node.name,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(node.amqp),
                "RABBITMQ_DIST_PORT": str(node.dist),
                "RABBITMQ_MNESIA_BASE": str(node.home / "mnesia"),
                "RABBITMQ_MNESIA_DIR": str(node.home / "mnesia" / node.name),
                "RABBITMQ_LOG_BASE": str(node.home / "log"),
                "RABBITMQ_LOGS": "-",
                "RABBITMQ_CONFIG_FILE": str(node.home / "rabbitmq.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(node.home / "advanced.config"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(node.home / "enabled_plugins"),
                "RABBITMQ_PLUGINS_EXPAND_DIR": str(node.home / "plugins-expand"),
                "RABBITMQ_PID_FILE": str(node.home / "pid"),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": LOOPBACK,
            }
        return env

    def ctl(self, node: Node, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CTL, "-n", node.name, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _config(self, node: Node) -> str:
        # Node 1 starts blank at once; the others join it.
        peers = f"cluster_formation.classic_config.nodes.1 = {self.nodes[0].name}"
        return f"""\
listeners.tcp.default = 127.0.0.1:{node.amqp}
mqtt.listeners.tcp.default = 127.0.0.1:{node.mqtt}
log.console = true
log.console.level = info
log.file = false
cluster_formation.peer_discovery_backend = classic_config
cluster_formation.discovery_retry_limit = 20
cluster_formation.discovery_retry_interval = 500
{peers}
{self.fragment}"""

    def start_node(self, node: Node) -> None:
        node.home.mkdir(parents=True, exist_ok=True)
        (node.home / "rabbitmq.conf").write_text(self._config(node))
        (node.home / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        log = node.home / f"node-{time.monotonic_ns()}.log"
        node.proc = Proc(node.name, [SERVER], log, env=self.env(node))

    def wait_listening(self, node: Node) -> None:
        def up() -> bool:
            assert node.proc is not None
            if not node.proc.alive():
                raise AssertionError(f"{node.name} exited:\n{node.proc.output()[-4000:]}")
            return node.listening()

        wait_until(up, f"{node.name} listening for MQTT", timeout=START_TIMEOUT)

    def kill(self, node: Node) -> None:
        """SIGKILL to the node's own Erlang VM (its pid file): it dies as a machine does, its
        connections without DISCONNECT. (`rabbitmq-server` is a script that waits on the VM:
        killing the script alone leaves the node running.)"""
        assert node.proc is not None
        vm = node.vm_pid()
        os.kill(vm, signal.SIGKILL)
        node.proc.popen.wait(30.0)
        wait_until(lambda: not _alive(vm), f"{node.name}'s VM gone", timeout=30.0)
        assert not node.listening(), f"{node.name} still listens after SIGKILL"

    def restart(self, node: Node) -> None:
        self.start_node(node)
        self.wait_listening(node)

    def running_nodes(self) -> list[str]:
        done = self.ctl(self.nodes[0], "cluster_status", "--formatter", "json")
        assert done.returncode == 0, done.stderr
        status: dict[str, list[str]] = json.loads(done.stdout)
        return sorted(status["running_nodes"])

    def stop(self) -> None:
        """Every node (its script and its VM), then epmd: a VM left running would start an
        epmd of its own and outlive the test."""
        for node in self.nodes:
            vm = node.vm_pid(missing=0)
            if node.proc is not None and node.proc.alive():
                node.proc.stop(sig=signal.SIGTERM, timeout=30.0)
            if vm and _alive(vm):
                os.kill(vm, signal.SIGKILL)
        if self.epmd is not None:
            self.epmd.stop()


def _alive(pid: int) -> bool:
    """A process of that PID exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def start_cluster(root: Path, fragment: str, size: int = 3) -> Cluster:
    """`size` clustered nodes with the MQTT plugin and `fragment` in their config."""
    need("rabbitmq-server")
    epmd = shutil.which("epmd") or "/usr/lib/erlang/erts-13.1.5/bin/epmd"
    root.mkdir(parents=True, exist_ok=True)
    cookie = root / ".erlang.cookie"
    cookie.write_text(os.urandom(16).hex())
    cookie.chmod(0o400)
    (root / "rabbitmq-env.conf").write_text("")
    cluster = Cluster(root, fragment=fragment, epmd_port=free_port())
    for index in range(1, size + 1):
        cluster.nodes.append(
            Node(
                index,
                f"herald-{index}@localhost",
                root / f"node{index}",
                free_port(),
                free_port(),
                free_port(),
            )
        )
    began = time.monotonic()
    cluster.epmd = Proc(
        "epmd", [epmd, "-port", str(cluster.epmd_port), "-address", "127.0.0.1"], root / "epmd.log"
    )
    try:
        # One at a time: a joining node holds peer discovery's lock while it retries, and the
        # first would wait for it; two joining at once can leave the MQTT plugin's client-id
        # tracker (a Raft cluster, mqtt_node) without a leader, and its node stops after 60 s
        # ("trigger_election ... nodedown", seen on a loaded machine).
        for node in cluster.nodes:
            cluster.start_node(node)
            cluster.wait_listening(node)
        cluster.started_in = time.monotonic() - began
    except BaseException:
        cluster.stop()
        raise
    return cluster


def start_serve_on(fleet: Fleet, state: Path, logs: Path, urls: list[str]) -> Serve:
    """`herald serve` with no broker of its own, announcing on (and following) every node:
    `--broker` once per node."""
    return start_serve(fleet, state, logs, mqtt="off", broker=urls)


def on_every_node(agent_toml: Path, urls: list[str]) -> None:
    """agent.toml's `broker.url` as the list of the cluster's nodes."""
    text = agent_toml.read_text()
    lines = [f"url = {json.dumps(urls)}" if line.startswith("url = ") else line for line in text.splitlines()]
    agent_toml.write_text("\n".join(lines) + "\n")
