"""Benchmark: one flow change in a swarm-shaped flow set, the incremental max-min update against a full
recomputation (`python -m netsim.sim.bench_maxmin --nodes 1000,10000`; prints JSON).

Why a separate benchmark: in a whole run the rate model's share depends on the daemon's rules around it; this
isolates how each solver's cost grows with the swarm. The flow set is the shape the simulator sees with upload
slots at every node: every node (and the seed) uploads to `slots` random others, links all alike except the
seed's. Each change ends a random flow and starts one between two random nodes; both solvers must agree.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np

from netsim.sim.fairshare import IncrementalMaxMin, max_min_rates


def bench(nodes: int, slots: int, changes: int, seed: int) -> dict[str, float | int]:
    rng = random.Random(seed)
    n = nodes + 1  # node 0 is the seed
    capacity = np.full(2 * n, 25e9 / 8)
    capacity[0] = 10e9 / 8
    inc = IncrementalMaxMin(capacity)
    paths: dict[int, tuple[int, int]] = {}
    ids = 0
    for src in range(n):
        for dst in rng.sample(range(1, n), slots):
            if dst != src:
                paths[ids] = (src, n + dst)
                inc.add(ids, list(paths[ids]))
                ids += 1
    inc.solve()
    t_inc = t_full = 0.0
    worst = 0.0
    inc.resolved = 0
    for _ in range(changes):
        gone = rng.choice(list(paths))
        inc.remove(gone)
        del paths[gone]
        src, dst = rng.sample(range(n), 2)
        paths[ids] = (src, n + dst)
        inc.add(ids, list(paths[ids]))
        ids += 1
        t0 = time.process_time()
        inc.solve()
        t1 = time.process_time()
        flows = list(paths)
        full = max_min_rates(capacity, [np.array([paths[f][h] for f in flows]) for h in range(2)])
        t2 = time.process_time()
        t_inc += t1 - t0
        t_full += t2 - t1
        got = np.array([inc.rate[f] for f in flows])
        worst = max(worst, float(np.max(np.abs(got - full) / full)))
    return {
        "nodes": nodes,
        "flows": len(paths),
        "changes": changes,
        "incremental_ms_per_change": 1000 * t_inc / changes,
        "full_ms_per_change": 1000 * t_full / changes,
        "speedup": t_full / t_inc if t_inc else float("inf"),
        "flows_resolved_per_change": inc.resolved / changes,
        "full_solves": inc.full_solves,
        "max_relative_difference": worst,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="1000,10000", help="comma-separated swarm sizes")
    ap.add_argument("--slots", type=int, default=4, help="flows each node uploads (upload slots)")
    ap.add_argument("--changes", type=int, default=200, help="flow changes timed per size")
    ap.add_argument("--rng-seed", type=int, default=0)
    a = ap.parse_args()
    sizes = [int(x) for x in a.nodes.split(",")]
    print(json.dumps([bench(s, a.slots, a.changes, a.rng_seed) for s in sizes], indent=2))


if __name__ == "__main__":
    main()
