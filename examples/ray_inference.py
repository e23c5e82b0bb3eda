"""Complete example: serve a model that arrives peer to peer, on every node of a Ray cluster.

    python examples/ray_inference.py --local --nodes 3           # everything on this machine
    python examples/ray_inference.py --address auto --publish-via /var/lib/p2pd   # your cluster

Steps: write a small safetensors model, publish it through a p2pd daemon, preheat it on every node,
start one inference worker per node with runtime_env={"p2p": {"model": ...}}, check the outputs against
a local computation, then kill one worker and show the router sending its traffic elsewhere.

Cluster mode expects what docs/ray.md installs: a daemon on every node and Ray started with
RAY_RUNTIME_ENV_PLUGINS='[{"class":"ray_plugin.plugin.P2PPlugin"}]'. `--publish-via` is the data dir
(or control socket) of a daemon on this machine; the model dir must stay in place (it is seeded from there).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import ray

from p2pd.cluster import LocalCluster
from p2pd.paths import SOCKET_NAME
from ray_plugin import daemon_client, models
from ray_plugin.inference import InferencePool, preheat
from ray_plugin.local import exit_on_sigterm, ray_cluster

SIZES = [64, 256, 256, 10]


def publish(model_dir: Path, name: str, socket: Path) -> str:
    params = {"path": str(model_dir.resolve()), "name": name}
    result = asyncio.run(daemon_client.call("publish", params, path=socket))
    return str(result["artifact_id"])


@contextlib.contextmanager
def local_cluster(nodes: int, root: Path) -> Iterator[Path]:
    """Tracker + one daemon per Ray node + a local Ray cluster; yields the socket to publish through."""
    with LocalCluster(root) as net:
        net.start_tracker()
        daemons = net.start_nodes([f"node{i}" for i in range(nodes)])
        with ray_cluster([d.socket for d in daemons]):
            yield daemons[0].socket


def demo(socket: Path, workdir: Path, nodes: int, name: str) -> None:
    layers = models.make_mlp(SIZES, seed=42)
    model_dir = models.save_mlp(layers, workdir / "mlp")
    print(f"publishing {model_dir} as {name}: artifact {publish(model_dir, name, socket)[:16]}…")

    t0 = time.monotonic()
    got = preheat(name, timeout=600)
    print(f"preheated on {len(got)} nodes in {time.monotonic() - t0:.2f} s")

    x = np.random.default_rng(0).standard_normal((8, SIZES[0])).astype(np.float32)
    want = models.forward_numpy(layers, x)
    t0 = time.monotonic()
    with InferencePool(name, num_workers=nodes, num_cpus=0.5) as pool:
        y = pool.infer(x, timeout=600)
        print(
            f"submit -> first inference result: {time.monotonic() - t0:.2f} s; max |error| {np.abs(y - want).max():.2e}"
        )
        pool.wait_ready(timeout=600)
        batches = [x] * 40
        assert all(np.allclose(out, want, rtol=1e-4, atol=1e-5) for out in pool.map(batches))
        for i, s in pool.stats().items():
            print(
                f"  worker {i}: node {s['node_id'][:8]} {s['backend']}:{s['device']} load {s['load_s']:.2f} s, "
                f"EWMA {1e3 * (s['ewma_s'] or 0):.1f} ms, weight {s['weight']:.0f}, picks {s['picks']}"
            )
        victim = 0
        ray.kill(pool.workers[victim])  # type: ignore[arg-type]  # Ray's ActorProxy adds type[T] for typing only
        print(f"killed worker {victim}; 40 more requests:")
        assert all(np.allclose(out, want, rtol=1e-4, atol=1e-5) for out in pool.map(batches))
        for i, s in pool.stats().items():
            print(f"  worker {i}: weight {s['weight']:.0f}, picks {s['picks']}, failures {s['failures']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--local", action="store_true", help="start tracker, daemons and a Ray cluster here")
    ap.add_argument("--nodes", type=int, default=3, help="--local: Ray nodes (one daemon each)")
    ap.add_argument("--address", default="auto", help="cluster mode: Ray address")
    ap.add_argument("--publish-via", default=None, help="cluster mode: a local daemon's data dir or socket")
    ap.add_argument("--name", default="example-mlp:v1", help="NAME:TAG to publish the model as")
    args = ap.parse_args()
    exit_on_sigterm()
    workdir = Path(tempfile.mkdtemp(prefix="p2pex-", dir="/tmp"))
    try:
        if args.local:
            with local_cluster(args.nodes, workdir) as sock:
                demo(sock, workdir, args.nodes, args.name)
        else:
            via = Path(args.publish_via) if args.publish_via else daemon_client.socket_path()
            sock = via / SOCKET_NAME if via.is_dir() else via
            ray.init(address=args.address)
            nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
            # The model dir must outlive this script in cluster mode (the daemon seeds from it).
            keep = Path(tempfile.mkdtemp(prefix="p2pex-model-"))
            demo(sock, keep, nodes, args.name)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
