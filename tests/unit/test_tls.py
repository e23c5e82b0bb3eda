"""`--encrypt` (issue #14, confidentiality): TLS around the peer handshake, bound to the node identities.

Real identities handshake over in-memory streams with a tap in the middle: the tap sees only TLS
records (no artifact id, no node id, no payload); a tap that terminates TLS itself (a man in the
middle with its own certificate) makes the handshake fail on both ends; a node with --encrypt and
one without refuse each other with a line that names the cause.
"""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from p2pd import connections
from p2pd.connections import ConnectionPath
from p2pd.protocol import wire
from p2pd.protocol.auth import ClusterSecret, Identity, NodeKey
from p2pd.protocol.session import PeerClosed
from p2pd.tls import PeerTls, with_tls, wrap

CLUSTER = ClusterSecret(b"the cluster's join secret, 32 by")
A = Identity(NodeKey.from_seed(b"\x0a" * 32), CLUSTER)
B = Identity(NodeKey.from_seed(b"\x0b" * 32), CLUSTER)
EA, EB = with_tls(A), with_tls(B)
AID = "e" * 64
SECRET_PAYLOAD = b"weights of a secret model " * 40
_FAILURES = (wire.ProtocolError, PeerClosed, trio.BrokenResourceError, trio.ClosedResourceError)


async def _splice(src: trio.abc.Stream, dst: trio.abc.Stream, seen: bytearray) -> None:
    """Copy one direction, keeping what passed (the tap's view of the wire)."""
    try:
        while data := await src.receive_some(65536):
            seen += data
            await dst.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the other direction's end closed: the copy is over either way
    finally:
        await dst.aclose()


async def _run(
    dialler: Identity,
    acceptor: Identity,
    middle: Any,
    *,
    punched: bool = False,
) -> tuple[Any, Any]:
    """Both ends of a handshake, then the dialler sends SECRET_PAYLOAD; `middle(d_end, a_end)` joins
    the dialler's stream to the acceptor's. Each result is the payload the acceptor read (or the
    dialler's Connection) or the exception it ended with."""
    d_ours, d_mid = trio.testing.memory_stream_pair()
    a_mid, a_ours = trio.testing.memory_stream_pair()
    out: list[Any] = [None, None]
    initiator = min(dialler.node_id, acceptor.node_id)

    async def dial() -> None:
        try:
            conn = await connections.open_outgoing(
                d_ours,
                identity=dialler,
                remote_id=acceptor.node_id,
                artifact_id=AID,
                addr="memory",
                path=ConnectionPath.TCP_PUNCH if punched else ConnectionPath.DIRECT,
                handshake_timeout=5,
                initiator=initiator if punched else None,
            )
            await conn.io.send_all(SECRET_PAYLOAD)
            out[0] = conn
        except _FAILURES as e:
            out[0] = e
            await d_ours.aclose()

    async def acc() -> None:
        try:
            if punched:  # both ends of a punched stream dial
                conn = await connections.open_outgoing(
                    a_ours,
                    identity=acceptor,
                    remote_id=dialler.node_id,
                    artifact_id=AID,
                    addr="memory",
                    path=ConnectionPath.TCP_PUNCH,
                    handshake_timeout=5,
                    initiator=initiator,
                )
            else:
                conn = await connections.accept(a_ours, "memory", acceptor, handshake_timeout=5, serves=AID.__eq__)
            out[1] = await conn.io.read_exactly(len(SECRET_PAYLOAD))
            await conn.aclose()
        except _FAILURES as e:
            out[1] = e
            await a_ours.aclose()

    with trio.fail_after(15):
        async with trio.open_nursery() as n:
            n.start_soon(middle, d_mid, a_mid)
            n.start_soon(dial)
            n.start_soon(acc)
    if isinstance(out[0], connections.Connection):
        await out[0].aclose()
    return out[0], out[1]


class Tap:
    """A byte-for-byte relay that records both directions (a relay node, a switch mirror port)."""

    def __init__(self) -> None:
        self.seen = bytearray()

    async def __call__(self, d: trio.abc.Stream, a: trio.abc.Stream) -> None:
        async with trio.open_nursery() as n:
            n.start_soon(_splice, d, a, self.seen)
            n.start_soon(_splice, a, d, self.seen)


async def test_encrypted_nodes_handshake_and_a_tap_sees_only_ciphertext() -> None:
    tap = Tap()
    d, a = await _run(EA, EB, tap)
    assert isinstance(d, connections.Connection) and d.remote_id == B.node_id
    assert a == SECRET_PAYLOAD
    assert tap.seen.startswith(b"\x16\x03")  # a TLS handshake record
    for plain in (AID.encode(), A.node_id.encode(), B.node_id.encode(), A.key.public, B.key.public, b"weights"):
        assert plain not in tap.seen
    # the same exchange without --encrypt shows all of it: the tap is not blind
    plain_tap = Tap()
    d, a = await _run(A, B, plain_tap)
    assert a == SECRET_PAYLOAD and AID.encode() in plain_tap.seen and b"weights" in plain_tap.seen


async def test_a_punched_encrypted_stream_has_one_tls_client() -> None:
    d, a = await _run(EA, EB, Tap(), punched=True)
    assert isinstance(d, connections.Connection) and a == SECRET_PAYLOAD


async def test_a_man_in_the_middle_with_its_own_certificate_fails_the_handshake() -> None:
    """The MITM terminates TLS on both sides and relays the plaintext: both ends sign a different
    certificate hash than the other checks, so neither accepts."""
    mitm = PeerTls("mallory")
    plain_seen = bytearray()

    async def middle(d: trio.abc.Stream, a: trio.abc.Stream) -> None:
        try:
            to_d, _ = await wrap(d, mitm, server_side=True, timeout=5)
            to_a, _ = await wrap(a, mitm, server_side=False, timeout=5)
        except wire.ProtocolError:
            await d.aclose()
            await a.aclose()
            raise
        async with trio.open_nursery() as n:
            n.start_soon(_splice, to_d, to_a, plain_seen)
            n.start_soon(_splice, to_a, to_d, plain_seen)

    d, a = await _run(EA, EB, middle)
    assert AID.encode() in plain_seen  # it did terminate TLS: the handshake frames passed in clear
    assert isinstance(d, wire.ProtocolError) and "over this TLS channel" in str(d)
    assert isinstance(a, wire.ProtocolError | PeerClosed)
    assert b"weights" not in plain_seen


async def test_an_encrypted_dialler_is_refused_by_a_plain_node_with_a_clear_error() -> None:
    d, a = await _run(EA, B, Tap())
    assert isinstance(a, wire.ProtocolError) and "speaks TLS" in str(a) and "--encrypt" in str(a)
    assert isinstance(d, wire.ProtocolError) and "--encrypt" in str(d)


async def test_a_plain_dialler_is_refused_by_an_encrypted_node_with_a_clear_error() -> None:
    tap = Tap()
    d, a = await _run(A, EB, tap)
    assert isinstance(a, wire.ProtocolError) and "refuses plaintext peers" in str(a)
    assert isinstance(d, _FAILURES)
    assert b"weights" not in tap.seen  # the plain dialler never got as far as sending data


def test_plaintext_transcript_is_unchanged_and_the_channel_changes_it() -> None:
    from p2pd.protocol import auth

    n1, n2 = b"\x01" * 16, b"\x02" * 16
    t = auth.handshake_transcript(AID, A.node_id, n1, B.node_id, n2)
    assert t == auth._enc.encode(["p2pd handshake v2", AID, A.node_id, n1, B.node_id, n2])
    assert auth.handshake_transcript(AID, A.node_id, n1, B.node_id, n2, b"x" * 32) != t
