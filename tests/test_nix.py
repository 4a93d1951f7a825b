"""The NixOS side, as far as Nix without nixpkgs can check it here: every .nix file parses, and
the builtins-only logic of nix/lib.nix agrees with herald's Python code on the same inputs."""

import importlib.metadata
import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from helpers import EXAMPLE_FLEET, REPO, need, need_root, nix_eval, nixos
from openssh import provision

from herald.cli import parser
from protocol import schema
from protocol.settings import AgentConfig, Deliver, ServerConfig, convert
from publisher.inventory import load_inventory
from publisher.provision import sshd_fragment


def with_lib(body: str, fleet: Path = EXAMPLE_FLEET) -> str:
    return f"let lib = import ./nix/lib.nix; fleet = lib.readFleet {fleet}/fleet.toml; in {body}"


def test_every_nix_file_parses():
    nix = need("nix-instantiate")
    files = [path for path in REPO.rglob("*.nix") if ".venv" not in path.parts]
    assert len(files) >= 12
    for path in files:
        done = subprocess.run(
            [nix, "--store", "dummy://", "--parse", str(path)], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, f"{path}: {done.stderr}"


def test_the_sshd_block_is_the_same_from_nix_from_provision_and_in_deploy():
    hosts = [host.name for host in load_inventory(EXAMPLE_FLEET).hosts]
    from_nix = nix_eval(with_lib('lib.sshdFragment { inherit fleet; state = "/var/lib/herald"; }'))
    assert from_nix == sshd_fragment(hosts, Path("/var/lib/herald"))
    deployed = (REPO / "deploy" / "openssh" / "sshd_config.herald").read_text()
    assert deployed.rstrip("\n") == from_nix.rstrip("\n")


def test_the_chroot_layout_is_the_same_from_nix_and_from_a_provision_dry_run(fleet, tmp_path: Path):
    need_root()
    need("unshare")
    toml = fleet.root / "fleet.toml"
    toml.write_text(toml.read_text().replace("[hosts.beta]\n", '[hosts.beta]\nbackups = "5G"\n'))
    tmp_path.chmod(0o755)
    done = provision(fleet, tmp_path / "state", tmp_path, dry_run=True)
    assert done.returncode == 0, done.stderr
    planned = {
        line.removeprefix("would create ")
        for line in done.stdout.splitlines()
        if line.startswith("would create /")
    }
    layout = nix_eval(
        with_lib('lib.chrootLayout { inherit fleet; state = "/mnt/herald/state"; }', fleet.root)
    )
    from_nix = {f"{d['path']} ({d['user']}:{d['group']} {d['mode']})" for d in layout}  # type: ignore[union-attr]
    assert from_nix == planned
    assert "/mnt/herald/state/chroot/beta/backups (beta:beta 0700)" in from_nix


def test_the_host_users_authorized_keys_are_the_same_from_nix():
    inventory = load_inventory(EXAMPLE_FLEET)
    from publisher.keys import authorized_key_line  # noqa: PLC0415

    for host in inventory.hosts:
        line = nix_eval(with_lib(f'lib.authorizedKeyLine "{host.name}" fleet.hosts.{host.name}'))
        assert f"{line}\n" == authorized_key_line(host)


def test_the_schemas_the_modules_check_against_are_the_decoders_own():
    for name, data in schema.rendered().items():
        committed = REPO / "nix" / "schema" / name
        assert committed.read_bytes() == data, (
            f"nix/schema/{name} is stale: python -m protocol.schema nix/schema"
        )


AGENT_OPTIONS = """{
  host = "alpha"; sshKeyFile = "/etc/herald/id_ed25519"; poll = "15m"; localPage = true;
  server = { address = "herald.example.org"; port = 22; hostKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKw6pDRxgkA1qDnC0c7RLuTFrxVeDlUFHdA2fHHmSjVh"; };
  confirmWindow = "60s"; healthCommand = [ "true" ]; brokerUrl = "mqtts://herald.example.org:8883"; operation = "boot";
  postpone = { onBattery = true; onMetered = false; }; reboot.window = "02:00-04:00"; notify.enable = true;
}"""
SERVER_OPTIONS = """{
  fleet = "/srv/fleet"; stateDir = "/var/lib/herald"; sftp = "openssh"; embeddedSftpListen = "0.0.0.0:2222";
  http = "127.0.0.1:8080";
  mqtt = { listen = "0.0.0.0:1883"; tls = { listen = "0.0.0.0:8883"; cert = "/c"; key = "/k"; }; websocket = null; };
}"""


@pytest.mark.parametrize(
    ("function", "options", "kind"),
    [("agentSettings", AGENT_OPTIONS, AgentConfig), ("serverSettings", SERVER_OPTIONS, ServerConfig)],
)
def test_the_modules_options_render_files_the_decoders_accept(function: str, options: str, kind: type):
    settings = nix_eval(f"(import ./nix/lib.nix).{function} {options}")
    decoded = convert(settings, kind, source=f"nix/lib.nix {function}")
    if isinstance(decoded, AgentConfig):
        assert (decoded.rebuild.operation, decoded.confirm.health) == ("boot", ["true"])
        assert (decoded.postpone.on_battery, decoded.postpone.on_metered) == (True, False)
        assert decoded.reboot.window == "02:00-04:00"
        assert decoded.notify.command is not None
        assert decoded.notify.command[0] == "notify-send"
    else:
        assert decoded.tls is not None
        assert decoded.sftp == "off"
    schema_file = "agent.json" if kind is AgentConfig else "server.json"
    unknown = nix_eval(
        f"let lib = import ./nix/lib.nix; in lib.unknownKeys (builtins.fromJSON (builtins.readFile ./nix/schema/{schema_file})) (lib.{function} {options})"
    )
    assert unknown == []


def test_unknown_settings_keys_are_found_by_the_modules_check():
    unknown = nix_eval(
        "let lib = import ./nix/lib.nix; s = builtins.fromJSON (builtins.readFile ./nix/schema/agent.json); in "
        'lib.unknownKeys s { host = "a"; colour = 1; server = { adress = "typo"; }; rebuild = { timeout = "1h"; }; }'
    )
    assert unknown == ["colour", "server.adress"]


def test_the_flake_exposes_the_modules_and_package():
    text = (REPO / "flake.nix").read_text()
    for needle in (
        "nixosModules",
        "server = ./nix/server.nix",
        "agent = ./nix/agent.nix",
        "packages",
        "checks",
    ):
        assert needle in text
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["herald"] == "herald.cli:main"


def test_the_reserved_names_are_the_same_for_nix_and_for_fleet_toml():
    from protocol.reserved import NAMES, PREFIXES  # noqa: PLC0415

    found = nix_eval("(import ./nix/lib.nix).reserved")
    assert isinstance(found, dict)
    assert set(found["names"]) == NAMES
    assert tuple(found["prefixes"]) == PREFIXES


RESERVED_FLEET = """
[hosts.alpha]
ssh_key = "k"
[hosts.wheel]
ssh_key = "k"
[hosts.nixbld7]
ssh_key = "k"
[hosts.systemd-oom]
ssh_key = "k"
[hosts.users]
ssh_key = "k"
[hosts.later]
ssh_key = "k"
"""


def server_assertions(fleet_toml: Path, ids: str) -> list[str]:
    """The messages of the assertions that fail in nix/server.nix for `fleet_toml`."""
    values = f'{{ services.herald.server = {{ enable = true; fleetToml = {fleet_toml}; fleet = "/srv/fleet"; }}; }}'
    found = nix_eval(
        f"let config = import ./tests/nixos.nix {{ module = ./nix/server.nix; values = {values}; "
        f"config = {{ ids = {ids}; }}; }}; "
        "in map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions)"
    )
    assert isinstance(found, list)
    return found


def test_the_server_module_refuses_hosts_named_as_system_users_or_groups(tmp_path: Path):
    """nix/server.nix, evaluated: its assertion names every host whose user and group would
    merge with the system's, from the shared list and from NixOS's own ids (`later` stands for
    an id nixpkgs adds after herald's list was written)."""
    toml = tmp_path / "fleet.toml"
    toml.write_text(RESERVED_FLEET)
    (message,) = server_assertions(toml, "{ uids = { later = 400; }; gids = { root = 0; }; }")
    assert message.startswith("services.herald.server.fleetToml: later, nixbld7, systemd-oom, users, wheel:")
    assert "rename the host" in message
    toml.write_text('[hosts.alpha]\nssh_key = "k"\n')
    assert server_assertions(toml, "{ uids = { }; gids = { }; }") == []


# ---------------------------------------------------------------- the modules, on a stand-in


def server_values(**options: str) -> str:
    """services.herald.server's options: the example fleet's, with `options` (Nix values)."""
    given = {"fleet": '"/srv/fleet"', "fleetToml": f"{EXAMPLE_FLEET}/fleet.toml", **options}
    body = " ".join(f"{name} = {value};" for name, value in given.items())
    return f"{{ services.herald.server = {{ enable = true; {body} }}; }}"


def server_toml(unit: dict[str, Any]) -> ServerConfig:
    """The server.toml herald-serve's ExecStart names (tests/nixos.nix puts it in the name)."""
    command, _, data = unit["serviceConfig"]["ExecStart"].partition("#")
    argv = shlex.split(command)
    assert argv[1:3] == ["serve", "--config"]
    parser().parse_args(argv[1:])  # herald's own parser takes the unit's flags
    return convert(json.loads(data), ServerConfig, source="herald-serve")


def test_the_server_module_runs_publishing_apart_from_serving_by_default():
    config = nixos("server", server_values())
    units = config["systemd"]["services"]
    serve, publish = units["herald-serve"]["serviceConfig"], units["herald-publish"]["serviceConfig"]
    assert server_toml(units["herald-serve"]).publish is False
    assert serve["CapabilityBoundingSet"] == "CAP_DAC_READ_SEARCH"  # OpenSSH: the hosts' logs
    # The key's directory, not the file: a rotation renames a file over the key, which would
    # drop a mount over it (test_privilege rotates while serve runs).
    assert serve["InaccessiblePaths"] == [
        "/var/lib/herald/publisher/private",
        "-/var/lib/herald.before-restore",
    ]
    assert serve["ReadWritePaths"] == ["/var/lib/herald/chroot", "/var/lib/herald/run"]
    coreutils = "+/nix/store/00000000000000000000000000000000-coreutils/bin"
    assert serve["ExecStartPre"][:2] == [  # made unconfined first: the namespace needs them
        f"{coreutils}/mkdir -p /var/lib/herald/chroot /var/lib/herald/run",
        f"{coreutils}/install -d -m 0700 /var/lib/herald/publisher/private /var/lib/herald.before-restore",
    ]
    assert serve["Type"] == "notify"  # herald-publish starts once the broker listens
    assert serve["ExecStartPost"].startswith("-+")  # a publish that cannot be queued fails nothing
    assert serve["ExecStartPost"].endswith("systemctl start --no-block herald-publish.service")
    assert config["systemd"]["paths"]["herald-publish"]["pathConfig"] == {
        "PathChanged": "/var/lib/herald/run/reported.json"  # a host ahead after a restore: publish
    }
    argv = shlex.split(publish["ExecStart"])
    args = parser().parse_args(argv[1:])
    assert (args.command, str(args.fleet), str(args.state)) == ("publish", "/srv/fleet", "/var/lib/herald")
    assert args.broker == ["mqtt://127.0.0.1:1883"]  # serve's embedded broker, over the loopback
    assert publish["Type"] == "oneshot"
    assert (publish["IPAddressDeny"], publish["IPAddressAllow"]) == ("any", "localhost")
    assert "herald-serve.service" in units["herald-publish"]["after"]
    assert "wantedBy" not in units["herald-publish"]  # not every switch of the server publishes


def test_the_server_module_gives_the_embedded_server_what_it_needs_and_no_more(tmp_path: Path):
    config = nixos("server", server_values(sftp='"embedded"', embeddedSftpListen='"0.0.0.0:22"'))
    serve = config["systemd"]["services"]["herald-serve"]["serviceConfig"]
    assert serve["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"  # port 22, and nothing to read
    assert serve["ReadWritePaths"][-1] == "/var/lib/herald/sftp"
    assert serve["ExecStartPre"][0].endswith(
        "/var/lib/herald/chroot /var/lib/herald/run /var/lib/herald/sftp"
    )
    assert "users" not in config  # no host accounts without OpenSSH
    low = nixos("server", server_values(settings='{ http = "0.0.0.0:80"; }'))["systemd"]["services"]
    assert "CAP_NET_BIND_SERVICE" in low["herald-serve"]["serviceConfig"]["CapabilityBoundingSet"]

    checked = tmp_path / "fleet.toml"  # a check may fetch flake inputs: the publisher keeps the network
    checked.write_text((EXAMPLE_FLEET / "fleet.toml").read_text() + '\n[publish]\ncheck = ["true"]\n')
    publish = nixos("server", server_values(fleetToml=str(checked)))["systemd"]["services"]["herald-publish"]
    assert "IPAddressDeny" not in publish["serviceConfig"]
    portless = server_values(settings='{ broker = "mqtts://mq.example.org"; }')
    publish = nixos("server", portless)["systemd"]["services"]["herald-publish"]["serviceConfig"]
    assert parser().parse_args(shlex.split(publish["ExecStart"])[1:]).broker == ["mqtts://mq.example.org"]
    assert "IPAddressDeny" not in publish
    for listen, url in (("[::]:1883", "mqtt://[::1]:1883"), ("10.0.0.5:1883", "mqtt://10.0.0.5:1883")):
        unit = nixos(
            "server", server_values(mqtt=f'{{ listen = "{listen}"; }}', settings='{ prefix = "corp"; }')
        )
        publish = unit["systemd"]["services"]["herald-publish"]["serviceConfig"]
        args = parser().parse_args(shlex.split(publish["ExecStart"])[1:])
        assert (args.broker, args.prefix) == ([url], "corp")
        assert ("IPAddressDeny" in publish) is (url == "mqtt://[::1]:1883")  # 10.0.0.5 is not the loopback
    external = server_values(
        settings='{ broker = [ "mqtts://a:8883" "mqtts://b:8883" ]; }', mqtt='{ listen = "off"; }'
    )
    publish = nixos("server", external)["systemd"]["services"]["herald-publish"]["serviceConfig"]
    assert parser().parse_args(shlex.split(publish["ExecStart"])[1:]).broker == [
        "mqtts://a:8883",
        "mqtts://b:8883",
    ]


def test_the_server_module_moves_what_herald_0_1_left_where_serve_could_read_it(tmp_path: Path):
    """The unit's settle script, run on a herald 0.1 state: the key goes into its hidden
    directory, states a restore moved aside into STATE.before-restore/; a second key is left."""
    config = nixos("server", server_values(stateDir=f'"{tmp_path}/state"', sftp='"embedded"'))
    (line,) = [
        pre
        for pre in config["systemd"]["services"]["herald-serve"]["serviceConfig"]["ExecStartPre"]
        if "#" in pre
    ]
    script = re.sub(r"/nix/store/[0-9]{32}-coreutils/bin/", "", line.split("#", 1)[1])
    state = tmp_path / "state"
    (state / "publisher" / "private").mkdir(parents=True)
    (tmp_path / "state.before-restore").mkdir()
    (state / "publisher" / "signing.key").write_text("the key\n")
    (tmp_path / "state.before-restore-20261101T000000").mkdir()
    subprocess.run(["sh", "-ec", script], check=True)
    assert (state / "publisher" / "private" / "signing.key").read_text() == "the key\n"
    assert not (state / "publisher" / "signing.key").exists()
    assert (tmp_path / "state.before-restore" / "20261101T000000").is_dir()
    (state / "publisher" / "signing.key").write_text("another key\n")
    subprocess.run(["sh", "-ec", script], check=True)
    assert (state / "publisher" / "signing.key").read_text() == "another key\n"  # publish refuses two


def test_the_server_module_publishes_in_serve_when_asked():
    config = nixos("server", server_values(publishUnit="false"))
    units = config["systemd"]["services"]
    assert "herald-publish" not in units
    assert server_toml(units["herald-serve"]).publish is True
    assert "InaccessiblePaths" not in units["herald-serve"]["serviceConfig"]
    assert units["herald-serve"]["serviceConfig"]["ReadWritePaths"] == ["/var/lib/herald"]
    timed = nixos("server", server_values(publishUnit="false", publishEvery='"5min"'))["systemd"]
    assert "reload herald-serve.service" in timed["services"]["herald-publish"]["serviceConfig"]["ExecStart"]
    assert timed["timers"]["herald-publish"]["timerConfig"]["OnUnitActiveSec"] == "5min"


def test_the_agent_module_writes_an_agent_toml_the_agent_accepts():
    values = f"{{ services.herald.agent = {AGENT_OPTIONS} // {{ enable = true; }}; }}"
    config = nixos("agent", values)
    source = config["environment"]["etc"]["herald/agent.toml"]["source"]
    decoded = convert(json.loads(source.split("#", 1)[1]), AgentConfig, source="agent.nix")
    assert decoded.host == "alpha"
    assert decoded.restart.command is not None
    assert decoded.restart.command[-1] == "herald-agent.service"
    unit = config["systemd"]["services"]["herald-agent"]
    assert parser().parse_args(shlex.split(unit["serviceConfig"]["ExecStart"])[1:]).command == "agent"


def test_the_modules_build_and_take_closures(tmp_path: Path):
    """A fleet with a closure host: herald-publish builds (the network, the Nix daemon); an
    agent that takes closures only says so in agent.toml and keeps no nixos-rebuild."""
    fleet_toml = tmp_path / "fleet.toml"
    text = (
        (EXAMPLE_FLEET / "fleet.toml")
        .read_text()
        .replace("[hosts.alpha]\n", '[hosts.alpha]\ndeliver = "closure"\n')
    )
    fleet_toml.write_text(text)
    publish = nixos("server", server_values(fleetToml=str(fleet_toml)))["systemd"]["services"][
        "herald-publish"
    ]
    assert "IPAddressDeny" not in publish["serviceConfig"]
    assert publish["environment"]["NIX_REMOTE"] == "daemon"
    plain = nixos("server", server_values())["systemd"]["services"]["herald-publish"]
    assert plain["serviceConfig"]["IPAddressDeny"] == "any"
    assert plain.get("environment", {}) == {}

    values = f'{{ services.herald.agent = {AGENT_OPTIONS} // {{ enable = true; deliver = "closure"; }}; }}'
    config = nixos("agent", values)
    source = config["environment"]["etc"]["herald/agent.toml"]["source"]
    decoded = convert(json.loads(source.split("#", 1)[1]), AgentConfig, source="agent.nix")
    assert decoded.deliver is Deliver.CLOSURE
    path = config["systemd"]["services"]["herald-agent"]["path"]
    assert not [item for item in path if "nixos-rebuild" in str(item) or "git" in str(item)], path


# The nixpkgs attributes nix/package.nix takes from python3Packages: each has a recipe in
# nixpkgs' pkgs/development/python-modules/ (uv-dynamic-versioning is taken only where it does).
NIXPKGS_PYTHON = [
    "aiohttp",
    "aiomqtt",
    "argon2-cffi",
    "asyncssh",
    "cryptography",
    "dacite",
    "hatch-vcs",
    "hatchling",
    "loguru",
    "msgspec",
    "paho-mqtt",
    "prometheus-client",
    "psutil",
    "pwdlib",
    "pyyaml",
    "rich",
    "transitions",
    "typer",
    "typing-extensions",
    "uv-dynamic-versioning",
    "websockets",
    "zstandard",
]


def _requirement(line: str) -> tuple[str, list[str]]:
    """('pwdlib', ['argon2']) from 'pwdlib[argon2]>=0.3.0' (names normalised as nixpkgs does)."""
    match = re.match(r"([A-Za-z0-9_.-]+)(?:\[([^\]]*)\])?", line.strip())
    assert match is not None, line
    extras = [extra.strip() for extra in (match[2] or "").split(",") if extra.strip()]
    return match[1].lower().replace("_", "-").replace(".", "-"), extras


def test_the_package_builds_every_dependency_pyproject_names_and_amqtt_as_its_own_recipe():
    """nix/package.nix evaluated with python3Packages as a list of names: every dependency of
    pyproject.toml (and of its server extra) is among the package's, and amqtt is a recipe of
    its own whose dependencies are its release's Requires-Dist, not nixpkgs' 2022 recipe's."""
    names = " ".join(f'"{name}"' for name in NIXPKGS_PYTHON)
    value = nix_eval(
        f"""
        let
          py = builtins.listToAttrs (map (name: {{ inherit name; value = name; }}) [ {names} ]) // {{
            buildPythonPackage = recipe: recipe;
            buildPythonApplication = recipe: recipe;
          }};
          lib = {{
            cleanSourceWith = _: "source";
            licenses.mit = "mit";
            platforms.linux = [ ];
            optional = condition: item: if condition then [ item ] else [ ];
          }};
          package = import ./nix/package.nix {{ inherit lib; python3Packages = py; fetchPypi = source: source; }};
          name = dependency: if builtins.isAttrs dependency then dependency.pname else dependency;
          amqtt = builtins.head (builtins.filter builtins.isAttrs package.dependencies);
        in {{
          dependencies = map name package.dependencies;
          amqtt = {{ inherit (amqtt) version dependencies pythonRelaxDeps; build = amqtt.build-system; }};
        }}
        """
    )
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [
        _requirement(line)[0] for line in project["dependencies"] + project["optional-dependencies"]["server"]
    ]
    assert sorted(set(wanted) - set(value["dependencies"])) == []
    pin = next(line for line in project["optional-dependencies"]["server"] if line.startswith("amqtt=="))
    assert value["amqtt"]["version"] == pin.removeprefix("amqtt==")
    assert {"hatchling", "hatch-vcs", "uv-dynamic-versioning"} <= set(value["amqtt"]["build"])

    metadata = importlib.metadata.distribution("amqtt").requires or []
    required: set[str] = set()
    for line in metadata:
        if "extra ==" in line:
            continue
        name, extras = _requirement(line)
        required.add(name)
        required.update(f"{extra}-cffi" for extra in extras if extra == "argon2")  # pwdlib[argon2]
    assert required == set(value["amqtt"]["dependencies"])
    assert set(value["amqtt"]["pythonRelaxDeps"]) <= required
