"""`herald demo`: a three-host fleet on loopback, telling the three stories herald is for.

1. workstations react to retained MQTT messages: a change is applied within a second;
2. the sysadmin asks for "rebuild host X" with the real `herald trigger ... --wait`;
3. an offline laptop catches up: on its return, and through its timer alone when nothing is
   announced.

Everything runs in one process tree under a temporary directory (or `--keep DIR`): the server
(embedded broker and SFTP) in this process, one agent process per host whose rebuild command is
the recording stand-in (herald.standin). Nothing is written outside that directory.
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
from protocol.errors import ConfigError, HeraldError
from protocol.mqtt import connect
from protocol.settings import ServerConfig
from protocol.topics import ADMIN_USER, PUBLISHER_USER, Kind
from publisher.announce import announce, desired_of
from publisher.publish import Status as PublishStatus

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


async def demo(keep: Path | None = None) -> int:
    """Run the demo in a temporary directory, or in `keep` (which must be new or empty), left
    there afterwards with the logs it points to."""
    if keep is None:
        with tempfile.TemporaryDirectory(prefix="herald-demo-") as tmp:
            return await _demo(Path(tmp))
    if keep.exists() and (not keep.is_dir() or any(keep.iterdir())):
        raise ConfigError(f"demo --keep {keep}: not an empty directory; name a new one")
    keep.mkdir(parents=True, exist_ok=True)
    code = await _demo(keep.resolve())
    console.print(f"kept {keep}: agents/<host>/agent.log, state/chroot/<host>/logs/", markup=False)
    return code


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


def _rebuilds(home: Path) -> list[dict[str, object]]:
    record = home / "rebuilds.jsonl"
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text(encoding="utf-8").splitlines()]


def _story(number: int, title: str, explanation: str) -> None:
    console.rule(f"{number} · {title}")
    console.print(explanation, soft_wrap=True)


class _Demo:
    """The running demo: the server in this process, one agent process per host, and an admin
    view of the fleet fed by the broker."""

    def __init__(self, root: Path, server: Server, fleet: Path, homes: dict[str, Path]) -> None:
        self.root = root
        self.server = server
        self.fleet = fleet
        self.homes = homes
        self.agents: dict[str, asyncio.subprocess.Process] = {}
        self.view = FleetView(server.topics)

    async def start(self, host: str) -> None:
        config = self.homes[host] / "agent.toml"
        with (self.homes[host] / "agent.log").open("a") as log:
            self.agents[host] = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "herald", "agent", "--config", str(config), stdout=log, stderr=log
            )

    async def stop(self, host: str) -> None:
        agent = self.agents.pop(host, None)
        if agent is None or agent.returncode is not None:
            return
        agent.terminate()
        try:
            async with asyncio.timeout(10):
                await agent.wait()
        except TimeoutError:
            agent.kill()
            await agent.wait()

    async def stop_all(self) -> None:
        for host in list(self.agents):
            await self.stop(host)

    def edit(self, host: str, line: str) -> None:
        motd = self.fleet / "hosts" / host / "files" / "etc" / "motd"
        motd.write_text(motd.read_text(encoding="utf-8") + line + "\n", encoding="utf-8")

    async def publish(self, *, announce_changes: bool = True) -> dict[str, int]:
        report = await self.server.publish(announce_changes=announce_changes)
        changed = [row for row in report.hosts if row.status is PublishStatus.CHANGED]
        console.print(
            "published: "
            + ", ".join(f"{row.host} generation {row.generation}" for row in changed)
            + ("" if announce_changes else " (not announced)"),
            soft_wrap=True,
        )
        return {row.host: row.generation for row in report.hosts}

    def admin(self) -> list[str]:
        """The admin commands' common flags, as a user on this server would type them."""
        return ["--broker", str(self.server.url), "--state", str(self.server.state.root)]


async def _stories(demo: _Demo, watcher: aiomqtt.Client) -> None:
    hosts = sorted(demo.homes)
    first, sysadmin, laptop = hosts
    started = time.monotonic()
    await _watch(demo.view, watcher, _at(dict.fromkeys(hosts, 1)), "every host applying generation 1")
    console.print(f"all {len(hosts)} hosts applied generation 1 in {time.monotonic() - started:.1f}s")

    _story(
        1,
        "workstations react to retained MQTT messages",
        f"hosts/{first}/files/etc/motd is edited and "
        "published; the retained `desired` on the broker wakes its agent at once.",
    )
    demo.edit(first, "A change published by the demo.")
    published = time.time()
    generations = await demo.publish()
    await _watch(demo.view, watcher, _at({first: generations[first]}), f"{first} applying it")
    rebuild_started = float(str(_rebuilds(demo.homes[first])[-1]["t"]))
    console.print(f"{first}: rebuild started {rebuild_started - published:.2f}s after the publish began")
    installed = (demo.homes[first] / "root" / "etc" / "motd").read_text(encoding="utf-8").splitlines()[-1]
    console.print(f"{first}: /etc/motd now ends {installed!r}", soft_wrap=True, markup=False)

    _story(
        2,
        'the sysadmin publishes an ad-hoc "rebuild host X"',
        f"`herald trigger` sends {sysadmin} a "
        "retained command; --wait follows the host's state until it has reported.",
    )
    argv = ["herald", "trigger", sysadmin, "--action", "rebuild", "--wait", *demo.admin()]
    console.print(f"$ {' '.join(argv)}", markup=False, soft_wrap=True)
    before = len(_rebuilds(demo.homes[sysadmin]))
    asked = time.monotonic()
    done = await asyncio.create_subprocess_exec(
        sys.executable, "-m", *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await done.communicate()
    console.print(output.decode(errors="replace").rstrip(), markup=False, highlight=False)
    if done.returncode != 0 or len(_rebuilds(demo.homes[sysadmin])) != before + 1:
        raise HeraldError(f"demo: herald trigger exited {done.returncode}; {sysadmin} did not rebuild")
    console.print(f"{sysadmin}: rebuilt and reported back {time.monotonic() - asked:.1f}s after the command")

    _story(
        3,
        "an offline laptop catches up on its timer",
        f"{laptop} is a laptop (poll 5s): it is away "
        "while a change is published and takes it when it returns; then a publish that is never "
        "announced (as with the broker down) reaches it through its timer alone.",
    )
    await demo.stop(laptop)
    await _watch(
        demo.view, watcher, lambda v: v.hosts[laptop].status() is Status.STOPPED, f"{laptop} stopped"
    )
    demo.edit(laptop, "Published while the laptop was away.")
    generations = await demo.publish()
    await _watch(demo.view, watcher, lambda v: _desired(v, laptop) == generations[laptop], "the announcement")
    console.print(table(demo.view))
    returned = time.time()
    await demo.start(laptop)
    await _watch(demo.view, watcher, _at({laptop: generations[laptop]}), f"{laptop} catching up")
    took = float(str(_rebuilds(demo.homes[laptop])[-1]["t"])) - returned
    console.print(
        f"{laptop}: back online, applied generation {generations[laptop]} {took:.1f}s after it started"
    )
    demo.edit(laptop, "Published with no announcement.")
    published = time.time()
    generations = await demo.publish(announce_changes=False)
    await _watch(demo.view, watcher, _at({laptop: generations[laptop]}), f"{laptop} converging on its timer")
    took = float(str(_rebuilds(demo.homes[laptop])[-1]["t"])) - published
    console.print(
        f"{laptop}: its timer found generation {generations[laptop]}, rebuild {took:.1f}s after the publish"
    )
    if demo.server.url is not None:  # the fleet's view catches up too, once the broker hears of it
        password = read_secret(demo.server.state.service_secret(PUBLISHER_USER))
        desired = desired_of(demo.server.state.root, [laptop])
        await announce(desired, url=demo.server.url, password=password, topics=demo.server.topics)
        await _watch(
            demo.view, watcher, lambda v: _desired(v, laptop) == generations[laptop], "the announcement"
        )


def _desired(view: FleetView, host: str) -> int:
    row = view.hosts.get(host)
    return row.desired.generation if row is not None and row.desired is not None else 0


async def _demo(root: Path) -> int:
    fleet, homes = _prepare_fleet(root)
    console.rule("herald demo")
    console.print(f"fleet: {len(homes)} hosts ({', '.join(homes)}) in {fleet}", soft_wrap=True, markup=False)
    config = ServerConfig(
        fleet=str(fleet),
        state=str(root / "state"),
        mqtt="127.0.0.1:0",
        sftp="127.0.0.1:0",
        http="127.0.0.1:0",
    )
    server = Server(config)
    demo = _Demo(root, server, fleet, homes)
    try:
        report = await server.start()
        if server.url is None or server.sftp is None:
            raise HeraldError("demo: the broker or the SFTP server did not start")
        console.print(
            f"embedded broker {server.url} and SFTP server on port {server.sftp.port}, in this process"
        )
        print_report(report)
        laptop = max(homes)
        for host, home in homes.items():
            text = _agent_toml(
                host, home, server, server.sftp.public_host_key, server.sftp.port, home / "rebuilds.jsonl"
            )
            (home / "agent.toml").write_text(
                text.replace('poll = "1h"', 'poll = "5s"') if host == laptop else text
            )
            await demo.start(host)
        console.print(
            f"started {len(homes)} agents; their logs: {root / 'agents'}/<host>/agent.log",
            soft_wrap=True,
            markup=False,
        )
        password = read_secret(server.state.service_secret(ADMIN_USER))
        async with connect(server.url, username=ADMIN_USER, password=password) as watcher:
            for kind in (Kind.DESIRED, Kind.STATE, Kind.ONLINE):
                await watcher.subscribe(server.topics.every(kind), qos=1)
            await _stories(demo, watcher)
        console.rule("the fleet")
        console.print(table(demo.view))
        return 0
    finally:
        await demo.stop_all()
        await server.stop()
        logger.debug("demo stopped")
