"""Counters of what the server does, and the Prometheus endpoint that shows them.

Owns ``ExportStats`` (per export: requests, bytes and latency buckets by NBD command, errors by
errno, connections), ``Metrics`` (the stats of every export by name, plus process-wide counters),
the text the SIGUSR1 handler logs, and ``MetricsEndpoint``: ``--metrics ADDR:PORT``, a minimal
HTTP server on the event loop answering ``GET /metrics`` in the Prometheus text format (rendered
by ``prometheus_client`` from a custom collector) and ``GET /health``.

Cost on the request path: a request adds one to a few plain list items (no locks, no metric
objects, no label lookups); a latency is a bucket count found with ``bisect`` on a fixed tuple.
Everything else, including gauges such as requests in flight and open connections, is computed
when a scrape (or SIGUSR1) asks, from the server's own state.  Requests answered at once in one
batch (plain READs and WRITEs) are timed once per batch, each counted at the batch's mean.

Several processes: every number here is a plain integer in ``ExportStats.snapshot()`` (a dict
that pickles and JSON-encodes), and the collector renders a *list* of snapshots summed per
series.  A supervisor of worker processes collects its workers' snapshots and serves their sum
(no per-worker label, so the number of series does not grow with the number of workers);
``worker_restarts`` is the supervisor's own counter (0 while there are no workers).

Invariants: counters only grow (an export removed by a reload keeps its counters while it has
clients, then its series disappear); only the event-loop thread touches them.
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from ..protocol import constants as C

if TYPE_CHECKING:
    from .listeners import Server

log = logging.getLogger("nbdserve")

# Commands counted, by NBD command number (DISC is not a request that gets a reply).
COMMANDS = {
    C.CMD_READ: "read",
    C.CMD_WRITE: "write",
    C.CMD_FLUSH: "flush",
    C.CMD_TRIM: "trim",
    C.CMD_CACHE: "cache",
    C.CMD_WRITE_ZEROES: "write_zeroes",
    C.CMD_BLOCK_STATUS: "block_status",
}
NCMD = max(COMMANDS) + 2  # and one slot for command numbers the protocol does not define
OTHER = NCMD - 1
COMMANDS[OTHER] = "other"
# Latency bucket upper bounds in seconds (Prometheus "le"), and the same in nanoseconds.
BUCKETS = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_BOUNDS_NS = tuple(round(b * 1e9) for b in BUCKETS)
now_ns = time.perf_counter_ns


class ExportStats:
    """The counters of one export.  Updated by sessions; read by the collector."""

    __slots__ = ("connections_total", "errors", "latency", "latency_sum", "name", "nbytes", "requests", "spliced")

    def __init__(self, name: str) -> None:
        self.name = name
        self.requests = [0] * NCMD
        self.nbytes = [0] * NCMD
        self.latency = [[0] * (len(_BOUNDS_NS) + 1) for _ in range(NCMD)]  # last: +Inf only
        self.latency_sum = [0] * NCMD  # nanoseconds
        self.errors: dict[int, int] = {}  # errno -> replies with that error
        self.connections_total = 0
        self.spliced = 0  # WRITE payload bytes landed in the image file by splice (server.landing)

    def request(self, cmd: int, length: int, elapsed_ns: int) -> None:
        """One request answered (with or without an error) ``elapsed_ns`` after it was parsed."""
        self.batch(cmd, 1, length, elapsed_ns)

    def batch(self, cmd: int, count: int, nbytes: int, elapsed_ns: int) -> None:
        """``count`` requests of command ``cmd`` answered together, ``nbytes`` between them,
        taking ``elapsed_ns`` in all (each is put in the bucket of the mean)."""
        if cmd >= OTHER:
            cmd = OTHER  # an unknown command (answered EINVAL)
        self.requests[cmd] += count
        self.nbytes[cmd] += nbytes
        self.latency[cmd][bisect.bisect_left(_BOUNDS_NS, elapsed_ns // count)] += count
        self.latency_sum[cmd] += elapsed_ns

    def error(self, err: int) -> None:
        self.errors[err] = self.errors.get(err, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": list(self.requests),
            "bytes": list(self.nbytes),
            "latency": [list(b) for b in self.latency],
            "latency_sum": list(self.latency_sum),
            "errors": dict(self.errors),
            "connections_total": self.connections_total,
            "spliced": self.spliced,
        }


class Metrics:
    """Every export's ``ExportStats`` by name, and the process-wide counters."""

    def __init__(self) -> None:
        self.exports: dict[str, ExportStats] = {}
        self.connections_accepted = 0
        self.reloads = 0
        self.reload_failures = 0
        self.worker_restarts = 0
        self.started = time.time()

    def for_export(self, name: str) -> ExportStats:
        stats = self.exports.get(name)
        if stats is None:
            stats = self.exports[name] = ExportStats(name)
        return stats

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the counters of exports not in ``keep`` (after a reload removed them)."""
        keep = set(keep)
        for name in [n for n in self.exports if n not in keep]:
            del self.exports[name]


def snapshot(server: Server) -> dict[str, Any]:
    """Everything the collector shows, as plain data (see the module docstring)."""
    m = server.metrics
    inflight: dict[str, int] = {}
    handshaking = 0
    for s in list(server.sessions):
        if s.export is None:
            handshaking += 1
        else:
            inflight[s.export.name] = inflight.get(s.export.name, 0) + s.inflight
    exports = {}
    for e in server.all_exports():
        stats = m.for_export(e.name).snapshot()
        stats["connections"] = e.connections
        stats["inflight"] = inflight.get(e.name, 0)
        stats["up"] = int(e.image is not None and not e.retired)
        stats["size"] = e.size
        exports[e.name] = stats
    cache = server.cache.stats() if server.cache is not None else {}
    return {
        "exports": exports,
        "cache": cache,
        "sessions": len(server.sessions),
        "handshaking": handshaking,
        "connections_accepted": m.connections_accepted,
        "reloads": m.reloads,
        "reload_failures": m.reload_failures,
        "worker_restarts": m.worker_restarts,
        "started": m.started,
    }


def _sum_into(acc: Any, new: Any) -> Any:
    """Element-wise sum of two snapshots (numbers, lists, dicts), for several processes."""
    if isinstance(new, dict):
        acc = dict(acc)
        for k, v in new.items():
            acc[k] = _sum_into(acc[k], v) if k in acc else v
        return acc
    if isinstance(new, list):
        return [_sum_into(a, b) for a, b in zip(acc, new, strict=True)]
    return acc + new if _is_number(new) else new


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def merge_snapshots(snaps: list[dict[str, Any]]) -> dict[str, Any]:
    out = snaps[0]
    for s in snaps[1:]:
        out = _sum_into(out, s)
    return out


class Collector:
    """A ``prometheus_client`` collector rendering the sum of the snapshots ``source`` returns."""

    def __init__(self, source: Callable[[], list[dict[str, Any]]]) -> None:
        self.source = source

    def describe(self) -> list:
        return []  # unchecked collector: names are fixed, values come at scrape time

    def collect(self) -> Iterable:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        snap = merge_snapshots(self.source())
        ex = snap["exports"]
        req = CounterMetricFamily("nbdserve_requests", "NBD requests answered", labels=["export", "command"])
        nbytes = CounterMetricFamily(
            "nbdserve_request_bytes",
            "Bytes covered by requests (READ, WRITE: data moved)",
            labels=["export", "command"],
        )
        errs = CounterMetricFamily(
            "nbdserve_request_errors", "Requests answered with an error", labels=["export", "errno"]
        )
        lat = HistogramMetricFamily(
            "nbdserve_request_duration_seconds",
            "Time from parsing a request to its reply",
            labels=["export", "command"],
        )
        inflight = GaugeMetricFamily("nbdserve_requests_in_flight", "Requests started, not answered", labels=["export"])
        conns = GaugeMetricFamily("nbdserve_connections", "Connections in transmission", labels=["export"])
        conns_total = CounterMetricFamily(
            "nbdserve_export_connections", "Connections that entered transmission", labels=["export"]
        )
        up = GaugeMetricFamily("nbdserve_export_up", "1 if the export is open and served", labels=["export"])
        size = GaugeMetricFamily("nbdserve_export_size_bytes", "Virtual size of the export", labels=["export"])
        spliced = CounterMetricFamily(
            "nbdserve_write_spliced_bytes",
            "WRITE payload bytes moved from the socket into the image file by splice(2)",
            labels=["export"],
        )
        for name, s in sorted(ex.items()):
            for cmd, cname in COMMANDS.items():
                req.add_metric([name, cname], s["requests"][cmd])
                nbytes.add_metric([name, cname], s["bytes"][cmd])
                counts, cum = s["latency"][cmd], 0
                buckets = []
                for bound, n in zip((*(repr(b) for b in BUCKETS), "+Inf"), counts, strict=True):
                    cum += n
                    buckets.append((bound, cum))
                lat.add_metric([name, cname], buckets, s["latency_sum"][cmd] / 1e9)
            for err, n in sorted(s["errors"].items()):
                errs.add_metric([name, errno.errorcode.get(int(err), str(err))], n)
            inflight.add_metric([name], s["inflight"])
            conns.add_metric([name], s["connections"])
            conns_total.add_metric([name], s["connections_total"])
            up.add_metric([name], s["up"])
            size.add_metric([name], s["size"])
            spliced.add_metric([name], s["spliced"])
        yield from (req, nbytes, errs, lat, inflight, conns, conns_total, up, size, spliced)
        yield GaugeMetricFamily("nbdserve_sessions", "Open client connections (any phase)", value=snap["sessions"])
        yield GaugeMetricFamily(
            "nbdserve_handshaking_sessions", "Connections still in the handshake", value=snap["handshaking"]
        )
        yield CounterMetricFamily(
            "nbdserve_connections_accepted", "Connections accepted", value=snap["connections_accepted"]
        )
        yield CounterMetricFamily("nbdserve_reloads", "Configuration reloads applied", value=snap["reloads"])
        yield CounterMetricFamily(
            "nbdserve_reload_failures", "Configuration reloads rejected", value=snap["reload_failures"]
        )
        yield CounterMetricFamily(
            "nbdserve_worker_restarts", "Worker processes restarted", value=snap["worker_restarts"]
        )
        c = snap["cache"]
        if c:
            yield CounterMetricFamily("nbdserve_cache_hits", "Metadata cache hits", value=c["hits"])
            yield CounterMetricFamily("nbdserve_cache_misses", "Metadata cache misses", value=c["misses"])
            yield CounterMetricFamily("nbdserve_cache_evictions", "Metadata cache evictions", value=c["evictions"])
            yield CounterMetricFamily(
                "nbdserve_cache_writebacks", "Dirty metadata tables written back", value=c["writebacks"]
            )
            yield GaugeMetricFamily("nbdserve_cache_bytes", "Metadata cache bytes in use", value=c["used"])
            yield GaugeMetricFamily("nbdserve_cache_budget_bytes", "Metadata cache budget", value=c["budget"])
            yield GaugeMetricFamily("nbdserve_cache_entries", "Metadata cache entries", value=c["entries"])
        yield GaugeMetricFamily("nbdserve_start_time_seconds", "Start time (Unix epoch)", value=snap["started"])


def render(source: Callable[[], list[dict[str, Any]]]) -> bytes:
    """The Prometheus text exposition of the summed snapshots."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(source))
    return generate_latest(registry)


def statistics_lines(server: Server) -> list[str]:
    """Per-export statistics, one line each (SIGUSR1)."""
    snap = snapshot(server)
    out = []
    for name, s in snap["exports"].items():
        counts = ", ".join(
            f"{COMMANDS[c]} {s['requests'][c]}" for c in COMMANDS if s["requests"][c] or c in (C.CMD_READ, C.CMD_WRITE)
        )
        errs = sum(s["errors"].values())
        out.append(
            f"statistics: export {name!r}: {counts}; read {s['bytes'][C.CMD_READ]} bytes, "
            f"written {s['bytes'][C.CMD_WRITE]} bytes; {errs} errors; {s['connections']} connected "
            f"({s['connections_total']} since start), {s['inflight']} in flight"
        )
    c = snap["cache"]
    if c:
        out.append(
            f"statistics: cache: {c['used']} of {c['budget']} bytes, {c['hits']} hits, {c['misses']} misses, "
            f"{c['evictions']} evictions"
        )
    return out


# -- the endpoint ---------------------------------------------------------------------------------

_MAX_HEADER = 8192
_REQUEST_TIMEOUT = 10.0


def parse_address(text: str) -> tuple[str, int]:
    """``ADDR:PORT``, ``[V6ADDR]:PORT`` or ``PORT`` (on 127.0.0.1).  Raises ValueError."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--metrics {text!r}: expected ADDR:PORT")
    return host, int(port)


class MetricsEndpoint:
    """``GET /metrics`` and ``GET /health`` over HTTP/1.0-style one-request connections."""

    def __init__(
        self, source: Callable[[], list[dict[str, Any]] | Awaitable[list[dict[str, Any]]]], healthy: Callable[[], bool]
    ) -> None:
        self.source = source
        self.healthy = healthy
        self.server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> list[tuple]:
        self.server = await asyncio.start_server(self._handle, host, port, reuse_address=True)
        return [s.getsockname() for s in self.server.sockets]

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _REQUEST_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            writer.close()
            return
        if len(head) > _MAX_HEADER:
            writer.close()
            return
        method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
        path = rest.split(" ", 1)[0].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            status, ctype, body = "405 Method Not Allowed", "text/plain", b"only GET\n"
        elif path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST

            snaps = self.source()
            if inspect.isawaitable(snaps):  # worker processes: their snapshots arrive later
                snaps = await snaps
            status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, render(lambda: snaps)
        elif path in ("/health", "/healthz"):
            ok = self.healthy()
            status = "200 OK" if ok else "503 Service Unavailable"
            ctype, body = "text/plain", b"ok\n" if ok else b"no export is serving\n"
        else:
            status, ctype, body = "404 Not Found", "text/plain", b"try /metrics\n"
        hdr = f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        writer.write(hdr.encode() + (body if method == "GET" else b""))
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()
