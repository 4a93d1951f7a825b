"""The NixOS side, as far as Nix without nixpkgs can check it here: every .nix file parses, and
the builtins-only logic of nix/lib.nix agrees with herald's Python code on the same inputs."""

import json
import subprocess
import tomllib
from pathlib import Path

import pytest
from helpers import EXAMPLE_FLEET, REPO, need, need_root
from openssh import provision

from protocol import schema
from protocol.settings import AgentConfig, ServerConfig, convert
from publisher.inventory import load_inventory
from publisher.provision import sshd_fragment


def nix_eval(expression: str) -> object:
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

# Just enough of nixpkgs' lib and pkgs for nix/server.nix to produce its config (no nixpkgs
# here): mkIf and mkMerge keep what they wrap, so the test can read the assertions.
STUB = """
  lib = {
    mkEnableOption = _: null; mkOption = _: null; mkIf = cond: content: { inherit cond content; };
    mkMerge = parts: { inherit parts; }; recursiveUpdate = a: b: a // b;
    concatStringsSep = builtins.concatStringsSep; genAttrs = names: f: { };
    hasPrefix = p: s: builtins.substring 0 (builtins.stringLength p) s == p;
    toInt = builtins.fromJSON; last = l: builtins.elemAt l (builtins.length l - 1);
    splitString = sep: s: builtins.filter builtins.isString (builtins.split sep s);
    optional = c: x: if c then [ x ] else [ ]; getExe = _: "herald";
    types = { package = null; str = null; path = null; bool = null; enum = _: null;
      nullOr = _: null; submodule = _: null; };
  };
  pkgs = { callPackage = _: _: null; formats.toml = _: { type = null; generate = _: _: "server.toml"; }; };
"""


def server_assertions(fleet_toml: Path, ids: str) -> list[str]:
    """The messages of the assertions that fail in nix/server.nix for `fleet_toml`."""
    cfg = f"""{{
      enable = true; fleetToml = {fleet_toml}; fleet = "/srv/fleet"; stateDir = "/var/lib/herald";
      sftp = "openssh"; embeddedSftpListen = "0.0.0.0:2222"; http = "127.0.0.1:8080"; settings = {{ }};
      mqtt = {{ listen = "0.0.0.0:1883"; tls = null; websocket = null; }};
    }}"""
    found = nix_eval(
        f"let {STUB} module = import ./nix/server.nix {{ inherit lib pkgs; "
        f"config = {{ services.herald.server = {cfg}; ids = {ids}; }}; }}; "
        "checks = (builtins.head module.config.content.parts).assertions; "
        "in map (a: a.message) (builtins.filter (a: !a.assertion) checks)"
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
