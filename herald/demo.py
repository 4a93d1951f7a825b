"""`herald demo`: a three-host fleet on loopback, a change propagating, the fleet's state shown.

Everything runs in one process tree under a temporary directory: the server (embedded broker
and SFTP) in this process, one agent process per host whose rebuild command is the recording
stand-in (herald.standin). Nothing is written outside the temporary directory.
"""

import asyncio
import json
import shutil
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import asyncssh
from loguru import logger

from herald.fleet import FleetView, Status, table
from herald.output import console, print_report
from herald.serve import Server
from protocol.credentials import read_secret
from protocol.errors import HeraldError
from protocol.mqtt import connect
from protocol.settings import ServerConfig
from protocol.topics import ADMIN_USER, Kind

WAIT = 60.0


def example_fleet() -> Path:
    for candidate in (
        Path(__file__).parent / "example_fleet",
        Path(__file__).parents[1] / "deploy" / "example-fleet",
    ):
        if (candidate / "fleet.toml").is_file():
            return candidate
    raise HeraldError("the example fleet (deploy/example-fleet) is not installed with this copy of herald")


def _agent_toml(host: str, home: Path, server: Server, host_key: str, sftp_port: int, record: Path) -> str:
    command = [
        sys.executable,
        "-m",
        "herald.standin",
        "--record",
        str(record),
        "{operation}",
        "{dir}",
        "{host}",
    ]
    return f"""\
host = "{host}"
trigger = "off"
ssh_key = "{home / "id_ed25519"}"
state_dir = "{home / "state"}"
root = "{home / "root"}"
poll = "1h"

[server]
address = "127.0.0.1"
port = {sftp_port}
host_key = "{host_key}"

[broker]
url = "{server.url}"
keepalive = 10

[rebuild]
command = {json.dumps(command)}
"""


async def _watch(
    view: FleetView, client: aiomqtt.Client, done: Callable[[FleetView], bool], what: str
) -> None:
    if done(view):
        return
    try:
        async with asyncio.timeout(WAIT):
            async for message in client.messages:
                if isinstance(message.payload, bytes):
                    view.update(str(message.topic), message.payload)
                if done(view):
                    return
    except TimeoutError:
        raise HeraldError(f"demo: {what} did not happen within {WAIT:.0f}s") from None


def _at(generations: dict[str, int]) -> Callable[[FleetView], bool]:
    def check(view: FleetView) -> bool:
        return all(
            (row := view.hosts.get(host)) is not None
            and row.status() is Status.UP_TO_DATE
            and row.state is not None
            and row.state.deployed_generation == generation
            for host, generation in generations.items()
        )

    return check


async def demo() -> int:
    with tempfile.TemporaryDirectory(prefix="herald-demo-") as tmp:
        return await _demo(Path(tmp))


def _prepare_fleet(root: Path) -> tuple[Path, dict[str, Path]]:
    """A copy of the example fleet whose hosts log in with keys made now; each host's home dir."""
    fleet = root / "fleet"
    shutil.copytree(example_fleet(), fleet, symlinks=True)
    fleet_toml = (fleet / "fleet.toml").read_text(encoding="utf-8")
    entries = tomllib.loads(fleet_toml)["hosts"]
    homes = {host: root / "agents" / host for host in sorted(entries)}
    for host, home in homes.items():
        home.mkdir(parents=True)
        key = asyncssh.generate_private_key("ssh-ed25519", comment=f"root@{host}")
        key.write_private_key(str(home / "id_ed25519"))
        fleet_toml = fleet_toml.replace(entries[host]["ssh_key"], key.export_public_key().decode().strip())
    (fleet / "fleet.toml").write_text(fleet_toml, encoding="utf-8")
    return fleet, homes


async def _start_agents(server: Server, homes: dict[str, Path]) -> list[asyncio.subprocess.Process]:
    sftp = server.sftp
    if sftp is None:
        raise HeraldError("demo: the SFTP server did not start")
    agents = []
    for host, home in homes.items():
        config = home / "agent.toml"
        text = _agent_toml(host, home, server, sftp.public_host_key, sftp.port, home / "rebuilds.jsonl")
        config.write_text(text, encoding="utf-8")
        with (home / "agent.log").open("w") as log:
            agents.append(
                await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "herald", "agent", "--config", str(config), stdout=log, stderr=log
                )
            )
    return agents


async def _stop_agents(agents: list[asyncio.subprocess.Process]) -> None:
    for agent in agents:
        if agent.returncode is None:
            agent.terminate()
    for agent in agents:
        try:
            async with asyncio.timeout(10):
                await agent.wait()
        except TimeoutError:
            agent.kill()
            await agent.wait()


async def _propagate(server: Server, fleet: Path, homes: dict[str, Path]) -> FleetView:
    """Wait for generation 1 everywhere, change one host, publish, and time its rebuild."""
    if server.url is None:
        raise HeraldError("demo: the broker did not start")
    hosts = sorted(homes)
    password = read_secret(server.state.service_secret(ADMIN_USER))
    async with connect(server.url, username=ADMIN_USER, password=password) as watcher:
        view = FleetView(server.topics)
        for kind in (Kind.DESIRED, Kind.STATE, Kind.ONLINE):
            await watcher.subscribe(server.topics.every(kind), qos=1)
        started = time.monotonic()
        await _watch(view, watcher, _at(dict.fromkeys(hosts, 1)), "every host applying generation 1")
        console.print(f"all {len(hosts)} hosts applied generation 1 in {time.monotonic() - started:.1f}s")

        edited = hosts[0]
        motd = fleet / "hosts" / edited / "files" / "etc" / "motd"
        motd.write_text(
            motd.read_text(encoding="utf-8") + "A change published by the demo.\n", encoding="utf-8"
        )
        console.rule(f"edit hosts/{edited}/files/etc/motd and publish again")
        published = time.time()
        report = await server.publish()
        print_report(report)
        generations = {row.host: row.generation for row in report.hosts}
        await _watch(view, watcher, _at(generations), f"{edited} applying generation {generations[edited]}")
    records = (homes[edited] / "rebuilds.jsonl").read_text(encoding="utf-8").splitlines()
    rebuild_started = json.loads(records[-1])["t"]
    installed = (homes[edited] / "root" / "etc" / "motd").read_text(encoding="utf-8").splitlines()[-1]
    console.print(
        f"{edited}: rebuild started {rebuild_started - published:.2f}s after the publish began",
        soft_wrap=True,
    )
    console.print(f"{edited}: /etc/motd now ends {installed!r}", soft_wrap=True)
    return view


async def _demo(root: Path) -> int:
    fleet, homes = _prepare_fleet(root)
    console.rule("herald demo")
    console.print(f"fleet: {len(homes)} hosts ({', '.join(homes)}) in {fleet}")
    config = ServerConfig(
        fleet=str(fleet),
        state=str(root / "state"),
        mqtt="127.0.0.1:0",
        sftp="127.0.0.1:0",
        http="127.0.0.1:0",
    )
    server = Server(config)
    agents: list[asyncio.subprocess.Process] = []
    try:
        report = await server.start()
        console.print(
            f"embedded broker {server.url}, SFTP on port {server.sftp.port if server.sftp else '?'}:"
        )
        print_report(report)
        agents = await _start_agents(server, homes)
        console.print(f"started {len(agents)} agents; their logs are in {root / 'agents'}/<host>/agent.log")
        view = await _propagate(server, fleet, homes)
        console.rule("fleet")
        console.print(table(view))
        return 0
    finally:
        await _stop_agents(agents)
        await server.stop()
        logger.debug("demo stopped")
