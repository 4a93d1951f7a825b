"""protocol/ssh.py's changes to asyncssh, on a real SSH session with SFTP.

- asyncssh formats a line for every packet before its level check; the check comes first.
- asyncssh sends an empty MSG_IGNORE before every packet, a defence that only CBC ciphers need;
  it is sent with a CBC cipher only.
- asyncssh re-arms its keepalive timer for every chunk received; one timer now serves, and a
  silent peer is still found and dropped.

The tests also fail if the asyncssh internals that protocol/ssh.py replaces change shape, and
those that the embedded server's publisher/sftpfixes.py and publisher/sshgate.py rely on (their
attacks are in tests/test_attacks_sftp.py).
"""

import asyncio
import inspect
import logging
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import asyncssh.connection
import asyncssh.logging
import asyncssh.packet
import asyncssh.sftp
import pytest

import protocol.ssh
import publisher.sftpfixes


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=0)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def asyncssh_log() -> Iterator[_Records]:
    records = _Records()
    package = logging.getLogger("asyncssh")
    level, propagate = package.level, package.propagate
    package.addHandler(records)
    package.propagate = False
    try:
        yield records
    finally:
        package.removeHandler(records)
        package.setLevel(level)
        package.propagate = propagate
        asyncssh.set_debug_level(1)


async def _session(tmp_path: Path, cipher: str = "aes128-gcm@openssh.com") -> None:
    """An SSH connection with SFTP to an in-process asyncssh server: reads one file a few times."""
    (tmp_path / "file").write_bytes(b"x" * 100)
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    authorized = asyncssh.import_authorized_keys(client_key.export_public_key().decode())
    server = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_host_keys=[host_key],
        encryption_algs=[cipher],
        authorized_client_keys=authorized,
        sftp_factory=lambda chan: asyncssh.SFTPServer(chan, chroot=str(tmp_path)),  # type: ignore[arg-type]
    )
    port = server.sockets[0].getsockname()[1]
    try:
        async with (
            asyncssh.connect(
                "127.0.0.1",
                port,
                username="someone",
                client_keys=[client_key],
                known_hosts=([host_key.convert_to_public()], [], []),
                config=None,
                agent_path=None,
                encryption_algs=[cipher],
            ) as conn,
            conn.start_sftp_client() as sftp,
        ):
            for _ in range(5):
                async with sftp.open("file", "rb") as stream:
                    assert await stream.read() == b"x" * 100
    finally:
        server.close()
        await server.wait_closed()


def _run(coroutine: "asyncio.Future[None] | object") -> None:
    async def bounded() -> None:
        async with asyncio.timeout(30):
            await coroutine  # type: ignore[misc]

    asyncio.run(bounded())


def test_packets_are_not_formatted_when_not_shown(
    tmp_path: Path, asyncssh_log: _Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    formatted: list[int] = []
    plural = asyncssh.packet.plural
    monkeypatch.setattr(asyncssh.packet, "plural", lambda *args: formatted.append(1) or plural(*args))
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    asyncssh.set_debug_level(3)
    _run(_session(tmp_path))
    assert formatted == []
    assert asyncssh_log.lines == []


def test_packets_are_logged_as_before_when_shown(tmp_path: Path, asyncssh_log: _Records) -> None:
    logging.getLogger("asyncssh").setLevel(logging.DEBUG)
    asyncssh.set_debug_level(3)
    _run(_session(tmp_path))
    sent = [line for line in asyncssh_log.lines if "] Sent " in line]
    received = [line for line in asyncssh_log.lines if "] Received " in line]
    assert any("Sent MSG_KEXINIT" in line for line in sent)
    assert any("Received MSG_KEXINIT" in line for line in received)
    assert any("FXP_OPEN" in line for line in sent + received)


@pytest.mark.parametrize(
    ("cipher", "ignored"),
    [
        ("aes128-gcm@openssh.com", False),
        ("chacha20-poly1305@openssh.com", False),
        ("aes128-ctr", False),
        ("aes128-cbc", True),
    ],
)
def test_ignore_packets_are_sent_with_cbc_ciphers_only(
    tmp_path: Path, asyncssh_log: _Records, cipher: str, ignored: bool
) -> None:
    logging.getLogger("asyncssh").setLevel(logging.DEBUG)
    asyncssh.set_debug_level(3)
    _run(_session(tmp_path, cipher))
    data = [line for line in asyncssh_log.lines if "Sent MSG_CHANNEL_DATA" in line]
    ignore = [line for line in asyncssh_log.lines if "Sent MSG_IGNORE" in line]
    assert len(data) >= 20  # open, read, read at the end, close: five times, both ways
    assert (len(ignore) >= len(data)) if ignored else (ignore == [])


def test_the_replaced_asyncssh_internals_keep_their_shape() -> None:
    assert asyncssh.packet.SSHPacketLogger._log_packet is protocol.ssh._log_packet_if_shown
    assert asyncssh.logging.SSHLogger.log is protocol.ssh._log_if_shown
    assert list(inspect.signature(protocol.ssh._log_packet).parameters) == [
        "self",
        "msg",
        "pkttype",
        "pktid",
        "packet",
        "note",
    ]
    assert list(inspect.signature(protocol.ssh._log).parameters) == ["self", "level", "msg", "args", "kwargs"]
    assert "self.logger.packet(" in inspect.getsource(protocol.ssh._log_packet)
    assert "self._debug_level >= 3" in inspect.getsource(asyncssh.logging.SSHLogger.packet)
    assert isinstance(asyncssh.logging.SSHLogger._debug_level, int)
    assert asyncssh.connection.SSHConnection.send_packet is protocol.ssh._send_packet_unpadded
    sending = inspect.getsource(protocol.ssh._send_packet)
    inserted = "if self._send_encryption and pkttype > MSG_KEX_LAST:\n"
    assert inserted + "            self.send_packet(MSG_IGNORE, String(b''))" in sending
    assert list(inspect.signature(protocol.ssh._send_packet).parameters) == [
        "self",
        "pkttype",
        "args",
        "handler",
    ]
    connection = asyncssh.connection.SSHConnection
    assert connection._reset_keepalive_timer is protocol.ssh._note_activity
    assert connection._keepalive_timer_callback is protocol.ssh._keepalive_timer_fired
    assert "self._reset_keepalive_timer()" in inspect.getsource(connection._recv_data)
    due = inspect.getsource(protocol.ssh._keepalive_due)
    assert "self._keepalive_count += 1" in due
    assert "self._set_keepalive_timer()" in due
    assert "self._keepalive_timer = self._loop.call_later(" in inspect.getsource(
        connection._set_keepalive_timer
    )
    assert "self._keepalive_timer.cancel()" in inspect.getsource(connection._cancel_keepalive_timer)


def test_a_busy_session_makes_no_timer_per_chunk_and_a_silent_peer_is_still_dropped(tmp_path: Path) -> None:
    """Reads on a session with keepalives on: asyncssh made a timer for every chunk received
    (more than one per read), now a handful in all. Then the client stops reading (it answers
    nothing): the server's keepalive requests go unanswered and it closes the connection after
    keepalive_count_max of them, as asyncssh does."""
    (tmp_path / "file").write_bytes(b"x" * 100)
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    authorized = asyncssh.import_authorized_keys(client_key.export_public_key().decode())

    async def run() -> tuple[int, float]:
        loop = asyncio.get_running_loop()
        lost = asyncio.Event()

        class Watched(asyncssh.SSHServer):
            def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002
                lost.set()

        server = await asyncssh.listen(
            "127.0.0.1",
            0,
            server_factory=Watched,
            server_host_keys=[host_key],
            authorized_client_keys=authorized,
            keepalive_interval=0.3,
            keepalive_count_max=2,
            sftp_factory=lambda chan: asyncssh.SFTPServer(chan, chroot=str(tmp_path)),  # type: ignore[arg-type]
        )
        port = server.sockets[0].getsockname()[1]
        made = 0
        arm = asyncssh.connection.SSHConnection._set_keepalive_timer

        def counted(self: asyncssh.connection.SSHConnection) -> None:
            nonlocal made
            made += bool(self._keepalive_interval)  # the server's connection: the client has none
            arm(self)

        try:
            conn = await asyncssh.connect(
                "127.0.0.1",
                port,
                username="someone",
                client_keys=[client_key],
                known_hosts=([host_key.convert_to_public()], [], []),
                config=None,
                agent_path=None,
            )
            sftp = await conn.start_sftp_client()
            asyncssh.connection.SSHConnection._set_keepalive_timer = counted  # type: ignore[method-assign]
            try:
                for _ in range(50):
                    async with sftp.open("file", "rb") as stream:
                        assert await stream.read() == b"x" * 100
            finally:
                asyncssh.connection.SSHConnection._set_keepalive_timer = arm  # type: ignore[method-assign]
            conn._transport.pause_reading()  # type: ignore[union-attr]
            silent = loop.time()
            try:
                async with asyncio.timeout(10):
                    await lost.wait()
                return made, loop.time() - silent
            finally:
                conn.abort()  # it reads nothing: a graceful close would wait for ever
        finally:
            server.close()
            await server.wait_closed()

    made, until_dropped = asyncio.run(run())
    assert made < 5  # 50 opens, reads and closes: 300 chunks or more, each a new timer before
    assert 0.6 <= until_dropped < 5  # three intervals: two requests unanswered, then dropped


def test_the_sftp_server_internals_herald_changes_are_the_ones_reviewed() -> None:
    """asyncssh 2.24's SFTP server as publisher/sftpfixes.py found it: an upgrade that serves a new
    request, implements flow control or reads requests another way needs a new look."""
    fixes = publisher.sftpfixes
    handler = asyncssh.sftp.SFTPServerHandler
    assert [name for name, _ in handler._extensions] == [
        b"newline",
        b"vendor-id",
        b"posix-rename@openssh.com",
        b"hardlink@openssh.com",
        b"fsync@openssh.com",
        b"lsetstat@openssh.com",
        b"limits@openssh.com",
        b"statvfs@openssh.com",
        b"fstatvfs@openssh.com",
    ]
    served = {name for name in handler._packet_handlers if isinstance(name, bytes)}
    assert served == fixes.OFFERED - {b"newline", b"vendor-id"}
    assert handler._packet_handlers[b"limits@openssh.com"] is fixes._limits
    assert len([name for name in handler._packet_handlers if isinstance(name, int)]) == 21
    assert "self._server.read(file_obj, offset, length)" in inspect.getsource(handler._process_read)
    assert "self._server.fsync(file_obj)" in inspect.getsource(handler._process_fsync)
    # Requests are read and answered one after another, the answer written without waiting:
    # the pacing goes before each read.
    assert handler.recv_packet is fixes._recv_packet_paced
    assert "await self._reader.readexactly(4)" in inspect.getsource(fixes._recv_packet)
    receiving = inspect.getsource(asyncssh.sftp.SFTPHandler.recv_packets)
    assert "packet = await self.recv_packet()" in receiving
    assert "await self._process_packet(pkttype, pktid, packet)" in receiving
    assert "self._writer.write(UInt32(len(payload)) + payload)" in inspect.getsource(
        asyncssh.sftp.SFTPHandler.send_packet
    )
    # asyncssh ignores its transport's flow control; the server's connections now keep it.
    server = asyncssh.connection.SSHServerConnection
    assert server.pause_writing is fixes._pause_writing
    assert server.resume_writing is fixes._resume_writing
    assert server.connection_lost is fixes._connection_lost_resuming
    assert "Do nothing with this for now" in inspect.getsource(
        asyncssh.connection.SSHConnection.pause_writing
    )
    assert fixes._connection_lost is asyncssh.connection.SSHConnection.connection_lost


def test_the_connection_hooks_the_gate_uses_are_the_ones_reviewed() -> None:
    """publisher/sshgate.py drops a connection from SSHServer.connection_made, before asyncssh
    sends its version (which it then skips), and counts logins in auth_completed."""
    made = inspect.getsource(asyncssh.connection.SSHConnection.connection_made)
    assert made.index("self._owner.connection_made(self)") < made.index("self._send_version()")
    assert "if self._transport:" in inspect.getsource(asyncssh.connection.SSHConnection._send)
    assert "self._loop.call_soon(self._cleanup, exc)" in inspect.getsource(
        asyncssh.connection.SSHConnection._force_close
    )
    success = inspect.getsource(asyncssh.connection.SSHConnection.send_userauth_success)
    assert "self.set_extra_info(username=self._username)" in success
    assert success.index("set_extra_info(username=") < success.index("self._owner.auth_completed()")
