"""Max-min fair rates for flows over capacitated links (parallel bottleneck freezing, vectorised).

Every flow crosses a few links (its source's uplink, its destination's downlink, and the link between
two zones when they differ). The max-min fair allocation is the one where no flow can get more without
taking from a flow that has no more than it: what TCP flows sharing bottlenecks approach (SimGrid's
flow-level model makes the same assumption), and what the simulator recomputes whenever a flow starts
or ends.

Progressive filling (raise every unfrozen flow until the tightest link is full, freeze its flows,
repeat) finds it in one pass per distinct bottleneck level: in a swarm where every node's uplink
carries a different number of flows that is hundreds of passes over tens of thousands of flows, and it
was the simulator's cost at 1,000 nodes. This computes the same allocation freezing many levels per
pass. A link's *level* is its capacity left over its unfrozen flows; levels only rise as flows freeze
(a flow freezes at no more than the level of each of its links). So a link whose level is no higher
than that of any link sharing a flow with it (a local minimum) ends at exactly that level: all its
flows freeze at it in the same pass as every other local minimum. The global minimum is always one,
so each pass makes progress; the number of passes is the depth of the bottleneck chain (a few).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
TIE = 1e-12  # relative tolerance for "this link's level is the minimum its flows see"


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
    hop = np.stack([np.asarray(h, dtype=np.int64) for h in hops])
    used = hop >= 0
    if not np.all(used.any(axis=0)):
        raise ValueError("every flow must cross at least one link")
    # links that cannot limit (no hop, or infinite) all become one sentinel link of infinite level
    sentinel = nlinks
    limiting = used & np.isfinite(capacity[np.where(used, hop, 0)])
    hop = np.where(limiting, hop, sentinel)
    unbounded = ~limiting.any(axis=0)
    rate[unbounded] = np.inf  # a flow whose links are all infinite gets inf at once
    live = np.flatnonzero(~unbounded)
    hop = hop[:, live]
    left = np.append(capacity.astype(np.float64), np.inf)
    while live.size:
        flat = hop.ravel()
        count = np.bincount(flat, minlength=nlinks + 1)
        level = np.full(nlinks + 1, np.inf)
        busy = count > 0
        busy[sentinel] = False
        level[busy] = np.maximum(left[busy], 0.0) / count[busy]
        flow_min = np.minimum.reduce(list(level[hop]))  # the level each flow would freeze at now (row-wise: fast)
        seen = np.full(nlinks + 1, np.inf)  # per link: the lowest level any of its flows sees
        np.minimum.at(seen, flat, np.tile(flow_min, hop.shape[0]))
        bottleneck = busy & (level <= seen * (1 + TIE))
        frozen = np.logical_or.reduce(list(bottleneck[hop]))
        r = flow_min[frozen]
        rate[live[frozen]] = r
        fh = hop[:, frozen]
        left -= np.bincount(fh.ravel(), weights=np.tile(r, fh.shape[0]), minlength=nlinks + 1)
        left[sentinel] = np.inf
        keep = ~frozen
        live = live[keep]
        hop = hop[:, keep]
    return rate
