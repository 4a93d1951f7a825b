"""The fleet on HTTP, from `herald serve`: a read-only page, the same rows as JSON, and metrics.

    GET /                    the fleet table, refreshing itself every 5 seconds (no script needed)
    GET /status.json         what `herald status --json` prints
    GET /metrics             Prometheus text: generations, status, last seen per host; publish
                             figures; the rollout (herald_rollout_*)
    GET /logs/<host>/<name>  one log the host uploaded (the table's log column links to it)

Everything shown comes from the retained MQTT messages (herald.fleet.follow) and fleet.toml (or,
without a broker, from the chroots); the publish figures from STATE/publisher/figures.json, which
every publish run adds to. A log is hostile data: it is looked up only by a name as an agent makes
it (protocol.release.LOG_NAME: never a path), read by herald.hostlogs' rules (no link, FIFO or
hard link is ever opened) and served as escaped plain text that no browser may sniff as HTML.
"""

import asyncio
import html
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

from aiohttp import web
from loguru import logger
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from herald.fleet import LOG_COLUMN, WAVE, FleetView, Status, as_json, cells, columns, rows
from herald.hostlogs import HostLogs
from herald.rolloutview import metrics as rollout_metrics
from herald.rolloutview import strip
from protocol.errors import ConfigError
from protocol.hosttext import safe
from protocol.listen import cannot_listen
from protocol.release import LOG_NAME
from protocol.topics import is_host_name
from publisher.figures import read_figures

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; }
table { border-collapse: collapse; }
th, td { text-align: left; padding: 0.25em 0.9em 0.25em 0; }
td.status-failed, td.status-rolled-back { color: #b00020; font-weight: bold; }
td.status-pending, td.status-applying, td.status-postponed { color: #a05a00; }
td.status-up-to-date { color: #1b7f3b; }
td.status-offline, td.status-never-seen, td.status-sftp-only { color: #777; }
ol.waves { display: flex; gap: 1.2em; list-style: none; padding: 0; }
li.wave { border: 1px solid #ccc; padding: 0.4em 0.7em; }
li.wave-passed { border-color: #1b7f3b; }
li.wave-started, li.wave-soaking { border-color: #a05a00; }
"""
# A log, as the browser gets it: text it must not sniff as HTML, that runs and loads nothing.
_LOG_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'"}


def _log_cell(host: str, name: str) -> str:
    """The log column: a link to the log when its name is one an agent makes, else text."""
    if LOG_NAME.fullmatch(name) is None:
        return f"<td>{html.escape(name)}</td>"
    href = f"/logs/{urllib.parse.quote(host)}/{urllib.parse.quote(name)}"
    return f'<td><a href="{html.escape(href)}">{html.escape(name)}</a></td>'


def page(view: FleetView) -> str:
    shown = columns(view)
    header = "".join(f"<th>{html.escape(column)}</th>" for column in shown)
    body = []
    for row in rows(view):
        text = cells(row, wave=WAVE in shown)
        css = "status-" + row.status.value.replace(" ", "-")
        tds = [f"<td>{html.escape(cell)}</td>" for cell in text]
        tds[3] = f'<td class="{css}">{html.escape(text[3])}</td>'
        tds[LOG_COLUMN] = _log_cell(row.host, text[LOG_COLUMN])
        body.append(f'<tr id="host-{html.escape(row.host)}">{"".join(tds)}</tr>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>herald: the fleet</title>
<meta http-equiv="refresh" content="5"><style>{_CSS}</style></head>
<body><h1>herald: the fleet</h1>
{strip(view.rollout, view)}
<table><thead><tr>{header}</tr></thead>
<tbody>
{chr(10).join(body)}
</tbody></table>
</body></html>
"""


class _Collector(Collector):
    def __init__(self, view: Callable[[], FleetView], figures: Path) -> None:
        self._view = view
        self._figures = figures

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        desired = GaugeMetricFamily(
            "herald_host_desired_generation", "Generation published for the host", labels=["host"]
        )
        deployed = GaugeMetricFamily(
            "herald_host_deployed_generation", "Generation the host runs", labels=["host"]
        )
        status = GaugeMetricFamily(
            "herald_host_status", "1 for the host's current status", labels=["host", "status"]
        )
        seen = GaugeMetricFamily(
            "herald_host_last_seen_timestamp_seconds", "When the host last spoke", labels=["host"]
        )
        reboot = GaugeMetricFamily(
            "herald_host_needs_reboot", "1 when the host's next boot runs another kernel", labels=["host"]
        )
        for row in rows(self._view()):
            if row.desired is not None:
                desired.add_metric([row.host], row.desired)
            if row.deployed is not None:
                deployed.add_metric([row.host], row.deployed)
            for each in Status:
                status.add_metric([row.host, each.value], 1.0 if each is row.status else 0.0)
            if row.last_seen is not None:
                seen.add_metric([row.host], row.last_seen.timestamp())
            reboot.add_metric([row.host], 1.0 if row.needs_reboot else 0.0)
        yield from (desired, deployed, status, seen, reboot)
        view = self._view()
        yield from rollout_metrics(view.rollout, view)
        figures = read_figures(self._figures)
        yield CounterMetricFamily(
            "herald_publish_runs", "Publish runs (herald publish and herald serve)", value=figures.runs
        )
        yield CounterMetricFamily(
            "herald_publish_hosts_changed", "Hosts given a new release", value=figures.hosts_changed
        )
        yield CounterMetricFamily(
            "herald_publish_hosts_failed", "Hosts not published (check failed)", value=figures.hosts_failed
        )
        yield GaugeMetricFamily(
            "herald_publish_last_duration_seconds", "The last publish's duration", value=figures.last_seconds
        )
        yield GaugeMetricFamily(
            "herald_publish_last_timestamp_seconds", "When the last publish ended", value=figures.last_at
        )


class FleetWeb:
    def __init__(self, view: Callable[[], FleetView], state: Path) -> None:
        self._view = view
        self._state = state
        self._registry = CollectorRegistry(auto_describe=True)
        self._registry.register(_Collector(view, state / "publisher" / "figures.json"))
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/status.json", self._json)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/logs/{host}/{name}", self._log)
        self._runner = web.AppRunner(app, access_log=None)
        self.port = 0

    async def _page(self, _request: web.Request) -> web.Response:
        return web.Response(text=page(self._view()), content_type="text/html", charset="utf-8")

    async def _json(self, _request: web.Request) -> web.Response:
        return web.Response(body=as_json(self._view()), content_type="application/json")

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self._registry), content_type="text/plain", charset="utf-8")

    async def _log(self, request: web.Request) -> web.Response:
        host, name = request.match_info["host"], request.match_info["name"]
        if not is_host_name(host) or host not in self._view().hosts or LOG_NAME.fullmatch(name) is None:
            return _not_found(f"no such log: {safe(host)}/{safe(name)}")

        def skipped(entry: str, why: str) -> None:
            logger.bind(host=host).warning("/logs: not served {}: {}", safe(entry), why)

        try:
            data = await asyncio.to_thread(HostLogs(self._state, host, skipped).read, name)
        except ConfigError as exc:  # no chroot, or one this process may not read
            logger.bind(host=host).warning("/logs: {}", exc)
            data = None
        if data is None:
            return _not_found(f"no such log: {host}/{name}")
        text = safe(data.decode("utf-8", errors="replace"), lines=True)
        return web.Response(text=text, content_type="text/plain", charset="utf-8", headers=_LOG_HEADERS)

    async def start(self, host: str, port: int) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise cannot_listen("the fleet page", host, port, "--http, or http in server.toml", exc) from exc
        server = site._server  # noqa: SLF001 - aiohttp exposes no bound port
        sockets = getattr(server, "sockets", None) or ()
        self.port = sockets[0].getsockname()[1] if sockets else port
        logger.info("fleet page and metrics on http://{}:{}/", host, self.port)

    async def stop(self) -> None:
        await self._runner.cleanup()


def _not_found(text: str) -> web.Response:
    return web.Response(
        status=404, text=text + "\n", content_type="text/plain", charset="utf-8", headers=_LOG_HEADERS
    )
