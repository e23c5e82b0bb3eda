"""A secured tracker (join secret) with both stores: registration proofs, MACed UDP heartbeats, signed
publishes — through TrackerClient, what the daemon uses. Memory and Redis (a real redis-server) must
behave alike: a replica that did not see a registration still checks that node's heartbeats."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import NamedTuple

import msgspec
import pytest
import trio

from p2pd import provenance
from p2pd.errors import ErrorCode
from p2pd.protocol.auth import ClusterSecret, Identity, NodeKey
from p2pd.protocol.heartbeat import UDP_VERSION_AUTH, UdpRequest, seal
from p2pd.rpc import RpcError
from p2pd.tracker_client import TrackerClient
from tests.tracker.tracker_testutil import make_manifest
from tracker.config import TrackerLimits
from tracker.membership import Membership
from tracker.server import TrackerServer
from tracker.store import MemoryStore, Store

CLUSTER = ClusterSecret(os.urandom(32))
INTERVAL = 0.2


def node(cluster: ClusterSecret | None = CLUSTER) -> Identity:
    return Identity(NodeKey.from_seed(os.urandom(32)), cluster)


class Member(NamedTuple):
    identity: Identity
    client: TrackerClient


@asynccontextmanager
async def two_members(server: TrackerServer) -> AsyncIterator[tuple[Member, Member]]:
    """`server` serving on loopback and two registered members of CLUSTER; the server stops on exit."""
    async with trio.open_nursery() as n:
        tcp, _ = await n.start(server.serve, "127.0.0.1", 0, True)
        addr = [("127.0.0.1", tcp)]
        a, b = node(), node()
        async with (
            TrackerClient(addr, a.node_id, ("127.0.0.1", 9001), identity=a) as ta,
            TrackerClient(addr, b.node_id, ("127.0.0.1", 9002), identity=b) as tb,
        ):
            await ta.register()
            await tb.register()
            yield Member(a, ta), Member(b, tb)
        n.cancel_scope.cancel()


async def test_members_register_beat_over_udp_and_publish_signed(store: Store) -> None:
    server = TrackerServer(store, stun=None, membership=Membership(CLUSTER))
    async with two_members(server) as ((a, ta), (b, tb)):
        for _ in range(3):
            await ta.beat({"e" * 64: 1.0})
        assert ta.udp_heartbeats >= 2  # the MACed datagrams were accepted (no fall back to TCP)
        assert [p["node_id"] for p in await tb.peers("e" * 64)] == [a.node_id]
        # a datagram for a's session under another key is refused and counted
        assert ta.session is not None and server.udp_port is not None
        body = msgspec.msgpack.encode(UdpRequest(UDP_VERSION_AUTH, a.node_id, ta.session, 10**9, {}))
        sock = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
        await sock.sendto(seal(body, b"k" * 32), ("127.0.0.1", server.udp_port))
        with trio.fail_after(5):
            while server.metrics.udp_forged == 0:
                await trio.sleep(0.02)
        sock.close()
        assert [p["node_id"] for p in await tb.peers("e" * 64)] == [a.node_id]
        # publishing: signed by a, so a owns the name; b's publish of it is refused
        data = make_manifest()
        aid = hashlib.sha256(data).hexdigest()
        await ta.publish("m:v1", data, provenance.sign(a.key, "m:v1", aid, 100).params())
        other = make_manifest(seed=1)
        other_id = hashlib.sha256(other).hexdigest()
        with pytest.raises(RpcError, match="belongs to node") as e:
            await tb.publish("m:v1", other, provenance.sign(b.key, "m:v1", other_id, 101).params())
        assert e.value.code is ErrorCode.UNAUTHORIZED
        assert await tb.publish("m:v1", data, provenance.sign(b.key, "m:v1", aid, 102).params()) == aid  # a seed
        got, _, reply = await tb.resolve_signed("m:v1")
        assert got == aid and reply["publisher"] == a.key.public


async def test_a_publisher_holds_at_most_its_total_of_manifest_bytes(store: Store) -> None:
    m1, m2, m3 = make_manifest(seed=1), make_manifest(seed=2), make_manifest(seed=3)
    limit = len(m1) + len(m2)
    server = TrackerServer(
        store, stun=None, membership=Membership(CLUSTER), limits=TrackerLimits(max_publisher_bytes=limit)
    )
    async with two_members(server) as ((a, ta), (b, tb)):

        async def publish(c: TrackerClient, who: Identity, name: str, data: bytes) -> str:
            aid = hashlib.sha256(data).hexdigest()
            return await c.publish(name, data, provenance.sign(who.key, name, aid, 100).params())

        await publish(ta, a, "m:v1", m1)
        await publish(ta, a, "m:v2", m2)
        await publish(ta, a, "m:also-v1", m1)  # the same manifest under another name is not counted again
        with pytest.raises(
            RpcError, match=f"would exceed the limit of {limit} bytes per publisher.*--max-publisher-bytes"
        ) as e:
            await publish(ta, a, "m:v3", m3)
        assert e.value.code is ErrorCode.BAD_REQUEST
        with pytest.raises(RpcError, match="unknown name"):
            await ta.resolve("m:v3")  # refused: nothing was stored
        assert await publish(tb, b, "n:v3", m3) == hashlib.sha256(m3).hexdigest()  # b has its own total


async def test_an_open_node_and_a_foreign_cluster_cannot_register() -> None:
    server = TrackerServer(MemoryStore(INTERVAL), stun=None, membership=Membership(CLUSTER))
    async with trio.open_nursery() as n:
        tcp, _ = await n.start(server.serve, "127.0.0.1", 0, False)
        addr = [("127.0.0.1", tcp)]
        for who, why in (
            (node(None), "runs a secured cluster"),
            (node(ClusterSecret(os.urandom(32))), "wrong join secret"),
        ):
            async with TrackerClient(addr, who.node_id, ("127.0.0.1", 9), identity=who) as tc:
                with pytest.raises(RpcError, match=why) as e:
                    await tc.register()
                assert e.value.code is ErrorCode.UNAUTHORIZED
        n.cancel_scope.cancel()


async def test_a_secured_node_refuses_an_open_tracker() -> None:
    server = TrackerServer(MemoryStore(INTERVAL), stun=None)
    async with trio.open_nursery() as n:
        tcp, _ = await n.start(server.serve, "127.0.0.1", 0, False)
        me = node()
        async with TrackerClient([("127.0.0.1", tcp)], me.node_id, ("127.0.0.1", 9), identity=me) as tc:
            with pytest.raises(RpcError, match="runs without a join secret"):
                await tc.register()
        n.cancel_scope.cancel()
