"""Max-min fair sharing (netsim.sim.fairshare): feasibility and the bottleneck property."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from netsim.sim.fairshare import max_min_rates


def _rates(caps: list[float], flows: list[tuple[int, ...]]) -> np.ndarray:
    hops = [np.array([f[h] if h < len(f) else -1 for f in flows], dtype=np.int64) for h in range(3)]
    return max_min_rates(np.array(caps, dtype=float), hops)


def test_equal_split_of_one_link() -> None:
    r = _rates([9.0], [(0,), (0,), (0,)])
    assert np.allclose(r, [3.0, 3.0, 3.0])


def test_leftover_goes_to_the_unconstrained_flow() -> None:
    # link 0 (cap 10) carries a and b; b is also on link 1 (cap 2): b gets 2, a the remaining 8
    r = _rates([10.0, 2.0], [(0,), (0, 1)])
    assert np.allclose(r, [8.0, 2.0])


def test_uplink_downlink_pair() -> None:
    # a seed uplink of 100 feeding 4 downlinks of 10 and one of 1000: four get 10, the last gets the rest
    caps = [100.0, 10.0, 10.0, 10.0, 10.0, 1000.0]
    r = _rates(caps, [(0, 1), (0, 2), (0, 3), (0, 4), (0, 5)])
    assert np.allclose(r, [10, 10, 10, 10, 60])


def test_infinite_links_do_not_limit() -> None:
    r = _rates([math.inf, 5.0], [(0, 1), (0, 1)])
    assert np.allclose(r, [2.5, 2.5])


@st.composite
def networks(draw: st.DrawFn) -> tuple[list[float], list[tuple[int, ...]]]:
    nlinks = draw(st.integers(1, 8))
    caps = draw(st.lists(st.floats(0.5, 1000.0), min_size=nlinks, max_size=nlinks))
    flows = draw(
        st.lists(
            st.lists(st.integers(0, nlinks - 1), min_size=1, max_size=3, unique=True).map(tuple),
            min_size=1,
            max_size=20,
        )
    )
    return caps, flows


@settings(max_examples=300, deadline=None)
@given(networks())
def test_max_min_fair(net: tuple[list[float], list[tuple[int, ...]]]) -> None:
    caps, flows = net
    r = _rates(caps, flows)
    assert np.all(r > 0)
    load = np.zeros(len(caps))
    for f, rate in zip(flows, r, strict=True):
        for link in f:
            load[link] += rate
    # feasible: no link carries more than its capacity
    assert np.all(load <= np.array(caps) * (1 + 1e-9) + 1e-9)
    # max-min: every flow has a full link on which no other flow gets more than it, so raising it
    # would take from a flow that has no more than it
    for f, rate in zip(flows, r, strict=True):
        ok = False
        for link in f:
            full = load[link] >= caps[link] * (1 - 1e-7)
            largest = max(r[j] for j, g in enumerate(flows) if link in g)
            if full and rate >= largest * (1 - 1e-7):
                ok = True
        assert ok, (f, rate)


def _progressive_filling(capacity: np.ndarray, hops: list[np.ndarray]) -> np.ndarray:
    """The textbook algorithm (one level per pass), kept as the reference the fast one must match."""
    n = len(hops[0])
    rate = np.zeros(n)
    left = capacity.astype(float).copy()
    frozen = np.zeros(n, dtype=bool)
    on = [h >= 0 for h in hops]
    while not frozen.all():
        live = ~frozen
        count = np.zeros(len(capacity))
        for h, u in zip(hops, on, strict=True):
            count += np.bincount(h[live & u], minlength=len(capacity))
        busy = count > 0
        share = np.full(len(capacity), np.inf)
        share[busy] = left[busy] / count[busy]
        delta = float(share.min())
        rate[live] += delta
        left[busy] -= delta * count[busy]
        full = busy & (share <= delta * (1 + 1e-12))
        for h, u in zip(hops, on, strict=True):
            frozen |= u & full[np.where(u, h, 0)]
    return rate


@settings(max_examples=300, deadline=None)
@given(networks())
def test_same_allocation_as_progressive_filling(net: tuple[list[float], list[tuple[int, ...]]]) -> None:
    caps, flows = net
    hops = [np.array([f[h] if h < len(f) else -1 for f in flows], dtype=np.int64) for h in range(3)]
    fast = max_min_rates(np.array(caps, dtype=float), hops)
    assert np.allclose(fast, _progressive_filling(np.array(caps, dtype=float), hops), rtol=1e-9)


def test_swarm_sized_allocation_matches_progressive_filling() -> None:
    # a seed uplink and 300 node links, 6,000 flows of random pairs: hundreds of distinct levels
    rng = np.random.default_rng(1)
    n = 301
    caps = np.concatenate([[10.0], rng.uniform(20.0, 30.0, n - 1), rng.uniform(20.0, 30.0, n)])
    src = rng.integers(0, n, 6000)
    dst = rng.integers(0, n, 6000)
    hops = [src, n + dst]
    assert np.allclose(max_min_rates(caps, hops), _progressive_filling(caps, hops), rtol=1e-9)
