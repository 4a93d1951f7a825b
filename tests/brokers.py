"""The two brokers herald runs against, as real processes: the embedded amqtt (`herald serve`)
and a real Mosquitto started from `herald broker export` (with `herald serve --broker` announcing
on it). The `broker` fixture (conftest.py) gives each test both."""

import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import paho.mqtt.client as mqtt
from helpers import Fleet, Proc, Serve, herald, need, start_serve, wait_until


def broker_secret(state: Path, user: str) -> str:
    """A broker user's secret as the server keeps it: the service users' in STATE/broker/, a
    host's in its chroot's credentials/."""
    if user.startswith("herald-"):
        return (state / "broker" / f"{user}.secret").read_text().strip()
    return (state / "chroot" / user / "credentials" / "broker.secret").read_text().strip()


class Received(NamedTuple):
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass
class Session:
    """One paho connection, its CONNACK and what it receives."""

    client: mqtt.Client
    code: list[object] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    granted: list[list[int]] = field(default_factory=list)
    closed: bool = False  # the broker closed the connection

    @property
    def refused(self) -> bool:
        """The broker answered the CONNECT with a refusal, or closed the connection instead
        (Mosquitto does so for a will that names no valid topic)."""
        return (bool(self.code) and self.code[0].is_failure) or (self.closed and not self.code)  # type: ignore[attr-defined]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def drop(self) -> None:
        """End the TCP connection without DISCONNECT, as a crash or a pulled cable does."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def open_session(
    port: int,
    user: str | None,
    password: str | None,
    *,
    identifier: str,
    will: tuple[str, bytes] | None = None,
    subscribe: tuple[str, ...] = (),
    qos: int = 1,
    keepalive: int = 30,
    where: str = "",
) -> Session:
    """Connect (and subscribe) as `user`; returns once the broker answered the CONNECT (and the
    SUBSCRIBE, if any)."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=identifier, reconnect_on_failure=False)
    made = Session(c)
    if user is not None:
        c.username_pw_set(user, password)
    if will is not None:
        c.will_set(will[0], will[1], qos=1, retain=True)

    def on_connect(client: mqtt.Client, _u: object, _f: object, rc: object, _p: object) -> None:
        made.code.append(rc)
        if not rc.is_failure:  # type: ignore[attr-defined]
            for topic in subscribe:
                client.subscribe(topic, qos=qos)

    def on_disconnect(*_args: object) -> None:
        made.closed = True

    c.on_connect = on_connect
    c.on_disconnect = on_disconnect
    c.on_subscribe = lambda _c, _u, _m, codes, _p: made.granted.append([int(code.value) for code in codes])
    c.on_message = lambda _c, _u, m: made.received.append(
        Received(m.topic, bytes(m.payload), m.qos, bool(m.retain))
    )
    c.connect("127.0.0.1", port, keepalive=keepalive)
    c.loop_start()
    wait_until(lambda: made.code or made.closed, f"CONNACK for {user}{where}")
    if not made.refused and subscribe:
        wait_until(lambda: made.granted, f"SUBACK for {user}{where}")
    return made


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Broker:
    kind: str
    port: int
    state: Path
    fleet: Fleet
    logs: Path
    mosquitto: list[str]  # the command that starts Mosquitto; [] for the embedded broker
    serve: Serve | None = None  # herald serve: the embedded broker itself, or announcing on Mosquitto
    proc: Proc | None = None  # the Mosquitto process

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def server(self) -> Serve:
        assert self.serve is not None
        return self.serve

    def secret(self, user: str) -> str:
        return broker_secret(self.state, user)

    def start(self) -> None:
        if not self.mosquitto:  # the embedded broker, on the same ports as before
            sftp = f"127.0.0.1:{self.serve.sftp_port}" if self.serve else "127.0.0.1:0"
            self.serve = start_serve(
                self.fleet, self.state, self.logs, mqtt=f"127.0.0.1:{self.port}", sftp=sftp
            )
            return
        self.proc = Proc("mosquitto", self.mosquitto, self.logs / f"mosquitto-{time.monotonic_ns()}.log")

        def listening() -> bool:
            assert self.proc is not None
            if not self.proc.alive():
                raise AssertionError(f"mosquitto exited:\n{self.proc.output()}")
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(listening, "mosquitto listening")

    def kill(self) -> None:
        (self.proc or self.server.proc).stop(sig=signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
        if self.serve is not None:
            self.serve.stop()


def start_broker(kind: str, fleet: Fleet, state: Path, logs: Path, tmp_path: Path) -> Broker:
    """A running broker of `kind` ("embedded" or "mosquitto") with `herald serve` announcing on it."""
    port = free_port()
    if kind == "embedded":
        made = Broker("embedded", port, state, fleet, logs, mosquitto=[])
        made.start()
    else:
        mosquitto = need("mosquitto")
        assert herald("publish", "--fleet", str(fleet.root), "--state", str(state), "--init").returncode == 0
        exported = herald(
            "broker", "export", "--state", str(state), "--fleet", str(fleet.root), str(tmp_path / "mq")
        )
        assert exported.returncode == 0, exported.stderr
        conf = tmp_path / "mosquitto.conf"
        fragment = (tmp_path / "mq" / "mosquitto.conf").read_text()
        conf.write_text(
            f"listener {port} 127.0.0.1\nuser root\npersistence false\nlog_dest stderr\n{fragment}"
        )
        made = Broker("mosquitto", port, state, fleet, logs, mosquitto=[mosquitto, "-c", str(conf)])
        made.start()
        made.serve = start_serve(fleet, state, logs, mqtt=None, broker=made.url)
    return made
