"""A sysadmin's first hour: every mistake is one line that says what to do, never a traceback,
and nothing is done silently wrong."""

import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import HERALD, Fleet, Proc, Serve, herald, make_agent, start_serve, wait_until


def one_line_error(done: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """The error a command printed: exactly one line on stderr, no traceback, exit `code`."""
    assert done.returncode == code, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("herald: ")]
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port another program listens on."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield other.getsockname()[1]


def serve_argv(fleet: Fleet, state: Path, **listeners: str) -> list[str]:
    argv = ["serve", "--fleet", str(fleet.root), "--state", str(state)]
    for flag in ("mqtt", "sftp", "http"):
        argv += [f"--{flag}", listeners.get(flag, "127.0.0.1:0")]
    return argv


@pytest.mark.parametrize("flag", ["mqtt", "sftp", "http"])
def test_serve_on_a_port_in_use_is_one_line_naming_the_port_and_the_flag(
    fleet: Fleet, state: Path, taken_port: int, flag: str
):
    done = herald(*serve_argv(fleet, state, **{flag: f"127.0.0.1:{taken_port}"}))
    line = one_line_error(done)
    assert f"127.0.0.1:{taken_port}" in line
    assert f"--{flag}" in line
    assert "in use" in line


def test_a_serve_whose_first_publish_fails_serves_the_releases_already_published(
    fleet: Fleet, state: Path, logs: Path, tmp_path: Path
):
    """A bad push, then a restart of serve: the fleet keeps its broker and SFTP server and the
    releases it runs; with nothing published yet, serve stops with the one line instead."""
    toml = fleet.root / "fleet.toml"
    good = toml.read_text()
    toml.write_text("[hosts.alpha\n")
    line = one_line_error(herald(*serve_argv(fleet, state / "new")))
    assert "fleet.toml" in line
    (state / "provisioned" / "chroot" / "alpha" / "logs").mkdir(parents=True)  # chroots, no release
    line = one_line_error(herald(*serve_argv(fleet, state / "provisioned")))
    assert "fleet.toml" in line
    toml.write_text(good)
    assert herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--init").returncode == 0
    toml.write_text("[hosts.alpha\n")
    serve = start_serve(fleet, state, logs)
    try:
        assert "publish failed:" in serve.proc.output()
        assert "serving the releases on disk" in serve.proc.output()
        alpha = make_agent(fleet, "alpha", serve, tmp_path)
        assert alpha.once().returncode == 0
        assert alpha.deployed() == 1
    finally:
        serve.stop()


def test_a_state_herald_may_not_write_is_one_line_naming_the_file(fleet: Fleet, state: Path):
    assert herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--init").returncode == 0
    lock = state / "publisher" / "lock"
    lock.unlink()
    lock.mkdir()  # what a read-only state or a stray directory gives: open() fails
    done = herald("publish", "--fleet", str(fleet.root), "--state", str(state))
    assert f"{lock}: Is a directory" in one_line_error(done, code=1)


# ---------------------------------------------------------------- publish


def test_a_publish_into_a_state_that_does_not_exist_is_refused_unless_asked(fleet: Fleet, tmp_path: Path):
    mistyped = tmp_path / "herlad"
    line = one_line_error(herald("publish", "--fleet", str(fleet.root), "--state", str(mistyped)))
    assert "--init" in line
    assert not mistyped.exists()  # no new signing key, no new broker secrets
    done = herald("publish", "--fleet", str(fleet.root), "--state", str(mistyped), "--init")
    assert done.returncode == 0, done.stderr
    assert (mistyped / "publisher" / "private" / "signing.key").is_file()
    again = herald("publish", "--fleet", str(fleet.root), "--state", str(mistyped))  # it exists now
    assert again.returncode == 0, again.stderr


def test_a_publish_into_a_file_is_one_line(fleet: Fleet, tmp_path: Path):
    (tmp_path / "a-file").write_text("not a directory\n")
    line = one_line_error(herald("publish", "--fleet", str(fleet.root), "--state", str(tmp_path / "a-file")))
    assert "not a directory" in line


def test_an_empty_fleet_toml_names_the_table_it_needs(fleet: Fleet, state: Path):
    (fleet.root / "fleet.toml").write_text("# nothing yet\n")
    line = one_line_error(herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--init"))
    assert "at least one [hosts.<name>] table is required" in line


def test_a_bad_operation_lists_the_valid_ones(fleet: Fleet, state: Path):
    toml = fleet.root / "fleet.toml"
    toml.write_text(toml.read_text().replace('operation = "boot"', 'operation = "swtich"', 1))
    line = one_line_error(herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--init"))
    assert "swtich" in line
    assert "switch, boot, test" in line


def test_one_ssh_key_on_two_hosts_is_refused(fleet: Fleet, state: Path):
    toml = fleet.root / "fleet.toml"
    text = toml.read_text()
    alpha, beta = (
        text.split(f"[hosts.{host}]")[1].split('ssh_key = "')[1].split('"')[0] for host in ("alpha", "beta")
    )
    toml.write_text(text.replace(beta, alpha))
    line = one_line_error(herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--init"))
    assert "hosts.beta: ssh_key is hosts.alpha's too" in line
    assert not state.exists()


def test_a_host_with_both_flake_and_configuration_is_warned_about_when_it_changes(fleet: Fleet, state: Path):
    """gamma is the example fleet's flake host: a configuration.nix beside its flake.nix is used
    only if the flake imports it, which herald cannot know: it says so, once per change."""
    (fleet.root / "hosts" / "gamma" / "configuration.nix").write_text("{ ... }: { }\n")
    argv = ("publish", "--fleet", str(fleet.root), "--state", str(state), "--init")
    first = herald(*argv)
    assert first.returncode == 0, first.stderr
    said = [line for line in first.stderr.splitlines() if "has flake.nix and configuration.nix" in line]
    assert len(said) == 1
    assert "[gamma]" in said[0]
    unchanged = herald(*argv)
    assert "has flake.nix and configuration.nix" not in unchanged.stderr  # not on every run


def test_keep_n_keeps_n_releases(fleet: Fleet, state: Path):
    argv = ["publish", "--fleet", str(fleet.root), "--state", str(state), "--init", "--keep", "2"]
    for round_ in range(4):
        fleet.edit("alpha", "files/etc/motd", f"round {round_}\n")
        assert herald(*argv).returncode == 0
    assert sorted(p.name for p in (state / "chroot" / "alpha" / "releases").iterdir()) == ["3", "4"]
    refused = herald(*argv[:-1], "1")  # argparse's own usage error
    assert refused.returncode == 2
    assert "keep at least 2" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_publish_of_an_unchanged_fleet_prints_one_line_and_verbose_every_host(fleet: Fleet, state: Path):
    argv = ("publish", "--fleet", str(fleet.root), "--state", str(state), "--init")
    assert herald(*argv).returncode == 0
    fleet.edit("beta", "files/etc/motd", "only beta\n")
    changed = herald(*argv)
    assert [line.split()[0] for line in changed.stdout.splitlines()[1:-1]] == ["beta"]
    assert changed.stdout.splitlines()[-1].startswith("1 changed, 2 unchanged, 0 failed in ")
    quiet = herald(*argv)
    assert len(quiet.stdout.splitlines()) == 1
    assert quiet.stdout.startswith("0 changed, 3 unchanged, 0 failed in ")
    every = herald(*argv, "--verbose")
    assert {line.split()[0] for line in every.stdout.splitlines()[1:-1]} == set(fleet.hosts)
    report = json.loads(herald(*argv, "--json").stdout)
    assert report["counts"] == {"changed": 0, "unchanged": 3, "failed": 0}
    assert [host["host"] for host in report["hosts"]] == fleet.hosts


# ---------------------------------------------------------------- admin commands


def test_admin_commands_find_the_server_from_the_environment_or_its_server_toml(
    fleet: Fleet, serve: Serve, state: Path, tmp_path: Path
):
    bare = {key: value for key, value in os.environ.items() if not key.startswith("HERALD_")}
    bare["HERALD_CONFIG"] = str(tmp_path / "none.toml")
    lost = subprocess.run([*HERALD, "status"], env=bare, capture_output=True, text=True, check=False)
    assert "which broker?" in one_line_error(lost)

    by_env = bare | {"HERALD_BROKER": serve.mqtt, "HERALD_STATE": str(state)}
    done = subprocess.run(
        [*HERALD, "status", "--json"], env=by_env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert {row["host"] for row in json.loads(done.stdout)} == set(fleet.hosts)

    host, port = serve.mqtt.removeprefix("mqtt://").rsplit(":", 1)
    server_toml = tmp_path / "server.toml"
    server_toml.write_text(f'fleet = "{fleet.root}"\nstate = "{state}"\nmqtt = "0.0.0.0:{port}"\n')
    by_file = bare | {"HERALD_CONFIG": str(server_toml)}
    done = subprocess.run(
        [*HERALD, "status", "--json"], env=by_file, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert host == "127.0.0.1"

    wrong = subprocess.run(
        [*HERALD, "status", "--state", str(tmp_path)], env=by_env, capture_output=True, text=True, check=False
    )
    assert "not a herald state directory" in one_line_error(wrong)


def test_status_watch_stopped_by_sigterm_exits_without_a_traceback(serve: Serve, state: Path, logs: Path):
    argv = [*HERALD, "status", "--watch", "--broker", serve.mqtt, "--state", str(state)]
    watch = Proc("watch", argv, logs / "watch.log")
    wait_until(lambda: "alpha" in watch.output(), "the first table")
    assert watch.stop(signal.SIGTERM) == 143
    assert "Traceback" not in watch.output()
    assert "CancelledError" not in watch.output()


FRAGMENT = Path("/var/lib/herald/ssh/sshd_config")


@pytest.mark.parametrize(
    ("main", "problem"),
    [
        (f"PermitRootLogin no\nInclude {FRAGMENT}\n", None),
        (f"Match User git\n    ForceCommand git-shell\nMatch all\nInclude {FRAGMENT}\n", None),
        (
            f"Match User git\n    ForceCommand git-shell\nInclude {FRAGMENT}\n",
            "inside `Match User git` (line 1)",
        ),
        ("PermitRootLogin no\n# Include /var/lib/herald/ssh/sshd_config\n", "does not include"),
        ("Include /etc/ssh/sshd_config.d/*.conf\n", "does not include"),
    ],
)
def test_provision_says_when_the_include_would_land_inside_a_match_block(main: str, problem: str | None):
    from publisher.provision import sshd_include_problem  # noqa: PLC0415

    found = sshd_include_problem(main, FRAGMENT)
    assert (found is None) == (problem is None)
    if problem is not None:
        assert problem in str(found)


def test_an_agent_pointed_at_another_port_says_so(fleet: Fleet, serve: Serve, tmp_path: Path):
    """server.port set to the broker's port: the broker closes a connection that sends no
    CONNECT, the agent says what to look at, not an empty message."""
    agent = make_agent(fleet, "alpha", serve, tmp_path)
    mqtt_port = serve.mqtt.rsplit(":", 1)[1]
    agent.config.write_text(
        agent.config.read_text().replace(f"port = {serve.sftp_port}", f"port = {mqtt_port}")
    )
    done = agent.once()
    assert done.returncode != 0
    assert f"127.0.0.1:{mqtt_port}" in done.stdout + done.stderr
    assert "is server.port its SSH port?" in done.stdout + done.stderr


def test_a_refused_admin_secret_says_what_to_look_at(serve: Serve, state: Path):
    secret = state / "broker" / "herald-admin.secret"
    secret.write_text("not-the-secret\n")
    line = one_line_error(herald("status", "--broker", serve.mqtt, "--state", str(state)), code=1)
    assert "Not authorized" in line
    assert "is --state the state directory of the server this broker belongs to?" in line
