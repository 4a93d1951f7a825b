"""The agent against a real server: it applies only what it fetched and verified, and fails politely."""

import os
from pathlib import Path

import asyncssh
import msgspec
import pytest
from helpers import Agent, Fleet, Serve, herald, make_agent, read_release, write_release

from protocol.release import Content, Current, FileEntry, Manifest, encode_manifest
from protocol.settings import Operation
from publisher.signing import Signer


@pytest.fixture
def alpha(fleet: Fleet, serve: Serve, tmp_path: Path) -> Agent:
    return make_agent(fleet, "alpha", serve, tmp_path)


def chroot(state: Path) -> Path:
    return state / "chroot" / "alpha"


def assert_nothing_applied(agent: Agent) -> None:
    assert agent.rebuilds() == []
    assert not (agent.home / "root").exists()
    assert agent.deployed() == 0
    assert not list((agent.home / "state" / "trees").glob("[0-9]*"))


def test_once_fetches_verifies_applies_and_exits_0(alpha: Agent, fleet: Fleet):
    done = alpha.once()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "alpha: idle (deployed generation 1)" in done.stdout
    assert alpha.deployed() == 1
    (rebuild,) = alpha.rebuilds()
    assert rebuild["args"][0] == "switch"
    tree = Path(rebuild["args"][1])
    assert (tree / "configuration.nix").read_bytes() == (
        fleet.root / "hosts/alpha/configuration.nix"
    ).read_bytes()
    again = alpha.once()
    assert again.returncode == 0
    assert "up to date" in again.stdout
    assert len(alpha.rebuilds()) == 1


def declare_motd(fleet: Fleet, mode: str) -> None:
    """Give etc/motd another mode, as a sysadmin does: in fleet.toml (git keeps no mode but x)."""
    toml = fleet.root / "fleet.toml"
    toml.write_text(toml.read_text().replace('"etc/motd" = "0644"', f'"etc/motd" = "{mode}"', 1))


def test_unchanged_files_are_linked_from_the_last_tree_after_their_hash_is_checked(
    alpha: Agent, fleet: Fleet, state: Path
):
    assert alpha.once().returncode == 0
    old = Path(alpha.rebuilds()[0]["args"][1]).resolve()
    fleet.edit("alpha", "configuration.nix", "{ ... }: { changed = true; }\n")
    declare_motd(fleet, "0640")  # same content, another mode
    (old / "common/users.nix").write_text("# damaged in the agent's store\n")
    assert herald("publish", "--fleet", str(fleet.root), "--state", str(state)).returncode == 0
    assert alpha.once().returncode == 0
    new = Path(alpha.rebuilds()[1]["args"][1]).resolve()
    assert new != old
    assert (old / "common/base.nix").samefile(new / "common/base.nix")  # linked
    motd = (new / "files/etc/motd").stat()
    assert (motd.st_mode & 0o777, motd.st_nlink) == (0o640, 1)  # copied: a mode of its own
    assert not (old / "common/users.nix").samefile(new / "common/users.nix")  # fetched again
    assert (new / "common/users.nix").read_bytes() == (
        fleet.root / "hosts/alpha/common/users.nix"
    ).read_bytes()
    assert (new / "configuration.nix").read_text() == "{ ... }: { changed = true; }\n"


def test_installed_files_as_released_are_left_alone_and_drifted_ones_restored(
    alpha: Agent, fleet: Fleet, state: Path
):
    def update(text: str) -> None:
        fleet.edit("alpha", "configuration.nix", text)
        assert herald("publish", "--fleet", str(fleet.root), "--state", str(state)).returncode == 0
        assert alpha.once().returncode == 0

    assert alpha.once().returncode == 0
    motd = alpha.home / "root" / "etc" / "motd"
    released = (fleet.root / "hosts/alpha/files/etc/motd").read_bytes()
    first = motd.stat()
    update("{ ... }: { second = true; }\n")
    assert motd.stat().st_ino == first.st_ino  # as released: not written again
    motd.write_text("edited on the host\n")
    update("{ ... }: { third = true; }\n")
    assert motd.read_bytes() == released
    declare_motd(fleet, "0600")
    update("{ ... }: { fourth = true; }\n")
    assert motd.stat().st_mode & 0o777 == 0o600


def test_a_tampered_object_rejects_the_whole_release(alpha: Agent, state: Path):
    objects = sorted((chroot(state) / "objects").iterdir())
    objects[0].write_bytes(objects[0].read_bytes() + b"# tampered\n")
    done = alpha.once()
    assert done.returncode == 1
    assert "does not match its sha256" in done.stdout
    assert_nothing_applied(alpha)


def test_a_truncated_object_rejects_the_whole_release(alpha: Agent, state: Path):
    objects = sorted((chroot(state) / "objects").iterdir())
    objects[-1].write_bytes(objects[-1].read_bytes()[:-1])
    done = alpha.once()
    assert done.returncode == 1
    assert "does not match its sha256" in done.stdout
    assert_nothing_applied(alpha)


def test_a_file_larger_than_a_read_window_arrives_whole(fleet: Fleet, state: Path, alpha: Agent):
    data = os.urandom(2 * (1 << 20) + 12345)  # two full windows of chunks and a part
    (fleet.root / "hosts" / "alpha" / "big.bin").write_bytes(data)
    assert herald("publish", "--fleet", str(fleet.root), "--state", str(state)).returncode == 0
    done = alpha.once()
    assert done.returncode == 0, done.stdout + done.stderr
    (rebuild,) = alpha.rebuilds()
    assert (Path(rebuild["args"][1]) / "big.bin").read_bytes() == data


def test_a_bad_signature_rejects_the_release(alpha: Agent, state: Path):
    data, _ = read_release(state, "alpha", 1)
    write_release(state, "alpha", 1, data, Signer.load_or_create(state.parent / "other.key").sign(data))
    done = alpha.once()
    assert done.returncode == 1
    assert "signature does not verify" in done.stdout
    assert_nothing_applied(alpha)


def _forge(state: Path, generation: int, files: list[FileEntry]) -> None:
    """A release signed with the real publisher key, as a compromised or buggy publisher could."""
    content = Content(operation=Operation.SWITCH, files=files)
    manifest = Manifest(
        host="alpha",
        generation=generation,
        version=content.version(),
        published_at=msgspec.json.decode(
            b'"2026-11-25T12:00:00Z"', type=Manifest.__annotations__["published_at"]
        ),
        content=content,
    )
    data = encode_manifest(manifest)
    signature = Signer.load_or_create(state / "publisher" / "private" / "signing.key").sign(data)
    write_release(state, "alpha", generation, data, signature)
    (chroot(state) / "current").write_bytes(Current(generation, content.version()).encode())


@pytest.mark.parametrize("path", ["../escape", "/etc/shadow", "files/../../x"])
def test_a_signed_manifest_with_an_unsafe_path_is_refused(alpha: Agent, state: Path, path: str):
    _forge(state, 2, [FileEntry(path, 0o644, 1, "0" * 64)])
    done = alpha.once()
    assert done.returncode == 1
    assert "unsafe path" in done.stdout
    assert_nothing_applied(alpha)


def test_a_lower_generation_is_refused(alpha: Agent, fleet: Fleet, state: Path):
    assert alpha.once().returncode == 0
    fleet.edit("alpha", "configuration.nix", "{ ... }: { }\n")
    assert herald("publish", "--fleet", str(fleet.root), "--state", str(state)).returncode == 0
    assert alpha.once().returncode == 0
    assert alpha.deployed() == 2
    old, _ = read_release(state, "alpha", 1)
    version = msgspec.json.decode(old)["version"]
    (chroot(state) / "current").write_bytes(Current(1, version).encode())
    done = alpha.once()
    assert done.returncode == 1
    assert "older than deployed 2" in done.stdout
    assert alpha.deployed() == 2
    assert len(alpha.rebuilds()) == 2


def test_a_failed_rebuild_is_not_retried_until_a_new_generation(alpha: Agent, fleet: Fleet, state: Path):
    (alpha.control / "fail").touch()
    first = alpha.once()
    assert first.returncode == 1
    assert "rebuild failed with exit code 1" in first.stdout
    assert alpha.once().returncode == 1
    assert len(alpha.rebuilds()) == 1  # the same generation is not run again
    (log,) = (chroot(state) / "logs").glob("*-g1-failed.log")
    assert "failing on purpose" in log.read_text()

    (alpha.control / "fail").unlink()
    fleet.edit("alpha", "configuration.nix", "{ ... }: { }\n")
    assert herald("publish", "--fleet", str(fleet.root), "--state", str(state)).returncode == 0
    assert alpha.once().returncode == 0
    assert alpha.deployed() == 2
    assert len(alpha.rebuilds()) == 2


def test_a_hung_rebuild_is_killed_at_its_timeout(alpha: Agent):
    alpha.config.write_text(alpha.config.read_text().replace('timeout = "30s"', 'timeout = "2s"'))
    (alpha.control / "hang").touch()
    done = alpha.once()
    assert done.returncode == 1
    assert "rebuild killed after 2s" in done.stdout
    (rebuild,) = alpha.rebuilds()
    pid = rebuild["pid"]
    assert not Path(f"/proc/{pid}").exists()


def test_an_unreachable_server_is_one_line_and_no_change(fleet: Fleet, serve: Serve, tmp_path: Path):
    agent = make_agent(fleet, "alpha", serve, tmp_path)
    agent.config.write_text(agent.config.read_text().replace(f"port = {serve.sftp_port}", "port = 9"))
    done = agent.once()
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("herald: SFTP server 127.0.0.1:9: ")
    assert_nothing_applied(agent)


def test_a_changed_server_host_key_is_refused(fleet: Fleet, serve: Serve, tmp_path: Path):
    agent = make_agent(fleet, "alpha", serve, tmp_path)
    other = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKw6pDRxgkA1qDnC0c7RLuTFrxVeDlUFHdA2fHHmSjVh"
    agent.config.write_text(agent.config.read_text().replace(serve.host_key, other))
    done = agent.once()
    assert done.returncode == 1
    assert "host key is not the one pinned in agent.toml" in done.stderr
    assert_nothing_applied(agent)


def test_enrol_pins_the_server_writes_agent_toml_and_applies(fleet: Fleet, serve: Serve, tmp_path: Path):
    config = tmp_path / "enrolled" / "agent.toml"
    common = ["--server", f"127.0.0.1:{serve.sftp_port}", "--host", "beta", "--config", str(config)]
    common += ["--ssh-key", str(fleet.keys["beta"]), "--state-dir", str(tmp_path / "enrolled" / "state")]
    unpinned = herald("enrol", *common)  # not a terminal: the key is shown, not trusted
    assert unpinned.returncode == 2
    # The key (what --host-key and agent.toml take) and its fingerprint (what ssh-keygen -l
    # shows), as `herald serve` shows them both.
    fingerprint = asyncssh.import_public_key(serve.host_key).get_fingerprint("sha256")
    shown = f"{serve.host_key} ({fingerprint})"
    assert f"host key: {shown}" in unpinned.stdout
    assert f"server.host_key): {shown}" in serve.proc.output()
    assert "pass it with --host-key" in unpinned.stderr
    assert not config.exists()

    done = herald("enrol", *common, "--host-key", serve.host_key, "--no-apply")
    assert done.returncode == 0, done.stderr
    text = config.read_text()
    assert f'host_key = "{serve.host_key}"' in text
    assert herald("enrol", *common, "--host-key", serve.host_key).returncode == 2  # exists: --force
    applied = herald("enrol", *common, "--host-key", serve.host_key, "--force")
    assert applied.returncode == 1  # the stand-in is not configured: nixos-rebuild is not found here
    assert "beta: failed" in applied.stdout
    assert "cannot start nixos-rebuild" in applied.stdout


def test_enrol_makes_a_key_and_says_what_to_add_to_fleet_toml(serve: Serve, tmp_path: Path):
    key = tmp_path / "new" / "id_ed25519"
    done = herald(
        "enrol", "--server", f"127.0.0.1:{serve.sftp_port}", "--host", "delta", "--host-key", serve.host_key,
        "--ssh-key", str(key), "--config", str(tmp_path / "new" / "agent.toml"), "--no-apply",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert key.stat().st_mode & 0o777 == 0o600
    assert "[hosts.delta]" in done.stdout
    assert 'ssh_key = "ssh-ed25519 ' in done.stdout


def test_the_modules_of_the_agent_import_one_another_one_way():
    """No circle inside client/ (agent -> report -> agent was one): callbacks are passed in.
    Imports under TYPE_CHECKING count too: a circle there is still one module knowing the other."""
    import ast  # noqa: PLC0415

    client = Path(__file__).resolve().parents[1] / "client"
    graph: dict[str, set[str]] = {}
    for source in client.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("client."):
                imported.add(node.module.removeprefix("client."))
            elif isinstance(node, ast.Import):
                imported |= {
                    a.name.removeprefix("client.") for a in node.names if a.name.startswith("client.")
                }
        graph[source.stem] = imported

    def circle(module: str, path: list[str]) -> list[str] | None:
        for other in sorted(graph.get(module, ())):
            if other in path:
                return [*path[path.index(other) :], other]
            found = circle(other, [*path, other])
            if found:
                return found
        return None

    for module in sorted(graph):
        assert circle(module, [module]) is None, " -> ".join(circle(module, [module]) or [])
