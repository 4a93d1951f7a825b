"""The agent: how fast an announcement becomes a rebuild, what a poll costs, what an update moves.

- Latency: from the start of the announcement to the rebuild command's start, for 1 and for N
  agents (Agent objects, a few per process, each with its own SSH and MQTT connections).
- A no-change check on the kept-open SFTP session, against a new connection per poll as bento
  does: time (median of alternating runs) and bytes on the wire, counted by a relay.
- An update where 1 of 200 files changed: bytes the server sent, against that file plus MANIFEST.
"""

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from client.fetch import check, fetch
from client.store import Store
from protocol.credentials import read_secret
from protocol.layout import StateDir
from protocol.mqtt import BrokerURL
from protocol.release import decode_public_key, verify_signature
from protocol.topics import PUBLISHER_USER, Topics
from publisher.announce import announce, desired_of
from publisher.publish import publish

AGENTS_PER_PROCESS = 25
AGENTS_NICE = 10
POLLS = 60


# ---------------------------------------------------------------- a byte-counting relay


@dataclass
class Relay:
    """TCP relay on loopback that counts the bytes each way."""

    target: int
    port: int = 0
    up: int = 0  # client -> server
    down: int = 0  # server -> client
    server: asyncio.Server | None = None

    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, up: bool) -> None:
            try:
                while data := await source.read(65536):
                    if up:
                        self.up += len(data)
                    else:
                        self.down += len(data)
                    sink.write(data)
                    await sink.drain()
            except ConnectionError:
                pass
            finally:
                sink.close()

        task = asyncio.ensure_future(
            asyncio.gather(pipe(reader, upstream_writer, up=True), pipe(upstream_reader, writer, up=False))
        )
        self.tasks.add(task)  # type: ignore[arg-type]
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self.tasks.discard(task)  # type: ignore[arg-type]

    def total(self) -> int:
        return self.up + self.down


# ---------------------------------------------------------------- a fleet with real keys


def make_fleet(root: Path, hosts: int, files: int = 20) -> dict[str, Path]:
    keys: dict[str, Path] = {}
    (root / "fleet" / "hosts").mkdir(parents=True)
    (root / "keys").mkdir()
    lines = ["[publish]", "check = []", ""]
    for index in range(hosts):
        name = f"host{index:03d}"
        key = asyncssh.generate_private_key("ssh-ed25519")
        keys[name] = root / "keys" / name
        key.write_private_key(str(keys[name]))
        lines += [f"[hosts.{name}]", f'ssh_key = "{key.export_public_key().decode().strip()}"', ""]
        home = root / "fleet" / "hosts" / name
        home.mkdir()
        (home / "configuration.nix").write_text(f'{{ ... }}: {{ networking.hostName = "{name}"; }}\n')
        for part in range(files - 1):
            (home / f"part{part:03d}.nix").write_text(
                f"# {name} {part}\n" + "{ ... }: { }\n" + "# padding\n" * 60
            )
    (root / "fleet" / "fleet.toml").write_text("\n".join(lines))
    return keys


def serve(root: Path) -> tuple[subprocess.Popen[bytes], dict[str, object]]:
    argv = [
        sys.executable,
        "-m",
        "herald",
        "serve",
        "--fleet",
        str(root / "fleet"),
        "--state",
        str(root / "state"),
    ]
    argv += ["--mqtt", "127.0.0.1:0", "--sftp", "127.0.0.1:0", "--http", "off"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_file = root / "state" / "run" / "serve.json"
    deadline = time.monotonic() + 120
    while not run_file.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("herald serve did not start")
        time.sleep(0.1)
    return proc, json.loads(run_file.read_text())


# ---------------------------------------------------------------- latency


def agent_configs(root: Path, keys: dict[str, Path], info: dict[str, object]) -> list[Path]:
    """agent.toml for each host: its rebuild appends '<start time> <release dir>' to `started`."""
    configs = []
    for name, key in keys.items():
        home = root / "agents" / name
        home.mkdir(parents=True)  # "agents" may be a mount: see latency()
        command = ["sh", "-c", f'echo "$(date +%s.%N) $1" >> {home / "started"}', "sh", "{dir}"]
        config = home / "agent.toml"
        config.write_text(
            f"""host = "{name}"
ssh_key = "{key}"
state_dir = "{home / "state"}"
root = "{home / "root"}"
poll = "1h"
trigger = "off"
[server]
address = "127.0.0.1"
port = {info["sftp_port"]}
host_key = "{info["sftp_host_key"]}"
[broker]
url = "{info["mqtt"]}"
[rebuild]
command = {json.dumps(command)}
operation = "boot"
"""
        )
        configs.append(config)
    return configs


@dataclass(frozen=True)
class Latency:
    """Seconds from the start of an announcement to the rebuild's start, and the CPU seconds
    the server and the agents' processes used from that start until every rebuild began."""

    p50: float
    p99: float
    worst: float
    serve_cpu: float
    agents_cpu: float


def _cpu(pid: int) -> float:
    """User and system CPU seconds of a process (proc(5): fields 14 and 15 of stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def journaled_ext4(where: Path, size: str = "2G") -> Iterator[bool]:
    """Mount a fresh ext4 with a journal (an image on this disk, through a loop device) at `where`;
    False, and `where` left a plain directory, when that cannot be done (not root, no loop)."""
    where.mkdir()
    image = where.with_name(where.name + ".img")
    try:
        subprocess.run(["truncate", "-s", size, str(image)], check=True)
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-O", "has_journal", str(image)], check=True, capture_output=True
        )
        subprocess.run(["mount", "-o", "loop", str(image), str(where)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        image.unlink(missing_ok=True)
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", str(where)], check=False, capture_output=True)
        image.unlink(missing_ok=True)


def latency(hosts: int, *, apart: bool = True) -> Latency:
    """`apart` makes this machine more like a fleet, where each agent has its own disk and CPU:
    the agents keep their state on an ext4 with a journal, as a NixOS host's disk has, and run
    below the server's priority (see _latency). This VM's root filesystem is ext4 without a
    journal: there every new inode is checked against those deleted in the last half minute, and
    100 agents sharing one disk create and replace hundreds of files at once (perf: a quarter of
    the agents' CPU, in the kernel)."""
    with tempfile.TemporaryDirectory(prefix="herald-bench-agent-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        keys = make_fleet(root, hosts, files=5)
        if not apart:
            return _latency(root, keys, apart=False)
        with journaled_ext4(root / "agents") as mounted:
            if not mounted:
                raise RuntimeError("no journaled ext4 for the agents' state: needs root and a loop device")
            return _latency(root, keys, apart=True)


def _latency(root: Path, keys: dict[str, Path], *, apart: bool) -> Latency:
    # On a fleet, the server and its agents never share a CPU; here they share two cores, and an
    # agent that preempts the server holds up every other agent. `apart` runs the agents at a
    # lower priority, so the server gets its CPU when it needs it, as on its own machine.
    nice = ["nice", "-n", str(AGENTS_NICE)] if apart else []
    server, info = serve(root)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        workers = start_agents(agent_configs(root, keys, info), nice)
        started = [root / "agents" / name / "started" for name in keys]
        wait_for(lambda: all(path.exists() for path in started), "every agent at generation 1")
        time.sleep(1)
        (root / "fleet" / "shared.nix").write_text("{ ... }: { changed = true; }\n")
        for name in keys:
            (root / "fleet" / "hosts" / name / "shared.nix").symlink_to("../../shared.nix")
        publish(root / "fleet", root / "state")
        password = read_secret(StateDir(root / "state").service_secret(PUBLISHER_USER))
        url = BrokerURL.parse(str(info["mqtt"]))
        os.sync()  # what setup (and the benchmarks before) left to write back is not billed here
        cpu = [_cpu(server.pid), sum(_cpu(worker.pid) for worker in workers)]
        t0 = time.time()
        asyncio.run(
            announce(desired_of(root / "state", list(keys)), url=url, password=password, topics=Topics())
        )
        wait_for(
            lambda: all(len(path.read_text().splitlines()) == 2 for path in started),
            "every agent's second rebuild",
        )
        serve_cpu = _cpu(server.pid) - cpu[0]
        agents_cpu = sum(_cpu(worker.pid) for worker in workers) - cpu[1]
        delays = sorted(float(path.read_text().splitlines()[1].split()[0]) - t0 for path in started)
        return Latency(
            statistics.median(delays),
            delays[min(len(delays) - 1, int(len(delays) * 0.99))],
            delays[-1],
            serve_cpu,
            agents_cpu,
        )
    finally:
        stop_all(workers, server)


def start_agents(configs: list[Path], nice: list[str]) -> list[subprocess.Popen[bytes]]:
    """The agents of `configs`, AGENTS_PER_PROCESS to a process, run through `nice`."""
    return [
        subprocess.Popen(
            [
                *nice,
                sys.executable,
                "-m",
                "bench.agents_process",
                *map(str, configs[i : i + AGENTS_PER_PROCESS]),
            ]
        )
        for i in range(0, len(configs), AGENTS_PER_PROCESS)
    ]


def stop_all(workers: list[subprocess.Popen[bytes]], server: subprocess.Popen[bytes]) -> None:
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.wait(30)
    server.terminate()
    server.wait(30)


def wait_for(condition: "object", what: str, limit: float = 300.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {limit:.0f}s")
        time.sleep(0.05)


# ---------------------------------------------------------------- poll cost and update bytes


async def _poll_and_update(root: Path, info: dict[str, object], key: Path) -> dict[str, float]:
    relay = Relay(int(info["sftp_port"]))  # type: ignore[arg-type]
    await relay.start()
    options = {
        "username": "host000",
        "client_keys": [str(key)],
        "known_hosts": ([asyncssh.import_public_key(str(info["sftp_host_key"]))], [], []),
        "config": None,
        "agent_path": None,
    }
    direct = int(info["sftp_port"])  # type: ignore[arg-type]
    try:
        return await _measure(root, relay, direct, options)
    finally:
        await relay.close()


async def _measure(root: Path, relay: Relay, direct: int, options: dict[str, object]) -> dict[str, float]:
    """Times on direct connections; bytes through the relay."""
    kept_times: list[float] = []
    new_times: list[float] = []
    async with (
        asyncssh.connect("127.0.0.1", direct, **options) as conn,  # type: ignore[arg-type]
        conn.start_sftp_client() as sftp,
    ):
        await check(sftp)
        for _ in range(POLLS):  # alternate: neither kind always meets a warm or a busy machine
            started = time.perf_counter()
            await check(sftp)
            kept_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            async with (
                asyncssh.connect("127.0.0.1", direct, **options) as fresh,  # type: ignore[arg-type]
                fresh.start_sftp_client() as other,
            ):
                await check(other)
            new_times.append(time.perf_counter() - started)

    before = relay.total()
    async with (
        asyncssh.connect("127.0.0.1", relay.port, **options) as fresh,  # type: ignore[arg-type]
        fresh.start_sftp_client() as other,
    ):
        await check(other)
    new_bytes = relay.total() - before

    async with (
        asyncssh.connect("127.0.0.1", relay.port, **options) as conn,  # type: ignore[arg-type]
        conn.start_sftp_client() as sftp,
    ):
        await check(sftp)
        before = relay.total()
        await check(sftp)
        kept_bytes = relay.total() - before

        state = StateDir(root / "state")
        publisher_key = decode_public_key(
            (state.chroot("host000") / "credentials" / "publisher.pub").read_text()
        )
        store = Store(root / "agent-state")
        store.prepare()

        async def verify(data: bytes, signature: bytes) -> None:
            verify_signature(data, signature, publisher_key)

        await fetch(sftp, await check(sftp), host="host000", verify=verify, store=store)
        changed = root / "fleet" / "hosts" / "host000" / "part007.nix"
        changed.write_text(changed.read_text() + "# one file changed\n")
        publish(root / "fleet", root / "state")
        before = relay.down
        current = await check(sftp)
        await fetch(sftp, current, host="host000", verify=verify, store=store)
        release = state.chroot("host000") / "releases" / str(current.generation)
        return {
            "kept_ms": statistics.median(kept_times) * 1000,
            "kept_bytes": kept_bytes,
            "new_ms": statistics.median(new_times) * 1000,
            "new_bytes": new_bytes,
            "update_bytes": relay.down - before,
            "file_bytes": changed.stat().st_size,
            "manifest_bytes": release.stat().st_size,  # the MANIFEST and its signature line
        }


def poll_and_update() -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="herald-bench-agent-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        keys = make_fleet(root, 1, files=200)
        server, info = serve(root)
        try:
            return asyncio.run(_poll_and_update(root, info, keys["host000"]))
        finally:
            server.terminate()
            server.wait(30)


def _yes(met: bool) -> str:
    return "yes" if met else "**no**"


def main(agents: int = 100) -> str:
    single = latency(1)
    many = latency(agents)
    shared = latency(agents, apart=False)
    cost = poll_and_update()
    ratio = cost["update_bytes"] / (cost["file_bytes"] + cost["manifest_bytes"])

    def cpu(run: Latency) -> str:
        return (
            f"server {run.serve_cpu:.2f} s ({run.serve_cpu / agents * 1000:.1f} ms per host), "
            f"agents' processes {run.agents_cpu:.2f} s, on {os.cpu_count()} cores shared by both"
        )

    def spread(run: Latency) -> str:
        return f"p50 {run.p50 * 1000:.0f} ms, p99 {run.p99 * 1000:.0f} ms, max {run.worst * 1000:.0f} ms"

    rows = [
        ("latency, 1 agent", f"p50 {single.p50 * 1000:.0f} ms, p99 {single.p99 * 1000:.0f} ms", "-"),
        (
            f"latency, {agents} agents",
            spread(many),
            f"p99 ≤ 1 s: {'yes' if many.p99 <= 1.0 else '**no**'}",
        ),
        (f"CPU for those {agents} updates", cpu(many), "-"),
        (
            f"latency, {agents} agents sharing the server's disk and CPU",
            spread(shared),
            "-",
        ),
        (f"CPU for those {agents} updates", cpu(shared), "-"),
        (
            "no-change check, kept-open session",
            f"{cost['kept_ms']:.1f} ms, {cost['kept_bytes']:.0f} bytes",
            "≤ 5 ms and ≤ 2 KB: " + _yes(cost["kept_ms"] <= 5 and cost["kept_bytes"] <= 2048),
        ),
        (
            "no-change check, new connection each time",
            f"{cost['new_ms']:.1f} ms, {cost['new_bytes']:.0f} bytes",
            "baseline",
        ),
        (
            "1 of 200 files changed",
            (
                f"{cost['update_bytes']:.0f} bytes from the server; the file is {cost['file_bytes']:.0f}, "
                f"MANIFEST with its signature {cost['manifest_bytes']:.0f}"
            ),
            f"≤ 2 x (file + MANIFEST): {'yes' if ratio <= 2 else '**no**'} ({ratio:.2f} x)",
        ),
    ]
    lines = [
        "## Agent",
        "",
        "`bench/agent.py`: real `herald serve` (embedded broker and SFTP) and real agents, whose",
        f"rebuild command records when it starts. {AGENTS_PER_PROCESS} agents per process. Latency is from",
        "the start of the announcement to the rebuild's start. On a fleet each agent has its own disk",
        "and CPU; here they share two cores and one disk with the server. So, but in the row that says",
        "otherwise, the agents keep their state on an ext4 with a journal, as a NixOS host's disk has",
        "(an image through a loop device), and run at nice 10, so the server gets its CPU when it needs",
        "it. The server's state is on this VM's root filesystem, an ext4 without a journal, where",
        "each new inode is checked against those deleted in the last half minute; in the row that",
        "says so, the agents' state is there too and they run at the server's priority.",
        f"Check times are medians of {POLLS} alternating runs on direct connections; bytes are",
        "counted on the wire by a relay (both directions for the checks, server to agent for the",
        "update).",
        "",
        "| measure | result | target |",
        "|---|---|---|",
        *(f"| {name} | {result} | {target} |" for name, result, target in rows),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100))
