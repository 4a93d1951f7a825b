"""The publisher on real files: generations, content addressing, refusals, and the CLI's errors."""

import json
import os
import socket
import stat
import sys
from pathlib import Path

import msgspec
import pytest
from helpers import Fleet, current_generation, herald, need, need_root, read_release

from protocol.errors import ConfigError
from protocol.release import Current, Manifest, decode_manifest, decode_public_key, verify_signature
from publisher.publish import Status, publish


def manifest(state: Path, host: str) -> Manifest:
    chroot = state / "chroot" / host
    current = Current.decode((chroot / "current").read_bytes())
    data, signature = read_release(state, host, current.generation)
    key = decode_public_key((chroot / "credentials" / "publisher.pub").read_text())
    verify_signature(data, signature, key)
    return decode_manifest(data, host=host, current=current)


def test_generations_grow_by_one_per_change_and_only_for_the_changed_host(fleet: Fleet, state: Path):
    first = publish(fleet.root, state)
    assert [(r.host, r.status, r.generation) for r in first.hosts] == [
        ("alpha", Status.CHANGED, 1),
        ("beta", Status.CHANGED, 1),
        ("gamma", Status.CHANGED, 1),
    ]
    for n in (2, 3):
        fleet.edit("alpha", "configuration.nix", f'{{ ... }}: {{ networking.hostName = "alpha{n}"; }}\n')
        report = publish(fleet.root, state)
        assert [(r.host, r.status) for r in report.hosts] == [
            ("alpha", Status.CHANGED),
            ("beta", Status.UNCHANGED),
            ("gamma", Status.UNCHANGED),
        ]
        assert report.hosts[0].modified == ("configuration.nix",)
        assert [current_generation(state, h) for h in fleet.hosts] == [n, 1, 1]
        assert manifest(state, "alpha").generation == n


def test_a_release_is_a_signed_manifest_over_objects_with_links_resolved(fleet: Fleet, state: Path):
    publish(fleet.root, state)
    release = manifest(state, "alpha")
    paths = {entry.path: entry for entry in release.content.files}
    assert {"configuration.nix", "common/base.nix", "common/users.nix", "files/etc/motd"} <= paths.keys()
    objects = state / "chroot" / "alpha" / "objects"
    for entry in release.content.files:
        assert (objects / entry.sha256).stat().st_size == entry.size
    assert (objects / paths["common/base.nix"].sha256).read_bytes() == (
        fleet.root / "common/base.nix"
    ).read_bytes()
    assert manifest(state, "gamma").content.flake == "gamma"
    assert release.content.flake is None


def test_a_shared_module_change_writes_one_object_and_one_release_per_host(fleet: Fleet, state: Path):
    publish(fleet.root, state)
    (fleet.root / "common" / "base.nix").write_text('{ ... }: { time.timeZone = "Europe/Paris"; }\n')
    report = publish(fleet.root, state)
    assert all(r.status is Status.CHANGED and r.objects_written == 1 for r in report.hosts)
    assert all(r.modified == ("common/base.nix",) for r in report.hosts)


def test_shared_content_is_one_file_linked_into_each_chroot_and_own_content_is_not_pooled(
    fleet: Fleet, state: Path
):
    publish(fleet.root, state)
    entries = {host: {e.path: e.sha256 for e in manifest(state, host).content.files} for host in fleet.hosts}
    shared = entries["alpha"]["common/base.nix"]
    inodes = {(state / "chroot" / host / "objects" / shared).stat().st_ino for host in fleet.hosts}
    assert inodes == {(state / "objects" / shared).stat().st_ino}  # one file, in the pool and every chroot
    own = entries["alpha"]["configuration.nix"]
    assert own not in entries["beta"].values()
    assert (state / "chroot" / "alpha" / "objects" / own).stat().st_nlink == 1
    assert not (state / "objects" / own).exists()


def test_files_are_private_unless_declared_and_the_configuration_keeps_its_mode(fleet: Fleet, state: Path):
    secret = fleet.root / "hosts" / "beta" / "files" / "etc" / "wifi.psk"
    secret.write_text("hunter2\n")
    secret.chmod(0o644)  # as a git clone leaves a file the sysadmin made 0600 (tests/test_file_modes.py)
    publish(fleet.root, state)
    modes = {entry.path: entry.mode for entry in manifest(state, "beta").content.files}
    assert modes["files/etc/wifi.psk"] == 0o600
    assert modes["files/etc/motd"] == 0o644  # the example fleet declares it
    assert modes["configuration.nix"] == 0o644


def test_nothing_changes_nothing_is_written(fleet: Fleet, state: Path):
    publish(fleet.root, state)
    before = {p: p.stat().st_mtime_ns for p in (state / "chroot").rglob("*")}
    report = publish(fleet.root, state, dry_run=False)
    assert {r.status for r in report.hosts} == {Status.UNCHANGED}
    assert {p: p.stat().st_mtime_ns for p in (state / "chroot").rglob("*")} == before


_SETTLED = 1_577_836_800  # 2020-01-01: far past the hash cache's margin, and the same every time


def _settle(root: Path) -> None:
    """Every file below root as if last written long ago (an unchanged file keeps its stat)."""
    for path in root.rglob("*"):
        if not path.is_symlink():
            os.utime(path, (_SETTLED, _SETTLED))


def test_settled_files_are_not_read_again_and_a_same_size_edit_or_a_setting_is_still_seen(
    fleet: Fleet, state: Path
):
    _settle(fleet.root)
    publish(fleet.root, state)
    again = publish(fleet.root, state)
    assert {r.status for r in again.hosts} == {Status.UNCHANGED}
    assert again.files_hashed == 0
    old = (fleet.root / "hosts/alpha/configuration.nix").read_text()
    fleet.edit("alpha", "configuration.nix", old.replace("alpha", "alphb"))  # same size, new mtime
    edited = publish(fleet.root, state)
    assert [(r.host, r.status, r.modified) for r in edited.hosts if r.status is not Status.UNCHANGED] == [
        ("alpha", Status.CHANGED, ("configuration.nix",))
    ]
    # beta's files are as they were: its setting alone must change its version
    toml = fleet.root / "fleet.toml"
    toml.write_text(toml.read_text().replace('operation = "boot"', 'operation = "test"'))  # beta's
    retuned = publish(fleet.root, state)
    assert [(r.host, r.status) for r in retuned.hosts if r.status is not Status.UNCHANGED] == [
        ("beta", Status.CHANGED)
    ]
    assert manifest(state, "beta").content.operation == "test"


def test_a_release_directory_of_the_earlier_layout_is_read_and_pruned_in_turn(fleet: Fleet, state: Path):
    publish(fleet.root, state)
    release = state / "chroot" / "alpha" / "releases" / "1"
    data, signature = read_release(state, "alpha", 1)
    release.unlink()
    release.mkdir()
    (release / "MANIFEST").write_bytes(data)
    (release / "MANIFEST.sig").write_bytes(signature)
    for n in range(2, 5):  # three more releases: generation 1 is past the three kept
        fleet.edit("alpha", "configuration.nix", f"{{ ... }}: {{ n = {n}; }}\n")
        report = publish(fleet.root, state)
        assert report.hosts[0].status is Status.CHANGED
        assert report.hosts[0].modified == ("configuration.nix",)  # diffed against the old layout too
    assert sorted(p.name for p in release.parent.iterdir()) == ["2", "3", "4"]


def test_dry_run_writes_nothing_and_names_the_files(fleet: Fleet, state: Path):
    publish(fleet.root, state)
    fleet.edit("beta", "files/etc/issue", "new file\n")
    before = sorted(str(p) for p in state.rglob("*"))
    report = publish(fleet.root, state, dry_run=True)
    assert sorted(str(p) for p in state.rglob("*")) == before
    beta = next(r for r in report.hosts if r.host == "beta")
    assert (beta.status, beta.added, beta.generation) == (Status.CHANGED, ("files/etc/issue",), 2)


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda d: (d / "escape").symlink_to("/etc/hostname"), "symlink leaves the fleet repository"),
        (lambda d: (d / "dangling").symlink_to(d / "nowhere"), "dangling symlink"),
        (lambda d: os.mkfifo(d / "pipe"), "FIFO files cannot be released"),
        (lambda d: (d / "loop").symlink_to(".."), "symlink cycle"),
    ],
    ids=["escape", "dangling", "fifo", "cycle"],
)
def test_a_host_with_a_bad_file_keeps_its_release_and_the_others_publish(
    fleet: Fleet, state: Path, make, why
):
    publish(fleet.root, state)
    fleet.edit("alpha", "configuration.nix", "{ ... }: { }\n")
    fleet.edit("beta", "configuration.nix", "{ ... }: { }\n")
    make(fleet.root / "hosts" / "alpha")
    report = publish(fleet.root, state)
    alpha, beta, _ = report.hosts
    assert alpha.status is Status.FAILED
    assert why in alpha.message
    assert alpha.message.startswith("host alpha: ")
    assert beta.status is Status.CHANGED
    assert [current_generation(state, h) for h in fleet.hosts] == [1, 2, 1]


def test_a_device_file_is_refused(fleet: Fleet, state: Path):
    need_root()
    os.mknod(fleet.root / "hosts" / "beta" / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    report = publish(fleet.root, state)
    assert (report.hosts[1].status, report.hosts[1].message) == (
        Status.FAILED,
        "host beta: null: device files cannot be released",
    )


def test_a_socket_is_refused(fleet: Fleet, state: Path):
    path = fleet.root / "hosts" / "gamma" / "sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        report = publish(fleet.root, state)
    gamma = report.hosts[2]
    assert (gamma.status, gamma.message) == (
        Status.FAILED,
        "host gamma: sock: socket files cannot be released",
    )


def test_git_metadata_is_not_released(fleet: Fleet, state: Path):
    (fleet.root / "hosts" / "alpha" / ".git").mkdir()
    (fleet.root / "hosts" / "alpha" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    publish(fleet.root, state)
    assert not any(".git" in e.path for e in manifest(state, "alpha").content.files)


@pytest.mark.parametrize(
    ("break_it", "expected"),
    [
        (lambda f: (f / "fleet.toml").write_text("[hosts.alpha\n"), "fleet.toml: invalid TOML"),
        (
            lambda f: (f / "fleet.toml").write_text((f / "fleet.toml").read_text() + "colour = 'red'\n"),
            "fleet.toml: hosts.gamma: Object contains unknown field `colour`",
        ),
        (
            lambda f: (f / "fleet.toml").write_text(
                (f / "fleet.toml").read_text().replace('operation = "boot"', 'operation = "reboot"')
            ),
            "fleet.toml: hosts.beta.operation: Invalid enum value 'reboot'",
        ),
        (
            lambda f: (f / "hosts" / "delta").mkdir(),
            "hosts.delta: hosts/delta/ exists but fleet.toml has no entry",
        ),
        (
            lambda f: (f / "hosts" / "beta" / "configuration.nix").unlink(),
            "hosts/beta: no configuration.nix or flake.nix",
        ),
    ],
    ids=["syntax", "unknown-field", "bad-operation", "unlisted-host", "no-configuration"],
)
def test_a_broken_fleet_is_one_line_exit_2_and_nothing_published(
    fleet: Fleet, state: Path, break_it, expected
):
    break_it(fleet.root)
    done = herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--init")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert expected in lines[0]
    assert "Traceback" not in done.stderr
    assert not (state / "chroot").exists()


def test_the_inventory_error_names_file_and_host(fleet: Fleet):
    (fleet.root / "fleet.toml").write_text('[hosts.alpha]\nssh_key = "ssh-ed25519 AAAA"\n')
    with pytest.raises(ConfigError, match=r"fleet\.toml: hosts\.alpha: ssh_key: "):
        publish(fleet.root, fleet.root.parent / "state")


def test_the_publisher_key_is_private_and_generations_survive_a_wiped_chroot(fleet: Fleet, state: Path):
    publish(fleet.root, state)
    assert (state / "publisher" / "private" / "signing.key").stat().st_mode & 0o777 == 0o600
    assert (state / "broker" / "passwd").stat().st_mode & 0o777 == 0o600
    for secret in (state / "broker").glob("*.secret"):
        assert secret.stat().st_mode & 0o777 == 0o600, secret
    for path in (state / "chroot" / "alpha").rglob("*"):
        if path.is_file():
            path.unlink()
    report = publish(fleet.root, state)
    assert report.hosts[0].generation == 2  # an agent at generation 1 would refuse a new generation 1
    data = msgspec.json.decode((state / "publisher" / "generations.json").read_bytes())
    assert data["hosts"]["alpha"] == 2


def test_a_host_whose_nix_does_not_parse_keeps_its_release_and_the_others_publish(fleet: Fleet, state: Path):
    need("nix-instantiate")
    publish(fleet.root, state)
    fleet.edit("alpha", "configuration.nix", "{ ... }: { networking.hostName = ; }\n")
    fleet.edit("beta", "configuration.nix", '{ ... }: { networking.hostName = "beta2"; }\n')
    done = herald("publish", "--fleet", str(fleet.root), "--state", str(state))
    assert done.returncode == 1
    assert "syntax error" in done.stdout
    assert "alpha" in done.stdout.split("syntax error")[0].splitlines()[-1]
    assert [current_generation(state, h) for h in fleet.hosts] == [1, 2, 1]
    assert not (state / "chroot" / "alpha" / "releases" / "2").exists()


def test_a_shared_module_that_does_not_parse_fails_every_host(fleet: Fleet, state: Path):
    need("nix-instantiate")
    publish(fleet.root, state)
    (fleet.root / "common" / "users.nix").write_text("{ ... }: { users = [ ; }\n")
    report = publish(fleet.root, state)
    assert [r.status for r in report.hosts] == [Status.FAILED] * 3
    assert all("common/users.nix" in r.message for r in report.hosts)
    assert [current_generation(state, h) for h in fleet.hosts] == [1, 1, 1]


def with_publish_settings(fleet: Fleet, text: str) -> None:
    toml = fleet.root / "fleet.toml"
    toml.write_text(f"[publish]\n{text}\n\n" + toml.read_text())


def test_a_configured_check_runs_on_the_release_tree_and_can_refuse(
    fleet: Fleet, state: Path, tmp_path: Path
):
    seen = tmp_path / "seen"
    script = (
        f"test -f {{release}}/common/base.nix && echo {{host}} {{flake}} >> {seen} && test {{host}} != beta"
    )
    with_publish_settings(fleet, f"check = ['sh', '-c', '{script}']")
    report = publish(fleet.root, state)
    assert [r.status for r in report.hosts] == [Status.CHANGED, Status.FAILED, Status.CHANGED]
    assert sorted(seen.read_text().splitlines()) == ["alpha alpha", "beta beta", "gamma gamma"]
    assert current_generation(state, "beta") == 0


def test_a_failing_build_is_not_published(fleet: Fleet, state: Path):
    with_publish_settings(fleet, "check = []\nbuild = ['sh', '-c', 'echo cannot build {host} >&2; exit 3']")
    report = publish(fleet.root, state)
    assert {r.status for r in report.hosts} == {Status.FAILED}
    assert report.hosts[0].message == "check failed: cannot build alpha"
    assert not (state / "chroot" / "alpha" / "current").exists()


def test_dry_run_reports_a_host_that_would_fail_its_check(fleet: Fleet, state: Path):
    with_publish_settings(fleet, "check = ['false']")
    report = publish(fleet.root, state, dry_run=True)
    assert {r.status for r in report.hosts} == {Status.FAILED}
    assert not state.exists()


def test_a_failing_checks_long_lines_are_cut(fleet: Fleet, state: Path):
    """A check that fails with a line of tens of KB (a parse error quoting a long string):
    `herald publish` prints each of its lines cut to a few hundred characters."""
    code = "import sys; print('error: syntax error'); print('at {host}: ' + 'x' * 50000); sys.exit(1)"
    with_publish_settings(fleet, f"check = [{json.dumps(sys.executable)}, '-c', \"{code}\"]")
    state.mkdir()
    done = herald("publish", "--fleet", str(fleet.root), "--state", str(state))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "alpha: at alpha: xxx" in done.stdout
    assert "... (49710 more characters)" in done.stdout
    assert max(len(line) for line in (done.stdout + done.stderr).splitlines()) < 1000
