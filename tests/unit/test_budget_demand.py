"""The demand a node reports for the global budgets (p2pd/protocol/demand.py), and what the tracker's max-min
split (tracker/budgets.py) makes of it in a swarm under a budget: the seed, the one node whose upload never runs
out of wanted pieces, is the hungry one, and the leechers' unused margin is what it can take."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from p2pd.protocol import demand
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
