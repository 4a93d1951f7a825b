"""asyncssh 2.24's SFTP server handler (asyncssh/sftp.py, SFTPServerHandler), changed where the
embedded server needs it. Importing this module applies the changes; they touch the server side
only (the agent's SFTP client is asyncssh's own). tests/test_ssh_fixes.py fails if the internals
they replace change shape, tests/test_attacks_sftp.py has the attack each one stops.

- **Extensions.** asyncssh offers, and serves whether offered or not, `copy-data`: one request
  copies up to the length it names through ChrootSFTPServer.read and .write, synchronously, on the
  event loop every host shares (300 requests over a 16 MiB log froze it for seconds), and
  `ranges@asyncssh.com`, which calls methods our file objects (descriptors) do not have. Neither is
  offered or served; the agent uses no extension. `limits@openssh.com` tells the truth: reads of
  at most READ_MAX, HANDLES open files (asyncssh said 4 MiB and the process's descriptor limit).
- **Pacing.** The handler reads a request, answers it, and reads the next, never waiting for its
  answers to leave and never yielding while requests are queued: a client that stopped reading
  made the server hold every answer (200 reads of 1 MiB: 200 MiB), and 60,000 LSTATs sent at once
  held the loop for 17.6 s. Before each request it now waits while its channel's output (asyncssh's
  write buffer limits) or its connection's (the transport's, which asyncssh ignores) is over the
  high-water mark, and every YIELD_EVERY requests it lets the loop run others.
"""

import asyncio
import itertools
from typing import Final
from weakref import WeakKeyDictionary

import asyncssh.connection
import asyncssh.packet
import asyncssh.sftp
from asyncssh.sftp import SFTPServerHandler

from publisher.quota import HANDLES

READ_MAX: Final = 256 << 10  # bytes one READ answers at most, as OpenSSH's sftp-server
YIELD_EVERY: Final = 16  # requests handled back to back before the loop runs others

# Offered and served. newline, vendor-id: informational; the rest do bounded work per request
# through ChrootSFTPServer's methods, which check every path and write.
OFFERED: Final = frozenset(
    {
        b"newline",
        b"vendor-id",
        b"posix-rename@openssh.com",
        b"hardlink@openssh.com",  # refused by ChrootSFTPServer.link
        b"fsync@openssh.com",  # in a thread (ChrootSFTPServer.fsync)
        b"lsetstat@openssh.com",
        b"limits@openssh.com",
        b"statvfs@openssh.com",
        b"fstatvfs@openssh.com",
    }
)
REFUSED: Final = frozenset({b"copy-data", b"ranges@asyncssh.com"})


async def _limits(
    self: SFTPServerHandler,  # noqa: ARG001 - a handler of SFTPServerHandler
    packet: asyncssh.packet.SSHPacket,
) -> asyncssh.SFTPLimits:
    """asyncssh's _process_limits, with herald's limits."""
    packet.check_end()
    return asyncssh.SFTPLimits(
        asyncssh.sftp.MAX_SFTP_PACKET_LEN, READ_MAX, asyncssh.sftp.MAX_SFTP_WRITE_LEN, HANDLES
    )


SFTPServerHandler._extensions = [  # noqa: SLF001
    (name, data)
    for name, data in SFTPServerHandler._extensions  # noqa: SLF001
    if name in OFFERED
]
for _name in REFUSED:
    SFTPServerHandler._packet_handlers.pop(_name)  # noqa: SLF001 - answered "unsupported"
SFTPServerHandler._packet_handlers[b"limits@openssh.com"] = _limits  # noqa: SLF001


# ---------------------------------------------------------------- pacing

# A server connection whose transport is over its high-water mark: resolved when it drains
# or the connection is lost.
_blocked: "WeakKeyDictionary[asyncssh.connection.SSHConnection, asyncio.Future[None]]" = WeakKeyDictionary()
_handled: Final = itertools.count(1)
_recv_packet: Final = asyncssh.sftp.SFTPHandler.recv_packet
_connection_lost: Final = asyncssh.connection.SSHServerConnection.connection_lost


def _pause_writing(self: asyncssh.connection.SSHConnection) -> None:
    if self not in _blocked:
        _blocked[self] = asyncio.get_running_loop().create_future()


def _resume_writing(self: asyncssh.connection.SSHConnection) -> None:
    waiter = _blocked.pop(self, None)
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


def _connection_lost_resuming(self: asyncssh.connection.SSHConnection, exc: Exception | None = None) -> None:
    _resume_writing(self)  # its sessions go on to read, and find the channel closed
    _connection_lost(self, exc)


async def _recv_packet_paced(self: asyncssh.sftp.SFTPHandler) -> asyncssh.packet.SSHPacket:
    """The next request, once this session's answers have room to go."""
    if not next(_handled) % YIELD_EVERY:
        await asyncio.sleep(0)
    writer = self._writer
    if writer is not None:
        await writer.drain()  # while the channel's write buffer is over its high-water mark (64 KiB)
        waiter = _blocked.get(writer.channel.get_connection()) if _blocked else None
        if waiter is not None:
            await waiter
    return await _recv_packet(self)


asyncssh.connection.SSHServerConnection.pause_writing = _pause_writing  # type: ignore[method-assign]
asyncssh.connection.SSHServerConnection.resume_writing = _resume_writing  # type: ignore[method-assign]
asyncssh.connection.SSHServerConnection.connection_lost = _connection_lost_resuming  # type: ignore[method-assign]
SFTPServerHandler.recv_packet = _recv_packet_paced  # type: ignore[method-assign]
