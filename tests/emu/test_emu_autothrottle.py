"""Auto-throttling on an emulated 200 Mbit/s link (issue #13): a node moves an artifact with p2pd while a TCP
service (iperf3) on the same node starts, runs 8 s and stops; on the upload side (the node seeds) and on the
download side (the node fetches). Alone on the link p2pd must not throttle itself; while the service runs p2pd
must yield to it (its limit set by auto-throttling, naming the other traffic), the service must get >= 0.8x its
idle-link rate within half of its run, and p2pd must be back at >= 0.8x its rate before the service within 4 s
after it stops. Without auto-throttling the service keeps its TCP share beside p2pd, about half, and never
reaches 0.8x: the test fails.

How fast (the issue's goals: the service at 0.8x within 2 s, p2pd back within 3 s) is a performance goal, measured
by `python -m netsim.bench autothrottle` and recorded in BENCHMARKS.md, not asserted here: on CI's 2-core
machine the daemon's ticks and the emulated link's counters slip by up to a second under load. Rates are the
switch-side counters of the ports (netsim/bench/autothrottle.py); a run that misses gets one second attempt.
"""

from __future__ import annotations

import io
from typing import Any

import pytest

from netsim.bench import autothrottle
from p2pd.units import parse_size

pytestmark = pytest.mark.emu

SERVICE_S = 8.0
REACH_WITHIN_S = SERVICE_S / 2
BACK_WITHIN_S = 4.0


def scenario(direction: str) -> tuple[dict[str, Any], str]:
    why = autothrottle.missing()
    if why:
        pytest.skip(why)
    opts = autothrottle.Options(
        rate_bps=200_000_000,
        size=parse_size("384MiB"),
        warmup_s=8.0,
        service_s=SERVICE_S,
        after_s=4.0,
        idle_s=3.0,
    )
    log = io.StringIO()
    work = "/dev/shm"
    return autothrottle.run_one(opts, direction, "greedy", "on", work, log), log.getvalue()


def yields_and_takes_back(r: dict[str, Any]) -> bool:
    """Back to 0.8x of what p2pd moved alone before the service (on these links 0.9-0.95 of the link): on the
    download side a single seed's TCP connection, after the service's losses, sometimes takes longer than 3 s to
    reach 0.8 of the link even with auto-throttle off (BENCHMARKS.md), which is not the throttle's doing."""
    reach, back = r["service_reach_080_s"], r["p2pd_back_080_of_alone_s"]
    return reach is not None and reach <= REACH_WITHIN_S and back is not None and back <= BACK_WITHIN_S


@pytest.mark.parametrize("direction", ["upload", "download"])
def test_p2pd_yields_to_a_tcp_service_and_takes_the_link_back(emu: None, direction: str) -> None:
    results = []
    for _ in range(2):
        r, log = scenario(direction)
        results.append({k: v for k, v in r.items() if k != "timeline"})
        link = r["link_Bps"]
        assert r["p2pd_alone_Bps"] >= 0.8 * link, f"p2pd throttled itself alone on the link: {results[-1]}\n{log}"
        status = r["node_status_during_service"]
        assert status is not None, log
        limits = status["limits"]["egress" if direction == "upload" else "ingress"]
        assert limits["by"] == "auto" and limits["why"].startswith("auto: other traffic"), status
        if yields_and_takes_back(r):
            break
    seen = [(x["service_reach_080_s"], x["p2pd_back_080_of_alone_s"]) for x in results]
    assert yields_and_takes_back(r), (
        f"(service reach 0.8 s, p2pd back 0.8 s) per attempt: {seen}; within {REACH_WITHIN_S} and {BACK_WITHIN_S}\n"
        f"{results}"
    )
