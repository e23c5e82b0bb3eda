"""The tracker's resource bounds (issue #14 row 6): manifest size, connection caps, idle and partial frames.

In-process TrackerServer on loopback, with small limits so each bound shows within a second.
"""

from __future__ import annotations

import struct

import trio

from p2pd.errors import ErrorCode
from p2pd.rpc import RpcError, connect_tcp
from tests.tracker.tracker_testutil import make_manifest
from tracker.config import TrackerLimits
from tracker.server import TrackerServer
from tracker.store import MemoryStore

LIMITS = TrackerLimits(
    max_connections=64, max_per_addr=4, idle_timeout=0.5, frame_timeout=0.5, max_manifest_bytes=1 << 20
)


async def closed_within(stream: trio.SocketStream, seconds: float) -> bool:
    """True if the server closes the connection within `seconds` (EOF or reset)."""
    with trio.move_on_after(seconds):
        try:
            while await stream.receive_some(4096):
                pass
        except trio.BrokenResourceError:
            pass
        return True
    return False


async def test_a_manifest_over_the_limit_is_refused_not_stored() -> None:
    srv = TrackerServer(MemoryStore(0.5), stun=None, limits=LIMITS)
    async with trio.open_nursery() as n:
        tcp, _ = await n.start(srv.serve, "127.0.0.1", 0, False)
        big = b"\x00" * ((1 << 20) + 1)
        async with connect_tcp("127.0.0.1", tcp) as c:
            try:
                await c.call("publish", {"name": "big:v1", "manifest": big}, timeout=10)
                raise AssertionError("a 1 MiB + 1 manifest was accepted")
            except RpcError as e:
                assert e.code is ErrorCode.BAD_REQUEST and "exceeds this tracker's limit" in e.message
            assert (await c.call("publish", {"name": "ok:v1", "manifest": make_manifest()}, timeout=10))["artifact_id"]
        n.cancel_scope.cancel()


async def test_idle_connections_and_partial_frames_are_closed() -> None:
    srv = TrackerServer(MemoryStore(0.5), stun=None, limits=LIMITS)
    async with trio.open_nursery() as n:
        tcp, _ = await n.start(srv.serve, "127.0.0.1", 0, False)
        idle = await trio.open_tcp_stream("127.0.0.1", tcp)
        partial = await trio.open_tcp_stream("127.0.0.1", tcp)
        await partial.send_all(struct.pack(">I", 1 << 20) + b"\x80" * 1000)  # a 1 MiB frame, begun
        assert await closed_within(idle, 5)
        assert await closed_within(partial, 5)
        async with connect_tcp("127.0.0.1", tcp) as c:  # a connection in use stays open past the idle time
            await trio.sleep(0.3)
            try:
                await c.call("resolve", {"name": "nothing:v1"}, timeout=5)
            except RpcError as e:
                assert e.code is ErrorCode.NOT_FOUND
        n.cancel_scope.cancel()


async def test_connections_over_the_per_address_cap_are_refused_at_once() -> None:
    srv = TrackerServer(MemoryStore(0.5), stun=None, limits=LIMITS)
    async with trio.open_nursery() as n:
        tcp, _ = await n.start(srv.serve, "127.0.0.1", 0, False)
        held = [await trio.open_tcp_stream("127.0.0.1", tcp) for _ in range(LIMITS.max_per_addr)]
        await trio.sleep(0.1)
        extra = await trio.open_tcp_stream("127.0.0.1", tcp)
        assert await closed_within(extra, 0.4)  # before the idle timeout: refused, not timed out
        assert srv.admission.refused == 1
        for s in held:
            await s.aclose()
        await trio.sleep(0.1)
        async with connect_tcp("127.0.0.1", tcp) as c:  # room again
            try:
                await c.call("resolve", {"name": "nothing:v1"}, timeout=5)
            except RpcError as e:
                assert e.code is ErrorCode.NOT_FOUND
        n.cancel_scope.cancel()
