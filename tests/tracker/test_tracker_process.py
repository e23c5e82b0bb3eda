"""A real `p2p-tracker serve` process on loopback, driven through TrackerClient (what the daemon uses)."""

from __future__ import annotations

import signal
import socket
from typing import Any

import pytest
import trio

from p2pd.cluster import LocalCluster
from p2pd.errors import ErrorCode
from p2pd.rpc import RpcError, connect_tcp, free_port
from p2pd.tracker_client import TrackerClient
from tests.tracker.tracker_testutil import make_manifest, nid

ADDR = ("127.0.0.1", 9000)


async def test_register_publish_resolve_peers_leave(cluster: LocalCluster) -> None:
    t = cluster.start_tracker(interval=0.5)
    trackers = [t.address]
    m = make_manifest(1)
    async with (
        TrackerClient(trackers, nid(1), ("127.0.0.1", 9001), {"zone": "a"}, "0.1.0") as seed,
        TrackerClient(trackers, nid(2), ("0.0.0.0", 9002), {"zone": "a"}, "0.1.0") as leech,
    ):
        r = await seed.register()
        assert r["interval"] == 0.5 and seed.interval == 0.5 and r["udp_port"] == t.port
        await leech.register()
        aid = await seed.publish("model:v1", m)
        assert await leech.resolve("model:v1") == (aid, m)
        assert await leech.manifest(aid) == m
        hb = await seed.heartbeat({aid: 1.0})
        assert hb["known"] is True and hb["policy"] == {}
        await leech.heartbeat({aid: 0.0})
        peers = await leech.peers(aid)
        assert peers == [{"node_id": nid(1), "addr": ["127.0.0.1", 9001], "progress": 1.0, "zone": "a"}]
        # the unspecified host 0.0.0.0 is replaced by the address the tracker saw
        assert (await seed.peers(aid))[0]["addr"] == ["127.0.0.1", 9002]
        with pytest.raises(RpcError) as e:
            await leech.resolve("missing:v1")
        assert e.value.code is ErrorCode.NOT_FOUND
        with pytest.raises(RpcError) as e:
            await leech.publish("bad:v1", b"not a manifest")
        assert e.value.code is ErrorCode.BAD_REQUEST
        await seed.leave()
        assert await leech.peers(aid) == []
        # after leave, a heartbeat re-registers by itself
        hb = await seed.heartbeat({aid: 1.0})
        assert hb["known"] is True
        assert [p["node_id"] for p in await leech.peers(aid)] == [nid(1)]


async def test_run_heartbeats_over_udp_with_delta_holdings(cluster: LocalCluster) -> None:
    trackers = [cluster.start_tracker(interval=0.2).address]
    holdings = {"c" * 64: 0.5}
    async with TrackerClient(trackers, nid(1), ADDR) as tc, TrackerClient(trackers, nid(2), ADDR) as other:
        await other.register()
        async with trio.open_nursery() as nursery:
            await nursery.start(tc.run_heartbeats, lambda: holdings)
            with trio.fail_after(5):
                while tc.udp_heartbeats < 3:
                    await trio.sleep(0.05)
            assert (await other.peers("c" * 64))[0]["progress"] == 0.5
            holdings = {"c" * 64: 1.0}  # a change travels in the next datagram
            with trio.fail_after(5):
                while (await other.peers("c" * 64))[0]["progress"] != 1.0:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        assert tc.udp_heartbeats == tc.heartbeats_sent  # register told the UDP port: no TCP heartbeat needed


async def test_restarted_in_memory_tracker_relearns_nodes_within_two_intervals(cluster: LocalCluster) -> None:
    port = free_port()
    interval = 0.5
    a = cluster.start_tracker(port=port, interval=interval, name="a")
    trackers = [("127.0.0.1", port)]
    async with TrackerClient(trackers, nid(1), ADDR) as tc, TrackerClient(trackers, nid(2), ADDR) as other:
        async with trio.open_nursery() as nursery:
            await nursery.start(tc.run_heartbeats, lambda: {"d" * 64: 1.0})
            a.process.kill()  # crash: the in-memory state is gone
            # restart on the same address (async: the heartbeat task must keep running)
            await cluster.start_tracker_async(port=port, interval=interval, name="b")
            t0 = trio.current_time()
            with trio.fail_after(5):
                while not await other.peers("d" * 64):
                    await trio.sleep(0.02)
            relearned = trio.current_time() - t0
            assert relearned < 2 * interval, f"node re-registered {relearned:.2f}s after the restart"
            assert tc.registrations == 2
            nursery.cancel_scope.cancel()


async def test_failover_to_the_next_address(cluster: LocalCluster) -> None:
    port_a, port_b = free_port(), free_port()
    a = cluster.start_tracker(port=port_a, interval=0.2, name="a")
    trackers = [("127.0.0.1", port_a), ("127.0.0.1", port_b)]
    async with TrackerClient(trackers, nid(1), ADDR) as tc, TrackerClient(trackers, nid(2), ADDR) as other:
        async with trio.open_nursery() as nursery:
            await nursery.start(tc.run_heartbeats, lambda: {"d" * 64: 1.0})
            a.process.kill()
            await cluster.start_tracker_async(port=port_b, interval=0.2, name="b")
            with trio.fail_after(5):
                while not await other.peers("d" * 64):
                    await trio.sleep(0.02)
            assert tc.current == ("127.0.0.1", port_b)
            nursery.cancel_scope.cancel()


async def test_unreachable_trackers_raise_a_clear_error() -> None:
    ports = [free_port(), free_port()]
    async with TrackerClient([("127.0.0.1", p) for p in ports], nid(1), ADDR, connect_timeout=1) as tc:
        with pytest.raises(RpcError) as e:
            await tc.register()
    assert e.value.code is ErrorCode.UNREACHABLE
    assert all(f"127.0.0.1:{p}" in e.value.message for p in ports)


async def test_malformed_requests_get_bad_request(cluster: LocalCluster) -> None:
    async with connect_tcp(*cluster.start_tracker().address) as c:
        cases: list[tuple[str, dict[str, Any]]] = [
            ("register", {"node_id": "xyz", "addr": ["h", 1]}),
            ("register", {"node_id": nid(1), "addr": ["h", 70000]}),
            ("register", {"node_id": nid(1), "addr": ["h", 1], "labels": {"k": 1}}),
            ("heartbeat", {"node_id": nid(1), "holdings": {"short": 1.0}}),
            ("heartbeat", {"node_id": nid(1), "holdings": {"e" * 64: 2.0}}),
            ("peers", {"artifact_id": "e" * 64, "max": -1}),
            ("publish", {"name": "no-tag", "manifest": b""}),
            ("nosuch", {}),
        ]
        for method, params in cases:
            with pytest.raises(RpcError) as e:
                await c.call(method, params)
            assert e.value.code is ErrorCode.BAD_REQUEST, (method, params, e.value)
        assert (await c.call("heartbeat", {"node_id": nid(1), "holdings": {}}))["known"] is False


async def test_oversized_frame_closes_only_that_connection(cluster: LocalCluster) -> None:
    port = cluster.start_tracker().port
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all((64 << 20).to_bytes(4, "big") + b"\x00" * 16)
        assert await stream.receive_some(100) == b""  # the tracker hung up
        await stream.aclose()
    async with connect_tcp("127.0.0.1", port) as c:  # and still serves others
        assert (await c.call("peers", {"artifact_id": "e" * 64}))["peers"] == []


def test_sigterm_exits_cleanly(cluster: LocalCluster) -> None:
    p = cluster.start_tracker().process
    p.signal(signal.SIGTERM)
    assert p.wait(10) == 0
    assert "shutting down" in p.log_text() and "Traceback" not in p.log_text()


async def test_idle_tcp_connection_is_closed_while_heartbeats_go_over_udp(cluster: LocalCluster) -> None:
    trackers = [cluster.start_tracker(interval=0.1).address]
    async with TrackerClient(trackers, nid(1), ADDR, idle_close=0.3) as tc:
        async with trio.open_nursery() as nursery:
            await nursery.start(tc.run_heartbeats, lambda: {"e" * 64: 1.0})
            with trio.fail_after(5):
                while tc._client is not None:  # closed once idle for 0.3 s
                    await trio.sleep(0.05)
            sent = tc.udp_heartbeats
            await trio.sleep(0.3)
            assert tc.udp_heartbeats >= sent + 2 and tc.registrations == 1
            assert [p["node_id"] for p in await tc.peers("e" * 64)] == []  # reconnects for a call
            assert tc._client is not None
            nursery.cancel_scope.cancel()


async def test_malformed_udp_datagrams_are_dropped(cluster: LocalCluster) -> None:
    port = cluster.start_tracker().port
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.connect(("127.0.0.1", port))
        for junk in (b"", b"\xff\xff", b"\x95\x02\xa1x\x01\x01\xc0", b"\x93\x01\x02\x03", b"x" * 9000):
            await sock.send(junk)
        # a well-formed heartbeat from an unknown node is answered known=false
        await sock.send(b"\x95\x01\xa2ab\x05\x07\xc0")
        with trio.fail_after(5):
            reply = await sock.recv(100)
    assert reply == b"\x95\x01\x07\xc2" + reply[4:]  # [1, seq=7, false, interval, policy]
    async with connect_tcp("127.0.0.1", port) as c:  # and the tracker still serves
        assert (await c.call("peers", {"artifact_id": "e" * 64}))["peers"] == []


def test_serve_errors_are_one_line() -> None:
    import subprocess

    from p2pd.cluster import TRACKER_CLI, child_env

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for args, needle, status in [
            (["--listen", f"127.0.0.1:{port}"], "Address already in use", 2),
            (["--listen", "127.0.0.1:0", "--store", f"redis://127.0.0.1:{free_port()}/0"], "cannot reach redis://", 4),
            (["--listen", "127.0.0.1:0", "--store", "etcd://x"], "unknown --store", 2),
            (["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"], "needs --admin-token", 2),
        ]:
            r = subprocess.run(
                [*TRACKER_CLI, "serve", "--insecure", *args],
                capture_output=True,
                text=True,
                timeout=60,
                env=child_env({"P2P_TRACKER_ADMIN_TOKEN": ""}),
            )
            assert r.returncode == status and needle in r.stderr, (args, r.returncode, r.stderr)
            assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


async def test_concurrent_beats_share_the_udp_socket(cluster: LocalCluster) -> None:
    """An immediate announce while the periodic heartbeat waits on the UDP socket must not crash."""
    import trio

    from p2pd.tracker_client import TrackerClient

    async with TrackerClient([cluster.start_tracker().address], "c" * 32, ("127.0.0.1", 9)) as tc:
        await tc.register()
        await tc.beat({})  # opens the UDP socket that the concurrent beats below share
        async with trio.open_nursery() as n:
            for i in range(20):
                n.start_soon(tc.beat, {"a" * 64: i / 20})
        assert tc.udp_heartbeats >= 20


async def test_unanswered_udp_heartbeats_fall_back_to_tcp_for_a_while(cluster: LocalCluster) -> None:
    """A network that drops UDP (a silent socket stands in for the tracker's UDP port): one heartbeat waits for
    its answer, the next ones go straight over TCP until `udp_retry_after` has passed, then UDP is tried again
    (and the wait after that is twice as long)."""
    tracker = cluster.start_tracker().address
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as deaf:
        deaf.bind(("127.0.0.1", 0))
        deaf.setblocking(False)

        def datagrams() -> int:
            n = 0
            while True:
                try:
                    deaf.recv(65536)
                except BlockingIOError:
                    return n
                n += 1

        async with TrackerClient([tracker], nid(3), ADDR, udp_retry_after=0.5) as tc:
            await tc.register()
            port = deaf.getsockname()[1]

            class Pinned(dict[tuple[str, int], int | None]):
                """The tracker's UDP port as this network leaves it: every reply's `udp_port` reaches nothing."""

                def __setitem__(self, key: tuple[str, int], value: int | None) -> None:
                    super().__setitem__(key, port)

            tc._udp_ports = Pinned({tc.current: port})
            await tc.beat({})
            assert datagrams() == 1 and tc.udp_heartbeats == 0 and tc.heartbeats_sent == 1  # answered over TCP
            for _ in range(5):
                await tc.beat({})
            assert datagrams() == 0 and tc.heartbeats_sent == 6  # within the 0.5 s: TCP only
            await trio.sleep(0.6)
            await tc.beat({})
            assert datagrams() == 1 and tc.heartbeats_sent == 7  # tried again...
            await trio.sleep(0.6)
            await tc.beat({})
            assert datagrams() == 0 and tc.heartbeats_sent == 8  # ...and now left alone for 1 s
