"""Two real daemons on loopback that cannot dial each other still exchange pieces: through a relay (the
tracker's, or a node's run with `--relay`) or over a TCP simultaneous open arranged by the tracker.

The direct path is made to fail by advertising an address nothing listens on (127.0.0.2: the daemons
listen on 127.0.0.1 only), so the tracker hands each node a peer address that refuses connections.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import trio

from p2pd.cluster import LocalCluster, Node
from tests.integration.helpers import sha256_tree, wait_until

MiB = 1 << 20
UNREACHABLE = ("--advertise", "127.0.0.2")


def make_artifact(root: Path, size: int) -> Path:
    root.mkdir(parents=True)
    (root / "weights.bin").write_bytes(os.urandom(size))
    (root / "config.json").write_text('{"layers": 32}\n' * 100)
    return root


async def connections_of(node: Node, aid: str) -> list[dict[str, Any]]:
    art = await node.artifact(aid)
    return list(art["connections"]) if art else []


async def fetch_and_check(c: LocalCluster, seed: Node, leech: Node, src: Path, name: str, path: str) -> None:
    """leech fetches what seed published; bytes identical; both ends show the connection's path."""
    aid = await c.publish_async(seed, src, name)
    got = await c.fetch_async(leech, name, timeout=60)
    assert sha256_tree(got) == sha256_tree(src)
    # the leech's status names the path; so does the seed's end of the same connection
    for node, other in ((leech, seed), (seed, leech)):
        conns = await wait_until(lambda n=node: connections_of(n, aid), 10, what=f"{node.name} connected")
        other_id = (await other.call("status"))["node_id"]
        assert [x["path"] for x in conns if x["node_id"] == other_id] == [path], conns


async def test_download_over_the_trackers_relay_when_direct_fails(cluster: LocalCluster, workdir: Path) -> None:
    src = make_artifact(workdir / "src", 6 * MiB + 123)
    seed = await cluster.start_node_async("seed", *UNREACHABLE, "--paths", "direct,relay")
    leech = await cluster.start_node_async("leech", *UNREACHABLE, "--paths", "direct,relay")
    await fetch_and_check(cluster, seed, leech, src, "model:relay", "relay")
    r = await cluster.cli_async(leech, "status", "--json")
    assert r.returncode == 0, r.stderr.decode()
    st = json.loads(r.stdout)
    assert [c["path"] for a in st["artifacts"] for c in a["connections"]] == ["relay"]
    assert st["traversal"]["signal_channel"] is True
    assert st["traversal"]["wins"]["relay"] >= 1 and st["traversal"]["wins"]["direct"] == 0
    assert "spliced" in cluster.tracker.process.log_text()


async def test_download_over_a_tcp_punch_when_direct_fails(cluster: LocalCluster, workdir: Path) -> None:
    src = make_artifact(workdir / "src", 6 * MiB + 7)
    seed = await cluster.start_node_async("seed", *UNREACHABLE, "--paths", "direct,tcp-punch")
    leech = await cluster.start_node_async("leech", *UNREACHABLE, "--paths", "direct,tcp-punch")
    await fetch_and_check(cluster, seed, leech, src, "model:punch", "tcp-punch")
    # the other way round too: a second punched connection between the same two nodes, fresh ports
    src2 = make_artifact(workdir / "src2", 3 * MiB)
    await fetch_and_check(cluster, leech, seed, src2, "model:punch2", "tcp-punch")


async def test_a_nodes_relay_when_the_tracker_runs_none(workdir: Path) -> None:
    c = LocalCluster(workdir)
    try:
        c.start_tracker("--no-relay")
        relay = await c.start_node_async("relay", "--relay", "--relay-listen", "127.0.0.1:0")
        src = make_artifact(workdir / "src", 4 * MiB)
        seed = await c.start_node_async("seed", *UNREACHABLE, "--paths", "direct,relay")
        leech = await c.start_node_async("leech", *UNREACHABLE, "--paths", "direct,relay")
        with trio.fail_after(60):
            await fetch_and_check(c, seed, leech, src, "model:noderelay", "relay")
        st = (await relay.call("status"))["traversal"]["relay"]
        assert st["pairs_spliced"] >= 1 and st["bytes_relayed"] >= 4 * MiB, st
    finally:
        c.close()


async def test_race_keeps_direct_when_it_works(cluster: LocalCluster, workdir: Path) -> None:
    """With every path enabled and a reachable peer, the direct path wins and nothing else is tried."""
    src = make_artifact(workdir / "src", 2 * MiB)
    seed = await cluster.start_node_async("seed")
    leech = await cluster.start_node_async("leech")
    await fetch_and_check(cluster, seed, leech, src, "model:direct", "direct")
    wins = (await leech.call("status"))["traversal"]["wins"]
    assert wins["direct"] >= 1 and wins["tcp-punch"] == 0 and wins["relay"] == 0, wins
    assert "spliced" not in cluster.tracker.process.log_text()
