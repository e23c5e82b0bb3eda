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

import math

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


SETTLE_TOL = 1e-10  # relative: a link this close to its capacity is full, a rate this close to the top is the top
SMALL = 64  # areas up to this many flows are solved in plain Python: numpy's per-call cost dominates there
FULL_SHARE = 0.25  # once a change reaches this share of all flows, one full computation is cheaper than growing


class IncrementalMaxMin:
    """The max-min allocation kept up to date as flows come and go, re-solving only the flows a change reaches.

    Why: the simulator changes a few flows at a time among thousands, and `max_min_rates` over all of them
    per change was 93 % of a 1,000-node run. A change moves the rates of a neighbourhood of the flows it
    touches, and (the swarm's links being many and its uplinks few-slotted) that neighbourhood is usually
    small. `solve` re-solves a set A of flows (the changed links' flows) on the capacity the others leave,
    then checks the max-min condition (every flow has a full link on which no flow gets more: Bertsekas and
    Gallager's bottleneck characterisation, which holds for the max-min allocation and no other) on every
    flow whose links A touches; flows that fail it and their links' flows join A, until none fails. The
    result is the same allocation as `max_min_rates` over all flows (to SETTLE_TOL); where A grows past
    FULL_SHARE of the flows it is computed whole instead.
    """

    def __init__(self, capacity: FloatArray) -> None:
        self.capacity = [float(c) for c in capacity]
        self.links: dict[int, tuple[int, ...]] = {}  # flow -> the links of finite capacity it crosses
        self.on: list[set[int]] = [set() for _ in self.capacity]  # link -> its flows
        self.rate: dict[int, float] = {}
        self.touched: set[int] = set()  # links whose flows changed since the last solve
        self.full_solves = 0
        self.local_solves = 0
        self.resolved = 0  # flows re-solved, summed over solves

    def add(self, flow: int, links: list[int], rate: float | None = None) -> None:
        """A new flow on `links` (negative or infinite: none); `rate` given = a settled rate the caller knows
        leaves the allocation as it was (a flow that replaced one that just ended on the same links)."""
        own = tuple(sorted({lk for lk in links if lk >= 0 and math.isfinite(self.capacity[lk])}))
        self.links[flow] = own
        for lk in own:
            self.on[lk].add(flow)
        if rate is not None:
            self.rate[flow] = rate
        elif own:
            self.rate[flow] = 0.0
            self.touched.update(own)
        else:
            self.rate[flow] = math.inf

    def remove(self, flow: int, *, settled: bool = False) -> None:
        """The flow ended; `settled`: the caller will start one on the same links in its place (see add)."""
        own = self.links.pop(flow)
        del self.rate[flow]
        for lk in own:
            self.on[lk].discard(flow)
        if not settled:
            self.touched.update(own)

    def touch(self, links: list[int]) -> None:
        """A settled removal that no flow replaced after all: its links' allocation must be solved again."""
        self.touched.update(lk for lk in links if lk >= 0 and math.isfinite(self.capacity[lk]))

    def solve(self) -> dict[int, float]:
        """Bring the allocation up to date; returns every flow's rate that changed (flow -> new rate)."""
        if not self.touched:
            return {}
        area: set[int] = set()
        touched = self.touched
        for lk in touched:
            area |= self.on[lk]
        self.touched = set()
        before = {f: self.rate[f] for f in area}
        limit = FULL_SHARE * len(self.links)
        while area:
            if len(area) > limit:
                area = {f for f, own in self.links.items() if own}
                for f in area:
                    before.setdefault(f, self.rate[f])  # flows re-solved above keep their rate from before
                self._solve_set(area)
                self.full_solves += 1
                break
            self._solve_set(area)
            moved = set(touched)  # links whose flows or rates changed: only their flows' bottlenecks may break
            for f in area:
                if self.rate[f] != before[f]:
                    moved.update(self.links[f])
            bad = self._unsettled(area, moved)
            if not bad:
                self.local_solves += 1
                break
            grown = len(area)
            for f in bad:
                for lk in self.links[f]:
                    area |= self.on[lk]
            if len(area) == grown:
                limit = 0  # nothing new to re-solve (rounding at a tie): settle it by one full computation
                continue
            for f in area:
                if f not in before:
                    before[f] = self.rate[f]  # not yet re-solved: still its old rate
        self.resolved += len(area)
        return {f: self.rate[f] for f, r in before.items() if f in self.rate and self.rate[f] != r}

    def _solve_set(self, area: set[int]) -> None:
        """Max-min rates of the flows in `area` on what the other flows leave of each link."""
        flows = list(area)
        index: dict[int, int] = {}
        for f in flows:
            for lk in self.links[f]:
                if lk not in index:
                    index[lk] = len(index)
        left = np.empty(len(index))
        rate = self.rate
        for lk, i in index.items():
            left[i] = self.capacity[lk] - sum(rate[g] for g in self.on[lk] if g not in area)
        if len(flows) <= SMALL:
            for f, r in zip(
                flows,
                _filling([max(x, 0.0) for x in left.tolist()], [[index[lk] for lk in self.links[f]] for f in flows]),
                strict=True,
            ):
                rate[f] = r
            return
        width = max(len(self.links[f]) for f in flows)
        hops = [
            np.array([index[self.links[f][h]] if h < len(self.links[f]) else -1 for f in flows], dtype=np.int64)
            for h in range(width)
        ]
        for f, r in zip(flows, max_min_rates(np.maximum(left, 0.0), hops).tolist(), strict=True):
            rate[f] = r

    def _unsettled(self, area: set[int], moved: set[int]) -> set[int]:
        """Flows of `area` or on the `moved` links that have no bottleneck (a full link where none gets more).
        Any other flow's links are as they were when the allocation last met the condition."""
        rate = self.rate
        near = area.union(*(self.on[lk] for lk in moved))
        full_top: dict[int, float] = {}  # link -> the top rate on it, for full links only

        def top_if_full(lk: int) -> float:
            t = full_top.get(lk)
            if t is None:
                rs = [rate[g] for g in self.on[lk]]
                t = max(rs) if sum(rs) >= self.capacity[lk] * (1 - SETTLE_TOL) else math.inf
                full_top[lk] = t
            return t

        return {g for g in near if not any(rate[g] >= top_if_full(lk) * (1 - SETTLE_TOL) for lk in self.links[g])}


def _filling(left: list[float], paths: list[list[int]]) -> list[float]:
    """Progressive filling, one level per pass (the textbook algorithm), for a few flows: raise every unfrozen
    flow until the tightest link is full, freeze that link's flows at its level, repeat."""
    on: list[list[int]] = [[] for _ in left]
    for f, p in enumerate(paths):
        for lk in p:
            on[lk].append(f)
    count = [len(fs) for fs in on]
    rate = [math.nan] * len(paths)
    todo = len(paths)
    while todo:
        level = min(left[lk] / count[lk] for lk in range(len(left)) if count[lk])
        for lk in range(len(left)):
            if count[lk] and left[lk] / count[lk] <= level * (1 + TIE):
                for f in on[lk]:
                    if math.isnan(rate[f]):
                        rate[f] = level
                        todo -= 1
                        for m in paths[f]:
                            left[m] -= level
                            count[m] -= 1
    return rate
