"""One load process of bench/broker.py: a share of the fleet's hosts as minimal MQTT clients.

    python -m bench.mqtt_worker HOSTS.json HOST PORT

The clients speak just enough MQTT 3.1.1 (CONNECT with a password, SUBSCRIBE, PUBLISH with
PUBACK, DISCONNECT) to cost the machine as little as possible: the broker under test shares
these two cores with them, where real hosts would bring their own.

Commands are JSON lines on stdin, answers JSON lines on stdout:
    {"do": "connect"}     connect and subscribe every host to its desired  -> {"at": time}
                          (at QoS 0, as agents subscribe)
    {"do": "fanout"}      wait until every host received its desired       -> {"received": {host: time}}
    {"do": "disconnect"}  DISCONNECT every host                            -> {"disconnected": n}
Every wait is bounded; a failure is answered as {"error": ...}.
"""

import asyncio
import contextlib
import json
import struct
import sys
import time
from pathlib import Path

LIMIT = 120.0


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def _packet(kind: int, body: bytes) -> bytes:
    length, size = b"", len(body)
    while True:
        size, digit = divmod(size, 128)
        length += bytes([digit | (0x80 if size else 0)])
        if not size:
            return bytes([kind]) + length + body


def _connect(host: str, secret: str) -> bytes:
    flags = 0x80 | 0x40 | 0x02  # user name, password, clean session
    return _packet(
        0x10,
        _string("MQTT")
        + bytes([4, flags])
        + struct.pack("!H", 60)
        + _string(f"{host}.bench")  # a client id of the user's own (protocol.mqtt.client_id)
        + _string(host)
        + _string(secret),
    )


async def _read(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    kind = (await reader.readexactly(1))[0]
    size, shift = 0, 0
    while True:
        digit = (await reader.readexactly(1))[0]
        size |= (digit & 0x7F) << shift
        shift += 7
        if not digit & 0x80:
            return kind, await reader.readexactly(size)


class Client:
    def __init__(self, host: str, secret: str) -> None:
        self.host = host
        self.secret = secret
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None
        self.received: float | None = None

    async def connect(self, port: int, everyone: "Hosts") -> None:
        reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        self.writer.write(_connect(self.host, self.secret))
        kind, body = await _read(reader)
        if kind != 0x20 or body[1] != 0:
            raise RuntimeError(f"{self.host}: CONNACK {body!r}")
        self.writer.write(
            _packet(0x82, struct.pack("!H", 1) + _string(f"herald/{self.host}/desired") + b"\x00")
        )
        kind, body = await _read(reader)
        if kind != 0x90 or body[2] == 0x80:
            raise RuntimeError(f"{self.host}: SUBACK {body!r}")
        self.task = asyncio.create_task(self.listen(reader, everyone))

    async def listen(self, reader: asyncio.StreamReader, everyone: "Hosts") -> None:
        try:
            while True:
                kind, body = await _read(reader)
                if kind >> 4 != 3:  # PUBLISH
                    continue
                if self.received is None:
                    self.received = time.time()
                    everyone.arrived()
                if kind & 0x06 and self.writer is not None:  # QoS 1: acknowledge
                    topic_length = struct.unpack("!H", body[:2])[0]
                    self.writer.write(_packet(0x40, body[2 + topic_length : 4 + topic_length]))
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    async def disconnect(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.writer is not None:
            self.writer.write(_packet(0xE0, b""))
            self.writer.close()
            with contextlib.suppress(ConnectionError):
                await self.writer.wait_closed()
        self.writer, self.task, self.received = None, None, None


class Hosts:
    def __init__(self, secrets: dict[str, str], port: int) -> None:
        self.clients = [Client(host, secret) for host, secret in secrets.items()]
        self.port = port
        self.count = 0
        self.everyone = asyncio.Event()

    def arrived(self) -> None:
        self.count += 1
        if self.count == len(self.clients):
            self.everyone.set()

    async def connect(self) -> dict[str, float]:
        self.count = 0
        self.everyone.clear()
        async with asyncio.timeout(LIMIT):
            await asyncio.gather(*(client.connect(self.port, self) for client in self.clients))
        return {"at": time.time()}

    async def fanout(self) -> dict[str, dict[str, float]]:
        async with asyncio.timeout(LIMIT):
            await self.everyone.wait()
        return {"received": {client.host: client.received for client in self.clients if client.received}}

    async def disconnect(self) -> dict[str, int]:
        await asyncio.gather(*(client.disconnect() for client in self.clients))
        return {"disconnected": len(self.clients)}


async def main() -> None:
    hosts = Hosts(json.loads(Path(sys.argv[1]).read_text()), int(sys.argv[3]))
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    while line := await reader.readline():
        command = json.loads(line)["do"]
        try:
            answer: object = await getattr(hosts, command)()
        except (RuntimeError, TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
            answer = {"error": f"{command}: {exc!r}"}
        print(json.dumps(answer), flush=True)
    await hosts.disconnect()


if __name__ == "__main__":
    asyncio.run(main())
