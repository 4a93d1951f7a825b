"""The embedded broker against Mosquitto and a 3-node RabbitMQ cluster, in the same run:
fan-out, reconnect storm, memory.

N hosts are minimal MQTT clients (bench/mqtt_worker.py) in a few processes: the broker shares
this machine's cores with them, where real hosts would bring their own. Each host subscribes to
its own `desired`; herald's own code (publisher.announce) then announces every host. Fan-out is
the time from the start of that announcement to the last receipt; a host's latency, to its own
receipt. Then every host disconnects and all reconnect at once, authenticating again (the
storm). RSS is the broker's peak (VmHWM); for the cluster, the largest node's. On the cluster
(tests/rabbitmq.py starts it, `herald broker export --format rabbitmq` configures it) the hosts
are spread over the nodes, one load process per node, and herald announces on every node.
"""

import asyncio
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.fleetgen import make_fleet
from protocol.credentials import read_secret
from protocol.messages import Desired, now
from protocol.mqtt import BrokerURL
from protocol.topics import PUBLISHER_USER, Topics
from publisher.announce import announce
from publisher.publish import publish

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.rabbitmq import Cluster

WORKERS = 2
LIMIT = 180.0
CLUSTER = "rabbitmq, 3 nodes"


@dataclass
class Case:
    broker: str
    hosts: int
    fanout: float
    p50: float
    p99: float
    storm: float
    rss_mb: float
    nodes_mb: tuple[float, ...] = ()  # a cluster's nodes, each


def _free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_broker(kind: str, state: Path, work: Path, port: int) -> subprocess.Popen[str]:
    if kind == "embedded":
        argv = [sys.executable, "-m", "bench.broker_process", str(state / "broker" / "passwd"), str(port)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        return proc
    export = [sys.executable, "-m", "herald", "broker", "export", "--state", str(state), str(work / "mq")]
    subprocess.run(export, check=True, capture_output=True)
    conf = work / "mosquitto.conf"
    fragment = (work / "mq" / "mosquitto.conf").read_text()
    conf.write_text(
        f"listener {port} 127.0.0.1\nuser root\npersistence false\nmax_connections -1\n{fragment}"
    )
    proc = subprocess.Popen(
        ["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True
    )
    deadline = time.monotonic() + 10
    import socket  # noqa: PLC0415

    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.05)
    raise RuntimeError("mosquitto did not start")


@contextlib.contextmanager
def rabbitmq_cluster(state: Path, work: Path) -> "Iterator[Cluster]":
    """tests/rabbitmq.py's cluster, configured by `herald broker export --format rabbitmq`."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from rabbitmq import start_cluster  # noqa: PLC0415 - tests/ is not a package path

    export = [sys.executable, "-m", "herald", "broker", "export", "--format", "rabbitmq"]
    subprocess.run([*export, "--state", str(state), str(work / "rmq")], check=True, capture_output=True)
    cluster = start_cluster(work / "cluster", (work / "rmq" / "rabbitmq.conf").read_text())
    try:
        imported = cluster.ctl(cluster.nodes[0], "import_definitions", str(work / "rmq" / "definitions.json"))
        if imported.returncode != 0:
            raise RuntimeError(f"import_definitions: {imported.stderr}")
        last = max(p.name for p in (state / "chroot").iterdir())
        secret = (state / "chroot" / last / "credentials" / "broker.secret").read_text().strip()
        deadline = time.monotonic() + 60  # the import is asynchronous: the last user on the last node
        while not asyncio.run(_admitted(cluster.nodes[-1].mqtt, last, secret)):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not admit herald's users within 60 s")
            time.sleep(0.2)
        yield cluster
    finally:
        cluster.stop()


async def _admitted(port: int, user: str, secret: str) -> bool:
    from bench.mqtt_worker import _connect, _packet, _read  # noqa: PLC0415

    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    try:
        writer.write(_connect(user, secret))
        kind, body = await asyncio.wait_for(_read(reader), 5)
        writer.write(_packet(0xE0, b""))
        return kind == 0x20 and body[1] == 0
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
    finally:
        writer.close()


def _nodes(case: Case) -> str:
    return f" (nodes: {' / '.join(f'{mb:.0f}' for mb in case.nodes_mb)} MB)" if case.nodes_mb else ""


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Workers:
    """The hosts in WORKERS processes on one broker, or one process per node of a cluster."""

    def __init__(self, secrets: dict[str, str], ports: list[int], work: Path) -> None:
        names = sorted(secrets)
        self.procs = []
        count = WORKERS if len(ports) == 1 else len(ports)
        for index in range(count):
            share = {name: secrets[name] for name in names[index::count]}
            path = work / f"hosts-{index}.json"
            path.write_text(json.dumps(share))
            port = ports[index % len(ports)]
            argv = [sys.executable, "-m", "bench.mqtt_worker", str(path), "127.0.0.1", str(port)]
            self.procs.append(
                subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            )

    def send(self, command: str) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"do": command}) + "\n")
            proc.stdin.flush()

    def answers(self) -> list[dict[str, object]]:
        replies = []
        for proc in self.procs:
            assert proc.stdout is not None
            reply = json.loads(proc.stdout.readline())
            if "error" in reply:
                raise RuntimeError(reply["error"])
            replies.append(reply)
        return replies

    def close(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


async def _announce(url: list[BrokerURL], state: Path, hosts: list[str]) -> float:
    """herald's own announcement of every host; the time it started."""
    desired = {host: Desired(generation=1, version="0" * 64, published_at=now()) for host in hosts}
    password = read_secret(state / "broker" / f"{PUBLISHER_USER}.secret")
    started = time.time()
    await announce(desired, url=url, password=password, topics=Topics(), timeout=LIMIT)
    return started


def run_case(kind: str, state: Path, hosts: list[str], work: Path, cluster: "Cluster | None" = None) -> Case:
    secrets = {
        host: (state / "chroot" / host / "credentials" / "broker.secret").read_text().strip()
        for host in hosts
    }
    if cluster is not None:
        broker, ports = None, [node.mqtt for node in cluster.nodes]
    else:
        ports = [_free_port()]
        broker = _start_broker(kind, state, work, ports[0])
    workers = Workers(secrets, ports, work)
    try:
        workers.send("connect")
        workers.answers()
        workers.send("fanout")
        started = asyncio.run(_announce([BrokerURL("127.0.0.1", port) for port in ports], state, hosts))
        received: dict[str, float] = {}
        for reply in workers.answers():
            received |= reply["received"]  # type: ignore[arg-type]
        latencies = sorted(received[host] - started for host in hosts)
        fanout = max(received.values()) - started
        workers.send("disconnect")
        workers.answers()
        started = time.time()
        workers.send("connect")
        storm = max(float(reply["at"]) for reply in workers.answers()) - started  # type: ignore[arg-type]
        pids = [node.vm_pid() for node in cluster.nodes] if cluster is not None else [broker.pid]  # type: ignore[union-attr]
        each = tuple(_peak_rss_mb(pid) for pid in pids)
        rss = max(each)
        return Case(
            kind,
            len(hosts),
            fanout,
            statistics.median(latencies),
            latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
            storm,
            rss,
            each if cluster is not None else (),
        )
    finally:
        workers.close()
        if broker is not None:
            broker.terminate()
            broker.wait(30)


def main(sizes: tuple[int, ...] = (100, 1000)) -> str:
    with tempfile.TemporaryDirectory(prefix="herald-bench-broker-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        fleet, state = work / "fleet", work / "state"
        hosts = make_fleet(fleet, max(sizes))
        (fleet / "fleet.toml").write_text("[publish]\ncheck = []\n\n" + (fleet / "fleet.toml").read_text())
        publish(fleet, state)
        kinds = ("embedded", "mosquitto") if shutil.which("mosquitto") else ("embedded",)
        cases = [run_case(kind, state, hosts[:size], work) for size in sizes for kind in kinds]
        if shutil.which("rabbitmq-server"):
            with rabbitmq_cluster(state, work) as cluster:
                cases += [run_case(CLUSTER, state, hosts[:size], work, cluster) for size in sizes]
        cases.sort(key=lambda case: case.hosts)
    lines = [
        "## Broker",
        "",
        f"`bench/broker.py`: N hosts as minimal MQTT clients in {WORKERS} processes on this machine, each",
        "subscribed to its own `desired` (at QoS 0, as agents subscribe) with its own password;",
        "`publisher.announce` announces every host (QoS 1, retained); latency is from the start of",
        "that announcement to a host's receipt. Then every host disconnects and all reconnect at",
        "once, authenticating. Every broker runs with herald's users and ACL (Mosquitto and RabbitMQ",
        "from `herald broker export`). The RabbitMQ cluster is 3 nodes on this same machine (so its",
        "three Erlang VMs share the two cores with the load), the hosts spread over them, one load",
        "process per node; herald announces on every node; its RSS is the largest node's, then",
        "each node's. One run per row.",
        "",
        "| broker | N | fan-out | p50 | p99 | reconnect storm | broker RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    lines.extend(
        f"| {c.broker} | {c.hosts} | {c.fanout:.2f} s | {c.p50 * 1000:.0f} ms | {c.p99 * 1000:.0f} ms "
        f"| {c.storm:.2f} s | {c.rss_mb:.0f} MB{_nodes(c)} |"
        for c in cases
    )
    biggest = [c for c in cases if c.broker == "embedded" and c.hosts == max(sizes)]
    if biggest:
        c = biggest[0]
        met = {
            "fan-out p99 ≤ 1 s": c.p99 <= 1.0,
            "storm ≤ 5 s": c.storm <= 5.0,
            "RSS ≤ 150 MB": c.rss_mb <= 150,
        }
        targets = ", ".join(f"{name}: {'yes' if ok else '**no**'}" for name, ok in met.items())
        lines += ["", f"Targets for the embedded broker at {c.hosts} hosts: {targets}."]
    return "\n".join([*lines, ""])


if __name__ == "__main__":
    print(main())
