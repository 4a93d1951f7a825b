"""The two brokers herald runs against, as real processes: the embedded amqtt (`herald serve`)
and a real Mosquitto started from `herald broker export` (with `herald serve --broker` announcing
on it). The `broker` fixture (conftest.py) gives each test both."""

import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from helpers import Fleet, Proc, Serve, herald, need, start_serve, wait_until


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
        if user.startswith("herald-"):
            return (self.state / "broker" / f"{user}.secret").read_text().strip()
        return (self.state / "chroot" / user / "credentials" / "broker.secret").read_text().strip()

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
