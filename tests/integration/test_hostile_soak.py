"""Issue #14 row 4 as a soak: a seed under 2,000 hostile connections still serves a real fetch.

The attacker (this test process) opens 2,000 connections to a seed whose open-file limit is 1,024
(soft and hard), from eight loopback addresses. It is not a member of the cluster, so it cannot
finish a handshake (the peer handshake is authenticated): most connections send all but the last
bytes of a HANDSHAKE and hold the connection there (what an outsider can hold is the handshake phase,
bounded by the caps and `handshake_timeout`); one in five instead starts a 1 MiB frame and sends a
quarter of it. Before the caps, the seed ran out of fds (its control socket stopped answering, the
fetch hung) and buffered every partial frame.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

import trio

from p2pd.cluster import HOST, LocalCluster, Node
from p2pd.protocol import wire
from tests.integration.test_hostile import open_fds, start_limited_node

MiB = 1 << 20
HOSTILE = 2000
ATTACKER_ADDRS = [f"127.0.0.{i}" for i in range(2, 10)]


def rss(node: Node) -> int:
    for line in Path(f"/proc/{node.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_a_seed_holds_under_2000_hostile_connections(cluster: LocalCluster, workdir: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, HOSTILE + 1024)), hard))
    src = workdir / "src" / "soak.bin"
    src.parent.mkdir()
    src.write_bytes(os.urandom(32 * MiB))
    seed = await start_limited_node(cluster, "seed", nofile=1024)
    leech = await cluster.start_node_async("leech")
    aid = await cluster.publish_async(seed, src, "soak:v1")
    art = await seed.artifact(aid)
    assert art is not None
    rss_before = rss(seed)
    held: list[trio.SocketStream] = []
    limiter = trio.CapacityLimiter(256)

    async def hostile(k: int) -> None:
        async with limiter:
            sock = trio.socket.socket()
            await sock.bind((ATTACKER_ADDRS[k % len(ATTACKER_ADDRS)], 0))
            stream = trio.SocketStream(sock)
            try:
                with trio.fail_after(20):
                    await sock.connect((HOST, seed.port))
                    hello = wire.encode(wire.Handshake(wire.PROTOCOL_VERSION, os.urandom(16).hex(), aid))
                    if k % 5 == 0:  # a partial 1 MiB frame, held open
                        frame = wire.HEADER.pack(wire.MAX_CONTROL_FRAME + 1, wire.MsgType.HANDSHAKE)
                        await stream.send_all(frame + bytes(256 << 10))
                    else:  # a HANDSHAKE but for its last bytes, held open
                        await stream.send_all(hello[:-4])
            except (OSError, trio.BrokenResourceError, trio.TooSlowError):
                sock.close()  # refused or closed by the seed: what the caps are for
                return
            held.append(stream)

    async def keepalives() -> None:
        ka = wire.encode(wire.KeepAlive())
        while True:
            await trio.sleep(3)
            for s in list(held):
                try:
                    with trio.move_on_after(0.05):
                        await s.send_all(ka)
                except (OSError, trio.BrokenResourceError, trio.BusyResourceError, trio.ClosedResourceError):
                    pass  # the seed closed it (refused at accept, or a partial frame refused)

    try:
        async with trio.open_nursery() as attack:
            async with trio.open_nursery() as n:
                for k in range(HOSTILE):
                    n.start_soon(hostile, k)
            attack.start_soon(keepalives)
            with trio.fail_after(20):
                status = await seed.call("status")  # the control socket still answers
            assert status["incoming"]["refused"] > 0
            path = await cluster.fetch_async(leech, "soak:v1", timeout=180)
            assert path.read_bytes() == src.read_bytes()
            assert open_fds(seed) < 1024 - 64  # room left for files, the tracker, the control socket
            assert rss(seed) - rss_before < 150 * MiB  # partial frames refused, not buffered
            attack.cancel_scope.cancel()
    finally:
        for s in held:
            s.socket.close()
