"""Format numbers: agents of this herald against releases of the next format, and back.

"The next format" is written here as its publisher would write it (fields this herald does not
know, a newer number), signed with the real key; "herald 0.1" is the agent of the commit before
formats existed, run from a `git archive` of it.
"""

import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
from io import BytesIO
from pathlib import Path

import msgspec
import paho.mqtt.client as mqtt
import pytest
from helpers import (
    REPO,
    TIMEOUT,
    Agent,
    Fleet,
    Serve,
    Watcher,
    herald,
    make_agent,
    read_release,
    start_serve,
    write_release,
)

from herald.announcing import announce_hosts
from protocol import formats
from protocol.errors import ConfigError, PayloadError, ReleaseError
from protocol.messages import Online, Phase, State, decode, encode, now
from protocol.release import Content, Current, FileEntry, Manifest, encode_manifest
from protocol.settings import AgentConfig, FleetConfig, Operation, load, load_fleet
from protocol.topics import Kind, Topics
from publisher.signing import Signer

HERALD_0_1 = "382b2caf28e6145f1c05f4e099360d2355414e59"  # the last commit before format numbers


def set_format(fleet: Fleet, release_format: int | None) -> None:
    toml = fleet.root / "fleet.toml"
    text = toml.read_text().split("\n[publish]\n")[0]
    toml.write_text(text + (f"\n[publish]\nformat = {release_format}\n" if release_format else ""))


def publish(fleet: Fleet, state: Path, serve: Serve) -> str:
    done = herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--broker", serve.mqtt)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def next_format(serve: Serve, state: Path, host: str, generation: int, release_format: int) -> None:
    """The host's last release again as `generation`, written by a publisher of a later format:
    a field more at every level of the MANIFEST and a token more in `current`, signed, announced."""
    data, _ = read_release(state, host, generation - 1)
    manifest = json.loads(data)
    manifest["content"]["closure"] = "/nix/store/0000-a-later-field"
    manifest["content"]["files"] = [[*entry, "a later column"] for entry in manifest["content"]["files"]]
    content = json.dumps(manifest["content"], separators=(",", ":")).encode()
    later = {"format": release_format, "rollout": {"wave": 2}, **manifest}
    later.update(format=release_format, generation=generation, version=hashlib.sha256(content).hexdigest())
    data = json.dumps(later, separators=(",", ":")).encode()
    write_release(
        state, host, generation, data, Signer.load(state / "publisher" / "private" / "signing.key").sign(data)
    )
    current = f"{generation} {later['version']} format={release_format} keys=0 wave=2\n"
    (state / "chroot" / host / "current").write_text(current)
    asyncio.run(announce_hosts(state, serve.mqtt, [host], "herald"))


def upgraded(agent: Agent, release_format: int) -> subprocess.CompletedProcess[str]:
    """The agent once, as a herald that reads `release_format` would run it."""
    code = (
        "import sys; import protocol.formats as f; "
        f"f.RELEASE = {release_format}; "
        "from herald.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    argv = [sys.executable, "-c", code, "agent", "--config", str(agent.config), "--once"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_a_release_of_a_later_compatible_format_is_applied(
    fleet: Fleet, serve: Serve, state: Path, tmp_path: Path
):
    alpha = make_agent(fleet, "alpha", serve, tmp_path)
    assert alpha.once().returncode == 0
    next_format(serve, state, "alpha", 2, release_format=2)
    done = alpha.once()
    assert done.returncode == 0, done.stdout + done.stderr
    assert alpha.deployed() == 2
    assert len(alpha.rebuilds()) == 2


def test_a_release_of_a_newer_format_is_reported_not_refused_and_applied_once_upgraded(
    fleet: Fleet, serve: Serve, state: Path, watcher: Watcher, tmp_path: Path
):
    alpha = make_agent(fleet, "alpha", serve, tmp_path)
    assert alpha.once().returncode == 0
    newer = formats.RELEASE + 1
    next_format(serve, state, "alpha", 2, release_format=newer)
    message = (
        f"release format {newer} is newer than this agent ({formats.RELEASE}): upgrade herald on this host"
    )
    for _ in range(2):  # not a refused generation: looked at again, and said again
        done = alpha.once()
        assert done.returncode == 1
        assert f"alpha: failed (deployed generation 1) {message}" in done.stdout
        assert not (alpha.home / "state" / "failed.json").exists()
    reported = watcher.wait_state("alpha", lambda s: s.phase is Phase.FAILED, "the format reported")
    assert (reported.message, reported.target_generation, reported.deployed_generation) == (message, 2, 1)
    assert alpha.deployed() == 1
    assert len(alpha.rebuilds()) == 1

    done = upgraded(alpha, newer)
    assert done.returncode == 0, done.stdout + done.stderr
    assert alpha.deployed() == 2
    assert len(alpha.rebuilds()) == 2


def host_publishes(serve: Serve, state: Path, host: str, kind: Kind, payload: bytes) -> None:
    """Publish as `host` with its own broker secret, as a newer agent on it would."""
    secret = (state / "chroot" / host / "credentials" / "broker.secret").read_text().strip()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{host}.formats.{os.getpid()}")
    client.username_pw_set(host, secret)
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    address, port = serve.mqtt.removeprefix("mqtt://").rsplit(":", 1)
    client.connect(address, int(port), keepalive=30)
    client.loop_start()
    try:
        assert connected.wait(TIMEOUT)
        info = client.publish(Topics().of(host, kind), payload, qos=1, retain=True)
        info.wait_for_publish(TIMEOUT)
    finally:
        client.loop_stop()
        client.disconnect()


def test_the_fleet_view_shows_a_newer_agents_state_and_says_when_it_cannot(
    serve: Serve, state: Path, watcher: Watcher
):
    later = json.loads(
        encode(State(phase=Phase.IDLE, deployed_generation=1, since=now(), message="from later"))
    )
    later["wave"] = 2  # a field this herald does not know
    host_publishes(serve, state, "alpha", Kind.STATE, json.dumps(later).encode())
    breaking = {**later, "format": 2, "message": "format 2"}
    host_publishes(serve, state, "beta", Kind.STATE, json.dumps(breaking).encode())
    watcher.wait_for(lambda: watcher.on("alpha", "state") and watcher.on("beta", "state"), "both routed")
    done = herald("status", "--broker", serve.mqtt, "--state", str(state), "--json")
    rows = {row["host"]: row for row in json.loads(done.stdout)}
    assert rows["alpha"]["state"]["message"] == "from later"
    assert rows["beta"]["state"] is None  # dropped, with one line saying why
    assert "State format 2 is newer than this herald (1): upgrade herald here" in done.stderr


# ---------------------------------------------------------------- herald 0.1 in the field


@pytest.fixture(scope="module")
def herald_0_1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    found = subprocess.run(
        [
            "git",
            "-C",
            str(REPO),
            "archive",
            HERALD_0_1,
            "protocol",
            "client",
            "herald",
            "broker",
            "publisher",
        ],
        capture_output=True,
        check=False,
    )
    if found.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"commit {HERALD_0_1} is needed under CI=true: {found.stderr.decode()}")
        pytest.skip(f"commit {HERALD_0_1} is not in this clone")
    where = tmp_path_factory.mktemp("herald-0.1")
    with tarfile.open(fileobj=BytesIO(found.stdout)) as archive:
        archive.extractall(where, filter="data")
    return where


def run_0_1(old: Path, agent: Agent) -> subprocess.CompletedProcess[str]:
    """`herald agent --once` of herald 0.1 (its own code first on the path)."""
    return subprocess.run(
        [sys.executable, "-m", "herald", "agent", "--config", str(agent.config), "--once"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=old,
        env={**os.environ, "PYTHONPATH": str(old)},
    )


def test_herald_0_1_agents_apply_format_1_releases_while_new_agents_apply_both(
    herald_0_1: Path, fleet: Fleet, state: Path, logs: Path, tmp_path: Path
):
    """The upgrade, through herald: the server upgraded first and holding `[publish] format = 1`,
    a 0.1 agent applies its releases and the fleet view shows its states; a new agent applies
    them too. Format 2 written too early stops the 0.1 agent, not for good: format 1 again is a
    new generation, which it applies. A new agent follows every step."""
    set_format(fleet, 1)
    serve = start_serve(fleet, state, logs)
    watcher = Watcher(serve.mqtt, state)
    old, new = make_agent(fleet, "alpha", serve, tmp_path), make_agent(fleet, "beta", serve, tmp_path)
    try:
        data, _ = read_release(state, "alpha", 1)
        assert b'"format"' not in data
        assert len((state / "chroot" / "alpha" / "current").read_text().split()) == 2
        done = run_0_1(herald_0_1, old)
        assert done.returncode == 0, done.stdout + done.stderr
        assert old.deployed() == 1
        assert new.once().returncode == 0
        watcher.wait_state("alpha", lambda s: s.deployed_generation == 1, "0.1's state, read here")
        rows = {
            row["host"]: row
            for row in json.loads(
                herald("status", "--broker", serve.mqtt, "--state", str(state), "--json").stdout
            )
        }
        assert rows["alpha"]["state"]["deployed_generation"] == 1

        set_format(fleet, 2)
        assert "3 changed" in publish(fleet, state, serve)  # the same content, a new generation
        assert run_0_1(herald_0_1, old).returncode != 0
        assert old.deployed() == 1
        assert new.once().returncode == 0
        assert new.deployed() == 2

        set_format(fleet, 1)
        publish(fleet, state, serve)
        done = run_0_1(herald_0_1, old)
        assert done.returncode == 0, done.stdout + done.stderr
        assert old.deployed() == 3
        assert new.once().returncode == 0
        assert new.deployed() == 3

        set_format(fleet, None)  # unset: every host keeps the format its release has
        assert "0 changed" in publish(fleet, state, serve)
    finally:
        watcher.close()
        serve.stop()


# ---------------------------------------------------------------- the rules, table by table

NOW = now()
CONTENT = Content(operation=Operation.SWITCH, files=[FileEntry("configuration.nix", 0o644, 1, "0" * 64)])


class _HeraldZeroOneManifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """herald 0.1's MANIFEST declaration, copied: what its agents accept."""

    host: str
    generation: int
    version: str
    published_at: msgspec.Raw
    source_rev: str | None = None
    content: msgspec.Raw


def test_format_1_writes_what_herald_0_1_declared_and_format_2_names_itself():
    fields = {"host": "alpha", "generation": 2, "version": CONTENT.version(), "published_at": NOW}
    one = encode_manifest(Manifest(**fields, content=CONTENT))
    msgspec.json.decode(one, type=_HeraldZeroOneManifest)
    two = encode_manifest(Manifest(**fields, content=CONTENT, format=2))
    assert json.loads(two)["format"] == 2
    with pytest.raises(msgspec.ValidationError, match="unknown field `format`"):
        msgspec.json.decode(two, type=_HeraldZeroOneManifest)
    assert Current(2, "a" * 64).encode() == b"2 " + b"a" * 64 + b"\n"
    assert Current(2, "a" * 64, 2, 3).encode() == b"2 " + b"a" * 64 + b" format=2 keys=3\n"


@pytest.mark.parametrize(
    ("line", "parsed"),
    [
        ("2 " + "a" * 64, Current(2, "a" * 64)),
        ("2 " + "a" * 64 + " format=2 keys=1", Current(2, "a" * 64, 2, 1)),
        ("2 " + "a" * 64 + " keys=1 format=3 wave=2 later", Current(2, "a" * 64, 3, 1)),
    ],
)
def test_current_ignores_tokens_it_does_not_know(line: str, parsed: Current):
    assert Current.decode(line.encode() + b"\n") == parsed


@pytest.mark.parametrize("tail", ["keys=x", "keys=-1", "format=0", "format="])
def test_current_refuses_known_tokens_that_are_wrong(tail: str):
    with pytest.raises(ReleaseError, match="malformed `current`"):
        Current.decode(f"2 {'a' * 64} {tail}\n".encode())


def test_payloads_leave_format_1_out_ignore_unknown_fields_and_refuse_newer_ones():
    online = Online(online=True, at=NOW)
    assert b"format" not in encode(online)
    assert decode(b'{"online": true, "at": "2026-11-25T12:00:00Z", "extra": {"a": 1}}', Online).online
    with pytest.raises(PayloadError, match="invalid Online payload"):
        decode(b'{"online": "yes", "at": "2026-11-25T12:00:00Z", "extra": 1}', Online)  # known types kept
    with pytest.raises(PayloadError, match=r"^Online format 3 is newer than this herald \(1\)"):
        decode(b'{"format": 3, "online": "a later shape"}', Online)


AGENT = """host = "alpha"
ssh_key = "/etc/herald/id_ed25519"
[server]
address = "herald.example"
host_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKw6pDRxgkA1qDnC0c7RLuTFrxVeDlUFHdA2fHHmSjVh"
"""


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("format = 2\nwave = 1\n" + AGENT, "format 2 is newer than this herald reads (1): upgrade herald"),
        ("format = 1\nwave = 1\n" + AGENT, "Object contains unknown field `wave`"),  # a typo stays one
        ("format = 0\n" + AGENT, "format: Expected `int` >= 1"),
    ],
)
def test_a_config_written_for_a_newer_herald_says_so_and_typos_stay_errors(
    tmp_path: Path, text: str, error: str
):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(error)):
        load(path, AgentConfig)
    (tmp_path / "ok.toml").write_text("format = 1\n" + AGENT)
    assert load(tmp_path / "ok.toml", AgentConfig).format == 1


def test_publish_format_is_one_this_herald_writes(tmp_path: Path):
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKw6pDRxgkA1qDnC0c7RLuTFrxVeDlUFHdA2fHHmSjVh"
    path = tmp_path / "fleet.toml"
    newer = formats.RELEASE + 1
    path.write_text(f'[hosts.alpha]\nssh_key = "{key}"\n[publish]\nformat = {newer}\n')
    with pytest.raises(
        ConfigError,
        match=f"publish: format: this herald writes release formats 1 to {formats.RELEASE}, not {newer}",
    ):
        load_fleet(path)
    path.write_text(f'format = 2\n[hosts.alpha]\nssh_key = "{key}"\n')
    with pytest.raises(ConfigError, match="format 2 is newer than this herald reads"):
        load_fleet(path)
    path.write_text(f'[hosts.alpha]\nssh_key = "{key}"\n[publish]\nformat = 1\n')
    assert isinstance(load_fleet(path), FleetConfig)
