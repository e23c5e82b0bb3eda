"""Prometheus metrics for the tracker, in the text exposition format, without a client library.

The tracker's hot path (a UDP heartbeat) must stay a few microseconds, so counters are plain ints and
histograms are fixed-bucket arrays updated with one bisect; `/metrics` renders them on demand.
Store-level gauges (nodes, artifacts) are read from `Store.stats()` when scraped.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from typing import Any

from tracker.store import STORE_COUNTERS

# seconds; covers a sub-millisecond heartbeat up to a slow Redis round trip
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Histogram:
    __slots__ = ("counts", "sum", "n")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, v)] += 1
        self.sum += v
        self.n += 1


class Metrics:
    def __init__(self) -> None:
        self.rpc_requests: defaultdict[tuple[str, str], int] = defaultdict(int)  # (method, outcome)
        self.rpc_seconds: defaultdict[str, Histogram] = defaultdict(Histogram)
        self.udp_datagrams = 0
        self.udp_rejected = 0
        self.udp_forged = 0  # secured tracker: datagrams with a wrong MAC or a replayed sequence number
        self.udp_batches = 0
        self.udp_batch_seconds = Histogram()
        self.admin_requests: defaultdict[tuple[str, int], int] = defaultdict(int)  # (route, status)
        self.expired = 0
        self.stun: Any = None  # the STUN responder (`tracker.stun.StunResponder`) when STUN is on

    def render(self, stats: dict[str, Any]) -> str:
        lines: list[str] = []

        def head(name: str, kind: str, help_: str) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")

        head("p2p_tracker_nodes", "gauge", "Registered nodes.")
        lines.append(f"p2p_tracker_nodes {stats.get('nodes', 0)}")
        head("p2p_tracker_artifacts", "gauge", "Artifacts with a manifest or a holder.")
        lines.append(f"p2p_tracker_artifacts {stats.get('artifacts', 0)}")
        head("p2p_tracker_names", "gauge", "NAME:TAG names.")
        lines.append(f"p2p_tracker_names {stats.get('names', 0)}")
        for key in STORE_COUNTERS:
            if key in stats:
                head(f"p2p_tracker_{key}_total", "counter", f"{key.replace('_', ' ').capitalize()} seen by the store.")
                lines.append(f"p2p_tracker_{key}_total {stats[key]}")
        head("p2p_tracker_rpc_requests_total", "counter", "TCP RPC requests by method and outcome.")
        for (method, outcome), n in sorted(self.rpc_requests.items()):
            lines.append(f'p2p_tracker_rpc_requests_total{{method="{method}",outcome="{outcome}"}} {n}')
        head("p2p_tracker_rpc_seconds", "histogram", "TCP RPC handling time.")
        for method, h in sorted(self.rpc_seconds.items()):
            _histogram(lines, "p2p_tracker_rpc_seconds", h, f'method="{method}"')
        head("p2p_tracker_udp_datagrams_total", "counter", "UDP heartbeat datagrams received.")
        lines.append(f"p2p_tracker_udp_datagrams_total {self.udp_datagrams}")
        head("p2p_tracker_udp_rejected_total", "counter", "UDP datagrams dropped as malformed.")
        lines.append(f"p2p_tracker_udp_rejected_total {self.udp_rejected}")
        head("p2p_tracker_udp_forged_total", "counter", "UDP heartbeats refused: wrong MAC or replayed (secured).")
        lines.append(f"p2p_tracker_udp_forged_total {self.udp_forged}")
        head("p2p_tracker_udp_batch_seconds", "histogram", "Time to process one batch of UDP heartbeats.")
        _histogram(lines, "p2p_tracker_udp_batch_seconds", self.udp_batch_seconds, "")
        if self.stun is not None:
            head("p2p_tracker_stun_answered_total", "counter", "STUN Binding requests answered.")
            lines.append(f"p2p_tracker_stun_answered_total {self.stun.answered}")
            head("p2p_tracker_stun_dropped_total", "counter", "STUN datagrams dropped as malformed or not Binding.")
            lines.append(f"p2p_tracker_stun_dropped_total {self.stun.dropped}")
        head("p2p_tracker_admin_requests_total", "counter", "Admin HTTP requests by route and status.")
        for (route, status), n in sorted(self.admin_requests.items()):
            lines.append(f'p2p_tracker_admin_requests_total{{route="{route}",status="{status}"}} {n}')
        return "\n".join(lines) + "\n"


def _histogram(lines: list[str], name: str, h: Histogram, labels: str) -> None:
    sep = "," if labels else ""
    acc = 0
    for bound, c in zip(BUCKETS, h.counts, strict=False):
        acc += c
        lines.append(f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {acc}')
    lines.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {h.n}')
    lb = f"{{{labels}}}" if labels else ""
    lines.append(f"{name}_sum{lb} {h.sum:.6f}")
    lines.append(f"{name}_count{lb} {h.n}")
