"""A real OpenSSH sshd serving herald's chroots, for the tests (as root, as CI runs them).

OpenSSH refuses a ChrootDirectory under /tmp (mode 1777). So sshd runs in a private mount
namespace where a tmpfs hides /mnt and the test's tmp_path is bind-mounted on /mnt/herald: the
same files, reached through root-owned directories only. Provisioning runs in that namespace too
(so the sshd_config fragment names /mnt/herald), publishing outside it (same files). Nothing is
mounted outside the namespace; the host users created are removed at the end of the session.
"""

import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from helpers import HERALD, Fleet, Proc, Serve, need, need_root, wait_until

INSIDE = Path("/mnt/herald")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def in_namespace(root: Path, script: str) -> list[str]:
    """argv running `script` with `root` visible at /mnt/herald, in a private mount namespace."""
    setup = " && ".join(
        (
            "mount -t tmpfs -o mode=0755 herald /mnt",
            "mkdir /mnt/herald",
            f"mount --bind {shlex.quote(str(root))} /mnt/herald",
        )
    )
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", f"{setup} && {script}"]


def inside(path: Path, root: Path) -> Path:
    return INSIDE / path.relative_to(root)


@dataclass
class OpenSSH:
    proc: Proc
    port: int
    host_key: str
    state: Path

    def serve(self) -> Serve:
        """What the tests know of a server: its port, its host key, its state directory."""
        return Serve(self.proc, self.state, "", self.port, self.host_key)

    def stop(self) -> None:
        self.proc.stop()


def provision(
    fleet: Fleet, state: Path, root: Path, *, dry_run: bool = False
) -> subprocess.CompletedProcess[str]:
    argv = [
        *HERALD,
        "server",
        "provision",
        "--fleet",
        str(inside(fleet.root, root)),
        "--state",
        str(inside(state, root)),
        *(["--dry-run"] if dry_run else []),
    ]
    return subprocess.run(
        in_namespace(root, shlex.join(argv)), capture_output=True, text=True, timeout=120, check=False
    )


def start_sshd(fleet: Fleet, state: Path, root: Path, logs: Path) -> OpenSSH:
    """Provision, publish, and start sshd on an ephemeral loopback port."""
    need_root()
    sshd = need("sshd")
    need("unshare")
    root.chmod(0o755)  # sshd reads the authorized keys as the host's user: it must pass through
    done = provision(fleet, state, root)
    assert done.returncode == 0, done.stdout + done.stderr
    published = subprocess.run(
        [*HERALD, "publish", "--fleet", str(fleet.root), "--state", str(state)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert published.returncode == 0, published.stderr
    here = root / "sshd"
    here.mkdir(mode=0o700)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(here / "host_key")], check=True)
    port = free_port()
    (here / "sshd_config").write_text(
        f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {INSIDE}/sshd/host_key
PidFile {INSIDE}/sshd/sshd.pid
UsePAM no
PermitRootLogin no
StrictModes yes
AuthorizedKeysFile none
LogLevel VERBOSE
Subsystem sftp internal-sftp
Include {inside(state, root)}/ssh/sshd_config
"""
    )
    script = f"mkdir -p /run/sshd && exec {sshd} -D -e -f {INSIDE}/sshd/sshd_config"
    proc = Proc("sshd", in_namespace(root, script), logs / "sshd.log")

    def listening() -> bool:
        if not proc.alive():
            raise AssertionError(f"sshd exited:\n{proc.output()}")
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, "sshd listening")
    host_key = " ".join((here / "host_key.pub").read_text().split()[:2])
    return OpenSSH(proc, port, host_key, state)


def remove_host_users(names: list[str]) -> None:
    """userdel the herald host users a test session created (never any other account)."""
    code = (
        "import pwd, subprocess, sys\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        if pwd.getpwnam(name).pw_gecos == 'herald host':\n"
        "            subprocess.run(['userdel', name], check=False)\n"
        "    except KeyError:\n"
        "        pass\n"
    )
    subprocess.run([sys.executable, "-c", code, *names], check=False, timeout=60)
