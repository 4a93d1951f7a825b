"""Attacks on the SFTP servers by a compromised host: its own SSH key and root on itself, so any
SFTP request it likes, in as many sessions as it likes. It may write only its logs/ (and
backups/), within their caps on the embedded server, and may make no link on either server.
Some attacks are a stranger's, who can only reach the port; and some need the server's descriptor
budget small enough to exhaust with a few hundred connections: `herald serve` runs with 256 there
(herald's systemd unit gives it 65,536, systemd's default is 1,024: more connections, same attack).
"""

import asyncio
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import helpers
import pytest
from helpers import Fleet, Serve, herald, start_serve
from openssh import remove_host_users
from test_sftp import connect, is_openssh, run

from publisher.sftpfixes import READ_MAX
from publisher.sshgate import LOGIN_GRACE, PENDING, PER_HOST, PER_PEER

CHUNK = 64 << 10
MiB = 1 << 20
NOFILE = ["prlimit", "--nofile=256:256"]  # execs herald: the same PID


@pytest.fixture
def small_serve(fleet: Fleet, state: Path, logs: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Serve]:
    """`herald serve` with 256 descriptors."""
    monkeypatch.setattr(helpers, "HERALD", [*NOFILE, *helpers.HERALD])
    server = start_serve(fleet, state, logs)
    monkeypatch.undo()
    yield server
    server.stop()


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss(pid: int) -> int:
    with Path(f"/proc/{pid}/status").open() as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


# Raw SFTP v3 on an SSH channel: to send what asyncssh's client would not (an extension the
# server did not offer, thousands of requests in one write) and to stop reading the answers.


def sftp_packet(kind: int, request: int, body: bytes) -> bytes:
    return struct.pack(">IBI", len(body) + 5, kind, request) + body


def sftp_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


class RawSFTP(asyncssh.SSHClientSession[bytes]):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.arrived = asyncio.Event()

    def data_received(self, data: bytes, datatype: int | None) -> None:  # noqa: ARG002
        self.buffer += data
        self.arrived.set()

    async def packet(self) -> bytes:
        async with asyncio.timeout(20):
            while True:
                if len(self.buffer) >= 4:
                    size = struct.unpack(">I", self.buffer[:4])[0]
                    if len(self.buffer) >= 4 + size:
                        packet = bytes(self.buffer[4 : 4 + size])
                        del self.buffer[: 4 + size]
                        return packet
                self.arrived.clear()
                await self.arrived.wait()


async def raw_sftp(conn: asyncssh.SSHClientConnection, window: int = 2 * MiB):
    """A raw SFTP v3 session: (channel, session, the extensions the server offered)."""
    channel, raw = await conn.create_session(RawSFTP, subsystem="sftp", encoding=None, window=window)
    channel.write(struct.pack(">IBI", 5, 1, 3))  # INIT, version 3
    version = await raw.packet()
    assert version[0] == 2  # VERSION
    offered, rest = [], version[5:]
    while rest:
        (size,) = struct.unpack(">I", rest[:4])
        offered.append(rest[4 : 4 + size])
        (skip,) = struct.unpack(">I", rest[4 + size : 8 + size])
        rest = rest[8 + size + skip :]
    return channel, raw, offered


async def raw_open(
    channel: asyncssh.SSHClientChannel[bytes], raw: RawSFTP, path: bytes, pflags: int
) -> bytes:
    channel.write(sftp_packet(3, 1, sftp_string(path) + struct.pack(">II", pflags, 0)))  # OPEN
    answer = await raw.packet()
    assert answer[0] == 102, answer  # HANDLE
    (size,) = struct.unpack(">I", answer[5:9])
    return answer[9 : 9 + size]


async def packets(raw: RawSFTP, count: int) -> list[bytes]:
    return [await raw.packet() for _ in range(count)]


def read_request(request: int, handle: bytes, offset: int, length: int) -> bytes:
    return sftp_packet(5, request, sftp_string(handle) + struct.pack(">QI", offset, length))


async def prompt(sftp: asyncssh.SFTPClient, busy: "asyncio.Future[object]") -> tuple[float, int]:
    """Read `current` over and over while `busy` runs: the slowest read, and how many."""
    worst, reads = 0.0, 0
    while not busy.done():
        asked = time.monotonic()
        async with sftp.open("current", "rb") as current:
            await current.read()
        worst, reads = max(worst, time.monotonic() - asked), reads + 1
        await asyncio.sleep(0.02)
    return worst, reads


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


# ---------------------------------------------------------------- connections (embedded server)

SOURCES = {"the hosts' address": ["127.0.0.1"], "30 addresses": [f"127.0.0.{n}" for n in range(2, 32)]}


@pytest.mark.parametrize("sources", SOURCES)
def test_a_strangers_idle_connections_do_not_lock_out_the_fleet(
    fleet: Fleet, state: Path, small_serve: Serve, sources: str
):
    """Actor: a stranger on the network, no credentials. It opens 300 TCP connections to the SFTP
    port and sends nothing, from the address the hosts use (a neighbour behind their NAT) or
    from 30: each was a descriptor of the process that serves every host for asyncssh's 30 s
    login timeout, and nothing capped them. A host logged in before must still read; another
    host must still log in. The server holds at most PENDING such connections, PER_PEER from one
    address, and drops one that waited LOGIN_GRACE to make room for a new one."""
    serve = small_serve
    addresses = SOURCES[sources]

    async def scenario() -> tuple[int, int, int, bytes, bytes]:
        async with connect(serve, fleet, "alpha") as alpha, alpha.start_sftp_client() as sftp:
            held: list[socket.socket] = []
            try:
                for index in range(300):
                    source = (addresses[index % len(addresses)], 0)
                    held.append(socket.create_connection(("127.0.0.1", serve.sftp_port), 2, source))
                await asyncio.sleep(LOGIN_GRACE + 0.5)
                peak = descriptors(serve.proc.pid)
                async with asyncio.timeout(10), sftp.open("current", "rb") as current:
                    data = await current.read()
                async with (
                    asyncio.timeout(10),
                    connect(serve, fleet, "gamma") as gamma,
                    gamma.start_sftp_client() as other,
                    other.open("current", "rb") as current,
                ):
                    other_data = await current.read()
                return len(held), sum(map(_open, held)), peak, data, other_data
            finally:
                for sock in held:
                    sock.close()

    opened, still_open, peak, data, other = run(scenario())
    print(f"the stranger opened {opened}, {still_open} still open; serve held {peak} of 256 descriptors")
    assert opened == 300  # delivered: every connection was accepted
    assert still_open <= (PER_PEER if len(addresses) == 1 else PENDING)
    assert data == (state / "chroot" / "alpha" / "current").read_bytes()
    assert other == (state / "chroot" / "gamma" / "current").read_bytes()


def _open(sock: socket.socket) -> bool:
    """Whether the server still holds this connection (it sends its version, then waits)."""
    sock.setblocking(False)  # noqa: FBT003
    try:
        while sock.recv(4096):
            pass
    except BlockingIOError:
        return True
    return False


def test_a_host_cannot_hold_the_servers_descriptors_with_ssh_connections(
    fleet: Fleet, state: Path, small_serve: Serve
):
    """Actor: a compromised host (alpha), with its own key. It logs in again and again and keeps
    every connection open: each is a descriptor of the process that serves every host (300 of
    them left it none). Past PER_HOST the server refuses alpha's connection, saying why, with one
    log line naming alpha; another host still logs in and reads, and alpha, once it closes one,
    logs in again."""
    serve = small_serve

    async def scenario() -> tuple[int, str, bytes, bool]:
        held: list[asyncssh.SSHClientConnection] = []
        sessions, refusal = 0, ""
        try:
            for _ in range(3 * PER_HOST):
                try:
                    async with asyncio.timeout(5):
                        held.append(await connect(serve, fleet, "alpha"))
                        await held[-1].start_sftp_client()
                except (asyncssh.Error, OSError) as exc:
                    refusal = str(exc)
                    break
                sessions += 1
            async with (
                connect(serve, fleet, "gamma") as gamma,
                gamma.start_sftp_client() as sftp,
                sftp.open("current", "rb") as current,
            ):
                other = await current.read()
            held.pop(0).close()
            await asyncio.sleep(0.2)
            async with connect(serve, fleet, "alpha") as again, again.start_sftp_client():
                readmitted = True
            return sessions, refusal, other, readmitted
        finally:
            for conn in held:
                conn.close()

    sessions, refusal, other, readmitted = run(scenario())
    assert sessions == PER_HOST  # delivered: PER_HOST logins admitted, then the next refused
    assert f"alpha has {PER_HOST} connections open, its cap" in refusal
    assert other == (state / "chroot" / "gamma" / "current").read_bytes()
    assert readmitted
    lines = [line for line in serve.proc.output().splitlines() if "refused an SSH connection" in line]
    assert len(lines) == 1
    assert "[alpha]" in lines[0]


# ---------------------------------------------------------------- the event loop and memory


def test_a_host_cannot_freeze_the_server_with_copy_data(fleet: Fleet, state: Path, serve: Serve):
    """Actor: a compromised host (alpha). asyncssh's server offered, and served, the `copy-data`
    extension: one 60-byte request copies up to the length it names through the server's read and
    write, synchronously, on the event loop that also runs the broker and every other host's
    SFTP. alpha copies a 16 MiB log onto itself 300 times in one burst (no byte grows, so no cap
    applies). Now copy-data is neither offered nor served (nor ranges@asyncssh.com): every request
    is answered "unsupported", and beta, reading `current` meanwhile, is answered promptly."""
    log = state / "chroot" / "alpha" / "logs" / "big.log"
    log.write_bytes(b"c" * (16 * MiB))
    copy = b"copy-data"

    async def scenario() -> tuple[list[bytes], list[int], float, int]:
        async with connect(serve, fleet, "alpha") as alpha, connect(serve, fleet, "beta") as beta:
            channel, raw, offered = await raw_sftp(alpha)
            handle = await raw_open(channel, raw, b"logs/big.log", 3)  # READ | WRITE
            body = sftp_string(copy) + sftp_string(handle) + struct.pack(">QQ", 0, 16 * MiB)
            body += sftp_string(handle) + struct.pack(">Q", 0)
            channel.write(b"".join(sftp_packet(200, 10 + n, body) for n in range(300)))  # EXTENDED
            answers = asyncio.create_task(packets(raw, 300))
            async with beta.start_sftp_client() as other:
                worst, reads = await prompt(other, answers)
            codes = [struct.unpack(">I", answer[5:9])[0] for answer in await answers]
            return offered, codes, worst, reads

    offered, codes, worst, reads = run(scenario())
    print(f"offered {offered}; beta's slowest read {worst:.3f}s of {reads}")
    assert copy not in offered
    assert b"ranges@asyncssh.com" not in offered
    assert codes == [8] * 300  # delivered, each answered SSH_FX_OP_UNSUPPORTED
    assert worst < 0.5, f"beta waited {worst:.2f}s for one read"
    assert log.read_bytes() == b"c" * (16 * MiB)


def test_a_host_cannot_freeze_the_server_with_a_burst_of_requests(fleet: Fleet, serve: Serve):
    """Actor: a compromised host (alpha). It sends 5,000 LSTAT requests in one write: asyncssh's
    server handled requests that arrived together back to back without ever yielding the event
    loop (60,000 held it for 17.6 s; 5,000 for 1.8 s). It now lets the others run every
    YIELD_EVERY requests: beta, reading `current` meanwhile, is answered promptly."""

    async def scenario() -> tuple[int, float, int]:
        async with connect(serve, fleet, "alpha") as alpha, connect(serve, fleet, "beta") as beta:
            channel, raw, _ = await raw_sftp(alpha)
            async with beta.start_sftp_client() as other:
                channel.write(b"".join(sftp_packet(7, n, sftp_string(b"current")) for n in range(5000)))
                answers = asyncio.create_task(packets(raw, 5000))
                worst, reads = await prompt(other, answers)
            attributes = [answer for answer in await answers if answer[0] == 105]  # ATTRS
            return len(attributes), worst, reads

    answered, worst, reads = run(scenario())
    print(f"beta's slowest read {worst:.3f}s of {reads}")
    assert answered == 5000  # delivered: every LSTAT was answered
    assert worst < 0.5, f"beta waited {worst:.2f}s for one read"


@pytest.mark.parametrize("stops", ["reading its channel", "reading its connection"])
def test_a_host_cannot_make_the_server_hold_its_reads_in_memory(
    fleet: Fleet, state: Path, serve: Serve, stops: str
):
    """Actor: a compromised host (alpha). With a 1 MiB log (its cap is 64 MiB), it sends 200 READ
    requests of 1 MiB and stops reading: its channel (the SSH window closes), or its whole
    connection after granting a 1 GiB window (the server's socket fills). The server read up to
    4 GiB per request and queued every answer without waiting: 200 MiB here, 6 GiB with a 64 MiB
    log and 100 requests. Now a READ answers at most READ_MAX bytes, and the server reads no
    request of a session whose answers cannot leave: it holds a few MiB."""
    log = state / "chroot" / "alpha" / "logs" / "read.log"
    log.write_bytes(b"r" * MiB)

    async def scenario() -> tuple[int, int]:
        async with connect(serve, fleet, "alpha") as alpha:
            window = MiB << 10 if stops == "reading its connection" else 2 * MiB
            channel, raw, _ = await raw_sftp(alpha, window)
            handle = await raw_open(channel, raw, b"logs/read.log", 1)
            channel.write(read_request(9, handle, 0, MiB))
            first = await raw.packet()  # DATA: type, id, then the data's length
            before = rss(serve.proc.pid)
            if stops == "reading its channel":
                channel.pause_reading()
            channel.write(b"".join(read_request(10 + n, handle, 0, MiB) for n in range(200)))
            if stops == "reading its channel":
                await asyncio.sleep(1.5)
            else:
                await asyncio.sleep(0.1)  # the requests leave; then this loop reads nothing
                time.sleep(1.5)  # noqa: ASYNC251 - on purpose: the client stops reading its socket
            grown = rss(serve.proc.pid) - before
            channel.close()
            return struct.unpack(">I", first[5:9])[0], grown

    answered, grown = run(scenario())
    print(f"a READ of 1 MiB answered {answered} bytes; serve's memory grew by {grown / MiB:.1f} MiB")
    assert answered > 0  # delivered: the server read the log for alpha's raw session
    assert serve.proc.alive()
    assert grown < 16 * MiB, f"the server holds {grown / MiB:.0f} MiB of answers alpha does not read"
    assert answered == READ_MAX


# ---------------------------------------------------------------- the byte cap


def test_a_host_cannot_hide_bytes_from_its_cap_in_an_unreadable_directory(
    fleet: Fleet, state: Path, logs: Path, monkeypatch: pytest.MonkeyPatch
):
    """Actor: a compromised host (alpha), against the embedded server running unprivileged (as
    deploy/systemd allows; here root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, which
    checks permissions the same way). alpha fills a directory of its logs/ to the 1 MiB cap and
    chmods it 0000: the quota's count from disk (at start, and a minute after the area was last
    idle: a restart here, not to wait) skipped what os.walk could not read, without a word, and
    alpha wrote another MiB; every minute, another. Now a chmod keeps the owner's bits, so the
    count sees the directory and the cap holds; and a directory the count cannot read (left 0000
    by a server before this one) refuses every write of the area, saying why."""
    remove_host_users(list(fleet.hosts))  # an OpenSSH test's: publish would give them the chroots
    toml = fleet.root / "fleet.toml"
    toml.write_text(toml.read_text().replace("[hosts.alpha]\n", '[hosts.alpha]\nlogs = "1M"\n'))
    monkeypatch.setattr(
        helpers, "HERALD", ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", *helpers.HERALD]
    )
    area = state / "chroot" / "alpha" / "logs"

    async def fill(serve: Serve, directory: str) -> tuple[int, str, int]:
        written, refusal = 0, ""
        async with connect(serve, fleet, "alpha") as conn, conn.start_sftp_client() as sftp:
            try:
                await sftp.mkdir(f"logs/{directory}")
                async with sftp.open(f"logs/{directory}/f", "wb") as out:
                    for block in range(16):
                        await out.write(b"z" * CHUNK, block * CHUNK)
                        written += CHUNK
            except asyncssh.SFTPFailure as exc:
                refusal = exc.reason
            if (area / directory).exists():
                await sftp.chmod(f"logs/{directory}", 0)
        return (
            written,
            refusal,
            (area / directory).stat().st_mode & 0o777 if (area / directory).exists() else -1,
        )

    def served(directory: str) -> tuple[int, str, int]:
        serve = start_serve(fleet, state, logs)
        try:
            return asyncio.run(fill(serve, directory))
        finally:
            serve.stop()

    try:
        first, _, mode = served("one")
        second, full, _ = served("two")
        (area / "one").chmod(0)  # as a server that did not keep the owner's bits left it
        third, uncounted, _ = served("three")
    finally:
        for directory in ("one", "two", "three"):
            if (area / directory).exists():
                (area / directory).chmod(0o750)
    on_disk = sum(path.lstat().st_size for path in area.rglob("*") if path.is_file())
    print(f"written {first}, {second}, {third}; {on_disk} bytes on disk; refusals: {full!r}, {uncounted!r}")
    assert first >= 512 << 10  # delivered: writes reached the disk
    assert on_disk <= MiB
    assert mode == 0o700  # alpha's chmod 0 kept the owner's bits
    assert "logs/ is full" in full
    assert third == 0
    assert "logs/ cannot be counted (logs/one: Permission denied)" in uncounted
