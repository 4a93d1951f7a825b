"""Publisher-key rotation through herald: agents follow signed statements, no host is touched.

Real `herald serve`, real agents, `herald key rotate | retire`; forged statements and releases
are written into a chroot as a compromised server could.
"""

import asyncio
import hashlib
import json
import shutil
from pathlib import Path

import asyncssh
import msgspec
import pytest
from helpers import (
    HERALD,
    Agent,
    Fleet,
    Proc,
    Serve,
    Watcher,
    herald,
    make_agent,
    read_release,
    start_serve,
    wait_until,
    write_release,
)

from client.agent import Agent as InProcessAgent
from herald.announcing import announce_hosts
from protocol.keychain import Statement, encode_link
from protocol.messages import Phase, now
from protocol.release import Current, signature_bytes, signed_by
from protocol.settings import AgentConfig, load
from publisher.signing import Signer


def at(generation: int):
    return lambda state: state.phase is Phase.IDLE and state.deployed_generation == generation


def key_of(path: Path) -> str:
    return Signer.load(path).public


def trust(agent: Agent) -> dict:
    return json.loads((agent.home / "state" / "trust.json").read_text())


def publish(fleet: Fleet, state: Path, serve: Serve | None = None) -> None:
    args = ["publish", "--fleet", str(fleet.root), "--state", str(state)]
    done = herald(*args, *(["--broker", serve.mqtt] if serve else []))
    assert done.returncode == 0, done.stdout + done.stderr


def set_format(fleet: Fleet, release_format: int) -> None:
    toml = fleet.root / "fleet.toml"
    toml.write_text(toml.read_text() + f"\n[publish]\nformat = {release_format}\n")


def pin(agent: Agent, key: str) -> Agent:
    """agent.toml's publisher_key: the root of the agent's trust."""
    text = agent.config.read_text()
    agent.config.write_text(text.replace("\n[server]", f'\npublisher_key = "{key}"\n\n[server]', 1))
    return agent


def forge_release(
    serve: Serve, state: Path, host: str, generation: int, key: Path, release_format: int = 2
) -> None:
    """The host's current release, again as `generation`, signed by `key`, and announced (as by
    someone who has the server but not the current key)."""
    data, _ = read_release(state, host, generation - 1)
    manifest = json.loads(data)
    manifest["generation"] = generation
    data = json.dumps(manifest, separators=(",", ":")).encode()
    write_release(state, host, generation, data, Signer.load(key).sign(data))
    keys = (state / "chroot" / host / "credentials" / "publisher.keys").read_bytes().count(b"\n")
    current = Current(generation, manifest["version"], release_format, keys if release_format > 1 else None)
    (state / "chroot" / host / "current").write_bytes(current.encode())
    asyncio.run(announce_hosts(state, serve.mqtt, [host], "herald"))


@pytest.mark.parametrize("release_format", [2, 1])
def test_a_fleet_follows_a_rotation_with_no_host_touched(
    fleet: Fleet, state: Path, logs: Path, tmp_path: Path, release_format: int
):
    """Publish with the old key; rotate; publish: every agent applies the new key's release,
    through the statement the old key signed (one pinned in agent.toml to the old key too).
    Retire the old key: a release it signs is refused afterwards. A host enrolled after all
    that pins the new key on first use and follows on from it."""
    set_format(fleet, release_format)
    serve = start_serve(fleet, state, logs)
    watcher = Watcher(serve.mqtt, state)
    old_key = tmp_path / "old.key"
    shutil.copy(state / "publisher" / "private" / "signing.key", old_key)
    old = key_of(old_key)
    agents = {host: make_agent(fleet, host, serve, tmp_path) for host in fleet.hosts}
    pin(agents["gamma"], old)
    try:
        for agent in agents.values():
            agent.start()
        for host in fleet.hosts:
            watcher.wait_state(host, at(1), "applied generation 1")

        done = herald("key", "rotate", "--state", str(state))
        assert done.returncode == 0, done.stdout + done.stderr
        new = key_of(state / "publisher" / "private" / "signing.key")
        assert new != old
        assert f"statement 1: {old} adds {new}" in done.stdout

        (fleet.root / "common" / "base.nix").write_text("{ ... }: { rotated = true; }\n")
        publish(fleet, state, serve)
        for host in fleet.hosts:
            watcher.wait_state(host, at(2), "applied generation 2, signed by the new key")
            data, signature = read_release(state, host, 2)
            assert signed_by(data, signature_bytes(signature), [new, old]) == new
            trusted = {entry["key"]: entry["source"] for entry in trust(agents[host])["keys"]}
            assert trusted == {old: "agent.toml" if host == "gamma" else "first use", new: "statement 1"}

        done = herald("key", "retire", "--state", str(state))
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"statement 2: {new} retires {old}" in done.stdout
        forge_release(serve, state, "alpha", 3, old_key, release_format)  # as someone holding the old key
        done = herald("trigger", "alpha", "--broker", serve.mqtt, "--state", str(state), "--wait")
        refused = watcher.wait_state(
            "alpha", lambda s: s.phase is Phase.FAILED and s.target_generation == 3, "old key refused"
        )
        assert f"signed by publisher key {old}, retired by statement 2" in refused.message
        assert agents["alpha"].deployed() == 2
        assert [entry["key"] for entry in trust(agents["alpha"])["retired"]] == [old]
        assert len(agents["alpha"].rebuilds()) == 2
    finally:
        for agent in agents.values():
            agent.stop()
        watcher.close()

    later = make_agent(fleet, "beta", serve, tmp_path / "later")
    done = later.once()
    assert done.returncode == 0, done.stdout + done.stderr
    assert later.deployed() == 2
    assert trust(later)["root"] == new
    assert [entry["key"] for entry in trust(later)["keys"]] == [new]
    serve.stop()


def statement_line(signer: Signer, **fields: object) -> bytes:
    statement = msgspec.convert({"at": now().isoformat(), **fields}, Statement)
    return encode_link(statement, signer.sign(msgspec.json.encode(statement)))


@pytest.mark.parametrize("forgery", ["an untrusted key", "the trusted key, skipping a statement"])
def test_a_rotation_statement_not_signed_by_a_trusted_key_or_skipping_is_refused(
    fleet: Fleet, serve: Serve, state: Path, tmp_path: Path, forgery: str
):
    alpha = make_agent(fleet, "alpha", serve, tmp_path)
    assert alpha.once().returncode == 0
    before = trust(alpha)
    attacker = Signer.create(tmp_path / "attacker.key")
    real = Signer.load(state / "publisher" / "private" / "signing.key")
    if forgery == "an untrusted key":
        line = statement_line(attacker, seq=1, by=attacker.public, add=[attacker.public])
        expected = (
            f"key statement 1 refused: not signed by a key this agent trusts (it names {attacker.public})"
        )
    else:  # a statement 2 with no statement 1 before it
        line = statement_line(real, seq=2, prev="0" * 64, by=real.public, add=[attacker.public])
        expected = "key statement 1 refused: it says it is statement 2"
    (state / "chroot" / "alpha" / "credentials" / "publisher.keys").write_bytes(line)
    forge_release(serve, state, "alpha", 2, tmp_path / "attacker.key")

    done = alpha.once()
    assert done.returncode == 1
    assert expected in done.stdout
    assert trust(alpha) == before
    assert alpha.deployed() == 1
    assert len(alpha.rebuilds()) == 1
    assert not (alpha.home / "state" / "failed.json").exists()  # reported, not a refused generation


def test_a_release_signed_by_the_new_key_before_the_agent_saw_the_statement_is_applied_once_it_is_fetched(
    fleet: Fleet, serve: Serve, state: Path, tmp_path: Path
):
    """The server serves a release of the new key while alpha's chroot does not hold the
    statement yet (a mirror behind, a restore): alpha says so and applies nothing, without
    marking the generation refused; once the statement is there, it applies the same release."""
    alpha = make_agent(fleet, "alpha", serve, tmp_path)
    assert alpha.once().returncode == 0
    assert herald("key", "rotate", "--state", str(state)).returncode == 0
    statements = state / "chroot" / "alpha" / "credentials" / "publisher.keys"
    held = statements.read_bytes()
    statements.unlink()
    fleet.edit("alpha", "files/etc/motd", "signed by the new key\n")
    publish(fleet, state)

    done = alpha.once()
    assert done.returncode == 1
    assert "signature does not verify against any publisher key this agent trusts" in done.stdout
    assert alpha.deployed() == 1
    assert not (alpha.home / "state" / "failed.json").exists()

    statements.write_bytes(held)
    done = alpha.once()
    assert done.returncode == 0, done.stdout + done.stderr
    assert alpha.deployed() == 2
    assert (alpha.home / "root" / "etc" / "motd").read_text() == "signed by the new key\n"


def test_the_old_private_key_is_gone_and_an_interrupted_rotation_is_finished(fleet: Fleet, state: Path):
    assert herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--init").returncode == 0
    first = key_of(state / "publisher" / "private" / "signing.key")
    assert herald("key", "rotate", "--state", str(state)).returncode == 0
    second = key_of(state / "publisher" / "private" / "signing.key")
    assert [p.name for p in (state / "publisher" / "private").iterdir()] == ["signing.key"]
    assert not [p.name for p in (state / "publisher").iterdir() if "sign" in p.name]
    assert (state / "publisher" / "private").stat().st_mode & 0o777 == 0o700
    assert (state / "publisher" / "private" / "signing.key").stat().st_mode & 0o777 == 0o600
    # A rotation killed after its statement was written, before the key replaced the old one:
    # the next rotate finishes it (agents may already trust that key) rather than make another.
    pending = Signer.create(state / "publisher" / "private" / "signing.key.new")
    signer = Signer.load(state / "publisher" / "private" / "signing.key")
    last = (state / "publisher" / "keys").read_bytes().splitlines()[-1].split(b" ", 1)[1]
    line = statement_line(
        signer, seq=2, prev=hashlib.sha256(last).hexdigest(), by=second, add=[pending.public]
    )
    with (state / "publisher" / "keys").open("ab") as chain:
        chain.write(line)
    done = herald("key", "rotate", "--state", str(state))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "finishing the rotation interrupted after statement 2" in done.stdout
    assert key_of(state / "publisher" / "private" / "signing.key") == pending.public
    shown = herald("key", "show", "--state", str(state)).stdout
    assert f"trusted: {first} (from the first signing key)" in shown
    assert "statement 2 (" in shown
    refused = herald("key", "retire", "--state", str(state), pending.public)
    assert refused.returncode == 2
    assert "signs the releases: rotate first" in refused.stderr


def test_a_key_where_herald_0_1_kept_it_moves_into_its_own_directory(fleet: Fleet, state: Path):
    """herald 0.1 kept the key in STATE/publisher/ itself, where no unit could hide it from serve
    alone: the next publish moves it into STATE/publisher/private/ and signs with it still."""
    assert herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--init").returncode == 0
    first = key_of(state / "publisher" / "private" / "signing.key")
    (state / "publisher" / "private" / "signing.key").rename(state / "publisher" / "signing.key")
    (state / "publisher" / "private").rmdir()
    (fleet.root / "common" / "moved.nix").write_text("{ ... }: { }\n")
    assert herald("publish", "--fleet", str(fleet.root), "--state", str(state)).returncode == 0
    assert not (state / "publisher" / "signing.key").exists()
    assert key_of(state / "publisher" / "private" / "signing.key") == first
    assert (state / "publisher" / "private").stat().st_mode & 0o777 == 0o700
    shown = herald("key", "show", "--state", str(state))
    assert f"signing key: {first}" in shown.stdout


def test_a_key_kept_elsewhere_is_moved_as_a_link_and_a_lost_key_is_never_replaced(
    fleet: Fleet, state: Path, tmp_path: Path
):
    """herald 0.1's key as a link to a secret store moves as that link; the same key in both
    places leaves one; two keys, or none in a state that signed releases, stop the publish with
    one line: a new key would be refused by every agent that pinned the old one."""
    assert herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--init").returncode == 0
    private = state / "publisher" / "private" / "signing.key"
    first = key_of(private)
    secret = tmp_path / "secrets" / "herald.key"
    secret.parent.mkdir()
    private.rename(secret)
    (state / "publisher" / "signing.key").symlink_to(secret)
    (fleet.root / "common" / "linked.nix").write_text("{ ... }: { }\n")
    assert herald("publish", "--fleet", str(fleet.root), "--state", str(state)).returncode == 0
    assert private.is_symlink()
    assert key_of(private) == first
    assert (state / "chroot" / "alpha" / "credentials" / "publisher.pub").read_text().strip() == first

    shutil.copy(secret, state / "publisher" / "signing.key")  # the same key back in the old place
    assert herald("key", "show", "--state", str(state)).returncode == 0
    assert not (state / "publisher" / "signing.key").exists()
    Signer.create(state / "publisher" / "signing.key")  # another key there
    done = herald("publish", "--fleet", str(fleet.root), "--state", str(state))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "are two different keys" in done.stderr
    (state / "publisher" / "signing.key").unlink()

    private.unlink()  # lost
    done = herald("publish", "--fleet", str(fleet.root), "--state", str(state))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "this state has signed releases: restore the key" in done.stderr
    assert not private.exists()


def test_serve_with_publish_off_never_reads_the_signing_key(
    fleet: Fleet, state: Path, logs: Path, tmp_path: Path
):
    """`publish = false`: serve (broker, SFTP) announces and serves what `herald publish`, run on
    its own with the key, wrote; it neither reads nor makes a signing key."""
    publish_done = herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--init")
    assert publish_done.returncode == 0, publish_done.stderr
    key = state / "publisher" / "private" / "signing.key"
    key.rename(tmp_path / "elsewhere.key")
    config = tmp_path / "server.toml"
    config.write_text(
        f'fleet = "{fleet.root}"\nstate = "{state}"\nmqtt = "127.0.0.1:0"\nsftp = "127.0.0.1:0"\n'
        'http = "off"\npublish = false\n'
    )
    run_file = state / "run" / "serve.json"
    proc = Proc("serve", [*HERALD, "serve", "--config", str(config)], logs / "serve.log")
    try:
        info = wait_until(lambda: run_file.exists() and json.loads(run_file.read_text()), "serve ready")
        serve = Serve(proc, state, info["mqtt"], info["sftp_port"], info["sftp_host_key"])
        alpha = make_agent(fleet, "alpha", serve, tmp_path)
        assert alpha.once().returncode == 0
        assert not key.exists()
        assert "publishing is left to `herald publish`" in proc.output()
    finally:
        proc.stop()


def requests_of_one_check(agent: Agent) -> list[object]:
    """The SFTP requests one check of the agent sends on its open session, counted in-process."""
    sent: list[object] = []
    original = asyncssh.sftp.SFTPClientHandler._send_request

    def counting(self, pkttype, args, waiter):
        sent.append(pkttype)
        return original(self, pkttype, args, waiter)

    async def check() -> None:
        real = InProcessAgent(load(agent.config, AgentConfig), agent.config)
        real.store.prepare()
        async with real.link:
            await real.link.sftp()  # connected: what follows is the check alone
            sent.clear()
            await real.deployer.cycle(force=False)

    asyncssh.sftp.SFTPClientHandler._send_request = counting
    try:
        asyncio.run(check())
    finally:
        asyncssh.sftp.SFTPClientHandler._send_request = original
    return sent


@pytest.mark.parametrize("release_format", [2, 1])
def test_the_no_change_check_stays_3_requests_through_a_rotation(
    fleet: Fleet, state: Path, logs: Path, tmp_path: Path, release_format: int
):
    set_format(fleet, release_format)
    serve = start_serve(fleet, state, logs, mqtt="off")
    try:
        alpha = make_agent(fleet, "alpha", serve, tmp_path)
        assert alpha.once().returncode == 0
        assert len(requests_of_one_check(alpha)) == 3  # open, read, close `current`
        assert herald("key", "rotate", "--state", str(state)).returncode == 0
        fleet.edit("alpha", "files/etc/motd", "signed by the new key\n")
        publish(fleet, state)
        assert alpha.once().returncode == 0
        assert alpha.deployed() == 2
        assert len(requests_of_one_check(alpha)) == 3
        assert herald("key", "retire", "--state", str(state)).returncode == 0
        after = requests_of_one_check(alpha)  # format 2: `current` counts 2 statements; read once
        assert len(after) == (6 if release_format == 2 else 3)
        assert len(requests_of_one_check(alpha)) == 3
    finally:
        serve.stop()
