"""Who is who (issue #14): the authenticated peer handshake and the MACed UDP heartbeat, sans sockets.

The handshake runs over in-memory streams between real identities; the tracker's secured UDP path
(`TrackerServer._memory_batch`) runs over a fake socket that hands it datagrams. Hypothesis
throws arbitrary bytes at both decoders: they refuse with their one error type (or drop the
datagram), never crash, and never let a datagram without the session key touch a node.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from p2pd import connections
from p2pd.connections import ConnectionPath
from p2pd.protocol import auth, wire
from p2pd.protocol.auth import ClusterSecret, Identity, NodeKey
from p2pd.protocol.heartbeat import UDP_VERSION, UdpRequest, seal
from p2pd.protocol.session import PeerClosed
from tests.unit._util import FAST, QUICK
from tracker.membership import Membership
from tracker.server import TrackerServer
from tracker.store import MemoryStore

CLUSTER = ClusterSecret(b"the cluster's join secret, 32 by")
OTHER_CLUSTER = ClusterSecret(b"another cluster's join secret!!!")
A = Identity(NodeKey.from_seed(b"\x0a" * 32), CLUSTER)
B = Identity(NodeKey.from_seed(b"\x0b" * 32), CLUSTER)
AID = "f" * 64


async def _pair(dialler: Identity, acceptor: Identity, remote_id: str | None = None) -> tuple[Any, Any]:
    """Run both ends of a handshake; each result is the Connection or the exception it ended with."""
    ours, theirs = trio.testing.memory_stream_pair()
    out: list[Any] = [None, None]

    async def dial() -> None:
        try:
            out[0] = await connections.open_outgoing(
                ours,
                identity=dialler,
                remote_id=remote_id or acceptor.node_id,
                artifact_id=AID,
                addr="memory",
                path=ConnectionPath.DIRECT,
                handshake_timeout=5,
            )
        except (wire.ProtocolError, PeerClosed, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            out[0] = e
            await ours.aclose()

    async def acc() -> None:
        try:
            out[1] = await connections.accept(theirs, "memory", acceptor, handshake_timeout=5, serves=AID.__eq__)
        except (wire.ProtocolError, PeerClosed, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            out[1] = e
            await theirs.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(dial)
            n.start_soon(acc)
    return out[0], out[1]


async def test_members_handshake_and_learn_who_is_at_the_other_end() -> None:
    d, a = await _pair(A, B)
    assert isinstance(d, connections.Connection) and isinstance(a, connections.Connection)
    assert d.remote_id == B.node_id and a.remote_id == A.node_id


@pytest.mark.parametrize(
    ("dialler", "why"),
    [
        (Identity(NodeKey.from_seed(b"\x0c" * 32), None), "not a member"),  # no join secret (row 10)
        (Identity(NodeKey.from_seed(b"\x0c" * 32), OTHER_CLUSTER), "not a member"),  # another cluster's
    ],
)
async def test_an_outsider_is_refused_by_the_acceptor(dialler: Identity, why: str) -> None:
    _, a = await _pair(dialler, B)
    assert isinstance(a, wire.ProtocolError) and why in str(a)


async def test_a_node_that_dials_an_outsider_refuses_it_too() -> None:
    outsider = Identity(NodeKey.from_seed(b"\x0c" * 32), None)
    d, _ = await _pair(A, outsider)
    assert isinstance(d, wire.ProtocolError) and "not a member" in str(d)


class _Impostor:
    """A member that claims another node's id in its HANDSHAKE (row 2)."""

    def __init__(self, own: Identity, claimed: Identity, present_claimed_key: bool) -> None:
        self.own, self.claimed, self.present = own, claimed, present_claimed_key

    async def run(self, stream: trio.abc.Stream) -> list[Any]:
        key = self.claimed.key.public if self.present else self.own.key.public
        nonce = b"n" * auth.NONCE_SIZE
        await stream.send_all(wire.encode(wire.Handshake(wire.PROTOCOL_VERSION, self.claimed.node_id, AID, key, nonce)))
        got = wire.FrameDecoder(1 << 20).feed(bytes(await stream.receive_some(65536)))
        hs = next(m for m in got if isinstance(m, wire.Handshake)) if got else None
        if hs is not None:  # sign what the acceptor asks with the only key it has
            t = auth.handshake_transcript(AID, self.claimed.node_id, nonce, hs.node_id, hs.nonce)
            await stream.send_all(wire.encode(wire.Auth(self.own.key.sign(t), CLUSTER.mac(t))))
        return got


@pytest.mark.parametrize("present_claimed_key", [False, True])
async def test_nobody_takes_another_nodes_id(present_claimed_key: bool) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    impostor = _Impostor(A, B, present_claimed_key)  # A (a member) claims to be B
    seed = Identity(NodeKey.from_seed(b"\x0d" * 32), CLUSTER)
    refused: list[Exception] = []

    async def acceptor() -> None:
        try:
            await connections.accept(theirs, "memory", seed, handshake_timeout=5, serves=AID.__eq__)
        except wire.ProtocolError as e:
            refused.append(e)
        finally:
            await theirs.aclose()  # as the daemon's listener does

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(impostor.run, ours)
            n.start_soon(acceptor)
    assert len(refused) == 1
    assert ("did not prove" if present_claimed_key else "not its own") in str(refused[0])


@QUICK
@given(st.binary(max_size=600))
def test_handshake_and_auth_decoders_only_raise_protocol_errors(body: bytes) -> None:
    for t in (wire.MsgType.HANDSHAKE, wire.MsgType.AUTH):
        try:
            wire.decode_body(t, body)
        except wire.ProtocolError:
            pass


@FAST
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=300),
            st.builds(
                lambda v, nid, k, n: wire.encode(wire.Handshake(v, nid, AID, k, n)),
                st.sampled_from([wire.PROTOCOL_VERSION, 1, 3]),
                st.sampled_from([A.node_id, B.node_id, "x" * 32]),
                st.sampled_from([A.key.public, B.key.public, b"", b"k" * 32]),
                st.binary(max_size=20),
            ),
            st.builds(lambda s, m: wire.encode(wire.Auth(s, m)), st.binary(max_size=70), st.binary(max_size=40)),
        ),
        max_size=4,
    )
)
def test_accept_refuses_arbitrary_dialler_bytes_with_a_protocol_error(chunks: list[bytes]) -> None:
    """Whatever a dialler without the key of the id it names sends, accept ends with an error, never a Connection."""

    async def main() -> None:
        ours, theirs = trio.testing.memory_stream_pair()
        for c in chunks:
            await ours.send_all(c)
        await ours.aclose()
        with pytest.raises((wire.ProtocolError, PeerClosed, trio.BrokenResourceError, trio.TooSlowError)):
            await connections.accept(theirs, "memory", B, handshake_timeout=1, serves=AID.__eq__)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


# ---- the secured UDP heartbeat path --------------------------------------------------------------


class FakeSock:
    """Hands the server queued datagrams; records its replies."""

    def __init__(self, datagrams: list[bytes]) -> None:
        self.queue = list(datagrams)
        self.sent: list[bytes] = []

    def recvfrom(self, n: int) -> tuple[bytes, tuple[str, int]]:
        if not self.queue:
            raise BlockingIOError
        return self.queue.pop(0)[:n], ("127.0.0.9", 4000)

    def sendto(self, data: bytes, addr: Any) -> int:
        self.sent.append(data)
        return len(data)


NODE = NodeKey.from_seed(b"\x0e" * 32)
SKEY = b"s" * 32


def secured_server(now: list[float]) -> tuple[TrackerServer, MemoryStore, int]:
    store = MemoryStore(1.0, clock=lambda: now[0])
    server = TrackerServer(store, stun=None, membership=Membership(CLUSTER))
    node = store.reg.register(NODE.node_id, "10.0.0.1", 7000, {}, "t", now[0], key=NODE.public, session_key=SKEY)
    store.reg.heartbeat(NODE.node_id, {AID: 1.0}, now[0])
    return server, store, node.session


def beat(session: int, seq: int, holdings: dict[str, float] | None, key: bytes = SKEY, version: int = 2) -> bytes:
    return seal(msgspec.msgpack.encode(UdpRequest(version, NODE.node_id, session, seq, holdings)), key)


def test_a_sealed_heartbeat_is_applied_once_and_a_forged_or_replayed_one_is_refused() -> None:
    now = [100.0]
    server, store, session = secured_server(now)
    node = store.reg.nodes[NODE.node_id]
    now[0] = 101.0
    sock = FakeSock([beat(session, 5, None)])
    server._memory_batch(sock, store)  # type: ignore[arg-type]
    assert node.last_seen == 101.0 and len(sock.sent) == 1 and sock.sent[0][3] == 0xC3  # known
    now[0] = 102.0
    forged = [
        beat(session, 6, {}, key=b"x" * 32),  # row 3: "heartbeat{victim, holdings: {}}" without the key
        beat(session, 5, {}),  # a replay of seq 5 (with a change an attacker would like)
        msgspec.msgpack.encode(UdpRequest(UDP_VERSION, NODE.node_id, session, 7, {})),  # unauthenticated v1
    ]
    sock = FakeSock(forged)
    server._memory_batch(sock, store)  # type: ignore[arg-type]
    assert node.holdings == {AID: 1.0} and node.last_seen == 101.0
    assert sock.sent == [] and server.metrics.udp_forged == 2 and server.metrics.udp_rejected == 1


@FAST
@given(st.lists(st.binary(max_size=200), max_size=8), st.integers(min_value=0, max_value=1 << 31))
def test_arbitrary_datagrams_never_touch_a_node_without_its_session_key(datagrams: list[bytes], seq: int) -> None:
    now = [100.0]
    server, store, session = secured_server(now)
    node = store.reg.nodes[NODE.node_id]
    now[0] = 150.0
    # also well-formed bodies for the node's real session, sealed with a wrong key or with a bad tag
    good = beat(session, seq, None)
    datagrams += [beat(session, seq, {}, key=b"k" * 32), good[:-1] + bytes([good[-1] ^ 1])]  # (x00 could be right)
    server._memory_batch(FakeSock(datagrams), store)  # type: ignore[arg-type]
    assert node.last_seen == 100.0 and node.holdings == {AID: 1.0}


NODE2 = NodeKey.from_seed(b"\x0f" * 32)
SKEY2 = b"t" * 32


def test_hostile_datagrams_in_a_batch_do_not_drop_or_corrupt_the_others_replies() -> None:
    """One batch: two nodes' good beats interleaved with forged, replayed, garbage and v1 datagrams.

    Each good beat gets exactly its own reply (its seq, known) in order; the hostile ones get none."""
    now = [100.0]
    server, store, session = secured_server(now)
    node2 = store.reg.register(NODE2.node_id, "10.0.0.2", 7000, {}, "t", now[0], key=NODE2.public, session_key=SKEY2)
    now[0] = 120.0

    def beat2(seq: int, holdings: dict[str, float] | None, key: bytes = SKEY2) -> bytes:
        return seal(msgspec.msgpack.encode(UdpRequest(2, NODE2.node_id, node2.session, seq, holdings)), key)

    good1 = beat(session, 10, None)
    batch = [
        good1,
        b"\x00" * 3,  # garbage shorter than a tag
        beat2(3, {AID: 0.5}),
        beat(session, 11, {}, key=SKEY2),  # node 1's id, node 2's key
        good1,  # replay inside the same batch
        msgspec.msgpack.encode(UdpRequest(UDP_VERSION, NODE2.node_id, node2.session, 9, {})),  # unsealed v1
        beat2(4, None)[:-1] + b"\x00",  # a bad tag byte... unless it was 0 already: then 3 < 4 still applies
        beat(session, 12, None),
        b"\x95" + b"\xff" * 40,  # not msgpack that decodes
    ]
    tampered_ok = batch[6] == beat2(4, None)
    sock = FakeSock(batch)
    assert server._memory_batch(sock, store) == len(batch)  # type: ignore[arg-type]
    replies = [msgspec.msgpack.decode(r) for r in sock.sent]
    want = [(10, True), (3, True)] + ([(4, True)] if tampered_ok else []) + [(12, True)]
    assert [(r[1], r[2]) for r in replies] == want
    n1 = store.reg.nodes[NODE.node_id]
    assert n1.seq == 12 and n1.last_seen == 120.0 and n1.holdings == {AID: 1.0}
    assert node2.holdings == {AID: 0.5} and node2.last_seen == 120.0
    assert server.metrics.udp_forged == (2 if tampered_ok else 3) and server.metrics.udp_rejected == 3


def test_an_open_tracker_answers_every_good_beat_in_a_batch_with_bad_ones_mixed_in() -> None:
    """The same hot loop without a membership (no MAC step): unknown nodes get `known: false`, garbage nothing."""
    now = [100.0]
    store = MemoryStore(1.0, clock=lambda: now[0])
    server = TrackerServer(store, stun=None)
    node = store.reg.register(NODE.node_id, "10.0.0.1", 7000, {}, "t", now[0])
    now[0] = 130.0

    def v1(nid: str, session: int, seq: int, holdings: dict[str, float] | None = None) -> bytes:
        return msgspec.msgpack.encode(UdpRequest(UDP_VERSION, nid, session, seq, holdings))

    batch = [
        v1(NODE.node_id, node.session, 1),
        b"\xc1",  # never valid msgpack
        v1("nobody", 1, 2, {AID: 1.0}),  # unknown node: answered known=false, nothing stored
        beat(node.session, 3, None),  # a v2 (sealed) datagram on an open tracker: rejected
        v1(NODE.node_id, node.session + 1, 4),  # stale session
        v1(NODE.node_id, node.session, 5, {AID: 0.25}),
    ]
    sock = FakeSock(batch)
    server._memory_batch(sock, store)  # type: ignore[arg-type]
    replies = [msgspec.msgpack.decode(r) for r in sock.sent]
    assert [(r[1], r[2]) for r in replies] == [(1, True), (2, False), (4, False), (5, True)]
    assert node.holdings == {AID: 0.25} and node.last_seen == 130.0 and "nobody" not in store.reg.nodes
    assert server.metrics.udp_rejected == 2 and store.reg.counters.unknown_heartbeats == 2
