"""Run scenarios and turn a finished simulation into the JSON the CLI prints, and the plot."""

from __future__ import annotations

import math
import resource
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from netsim.sim.engine import Simulation
from netsim.sim.scenario import Scenario


def quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "p999": None, "max": None, "mean": None}
    a = np.asarray(values)
    return {
        "p50": float(np.quantile(a, 0.5)),
        "p99": float(np.quantile(a, 0.99)),
        "p999": float(np.quantile(a, 0.999)),
        "max": float(a.max()),
        "mean": float(a.mean()),
    }


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def summarize(sim: Simulation, wall: float) -> dict[str, Any]:
    sc = sim.sc
    bound = sc.bound()
    peers = sim.nodes[sc.seeds :]
    times = [nd.done_at - nd.arrived for nd in peers if not math.isnan(nd.done_at)]
    ratios = [t / bound for t in times]
    stats = sim.registry.stats()
    duration = max(sim.now, 1e-9)
    seed_up = sum(nd.uploaded for nd in sim.nodes[: sc.seeds])
    return {
        "policy": sc.policy,
        "nodes": sc.peers,
        "seeds": sc.seeds,
        "completed": len(times),
        "bound_s": bound,
        "completion_s": quantiles(times),
        "over_bound": quantiles(ratios),
        "seed_upload_F": seed_up / sc.size,
        "cross_zone_bytes": sim.cross_zone,
        "wasted_bytes": sim.wasted,
        # DEFER answers of every node (units, as sent): each is a request and an answer the daemon handles in
        # Python, which the flow model does not charge; slot deferrals repeat per piece while a requester waits
        "deferrals": {
            "all": sum(nd.seeding.pieces_deferred for nd in sim.nodes),
            "slots": sum(nd.seeding.slot_deferrals for nd in sim.nodes),
            "units_sent": sum(nd.seeding.pieces_sent for nd in sim.nodes),
        },
        "simulated_s": sim.now,
        "tracker": {
            "registrations": stats["registrations"],
            "heartbeats": stats["heartbeats"],
            "peer_queries": stats["peer_queries"],
            "requests_per_s": (stats["registrations"] + stats["heartbeats"] + stats["peer_queries"]) / duration,
            "peer_queries_per_s": stats["peer_queries"] / duration,
            "peak_peer_queries_in_1s": max(sim.lookups_per_second.values(), default=0),
            "heartbeat_interval_s": sc.tracker.interval,
        },
        "grain": {"pieces_per_unit": sc.grain, "units": sc.units, "unit_bytes": sc.unit_bytes},
        "engine": {
            "steps": sim.steps,
            "events": sim.events,
            "rate_recomputes": sim.recomputes,
            "rates_reused": sim.rates_reused,
            "maxmin_local_solves": sim.maxmin.local_solves,
            "maxmin_full_solves": sim.maxmin.full_solves,
            "maxmin_flows_resolved": sim.maxmin.resolved,
            "haves_skipped": sim.haves_skipped,
            "requests_skipped": sim.requests_skipped,
            "quantum_s": sim.quantum,
            "wall_s": wall,
        },
        "completion_times_s": sorted(times),
        "timeline": [list(x) for x in sim.timeline],
    }


def simulate(sc: Scenario) -> dict[str, Any]:
    t0 = time.perf_counter()
    sim = Simulation(sc)
    sim.run()
    return summarize(sim, time.perf_counter() - t0)


def run_policies(sc: Scenario, policies: list[str]) -> dict[str, Any]:
    """The same scenario (same seed, so the same arrivals) under each policy, one after the other."""
    out: dict[str, Any] = {"scenario": describe(sc), "bound_s": sc.bound(), "results": {}}
    for p in policies:
        out["results"][p] = simulate(replace(sc, policy=p))
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def describe(sc: Scenario) -> dict[str, Any]:
    return {
        "classes": [{"count": c.count, "up_Bps": c.up, "down_Bps": c.down, "zone": c.zone} for c in sc.classes],
        "size": sc.size,
        "piece": sc.piece,
        "seeds": sc.seeds,
        "seed_up_Bps": sc.seed_up,
        "arrival_rate": sc.arrival_rate,
        "churn": sc.churn,
        "churn_away_s": sc.churn_away,
        "churn_at_s": sc.churn_at,
        "zone_link_Bps": None if math.isinf(sc.zone_link) else sc.zone_link,
        "latency_s": sc.latency,
        "egress_limit_Bps": sc.egress_limit,
        "ingress_limit_Bps": sc.ingress_limit,
        "rng_seed": sc.rng_seed,
        "pipeline_depth": sc.swarm.pipeline_depth,
        "max_peers": sc.swarm.max_peers,
    }


def brief(out: dict[str, Any]) -> dict[str, Any]:
    """The JSON without per-node lists (what the CLI prints; the file keeps everything)."""
    res = {
        p: {k: v for k, v in r.items() if k not in ("completion_times_s", "timeline")}
        for p, r in out["results"].items()
    }
    return {**out, "results": res}


def plot(out: dict[str, Any], path: Path) -> None:
    """Completion-time CDF against the bound, and bytes delivered over time, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bound = out["bound_s"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for policy, r in out["results"].items():
        ts = r["completion_times_s"]
        if ts:
            ax1.plot(ts, np.arange(1, len(ts) + 1) / r["nodes"], label=policy)
        tl = np.asarray(r["timeline"]) if r["timeline"] else np.zeros((0, 4))
        if len(tl):
            size = out["scenario"]["size"]
            ax2.plot(tl[:, 0], tl[:, 1] / size, label=f"{policy}: delivered (F)")
            ax2.plot(tl[:, 0], tl[:, 2] / size, linestyle="--", label=f"{policy}: seed upload (F)")
    ax1.axvline(bound, color="k", linestyle=":", label=f"Kumar–Ross bound {bound:.2f} s")
    ax1.set_xlabel("completion time (s)")
    ax1.set_ylabel("fraction of nodes complete")
    ax1.set_ylim(0, 1.02)
    ax1.legend(loc="lower right")
    ax2.set_xlabel("simulated time (s)")
    ax2.set_ylabel("bytes, in copies of the artifact (F)")
    ax2.set_yscale("symlog")
    ax2.legend(loc="lower right", fontsize="small")
    n = out["scenario"]["classes"]
    fig.suptitle(f"{sum(c['count'] for c in n)} nodes, {out['scenario']['size'] / 2**30:.3g} GiB")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
