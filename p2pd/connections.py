"""How a swarm gets a connection to a peer: a handshaken trio Stream, whichever path it took.

The swarm asks a `Connector` for a connection to a node and gets a `Connection` (the stream, its
buffered reader, who is at the other end, which path won), or `ConnectError`. Incoming connections
arrive at the daemon's listener and are handshaken here too, then handed to the swarm they name.
`TcpConnector` dials directly; `p2pd.traversal` adds a punched TCP connection and a relay, and races
them (`RacingConnector`) behind the same interface, so the swarm does not change. Whoever obtained a
connection closes it (`aclose`), once, when done with it.

The handshake is mutually authenticated (protocol 2, docs/interfaces.md "Handshake"): each side
sends HANDSHAKE (its id, its public key, a fresh nonce), then AUTH (its signature over both ids and
nonces and the artifact, and in a secured cluster the join secret's MAC over the same bytes). A node
id is the hash of its key (`p2pd.protocol.auth.node_id_of`), so a connection that completes is with
the holder of that id's key: nobody can take another node's place (issue #14 row 2), and without the
join secret nobody outside the cluster gets a piece (row 10). The acceptor sends its HANDSHAKE and
AUTH together, so a dialler still has its answer after one round trip.

With `--encrypt` (an identity from `p2pd.tls.with_tls`) the stream is wrapped in TLS 1.3 first, on
every path, and the transcript both sides sign includes the TLS channel binding (p2pd.tls); without it
nothing here touches the stream and the bytes on the wire are the protocol-2 ones.
"""

from __future__ import annotations

import enum
import logging
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from p2pd.errors import CloseReason
from p2pd.protocol import auth, wire
from p2pd.protocol import manifest as mf
from p2pd.protocol.session import PeerClosed
from p2pd.stream_io import StreamIO
from p2pd.tls import MISMATCH_HINT, tls_of, wrap

NODE_ID_LENGTH = 32
_TLS_HANDSHAKE_RECORD = b"\x16\x03"  # how a TLS ClientHello starts (never a HANDSHAKE frame's length)
log = logging.getLogger(__name__)


class ConnectionPath(enum.StrEnum):
    """How the bytes of a connection travel (shown per peer in `p2pd status --json`)."""

    DIRECT = "direct"  # TCP to the peer's advertised address, or accepted from it
    TCP_PUNCH = "tcp-punch"  # TCP simultaneous open through both NATs, coordinated by the tracker
    UDP_PUNCH = "udp-punch"  # QUIC over a UDP hole punch (a birthday spray if one NAT is symmetric)
    RELAY = "relay"  # TCP to a relay (the tracker or a node run with --relay) that splices the two nodes


class ConnectError(Exception):
    """No connection to that peer now (refused, timed out, wrong node at that address, ...)."""


@dataclass(eq=False)
class Connection:
    """A connection whose handshake is done: both ends agree on the artifact and who is who."""

    stream: trio.abc.Stream
    io: StreamIO  # holds bytes the peer sent right behind its handshake
    remote_id: str
    artifact_id: str
    addr: str  # host:port, for logs and status
    path: ConnectionPath
    initiator: str  # node id of the side that connected (decides which of two duplicates stays)

    async def aclose(self) -> None:
        await self.stream.aclose()


class Connector(Protocol):
    """What a swarm calls to reach a peer; raises ConnectError when it cannot."""

    async def connect(self, remote_id: str, addr: tuple[str, int], artifact_id: str) -> Connection: ...


def _handshake(me: auth.Identity, artifact_id: str, nonce: bytes) -> bytes:
    return wire.encode(wire.Handshake(wire.PROTOCOL_VERSION, me.node_id, artifact_id, me.key.public, nonce))


def _auth(me: auth.Identity, artifact_id: str, nonce: bytes, hs: wire.Handshake, channel: bytes) -> bytes:
    signature, member = auth.handshake_proof(me, artifact_id, nonce, hs.node_id, hs.nonce, channel)
    return wire.encode(wire.Auth(signature, member))


async def _read_frame(io: StreamIO, want: wire.MsgType) -> wire.Message:
    header = await io.read_exactly(wire.HEADER_SIZE)
    if header.startswith(_TLS_HANDSHAKE_RECORD) and want is wire.MsgType.HANDSHAKE:
        raise wire.ProtocolError(f"the peer speaks TLS (it runs with --encrypt), this node does not; {MISMATCH_HINT}")
    t, n = wire.parse_header(header, 0)
    if t is not want:
        raise wire.ProtocolError(f"expected {want.name}, got {t.name}")
    if n > wire.MAX_HANDSHAKE_FRAME:  # refused before buffering it (issue #14 row 4)
        raise wire.ProtocolError(f"{t.name} of {n} bytes exceeds limit {wire.MAX_HANDSHAKE_FRAME}")
    return wire.decode_body(t, await io.read_exactly(n))


async def read_handshake(io: StreamIO, timeout: float) -> wire.Handshake:
    """The peer's HANDSHAKE: our protocol, well-formed ids, and a key that is its id's."""
    with trio.fail_after(timeout):
        hs = await _read_frame(io, wire.MsgType.HANDSHAKE)
    assert isinstance(hs, wire.Handshake)
    if hs.version != wire.PROTOCOL_VERSION:
        raise wire.ProtocolError(f"peer speaks protocol {hs.version}, we speak {wire.PROTOCOL_VERSION}")
    if len(hs.node_id) != NODE_ID_LENGTH or not mf.ID_RE.match(hs.artifact_id):
        raise wire.ProtocolError("malformed ids in handshake")
    try:
        auth.check_hello(hs.node_id, hs.key, hs.nonce)
    except auth.AuthError as e:
        raise wire.ProtocolError(str(e)) from None
    return hs


async def check_peer_auth(
    io: StreamIO,
    me: auth.Identity,
    artifact_id: str,
    nonce: bytes,
    hs: wire.Handshake,
    timeout: float,
    channel: bytes = b"",
) -> None:
    """Read the peer's AUTH and check it: it holds its key and (secured cluster) the join secret."""
    with trio.fail_after(timeout):
        proof = await _read_frame(io, wire.MsgType.AUTH)
    assert isinstance(proof, wire.Auth)
    try:
        auth.check_handshake_proof(
            me, artifact_id, nonce, hs.node_id, hs.key, hs.nonce, proof.signature, proof.member, channel
        )
    except auth.AuthError as e:
        raise wire.ProtocolError(str(e)) from None


async def open_outgoing(
    stream: trio.abc.Stream,
    *,
    identity: auth.Identity,
    remote_id: str,
    artifact_id: str,
    addr: str,
    path: ConnectionPath,
    handshake_timeout: float,
    initiator: str | None = None,
) -> Connection:
    """Handshake a stream we opened (by any path) to `remote_id`; ProtocolError if someone else answered
    or the answer does not prove the key of `remote_id` (and, in a secured cluster, membership).

    `initiator` (default: us) is who both ends record as the dialler; a punched connection, opened
    by both sides at once, names the same node on both ends.
    """
    channel = b""
    tls = tls_of(identity)
    if tls is not None:  # a punched stream's two ends both dial: the initiator is the TLS client
        client = (initiator or identity.node_id) == identity.node_id
        stream, channel = await wrap(stream, tls, server_side=not client, timeout=handshake_timeout)
    io = StreamIO(stream)
    nonce = secrets.token_bytes(auth.NONCE_SIZE)
    await io.send_all(_handshake(identity, artifact_id, nonce))
    hs = await read_handshake(io, handshake_timeout)
    if hs.artifact_id != artifact_id or hs.node_id != remote_id:
        raise wire.ProtocolError(f"answered as {hs.node_id[:8]} for {hs.artifact_id[:12]}")
    await io.send_all(_auth(identity, artifact_id, nonce, hs, channel))
    await check_peer_auth(io, identity, artifact_id, nonce, hs, handshake_timeout, channel)
    return Connection(stream, io, remote_id, artifact_id, addr, path, initiator or identity.node_id)


class TcpConnector:
    """Direct TCP to the address the tracker lists for a node."""

    def __init__(self, identity: auth.Identity, *, connect_timeout: float, handshake_timeout: float) -> None:
        self.identity = identity
        self.node_id = identity.node_id
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout

    async def connect(
        self, remote_id: str, addr: tuple[str, int], artifact_id: str, *, reached: Callable[[], None] | None = None
    ) -> Connection:
        """`reached()` is called once TCP is connected (the handshake may still fail)."""
        host, port = addr
        where = f"{host}:{port}"
        sock = trio.socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            with trio.fail_after(self.connect_timeout):
                await sock.connect((host, port))
            if reached is not None:
                reached()
            return await open_outgoing(
                trio.SocketStream(sock),
                identity=self.identity,
                remote_id=remote_id,
                artifact_id=artifact_id,
                addr=where,
                path=ConnectionPath.DIRECT,
                handshake_timeout=self.handshake_timeout,
            )
        except (OSError, trio.TooSlowError, PeerClosed, wire.ProtocolError) as e:
            sock.close()
            raise ConnectError(f"{where}: {e or type(e).__name__}") from None
        except BaseException:
            sock.close()
            raise


async def accept_from(
    stream: trio.abc.Stream,
    addr: str,
    identity: auth.Identity,
    *,
    remote_id: str,
    artifact_id: str,
    path: ConnectionPath,
    handshake_timeout: float,
    serves: Callable[[str], bool] | None = None,
) -> Connection:
    """`accept` on a stream opened for one node and one artifact (punched, relayed): anyone else is refused."""
    conn = await accept(
        stream, addr, identity, handshake_timeout=handshake_timeout, serves=serves or artifact_id.__eq__, path=path
    )
    if conn.remote_id != remote_id:
        raise wire.ProtocolError(f"node {conn.remote_id[:8]} came over the {path} path, not {remote_id[:8]}")
    return conn


async def accept(
    stream: trio.abc.Stream,
    addr: str,
    identity: auth.Identity,
    *,
    handshake_timeout: float,
    serves: Callable[[str], bool],
    path: ConnectionPath = ConnectionPath.DIRECT,
) -> Connection:
    """Handshake an incoming connection; `serves(artifact_id)`: do we have a swarm for it?

    Raises PeerClosed (the caller closes the stream) when the peer named an artifact we do not
    serve: it was told so with GOODBYE first; ProtocolError when it does not prove its key or (in a
    secured cluster) membership: nothing of ours was sent but our own HANDSHAKE and AUTH.
    """
    channel = b""
    tls = tls_of(identity)
    if tls is not None:
        stream, channel = await wrap(stream, tls, server_side=True, timeout=handshake_timeout)
    io = StreamIO(stream)
    hs = await read_handshake(io, handshake_timeout)
    if not serves(hs.artifact_id):
        await io.send_all(wire.encode(wire.Goodbye("unknown artifact")))
        raise PeerClosed(CloseReason.WE_LEFT, f"unknown artifact {hs.artifact_id[:12]}")
    nonce = secrets.token_bytes(auth.NONCE_SIZE)
    await io.send_all(_handshake(identity, hs.artifact_id, nonce) + _auth(identity, hs.artifact_id, nonce, hs, channel))
    await check_peer_auth(io, identity, hs.artifact_id, nonce, hs, handshake_timeout, channel)
    return Connection(stream, io, hs.node_id, hs.artifact_id, addr, path, hs.node_id)
