"""The local page on 127.0.0.1:9999: this host's state, its last runs, an "Update now" button.

It is for the person at the machine. It binds to loopback only (agent.toml refuses anything
else), starts nothing but a check, and serves nothing but the state and the logs of the last
runs (what the server's logs/ holds too). A POST must carry the token printed
in the page, and the Host header must name the loopback address: another web page the person
visits can neither trigger it (CSRF) nor read it through a rebound DNS name.

Any local user can connect, and each connection is a thread and a descriptor of the agent: at
most CONNECTIONS are served at once (a browser opens six), more are closed at once, and one that
sends nothing is closed after TIMEOUT seconds. Whoever holds them all keeps the page busy, not
the agent and its updates.
"""

import asyncio
import html
import secrets
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final
from urllib.parse import parse_qs

from loguru import logger

from client.store import Run
from protocol.messages import State

_MAX_BODY: Final = 1024
HISTORY: Final = 10
CONNECTIONS: Final = 8
TIMEOUT: Final = 5.0  # seconds a connection may wait on each read or write


def render(host: str, state: State, token: str, history: list[Run]) -> str:
    e = html.escape
    rows = [
        ("phase", state.phase),
        ("reboot needed", "yes" if state.needs_reboot else "no"),
        ("deployed generation", state.deployed_generation or "none yet"),
        ("target generation", state.target_generation or "-"),
        ("since", state.since.isoformat(timespec="seconds")),
        ("message", state.message),
        ("last log", state.log or "-"),
    ]
    table = "\n".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in rows)
    runs = "\n".join(
        f"<tr><td>{e(run.at.astimezone().strftime('%Y-%m-%d %H:%M'))}</td><td>{run.generation}</td>"
        f'<td>{e(run.result)}</td><td><a href="/logs/{e(run.log)}">log</a></td></tr>'
        for run in history
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>herald: {e(host)}</title>
<meta http-equiv="refresh" content="10">
<style>body{{font-family:sans-serif;margin:2em}}th,td{{text-align:left;padding-right:1em}}</style>
</head><body>
<h1>{e(host)}</h1>
<table>
{table}
</table>
<form method="post" action="/check"><input type="hidden" name="token" value="{e(token)}">
<button type="submit">Update now</button></form>
<h2>Last updates</h2>
<table id="history">
<tr><th>time</th><th>generation</th><th>result</th><th></th></tr>
{runs}
</table>
</body></html>
"""


_Request = socket.socket | tuple[bytes, socket.socket]  # socketserver's


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # a burst waits in the kernel to be accepted (and dropped), not retried 1s later
    page: "LocalPage"

    def server_activate(self) -> None:
        super().server_activate()
        self._slots = threading.BoundedSemaphore(CONNECTIONS)

    def process_request(self, request: _Request, client_address: Any) -> None:  # noqa: ANN401 - socketserver's
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # one person needs no more: closed at once
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: _Request, client_address: Any) -> None:  # noqa: ANN401
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "herald"
    sys_version = ""
    timeout = TIMEOUT

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib's name
        pass

    def _send(
        self,
        status: HTTPStatus,
        body: str = "",
        headers: dict[str, str] | None = None,
        kind: str = "text/html",
    ) -> None:
        data = body.encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", f"{kind}; charset=utf-8")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Frame-Options", "DENY")
        self.end_headers()
        self.wfile.write(data)

    def _local(self) -> bool:
        allowed = {f"{name}:{self.server.page.port}" for name in ("127.0.0.1", "localhost", "[::1]")}
        return self.headers.get("Host", "") in allowed

    def do_GET(self) -> None:
        page = self.server.page
        if not self._local():
            self._send(HTTPStatus.FORBIDDEN, "forbidden\n")
        elif self.path == "/":
            self._send(HTTPStatus.OK, render(page.host, page.state(), page.token, page.history()))
        elif self.path.startswith("/logs/") and (text := page.log(self.path.removeprefix("/logs/"))):
            self._send(HTTPStatus.OK, text, kind="text/plain")
        else:
            self._send(HTTPStatus.NOT_FOUND, "not found\n")

    def do_POST(self) -> None:
        page = self.server.page
        length = int(self.headers.get("Content-Length") or 0)
        if self.path != "/check" or not self._local() or not 0 < length <= _MAX_BODY:
            self._send(HTTPStatus.FORBIDDEN, "forbidden\n")
            return
        form = parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
        if not secrets.compare_digest(form.get("token", [""])[0], page.token):
            self._send(HTTPStatus.FORBIDDEN, "forbidden\n")
            return
        page.loop.call_soon_threadsafe(page.request_check)
        self._send(HTTPStatus.SEE_OTHER, "", {"Location": "/"})


class LocalPage:
    def __init__(
        self,
        host: str,
        bind: tuple[str, int],
        state: Callable[[], State],
        request_check: Callable[[], None],
        history: Callable[[], list[Run]] = list,
        log: Callable[[str], str | None] = lambda _name: None,
    ) -> None:
        self.host = host
        self.history = history
        self.log = log
        self.token = secrets.token_urlsafe(16)
        self.state = state
        self.loop = asyncio.get_running_loop()
        self.request_check = request_check
        address = bind[0].strip("[]")
        self._server = (_Server6 if ":" in address else _Server)((address, bind[1]), _Handler)
        self._server.page = self
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-page", daemon=True)

    def start(self) -> None:
        self._thread.start()
        logger.bind(host=self.host).info("local page on http://127.0.0.1:{}/", self.port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
