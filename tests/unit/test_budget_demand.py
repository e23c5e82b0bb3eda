"""The demand a node reports for the global budgets (p2pd/protocol/demand.py), and what the tracker's max-min
split (tracker/budgets.py) makes of it in a swarm under a budget: the seed, the one node whose upload never runs
out of wanted pieces, is the hungry one, and the leechers' unused margin is what it can take."""

from __future__ import annotations

import heapq
import math

from hypothesis import given
from hypothesis import strategies as st

from p2pd.protocol import demand
from p2pd.protocol.ratelimit import Hierarchy, TokenBucket
from tracker.budgets import Budgets, Demand, allocate

MB = 1e6


def test_a_bucket_bound_sender_is_hungry_and_asks_for_its_own_limits() -> None:
    # sent all of its 1 MB/s share and waited on it: asks for all it may (no limit of its own: MAX_DEMAND)
    assert demand.want(1.0 * MB, waited=0.5, dt=1.0, limit=1.0 * MB, own=math.inf) == demand.MAX_DEMAND
    assert demand.want(1.0 * MB, waited=0.5, dt=1.0, limit=1.0 * MB, own=3 * MB) == 3 * MB


def test_a_node_short_of_wanted_pieces_asks_for_what_it_sent_plus_a_little() -> None:
    # a leecher that sent 0.79 of its share and waited in bursts: not held back by the share (before:
    # HUNGRY_USE 0.8 let 0.8 of it count as hungry, and a leecher at 0.8 took an equal split from the seed)
    got = demand.want(0.85 * MB, waited=0.3, dt=1.0, limit=1.0 * MB, own=math.inf)
    assert got == 0.85 * MB * demand.MARGIN + demand.HEADROOM
    # sent nearly all, never waited: not held back either
    assert demand.want(0.99 * MB, waited=0.0, dt=1.0, limit=1.0 * MB, own=math.inf) < 1.1 * MB
    # own limits cap any demand
    assert demand.want(5 * MB, waited=0.0, dt=1.0, limit=math.inf, own=2 * MB) == 2 * MB


@given(st.floats(min_value=1e3, max_value=1e9))
def test_a_share_sized_by_the_demand_does_not_make_the_node_hungry(rate: float) -> None:
    """A node given exactly what it asked for and sending as before uses less than HUNGRY_USE of it, so a
    steady leecher does not flip between its demand and all it may (each flip takes the seed's share)."""
    share = demand.want(rate, waited=0.0, dt=1.0, limit=math.inf, own=math.inf)
    assert not demand.hungry(rate, waited=1.0, dt=1.0, limit=share)


def test_the_seed_gets_what_the_leechers_leave() -> None:
    """1 seed + 4 leechers under 40 Mbit/s (5 MB/s): leechers short of pieces send 0.75 MB/s each and are
    not held back; the seed is. The seed's share is the rest: each piece it sends the leechers pass on,
    so their upload grows with it (an equal split, 1 MB/s each, held the leechers to 3 x the seed's)."""
    budget = Budgets(total=5 * MB)
    leecher = demand.want(0.75 * MB, waited=0.2, dt=1.0, limit=1.0 * MB, own=math.inf)
    seed = demand.want(1.0 * MB, waited=0.5, dt=1.0, limit=1.0 * MB, own=math.inf)
    shares = allocate(budget, {"seed": Demand(egress=seed), **{f"p{i}": Demand(egress=leecher) for i in range(4)}})
    assert shares["p0"].egress == leecher
    assert shares["seed"].egress is not None and shares["seed"].egress > 1.5 * MB
    assert sum(s.egress or 0.0 for s in shares.values()) <= 5 * MB


def _reports(share: float, senders: int, intervals: int, backlog: bool) -> list[float]:
    """A node's demand reports while `senders` requesters each pull pieces from it through a share of
    `share` bytes/s, as the daemon counts them (p2pd/daemon.py `_demand`): each sender reserves a chunk
    (Hierarchy.chunk), waits the delay it is given, sends, and reserves the next one at once."""
    limiter = Hierarchy(TokenBucket(share))
    chunk = limiter.chunk(256 * 1024)
    ready = [(0.0, i) for i in range(senders)]  # when each sender reserves its next chunk
    out = []
    mark = (0.0, 0, 0.0)
    for k in range(1, intervals + 1):
        while ready[0][0] < k:
            t, i = heapq.heappop(ready)
            heapq.heappush(ready, (t + limiter.reserve(chunk, t), i))
        t0, reserved0, waited0 = mark
        rate = (limiter.reserved - reserved0) / (k - t0)
        held = limiter.backlog(k) if backlog else 0.0
        out.append(demand.want(rate, limiter.waited - waited0, k - t0, share, math.inf, held))
        mark = (k, limiter.reserved, limiter.waited)
    return out


def test_a_node_whose_share_holds_its_requests_asks_for_all() -> None:
    """0.3 Mbit/s with three requesters: each 16 KiB chunk waits ~1.3 s, 2 or 3 chunks are counted per
    interval, so the measured rate is below HUNGRY_USE of the share in most intervals though every sender
    is held the whole time. Counted by rate and waits alone, the node asked for what it sent plus HEADROOM
    (the split gave it no more); what waits on its share at the report says it is held back."""
    share = 0.3e6 / 8
    before = _reports(share, senders=3, intervals=20, backlog=False)
    assert sum(d == demand.MAX_DEMAND for d in before) < 10  # the flaw this guards against
    assert all(d < 3 * share for d in before if d != demand.MAX_DEMAND)
    assert _reports(share, senders=3, intervals=20, backlog=True) == [demand.MAX_DEMAND] * 20


def test_a_node_that_sends_what_it_has_is_not_made_hungry_by_its_backlog() -> None:
    """One transfer at a time under a 7.5 Mbit/s share waits at most a 20 ms chunk: far below STALL_BACKLOG,
    so a node sending less than its share still hands the rest back (one sender at half the share)."""
    share = 7.5e6 / 8
    limiter = Hierarchy(TokenBucket(share))
    chunk = limiter.chunk(256 * 1024)
    t = 0.0
    while t < 1.0:
        t += limiter.reserve(chunk, t) + 2 * chunk / share  # sends, then idles as long: half the share
    assert limiter.backlog(1.0) < 0.05
    rate = limiter.reserved / t
    assert demand.want(rate, limiter.waited, t, share, math.inf, limiter.backlog(t)) < share
