"""Helpers of the tracker suite (imported by name: pytest puts this directory on sys.path): valid
manifests without data, node ids, a private Redis, and a minimal node process.

The processes (trackers, redis-server, node processes) belong to a `p2pd.cluster.LocalCluster`, which
owns them by PID. Run as a script, this file is that minimal node: it heartbeats through the real
`TrackerClient` until SIGTERM, then says goodbye (SIGKILL is a crash).
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from p2pd.cluster import LocalCluster, Redis, ToolMissing
from p2pd.protocol import manifest as mf


def make_manifest(seed: int = 0, size: int = 3 << 20) -> bytes:
    """A valid canonical manifest (digests are arbitrary: the tracker never sees piece data)."""
    piece = mf.choose_piece_size(size)
    n = mf.num_pieces(size, piece)
    digests = bytes((seed + i) % 256 for i in range(n * mf.DIGEST_SIZE))
    m = mf.build([mf.FileEntry(f"model-{seed}.safetensors", size)], piece, digests)
    return mf.encode(m)


def nid(i: int) -> str:
    return f"{i:032x}"


def start_redis(cluster: LocalCluster) -> Redis:
    """A private redis-server of the cluster, or skip the test naming the Debian package to install."""
    import pytest

    try:
        return cluster.start_redis()
    except ToolMissing as e:
        pytest.skip(e.message)


def node_cmd(
    trackers: list[tuple[str, int]],
    node_id: str,
    holdings: dict[str, float],
    *,
    port: int = 9000,
    zone: str = "",
    udp: bool = True,
) -> list[str]:
    """Command line of a minimal node process (this file as a script): heartbeats until SIGTERM, then
    says goodbye to the tracker; SIGKILL is a crash."""
    args = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--node-id",
        node_id,
        "--port",
        str(port),
        "--holdings",
        json.dumps(holdings),
        "--zone",
        zone,
    ]
    for h, p in trackers:
        args += ["--tracker", f"{h}:{p}"]
    if not udp:
        args.append("--no-udp")
    return args


async def _node_main(argv: list[str]) -> None:
    import argparse

    import trio

    from p2pd.rpc import parse_hostport
    from p2pd.tracker_client import TrackerClient

    ap = argparse.ArgumentParser(prog="tracker_testutil.py")
    ap.add_argument("--tracker", action="append", required=True)
    ap.add_argument("--node-id", required=True)
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--holdings", default="{}")
    ap.add_argument("--zone", default="")
    ap.add_argument("--no-udp", action="store_true")
    a = ap.parse_args(argv)
    holdings = json.loads(a.holdings)
    labels = {"zone": a.zone} if a.zone else {}
    trackers = [parse_hostport(t) for t in a.tracker]
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with TrackerClient(trackers, a.node_id, ("127.0.0.1", a.port), labels, "test", udp=not a.no_udp) as tc:
            async with trio.open_nursery() as nursery:
                await nursery.start(tc.run_heartbeats, lambda: holdings)
                print("node running", flush=True)
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()
            await tc.leave()
            print("node left", flush=True)


if __name__ == "__main__":
    import trio

    trio.run(_node_main, sys.argv[1:])
