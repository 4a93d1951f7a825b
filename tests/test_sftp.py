"""Serving the chroots, one matrix over two servers: the embedded SFTP server and a real OpenSSH
sshd provisioned by `herald server provision`. A host reads only its own chroot and writes only
its logs/ (and backups/); nothing outside is ever read or changed."""

import asyncio
import hashlib
from pathlib import Path

import asyncssh
import pytest
from helpers import Fleet, Serve, herald, make_agent

from client.fetch import read_small
from protocol.errors import ReleaseError


def run(coroutine):
    async def bounded():
        async with asyncio.timeout(60):
            return await coroutine

    return asyncio.run(bounded())


def connect(server: Serve, fleet: Fleet, user: str, key_of: str | None = None):
    return asyncssh.connect(
        "127.0.0.1",
        server.sftp_port,
        username=user,
        client_keys=[str(fleet.keys[key_of or user])],
        known_hosts=([asyncssh.import_public_key(server.host_key)], [], []),
        config=None,
        agent_path=None,
    )


def is_openssh(server: Serve) -> bool:
    return server.mqtt == "" and server.proc.name == "sshd"


def snapshot(root: Path) -> dict[str, str]:
    """Every entry below root with its content hash, mode and owner: what must not change."""
    found = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        what = (
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not path.is_symlink() else ""
        )
        found[str(path.relative_to(root))] = f"{info.st_mode:o} {info.st_uid}:{info.st_gid} {what}"
    return found


def test_a_host_reads_its_own_release(sftp_server: Serve, fleet: Fleet, state: Path):
    async def scenario():
        async with (
            connect(sftp_server, fleet, "alpha") as conn,
            conn.start_sftp_client() as sftp,
            sftp.open("current", "rb") as current,
            sftp.open("credentials/broker.secret", "rb") as secret,
        ):
            return await current.read(), await secret.read()

    current, secret = run(scenario())
    assert current == (state / "chroot" / "alpha" / "current").read_bytes()
    assert secret == (state / "chroot" / "alpha" / "credentials" / "broker.secret").read_bytes()


@pytest.mark.parametrize(
    ("user", "key"), [("alpha", "beta"), ("zeta", "alpha"), ("herald-admin", "alpha"), ("root", "alpha")]
)
def test_wrong_keys_and_unknown_users_are_refused(sftp_server: Serve, fleet: Fleet, user: str, key: str):
    async def scenario():
        async with connect(sftp_server, fleet, user, key):
            pass

    with pytest.raises(asyncssh.PermissionDenied):
        run(scenario())


@pytest.mark.parametrize(
    "path",
    [
        "../beta/current",
        "/../beta/current",
        "../../../../etc/passwd",
        "/etc/passwd",
        "escape",
        "other/current",
        "logs/deep/current",
        "logs/deep/../../beta/current",
    ],
)
def test_nothing_outside_the_chroot_is_readable(sftp_server: Serve, fleet: Fleet, state: Path, path: str):
    chroot = state / "chroot" / "alpha"
    (chroot / "escape").symlink_to("/etc/passwd")  # links placed in the chroot by someone else
    (chroot / "other").symlink_to(state / "chroot" / "beta")
    (chroot / "logs" / "deep").symlink_to(state / "chroot" / "beta")

    async def scenario():
        async with (
            connect(sftp_server, fleet, "alpha") as conn,
            conn.start_sftp_client() as sftp,
            sftp.open(path, "rb") as f,
        ):
            return await f.read()

    with pytest.raises((asyncssh.SFTPNoSuchFile, asyncssh.SFTPPermissionDenied)):
        run(scenario())


async def _write(sftp: asyncssh.SFTPClient, path: str, mode: str = "wb") -> None:
    async with sftp.open(path, mode) as f:
        await f.write(b"evil")


async def _append_to_an_object(sftp: asyncssh.SFTPClient) -> None:
    name = sorted(await sftp.listdir("objects"))[2]
    await _write(sftp, f"objects/{name}", "ab")


ATTEMPTS = {
    "overwrite current": lambda sftp: _write(sftp, "current"),
    "append to an object": _append_to_an_object,
    "overwrite the broker secret": lambda sftp: _write(sftp, "credentials/broker.secret"),
    "create at the top": lambda sftp: _write(sftp, "new"),
    "write through logs/..": lambda sftp: _write(sftp, "logs/../current"),
    "chmod current": lambda sftp: sftp.chmod("current", 0o777),
    "remove current": lambda sftp: sftp.remove("current"),
    "rename current": lambda sftp: sftp.rename("current", "logs/current"),
    "rename a log over current": lambda sftp: sftp.posix_rename("logs/x.log", "current"),
    "mkdir at the top": lambda sftp: sftp.mkdir("bin"),
    "rmdir releases": lambda sftp: sftp.rmdir("releases"),
    "hard link in logs": lambda sftp: sftp.link("current", "logs/current"),
}


@pytest.mark.parametrize("action", ATTEMPTS)
def test_writes_outside_logs_are_refused_and_nothing_changes(
    sftp_server: Serve, fleet: Fleet, state: Path, action: str
):
    chroot = state / "chroot" / "alpha"
    (chroot / "logs" / "x.log").write_text("a log\n")
    before = snapshot(state / "chroot")

    async def scenario():
        async with connect(sftp_server, fleet, "alpha") as conn, conn.start_sftp_client() as sftp:
            await ATTEMPTS[action](sftp)

    with pytest.raises(asyncssh.SFTPError):
        run(scenario())
    assert snapshot(state / "chroot") == before


def test_a_link_made_by_the_host_never_reaches_outside(sftp_server: Serve, fleet: Fleet, state: Path):
    """Both servers refuse to make links (OpenSSH: `internal-sftp -P symlink,hardlink`); and
    renaming into place outside logs/ fails and nothing outside is read all the same."""

    async def scenario() -> list[str]:
        outcomes = []
        async with connect(sftp_server, fleet, "alpha") as conn, conn.start_sftp_client() as sftp:
            try:
                await sftp.symlink("/etc/shadow", "logs/shadow")
                outcomes.append("made")
            except asyncssh.SFTPError:
                outcomes.append("refused")
            try:
                async with sftp.open("logs/shadow", "rb") as f:
                    outcomes.append(f"read {len(await f.read())} bytes")
            except asyncssh.SFTPError:
                outcomes.append("unreadable")
            try:
                await sftp.posix_rename("logs/shadow", "current")
                outcomes.append("renamed into place")
            except asyncssh.SFTPError:
                outcomes.append("not renamed")
        return outcomes

    assert run(scenario()) == ["refused", "unreadable", "not renamed"]
    assert (state / "chroot" / "alpha" / "current").is_file()


def test_a_host_writes_its_logs(sftp_server: Serve, fleet: Fleet, state: Path):
    async def scenario():
        async with connect(sftp_server, fleet, "alpha") as conn, conn.start_sftp_client() as sftp:
            async with sftp.open("logs/run.log", "wb", asyncssh.SFTPAttrs(permissions=0o666)) as f:
                await f.write(b"rebuild ok\n")
            created = (await sftp.stat("logs/run.log")).permissions
            await sftp.mkdir("logs/old")
            await sftp.rename("logs/run.log", "logs/old/run.log")
            await sftp.chmod("logs/old/run.log", 0o600)
            return created, sorted(await sftp.listdir("logs/old"))

    created, listed = run(scenario())
    assert listed == [".", "..", "run.log"]
    assert created is not None
    assert created & 0o7777 == 0o640  # asked 0666; other users of the server read no host's logs
    log = state / "chroot" / "alpha" / "logs" / "old" / "run.log"
    assert log.read_bytes() == b"rebuild ok\n"
    assert log.stat().st_mode & 0o777 == 0o600
    assert not (state / "chroot" / "beta" / "logs" / "old").exists()


def test_no_shell_exec_pty_or_forwarding(sftp_server: Serve, fleet: Fleet):
    async def attempt(conn: asyncssh.SSHClientConnection, what: str) -> str:
        try:
            async with asyncio.timeout(10):
                if what == "exec":
                    result = await conn.run("id", input="")
                    return "ran" if "uid=" in str(result.stdout) else "refused"
                if what == "pty":
                    result = await conn.run("id", term_type="xterm", input="")
                    return "ran" if "uid=" in str(result.stdout) else "refused"
                if what == "direct-tcpip":
                    await conn.open_connection("127.0.0.1", sftp_server.sftp_port)
                else:
                    await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 22)
                return "allowed"
        except (
            asyncssh.Error,
            asyncssh.ChannelOpenError,
            asyncssh.ChannelListenError,
            OSError,
            TimeoutError,
        ):
            return "refused"

    async def scenario():
        async with connect(sftp_server, fleet, "alpha") as conn:
            return [await attempt(conn, what) for what in ("exec", "pty", "direct-tcpip", "tcpip-forward")]

    assert run(scenario()) == ["refused"] * 4


def test_an_agent_converges_through_this_server(
    sftp_server: Serve, fleet: Fleet, state: Path, tmp_path: Path
):
    """The production path: an agent fetches, verifies and applies through OpenSSH too."""
    agent = make_agent(fleet, "gamma", sftp_server, tmp_path, broker="")
    done = agent.once()
    assert done.returncode == 0, done.stdout + done.stderr
    assert agent.deployed() == 1
    (log,) = (state / "chroot" / "gamma" / "logs").glob("*-g1-applied.log")
    assert "stand-in rebuild" in log.read_text()


def test_the_embedded_server_caps_logs(fleet: Fleet, state: Path, serve: Serve):
    """OpenSSH has no per-directory cap (filesystem quotas do that for its users); ours has."""
    toml = fleet.root / "fleet.toml"
    toml.write_text(toml.read_text().replace("[hosts.alpha]\n", '[hosts.alpha]\nlogs = "1M"\n'))
    assert herald("publish", "--fleet", str(fleet.root), "--state", str(state)).returncode == 0

    async def scenario() -> tuple[int, str]:
        written, refusal = 0, ""
        async with connect(serve, fleet, "alpha") as conn, conn.start_sftp_client() as sftp:
            try:
                for index in range(20):
                    async with sftp.open(f"logs/{index}.log", "wb") as f:
                        await f.write(b"x" * (100 << 10))
                    written += 1
            except asyncssh.SFTPFailure as exc:
                refusal = exc.reason
            await sftp.remove("logs/0.log")  # making room makes room
            async with sftp.open("logs/again.log", "wb") as f:
                await f.write(b"x" * (50 << 10))
        return written, refusal

    written, refusal = run(scenario())
    assert 8 <= written <= 10
    assert "logs/ is full" in refusal


def test_a_host_with_backups_may_write_them_within_their_cap(fleet: Fleet, state: Path, serve: Serve):
    toml = fleet.root / "fleet.toml"
    toml.write_text(toml.read_text().replace("[hosts.beta]\n", '[hosts.beta]\nbackups = "1M"\n'))
    assert herald("publish", "--fleet", str(fleet.root), "--state", str(state)).returncode == 0
    assert (state / "chroot" / "beta" / "backups").stat().st_mode & 0o777 == 0o700

    async def scenario(user: str) -> list[str]:
        outcomes = []
        async with connect(serve, fleet, user) as conn, conn.start_sftp_client() as sftp:
            for size in (600 << 10, 600 << 10):
                try:
                    async with sftp.open(f"backups/{len(outcomes)}", "wb") as f:
                        await f.write(b"x" * size)
                    outcomes.append("written")
                except asyncssh.SFTPError as exc:
                    outcomes.append(type(exc).__name__)
        return outcomes

    assert run(scenario("beta")) == ["written", "SFTPFailure"]
    assert run(scenario("alpha")) == ["SFTPPermissionDenied", "SFTPPermissionDenied"]


def test_small_files_are_read_whole_on_either_side_of_one_request(
    sftp_server: Serve, fleet: Fleet, state: Path
):
    """The agent reads `current` and a release with one read request when they fit in one
    (16 KiB): a shorter answer is taken as the whole file, a full one is sized and read on."""
    sizes = (0, 1000, (16 << 10) - 1, 16 << 10, (16 << 10) + 1, 70000, 200000)
    logs = state / "chroot" / "alpha" / "logs"
    for size in sizes:
        (logs / f"{size}.log").write_bytes(bytes(index % 251 for index in range(size)))

    async def scenario() -> tuple[dict[int, bytes], list[str]]:
        async with connect(sftp_server, fleet, "alpha") as conn, conn.start_sftp_client() as sftp:
            read = {size: await read_small(sftp, f"logs/{size}.log", 1 << 20) for size in sizes}
            refused = []
            for size, limit in ((16385, 16384), (1000, 999), (200000, 70000)):
                with pytest.raises(ReleaseError) as info:
                    await read_small(sftp, f"logs/{size}.log", limit)
                refused.append(str(info.value))
        return read, refused

    read, refused = run(scenario())
    assert {size: len(data) for size, data in read.items()} == {size: size for size in sizes}
    assert all(data == (logs / f"{size}.log").read_bytes() for size, data in read.items())
    assert refused == [
        "logs/16385.log is larger than 16384 bytes",
        "logs/1000.log is larger than 999 bytes",
        "logs/200000.log is larger than 70000 bytes",
    ]
