"""The physical lower bound and the summary statistics the benchmarks report.

Kumar & Ross (2006): with a seed of upload u_s and N peers of upload u_i and download d_i, no scheme distributes a
file of F bits to all N peers faster than

    T_min = max(F/u_s, F/d_min, N·F/(u_s + Σ u_i))

(the seed must send every bit once; the slowest peer must receive every bit; the swarm must upload N·F in total).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from p2pd.units import parse_duration, rate_bits


def kumar_ross(
    size_bytes: int, seed_up_bps: float, peers_up_bps: Sequence[float], peers_down_bps: Sequence[float]
) -> float:
    """T_min in seconds for `size_bytes` (rates in bit/s)."""
    if not peers_up_bps or len(peers_up_bps) != len(peers_down_bps):
        raise ValueError("need one up and one down rate per peer")
    f = size_bytes * 8
    n = len(peers_up_bps)
    return max(f / seed_up_bps, f / min(peers_down_bps), n * f / (seed_up_bps + sum(peers_up_bps)))


def zone_bound(
    size_bytes: int,
    seed_up_bps: float,
    peers_up_bps: Sequence[float],
    peers_down_bps: Sequence[float],
    peer_in_b: Sequence[bool],
    zone_link_bps: float | None,
) -> float:
    """Kumar-Ross with the two zones' cuts: the seed in zone a, the peers flagged in zone b, a trunk of
    `zone_link_bps` each way between them (None = no trunk limit: plain Kumar-Ross).

    Every byte a zone-b node receives comes from a zone-b upload or over the trunk, so
    n_b·F <= T·(Σu_b + c); likewise n_a·F <= T·(u_s + Σu_a + c); and at least one copy crosses: F <= T·c."""
    t = kumar_ross(size_bytes, seed_up_bps, peers_up_bps, peers_down_bps)
    if zone_link_bps is None:
        return t
    f = size_bytes * 8
    up_a = seed_up_bps + sum(u for u, b in zip(peers_up_bps, peer_in_b, strict=True) if not b)
    up_b = sum(u for u, b in zip(peers_up_bps, peer_in_b, strict=True) if b)
    n_b = sum(1 for b in peer_in_b if b)
    n_a = len(peer_in_b) - n_b
    c = zone_link_bps
    return max(t, f / c, n_b * f / (up_b + c), n_a * f / (up_a + c))


def churn_bound(t_min: float, size_bytes: int, peers_down_bps: Sequence[float], away_s: Sequence[float]) -> float:
    """The bound with peers away: a peer that is gone for D seconds receives nothing then, and still has to receive
    every bit through its own download link, so T >= F/d + D for it. Which peers leave is decided during the run (the
    last ones still fetching), so the fastest download link stands for them all: the bound holds whoever leaves.
    `away_s` holds each event's D (events whose peers stay away until the rest are done add nothing: their end is
    the others' end plus a whole fetch, which the run reports separately)."""
    if not away_s:
        return t_min
    return max(t_min, size_bytes * 8 / max(peers_down_bps) + max(away_s))


def summarize(values: Sequence[float]) -> dict[str, float | None]:
    """median, min, max of a sample (None when empty)."""
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


@dataclass(frozen=True)
class RateClass:
    """`count` peers whose links carry `up_bps` out and `down_bps` in (bit/s): one `--rates` class."""

    count: int
    up_bps: int
    down_bps: int


RATE_CLASS_FORM = "COUNT@UP[/DOWN], e.g. 2@1Gbit/s or 14@100Mbit/s/200Mbit/s"


def parse_rate_class(text: str) -> RateClass:
    """One `--rates` class. RATE strings contain '/' themselves (`100Mbit/s`), so UP/DOWN is split at the one '/'
    where both sides are rates; a string that is one rate as a whole means the same rate both ways."""
    count_text, at, rates = text.partition("@")
    if not at or not count_text.strip().isdigit() or int(count_text) < 1:
        raise ValueError(f"bad rate class {text!r}: expected {RATE_CLASS_FORM} (COUNT a positive integer)")
    try:
        up = down = rate_bits(rates)
    except ValueError:
        splits = []
        for i, ch in enumerate(rates):
            if ch != "/":
                continue
            try:
                splits.append((rate_bits(rates[:i]), rate_bits(rates[i + 1 :])))
            except ValueError:
                continue
        if len(splits) != 1:
            raise ValueError(
                f"bad rate class {text!r}: {rates!r} is neither one RATE nor UP/DOWN; expected {RATE_CLASS_FORM}"
            ) from None
        up, down = splits[0]
    return RateClass(int(count_text), up, down)


def peer_rates(classes: Sequence[RateClass]) -> tuple[list[int], list[int]]:
    """Per-peer (up, down) lists in class order: peer p1.. take the first class's rates, and so on."""
    ups = [c.up_bps for c in classes for _ in range(c.count)]
    downs = [c.down_bps for c in classes for _ in range(c.count)]
    return ups, downs


@dataclass(frozen=True)
class ChurnEvent:
    """`--churn K@T[:D]`: `count` peers leave `at_s` seconds after the start and come back `down_s` seconds later
    (None: they stay away until the rest are done, then come back)."""

    count: int
    at_s: float
    down_s: float | None


CHURN_FORM = "K@T[:D], e.g. 2@5 or 2@5:3 (K peers leave at T s, come back D s later)"


def parse_churn(text: str) -> ChurnEvent:
    """One `--churn` event (T and D are DURATIONs: `5`, `5s`, `1.5s`, `500ms`)."""
    k, at, rest = text.partition("@")
    if not at or not k.strip().isdigit() or int(k) < 1:
        raise ValueError(f"bad churn {text!r}: expected {CHURN_FORM} (K a positive integer)")
    t_text, colon, d_text = rest.partition(":")
    try:
        t = parse_duration(t_text)
        d = parse_duration(d_text) if colon else None
    except ValueError as e:
        raise ValueError(f"bad churn {text!r}: {e}; expected {CHURN_FORM}") from None
    return ChurnEvent(int(k), t, d)
