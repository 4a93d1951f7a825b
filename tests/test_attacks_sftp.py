"""Attacks on the SFTP servers by a compromised host: its own SSH key and root on itself, so any
SFTP request it likes, in as many sessions as it likes. It may write only its logs/ (and
backups/), within their caps on the embedded server, and may make no link on either server."""

import asyncio
import os
from pathlib import Path

import asyncssh
import pytest
from helpers import Fleet, Serve, herald
from test_sftp import connect, is_openssh, run

CHUNK = 64 << 10


def cap_logs(fleet: Fleet, state: Path, size: str = "1M") -> int:
    """Give alpha a logs/ cap of `size` and publish it; the bytes alpha's logs/ holds now."""
    toml = fleet.root / "fleet.toml"
    toml.write_text(toml.read_text().replace("[hosts.alpha]\n", f'[hosts.alpha]\nlogs = "{size}"\n'))
    done = herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--init")
    assert done.returncode == 0, done.stderr
    return on_disk(state)


def on_disk(state: Path) -> int:
    return sum(p.lstat().st_size for p in (state / "chroot" / "alpha" / "logs").rglob("*") if p.is_file())


def test_an_append_mode_open_cannot_write_past_the_cap(fleet: Fleet, state: Path, serve: Serve):
    """alpha opens a log in append mode and sends 5 MiB of writes, all at offset 0, against a
    1 MiB cap: the kernel appends each one whatever the offset, so the cap must count every
    byte of each. Writes are acknowledged until the cap, then refused; the disk holds at most
    the cap."""
    held = cap_logs(fleet, state)

    async def scenario() -> tuple[int, str]:
        written, refusal = 0, ""
        async with (
            connect(serve, fleet, "alpha") as conn,
            conn.start_sftp_client() as sftp,
            sftp.open("logs/append.log", "ab") as f,
        ):
            try:
                for _ in range(80):
                    await f.write(b"a" * CHUNK, 0)
                    written += CHUNK
            except asyncssh.SFTPFailure as exc:
                refusal = exc.reason
        return written, refusal

    written, refusal = run(scenario())
    assert written >= 512 << 10  # delivered: the writes reached the file
    assert "logs/ is full" in refusal
    assert held + written <= 1 << 20
    assert on_disk(state) == held + written


def test_many_sessions_share_one_cap(fleet: Fleet, state: Path, serve: Serve):
    """alpha opens 4 connections and writes from all of them at once, each under the cap on its
    own: together they may not pass it (each used to count alone: 3.75 MiB under a 1 MiB cap)."""
    held = cap_logs(fleet, state)

    async def one(index: int) -> tuple[int, str]:
        written, refusal = 0, ""
        async with (
            connect(serve, fleet, "alpha") as conn,
            conn.start_sftp_client() as sftp,
            sftp.open(f"logs/session-{index}.log", "wb") as f,
        ):
            try:
                for block in range(15):
                    await f.write(b"s" * CHUNK, block * CHUNK)
                    written += CHUNK
            except asyncssh.SFTPFailure as exc:
                refusal = exc.reason
        return written, refusal

    async def scenario() -> list[tuple[int, str]]:
        return list(await asyncio.gather(*(one(index) for index in range(4))))

    outcomes = run(scenario())
    written = [count for count, _ in outcomes]
    assert all(count > 0 for count in written)  # every session was admitted and wrote
    assert all("logs/ is full" in refusal for _, refusal in outcomes)
    assert held + sum(written) <= 1 << 20
    assert on_disk(state) == held + sum(written)


def test_a_file_removed_while_open_keeps_counting(fleet: Fleet, state: Path, serve: Serve):
    """alpha writes 768 KiB, removes the file while its handle stays open, and writes on through
    that handle and into new files: the removed file's space is not free while it is open, so
    every byte acknowledged (all still on disk) stays within the cap."""
    held = cap_logs(fleet, state)

    async def scenario() -> tuple[int, str]:
        acknowledged, refusal = 0, ""
        async with connect(serve, fleet, "alpha") as conn, conn.start_sftp_client() as sftp:
            hidden = await sftp.open("logs/hidden.log", "wb")
            for block in range(12):
                await hidden.write(b"h" * CHUNK, block * CHUNK)
                acknowledged += CHUNK
            await sftp.remove("logs/hidden.log")  # the name goes; the open file stays on disk
            try:
                for index in range(16):
                    async with sftp.open(f"logs/more-{index}.log", "wb") as f:
                        await f.write(b"m" * CHUNK)
                    acknowledged += CHUNK
            except asyncssh.SFTPFailure as exc:
                refusal = exc.reason
            await hidden.close()
            async with sftp.open("logs/after.log", "wb") as f:  # closed: its space is free again
                await f.write(b"x" * (512 << 10))
        return acknowledged, refusal

    acknowledged, refusal = run(scenario())
    assert acknowledged >= 768 << 10
    assert "logs/ is full" in refusal
    assert held + acknowledged <= 1 << 20


def test_a_host_cannot_fill_logs_with_empty_files(fleet: Fleet, state: Path, serve: Serve):
    """alpha creates empty files and directories, which cost no bytes but an inode each (and a
    listing for every admin tool): the entry cap refuses them with a message saying why."""
    logs = state / "chroot" / "alpha" / "logs"

    async def scenario() -> tuple[int, str]:
        made, refusal = 0, ""
        async with connect(serve, fleet, "alpha") as conn, conn.start_sftp_client() as sftp:
            try:
                for index in range(150):
                    if index % 10 == 9:
                        await sftp.mkdir(f"logs/d{index}")
                    else:
                        async with sftp.open(f"logs/e{index}", "wb"):
                            pass
                    made += 1
            except asyncssh.SFTPFailure as exc:
                refusal = exc.reason
        return made, refusal

    made, refusal = run(scenario())
    assert made >= 20  # delivered: the agent's 20 logs fit with room to spare
    assert "logs/ holds 100 files and directories, its cap" in refusal
    assert len(list(logs.rglob("*"))) == 100


def test_a_host_cannot_hold_every_descriptor_of_the_server(fleet: Fleet, state: Path, serve: Serve):
    """alpha opens files and never closes them, in two sessions, to exhaust the descriptors of
    the process that serves every host (and runs the broker): past its cap of open handles each
    open is refused, and beta still logs in and reads."""

    async def scenario() -> tuple[int, str, bytes]:
        held, refusal = 0, ""
        async with (
            connect(serve, fleet, "alpha") as conn,
            conn.start_sftp_client() as one,
            conn.start_sftp_client() as two,
        ):
            handles = []
            try:
                for index in range(200):
                    handles.append(await (one if index % 2 else two).open("current", "rb"))
                    held += 1
            except asyncssh.SFTPFailure as exc:
                refusal = exc.reason
            async with connect(serve, fleet, "beta") as other, other.start_sftp_client() as sftp:
                current = await sftp.open("current", "rb")
                data = await current.read()
        return held, refusal, data

    held, refusal, data = run(scenario())
    assert held == 64
    assert "64 files are open in this host's sessions" in refusal
    assert data == (state / "chroot" / "beta" / "current").read_bytes()


LINKS = {
    "symlink to /etc/shadow": lambda sftp: sftp.symlink("/etc/shadow", "logs/shadow"),
    "symlink to the credentials": lambda sftp: sftp.symlink("../credentials/broker.secret", "logs/secret"),
    "hard link to its own log": lambda sftp: sftp.link("logs/own.log", "logs/linked.log"),
}


@pytest.mark.parametrize("attempt", LINKS)
def test_a_host_cannot_make_links(sftp_server: Serve, fleet: Fleet, state: Path, attempt: str):
    """alpha asks the server for a symlink or a hard link in its logs/ (OpenSSH's internal-sftp
    made both by default; `herald logs`, run as root, followed them): the server answers the
    request with a refusal, the session goes on, and nothing appears in logs/."""
    logs = state / "chroot" / "alpha" / "logs"
    (logs / "own.log").write_text("mine\n")
    os.chown(logs / "own.log", logs.stat().st_uid, logs.stat().st_gid)  # alpha's own (OpenSSH)
    before = sorted(path.name for path in logs.iterdir())

    async def scenario() -> tuple[str, list[str]]:
        async with connect(sftp_server, fleet, "alpha") as conn, conn.start_sftp_client() as sftp:
            try:
                await LINKS[attempt](sftp)
                outcome = "made"
            except asyncssh.SFTPError as exc:
                outcome = type(exc).__name__
            return outcome, sorted(await sftp.listdir("logs"))  # the session is still good

    outcome, listed = run(scenario())
    assert outcome in ("SFTPPermissionDenied", "SFTPOpUnsupported"), (
        f"{attempt}: {outcome} on {'OpenSSH' if is_openssh(sftp_server) else 'the embedded server'}"
    )
    assert listed == [".", "..", *before]
    assert sorted(path.name for path in logs.iterdir()) == before
