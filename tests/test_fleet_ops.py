"""The sysadmin's view: status in every phase, triggers, staged rollouts, logs, metrics, the page."""

import json
import re
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from helpers import Fleet, Serve, Watcher, herald, make_agent, need, start_serve, wait_until

from protocol.messages import Command, Phase, decode


@pytest.fixture
def fleet5(fleet: Fleet, tmp_path: Path) -> Fleet:
    """The example fleet plus delta and epsilon."""
    fleet.add_host("delta", tmp_path)
    fleet.add_host("epsilon", tmp_path)
    return fleet


def status_json(serve: Serve, state: Path, fleet: Fleet) -> tuple[int, dict[str, str]]:
    done = herald(
        "status", "--broker", serve.mqtt, "--state", str(state), "--fleet", str(fleet.root), "--json"
    )
    rows = json.loads(done.stdout)
    return done.returncode, {row["host"]: row["status"] for row in rows}


def publish(fleet: Fleet, state: Path, serve: Serve) -> None:
    done = herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--broker", serve.mqtt)
    assert done.returncode == 0, done.stdout + done.stderr


def test_status_shows_each_phase(fleet5: Fleet, logs: Path, state: Path, tmp_path: Path):
    serve = start_serve(fleet5, state, logs)
    watcher = Watcher(serve.mqtt, state)
    agents = {}
    try:
        agents["alpha"] = make_agent(fleet5, "alpha", serve, tmp_path)
        agents["beta"] = make_agent(fleet5, "beta", serve, tmp_path)
        (agents["beta"].control / "fail").touch()
        agents["gamma"] = make_agent(fleet5, "gamma", serve, tmp_path, confirm="2s")
        config = agents["gamma"].config
        config.write_text(config.read_text().replace('window = "2s"', 'window = "2s"\nhealth = ["false"]'))
        for agent in agents.values():
            agent.start()
        delta = make_agent(fleet5, "delta", serve, tmp_path)
        assert delta.once().returncode == 0  # reports, then leaves: offline

        watcher.wait_state(
            "alpha", lambda s: s.phase is Phase.IDLE and s.deployed_generation == 1, "alpha at 1"
        )
        watcher.wait_state("beta", lambda s: s.phase is Phase.FAILED, "beta failed")
        watcher.wait_state(
            "gamma", lambda s: s.phase is Phase.IDLE and s.deployed_generation == 1, "gamma at 1"
        )
        fleet5.edit("gamma", "configuration.nix", "{ ... }: { gamma = 2; }\n")
        publish(fleet5, state, serve)
        watcher.wait_state("gamma", lambda s: s.phase is Phase.ROLLED_BACK, "gamma rolled back")

        code, statuses = status_json(serve, state, fleet5)
        assert statuses == {
            "alpha": "up to date",
            "beta": "failed",
            "gamma": "rolled back",
            "delta": "offline",
            "epsilon": "never seen",
        }
        assert code == 1  # a host failed
        table = herald("status", "--broker", serve.mqtt, "--state", str(state), "--fleet", str(fleet5.root))
        assert "rebuild failed with exit code 1" in table.stdout
        assert table.returncode == 1
    finally:
        watcher.close()
        for agent in agents.values():
            agent.stop()
        serve.stop()


def test_a_trigger_for_an_offline_host_reaches_it_once_when_it_returns(
    fleet: Fleet, serve: Serve, state: Path, tmp_path: Path
):
    agent = make_agent(fleet, "alpha", serve, tmp_path)
    assert agent.once().returncode == 0
    done = herald("trigger", "--broker", serve.mqtt, "--state", str(state), "--action", "rebuild", "alpha")
    assert done.returncode == 0, done.stderr
    assert "alpha  sent" in done.stdout or "sent" in done.stdout
    agent.start()
    try:
        wait_until(lambda: len(agent.rebuilds()) == 2, "the rebuild when alpha came back")
        agent.stop()
        agent.start()  # the retained command is delivered again: it must not run again
        assert agent.proc is not None
        wait_until(lambda: "connected to broker" in agent.proc.output(), "alpha reconnected")
        watcher = Watcher(serve.mqtt, state)
        watcher.marker()
        watcher.close()
        assert len(agent.rebuilds()) == 2
    finally:
        agent.stop()


def test_a_staged_rollout_stops_after_the_first_failing_batch(
    fleet: Fleet, serve: Serve, state: Path, watcher: Watcher, agents
):
    for host in fleet.hosts:
        watcher.wait_state(
            host, lambda s: s.phase is Phase.IDLE and s.deployed_generation == 1, f"{host} at 1"
        )
    (agents["beta"].control / "fail").touch()
    done = herald(
        "trigger", "--broker", serve.mqtt, "--state", str(state), "--fleet", str(fleet.root),
        "--all", "--action", "rebuild", "--batch", "1", "--stop-on-failure", "--timeout", "60s",
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    answers = {line.split()[0]: line.split()[1] for line in done.stdout.splitlines()[1:] if line.strip()}
    assert answers == {"alpha": "ok", "beta": "failed", "gamma": "not"}  # "not sent"
    assert [len(agents[host].rebuilds()) for host in ("alpha", "beta", "gamma")] == [2, 2, 1]


def test_trigger_waits_and_tags_select_hosts(
    fleet: Fleet, serve: Serve, state: Path, watcher: Watcher, agents
):
    for host in fleet.hosts:
        watcher.wait_state(host, lambda s: s.phase is Phase.IDLE, f"{host} idle")
    done = herald(
        "trigger", "--broker", serve.mqtt, "--state", str(state), "--fleet", str(fleet.root),
        "--tag", "office", "--wait", "--timeout", "60s", timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    answered = sorted(line.split()[0] for line in done.stdout.splitlines()[1:] if line.strip())
    assert answered == ["alpha", "beta"]  # fleet.toml tags alpha and beta "office"
    refused = herald("trigger", "--broker", serve.mqtt, "--state", str(state), "--all")
    assert refused.returncode == 2
    assert "--all and --tag need --fleet" in refused.stderr


def test_logs_lists_newest_first_and_prints_the_last(fleet: Fleet, serve: Serve, state: Path, tmp_path: Path):
    agent = make_agent(fleet, "alpha", serve, tmp_path)
    assert agent.once().returncode == 0
    assert (
        herald(
            "trigger", "--broker", serve.mqtt, "--state", str(state), "--action", "rebuild", "alpha"
        ).returncode
        == 0
    )
    agent.start()
    try:
        wait_until(lambda: len(list((state / "chroot" / "alpha" / "logs").glob("*.log"))) == 2, "two logs")
    finally:
        agent.stop()
    listing = herald("logs", "--state", str(state), "alpha")
    names = [line.split()[0] for line in listing.stdout.splitlines()]
    assert len(names) == 2
    assert names == sorted(names, reverse=True)
    last = herald("logs", "--state", str(state), "--last", "1", "alpha")
    assert names[0] in last.stdout
    assert names[1] not in last.stdout
    assert "stand-in rebuild" in last.stdout
    missing = herald("logs", "--state", str(state), "zeta")
    assert missing.returncode == 2


def test_metrics_and_the_page_show_the_fleet(
    fleet: Fleet, serve: Serve, state: Path, watcher: Watcher, tmp_path
):
    agent = make_agent(fleet, "alpha", serve, tmp_path).start()
    try:
        watcher.wait_state(
            "alpha", lambda s: s.phase is Phase.IDLE and s.deployed_generation == 1, "alpha at 1"
        )

        def metric_shows_alpha() -> str | None:
            with urllib.request.urlopen(serve.http + "metrics", timeout=10) as response:  # noqa: S310 - loopback
                text = response.read().decode()
            return text if 'herald_host_deployed_generation{host="alpha"} 1.0' in text else None

        text = wait_until(metric_shows_alpha, "alpha in /metrics")
        assert 'herald_host_status{host="alpha",status="up to date"} 1.0' in text
        assert 'herald_host_status{host="beta",status="never seen"} 1.0' in text
        assert "herald_publish_runs_total 1.0" in text

        chromium = need("chromium")
        with tempfile.TemporaryDirectory() as profile:
            dom = subprocess.run(
                [
                    chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-quic", f"--user-data-dir={profile}", "--dump-dom", serve.http,
                ],
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
        assert dom.returncode == 0, dom.stderr[-2000:]
        rows = {
            host: dom.stdout.split(f'<tr id="host-{host}">')[1].split("</tr>")[0]
            for host in ("alpha", "beta", "gamma")
        }
        assert '<td class="status-up-to-date">up to date</td>' in rows["alpha"]
        assert "<td>1</td>" in rows["alpha"]
        assert '<td class="status-never-seen">never seen</td>' in rows["beta"]
    finally:
        agent.stop()


# ---------------------------------------------------------------- issue 19: commands, unknown hosts, logs


def admin(serve: Serve, state: Path, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return herald(args[0], "--broker", serve.mqtt, "--state", str(state), *args[1:], timeout=timeout)


def retained_command(watcher: Watcher, host: str) -> Command:
    watcher.marker()
    return decode(watcher.on(host, "command")[-1], Command)


def shown_command(serve: Serve, state: Path, host: str) -> dict | None:
    done = admin(serve, state, "status", "--json")
    assert done.returncode == 0, done.stderr
    (row,) = [row for row in json.loads(done.stdout) if row["host"] == host]
    return row["command"]


def test_a_command_expires_and_status_shows_it_until_the_host_takes_it(
    fleet: Fleet, serve: Serve, state: Path, watcher: Watcher, tmp_path: Path
):
    """`herald trigger` gives every command an expiry (24 h unless --expires says otherwise);
    `herald status` shows a retained command the host has not taken yet, until it expires; a
    host back after the expiry ignores it."""
    agent = make_agent(fleet, "alpha", serve, tmp_path)
    assert admin(serve, state, "trigger", "--action", "rebuild", "alpha").returncode == 0
    command = retained_command(watcher, "alpha")
    assert command.expires_at is not None
    assert command.expires_at - command.issued_at == timedelta(hours=24)
    table = admin(serve, state, "status")
    (row,) = [line for line in table.stdout.splitlines() if line.startswith("alpha")]
    assert "rebuild by herald-admin, expires in 23h" in row
    assert shown_command(serve, state, "alpha")["id"] == command.id
    assert shown_command(serve, state, "beta") is None

    assert admin(serve, state, "trigger", "--action", "rebuild", "--expires", "1s", "alpha").returncode == 0
    short = retained_command(watcher, "alpha")
    wait_until(lambda: shown_command(serve, state, "alpha") is None, "the 1s command no longer shown")
    agent.start()
    try:
        # Back after the expiry: the command is taken (named in the state) and not executed.
        watcher.wait_state(
            "alpha", lambda s: s.last_command == short.id and s.phase is Phase.IDLE, "alpha took it"
        )
        assert len(agent.rebuilds()) == 1  # its first deployment only

        sent = admin(serve, state, "trigger", "--action", "rebuild", "--expires", "never", "alpha")
        assert sent.returncode == 0, sent.stderr
        forever = retained_command(watcher, "alpha")
        assert forever.expires_at is None
        watcher.wait_state(
            "alpha", lambda s: s.last_command == forever.id and s.phase is Phase.IDLE, "alpha rebuilt"
        )
        assert len(agent.rebuilds()) == 2
        assert shown_command(serve, state, "alpha") is None  # taken: no longer shown

        agent.stop()
        agent.start()  # the retained command comes again; the new state still names it
        assert agent.proc is not None
        wait_until(lambda: "connected to broker" in agent.proc.output(), "alpha reconnected")
        watcher.wait_state("alpha", lambda s: s.last_command == forever.id, "alpha names it again")
        assert shown_command(serve, state, "alpha") is None
        assert len(agent.rebuilds()) == 2
    finally:
        agent.stop()
    bad = admin(serve, state, "trigger", "--expires", "soon", "alpha")
    assert bad.returncode == 2
    assert "--expires 'soon'" in bad.stderr


def test_trigger_refuses_a_host_that_does_not_exist_and_sends_nothing(
    fleet: Fleet, serve: Serve, state: Path, watcher: Watcher
):
    """A mistyped host name: one line naming it, exit 2, nothing sent (no retained command left
    behind, not even for the hosts that exist), and --wait does not wait."""
    started = time.monotonic()
    for extra in ([], ["--wait"], ["--fleet", str(fleet.root)]):
        done = admin(serve, state, "trigger", *extra, "--action", "rollback", "alpha", "zeta", "omega")
        assert done.returncode == 2, done.stdout + done.stderr
        (line,) = done.stderr.strip().splitlines()
        assert "no such host: zeta, omega" in line
        assert "nothing sent" in line
    assert time.monotonic() - started < 30
    watcher.marker()
    assert [topic for _, topic, _, _ in watcher.messages if topic.endswith("/command")] == []


def test_trigger_check_on_a_failed_generation_says_how_to_apply_it_again(
    fleet: Fleet, serve: Serve, state: Path, watcher: Watcher, tmp_path: Path
):
    agent = make_agent(fleet, "beta", serve, tmp_path)
    (agent.control / "fail").touch()
    agent.start()
    try:
        watcher.wait_state("beta", lambda s: s.phase is Phase.FAILED, "beta failed")
        done = admin(serve, state, "trigger", "--wait", "--timeout", "60s", "beta", timeout=120)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "`herald trigger --action rebuild beta` does" in done.stdout
        assert len(agent.rebuilds()) == 1  # the check did not apply it again
    finally:
        agent.stop()


def test_logs_lists_name_size_time_prints_a_log_by_name_and_the_page_links_it(
    fleet: Fleet, serve: Serve, state: Path, watcher: Watcher, tmp_path: Path
):
    """`herald logs HOST` lists newest first with size and time; `herald logs HOST NAME` prints
    the log `status` names; `--last N` prints the N newest, newest first; the page links the
    log, served as plain text that a browser may not sniff."""
    agent = make_agent(fleet, "alpha", serve, tmp_path)
    assert agent.once().returncode == 0
    fleet.edit("alpha", "configuration.nix", "{ ... }: { version = 2; }\n")
    publish(fleet, state, serve)
    assert agent.once().returncode == 0
    listing = herald("logs", "--state", str(state), "alpha")
    assert listing.returncode == 0, listing.stderr
    rows = [line.split() for line in listing.stdout.splitlines()]
    assert [len(row) for row in rows] == [4, 4]  # name, size, "bytes", time
    names = [row[0] for row in rows]
    assert names == sorted(names, reverse=True)
    assert "-g2-applied" in names[0]
    for row in rows:
        assert int(row[1]) == (state / "chroot" / "alpha" / "logs" / row[0]).stat().st_size
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row[3])

    last = herald("logs", "--state", str(state), "--last", "2", "alpha")
    assert last.stdout.index(names[0]) < last.stdout.index(names[1])  # newest first

    named = watcher.wait_state("alpha", lambda s: s.log == names[0], "alpha names its last log").log
    one = herald("logs", "--state", str(state), "alpha", named)
    assert one.returncode == 0, one.stderr
    assert "stand-in rebuild" in one.stdout
    assert names[1] not in one.stdout
    for wrong in ("20000101T000000Z-g1-applied.log", "../../../publisher/private/signing.key", "."):
        refused = herald("logs", "--state", str(state), "alpha", wrong)
        assert refused.returncode == 2, refused.stdout
        assert "PRIVATE KEY" not in refused.stdout + refused.stderr

    link = f'<a href="/logs/alpha/{named}">{named}</a>'

    def linked() -> str | None:
        text = fetch_text(serve.http)[1]
        return text if link in text else None

    page_html = wait_until(linked, "the page links alpha's log")
    assert link in page_html.split('<tr id="host-alpha">')[1].split("</tr>")[0]
    with urllib.request.urlopen(f"{serve.http}logs/alpha/{named}", timeout=10) as response:  # noqa: S310
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert "stand-in rebuild" in response.read().decode()


def fetch_text(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_count_every_publish_however_started(fleet: Fleet, serve: Serve, state: Path):
    """`herald publish` (the git hook's way) counts in serve's /metrics like serve's own runs."""
    fleet.edit("alpha", "configuration.nix", "{ ... }: { version = 2; }\n")
    publish(fleet, state, serve)
    done = herald("publish", "--fleet", str(fleet.root), "--state", str(state))  # nothing changed
    assert done.returncode == 0, done.stderr
    text = fetch_text(serve.http + "metrics")[1]
    assert "herald_publish_runs_total 3.0" in text  # serve's on start, then two by herald publish
    assert "herald_publish_hosts_changed_total 4.0" in text  # 3 at start, then alpha
    assert "herald_publish_hosts_failed_total 0.0" in text
    last = float(re.search(r"^herald_publish_last_timestamp_seconds (\S+)$", text, re.MULTILINE)[1])
    assert abs(time.time() - last) < 60


def test_without_a_broker_the_page_shows_what_sftp_knows(
    fleet: Fleet, state: Path, logs: Path, tmp_path: Path
):
    """`herald serve --mqtt off`: the page shows each host's desired generation (its chroot) and
    its last run from the log it uploaded over SFTP, with a status that says so."""
    serve = start_serve(fleet, state, logs, mqtt="off")
    try:
        agent = make_agent(fleet, "alpha", serve, tmp_path)
        assert "[broker]" not in agent.config.read_text()
        assert agent.once().returncode == 0
        (log,) = [path.name for path in (state / "chroot" / "alpha" / "logs").glob("*.log")]

        def alpha_seen() -> list | None:
            rows = json.loads(fetch_text(serve.http + "status.json")[1])
            seen = any(row["host"] == "alpha" and row["status"] == "sftp only" for row in rows)
            return rows if seen else None

        rows = {row["host"]: row for row in wait_until(alpha_seen, "alpha seen over SFTP", timeout=20)}
        assert rows["beta"]["status"] == "never seen"
        assert rows["beta"]["desired"]["generation"] == 1
        html = fetch_text(serve.http)[1]
        row = html.split('<tr id="host-alpha">')[1].split("</tr>")[0]
        assert "<td>1</td>" in row  # desired, from the chroot
        assert '<td class="status-sftp-only">sftp only</td>' in row
        assert "applied generation 1 (its last log; no broker)" in row
        assert f'<a href="/logs/alpha/{log}">' in row
        assert "ago" in row.split("</td>")[5]  # last seen: its log
        assert fetch_text(f"{serve.http}logs/alpha/{log}")[0] == 200
    finally:
        serve.stop()
