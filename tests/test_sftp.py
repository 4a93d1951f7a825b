"""The embedded SFTP server: a host reads only its own chroot and writes only its logs/."""

import asyncio
import hashlib
from pathlib import Path

import asyncssh
import pytest
from helpers import Fleet, Serve


def run(coroutine):
    async def bounded():
        async with asyncio.timeout(60):
            return await coroutine

    return asyncio.run(bounded())


def connect(serve: Serve, fleet: Fleet, user: str, key_of: str | None = None):
    return asyncssh.connect(
        "127.0.0.1",
        serve.sftp_port,
        username=user,
        client_keys=[str(fleet.keys[key_of or user])],
        known_hosts=([asyncssh.import_public_key(serve.host_key)], [], []),
        config=None,
        agent_path=None,
    )


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else f"dir {p.stat().st_mode:o}"
        for p in sorted(root.rglob("*"))
        if not p.is_symlink()
    } | {str(p.relative_to(root)): f"link {p.stat().st_mode:o}" for p in root.rglob("*") if p.is_symlink()}


def test_a_host_reads_its_own_release(serve: Serve, fleet: Fleet, state: Path):
    async def scenario():
        async with (
            connect(serve, fleet, "alpha") as conn,
            conn.start_sftp_client() as sftp,
            sftp.open("current", "rb") as f,
        ):
            return await f.read()

    assert run(scenario()) == (state / "chroot" / "alpha" / "current").read_bytes()


@pytest.mark.parametrize(
    ("user", "key"), [("alpha", "beta"), ("zeta", "alpha"), ("herald-admin", "alpha"), ("root", "alpha")]
)
def test_wrong_keys_and_unknown_users_are_refused(serve: Serve, fleet: Fleet, user: str, key: str):
    async def scenario():
        async with connect(serve, fleet, user, key):
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
    ],
)
def test_nothing_outside_the_chroot_is_readable(serve: Serve, fleet: Fleet, state: Path, path: str):
    chroot = state / "chroot" / "alpha"
    (chroot / "escape").symlink_to("/etc/passwd")
    (chroot / "other").symlink_to(state / "chroot" / "beta")

    async def scenario():
        async with (
            connect(serve, fleet, "alpha") as conn,
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
    "create at the top": lambda sftp: _write(sftp, "new"),
    "write through logs/..": lambda sftp: _write(sftp, "logs/../current"),
    "chmod current": lambda sftp: sftp.chmod("current", 0o777),
    "remove current": lambda sftp: sftp.remove("current"),
    "rename current": lambda sftp: sftp.rename("current", "logs/current"),
    "rename a log over current": lambda sftp: sftp.posix_rename("logs/x.log", "current"),
    "mkdir at the top": lambda sftp: sftp.mkdir("bin"),
    "rmdir releases": lambda sftp: sftp.rmdir("releases"),
    "symlink in logs": lambda sftp: sftp.symlink("/etc/shadow", "logs/shadow"),
    "hard link in logs": lambda sftp: sftp.link("current", "logs/current"),
    "chmod the logs dir": lambda sftp: sftp.setstat("logs", asyncssh.SFTPAttrs(permissions=0o777)),
}


@pytest.mark.parametrize("action", ATTEMPTS)
def test_writes_outside_logs_are_refused_and_nothing_changes(
    serve: Serve, fleet: Fleet, state: Path, action: str
):
    chroot = state / "chroot" / "alpha"
    (chroot / "logs" / "x.log").write_text("a log\n")
    before = snapshot(state)

    async def scenario():
        async with connect(serve, fleet, "alpha") as conn, conn.start_sftp_client() as sftp:
            await ATTEMPTS[action](sftp)

    with pytest.raises(asyncssh.SFTPError):
        run(scenario())
    assert snapshot(state) == before


def test_a_host_writes_its_logs(serve: Serve, fleet: Fleet, state: Path):
    async def scenario():
        async with connect(serve, fleet, "alpha") as conn, conn.start_sftp_client() as sftp:
            async with sftp.open("logs/run.log", "wb") as f:
                await f.write(b"rebuild ok\n")
            await sftp.mkdir("logs/old")
            await sftp.rename("logs/run.log", "logs/old/run.log")
            await sftp.chmod("logs/old/run.log", 0o600)
            return sorted(await sftp.listdir("logs/old"))

    assert run(scenario()) == [".", "..", "run.log"]
    log = state / "chroot" / "alpha" / "logs" / "old" / "run.log"
    assert log.read_bytes() == b"rebuild ok\n"
    assert log.stat().st_mode & 0o777 == 0o600
    assert not (state / "chroot" / "beta" / "logs" / "old").exists()


def test_no_shell_exec_or_forwarding(serve: Serve, fleet: Fleet):
    async def scenario():
        outcomes = []
        async with connect(serve, fleet, "alpha") as conn:
            for attempt in (
                conn.run("id", check=True),
                conn.create_process(term_type="xterm"),
                conn.open_connection("127.0.0.1", 22),
                conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 22),
            ):
                try:
                    await attempt
                    outcomes.append("allowed")
                except (asyncssh.Error, asyncssh.ChannelOpenError, asyncssh.ChannelListenError, OSError):
                    outcomes.append("refused")
        return outcomes

    assert run(scenario()) == ["refused"] * 4
