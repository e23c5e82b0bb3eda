"""A node that leaves closes its connections without losing what it already sent (issue #12).

The NAT swarm's stall: the seed left right after sending the last piece never sent before; its
sockets were closed while the peers' HAVEs and REQUESTs kept arriving, the kernel answered them with
a reset and dropped the tail of that piece from the send buffer, and no node had it any more. Here a
seed swarm serves a peer over real TCP on loopback: the peer reads slowly (a shaped link) and keeps
sending frames until GOODBYE reaches it; the seed leaves while its pieces are still in its send
buffer. Every piece the peer started to receive must arrive whole, then GOODBYE, then a clean EOF.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import trio

from p2pd import connections, storage
from p2pd.config import SwarmConfig
from p2pd.connections import ConnectionPath
from p2pd.protocol import bitfield as bits
from p2pd.protocol import manifest as mf
from p2pd.protocol import wire
from p2pd.protocol.auth import ClusterSecret, Identity, NodeKey
from p2pd.storage import Catalog, PieceStore
from p2pd.swarm import Swarm

PIECE = 256 << 10
PIECES = 16
CLUSTER = ClusterSecret(b"a join secret for these tests")
SEED, PEER = Identity(NodeKey.from_seed(b"\x01" * 32), CLUSTER), Identity(NodeKey.from_seed(b"\x02" * 32), CLUSTER)
SEED_ID, PEER_ID = SEED.node_id, PEER.node_id


def seed_swarm(tmp_path: Path) -> tuple[Swarm, bytes]:
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(PIECE * PIECES)
    (src / "weights.bin").write_bytes(data)
    entries, root, single = storage.scan_source(src)
    m = mf.build(entries, PIECE, storage.hash_pieces(root, entries, PIECE), single_file=single)
    swarm = Swarm(
        node_id=SEED_ID,
        artifact_id=mf.artifact_id(m),
        name="model:1",
        manifest=m,
        store=PieceStore(m, src, writable=False),
        have=bits.full(m.num_pieces),
        catalog=Catalog(tmp_path / "seed"),
        config=SwarmConfig(compress=False),
        egress=None,
        ingress=None,
    )
    return swarm, data


async def test_a_leaving_seed_delivers_every_piece_it_started_before_closing(tmp_path: Path) -> None:
    seed, data = seed_swarm(tmp_path)
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = trio.socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 10)  # the seed's pieces queue at its side
    received: dict[int, bytes] = {}
    said_goodbye = False
    first_piece = trio.Event()

    async def run_seed() -> None:
        sock, _ = await listener.accept()
        stream = trio.SocketStream(sock)
        conn = await connections.accept(stream, "peer", SEED, handshake_timeout=5, serves=seed.artifact_id.__eq__)
        try:
            await seed.serve(conn)
        finally:
            await conn.aclose()

    async def leave_soon() -> None:
        await first_piece.wait()
        await trio.sleep(0.1)
        await seed.leave("test over")

    async def run_peer(done: trio.CancelScope) -> None:
        nonlocal said_goodbye
        await client.connect(listener.getsockname())
        conn = await connections.open_outgoing(
            trio.SocketStream(client),
            identity=PEER,
            remote_id=SEED_ID,
            artifact_id=seed.artifact_id,
            addr="seed",
            path=ConnectionPath.DIRECT,
            handshake_timeout=5,
        )
        out = wire.encode(wire.Bitfield(bits.to_bytes(0, PIECES)))
        out += b"".join(wire.encode(wire.Request(i)) for i in range(PIECES))
        await conn.stream.send_all(out)
        io = conn.io

        async def chatter() -> None:  # what a busy peer sends all the time (HAVEs, REQUESTs, KEEPALIVEs)
            while True:
                await conn.stream.send_all(wire.encode(wire.KeepAlive()))
                await trio.sleep(0.002)

        async with trio.open_nursery() as n:
            n.start_soon(chatter)
            while True:
                t, length = wire.parse_header(await io.read_exactly(wire.HEADER_SIZE), PIECE)
                if t is wire.MsgType.PIECE:
                    ph = wire.parse_piece_sub(await io.read_exactly(wire.PIECE_SUB_SIZE), length)
                    first_piece.set()
                    buf = bytearray()
                    while len(buf) < ph.length:  # about 6 MB/s: a shaped link
                        buf += await io.read_exactly(min(64 << 10, ph.length - len(buf)))
                        await trio.sleep(0.01)
                    received[ph.index] = bytes(buf)
                    continue
                msg = wire.decode_body(t, await io.read_exactly(length))
                if isinstance(msg, wire.Goodbye):
                    said_goodbye = True
                    n.cancel_scope.cancel()
        with trio.fail_after(5):
            assert await client.recv(1) == b"", "nothing may follow GOODBYE"
        client.close()
        done.cancel()

    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            n.start_soon(run_seed)
            n.start_soon(leave_soon)
            n.start_soon(run_peer, n.cancel_scope)
    listener.close()
    assert said_goodbye
    assert received, "the seed left before sending anything: the test proves nothing"
    for i, piece in received.items():
        assert piece == data[i * PIECE : (i + 1) * PIECE], f"piece {i} differs"
