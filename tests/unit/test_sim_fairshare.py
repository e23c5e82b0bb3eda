"""Max-min fair sharing (netsim.sim.fairshare): feasibility and the bottleneck property."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netsim.sim import bench_maxmin, fairshare
from netsim.sim.fairshare import IncrementalMaxMin, max_min_rates


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


def _full(caps: list[float], inc: IncrementalMaxMin) -> dict[int, float]:
    flows = sorted(inc.links)
    paths = [inc.links[f] for f in flows]
    limited = [i for i, p in enumerate(paths) if p]
    out = {f: math.inf for f, p in zip(flows, paths, strict=True) if not p}
    if limited:
        hops = [np.array([paths[i][h] if h < len(paths[i]) else -1 for i in limited], dtype=np.int64) for h in range(3)]
        for i, r in zip(limited, max_min_rates(np.array(caps, dtype=float), hops).tolist(), strict=True):
            out[flows[i]] = r
    return out


@st.composite
def change_scripts(draw: st.DrawFn) -> tuple[list[float], list[list[tuple[str, tuple[int, ...]]]]]:
    """Capacities (some infinite) and batches of changes: ("add", links), ("end", ()), ("swap", ()) = an ended
    flow replaced by one on the same links in the same batch (the engine's settled case)."""
    nlinks = draw(st.integers(1, 10))
    caps = draw(st.lists(st.one_of(st.floats(0.5, 1000.0), st.just(math.inf)), min_size=nlinks, max_size=nlinks))
    path = st.lists(st.integers(0, nlinks - 1), min_size=1, max_size=3, unique=True).map(tuple)
    change = st.one_of(
        st.tuples(st.just("add"), path), st.tuples(st.sampled_from(["end", "swap", "abort"]), st.just(()))
    )
    batches = draw(st.lists(st.lists(change, min_size=1, max_size=6), min_size=1, max_size=12))
    return caps, batches


@settings(max_examples=300, deadline=None)
@given(change_scripts(), st.randoms(use_true_random=False), st.sampled_from([0, fairshare.SMALL]))
def test_incremental_allocation_equals_a_full_recompute_after_every_change(
    script: tuple[list[float], list[list[tuple[str, tuple[int, ...]]]]], rnd: random.Random, small: int
) -> None:
    """Random flow sets and change batches; `small` 0 solves every area with numpy, else in plain Python."""
    default = fairshare.SMALL
    fairshare.SMALL = small
    try:
        _check_script(script, rnd)
    finally:
        fairshare.SMALL = default


def _check_script(script: tuple[list[float], list[list[tuple[str, tuple[int, ...]]]]], rnd: random.Random) -> None:
    caps, batches = script
    inc = IncrementalMaxMin(np.array(caps, dtype=float))
    ids = itertools.count()
    for batch in batches:
        pending: list[tuple[int, ...]] = []  # links of flows ended as settled, not yet replaced
        for op, links in batch:
            live = sorted(inc.links)
            if op == "add":
                inc.add(next(ids), list(links))
            elif live:
                f = rnd.choice(live)
                own = inc.links[f]
                if op == "abort":
                    inc.remove(f)
                else:
                    r = inc.rate[f]
                    inc.remove(f, settled=True)
                    if op == "swap":
                        inc.add(next(ids), list(own), rate=r)
                    else:
                        pending.append(own)
        for own in pending:
            inc.touch(list(own))
        old = dict(inc.rate)
        changed = inc.solve()
        want = _full(caps, inc)
        assert sorted(inc.rate) == sorted(want)
        for f, r in want.items():
            assert inc.rate[f] == pytest.approx(r, rel=1e-9), (f, inc.links[f])
        assert changed == {f: r for f, r in inc.rate.items() if old.get(f) != r}


def test_incremental_re_solves_only_the_neighbourhood_of_a_change() -> None:
    # 200 disjoint uplink->downlink pairs, one flow each: a new flow on pair 0 re-solves pair 0's flows only
    n = 200
    caps = np.full(2 * n, 10.0)
    inc = IncrementalMaxMin(caps)
    for i in range(n):
        inc.add(i, [i, n + i])
    inc.solve()
    inc.resolved = 0
    inc.add(n, [0, n])
    changed = inc.solve()
    assert changed == {0: 5.0, n: 5.0}
    assert inc.resolved == 2 and inc.full_solves == 1 and inc.local_solves == 1


def test_swarm_shaped_changes_agree_with_full_recomputes() -> None:
    # the benchmark's own check, small: 300 nodes x 4 upload slots, 30 changes, every rate equal to a full solve
    out = bench_maxmin.bench(300, 4, 30, seed=2)
    assert out["max_relative_difference"] < 1e-9
    assert out["flows_resolved_per_change"] < out["flows"] / 4  # local: far fewer than all flows re-solved
