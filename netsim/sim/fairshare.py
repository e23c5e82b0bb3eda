"""Max-min fair rates for flows over capacitated links (progressive filling, vectorised).

Every flow crosses a few links (its source's uplink, its destination's downlink, and the link between
two zones when they differ). Progressive filling raises every unfrozen flow's rate by the same amount
until some link is full, freezes the flows on the full links, and repeats: the result is the unique
max-min fair allocation, where no flow can get more without taking from a flow that has no more than
it. That is what TCP flows sharing bottlenecks approach (SimGrid's flow-level model makes the same
assumption), and what the simulator recomputes whenever a flow starts or ends.

One pass costs a few numpy operations over the flows, and there are as many passes as distinct
bottleneck levels (a handful in a swarm of a few node classes).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
SATURATED = 1e-9  # a link with less than this fraction of its capacity left is full


def max_min_rates(capacity: FloatArray, hops: list[IntArray]) -> FloatArray:
    """Rates of flows; `hops[h][f]` is the h-th link flow f crosses (-1: none), `capacity[l]` link l's capacity.

    Every flow must cross at least one link. Links of infinite capacity never limit anything.
    """
    if not hops:
        raise ValueError("need at least one hop per flow")
    n = len(hops[0])
    rate = np.zeros(n)
    if n == 0:
        return rate
    nlinks = len(capacity)
    used = [h >= 0 for h in hops]
    if not np.all(np.logical_or.reduce(used)):
        raise ValueError("every flow must cross at least one link")
    left = capacity.astype(np.float64, copy=True)
    frozen = np.zeros(n, dtype=bool)
    # a flow whose links are all infinite is unbounded: it gets inf at once
    finite_hop = [u & np.isfinite(capacity[np.where(u, h, 0)]) for h, u in zip(hops, used, strict=True)]
    unbounded = ~np.logical_or.reduce(finite_hop)
    rate[unbounded] = np.inf
    frozen |= unbounded
    while not frozen.all():
        live = ~frozen
        count = np.zeros(nlinks)
        for h, fin in zip(hops, finite_hop, strict=True):
            sel = live & fin
            count += np.bincount(h[sel], minlength=nlinks)
        busy = count > 0
        share = np.full(nlinks, np.inf)
        share[busy] = left[busy] / count[busy]
        delta = float(share.min())
        rate[live] += delta
        left[busy] -= delta * count[busy]
        full = busy & (left <= SATURATED * capacity)
        full |= busy & (share <= delta * (1 + 1e-12))  # the links that set delta are full by construction
        left[full] = 0.0
        for h, fin in zip(hops, finite_hop, strict=True):
            frozen |= fin & full[np.where(fin, h, 0)]
    return rate
