"""The physical lower bound and the summary statistics the benchmarks report.

Kumar & Ross (2006): with a seed of upload u_s and N peers of upload u_i and download d_i, no scheme distributes a
file of F bits to all N peers faster than

    T_min = max(F/u_s, F/d_min, N·F/(u_s + Σ u_i))

(the seed must send every bit once; the slowest peer must receive every bit; the swarm must upload N·F in total).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def kumar_ross(
    size_bytes: int, seed_up_bps: float, peers_up_bps: Sequence[float], peers_down_bps: Sequence[float]
) -> float:
    """T_min in seconds for `size_bytes` (rates in bit/s)."""
    if not peers_up_bps or len(peers_up_bps) != len(peers_down_bps):
        raise ValueError("need one up and one down rate per peer")
    f = size_bytes * 8
    n = len(peers_up_bps)
    return max(f / seed_up_bps, f / min(peers_down_bps), n * f / (seed_up_bps + sum(peers_up_bps)))


def summarize(values: Sequence[float]) -> dict[str, float | None]:
    """median, min, max of a sample (None when empty)."""
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
