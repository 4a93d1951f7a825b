"""The `herald` command. Each subcommand is a small function; errors print one line and exit non-zero.

Each subcommand imports what it needs when it runs: `herald publish` must not pay for asyncssh,
and a host running `herald agent` has no amqtt installed.
"""

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

import msgspec
from loguru import logger

from herald.output import console, fail
from herald.runner import Terminated, run
from protocol import __version__, log
from protocol.errors import ConfigError, HeraldError, UnreachableError
from protocol.settings import AgentConfig, ServerConfig, convert, load, parse_endpoint

if TYPE_CHECKING:
    from protocol.settings import RolloutPlan

T = TypeVar("T")
DEFAULT_STATE = "/var/lib/herald"
SERVER_TOML = Path("/etc/herald/server.toml")


_run = run


# ---------------------------------------------------------------- subcommands


def _state_to_write(state: Path, *, init: bool) -> None:
    """A publish writes into an existing state directory, or a new one only when asked: a
    mistyped --state would otherwise start a whole new state (signing key, broker secrets) that
    no agent trusts."""
    if state.exists() and not state.is_dir():
        raise ConfigError(f"--state {state}: not a directory")
    if not state.exists() and not init:
        raise ConfigError(
            f"--state {state}: no such directory; to start a new herald state there (a new signing "
            "key and broker secrets, which no agent knows yet), pass --init"
        )


def cmd_publish(args: argparse.Namespace) -> int:
    from herald.output import print_report, progress_bar, report_json
    from publisher.publish import Status, publish

    if not args.dry_run:
        _state_to_write(args.state, init=args.init)
    with progress_bar() as progress:
        report = publish(
            args.fleet,
            args.state,
            dry_run=args.dry_run,
            progress=progress,
            keep=args.keep,
            allow_dirty=args.allow_dirty,
            rollout=_rollout_plan(args.rollout),
        )
    if not args.dry_run:
        from protocol.layout import StateDir
        from publisher.hostkeys import distribute

        distribute(StateDir(args.state))  # a host added during a host-key rotation gets its statement
    if args.json:
        sys.stdout.buffer.write(report_json(report) + b"\n")
    else:
        print_report(report, every_host=args.every_host)
    if args.broker and report.released and not args.dry_run:  # a rollout holds some back
        from herald.announcing import announce_hosts

        try:
            _run(announce_hosts(args.state, args.broker, report.released, args.prefix))
        except UnreachableError as exc:
            logger.warning(
                "releases written, announcement skipped: {}; agents pick them up on their timer", exc
            )
    return 1 if report.of(Status.FAILED) else 0


def _rollout_plan(value: str | None) -> "RolloutPlan | Literal['off'] | None":
    """--rollout: None (fleet.toml's [rollout]), 'off', or the [rollout] table of a TOML file."""
    if value is None or value == "off":
        return "off" if value == "off" else None
    from protocol.settings import RolloutPlan, read_toml

    data = read_toml(Path(value))
    if set(data) != {"rollout"}:
        raise ConfigError(
            f"{value}: expected one [rollout] table (with its [[rollout.waves]]), as in fleet.toml"
        )
    return convert(data["rollout"], RolloutPlan, source=value, at="rollout")


def cmd_rollout(args: argparse.Namespace) -> int:
    from herald.rolloutview import change_command, status_command

    if args.action == "status":
        from herald.admin import fleet_view

        return status_command(args, fleet_view(_admin_defaults(args)))
    return change_command(_admin_defaults(args, broker=False))


def cmd_serve(args: argparse.Namespace) -> int:
    from herald.serve import serve

    flags = {
        key: str(value)
        for key, value in (
            ("fleet", args.fleet),
            ("state", args.state),
            ("mqtt", args.mqtt),
            ("sftp", args.sftp),
            ("http", args.http),
        )
        if value is not None
    }
    broker: dict[str, object] = {"broker": args.broker} if args.broker is not None else {}
    if args.broker is not None and args.mqtt is None:
        flags["mqtt"] = "off"  # an external broker replaces the embedded one
    if args.config is not None:
        fields = msgspec.structs.asdict(load(args.config, ServerConfig))
        fields = {key: value for key, value in fields.items() if value is not None}
        config = convert(msgspec.to_builtins(fields) | flags | broker, ServerConfig, source=str(args.config))
    elif args.fleet is None or args.state is None:
        raise ConfigError("serve needs --fleet and --state (or --config server.toml)")
    else:
        config = convert(flags | broker, ServerConfig, source="command line")
    with contextlib.suppress(Terminated):
        _run(serve(config))
    return 0


def cmd_broker_export(args: argparse.Namespace) -> int:
    from broker.emqx import export_emqx
    from broker.export import export_mosquitto
    from broker.rabbitmq import export_rabbitmq
    from protocol.topics import Topics
    from publisher.inventory import load_inventory

    export = {"mosquitto": export_mosquitto, "rabbitmq": export_rabbitmq, "emqx": export_emqx}[args.format]
    hosts = [host.name for host in load_inventory(args.fleet).hosts] if args.fleet else None
    for path in export(args.state, args.outdir, Topics(args.prefix), hosts):
        console.print(f"wrote {path}")
    return 0


def cmd_server_provision(args: argparse.Namespace) -> int:
    from herald.output import warn
    from publisher.provision import provision, sshd_include_problem

    changes = provision(args.fleet, args.state, dry_run=args.dry_run, sshd_state=args.sshd_state)
    for change in changes:
        console.print(f"{'would ' if args.dry_run else ''}{change.what}", markup=False, soft_wrap=True)
    if not changes:
        console.print("nothing to change")
    fragment = (args.sshd_state or args.state.absolute()) / "ssh" / "sshd_config"
    try:
        main_config = args.sshd_config.read_text(encoding="utf-8")
    except OSError as exc:
        warn(
            f"{args.sshd_config}: not read ({exc.strerror}); include {fragment} at its end, then reload sshd"
        )
    else:
        problem = sshd_include_problem(main_config, fragment)
        if problem is not None:
            warn(f"{args.sshd_config}: {problem.removeprefix('sshd_config ')}, then reload sshd")
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from client.agent import Agent
    from protocol.messages import Phase

    agent = Agent(load(args.config, AgentConfig), args.config)
    if args.check_config:  # what a running agent asks of the one a restart would start
        console.print(f"{agent.host}: {args.config} loads; the agent starts", markup=False)
        return 0
    if args.once:
        state = _run(agent.once(urgent=args.now))
        deployed = state.deployed_generation
        reboot = "; a reboot is needed" if state.needs_reboot else ""
        console.print(
            f"{agent.host}: {state.phase} (deployed generation {deployed}) {state.message}{reboot}",
            markup=False,
        )
        return 0 if state.phase in (Phase.IDLE, Phase.POSTPONED) else 1
    try:
        _run(agent.run())
    except Terminated:
        logger.info("agent stopped")
    if agent.restart_requested:  # a deployment changed agent.toml or the herald package
        from client.restart import execute_again

        execute_again()
    return 0


def cmd_enrol(args: argparse.Namespace) -> int:
    from client.agent import Agent
    from client.enrol import agent_toml, described, ensure_ssh_key, server_host_key
    from protocol.messages import Phase
    from protocol.settings import parse_endpoint

    if args.rotate:
        from client.enrol import rotate_ssh_key

        for line in rotate_ssh_key(load(args.config, AgentConfig)):
            console.print(line, markup=False, soft_wrap=True)
        return 0
    if args.server is None or args.host is None:
        raise ConfigError("enrol needs --server and --host (or --rotate, to make this host a new SSH key)")
    address, port = parse_endpoint(args.server if ":" in args.server else f"{args.server}:22")
    host_key = args.host_key or run(server_host_key(address, port))
    if not args.host_key:
        console.print(f"server {address}:{port} host key: {described(host_key)}", markup=False)
        if not sys.stdin.isatty():
            raise ConfigError("compare that fingerprint with the server's, then pass it with --host-key")
        if input("trust it? [y/N] ").strip().lower() not in ("y", "yes"):
            raise ConfigError("not enrolled: the server's host key was not trusted")
    public, created = ensure_ssh_key(args.ssh_key, args.host)
    if created:
        console.print(f"made {args.ssh_key}; add to fleet.toml and publish:", markup=False)
        console.print(f'  [hosts.{args.host}]\n  ssh_key = "{public}"', markup=False, soft_wrap=True)
    if args.config.exists() and not args.force:
        raise ConfigError(f"{args.config} exists; pass --force to replace it")
    text = agent_toml(
        host=args.host,
        ssh_key=args.ssh_key.absolute(),
        address=address,
        port=port,
        host_key=host_key,
        broker=args.broker,
        state_dir=str(args.state_dir),
    )
    args.config.parent.mkdir(parents=True, exist_ok=True)
    args.config.write_text(text, encoding="utf-8")
    console.print(f"wrote {args.config}", markup=False)
    if args.no_apply:
        return 0
    state = run(Agent(load(args.config, AgentConfig)).once())
    console.print(
        f"{args.host}: {state.phase} (deployed generation {state.deployed_generation}) {state.message}"
    )
    return 0 if state.phase is Phase.IDLE else 1


def cmd_state_backup(args: argparse.Namespace) -> int:
    from herald.backup import cmd_backup

    return cmd_backup(args.state, args.file)


def cmd_state_restore(args: argparse.Namespace) -> int:
    from herald.backup import cmd_restore

    return cmd_restore(args.file, args.state, force=args.force, broker=args.broker, prefix=args.prefix)


def cmd_host_remove(args: argparse.Namespace) -> int:
    from herald.hosts import remove_host

    server = _on_this_server() if args.state is None or args.fleet is None else None
    if args.fleet is None and server is not None:
        args.fleet = Path(server.fleet)
    _admin_defaults(args, broker=False)
    if args.broker is None and server is not None and server.broker is not None:
        args.broker = server.broker  # an external broker (each node of a cluster) holds its messages
    return remove_host(
        args.state,
        args.name,
        fleet=args.fleet,
        dry_run=args.dry_run,
        archive=args.archive_logs,
        broker=args.broker,
        prefix=args.prefix,
    )


def cmd_host_key(args: argparse.Namespace) -> int:
    from herald.serverkeys import host_key_command

    return host_key_command(args)


def _on_this_server() -> ServerConfig | None:
    """/etc/herald/server.toml (or $HERALD_CONFIG), when this is the server."""
    path = Path(os.environ.get("HERALD_CONFIG", SERVER_TOML))
    return load(path, ServerConfig) if path.is_file() else None


def _admin_defaults(args: argparse.Namespace, *, broker: bool = True) -> argparse.Namespace:
    """--state and --broker, when not given: $HERALD_STATE and $HERALD_BROKER, else what the
    server's own server.toml says, else /var/lib/herald (and no broker: an error)."""
    server = _on_this_server() if args.state is None or (broker and args.broker is None) else None
    if args.state is None:
        args.state = Path(os.environ.get("HERALD_STATE") or (server.state if server else DEFAULT_STATE))
    if broker and args.broker is None:
        args.broker = os.environ.get("HERALD_BROKER") or (_local_broker(server) if server else None)
        if not getattr(args, "several_brokers", False) and args.broker is not None:
            args.broker = _first(args.broker)
        if args.broker is None:
            raise ConfigError(
                "which broker? pass --broker mqtt://HOST:PORT, set HERALD_BROKER, or run this on the "
                f"server, where {SERVER_TOML} says"
            )
    if not (args.state / "chroot").is_dir():
        raise ConfigError(
            f"--state {args.state}: not a herald state directory (no chroot/ there); name the server's "
            "with --state or HERALD_STATE"
        )
    return args


def _first(broker: str | list[str]) -> str:
    """For a command that talks to one node: the first of a cluster's."""
    return broker if isinstance(broker, str) else broker[0]


def _local_broker(server: ServerConfig) -> str | list[str] | None:
    """The URL of the server's own broker: its external one, or its embedded listener."""
    if server.broker is not None:
        return server.broker
    if server.mqtt == "off":
        return None
    host, port = parse_endpoint(server.mqtt)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104 - a bind address read
    return f"mqtt://[{host}]:{port}" if ":" in host else f"mqtt://{host}:{port}"


def cmd_status(args: argparse.Namespace) -> int:
    from herald.admin import status

    return status(_admin_defaults(args))


def cmd_trigger(args: argparse.Namespace) -> int:
    from herald.admin import trigger_command

    return trigger_command(_admin_defaults(args))


def cmd_logs(args: argparse.Namespace) -> int:
    from herald.admin import logs

    return logs(_admin_defaults(args, broker=False))


def cmd_key(args: argparse.Namespace) -> int:
    from herald.keys import key_command

    return key_command(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from herald.demo import demo

    return _run(demo(args.keep))


# ---------------------------------------------------------------- parser


Handler = Callable[[argparse.Namespace], int]


class _Commands:
    """The subcommands of `herald`, each with its options."""

    def __init__(self, sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
        self.sub = sub

    def add(self, name: str, handler: Handler, text: str) -> argparse.ArgumentParser:
        cmd = self.sub.add_parser(name, help=text, description=text)
        cmd.set_defaults(handler=handler)
        return cmd

    def group(self, name: str, text: str) -> "_Commands":
        cmd = self.sub.add_parser(name, help=text, description=text)
        return _Commands(cmd.add_subparsers(dest="action", required=True, metavar="ACTION"))


def _paths(cmd: argparse.ArgumentParser, *, fleet: bool = True) -> None:
    if fleet:
        cmd.add_argument("--fleet", type=Path, required=True, metavar="DIR", help="the fleet repository")
    cmd.add_argument("--state", type=Path, required=True, metavar="DIR", help="the server's state directory")


def _broker(
    cmd: argparse.ArgumentParser,
    *,
    what: str = "mqtt://HOST:PORT or mqtts://HOST:PORT",
    several: bool = False,
) -> None:
    """--broker; with `several`, repeated for each node of a cluster (a list)."""
    if several:
        cmd.add_argument("--broker", metavar="URL", action="append", help=f"{what}; repeat for each node")
        cmd.set_defaults(several_brokers=True)
    else:
        cmd.add_argument("--broker", metavar="URL", help=what)
    cmd.add_argument("--prefix", default="herald", help="topic prefix (default: herald)")


_STATE_DEFAULT = (
    f"the server's state directory (default: $HERALD_STATE, else {SERVER_TOML}'s, else {DEFAULT_STATE})"
)


def _admin(cmd: argparse.ArgumentParser, *, several: bool = False) -> None:
    _broker(
        cmd,
        what=f"mqtt://HOST:PORT or mqtts://HOST:PORT (default: $HERALD_BROKER, else {SERVER_TOML}'s)",
        several=several,
    )
    cmd.add_argument("--state", type=Path, metavar="DIR", help=_STATE_DEFAULT)


def _keep(text: str) -> int:
    keep = int(text)
    if not 2 <= keep <= 100:
        raise argparse.ArgumentTypeError(
            "keep at least 2 releases (agents may be fetching the one before), at most 100"
        )
    return keep


def _server_commands(commands: _Commands) -> None:
    cmd = commands.add("publish", cmd_publish, "write releases for every changed host, and announce them")
    _paths(cmd)
    cmd.add_argument(
        "--dry-run", action="store_true", help="say which hosts and files would change; write nothing"
    )
    cmd.add_argument("--init", action="store_true", help="start a new state directory if --state has none")
    cmd.add_argument(
        "--allow-dirty",
        action="store_true",
        help="publish a git work tree with uncommitted changes as it is (the release is marked dirty)",
    )
    cmd.add_argument(
        "--keep",
        type=_keep,
        metavar="N",
        help="releases kept per host (default: fleet.toml's [publish] keep, 3)",
    )
    cmd.add_argument(
        "--verbose", dest="every_host", action="store_true", help="list every host, unchanged ones too"
    )
    cmd.add_argument("--json", action="store_true", help="every host's result as JSON on stdout")
    cmd.add_argument(
        "--rollout",
        metavar="FILE|off",
        help=(
            "roll out by this file's [rollout] instead of fleet.toml's; off: every host gets its release now"
        ),
    )
    _broker(cmd, what="announce the changed hosts on this broker (mqtt:// or mqtts://)", several=True)

    cmd = commands.add("serve", cmd_serve, "run the embedded broker and SFTP server, publishing on start")
    cmd.add_argument("--config", type=Path, metavar="FILE", help="server.toml (flags override it)")
    cmd.add_argument(
        "--fleet", type=Path, metavar="DIR", help="the fleet repository (or fleet in server.toml)"
    )
    cmd.add_argument(
        "--state", type=Path, metavar="DIR", help="the server's state directory (or state in server.toml)"
    )
    cmd.add_argument(
        "--mqtt", metavar="HOST:PORT", help="the embedded broker's listener (default: 127.0.0.1:1883), or off"
    )
    cmd.add_argument("--sftp", metavar="HOST:PORT", help="SFTP listener (default: 127.0.0.1:2222)")
    cmd.add_argument(
        "--broker",
        metavar="URL",
        action="append",
        help="announce on this external broker instead (e.g. Mosquitto); repeat for each node of a cluster",
    )
    cmd.add_argument(
        "--http", metavar="HOST:PORT", help="fleet page and /metrics (default: 127.0.0.1:8080), or off"
    )

    broker = commands.group("broker", "the MQTT side: rules for an external broker")
    cmd = broker.add(
        "export",
        cmd_broker_export,
        "write another broker's users and rules: Mosquitto's password_file, acl_file and conf "
        "fragment; RabbitMQ's definitions.json and rabbitmq.conf lines; EMQX's acl.conf, users.json "
        "and emqx.conf lines",
    )
    cmd.add_argument("--state", type=Path, required=True, metavar="DIR", help="the server's state directory")
    cmd.add_argument("--fleet", type=Path, metavar="DIR", help="check every host of fleet.toml has a secret")
    cmd.add_argument("--format", choices=("mosquitto", "rabbitmq", "emqx"), default="mosquitto")
    cmd.add_argument("--prefix", default="herald", help="topic prefix (default: herald)")
    cmd.add_argument("outdir", type=Path, metavar="OUTDIR")

    server = commands.group("server", "a server whose chroots OpenSSH serves")
    cmd = server.add(
        "provision", cmd_server_provision, "create the host users, chroots and sshd_config fragment"
    )
    _paths(cmd)
    cmd.add_argument("--dry-run", action="store_true", help="print every change; make none")
    cmd.add_argument("--sshd-state", type=Path, metavar="DIR", help="the state directory as sshd sees it")
    cmd.add_argument(
        "--sshd-config",
        type=Path,
        default=Path("/etc/ssh/sshd_config"),
        metavar="FILE",
        help="the main sshd_config, checked for the Include (default: /etc/ssh/sshd_config)",
    )
    _host_key_commands(server)


def _host_key_commands(server: _Commands) -> None:
    keys = server.group("host-key", "rotate the SSH host key agents pin, without touching a host")
    cmd = keys.add("rotate", cmd_host_key, "make (or name) the successor key and announce it to every host")
    cmd.add_argument("--state", type=Path, required=True, metavar="DIR", help="the server's state directory")
    cmd.add_argument(
        "--key", metavar="KEY|FILE", help="with OpenSSH: sshd's new public key, or its .pub file"
    )
    cmd = keys.add("status", cmd_host_key, "which hosts trust every announced key yet")
    cmd.add_argument("--state", type=Path, required=True, metavar="DIR", help="the server's state directory")
    cmd = keys.add(
        "switch", cmd_host_key, "the embedded SFTP server takes the successor (once every host has)"
    )
    cmd.add_argument("--state", type=Path, required=True, metavar="DIR", help="the server's state directory")
    cmd.add_argument("--force", action="store_true", help="even if some hosts do not trust it yet")
    cmd = keys.add("retire", cmd_host_key, "agents stop trusting the old key")
    cmd.add_argument("--state", type=Path, required=True, metavar="DIR", help="the server's state directory")
    cmd.add_argument(
        "--key", metavar="KEY|FILE", help="the key to retire (default: the embedded server's previous)"
    )


def _fleet_commands(commands: _Commands) -> None:
    cmd = commands.add("agent", cmd_agent, "keep this host on its release")
    cmd.add_argument("--config", type=Path, required=True, metavar="FILE", help="agent.toml")
    cmd.add_argument("--once", action="store_true", help="check (and apply) once, then exit")
    cmd.add_argument("--now", action="store_true", help="with --once: apply even when [postpone] says wait")
    cmd.add_argument(
        "--check-config", action="store_true", help="load agent.toml and the agent, then exit (0: it starts)"
    )

    cmd = commands.add(
        "enrol", cmd_enrol, "join this machine to the fleet: pin the server, write agent.toml, apply"
    )
    cmd.add_argument("--server", metavar="HOST[:PORT]", help="the SFTP server (port 22 by default)")
    cmd.add_argument("--host", metavar="NAME", help="this host's name in fleet.toml")
    cmd.add_argument(
        "--host-key", metavar="KEY", help="the server's SSH host key, if known ('ssh-ed25519 AAAA...')"
    )
    cmd.add_argument(
        "--ssh-key", type=Path, default=Path("/etc/herald/id_ed25519"), metavar="FILE", help="made if missing"
    )
    cmd.add_argument("--broker", metavar="URL", help="mqtt://HOST:PORT or mqtts://HOST:PORT (optional)")
    cmd.add_argument("--config", type=Path, default=Path("/etc/herald/agent.toml"), metavar="FILE")
    cmd.add_argument("--state-dir", type=Path, default=Path(DEFAULT_STATE), metavar="DIR")
    cmd.add_argument("--force", action="store_true", help="replace an existing agent.toml")
    cmd.add_argument("--no-apply", action="store_true", help="write agent.toml only")
    cmd.add_argument(
        "--rotate",
        action="store_true",
        help="make this host a new SSH key (<ssh_key>.next) and print its fleet.toml line",
    )

    cmd = commands.add("status", cmd_status, "show every host's desired and deployed generation")
    _admin(cmd, several=True)
    cmd.add_argument("--fleet", type=Path, metavar="DIR", help="also list hosts never seen")
    cmd.add_argument("--json", action="store_true", help="JSON on stdout")
    cmd.add_argument("--watch", action="store_true", help="redraw as the hosts report, until interrupted")

    cmd = commands.add("trigger", cmd_trigger, "ask hosts to check (or rebuild, or roll back) now")
    _admin(cmd)
    cmd.add_argument("--action", choices=("check", "rebuild", "rollback"), default="check")
    cmd.add_argument("--fleet", type=Path, metavar="DIR", help="fleet.toml's hosts, for --all and --tag")
    cmd.add_argument("--all", action="store_true", help="every host of fleet.toml")
    cmd.add_argument("--tag", metavar="TAG", help="the hosts of fleet.toml with this tag")
    cmd.add_argument(
        "--wait", action="store_true", help="follow the hosts until they report; exit 1 if any failed"
    )
    cmd.add_argument(
        "--batch", type=int, metavar="N", help="a canary first, then N hosts at a time (implies --wait)"
    )
    cmd.add_argument(
        "--stop-on-failure", action="store_true", help="with --batch: stop after a failing batch"
    )
    cmd.add_argument("--timeout", default="30m", metavar="DURATION", help="how long to wait per batch (30m)")
    cmd.add_argument(
        "--expires", default="24h", metavar="DURATION", help="a host back later ignores it (24h), or never"
    )
    cmd.add_argument("hosts", nargs="*", metavar="HOST")

    cmd = commands.add("logs", cmd_logs, "the logs a host uploaded, newest first (on the server)")
    cmd.add_argument(
        "--state", type=Path, default=Path(DEFAULT_STATE), metavar="DIR", help="the state directory"
    )
    cmd.add_argument("--last", type=int, metavar="N", help="print the N newest logs")
    cmd.add_argument("--follow", action="store_true", help="then print new logs as they arrive")
    cmd.add_argument("host", metavar="HOST")
    cmd.add_argument("name", nargs="?", metavar="NAME", help="print this log (status' log column)")

    cmd = commands.add("demo", cmd_demo, "run a small fleet on loopback: the three stories herald is for")
    cmd.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="run in DIR (new or empty) and keep it, with the logs, afterwards",
    )


def _key_commands(commands: _Commands) -> None:
    key = commands.group("key", "the publisher key: rotate it, retire old ones; agents follow on their own")
    cmd = key.add("show", cmd_key, "the signing key, the keys agents trust and the statements")
    _paths(cmd, fleet=False)
    cmd = key.add("rotate", cmd_key, "a new signing key, added by a statement the current key signs")
    _paths(cmd, fleet=False)
    cmd.add_argument(
        "--retire",
        action="store_true",
        help="retire the old key at once (after a leak); see herald key retire",
    )
    cmd = key.add("retire", cmd_key, "retire publisher keys: agents refuse what they sign once told")
    _paths(cmd, fleet=False)
    cmd.add_argument(
        "keys", nargs="*", metavar="KEY", help="ed25519:... (default: every key but the current)"
    )


def _rollout_commands(commands: _Commands) -> None:
    rollout = commands.group("rollout", "the rollout of the last publish: waves, soaks, the failure budget")
    cmd = rollout.add("status", cmd_rollout, "the waves, hosts per state, budget used, time left in the soak")
    _admin(cmd)
    cmd.add_argument("--json", action="store_true", help="JSON on stdout")
    cmd = rollout.add("pause", cmd_rollout, "start no further wave (hosts already given their release go on)")
    cmd.add_argument("--state", type=Path, metavar="DIR", help=_STATE_DEFAULT)
    cmd = rollout.add(
        "resume", cmd_rollout, "go on: a paused rollout, or a halted one with its failures accepted"
    )
    cmd.add_argument("--state", type=Path, metavar="DIR", help=_STATE_DEFAULT)
    cmd = rollout.add("abort", cmd_rollout, "end the rollout: hosts not given the new generation keep theirs")
    cmd.add_argument("--state", type=Path, metavar="DIR", help=_STATE_DEFAULT)
    cmd.add_argument(
        "--rollback",
        action="store_true",
        help=(
            "send the hosts given it back to their previous content (a new generation: reads the signing key)"
        ),
    )


def _lifecycle_commands(commands: _Commands) -> None:
    state = commands.group("state", "the server's state: back it up, bring it back")
    cmd = state.add(
        "backup", cmd_state_backup, "write the server's state to one archive (under the publish lock)"
    )
    cmd.add_argument("--state", type=Path, required=True, metavar="DIR", help="the server's state directory")
    cmd.add_argument("file", type=Path, metavar="FILE", help="the archive (.tar, or .tar.gz)")
    cmd = state.add("restore", cmd_state_restore, "bring a backup back; generations go on above the hosts'")
    cmd.add_argument("file", type=Path, metavar="FILE", help="an archive herald state backup wrote")
    cmd.add_argument(
        "--state", type=Path, required=True, metavar="DIR", help="the state directory to restore"
    )
    cmd.add_argument("--force", action="store_true", help="replace a state directory that is not empty")
    _broker(cmd, what="ask this broker which generations the hosts reported (mqtt://HOST:PORT)")

    host = commands.group("host", "a host of the fleet on the server")
    cmd = host.add(
        "remove", cmd_host_remove, "remove a host from the server: access, sessions, chroot, messages"
    )
    cmd.add_argument("name", metavar="NAME")
    _admin(cmd, several=True)
    cmd.add_argument("--fleet", type=Path, metavar="DIR", help="checked not to name the host any more")
    cmd.add_argument("--dry-run", action="store_true", help="print what would be removed; remove nothing")
    cmd.add_argument(
        "--archive-logs", type=Path, metavar="DIR", help="first archive the host's logs/ into DIR"
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="herald", description="Keep a NixOS fleet on the configuration in git."
    )
    top.add_argument("--version", action="version", version=f"herald {__version__}")
    top.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = _Commands(top.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    _server_commands(commands)
    _fleet_commands(commands)
    _lifecycle_commands(commands)
    _key_commands(commands)
    _rollout_commands(commands)
    return top


_DAEMONS = ("agent", "serve")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    log.setup("DEBUG" if args.verbose else "INFO")
    try:
        code: int = args.handler(args)
    except HeraldError as exc:
        fail(str(exc))
        return exc.exit_code
    except OSError as exc:
        if exc.filename is None or args.verbose or args.command in _DAEMONS:
            raise  # not about a file, or in a daemon's journal: the traceback says where
        # A file herald may not read or write (a read-only state, a directory in its place).
        names = " -> ".join(str(name) for name in (exc.filename, exc.filename2) if name is not None)
        fail(f"{names}: {exc.strerror}")
        return 1
    except KeyboardInterrupt:
        return 130
    except Terminated:  # SIGTERM: stopped as asked, no traceback
        return 143
    return code
