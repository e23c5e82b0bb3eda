"""How fast the cluster page's data endpoint answers at scale: `GET /v1/cluster` on a real admin listener
(hypercorn, FastAPI, token check) of an in-memory tracker holding NODES registered nodes in 4 zones with NAT types,
demand reports and holdings of a few artifacts, a full throughput ring and a global budget. Requests are real HTTP
over loopback, one at a time (client time included: the numbers are what the page sees). `cpu_ms_per_request`
is this process's CPU time (server and client) per request: on a shared, loaded machine the wall-clock numbers
include waiting for a core, the CPU time does not.

    python -m netsim.bench.cluster_page --nodes 10000 --requests 200 --json cluster_page.json

Prints the JSON result (p50/p99/max milliseconds, answer bytes), then a one-line headline.
"""

from __future__ import annotations

import argparse
import http.client
import random
import statistics
import sys
import time
from typing import Any

import trio

from netsim.bench.harness import write_json
from tracker.admin import serve_admin
from tracker.budgets import Budgets
from tracker.server import TrackerServer
from tracker.store import MemoryStore

TOKEN = "bench-token"
ZONES = ("eu-1", "eu-2", "us-1", "ap-1")
NATS = ("open", "full-cone", "port-restricted-cone", "symmetric", "unknown")


def populate(store: MemoryStore, nodes: int, artifacts: int, rng: random.Random) -> None:
    """NODES nodes as real registrations and heartbeats would leave them (the registry's own calls)."""
    reg = store.reg
    now = store.clock()
    aids = [f"{i:064x}" for i in range(artifacts)]
    for i in range(nodes):
        nid = f"{i:032x}"
        nat = NATS[i % len(NATS)]
        reg.register(
            nid,
            "10.0.0.1",
            7000 + i % 50000,
            {"zone": ZONES[i % len(ZONES)]},
            "0.1.0",
            now,
            nat=(nat, ("203.0.113.9", 40000 + i % 20000)),
        )
        holdings = {aids[i % artifacts]: 1.0 if i % 3 else rng.random()}
        reg.heartbeat(nid, holdings, now, demand=(5e7, 1e7, rng.random() * 4e7, rng.random() * 5e6))
    for k, aid in enumerate(aids):  # the artifacts must exist with manifests for the artifact list
        art = reg.artifacts[aid]
        art.size, art.pieces, art.kind = (k + 1) << 30, ((k + 1) << 30) >> 22, "model"
    reg.set_budgets(Budgets.from_json({"total": 1e9, "zones": {"eu-1": 2e8}, "cross_zone": 1e8}))


def get(port: int) -> tuple[float, int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    t0 = time.perf_counter()
    conn.request("GET", "/v1/cluster", headers={"Authorization": f"Bearer {TOKEN}"})
    r = conn.getresponse()
    body = r.read()
    dt = time.perf_counter() - t0
    conn.close()
    if r.status != 200:
        raise RuntimeError(f"GET /v1/cluster answered {r.status}: {body[:200]!r}")
    return dt, len(body)


async def run(nodes: int, artifacts: int, requests: int) -> dict[str, Any]:
    store = MemoryStore(interval=1.0)
    populate(store, nodes, artifacts, random.Random(1))
    server = TrackerServer(store, stun=None)
    for k in range(server.throughput.samples.maxlen or 0):
        server.throughput.add(time.time() - 300 + k, *store.reg.use_totals())
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_admin, server, "127.0.0.1", 0, TOKEN)
        await trio.to_thread.run_sync(get, port)  # warm-up (imports, first-request setup)
        times, size = [], 0
        cpu0 = time.process_time()
        for _ in range(requests):
            dt, size = await trio.to_thread.run_sync(get, port)
            times.append(dt * 1000)
        cpu = time.process_time() - cpu0
        nursery.cancel_scope.cancel()
    times.sort()
    return {
        "benchmark": "cluster_page",
        "nodes": nodes,
        "artifacts": artifacts,
        "requests": requests,
        "p50_ms": round(statistics.median(times), 2),
        "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))], 2),
        "max_ms": round(times[-1], 2),
        "cpu_ms_per_request": round(cpu * 1000 / requests, 2),
        "answer_bytes": size,
        "goal_ms": 50,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m netsim.bench.cluster_page",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--nodes", type=int, default=10_000, help="registered nodes (default 10000)")
    ap.add_argument("--artifacts", type=int, default=8, help="artifacts the nodes hold (default 8)")
    ap.add_argument("--requests", type=int, default=200, help="timed requests (default 200)")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the result here")
    a = ap.parse_args(argv)
    if a.nodes < 1 or a.artifacts < 1 or a.requests < 1:
        print("--nodes, --artifacts and --requests must be at least 1", file=sys.stderr)
        return 2
    res = trio.run(run, a.nodes, a.artifacts, a.requests)
    print(write_json(res, a.json))
    print(
        f"GET /v1/cluster at {a.nodes} nodes: p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms, "
        f"{res['cpu_ms_per_request']} ms CPU per request (goal < 50 ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
