"""deploy/example-fleet is what `herald demo` and the README use: it must stay valid."""

import subprocess
from pathlib import Path

from helpers import EXAMPLE_FLEET, herald, need


def test_every_nix_file_of_the_example_fleet_parses():
    nix = need("nix-instantiate")
    files = sorted(EXAMPLE_FLEET.rglob("*.nix"))
    assert len(files) >= 7
    for path in files:
        done = subprocess.run(
            [nix, "--store", "dummy://", "--parse", str(path)], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, f"{path}: {done.stderr}"


def test_the_example_fleet_publishes(tmp_path):
    done = herald("publish", "--fleet", str(EXAMPLE_FLEET), "--state", str(tmp_path / "state"), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "3 changed, 0 unchanged, 0 failed" in done.stdout
    assert not (tmp_path / "state" / "chroot").exists()


def test_the_demo_runs_and_shows_the_change_propagating():
    done = herald("demo", timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all 3 hosts applied generation 1" in done.stdout
    assert "alpha: rebuild started" in done.stdout
    assert "A change published by the demo." in done.stdout
    table = done.stdout.split("fleet ─")[-1]
    for host, generation in (("alpha", "2"), ("beta", "1"), ("gamma", "1")):
        row = next(line for line in table.splitlines() if line.startswith(host))
        assert row.split()[1:3] == [generation, generation]
        assert "up to date" in row


def test_the_sshd_snippet_in_deploy_is_what_provision_writes_for_the_example_fleet():
    from publisher.inventory import load_inventory  # noqa: PLC0415
    from publisher.provision import sshd_fragment  # noqa: PLC0415

    hosts = [host.name for host in load_inventory(EXAMPLE_FLEET).hosts]
    snippet = EXAMPLE_FLEET.parent / "openssh" / "sshd_config.herald"
    assert snippet.read_text() == sshd_fragment(hosts, Path("/var/lib/herald"))
