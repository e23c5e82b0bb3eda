"""The cluster page's pieces that need no tracker: the throughput ring's bound, the registry's running rate
totals (kept through heartbeats, leaves, evictions and expiry), and when a node reports its measured rates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from p2pd.cluster import child_env
from p2pd.tracker_client import TrackerClient
from tests.tracker.tracker_testutil import nid
from tracker.cluster_view import ThroughputRing
from tracker.registry import Registry


def test_throughput_ring_keeps_the_newest_samples() -> None:
    ring = ThroughputRing(3)
    for t in range(5):
        ring.add(float(t), 10.0 * t, 1.0)
    assert ring.to_json() == [[2.0, 20.0, 1.0], [3.0, 30.0, 1.0], [4.0, 40.0, 1.0]]


def test_registry_rate_totals_follow_heartbeats_and_departures() -> None:
    reg = Registry(interval=1.0, misses=3)
    for i in range(4):
        reg.register(nid(i), "10.0.0.1", 7000 + i, {"zone": "z"}, "0.1.0", 0.0)
        reg.heartbeat(nid(i), None, 0.0, demand=(1.0, 1.0, 100.0, 10.0))
    assert reg.use_totals() == (400.0, 40.0)
    reg.heartbeat(nid(0), None, 0.0, demand=(1.0, 1.0, 250.0, 0.0))  # a new report replaces the old one
    reg.heartbeat(nid(1), None, 0.0)  # no report: the last one stands
    assert reg.use_totals() == (550.0, 30.0)
    assert reg.leave(nid(0)) and reg.evict(nid(1))
    assert reg.use_totals() == (200.0, 20.0)
    reg.heartbeat(nid(2), None, 2.5)
    assert reg.expire(3.5) == [nid(3)]
    assert reg.use_totals() == (100.0, 10.0)
    assert reg.expire(10.0) == [nid(2)]
    assert reg.use_totals() == (0.0, 0.0)


def test_a_node_reports_rates_under_a_budget_or_when_they_change() -> None:
    c = TrackerClient([("127.0.0.1", 1)], nid(1), ("127.0.0.1", 2), {}, "0.1.0")
    assert c._report() is None  # nothing measured yet
    c.demand = [5.0, 1.0, 0.0, 0.0]
    assert c._report() == [5.0, 1.0, 0.0, 0.0]  # never reported: the tracker learns the first rates
    c._rates_reported = (0.0, 0.0)
    assert c._report() is None  # idle and already reported: the heartbeat stays minimal
    c.demand = [5.0, 1.0, 3000.0, 0.0]
    assert c._report() == c.demand  # the rate moved
    c._rates_reported = (3000.0, 0.0)
    c.share = [1e6, None]
    assert c._report() == c.demand  # under a budget: every heartbeat carries the demand


def test_bench_command_writes_its_keys(tmp_path: Path) -> None:
    """Smoke test (tiny load) so `python -m netsim.bench.cluster_page` keeps working; its numbers are for BENCHMARKS."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "netsim.bench.cluster_page", "--nodes", "50", "--requests", "3", "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=child_env())
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["nodes"] == 50 and result["requests"] == 3 and result["answer_bytes"] > 1000
    for key in ("p50_ms", "p99_ms", "max_ms", "cpu_ms_per_request"):
        assert result[key] > 0, key
