"""An idle node with many connections wakes up a few times a second, not a few times per connection.

Issue #15: 33 daemons of a 1 + 32 on one 2-core machine were CPU-bound at an aggregate of 50 MB/s.
Profiles of its daemons (BENCHMARKS.md, "The per-daemon fixed cost") showed timers as a large share of
their CPU: each connection's watchdog task slept 0.2 s at a time, 5 wakeups a second per peer (160 for
32 peers, each a trio Cancelled raised and caught), whether or not anything happened. A seed swarm here
serves idle peers over loopback; the trio task steps it takes in a second must not grow with them, and
the KEEPALIVEs (now sent by the swarm's one watchdog) must still go out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
import trio.lowlevel

from p2pd import connections
from p2pd.connections import Connection, ConnectionPath
from p2pd.errors import CloseReason
from p2pd.protocol import bitfield as bits
from p2pd.protocol import wire
from p2pd.protocol.auth import Identity, NodeKey
from p2pd.swarm import Swarm
from tests.unit.test_peer_goodbye import CLUSTER, PIECE, PIECES, SEED, seed_swarm


class StepCounter(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1


async def with_idle_peers(
    seed: Swarm, peers: int, body: Callable[[list[Connection]], Awaitable[None]], *, timeout: float = 30
) -> None:
    """Run `seed` with `peers` complete (so idle) peers connected over loopback, then `body` with their ends."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(peers)
    ends: list[Connection] = []

    async def accept_all(nursery: trio.Nursery) -> None:
        for _ in range(peers):
            sock, _ = await listener.accept()
            nursery.start_soon(serve, sock)

    async def serve(sock: trio.socket.SocketType) -> None:
        stream = trio.SocketStream(sock)
        conn = await connections.accept(stream, "peer", SEED, handshake_timeout=5, serves=seed.artifact_id.__eq__)
        try:
            await seed.serve(conn)
        finally:
            await conn.aclose()

    async def peer(i: int) -> None:
        client = trio.socket.socket()
        await client.connect(listener.getsockname())
        conn = await connections.open_outgoing(
            trio.SocketStream(client),
            identity=Identity(NodeKey.from_seed(bytes([10 + i]) * 32), CLUSTER),
            remote_id=seed.node_id,
            artifact_id=seed.artifact_id,
            addr="seed",
            path=ConnectionPath.DIRECT,
            handshake_timeout=5,
        )
        # a complete peer: it asks for nothing, so both sides sit idle
        await conn.stream.send_all(wire.encode(wire.Bitfield(bits.to_bytes(bits.full(PIECES), PIECES))))
        ends.append(conn)

    with trio.fail_after(timeout):
        async with trio.open_nursery() as n:
            await n.start(seed.run)
            n.start_soon(accept_all, n)
            for i in range(peers):
                n.start_soon(peer, i)
            while len(ends) < peers or len(seed.conns) < peers:
                await trio.sleep(0.05)
            await body(ends)
            n.cancel_scope.cancel()
    listener.close()


async def test_an_idle_swarm_with_16_peers_takes_few_steps_a_second(tmp_path: Path) -> None:
    seed, _ = seed_swarm(tmp_path)
    counter = StepCounter()

    async def idle(ends: list[Connection]) -> None:
        await trio.sleep(0.5)  # the BITFIELDs are read
        trio.lowlevel.add_instrument(counter)
        await trio.sleep(1.0)
        trio.lowlevel.remove_instrument(counter)
        assert len(seed.conns) == 16, "the idle peers must stay connected"

    await with_idle_peers(seed, 16, idle)
    # one watchdog for the swarm (5 a second) and this test's own sleep: the per-connection
    # watchdogs took 5 x 16 = 80 steps a second here
    assert counter.steps < 30, f"{counter.steps} task steps in 1 s of idling with 16 peers"


async def test_an_idle_connection_still_gets_keepalives(tmp_path: Path) -> None:
    seed, _ = seed_swarm(tmp_path)
    seed.config = dataclasses.replace(seed.config, keepalive_every=0.3)
    frames: list[wire.MsgType] = []

    async def listen(ends: list[Connection]) -> None:
        io = ends[0].io
        with trio.move_on_after(2.0):
            while True:
                t, n = wire.parse_header(await io.read_exactly(wire.HEADER_SIZE), PIECE)
                if n:
                    await io.read_exactly(n)
                frames.append(t)

    await with_idle_peers(seed, 1, listen)
    keepalives = frames.count(wire.MsgType.KEEPALIVE)
    # one per 0.3-0.5 s (the watchdog looks every 0.2 s); a starved test process may read fewer in time
    assert 2 <= keepalives <= 8, f"{keepalives} KEEPALIVEs in 2 s at one per 0.3 s idle: {frames}"


async def test_a_failing_watchdog_check_costs_its_connection_not_the_swarm(tmp_path: Path) -> None:
    seed, _ = seed_swarm(tmp_path)

    async def break_one(ends: list[Connection]) -> None:
        victim, other = list(seed.conns.values())

        def gone(now: float) -> None:
            raise OSError(9, "Bad file descriptor")  # what an ioctl on a socket closed meanwhile raises

        victim._watch = gone  # type: ignore[method-assign]
        with trio.fail_after(5):
            while victim.remote_id in seed.conns:
                await trio.sleep(0.05)
        assert victim.close_reason is CloseReason.SOCKET_ERROR
        await trio.sleep(0.5)  # the swarm's timer runs on, and the other connection with it
        assert list(seed.conns.values()) == [other] and not other.closed

    await with_idle_peers(seed, 2, break_one)
