"""deploy/example-fleet is what `herald demo` and the README use: it must stay valid."""

import json
import re
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


def _row(table: str, host: str) -> list[str]:
    """The cells of `host`'s row in a table printed by the demo (its first two columns after
    the host are generations, or the trigger's answer)."""
    return next(line for line in table.splitlines() if re.match(rf"{host}\s+(\d+|-|ok)\s", line)).split()


def test_the_demo_tells_its_three_stories(tmp_path):
    kept = tmp_path / "demo"
    done = herald("demo", "--keep", str(kept), timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "all 3 hosts applied generation 1" in out
    # 1: a retained announcement made alpha rebuild, with the figure beside it
    story1 = out.split("1 · workstations")[1].split("2 · ")[0]
    assert re.search(r"alpha: rebuild started \d+\.\d\ds after the publish began", story1)
    assert "/etc/motd now ends 'A change published by the demo.'" in story1
    # 2: the real trigger command, printed, and beta's answer from its own state
    story2 = out.split("2 · the sysadmin")[1].split("3 · ")[0]
    assert "$ herald trigger beta --action rebuild --wait --broker mqtt://127.0.0.1:" in story2
    assert _row(story2, "beta")[:2] == ["beta", "ok"]
    assert re.search(r"beta: rebuilt and reported back \d+\.\ds after the command", story2)
    # 3: the laptop stopped and pending, back and caught up, then its timer alone
    story3 = out.split("3 · an offline laptop")[1].split("the fleet ─")[0]
    assert _row(story3, "gamma")[1:4] == ["2", "1", "stopped"]
    assert "gamma: back online, applied generation 2" in story3
    assert "published: gamma generation 3 (not announced)" in story3
    assert re.search(r"gamma: its timer found generation 3, rebuild \d+\.\ds after the publish", story3)
    # the fleet table at the end
    table = out.split("the fleet ─")[-1]
    for host, generation in (("alpha", "2"), ("beta", "1"), ("gamma", "3")):
        row = _row(table, host)
        assert row[1:3] == [generation, generation]
        assert "up to date" in " ".join(row)
    # --keep left the logs it points to
    assert (kept / "agents" / "gamma" / "agent.log").is_file()
    assert list((kept / "state" / "chroot" / "gamma" / "logs").glob("*-g3-applied.log"))
    rebuilds = [
        json.loads(line) for line in (kept / "agents" / "beta" / "rebuilds.jsonl").read_text().splitlines()
    ]
    assert len(rebuilds) == 2  # its first deployment and the sysadmin's rebuild


def test_demo_keep_refuses_a_directory_that_holds_something(tmp_path):
    (tmp_path / "precious").write_text("not the demo's\n")
    done = herald("demo", "--keep", str(tmp_path))
    assert done.returncode == 2
    assert "not an empty directory" in done.stderr
    assert (tmp_path / "precious").read_text() == "not the demo's\n"


def test_the_sshd_snippet_in_deploy_is_what_provision_writes_for_the_example_fleet():
    from publisher.inventory import load_inventory  # noqa: PLC0415
    from publisher.provision import sshd_fragment  # noqa: PLC0415

    hosts = [host.name for host in load_inventory(EXAMPLE_FLEET).hosts]
    snippet = EXAMPLE_FLEET.parent / "openssh" / "sshd_config.herald"
    assert snippet.read_text() == sshd_fragment(hosts, Path("/var/lib/herald"))
