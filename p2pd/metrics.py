"""Prometheus metrics of a node daemon (`p2pd run --metrics-listen HOST:PORT`, served at /metrics).

Counting costs the data path nothing it did not already do: bytes per connection are one integer add per
piece or chunk (`PeerConn.bytes_in/out`, folded into the swarm's per-path totals when the connection
closes), pieces verified/failed one add per piece; everything else (peers, limits, cache use) is read from
the daemon's state when Prometheus scrapes. The exposition is rendered on the event loop, so it reads a
consistent state without locks, and served by a minimal HTTP/1.0 responder (a scrape is one GET).

Names: `p2pd_*` (the tracker's are `p2p_tracker_*`, tracker/metrics.py); docs/grafana-p2pd.json charts
both, and a test checks that every metric it names is exported.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from p2pd import __version__

if TYPE_CHECKING:
    from p2pd.daemon import Daemon

log = logging.getLogger(__name__)

# a fetch of a few MB on a fast network takes well under a second; of tens of GB on a slow one, an hour
FETCH_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
REQUEST_TIMEOUT = 5.0  # a scraper sends its whole request at once; a client slower than this is dropped
MAX_REQUEST = 8192  # bytes of request line and headers we read before answering 431


class DaemonMetrics(Collector):
    """The daemon's metrics registry: a few event metrics, the rest collected from state at scrape time."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.registry = CollectorRegistry(auto_describe=False)
        self.fetch_seconds = Histogram(
            "p2pd_fetch_seconds",
            "Time from a fetch request to its last verified byte (successful fetches; local hits included).",
            buckets=FETCH_BUCKETS,
            registry=self.registry,
        )
        self.fetch_failures = Counter(
            "p2pd_fetch_failures", "Fetch requests that ended in an error, by error code.", ["code"], registry=None
        )
        self.registry.register(self.fetch_failures)
        self.evictions = Counter(
            "p2pd_cache_evictions", "Artifacts evicted from the cache to stay under --cache-max.", registry=None
        )
        self.evicted_bytes = Counter("p2pd_cache_evicted_bytes", "Bytes evicted from the cache.", registry=None)
        self.registry.register(self.evictions)
        self.registry.register(self.evicted_bytes)
        self.registry.register(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        d = self.daemon
        info = GaugeMetricFamily("p2pd_info", "This daemon: version and node id (value 1).", labels=["version", "node"])
        info.add_metric([__version__, d.node_id], 1)
        yield info

        received = CounterMetricFamily(
            "p2pd_bytes_received", "Piece bytes received from peers (on the wire).", labels=["artifact", "name", "path"]
        )
        sent = CounterMetricFamily(
            "p2pd_bytes_sent", "Piece bytes sent to peers (on the wire).", labels=["artifact", "name", "path"]
        )
        verified = CounterMetricFamily(
            "p2pd_pieces_verified", "Pieces received, verified and written.", labels=["artifact", "name"]
        )
        failed = CounterMetricFamily(
            "p2pd_pieces_failed",
            "Pieces received that failed verification (the sender is banned).",
            labels=["artifact", "name"],
        )
        peers = GaugeMetricFamily("p2pd_peers", "Peer connections now.", labels=["artifact", "name", "path"])
        progress = GaugeMetricFamily(
            "p2pd_artifact_progress",
            "Fraction of the artifact's pieces held (1: complete).",
            labels=["artifact", "name"],
        )
        size = GaugeMetricFamily("p2pd_artifact_bytes", "Size of the artifact.", labels=["artifact", "name", "state"])
        for aid, sw in list(d.swarms.items()):
            art = [aid[:16], sw.name]
            for (path, direction), n in sw.path_totals().items():
                (received if direction == "in" else sent).add_metric([*art, path], n)
            verified.add_metric(art, sw.pieces_verified)
            failed.add_metric(art, sw.pieces_failed)
            by_path: dict[str, int] = {}
            for c in sw.conns.values():
                by_path[str(c.path)] = by_path.get(str(c.path), 0) + 1
            for path, n in by_path.items():
                peers.add_metric([*art, path], n)
            progress.add_metric(art, sw.progress)
            state = "complete" if sw.complete else ("failed" if sw.error else "downloading")
            size.add_metric([*art, state], sw.manifest.total_size)
        yield from (received, sent, verified, failed, peers, progress, size)

        limit = GaugeMetricFamily(
            "p2pd_rate_limit_bytes_per_second",
            "The cap in force on this node's piece bytes, by direction; `by`: the source that sets it (flag, "
            "policy, global share, auto: as `p2pd status` shows); absent: no cap.",
            labels=["direction", "by"],
        )
        if d.egress is not None and d.ingress is not None:
            for direction, lim in d.limits().items():
                if lim["limit"] is not None:
                    limit.add_metric([direction, lim["by"]], lim["limit"])
        yield limit

        stored = [i for i in d.cache_items() if i.stored]
        used = GaugeMetricFamily(
            "p2pd_cache_bytes",
            "Bytes of artifacts stored in the data dir, downloading ones included "
            "(published artifacts are seeded in place and not counted).",
        )
        used.add_metric([], sum(i.size for i in stored))
        count = GaugeMetricFamily("p2pd_cache_artifacts", "Artifacts stored in the data dir.")
        count.add_metric([], len(stored))
        cap = GaugeMetricFamily("p2pd_cache_max_bytes", "The cache's cap (--cache-max); absent: no cap.")
        if d.cache.max_bytes is not None:
            cap.add_metric([], d.cache.max_bytes)
        yield from (used, count, cap)


async def serve_metrics(
    metrics: DaemonMetrics, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve GET /metrics on HOST:PORT until cancelled; reports the bound port."""
    listeners = await trio.open_tcp_listeners(port, host=host or None)
    task_status.started(listeners[0].socket.getsockname()[1])

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            with trio.move_on_after(REQUEST_TIMEOUT):
                await _answer(stream, metrics)

    await trio.serve_listeners(handle, listeners)


async def _answer(stream: trio.abc.Stream, metrics: DaemonMetrics) -> None:
    request = b""
    while b"\r\n\r\n" not in request and b"\n\n" not in request:
        if len(request) > MAX_REQUEST:
            await _respond(stream, 431, b"request headers too large\n")
            return
        try:
            chunk = await stream.receive_some(4096)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        if not chunk:
            return
        request += chunk
    parts = request.split(b"\n", 1)[0].split()
    if len(parts) < 2 or parts[0] not in (b"GET", b"HEAD"):
        await _respond(stream, 405, b"only GET /metrics\n")
        return
    path = parts[1].split(b"?", 1)[0]
    if path not in (b"/metrics", b"/"):
        await _respond(stream, 404, b"not found: the metrics are at /metrics\n")
        return
    try:
        body = metrics.render()
    except Exception:  # a bug in a collector must cost a scrape, never the daemon
        log.exception("rendering the metrics failed")
        await _respond(stream, 500, b"rendering the metrics failed: see the daemon's log\n")
        return
    await _respond(stream, 200, b"" if parts[0] == b"HEAD" else body, CONTENT_TYPE_LATEST, len(body))


async def _respond(
    stream: trio.abc.Stream, status: int, body: bytes, ctype: str = "text/plain", length: int | None = None
) -> None:
    reason = {
        200: "OK",
        404: "Not Found",
        405: "Method Not Allowed",
        431: "Request Header Fields Too Large",
        500: "Internal Server Error",
    }[status]
    head = (
        f"HTTP/1.0 {status} {reason}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n\r\n"
    )
    try:
        await stream.send_all(head.encode() + body)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
        log.debug("metrics client went away: %s", e)


def registered_names(registry: Any) -> set[str]:
    """Every sample name a registry can export (family names with their suffixes), for tests and docs."""
    names: set[str] = set()
    for fam in registry.collect():
        names.add(fam.name)
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}
        names.update(fam.name + s for s in suffixes.get(fam.type, ()))
    return names
