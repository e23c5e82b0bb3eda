"""`python -m netsim.bench pair --size SIZE`: one p2pd seed -> one p2pd leecher vs one curl from nginx, loopback.

The single-stream cost of the data path (framing, hashing, pwrite, the event loop) against the fastest thing a
user could do instead (nginx sendfile -> curl), on one fresh namespace's loopback so no link limits either. It is
the swarm benchmark with 1 peer and the p2pd and http clients, reported as MB/s and p2pd/curl (goal >= 0.8).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import IO, Any

from netsim.bench.swarm import SwarmOptions, run_swarm
from p2pd.units import format_size_exact


@dataclass
class PairOptions:
    """What `python -m netsim.bench pair` was asked for."""

    size: int = 2 << 30
    runs: int = 3
    timeout_s: float = 300
    keep: bool = False
    command: str = ""
    clients: tuple[str, ...] = ("p2pd", "http")


def run_pair(o: PairOptions, log: IO[str] = sys.stderr) -> dict[str, Any]:
    """Run it; the result is the swarm JSON plus `mbps` per client, `p2pd_vs_curl` and a pair headline."""
    res = run_swarm(
        SwarmOptions(
            peers=1,
            size=o.size,
            clients=list(o.clients),
            runs=o.runs,
            topology="loopback",
            timeout_s=o.timeout_s,
            keep=o.keep,
            iperf=False,
            command=o.command,
        ),
        log=log,
    )
    res["benchmark"] = "pair"
    cl = res["clients"]
    p, h = cl.get("p2pd", {}).get("agg_MBps"), cl.get("http", {}).get("agg_MBps")
    res["p2pd_vs_curl"] = round(p / h, 3) if p and h else None
    pr, hr = cl.get("p2pd", {}).get("agg_MBps_runs", []), cl.get("http", {}).get("agg_MBps_runs", [])
    # run by run (same run index = back to back, same machine load); only meaningful when no run failed
    same = len(pr) == len(hr) == o.runs
    res["p2pd_vs_curl_runs"] = [round(a / b, 3) for a, b in zip(pr, hr, strict=True)] if same else None
    parts = [f"{k} {v['agg_MBps']:.0f} MB/s" if v["agg_MBps"] else f"{k} FAILED" for k, v in cl.items()]
    res["headline"] = (
        f"pair loopback {format_size_exact(o.size)}: "
        + ", ".join(parts).replace("http", "curl<-nginx")
        + (f"; p2pd/curl {res['p2pd_vs_curl']:.2f}" if res["p2pd_vs_curl"] else "")
    )
    return res
