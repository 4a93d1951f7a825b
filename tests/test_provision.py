"""`herald server provision`: users, chroot ownership and the sshd fragment, idempotent, with a dry run."""

import pwd
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import Fleet, herald, need, need_root
from openssh import provision

from bench.fleetgen import host_key
from publisher.provision import sshd_fragment


def users_exist(*names: str) -> list[bool]:
    found = []
    for name in names:
        try:
            pwd.getpwnam(name)
            found.append(True)
        except KeyError:
            found.append(False)
    return found


def test_a_dry_run_lists_every_change_and_makes_none(fleet: Fleet, state: Path, tmp_path: Path):
    need_root()
    need("unshare")
    tmp_path.chmod(0o755)
    before = users_exist("alpha", "beta", "gamma")
    done = provision(fleet, state, tmp_path, dry_run=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    if not before[0]:
        assert "would create system user alpha (group alpha, no login shell, key login only)" in lines
    assert "would create /mnt/herald/state/chroot/alpha/logs (alpha:alpha 0750)" in lines
    assert "would create /mnt/herald/state/chroot/alpha/credentials (root:alpha 0750)" in lines
    assert any(
        line.startswith("would write /mnt/herald/state/ssh/sshd_config (root:root 0644)") for line in lines
    )
    assert not (state / "chroot").exists()
    assert users_exist("alpha", "beta", "gamma") == before


def test_provisioning_twice_changes_nothing_the_second_time(fleet: Fleet, state: Path, tmp_path: Path):
    need_root()
    tmp_path.chmod(0o755)
    first = provision(fleet, state, tmp_path)
    assert first.returncode == 0, first.stderr
    assert "add `Include /mnt/herald/state/ssh/sshd_config` at its end" in first.stderr
    assert herald("publish", "--fleet", str(fleet.root), "--state", str(state)).returncode == 0
    second = provision(fleet, state, tmp_path)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "nothing to change"

    account = pwd.getpwnam("alpha")
    assert (account.pw_shell, account.pw_gecos) == ("/usr/sbin/nologin", "herald host")
    logs = (state / "chroot" / "alpha" / "logs").stat()
    assert (logs.st_uid, logs.st_gid, logs.st_mode & 0o777) == (account.pw_uid, account.pw_gid, 0o750)
    secret = (state / "chroot" / "alpha" / "credentials" / "broker.secret").stat()
    assert (secret.st_uid, secret.st_gid, secret.st_mode & 0o777) == (0, account.pw_gid, 0o640)
    fragment = (state / "ssh" / "sshd_config").read_text()
    assert "Match User alpha,beta,gamma\n" in fragment
    assert "    ChrootDirectory /mnt/herald/state/chroot/%u\n" in fragment
    assert "    ForceCommand internal-sftp -P symlink,hardlink -u 0027\n" in fragment
    assert "    AllowTcpForwarding no\n" in fragment


def add_host(fleet: Fleet, name: str) -> None:
    """A host `name` in fleet.toml and hosts/, with a key of its own that nobody holds (enough
    for provisioning; fleet.toml refuses a key two hosts share)."""
    (fleet.root / "hosts" / name).mkdir()
    (fleet.root / "hosts" / name / "configuration.nix").write_text("{ ... }: { }\n")
    toml = fleet.root / "fleet.toml"
    toml.write_text(toml.read_text() + f'\n[hosts.{name}]\nssh_key = "{host_key(name)}"\n')


@contextmanager
def system(*create: list[str], remove: list[list[str]]) -> Iterator[None]:
    """Run the `create` commands (useradd, groupadd...), and the `remove` ones afterwards."""
    try:
        for argv in create:
            subprocess.run(argv, check=True, capture_output=True)
        yield
    finally:
        for argv in remove:
            subprocess.run(argv, check=False, capture_output=True)


@pytest.mark.parametrize("name", ["root", "wheel", "users", "nogroup", "sshd", "systemd-network", "nixbld7"])
def test_a_host_named_as_a_system_user_or_group_is_refused_at_load(fleet: Fleet, state: Path, name: str):
    """A host named `wheel` (or root, users, nixbld7...) would have its user join, or be, the
    system's: on NixOS `users.groups = genAttrs hosts` merges it into the real group. fleet.toml
    is refused when read, with one line naming the host and why, and nothing is published."""
    add_host(fleet, name)
    done = herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--init")
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert f"hosts.{name}: '{name}' is a system user or group on NixOS or Debian" in line
    assert "rename the host" in line
    assert not (state / "chroot").exists()


def test_an_existing_account_of_the_same_name_is_never_taken_over(fleet: Fleet, state: Path, tmp_path: Path):
    need_root()
    tmp_path.chmod(0o755)
    add_host(fleet, "h16taken")
    create = ["useradd", "--system", "--no-create-home", "--comment", "someone else", "h16taken"]
    with system(create, remove=[["userdel", "h16taken"]]):
        done = provision(fleet, state, tmp_path)
    assert done.returncode == 2
    assert "herald: user h16taken exists and is not a herald host" in done.stderr
    assert not (state / "ssh" / "sshd_config").exists()


def test_an_existing_group_of_the_same_name_is_never_taken_over(fleet: Fleet, state: Path, tmp_path: Path):
    """A group of the host's name that herald did not create (only a user was checked before:
    useradd then failed half-way through the plan): refused in the plan, a dry run included,
    before anything changes."""
    need_root()
    tmp_path.chmod(0o755)
    add_host(fleet, "h16group")
    with system(["groupadd", "--system", "h16group"], remove=[["groupdel", "h16group"]]):
        dry = provision(fleet, state, tmp_path, dry_run=True)
        done = provision(fleet, state, tmp_path)
    for run in (dry, done):
        assert run.returncode == 2, run.stdout + run.stderr
        (line,) = run.stderr.strip().splitlines()
        assert "herald: group h16group exists" in line
        assert "herald did not create it; rename the host" in line
    assert users_exist("h16group") == [False]
    assert not (state / "chroot").exists()


def test_a_hosts_group_with_other_members_is_refused(fleet: Fleet, state: Path, tmp_path: Path):
    """Someone added a user to a host's group (root:<host> 0750 credentials/): that user reads
    the host's broker secret. Provisioning again refuses, naming the member."""
    need_root()
    tmp_path.chmod(0o755)
    add_host(fleet, "h16member")
    cleanup = [["gpasswd", "-d", "daemon", "h16member"], ["userdel", "h16member"], ["groupdel", "h16member"]]
    with system(remove=cleanup):
        first = provision(fleet, state, tmp_path)
        assert first.returncode == 0, first.stdout + first.stderr
        subprocess.run(["gpasswd", "-a", "daemon", "h16member"], check=True, capture_output=True)
        again = provision(fleet, state, tmp_path)
    assert again.returncode == 2
    (line,) = again.stderr.strip().splitlines()
    assert "herald: group h16member has members (daemon), who could read h16member's credentials" in line


def test_a_state_directory_under_tmp_is_refused_with_the_reason(fleet: Fleet, state: Path):
    need_root()
    done = herald("server", "provision", "--fleet", str(fleet.root), "--state", str(state), "--dry-run")
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "OpenSSH chroots need every directory above them owned by root" in line
    assert "outside /tmp" in line


def test_the_requests_the_fragment_refuses_are_named_as_this_openssh_names_them():
    """`internal-sftp -P` takes request names as `sftp-server -Q requests` lists them (9.2:
    'symlink', 'hardlink'); a name it does not know would refuse nothing."""
    server = next(
        (
            path
            for path in ("/usr/lib/openssh/sftp-server", "/usr/libexec/sftp-server")
            if Path(path).exists()
        ),
        None,
    ) or need("sftp-server")
    known = subprocess.run(
        [server, "-Q", "requests"], capture_output=True, text=True, check=True
    ).stdout.split()
    match = re.search(
        r"ForceCommand internal-sftp -P (\S+)", sshd_fragment(["alpha"], Path("/var/lib/herald"))
    )
    assert match is not None
    refused = match.group(1).split(",")
    assert refused == ["symlink", "hardlink"]
    assert set(refused) <= set(known)
