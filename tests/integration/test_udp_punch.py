"""The udp-punch path on loopback: QUIC over a UDP socket as a trio Stream, the punch itself (plain and
birthday roles), and two real daemons that cannot dial each other exchanging an artifact over it."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import pytest
import trio

from p2pd import quic_stream
from p2pd.cluster import LocalCluster
from p2pd.protocol import udp_punch as up
from p2pd.stream_io import TRAFFIC
from p2pd.udp_punch import PunchFailed, PunchSockets, punch
from tests.integration.test_nat_paths import UNREACHABLE, fetch_and_check, make_artifact

MiB = 1 << 20
LO = "127.0.0.1"


async def _udp() -> trio.socket.SocketType:
    s = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await s.bind((LO, 0))
    return s


def _port(s: trio.socket.SocketType) -> int:
    return int(s.getsockname()[1])


async def _pair(nursery: trio.Nursery) -> tuple[quic_stream.QuicStream, quic_stream.QuicStream]:
    a, b = await _udp(), await _udp()
    pa, pb = _port(a), _port(b)  # before the endpoints take the sockets over
    creds = quic_stream.Credentials("b" * 32)
    streams: dict[str, quic_stream.QuicStream] = {}

    async def server() -> None:
        streams["b"] = await quic_stream.accept(nursery, b, (LO, pa), creds, timeout=10)

    async def client() -> None:
        streams["a"] = await quic_stream.connect(nursery, a, (LO, pb), timeout=10)
        await streams["a"].send_all(b"hello")  # the client speaks first (the p2pd handshake)

    async with trio.open_nursery() as n:
        n.start_soon(server)
        n.start_soon(client)
    return streams["a"], streams["b"]


async def _read(stream: trio.abc.Stream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(65536)
        assert chunk, "EOF too early"
        buf += chunk
    return bytes(buf)


async def test_quic_stream_carries_bytes_both_ways_and_reports_the_close() -> None:
    payload_ab, payload_ba = os.urandom(6 * MiB + 11), os.urandom(3 * MiB + 5)
    sent0, received0 = TRAFFIC.sent, TRAFFIC.received
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            a, b = await _pair(nursery)
            assert await _read(b, 5) == b"hello"
            got: dict[str, bytes] = {}

            async def a_to_b() -> None:
                await a.send_all(payload_ab)

            async def b_reads() -> None:
                got["b"] = await _read(b, len(payload_ab))

            async def b_to_a() -> None:
                await b.send_all(payload_ba)

            async def a_reads() -> None:
                got["a"] = await _read(a, len(payload_ba))

            async with trio.open_nursery() as n:
                for f in (a_to_b, b_reads, b_to_a, a_reads):
                    n.start_soon(f)
            assert hashlib.sha256(got["b"]).digest() == hashlib.sha256(payload_ab).digest()
            assert got["a"] == payload_ba
            # both ends count their datagrams as p2pd's own traffic (auto-throttling subtracts them from the
            # interface's counters; uncounted, a node on this path yielded to itself)
            moved = len(payload_ab) + len(payload_ba)
            assert TRAFFIC.sent - sent0 >= moved and TRAFFIC.received - received0 >= moved
            # memory stays bounded: the sender never queued more than its window ahead of the acks
            assert a.endpoint.unacked() <= quic_stream.SEND_BUFFER + quic_stream.SEND_CHUNK
            await a.aclose()
            with pytest.raises(trio.BrokenResourceError):
                with trio.fail_after(10):
                    while True:
                        await b.receive_some(65536)
            with pytest.raises(trio.ClosedResourceError):
                await a.send_all(b"x")
            await b.aclose()
            await b.aclose()  # idempotent


async def test_quic_accept_gives_up_without_a_client() -> None:
    s = await _udp()
    async with trio.open_nursery() as nursery:
        with pytest.raises(quic_stream.QuicClosed, match="no QUIC connection"):
            await quic_stream.accept(nursery, s, (LO, 9), quic_stream.Credentials("c" * 32), timeout=0.3)
    assert s.fileno() == -1  # closed


RID = up.rendezvous_bytes("00112233aabbccdd")
A, B = "a" * 32, "b" * 32


async def test_a_hard_side_opens_its_sockets_without_a_scheduler_trip_each() -> None:
    """On a node busy moving pieces, each trip through trio's scheduler waits behind the transfers: a symmetric
    side's 256 sockets opened one await each took longer than the tracker waits for the punch's answer (3 s),
    and the NAT swarm's cone <-> symmetric pairs fell back to the relay."""
    trips = 0

    async def busy() -> None:
        nonlocal trips
        while True:
            trips += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as n:
        n.start_soon(busy)
        await trio.lowlevel.checkpoint()
        before = trips
        async with PunchSockets(socket.AF_INET, up.HARD_SOCKETS) as socks:
            opened = trips - before
            assert len(socks.socks) == up.HARD_SOCKETS
            assert len({_port(s) for s in socks.socks}) == up.HARD_SOCKETS
        n.cancel_scope.cancel()
    assert opened <= 2


async def test_plain_punch_on_loopback_finds_the_other_socket() -> None:
    async with PunchSockets(socket.AF_INET, 1) as sa, PunchSockets(socket.AF_INET, 1) as sb:
        pa, pb = _port(sa.socks[0]), _port(sb.socks[0])
        res = {}
        with trio.fail_after(10):
            async with trio.open_nursery() as n:

                async def side(name: str, socks: PunchSockets, peer: int, me: str, other: str) -> None:
                    res[name] = await punch(up.Plan.PLAIN, socks, (LO, peer), RID, me, other, timeout=5)

                n.start_soon(side, "a", sa, pb, A, B)
                n.start_soon(side, "b", sb, pa, B, A)
        assert res["a"].peer == (LO, pb) and res["b"].peer == (LO, pa)
        res["a"].sock.close()
        res["b"].sock.close()


async def test_birthday_roles_settle_on_the_same_socket_pair() -> None:
    """The hard side's many sockets, the easy side sprays; several sprayed probes land, yet both ends
    end up with the one pair the hard side chose. The spray is limited to ports that are known closed and
    a few of the hard side's, so that no other program's sockets on this machine receive probes."""
    async with PunchSockets(socket.AF_INET, 1) as easy, PunchSockets(socket.AF_INET, 16) as hard:
        hard_ports = [_port(s) for s in hard.socks]
        closed = []
        for _ in range(20):
            s = await _udp()
            closed.append(_port(s))
            s.close()
        spray = [*closed, hard_ports[3], *closed[:5], hard_ports[9], hard_ports[12]]
        res = {}
        with trio.fail_after(10):
            async with trio.open_nursery() as n:

                async def easy_side() -> None:
                    res["easy"] = await punch(
                        up.Plan.EASY, easy, (LO, hard_ports[0]), RID, A, B, timeout=5, spray=iter(spray)
                    )

                async def hard_side() -> None:
                    res["hard"] = await punch(up.Plan.HARD, hard, (LO, _port(easy.socks[0])), RID, B, A, timeout=5)

                n.start_soon(easy_side)
                n.start_soon(hard_side)
        chosen_port = _port(res["hard"].sock)
        assert chosen_port in hard_ports
        assert res["easy"].peer == (LO, chosen_port)
        assert res["hard"].peer == (LO, _port(res["easy"].sock))
        others = list(hard.socks)
        assert len(others) == 15 and res["hard"].sock not in others
    assert all(s.fileno() == -1 for s in others)  # closed with the punch's sockets; the chosen one is ours
    assert res["hard"].sock.fileno() != -1
    res["easy"].sock.close()
    res["hard"].sock.close()


async def test_punch_ignores_other_rendezvous_and_times_out() -> None:
    async with PunchSockets(socket.AF_INET, 1) as sa, PunchSockets(socket.AF_INET, 1) as sb:
        pa, pb = _port(sa.socks[0]), _port(sb.socks[0])
        other = up.rendezvous_bytes("ffffffffffffffff")
        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                n.start_soon(lambda: _expect_fail(punch(up.Plan.PLAIN, sa, (LO, pb), RID, A, B, timeout=0.6)))
                n.start_soon(lambda: _expect_fail(punch(up.Plan.PLAIN, sb, (LO, pa), other, B, A, timeout=0.6)))


async def _expect_fail(coro: object) -> None:
    with pytest.raises(PunchFailed, match="no answer"):
        await coro  # type: ignore[misc]


async def test_download_over_a_udp_punch_when_direct_fails(cluster: LocalCluster, workdir: Path) -> None:
    src = make_artifact(workdir / "src", 6 * MiB + 3)
    seed = await cluster.start_node_async("seed", *UNREACHABLE, "--paths", "direct,udp-punch")
    leech = await cluster.start_node_async("leech", *UNREACHABLE, "--paths", "direct,udp-punch")
    await fetch_and_check(cluster, seed, leech, src, "model:udp", "udp-punch")
    wins = (await leech.call("status"))["traversal"]["wins"]
    assert wins["udp-punch"] >= 1 and wins["direct"] == 0, wins
    # the other way round: a second QUIC connection between the same two nodes
    src2 = make_artifact(workdir / "src2", 2 * MiB)
    await fetch_and_check(cluster, leech, seed, src2, "model:udp2", "udp-punch")
