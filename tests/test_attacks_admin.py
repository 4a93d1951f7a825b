"""Attacks on what the sysadmin runs, by a compromised host: its SSH key, its broker password and
root on itself. It controls its `state` and `online` payloads (message text, log names) and,
with OpenSSH serving the chroots, the files, names, links and sizes in its chroot's logs/.

Every admin surface must show that as data: `herald status` (plain, `--json`, `--watch`),
`herald trigger`'s table, `herald logs` (listing, `--last`, `--follow`), and the page, JSON and
metrics of `herald serve`. No link a host made is followed; no markup is interpreted; no control
character, escape sequence or bidi override it sent reaches a terminal or a page raw."""

import http.client
import io
import json
import os
import pty
import re
import secrets
import select
import signal
import subprocess
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
from helpers import HERALD, TIMEOUT, Fleet, Proc, Serve, Watcher, herald, wait_until
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from herald.fleet import FleetView, as_json, table
from herald.web import page
from protocol.messages import Online, Phase, State, encode, now
from protocol.topics import Kind, Topics

# What no rendered output may hold raw: C0 controls but newline and tab, DEL, C1 controls, bidi
# controls, Unicode line separators. (Tests keep their own list: it is what they check against.)
UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]")
EVIL = "[/bold][red]\x1b]0;owned\x07\x1b[2J\x9b31m\u202ee\u202c\r\x08\x7f<script>x</script>"  # 54 characters
# Sequences of EVIL that must never reach a terminal as they are (rich adds escapes of its own
# on a terminal, so "no ESC at all" cannot be the test there).
RAW = ("\x1b]0;owned", "\x1b[2J", "\x9b", "\u202e", "\u202c", "\r", "\x08", "\x7f")


def unsafe_in(text: str) -> list[str]:
    return sorted(set(UNSAFE.findall(text)))


# ---------------------------------------------------------------- acting as a host


class Host:
    """An MQTT client logged in as `host` with its own broker password, as a compromised host is."""

    def __init__(self, serve: Serve, state: Path, host: str) -> None:
        self.host = host
        self.topics = Topics()
        secret = (state / "chroot" / host / "credentials" / "broker.secret").read_text().strip()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"{host}.attack.{secrets.token_hex(6)}"
        )
        self.client.username_pw_set(host, secret)
        self.commands: list[bytes] = []
        self.on_command = None
        connected = threading.Event()

        def on_connect(client, _userdata, _flags, reason, _props) -> None:
            if not reason.is_failure:
                connected.set()

        def on_message(_client, _userdata, message) -> None:
            self.commands.append(bytes(message.payload))
            if self.on_command is not None:
                self.on_command(bytes(message.payload))

        self.client.on_connect = on_connect
        self.client.on_message = on_message
        address, port = serve.mqtt.removeprefix("mqtt://").rsplit(":", 1)
        self.client.connect(address, int(port), keepalive=30)
        self.client.loop_start()
        assert connected.wait(TIMEOUT), f"{host} could not log in to the broker"

    def publish(self, kind: Kind, payload: bytes) -> None:
        info = self.client.publish(self.topics.of(self.host, kind), payload, qos=1, retain=True)
        info.wait_for_publish(TIMEOUT)
        assert info.is_published()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def evil_state(phase: Phase = Phase.IDLE) -> bytes:
    return encode(
        State(
            phase=phase,
            deployed_generation=1,
            target_generation=1,
            since=now(),
            message=EVIL,
            log="\x1b[31m[bold]20990101-g1-applied.log\u202e",
            agent_version="\x1b]0;agent\x07",
        )
    )


def report_evil_state(serve: Serve, state: Path, watcher: Watcher) -> None:
    """alpha, compromised, reports an evil state and presence: the broker routes and keeps both."""
    host = Host(serve, state, "alpha")
    try:
        host.publish(Kind.ONLINE, encode(Online(online=True, at=now())))
        payload = evil_state()
        host.publish(Kind.STATE, payload)
    finally:
        host.close()
    watcher.wait_for(lambda: payload in watcher.on("alpha", "state"), "alpha's evil state routed")


def on_terminal(argv: list[str], timeout: float = 60.0) -> str:
    """Run `argv` with a pseudo-terminal as stdout and stderr: what the admin's terminal receives."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)
    received = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    break
                if not chunk:
                    break
                received += chunk
            elif proc.poll() is not None:
                break
        else:
            raise AssertionError(f"{argv}: not done within {timeout:g}s")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        os.close(leader)
    return received.decode(errors="replace")


def no_traceback(text: str) -> None:
    assert "Traceback" not in text, text
    assert "MarkupError" not in text, text


# ---------------------------------------------------------------- status, --json, --watch, trigger


def test_status_shows_a_hosts_markup_and_escapes_as_text(serve: Serve, state: Path, watcher: Watcher):
    """A compromised host reports a state message full of rich markup (`[/bold]` crashed
    `herald status` with a MarkupError), terminal escape sequences and a bidi override: the
    table shows it escaped, as text, plain and on a terminal."""
    report_evil_state(serve, state, watcher)
    done = herald("status", "--broker", serve.mqtt, "--state", str(state))
    no_traceback(done.stdout + done.stderr)
    assert done.returncode == 0, done.stderr
    (row,) = [line for line in done.stdout.splitlines() if line.startswith("alpha")]
    assert "[/bold][red]" in row  # markup shown, not interpreted
    assert "\\x1b]0;owned\\x07" in row  # the escape shown escaped
    assert unsafe_in(done.stdout + done.stderr) == []

    shown = on_terminal([*HERALD, "status", "--broker", serve.mqtt, "--state", str(state)])
    no_traceback(shown)
    assert "[/bold]" in shown
    assert [raw for raw in RAW if raw in shown.replace("\r\n", "\n")] == []


def test_status_json_keeps_the_hosts_text_but_emits_nothing_raw(serve: Serve, state: Path, watcher: Watcher):
    """The same state through `herald status --json`: a script reads the host's text exactly as
    sent, while the bytes on stdout hold no raw control or bidi character (JSON escapes)."""
    report_evil_state(serve, state, watcher)
    done = subprocess.run(
        [*HERALD, "status", "--broker", serve.mqtt, "--state", str(state), "--json"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    text = done.stdout.decode()
    assert unsafe_in(text.replace("\n", "")) == []
    (alpha,) = [row for row in json.loads(text) if row["host"] == "alpha"]
    assert alpha["state"]["message"] == EVIL  # data, kept exactly


def test_status_watch_shows_the_hosts_text_escaped(serve: Serve, state: Path, watcher: Watcher, logs: Path):
    """`herald status --watch` redraws as hosts report: a compromised host's report arriving
    while it runs is shown escaped, and does not end the watch."""
    proc = Proc(
        "watch",
        [*HERALD, "status", "--broker", serve.mqtt, "--state", str(state), "--watch"],
        logs / "watch.log",
    )
    try:
        report_evil_state(serve, state, watcher)
        wait_until(
            lambda: "\\x1b]0;owned" in proc.output() or not proc.alive(), "the watch shows alpha's state"
        )
        assert proc.alive(), proc.output()
        output = proc.output()
        no_traceback(output)
        assert "[/bold][red]" in output
        assert unsafe_in(output) == []
    finally:
        proc.stop(signal.SIGINT)


def test_a_hosts_answer_to_a_trigger_is_shown_as_text(serve: Serve, state: Path):
    """A compromised host answers `herald trigger --wait` with a failed state whose message is
    markup and escapes: the result table shows it escaped."""
    host = Host(serve, state, "alpha")

    def answer(_command: bytes) -> None:
        for phase in (Phase.CHECKING, Phase.FAILED):
            payload = encode(State(phase=phase, since=now(), message=EVIL))
            host.client.publish(host.topics.state("alpha"), payload, qos=1, retain=True)

    try:
        host.on_command = answer
        host.client.subscribe(host.topics.command("alpha"), qos=1)  # retained: it arrives either way
        done = herald(
            "trigger", "--broker", serve.mqtt, "--state", str(state), "--wait", "--timeout", "30s", "alpha"
        )
    finally:
        host.close()
    assert host.commands, "the command never reached alpha"
    no_traceback(done.stdout + done.stderr)
    assert done.returncode == 1, done.stdout + done.stderr  # alpha said it failed
    (row,) = [line for line in done.stdout.splitlines() if line.startswith("alpha")]
    assert "failed" in row
    assert "[/bold][red]" in row
    assert unsafe_in(done.stdout + done.stderr) == []


# ---------------------------------------------------------------- the page, status.json, metrics


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
        return response.read().decode()


def test_the_page_json_and_metrics_show_a_hosts_text_escaped(serve: Serve, state: Path, watcher: Watcher):
    """The same evil state on `herald serve`'s page, /status.json and /metrics: HTML-escaped and
    control-free on the page, JSON-escaped in status.json, and absent from every metric label."""
    report_evil_state(serve, state, watcher)

    def shown() -> str | None:
        text = fetch(serve.http)
        return text if "&lt;script&gt;" in text else None

    html = wait_until(shown, "the page shows alpha's state")
    row = html.split('<tr id="host-alpha">')[1].split("</tr>")[0]
    assert "&lt;script&gt;x&lt;/script&gt;" in row
    assert "<script>" not in html
    assert "\\x1b]0;owned\\x07" in row
    assert unsafe_in(html.replace("\n", "")) == []

    status = fetch(serve.http + "status.json")
    assert unsafe_in(status.replace("\n", "")) == []
    (alpha,) = [entry for entry in json.loads(status) if entry["host"] == "alpha"]
    assert alpha["state"]["message"] == EVIL

    metrics = fetch(serve.http + "metrics")
    assert unsafe_in(metrics.replace("\n", "")) == []
    assert "owned" not in metrics
    assert 'herald_host_deployed_generation{host="alpha"} 1.0' in metrics


# ---------------------------------------------------------------- every payload a host may send

TEXT = st.one_of(
    st.text(max_size=80),
    st.lists(
        st.one_of(
            st.sampled_from([*RAW, "[/bold]", "[", "]", "\\", "\x00", "\n", "\t", "\u2028", "\u2066"]),
            st.text(max_size=4),
        ),
        max_size=20,
    ).map("".join),
)
TIMES = st.datetimes(
    min_value=datetime(1, 1, 2),  # noqa: DTZ001 - hypothesis takes naive bounds
    max_value=datetime(9999, 12, 30),  # noqa: DTZ001
    timezones=st.just(UTC),
)
STATES = st.builds(
    State,
    phase=st.sampled_from(Phase),
    deployed_generation=st.integers(0, 2**53),
    deployed_version=st.none() | st.text("0123456789abcdef", min_size=64, max_size=64),
    target_generation=st.integers(0, 2**53),
    since=TIMES,
    message=TEXT,
    log=st.none() | TEXT,
    agent_version=TEXT,
    needs_reboot=st.booleans(),
).map(encode)
ONLINES = st.builds(Online, online=st.booleans(), at=TIMES).map(encode)
# What a host may publish: on its own state and online topics, any bytes, valid or not.
MESSAGES = st.lists(
    st.tuples(
        st.sampled_from(["alpha", "beta"]),
        st.sampled_from([Kind.STATE, Kind.ONLINE]),
        st.one_of(STATES, ONLINES, st.binary(max_size=200), st.just(b"")),
    ),
    min_size=1,
    max_size=8,
)


@given(MESSAGES)
def test_any_payload_a_host_publishes_renders_safely_everywhere(messages):
    """Compromised hosts publish anything on every topic they may publish to: valid States and
    Onlines with arbitrary text and times, invalid JSON, arbitrary bytes, retained deletes. The
    fleet view takes each without raising; the table, --json and the page render without raising
    and hold no control character a host sent."""
    topics = Topics()
    view = FleetView(topics)
    view.add_hosts(["alpha", "beta", "gamma"])
    for host, kind, payload in messages:
        view.update(topics.of(host, kind), payload)
    out = io.StringIO()
    Console(file=out, width=250, color_system=None, force_terminal=False).print(table(view))
    document = as_json(view).decode()
    html = page(view)
    for rendered in (out.getvalue(), document, html):
        assert unsafe_in(rendered.replace("\n", "")) == []
    for row in json.loads(document):  # --json keeps the data exactly, escaped only as JSON
        held = view.hosts[row["host"]].state
        assert (row["state"] or {}).get("message") == (held.message if held else None)


# ---------------------------------------------------------------- herald logs

KEY_LINE = re.compile(r"^[A-Za-z0-9+/=]{40,}$", re.MULTILINE)
GOOD_LOG = "make: \x1b]0;owned\x07\x1b[2J done \x9b31m \u202eevil\u202c\r\x08 [/bold]\n\tindented\n"


def published(fleet: Fleet, state: Path) -> Path:
    done = herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--init")
    assert done.returncode == 0, done.stderr
    return state / "chroot" / "alpha" / "logs"


def plant_links(logs: Path, state: Path, stamp: str) -> dict[str, str]:
    """What a host with OpenSSH can leave in its logs/ (and a hard link to what root can read):
    each name, and why `herald logs` must skip it."""
    key = state / "publisher" / "private" / "signing.key"
    (logs / f"{stamp}0-g9-applied.log").symlink_to(key)
    os.link(key, logs / f"{stamp}1-g9-applied.log")
    os.mkfifo(logs / f"{stamp}2-g9-applied.log")
    (logs / f"{stamp}3-g9-applied.log").mkdir()
    (logs / f"{stamp}4-g9-applied.log").symlink_to(state / "chroot" / "beta" / "credentials")
    return {
        f"{stamp}0-g9-applied.log": "symbolic link",
        f"{stamp}1-g9-applied.log": "hard link",
        f"{stamp}2-g9-applied.log": "FIFO",
        f"{stamp}3-g9-applied.log": "directory",
        f"{stamp}4-g9-applied.log": "symbolic link",
    }


def plant_logs(logs: Path, stamp: str) -> list[str]:
    """Regular files with hostile names and contents: shown, escaped. Returns their names as
    `herald logs` must show them."""
    evil_name = f"{stamp}5-\x1b]0;pwned\x07\u202e[bold].log"
    (logs / evil_name).write_text(GOOD_LOG)
    undecodable = f"{stamp}6-" + b"\xff\xfe.log".decode(errors="surrogateescape")
    (logs / undecodable).write_bytes(b"")
    long_name = f"{stamp}7-{'x' * 200}.log"
    (logs / long_name).write_text("a long name\n")
    return [f"{stamp}5-\\x1b]0;pwned\\x07\\u202e[bold].log", f"{stamp}6-\\xff\\xfe.log", long_name]


def assert_no_key(output: str, state: Path) -> None:
    key = (state / "publisher" / "private" / "signing.key").read_text()
    for line in KEY_LINE.findall(key):
        assert line not in output, "the publisher's signing key was printed"
    assert "PRIVATE KEY" not in output
    secret = (state / "chroot" / "beta" / "credentials" / "broker.secret").read_text().strip()
    assert secret not in output, "beta's broker secret was printed"


def skipped(stderr: str) -> dict[str, str]:
    """name -> the line `herald logs` warned with, for every entry it skipped."""
    found = {}
    for line in stderr.splitlines():
        match = re.search(r"skipped logs/(\S+): ", line)
        if match:
            assert match.group(1) not in found, f"warned twice about {match.group(1)}"
            found[match.group(1)] = line
    return found


def test_logs_never_follows_or_prints_a_link_a_host_planted(fleet: Fleet, state: Path):
    """A compromised host, served by OpenSSH, leaves a symlink to the publisher's signing key,
    a hard link to it, a FIFO, a directory and a symlink into beta's credentials in its logs/,
    among logs with hostile names and contents. `herald logs` (run as root) lists and prints only
    the regular files with one link, escaped, and says once for each other entry what it is."""
    logs = published(fleet, state)
    why = plant_links(logs, state, "20990101-00000")
    shown = plant_logs(logs, "20990101-00000")

    listing = herald("logs", "--state", str(state), "alpha")
    no_traceback(listing.stdout + listing.stderr)
    assert listing.returncode == 0, listing.stderr
    names = [line.rsplit(maxsplit=3)[0] for line in listing.stdout.splitlines()]  # name size bytes time
    assert names == sorted(shown, reverse=True)
    warned = skipped(listing.stderr)
    assert sorted(warned) == sorted(why)
    for name, reason in why.items():
        assert reason in warned[name]

    last = herald("logs", "--state", str(state), "--last", "20", "alpha")
    no_traceback(last.stdout + last.stderr)
    assert last.returncode == 0, last.stderr
    output = last.stdout + last.stderr
    assert_no_key(output, state)
    assert sorted(skipped(last.stderr)) == sorted(why)
    assert (
        "make: \\x1b]0;owned\\x07\\x1b[2J done \\x9b31m \\u202eevil\\u202c\\x0d\\x08 [/bold]\n\tindented\n"
        in last.stdout
    )
    assert "a long name" in last.stdout
    assert unsafe_in(output) == []


def test_logs_on_a_terminal_gets_no_raw_escape_from_a_host(fleet: Fleet, state: Path):
    """The same logs printed to the admin's terminal: none of the host's escape sequences, C1
    controls or bidi overrides arrives as itself, in a name or in a log's contents."""
    logs = published(fleet, state)
    plant_logs(logs, "20990101-00000")
    shown = on_terminal([*HERALD, "logs", "--state", str(state), "--last", "5", "alpha"])
    no_traceback(shown)
    assert "[/bold]" in shown
    assert "\\x1b]0;pwned" in shown
    assert [raw for raw in RAW if raw in shown.replace("\r\n", "\n")] == []


def test_logs_follow_skips_links_planted_while_it_runs(fleet: Fleet, state: Path, logs: Path):
    """`herald logs --follow` is running when the host adds a symlink to the signing key, a hard
    link to it, a FIFO and a real log: the real log is printed, escaped; each other entry is
    named once in a warning (not again on the next pass) and never read."""
    chroot_logs = published(fleet, state)
    (chroot_logs / "20990102-000000-g9-applied.log").write_text("the first log\n")
    argv = [*HERALD, "logs", "--state", str(state), "--last", "1", "--follow", "alpha"]
    proc = Proc("follow", argv, logs / "follow.log")
    try:
        wait_until(lambda: "the first log" in proc.output(), "herald logs --follow running")
        why = plant_links(chroot_logs, state, "20990102-00001")
        (chroot_logs / "20990102-000020-g9-applied.log").write_text(GOOD_LOG)
        wait_until(
            lambda: len(skipped(proc.output())) == len(why) and "indented" in proc.output(),
            "the new log printed and every other entry named",
        )
        (chroot_logs / "20990102-000030-g9-applied.log").write_text("the last log\n")
        wait_until(lambda: "the last log" in proc.output(), "a later pass over logs/")
        output = proc.output()
        assert proc.alive(), output
        assert sorted(skipped(output)) == sorted(why)  # and each once: skipped() checks
        assert_no_key(output, state)
        assert "\\x1b]0;owned\\x07" in output
        assert unsafe_in(output) == []
    finally:
        proc.stop()


# ---------------------------------------------------------------- the page's /logs/<host>/<name>


def http_get(serve: Serve, path: str) -> tuple[int, dict[str, str], str]:
    """GET `path` exactly as written (no client normalises its dots or escapes)."""
    address = serve.http.removeprefix("http://").rstrip("/")
    connection = http.client.HTTPConnection(address, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode(errors="replace")
    finally:
        connection.close()


def test_the_page_serves_only_a_hosts_logs_by_their_names_and_never_follows_its_links(
    serve: Serve, state: Path, watcher: Watcher
):
    """alpha, compromised (and served by OpenSSH, so it can make links), leaves a symlink to the
    signing key, a hard link to it, a FIFO and a directory in its logs/, each under a name an
    agent would give a log, and names a path as its log. `/logs/alpha/<name>` serves only the
    regular file with one link, escaped, as plain text no browser sniffs; every other entry, a
    `..`, a path or an escaped slash is a 404 that reads nothing (the FIFO does not block it)."""
    logs = state / "chroot" / "alpha" / "logs"
    key = state / "publisher" / "private" / "signing.key"
    (logs / "20990101T000000Z-g9-applied.log").symlink_to(key)
    os.link(key, logs / "20990101T000001Z-g9-applied.log")
    os.mkfifo(logs / "20990101T000002Z-g9-applied.log")
    (logs / "20990101T000003Z-g9-applied.log").mkdir()
    (logs / "20990101T000004Z-g9-failed.log").write_text(GOOD_LOG + "<script>alert(1)</script>\n")

    status, headers, body = http_get(serve, "/logs/alpha/20990101T000004Z-g9-failed.log")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "\\x1b]0;owned\\x07" in body
    assert "<script>alert(1)</script>" in body  # text, and the browser is told it is text
    assert unsafe_in(body.replace("\n", "").replace("\t", "")) == []

    refused = [
        "/logs/alpha/20990101T000000Z-g9-applied.log",  # a symlink to the signing key
        "/logs/alpha/20990101T000001Z-g9-applied.log",  # a hard link to it
        "/logs/alpha/20990101T000002Z-g9-applied.log",  # a FIFO
        "/logs/alpha/20990101T000003Z-g9-applied.log",  # a directory
        "/logs/alpha/..",
        "/logs/alpha/%2e%2e",
        "/logs/alpha/..%2f..%2fpublisher%2fprivate%2fsigning.key",
        "/logs/alpha/../../publisher/private/signing.key",
        "/logs/..%2fpublisher/private/signing.key",
        "/logs/alpha/%2e%2e%2f%2e%2e%2fpublisher%2fprivate%2fsigning.key",
        "/logs/zeta/20990101T000004Z-g9-failed.log",  # no such host
        "/logs/beta/20990101T000004Z-g9-failed.log",  # another host's name for it
    ]
    started = time.monotonic()
    for path in refused:
        status, _, body = http_get(serve, path)
        assert status == 404, path
        assert_no_key(body, state)
    assert time.monotonic() - started < 10

    host = Host(serve, state, "alpha")
    try:
        host.publish(Kind.ONLINE, encode(Online(online=True, at=now())))
        named = encode(State(phase=Phase.IDLE, since=now(), log="../../publisher/private/signing.key"))
        host.publish(Kind.STATE, named)
    finally:
        host.close()
    watcher.wait_for(lambda: named in watcher.on("alpha", "state"), "alpha's state routed")

    def shown() -> str | None:
        text = fetch(serve.http)
        return text if "signing.key" in text else None

    row = wait_until(shown, "the page shows alpha's log name").split('<tr id="host-alpha">')[1]
    assert "<a " not in row.split("</tr>")[0]  # a name no agent makes is never a link
