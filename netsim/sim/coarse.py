"""The coarse model for 10^4–10^6 nodes: a sampled sub-swarm run by the piece-level engine, the rest of the
swarm as generations of a dissemination tree under each sampled node.

Why this shape (docs/simulator.md, "The coarse model"): what decides the outcome of a large swarm is (1) the
seed's behaviour -- which pieces it sends, how many peers it serves at once, its second copies -- and the
peers' picking and upload slots, and (2) how deep the dissemination tree is. (1) does not depend on N once
the swarm is large: the seed serves `upload_slots` peers at once whatever its connection count, every node
has ~2 x max_peers connections, and every node uploads about one copy F on average. So a sample of n nodes
with the same seed, the same link classes and the daemon's own rules (the engine: Picker, DistinctFirstSeeding,
SwarmConfig, the tracker's Registry) gives the seed's upload and each sampled node's completion time. (2) is
what grows with N: each sampled node stands for N/n nodes, which get the last pieces through a tree whose
holders each serve `fanout` peers at once (the daemon's upload slots; BitTorrent's 4 + 1 unchoke slots), one
generation every `hop_s` (a HAVE and a request one way each, then one piece at the holder's uplink share).
Pieces are pipelined through the tree, so a generation costs one piece's hop, not the artifact's.

Cost: one engine run of n nodes per policy, independent of N (10^6 costs what 10^4 does, plus the bound).

What it does not model (so it refuses): a shared link between zones (the sample's cross-zone flows would need
the link scaled, and the share between seed and peers changes with N). Poisson arrivals are scaled to the
sample (rate x n/N, the same arrival span); a descendant's time counts from its sampled root's arrival.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from netsim.sim.engine import BT_UNCHOKE_SLOTS, Simulation
from netsim.sim.report import describe, peak_rss_bytes, summarize
from netsim.sim.scenario import NodeClass, Scenario

SAMPLE = 100  # sampled nodes: enough for the slot gate (>= 16 connections) and the seed's fan-out; ~1 min of engine


@dataclass(frozen=True)
class Tree:
    """How the nodes a sampled node stands for get the last pieces: `fanout` children per holder per `hop_s`."""

    fanout: int
    hop_s: float

    def generations(self, represented: float) -> list[tuple[int, float]]:
        """(depth, nodes at that depth) for a subtree of `represented` nodes rooted at a sampled node (depth 0)."""
        out: list[tuple[int, float]] = []
        have, g = 0.0, 0
        while have < represented - 1e-9:
            reach = min(represented, float((1 + self.fanout) ** g))
            out.append((g, reach - have))
            have, g = reach, g + 1
        return out


def fanout(sc: Scenario, policy: str) -> int:
    """Peers a holder uploads to at once in a large swarm, by the policy's own rule."""
    if policy == "bittorrent":
        return BT_UNCHOKE_SLOTS + 1  # regular unchoke slots plus the optimistic one
    cfg = sc.swarm
    connections = 2 * cfg.max_peers  # dialled plus accepted: each node is dialled by ~max_peers others
    if cfg.upload_slots and connections >= cfg.upload_slots_min_peers:
        return cfg.upload_slots  # DistinctFirstSeeding.slots_busy defers everyone else
    return connections  # no cap: one writer per connection, all at once


def hop_s(sc: Scenario, cls: NodeClass, fan: int) -> float:
    """One tree generation for one unit: the holder's HAVE and the child's request (one way each), then the
    unit at the holder's uplink share (or the child's downlink, if smaller)."""
    up = cls.up if sc.egress_limit is None else min(cls.up, sc.egress_limit)
    down = cls.down if sc.ingress_limit is None else min(cls.down, sc.ingress_limit)
    return 2 * sc.latency + sc.unit_bytes / min(up / fan, down)


def sample_scenario(sc: Scenario, sample: int) -> tuple[Scenario, list[float]]:
    """The sub-swarm (each class scaled to about `sample` nodes in all, at least one each) and, per sampled class,
    how many real nodes one sampled node stands for."""
    if sample < 1:
        raise ValueError(f"the coarse model's sample is at least 1 node, got {sample}")
    if math.isfinite(sc.zone_link):
        raise ValueError(
            "the coarse model does not model a shared link between zones; drop --zone-link or use --model piece"
        )
    total = sc.peers
    classes, weights = [], []
    for c in sc.classes:
        n = max(1, round(c.count * sample / total))
        classes.append(replace(c, count=n))
        weights.append(c.count / n)
    n_all = sum(c.count for c in classes)
    rate = None if sc.arrival_rate is None else sc.arrival_rate * n_all / total
    return replace(sc, classes=tuple(classes), arrival_rate=rate), weights


def weighted_quantiles(values: np.ndarray, weights: np.ndarray) -> dict[str, float | None]:
    """Quantiles of a distribution given as values with weights (the smallest value reaching the fraction)."""
    if not len(values):
        return {"p50": None, "p99": None, "p999": None, "max": None, "mean": None}
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[order]
    cum = np.cumsum(w)
    total = float(cum[-1])

    def q(f: float) -> float:
        return float(v[min(len(v) - 1, int(np.searchsorted(cum, f * total - 1e-9 * total)))])

    return {"p50": q(0.5), "p99": q(0.99), "p999": q(0.999), "max": float(v[-1]), "mean": float(v @ w / total)}


def extend(sim: Simulation, sub: Scenario, weights: list[float], trees: list[Tree]) -> tuple[np.ndarray, np.ndarray]:
    """Every node of the full swarm as (completion time, how many nodes): each sampled node's subtree."""
    times: list[float] = []
    counts: list[float] = []
    peers = sim.nodes[sub.seeds :]
    i = 0
    for c, w, tree in zip(sub.classes, weights, trees, strict=True):
        gens = tree.generations(w)
        for nd in peers[i : i + c.count]:
            if math.isnan(nd.done_at):
                continue  # it and the nodes it stands for did not complete within the horizon
            t = nd.done_at - nd.arrived
            for g, m in gens:
                times.append(t + g * tree.hop_s)
                counts.append(m)
        i += c.count
    return np.asarray(times), np.asarray(counts)


def run_sample(sc: Scenario, sample: int) -> tuple[Simulation, Scenario, list[float], float]:
    """The engine on the sampled sub-swarm (CPU time: the engine's at `sample` nodes, whatever N is)."""
    t0 = time.perf_counter()
    sub, weights = sample_scenario(sc, sample)
    sim = Simulation(sub)
    sim.run()
    return sim, sub, weights, time.perf_counter() - t0


def simulate_coarse(sc: Scenario, sample: int = SAMPLE) -> dict[str, Any]:
    """One policy at the full scenario's size: the engine on the sample, then the tree extension."""
    t0 = time.perf_counter()
    if sc.peers <= sample:  # the sample is the swarm: the piece-level engine's own answer
        sim = Simulation(sc)
        sim.run()
        out = summarize(sim, time.perf_counter() - t0)
        out["coarse"] = {"sample": sc.peers, "exact": True}
        return out
    sim, sub, weights, wall = run_sample(sc, sample)
    return extend_to(sc, sim, sub, sample, wall)


def extend_to(sc: Scenario, sim: Simulation, sub: Scenario, sample: int, sample_wall: float) -> dict[str, Any]:
    """The full swarm `sc` from a sample run: each sampled node's completion, then its subtree's generations.
    `sub` must be `sc`'s sample (one sample run serves every N with the same class proportions)."""
    t0 = time.perf_counter()
    check, weights = sample_scenario(sc, sample)
    if check != sub:
        raise ValueError("the sample run is not this scenario's sample (class proportions or settings differ)")
    trees = [Tree(fanout(sc, sc.policy), 0.0) for _ in sub.classes]
    trees = [replace(t, hop_s=hop_s(sc, c, t.fanout)) for t, c in zip(trees, sub.classes, strict=True)]
    inner = summarize(sim, sample_wall)
    times, counts = extend(sim, sub, weights, trees)
    bound = sc.bound()
    scale = sc.peers / sub.peers
    completed = float(counts.sum()) if len(counts) else 0.0
    return {
        "policy": sc.policy,
        "nodes": sc.peers,
        "seeds": sc.seeds,
        "completed": round(completed),
        "bound_s": bound,
        "completion_s": weighted_quantiles(times, counts),
        "over_bound": weighted_quantiles(times / bound, counts),
        "seed_upload_F": inner["seed_upload_F"],  # the seed's upload does not grow with N (see the module doc)
        "cross_zone_bytes": inner["cross_zone_bytes"] * scale,
        "wasted_bytes": inner["wasted_bytes"] * scale,
        "simulated_s": float(times.max()) if len(times) else inner["simulated_s"],
        "tracker": {
            k: v * scale if k in ("registrations", "heartbeats", "peer_queries") else v
            for k, v in inner["tracker"].items()
        },
        "grain": inner["grain"],
        "engine": {**inner["engine"], "wall_s": sample_wall + time.perf_counter() - t0},
        "coarse": {
            "sample": sub.peers,
            "exact": False,
            "nodes_per_sampled_node": weights,
            "fanout": [t.fanout for t in trees],
            "hop_s": [t.hop_s for t in trees],
            "generations": max(len(t.generations(w)) for t, w in zip(trees, weights, strict=True)) - 1,
            "sample_over_bound": inner["over_bound"],
            "sample_bound_s": inner["bound_s"],
        },
        "completion_times_s": [],  # N values are not kept; the quantiles above are the weighted distribution's
        "timeline": inner["timeline"],  # the sample's (seed upload in F is the full swarm's; delivered is the sample's)
    }


def resized(sc: Scenario, nodes: int) -> Scenario:
    """The same scenario with `nodes` downloading nodes in the same class proportions."""
    if nodes < 1:
        raise ValueError(f"a swarm size is at least 1 node, got {nodes}")
    return replace(sc, classes=tuple(replace(c, count=max(1, round(c.count * nodes / sc.peers))) for c in sc.classes))


def run_coarse(sc: Scenario, policies: list[str], sample: int = SAMPLE, also: tuple[int, ...] = ()) -> dict[str, Any]:
    """run_policies for the coarse model: the same scenario under each policy, one after the other. `also`: more
    swarm sizes extended from the same sample run (the sample does not depend on N), under out["also"][N]."""
    out: dict[str, Any] = {"scenario": describe(sc), "bound_s": sc.bound(), "model": "coarse", "results": {}}
    sizes = [resized(sc, n) for n in also]
    out["also"] = {str(s.peers): {"bound_s": s.bound(), "results": {}} for s in sizes}
    for p in policies:
        one = replace(sc, policy=p)
        if sc.peers <= sample or any(s.peers <= sample for s in sizes):
            out["results"][p] = simulate_coarse(one, sample)
            for s in sizes:
                out["also"][str(s.peers)]["results"][p] = simulate_coarse(replace(s, policy=p), sample)
            continue
        sim, sub, _, wall = run_sample(one, sample)
        out["results"][p] = extend_to(one, sim, sub, sample, wall)
        for s in sizes:
            r = extend_to(replace(s, policy=p), sim, sub, sample, wall)
            out["also"][str(s.peers)]["results"][p] = {k: v for k, v in r.items() if k != "timeline"}
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out
