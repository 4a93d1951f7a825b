"""Modes that survive git: a file of files/ is private unless fleet.toml declares its mode.

git keeps only the executable bit, so the publisher takes nothing else from the checkout: a
secret chmod 0600 by the sysadmin arrives 0644 in the clone the post-receive hook publishes from,
and must still be served readable only by its host and installed 0600.
"""

import os
import pwd
import re
import subprocess
import textwrap
import tomllib
from pathlib import Path

import pytest
from helpers import REPO, Agent, Fleet, Serve, current_generation, herald, make_agent, need, start_serve

from protocol.errors import ConfigError
from protocol.release import Current, Manifest, decode_manifest, decode_public_key, split_release
from protocol.settings import FleetConfig, convert
from publisher.materialise import Source
from publisher.modes import FileModes, decide, fleet_modes
from publisher.publish import Status, publish

PSK = "psk=hunter2\n"
CA = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
_SETTLED = 1_577_836_800  # far past the hash cache's margin: the tree cache is trusted


def git(*args: str, cwd: Path) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=Sysadmin", "-c", "user.email=admin@fleet.example", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def pushed(root: Path) -> None:
    """Commit what the test changed in the server's clone, as a push the hook checked out: a
    publish reads the commit HEAD names, and refuses a work tree with changes not committed."""
    git("add", "-A", cwd=root)
    git("commit", "-q", "--allow-empty", "-m", "change", cwd=root)


def settle(root: Path) -> None:
    for path in root.rglob("*"):
        if not path.is_symlink():
            os.utime(path, (_SETTLED, _SETTLED))


def released(state: Path, host: str) -> Manifest:
    chroot = state / "chroot" / host
    current = Current.decode((chroot / "current").read_bytes())
    data, _ = split_release((chroot / "releases" / str(current.generation)).read_bytes())
    decode_public_key((chroot / "credentials" / "publisher.pub").read_text())
    return decode_manifest(data, host=host, current=current)


def modes_of(state: Path, host: str) -> dict[str, int]:
    return {entry.path: entry.mode for entry in released(state, host).content.files}


def sha_of(state: Path, host: str, path: str) -> str:
    return next(e.sha256 for e in released(state, host).content.files if e.path == path)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


@pytest.fixture
def sysadmin(tmp_path: Path) -> Fleet:
    """The sysadmin's checkout: the example fleet plus a secret, scripts and certificates."""
    fleet = Fleet.create(tmp_path)
    for host in ("alpha", "beta"):
        files = fleet.root / "hosts" / host / "files"
        write(files / "etc" / "wifi.psk", PSK, 0o600)  # the same secret on two hosts
        write(files / "etc" / "ssl" / "certs" / "ca.pem", CA, 0o644)  # the same public file
    beta = fleet.root / "hosts" / "beta" / "files"
    write(beta / "usr" / "local" / "bin" / "backup", "#!/bin/sh\n", 0o700)
    write(beta / "usr" / "local" / "bin" / "hello", "#!/bin/sh\necho hello\n", 0o755)
    with (fleet.root / "fleet.toml").open("a") as toml:
        toml.write('\n[hosts.alpha.files]\n"etc/ssl/certs/" = "0644"\n')
        toml.write('\n[hosts.beta.files]\n"etc/ssl/certs/" = "0644"\n"usr/local/bin/hello" = "0755"\n')
    return fleet


@pytest.fixture
def fleet(sysadmin: Fleet, tmp_path: Path) -> Fleet:
    """What the server publishes from: a clone of what the sysadmin pushed, as deploy/git/post-receive
    keeps it (conftest's sftp_server publishes this one)."""
    need("git")
    git("init", "-q", "-b", "main", cwd=sysadmin.root)
    git("add", "-A", cwd=sysadmin.root)
    git("commit", "-q", "-m", "fleet", cwd=sysadmin.root)
    bare = tmp_path / "fleet.git"
    git("clone", "-q", "--bare", str(sysadmin.root), str(bare), cwd=tmp_path)
    worktree = tmp_path / "worktree"
    git("clone", "-q", str(bare), str(worktree), cwd=tmp_path)
    secret = worktree / "hosts" / "beta" / "files" / "etc" / "wifi.psk"
    assert mode(secret) == 0o644  # what git did to the sysadmin's 0600: the finding itself
    return Fleet(worktree, sysadmin.keys)


@pytest.fixture
def agent_beta(fleet: Fleet, sftp_server: Serve, tmp_path: Path) -> Agent:
    return make_agent(fleet, "beta", sftp_server, tmp_path)


# ---------------------------------------------------------------- through git, to the host


def test_a_secret_pushed_through_git_is_private_on_the_server_and_0600_on_the_host(
    fleet: Fleet, state: Path, sftp_server: Serve, agent_beta: Agent
):
    beta = modes_of(state, "beta")
    assert beta["files/etc/wifi.psk"] == 0o600  # undeclared: private, whatever the clone says
    assert beta["files/usr/local/bin/backup"] == 0o700  # undeclared and executable
    assert beta["files/usr/local/bin/hello"] == 0o755  # declared for beta
    assert beta["files/etc/ssl/certs/ca.pem"] == 0o644  # a declared directory
    assert beta["files/etc/motd"] == 0o644  # declared fleet-wide by the example fleet
    assert beta["configuration.nix"] == 0o644  # outside files/: as the checkout has it

    secret = sha_of(state, "beta", "files/etc/wifi.psk")
    assert secret == sha_of(state, "alpha", "files/etc/wifi.psk")  # shared content, still not pooled
    for host in ("alpha", "beta"):
        stored = state / "chroot" / host / "objects" / secret
        assert mode(stored) == 0o640
        assert stored.stat().st_nlink == 1
    assert not (state / "objects" / secret).exists()
    if sftp_server.mqtt == "":  # OpenSSH: the publisher ran as root and gave it to beta's group
        stored = state / "chroot" / "beta" / "objects" / secret
        assert (stored.stat().st_uid, stored.stat().st_gid) == (0, pwd.getpwnam("beta").pw_gid)

    public = sha_of(state, "beta", "files/etc/ssl/certs/ca.pem")
    assert mode(state / "chroot" / "beta" / "objects" / public) == 0o644
    assert (state / "objects" / public).stat().st_ino == (
        state / "chroot" / "beta" / "objects" / public
    ).stat().st_ino  # declared public and released by two hosts: one file in the pool

    done = agent_beta.once()
    assert done.returncode == 0, done.stdout + done.stderr
    root = agent_beta.home / "root"
    assert mode(root / "etc" / "wifi.psk") == 0o600
    assert (root / "etc" / "wifi.psk").read_text() == PSK
    assert mode(root / "usr" / "local" / "bin" / "backup") == 0o700
    assert mode(root / "usr" / "local" / "bin" / "hello") == 0o755
    assert mode(root / "etc" / "ssl" / "certs" / "ca.pem") == 0o644
    assert mode(root / "etc" / "motd") == 0o644


def test_changing_only_a_declared_mode_is_a_new_generation_that_the_agent_applies(
    fleet: Fleet, state: Path, logs: Path, tmp_path: Path
):
    settle(fleet.root)  # every file trusted by the hash cache: only fleet.toml moves below
    server = start_serve(fleet, state, logs)
    try:
        agent = make_agent(fleet, "beta", server, tmp_path)
        assert agent.once().returncode == 0
        motd = agent.home / "root" / "etc" / "motd"
        assert mode(motd) == 0o644
        settle(state / "publisher" / "tree")  # the commit as published, trusted by the hash cache
        publish(fleet.root, state)
        again = publish(fleet.root, state)
        assert {r.status for r in again.hosts} == {Status.UNCHANGED}
        assert again.files_hashed == 0

        toml = fleet.root / "fleet.toml"
        toml.write_text(toml.read_text().replace('"etc/motd" = "0644"', '"etc/motd" = "0640"', 1))
        pushed(fleet.root)
        dry = herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "files/etc/motd 0644 -> 0640" in dry.stderr
        assert [current_generation(state, host) for host in fleet.hosts] == [1, 1, 1]

        report = publish(fleet.root, state)
        assert [(r.host, r.status, r.generation) for r in report.hosts] == [
            ("alpha", Status.CHANGED, 2),
            ("beta", Status.CHANGED, 2),
            ("gamma", Status.CHANGED, 2),
        ]
        assert report.hosts[1].modified == ("files/etc/motd",)
        assert report.hosts[1].modes == ("files/etc/motd 0644 -> 0640",)
        assert modes_of(state, "beta")["files/etc/motd"] == 0o640
        assert agent.once().returncode == 0
        assert agent.deployed() == 2
        assert mode(motd) == 0o640
    finally:
        server.stop()


def test_content_that_turns_private_is_stored_again_readable_only_by_its_host(fleet: Fleet, state: Path):
    publish(fleet.root, state)
    cert = sha_of(state, "beta", "files/etc/ssl/certs/ca.pem")
    assert (state / "chroot" / "beta" / "objects" / cert).stat().st_nlink > 1  # linked to the pool
    toml = fleet.root / "fleet.toml"
    toml.write_text(toml.read_text().replace('"etc/ssl/certs/" = "0644"\n', ""))
    pushed(fleet.root)
    report = publish(fleet.root, state)
    assert [r.status for r in report.hosts] == [Status.CHANGED, Status.CHANGED, Status.UNCHANGED]
    for host in ("alpha", "beta"):
        assert modes_of(state, host)["files/etc/ssl/certs/ca.pem"] == 0o600
        stored = state / "chroot" / host / "objects" / cert
        assert mode(stored) == 0o640
        assert stored.stat().st_nlink == 1


# ---------------------------------------------------------------- the first publish after upgrading


def test_world_readable_files_turning_private_are_named_in_one_warning_once(fleet: Fleet, state: Path):
    toml = fleet.root / "fleet.toml"
    toml.write_text(re.sub(r'^"etc/motd" = .*\n', "", toml.read_text(), count=1, flags=re.MULTILINE))
    pushed(fleet.root)
    argv = ("publish", "--fleet", str(fleet.root), "--state", str(state), "--init")
    dry = herald(*argv, "--dry-run")
    first = herald(*argv)
    second = herald(*argv)
    assert (dry.returncode, first.returncode, second.returncode) == (0, 0, 0), first.stderr
    for done in (dry, first):
        warnings = [line for line in done.stderr.splitlines() if "turn private" in line]
        assert len(warnings) == 1, done.stderr
        assert "etc/motd (alpha, beta, gamma)" in warnings[0]
        assert "etc/wifi.psk (alpha, beta)" in warnings[0]  # 0644 in the clone too: said once
        assert '[files] "etc/motd" = "0644"' in warnings[0]
    assert "turn private" not in second.stderr
    assert modes_of(state, "gamma")["files/etc/motd"] == 0o600


# ---------------------------------------------------------------- declarations that are refused


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('"etc/motd" = "0644"', '"etc/motd" = "999"', 'fleet.toml: files: "etc/motd" = "999": '),
        ('"etc/motd" = "0644"', '"etc/motd" = "04755"', 'fleet.toml: files: "etc/motd" = "04755": '),
        ('"etc/motd" = "0644"', '"etc/motd" = 644', 'fleet.toml: files: "etc/motd" = 644: '),
        ('"etc/motd" = "0644"', '"../configuration.nix" = "0644"', 'files: "../configuration.nix": '),
        ('"etc/motd" = "0644"', '"/etc/motd" = "0644"', 'fleet.toml: files: "/etc/motd": '),
        ('"etc/motd" = "0644"', '"etc/*.conf" = "0644"', 'fleet.toml: files: "etc/*.conf": '),
        ('"etc/motd" = "0644"', '"etc/motdd" = "0644"', 'files: "etc/motdd" matches no file of any host'),
        (
            '"usr/local/bin/hello" = "0755"',
            '"usr/local/bin/helo" = "0755"',
            'hosts.beta.files: "usr/local/bin/helo" matches no file in hosts/beta/files/',
        ),
        (
            '"usr/local/bin/hello" = "0755"',
            '"usr/local/bin/../../../../x" = "0755"',
            'hosts.beta: files: "usr/local/bin/../../../../x": ',
        ),
    ],
    ids=[
        "not-octal",
        "setuid",
        "integer",
        "dotdot",
        "absolute",
        "glob",
        "fleet-unmatched",
        "host-unmatched",
        "host-dotdot",
    ],
)
def test_a_bad_declaration_is_one_line_exit_2_and_nothing_published(
    fleet: Fleet, state: Path, old: str, new: str, expected: str
):
    toml = fleet.root / "fleet.toml"
    text = toml.read_text()
    assert old in text
    toml.write_text(text.replace(old, new, 1))
    pushed(fleet.root)
    done = herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--init")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert expected in lines[0]
    assert "Traceback" not in done.stderr
    assert not (state / "chroot").exists()


def test_an_unmatched_declaration_is_refused_also_when_every_host_is_unchanged(fleet: Fleet, state: Path):
    settle(fleet.root)
    publish(fleet.root, state)
    (fleet.root / "hosts" / "beta" / "files" / "usr" / "local" / "bin" / "hello").unlink()
    pushed(fleet.root)
    with pytest.raises(ConfigError, match=r'hosts\.beta\.files: "usr/local/bin/hello" matches no file'):
        publish(fleet.root, state)
    assert current_generation(state, "beta") == 1
    toml = fleet.root / "fleet.toml"
    toml.write_text(toml.read_text().replace('"usr/local/bin/hello" = "0755"\n', ""))
    pushed(fleet.root)
    publish(fleet.root, state)
    (fleet.root / "hosts" / "alpha" / "files" / "etc" / "motd").unlink()
    (fleet.root / "hosts" / "beta" / "files" / "etc" / "motd").unlink()
    pushed(fleet.root)
    publish(fleet.root, state)  # gamma still has one: the fleet-wide declaration names a file
    (fleet.root / "hosts" / "gamma" / "files" / "etc" / "motd").unlink()
    pushed(fleet.root)
    with pytest.raises(ConfigError, match=r'files: "etc/motd" matches no file of any host'):
        publish(fleet.root, state)


# ---------------------------------------------------------------- the mode logic, as tables

S = Source  # path, real, mode, size, mtime_ns, inode


@pytest.mark.parametrize(
    ("declared", "path", "checkout", "expected"),
    [
        ({}, "etc/motd", 0o644, 0o600),  # private by default, whatever git left
        ({}, "etc/wifi.psk", 0o600, 0o600),
        ({}, "usr/bin/tool", 0o755, 0o700),  # the executable bit is the one thing git keeps
        ({}, "usr/bin/tool", 0o744, 0o700),
        ({}, "usr/bin/tool", 0o654, 0o600),  # only the owner's x bit is what git records
        ({"etc/motd": 0o644}, "etc/motd", 0o600, 0o644),
        ({"etc/motd": 0o644}, "etc/motd.d/x", 0o644, 0o600),  # an exact path is not a prefix
        ({"etc/": 0o644}, "etc/a/b/c", 0o644, 0o644),  # a directory: everything below it
        ({"etc/": 0o644}, "etcetera/x", 0o644, 0o600),  # by directory, not by string prefix
        ({"etc/": 0o644, "etc/ssh/": 0o600}, "etc/ssh/host_key", 0o644, 0o600),  # deeper wins
        ({"etc/": 0o644, "etc/ssh/": 0o600}, "etc/hosts", 0o644, 0o644),
        ({"etc/ssh/": 0o600, "etc/ssh/key.pub": 0o644}, "etc/ssh/key.pub", 0o600, 0o644),  # exact wins
        ({"opt/": 0o644}, "opt/run", 0o755, 0o755),  # x added where the mode reads
        ({"opt/": 0o640}, "opt/run", 0o755, 0o750),
        ({"opt/": 0o600}, "opt/run", 0o700, 0o700),
        ({"opt/": 0o755}, "opt/data", 0o644, 0o755),  # a declared x bit is kept
        ({"opt/": 0o000}, "opt/run", 0o755, 0o000),
    ],
)
def test_the_mode_a_file_is_released_with(declared: dict[str, int], path: str, checkout: int, expected: int):
    modes = FileModes(declared)
    assert decide([S(f"files/{path}", "/x", checkout, 1, 0, 1)], modes)[0] == [expected]


def test_files_outside_files_keep_their_checkout_mode_and_are_not_matched():
    modes = FileModes({"etc/": 0o644})
    sources = [
        S("configuration.nix", "/a", 0o644, 1, 0, 1),
        S("etc/x", "/b", 0o600, 1, 0, 2),  # not below files/: no declaration applies
        S("files/etc/motd", "/c", 0o644, 1, 0, 3),
        S("files/etc/ssl/ca.pem", "/d", 0o644, 1, 0, 4),
        S("files/root/.ssh/key", "/e", 0o644, 1, 0, 5),
        S("run.sh", "/f", 0o755, 1, 0, 6),
    ]
    decided, matched, defaulted = decide(sources, modes)
    assert decided == [0o644, 0o600, 0o644, 0o644, 0o600, 0o755]
    assert matched == {"etc/"}
    assert defaulted == ["files/root/.ssh/key"]  # world-readable in the checkout, private by default


@pytest.mark.parametrize(
    ("fleet_wide", "own", "path", "expected"),
    [
        ({"etc/motd": "0644"}, {}, "etc/motd", 0o644),
        ({"etc/motd": "0644"}, {"etc/motd": "0600"}, "etc/motd", 0o600),  # the host's own wins
        ({"etc/motd": "0644"}, {"etc/": "0600"}, "etc/motd", 0o644),  # the more specific wins
        ({"etc/motd": "0644"}, {"etc/": "0600"}, "etc/issue", 0o600),
        ({"etc/": "0644"}, {"etc/shadow": "0640"}, "etc/shadow", 0o640),
        ({"etc/": "644"}, {}, "etc/issue", 0o644),  # three digits are the same mode
    ],
)
def test_fleet_wide_and_host_declarations_merge(
    fleet_wide: dict[str, str], own: dict[str, str], path: str, expected: int
):
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHK34Bzn9gNgVOrZLidf7fD8kMH9PVjKWq3OgDqFGd0Q root@alpha"
    config = convert(
        {"files": fleet_wide, "hosts": {"alpha": {"ssh_key": key, "files": own}}}, FleetConfig, source="t"
    )
    modes = fleet_modes(config)["alpha"]
    assert decide([S(f"files/{path}", "/x", 0o644, 1, 0, 1)], modes)[0] == [expected]


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"etc/motd": "999"}, 'files: "etc/motd" = "999": expected an octal mode'),
        ({"etc/motd": "04755"}, 'files: "etc/motd" = "04755": expected an octal mode'),
        ({"etc/motd": "1777"}, 'files: "etc/motd" = "1777": expected an octal mode'),
        ({"etc/motd": "0o644"}, 'files: "etc/motd" = "0o644": expected an octal mode'),
        ({"etc/motd": "rw-r--r--"}, 'files: "etc/motd" = "rw-r--r--": expected an octal mode'),
        ({"etc/motd": 644}, 'files: "etc/motd" = 644: write the mode as a string'),
        ({"": "0644"}, 'files: "": '),
        ({"/": "0644"}, 'files: "/": '),
        ({"./etc/motd": "0644"}, 'files: "./etc/motd": '),
        ({"etc//motd": "0644"}, 'files: "etc//motd": '),
        ({"etc/..": "0644"}, 'files: "etc/..": '),
        ({"etc\\motd": "0644"}, 'files: "etc\\\\motd": '),
        ({"etc/[a-z]*": "0644"}, 'files: "etc/[a-z]*": '),
    ],
)
def test_a_bad_declaration_is_refused_at_load_naming_it(files: dict[str, object], message: str):
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHK34Bzn9gNgVOrZLidf7fD8kMH9PVjKWq3OgDqFGd0Q root@alpha"
    with pytest.raises(ConfigError) as raised:
        convert({"files": files, "hosts": {"alpha": {"ssh_key": key}}}, FleetConfig, source="fleet.toml")
    assert f"fleet.toml: {message}" in str(raised.value)
    assert "\n" not in str(raised.value)


def test_the_readme_example_of_declarations_is_a_valid_fleet_toml():
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Modes of files/", 1)[1]
    block = textwrap.dedent(section.split("```toml\n", 1)[1].split("```", 1)[0])
    data = tomllib.loads(block)
    data["hosts"]["alpha"]["ssh_key"] = (
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHK34Bzn9gNgVOrZLidf7fD8kMH9PVjKWq3OgDqFGd0Q root@alpha"
    )
    modes = fleet_modes(convert(data, FleetConfig, source="README.md"))["alpha"]
    sources = [
        S("files/etc/ssl/certs/internal.pem", "/a", 0o644, 1, 0, 1),
        S("files/etc/motd", "/b", 0o644, 1, 0, 2),
    ]
    assert decide(sources, modes)[0] == [0o640, 0o644]
