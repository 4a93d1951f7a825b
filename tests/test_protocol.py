"""The wire contract: strict decoding, one-line errors, and no decoder that can be crashed."""

import contextlib
import string
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import ConfigError, PayloadError, ReleaseError
from protocol.messages import Command, Desired, Online, State, decode, encode
from protocol.mqtt import BrokerURL
from protocol.release import (
    Content,
    Current,
    FileEntry,
    Manifest,
    check_content,
    check_path,
    decode_manifest,
    encode_release,
    split_release,
)
from protocol.settings import AgentConfig, Operation, load, seconds
from protocol.topics import Kind, Topics

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKw6pDRxgkA1qDnC0c7RLuTFrxVeDlUFHdA2fHHmSjVh"
AGENT = f"""host = "alpha"
ssh_key = "/etc/herald/id_ed25519"
[server]
address = "herald.example"
host_key = "{KEY}"
"""
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            AGENT + "[broker]\nurl = 'http://x'\n",
            "agent.toml: broker.url: Expected `str` matching regex '^mqtts?://'",
        ),
        ("poll = '15 minutes'\n" + AGENT, "agent.toml: poll: expected a duration such as '90s'"),
        (AGENT.replace('"alpha"', '"Alpha"'), "agent.toml: host 'Alpha' is not a valid host name"),
        (
            AGENT + "[rebuild]\noperation = 'dry-run'\n",
            "agent.toml: rebuild.operation: Invalid enum value 'dry-run'",
        ),
        (AGENT + "colour = 1\n", "agent.toml: server: Object contains unknown field `colour`"),
        (AGENT.replace(KEY, "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIKw6"), "agent.toml: server: host_key: "),
        (
            AGENT + "[rebuild]\ncommand = ['nixos-rebuild', '{operation}', '{tree}']\n",
            "agent.toml: rebuild: command: unknown placeholder {tree} (known: {dir}, {flake}",
        ),
        (
            AGENT + "[notify]\ncommand = ['notify-send', '{summary']\n",
            "agent.toml: notify: command: '{summary': ",
        ),
        (AGENT + "[reboot]\nwindow = '2-4'\n", "agent.toml: reboot.window: expected a local time window"),
        ("host = 1\n", "agent.toml: host: Expected `str`, got `int`"),
        ("host = \n", "agent.toml: invalid TOML: "),
    ],
)
def test_agent_toml_errors_are_one_line_naming_the_field(tmp_path: Path, text: str, error: str):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load(path, AgentConfig)
    message = str(raised.value).replace(str(tmp_path) + "/", "")
    assert "\n" not in message
    assert message.startswith(error)


def test_agent_toml_defaults():
    config = msgspec.toml.decode(AGENT.encode(), type=AgentConfig)
    assert (config.state_dir, config.root, seconds(config.poll), config.server.port) == (
        "/var/lib/herald",
        "/",
        900,
        22,
    )
    assert config.broker.url is None
    assert config.rebuild.operation is None


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (b"", Desired),
        (b"{}", Desired),
        (
            b'{"generation": 0, "version": "' + b"a" * 64 + b'", "published_at": "2026-11-25T12:00:00Z"}',
            Desired,
        ),
        (
            b'{"generation": 1, "version": "' + b"A" * 64 + b'", "published_at": "2026-11-25T12:00:00Z"}',
            Desired,
        ),
        (
            b'{"generation": 1, "version": "' + b"a" * 64 + b'", "published_at": "2026-11-25T12:00:00"}',
            Desired,
        ),
        (b'{"id": "x y", "action": "check", "issued_at": "2026-11-25T12:00:00Z"}', Command),
        (b'{"id": "x", "action": "format-disk", "issued_at": "2026-11-25T12:00:00Z"}', Command),
        (b'{"format": 2, "online": true, "at": "2026-11-25T12:00:00Z"}', Online),
        (b"\xff\xfe", State),
        (b"[" * 100_000, State),
    ],
    ids=[
        "empty",
        "missing",
        "generation-0",
        "upper-hex",
        "naive-time",
        "bad-id",
        "bad-action",
        "extra",
        "binary",
        "huge",
    ],
)
def test_bad_payloads_are_refused_with_payload_error(payload: bytes, kind: type):
    with pytest.raises(PayloadError):
        decode(payload, kind)


def test_payloads_round_trip():
    desired = Desired(generation=3, version="b" * 64, published_at=NOW, source_rev="abc")
    assert decode(encode(desired), Desired) == desired
    state = State(phase="idle", deployed_generation=3, since=NOW)  # type: ignore[arg-type]
    assert decode(encode(state), State) == state


@given(st.binary(max_size=2048))
def test_no_payload_crashes_a_decoder(data: bytes):
    for kind in (Desired, Command, State, Online):
        with contextlib.suppress(PayloadError):
            decode(data, kind)


@given(
    st.dictionaries(
        st.sampled_from(["generation", "version", "published_at", "source_rev", "x"]),
        st.none() | st.integers() | st.text(max_size=80),
    )
)
def test_no_json_object_crashes_the_desired_decoder(fields: dict):
    with contextlib.suppress(PayloadError):
        decode(msgspec.json.encode(fields), Desired)


@pytest.mark.parametrize(
    "path",
    ["", "/etc/passwd", "../x", "a/../../x", "a/./b", "a//b", "a/", ".", "..", "a\\b", "a\0b", "./a"],
)
def test_unsafe_release_paths_are_refused(path: str):
    with pytest.raises(ReleaseError):
        check_path(path)


@pytest.mark.parametrize("path", ["configuration.nix", "files/etc/motd", "common/a.b/c", "..hidden", "a..b"])
def test_plain_release_paths_pass(path: str):
    check_path(path)


def entry(path: str) -> FileEntry:
    return FileEntry(path, 0o644, 1, "0" * 64)


@pytest.mark.parametrize(
    ("paths", "error"),
    [
        (["b", "a"], "not sorted"),
        (["a", "a"], "duplicate"),
        (["a", "a/b"], "both as a file and as a directory"),
    ],
)
def test_inconsistent_file_lists_are_refused(paths: list[str], error: str):
    with pytest.raises(ReleaseError, match=error):
        check_content(Content(operation=Operation.SWITCH, files=[entry(p) for p in paths]))


def test_a_manifest_must_match_host_generation_and_its_own_version():
    content = Content(operation=Operation.SWITCH, files=[entry("configuration.nix")])
    good = Manifest(host="alpha", generation=2, version=content.version(), published_at=NOW, content=content)
    data = msgspec.json.encode(good)
    current = Current(2, content.version())
    assert decode_manifest(data, host="alpha", current=current) == good
    with pytest.raises(ReleaseError, match="for host 'alpha', not 'beta'"):
        decode_manifest(data, host="beta", current=current)
    with pytest.raises(ReleaseError, match="generation 2, `current` names 3"):
        decode_manifest(data, host="alpha", current=Current(3, content.version()))
    other = msgspec.structs.replace(good, content=Content(operation=Operation.BOOT, files=content.files))
    with pytest.raises(ReleaseError, match="version does not match its content"):
        decode_manifest(msgspec.json.encode(other), host="alpha", current=current)
    escaping = msgspec.structs.replace(
        good, content=Content(operation=Operation.SWITCH, files=[entry("../x")])
    )
    escaping = msgspec.structs.replace(escaping, version=escaping.content.version())
    with pytest.raises(ReleaseError, match="unsafe path"):
        decode_manifest(msgspec.json.encode(escaping), host="alpha", current=Current(2, escaping.version))


def test_a_release_file_is_a_signature_line_then_the_manifest():
    manifest = b'{"host": "alpha"}\n'  # whatever bytes: the signature covers them exactly
    assert split_release(encode_release(manifest, b"c2lnbmF0dXJl\n")) == (manifest, b"c2lnbmF0dXJl")
    with pytest.raises(ReleaseError, match="no signature line"):
        split_release(b'{"host": "alpha"}')
    with pytest.raises(ReleaseError, match="no signature line"):
        split_release(b"x" * 300 + b"\n{}")


@given(st.binary(max_size=300))
def test_no_release_file_crashes_its_splitter(data: bytes):
    with contextlib.suppress(ReleaseError):
        manifest, signature = split_release(data)
        assert signature + b"\n" + manifest == data


@given(st.binary(max_size=300))
def test_no_current_file_crashes_its_decoder(data: bytes):
    with contextlib.suppress(ReleaseError):
        Current.decode(data)


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        ("mqtt://127.0.0.1", BrokerURL("127.0.0.1", 1883)),
        ("mqtts://broker.example:8884", BrokerURL("broker.example", 8884, tls=True)),
        ("mqtt://[::1]:1884", BrokerURL("::1", 1884)),
    ],
)
def test_broker_urls(url: str, parsed: BrokerURL):
    assert BrokerURL.parse(url) == parsed


@pytest.mark.parametrize(
    "url", ["http://x", "mqtt://", "mqtt://user:pw@x", "mqtt://x:99999", "mqtt://x/path"]
)
def test_bad_broker_urls_are_config_errors(url: str):
    with pytest.raises(ConfigError, match="broker URL"):
        BrokerURL.parse(url)


@given(st.text(alphabet=string.printable, max_size=60))
def test_topic_parse_accepts_only_host_topics(topic: str):
    parsed = Topics().parse(topic)
    if parsed is not None:
        host, kind = parsed
        assert topic == f"herald/{host}/{kind}"
        assert kind in set(Kind)
