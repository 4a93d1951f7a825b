"""SSH settings both ends share: the agent's connection and the embedded SFTP server."""

import logging
from typing import Final

import asyncssh.connection
import asyncssh.constants
import asyncssh.logging
import asyncssh.packet

# AES-GCM first: `cryptography` does one AEAD call per packet, where asyncssh's
# chacha20-poly1305 builds cipher objects for every packet. Under 100 agents fetching at
# once, the embedded server spent a fifth of its time in chacha20 and poly1305. OpenSSH
# speaks all of these; the rest of the list is the fallback for servers that do not.
CIPHERS: Final = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes256-ctr",
    "aes192-ctr",
    "aes128-ctr",
)


# asyncssh builds a log line for every SSH and SFTP packet (its type name, its size, the
# arguments turned to text) before the logging level drops it: about 6% of the embedded SFTP
# server's time under 100 agents. The level is checked first here; with asyncssh's debug logging
# on (asyncssh.set_debug_level and a DEBUG level), every line is written as before.
# tests/test_ssh_fixes.py fails if these asyncssh internals change shape.
_PACKET_LEVEL: Final = 3  # asyncssh logs packets at debug level 3
_log_packet: Final = asyncssh.packet.SSHPacketLogger._log_packet  # noqa: SLF001
_log: Final = asyncssh.logging.SSHLogger.log


def _log_packet_if_shown(
    self: asyncssh.packet.SSHPacketLogger,
    msg: str,
    pkttype: int,
    pktid: int | None,
    packet: object,
    note: str,
) -> None:
    logger = self.logger
    if logger._debug_level >= _PACKET_LEVEL and logger.isEnabledFor(logging.DEBUG):  # noqa: SLF001
        _log_packet(self, msg, pkttype, pktid, packet, note)  # type: ignore[arg-type]


def _log_if_shown(
    self: asyncssh.logging.SSHLogger, level: int, msg: object, *args: object, **kwargs: object
) -> None:
    if self.isEnabledFor(level):
        _log(self, level, msg, *args, **kwargs)


asyncssh.packet.SSHPacketLogger._log_packet = _log_packet_if_shown  # type: ignore[method-assign]  # noqa: SLF001
asyncssh.logging.SSHLogger.log = _log_if_shown  # type: ignore[method-assign]


# asyncssh sends an empty MSG_IGNORE packet before every packet after key exchange: a defence
# for CBC ciphers, whose next IV is the last ciphertext block an attacker has seen. With an
# AEAD or CTR cipher (all of CIPHERS) it protects nothing and doubles the packets: every SFTP
# request and reply was two packets, two encryptions and two writes on each end. It is still
# sent when the cipher in use is a CBC one. tests/test_ssh_fixes.py checks both.
_IGNORE: Final = asyncssh.constants.MSG_IGNORE
_EMPTY: Final = b"\0\0\0\0"  # String(b"")
_send_packet: Final = asyncssh.connection.SSHConnection.send_packet


def _send_packet_unpadded(
    self: asyncssh.connection.SSHConnection,
    pkttype: int,
    *args: bytes,
    handler: asyncssh.packet.SSHPacketLogger | None = None,
) -> None:
    if pkttype == _IGNORE and args == (_EMPTY,) and not _cbc(self):
        return
    _send_packet(self, pkttype, *args, handler=handler)


def _cbc(connection: asyncssh.connection.SSHConnection) -> bool:
    cipher = connection.get_extra_info("send_cipher")
    return cipher is None or str(cipher).endswith(("-cbc", "-cbc@ssh.com"))


asyncssh.connection.SSHConnection.send_packet = _send_packet_unpadded  # type: ignore[method-assign]


# asyncssh cancels its keepalive timer and makes a new one (a TimerHandle, a heap entry) for every
# chunk of data it receives: about 5% of the embedded server's time at 1000 hosts updating, and as
# much of each agent's fetch. Here a chunk only notes the time; the one timer, when it fires
# with data received since, sleeps for what is left of the interval. A connection that stays
# silent for the interval gets its keepalive request as before, and one that stays silent
# through keepalive_count_max of them is closed as before (tests/test_ssh_fixes.py).
_keepalive_due: Final = asyncssh.connection.SSHConnection._keepalive_timer_callback  # noqa: SLF001


def _note_activity(self: asyncssh.connection.SSHConnection) -> None:
    if self._auth_complete and self._keepalive_interval:
        self._herald_active = self._loop.time()  # type: ignore[attr-defined]
        if self._keepalive_timer is None:
            self._set_keepalive_timer()


def _keepalive_timer_fired(self: asyncssh.connection.SSHConnection) -> None:
    quiet = self._loop.time() - getattr(self, "_herald_active", float("-inf"))
    if quiet < self._keepalive_interval:  # data came after the timer was set: not quiet yet
        self._keepalive_timer = self._loop.call_later(
            self._keepalive_interval - quiet, self._keepalive_timer_callback
        )
        return
    _keepalive_due(self)


asyncssh.connection.SSHConnection._reset_keepalive_timer = _note_activity  # type: ignore[method-assign]  # noqa: SLF001
asyncssh.connection.SSHConnection._keepalive_timer_callback = _keepalive_timer_fired  # type: ignore[method-assign]  # noqa: SLF001
