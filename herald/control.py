"""STATE/run/admin/socket: how `herald host remove` asks a running `herald serve` to forget a host.

A signal carries no host name and gets no answer, and `serve` holds what only it can drop: the
host's SFTP connections and MQTT sessions, the broker's retained messages, the fleet view behind
the page and /metrics. So `serve` listens on a Unix socket in a directory only its own user can
enter (0700; root passes anyway): whoever can connect could as well edit the state directory.
One request per connection, a JSON line, answered with one JSON line.
"""

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

import msgspec
from loguru import logger

from protocol.topics import is_host_name

_MAX_REQUEST: Final = 4096
TIMEOUT: Final = 30.0


class Request(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    remove: str  # the host to forget


class Answer(msgspec.Struct, frozen=True):
    sftp_sessions: int = 0  # SFTP connections closed
    mqtt_sessions: int = 0  # MQTT sessions dropped (without their will)
    retained: list[str] = []  # topics whose retained message was cleared
    broker: bool = False  # whether this serve runs the broker (else retained messages are elsewhere)
    error: str = ""


def socket_path(state: Path) -> Path:
    return state / "run" / "admin" / "socket"


Handler = Callable[[str], Awaitable[Answer]]


async def listen(state: Path, remove: Handler) -> asyncio.AbstractServer | None:
    """Listen for requests; None (and a warning) when the socket cannot be made."""
    path = socket_path(state)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.parent.chmod(0o700)
        path.unlink(missing_ok=True)
        return await asyncio.start_unix_server(lambda r, w: _answer(r, w, remove), path=str(path))
    except OSError as exc:
        logger.warning(
            "admin socket {} not made ({}): herald host remove cannot reach this server", path, exc
        )
        return None


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, remove: Handler) -> None:
    try:
        async with asyncio.timeout(TIMEOUT):
            line = await reader.readline()
            try:
                request = msgspec.json.decode(line[:_MAX_REQUEST], type=Request)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                answer = Answer(error=f"bad request: {exc}")
            else:
                if is_host_name(request.remove):
                    answer = await remove(request.remove)
                else:
                    answer = Answer(error="not a host name")
            writer.write(msgspec.json.encode(answer) + b"\n")
            await writer.drain()
    except (OSError, TimeoutError) as exc:
        logger.warning("admin socket: {}", exc)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def ask(state: Path, host: str) -> Answer | None:
    """Ask the `serve` running on `state` to forget `host`; None when none listens."""
    path = socket_path(state)
    if not path.exists():
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(TIMEOUT)
        try:
            conn.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return None  # a socket left by a serve that is gone
        conn.sendall(msgspec.json.encode(Request(remove=host)) + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    return msgspec.json.decode(data, type=Answer)
