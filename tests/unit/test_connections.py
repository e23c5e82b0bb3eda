"""The swarm runs over any handshaken trio Stream: a whole download over in-memory streams.

No socket anywhere: the connector below hands the swarm one end of `trio.testing.memory_stream_pair`
and serves the other end with the seed's swarm, as a relay or a data channel would. The pieces
still arrive verified and the files come out byte-identical, so nothing above the connection layer
depends on TCP. The handshake rules (wrong node, unknown artifact) are checked on the same streams.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

from p2pd import connections, storage
from p2pd.config import SwarmConfig
from p2pd.connections import ConnectError, Connection, ConnectionPath
from p2pd.errors import CloseReason
from p2pd.protocol import bitfield as bits
from p2pd.protocol import manifest as mf
from p2pd.protocol import wire
from p2pd.protocol.auth import ClusterSecret, Identity, NodeKey
from p2pd.protocol.session import PeerClosed
from p2pd.storage import Catalog, PieceStore
from p2pd.swarm import Swarm

PIECE = 1 << 16
CLUSTER = ClusterSecret(b"a join secret for these tests")
SEED = Identity(NodeKey.from_seed(b"\x01" * 32), CLUSTER)
LEECH = Identity(NodeKey.from_seed(b"\x02" * 32), CLUSTER)
SEED_ID, LEECH_ID = SEED.node_id, LEECH.node_id
IDENTITIES = {SEED_ID: SEED, LEECH_ID: LEECH}


class MemoryConnector:
    """Reaches the swarms it was given over in-memory streams; their side is served in `nursery`."""

    def __init__(self, identity: Identity, nursery: trio.Nursery, swarms: dict[str, Swarm]) -> None:
        self.identity, self.nursery, self.swarms = identity, nursery, swarms
        self.connections = 0

    async def connect(self, remote_id: str, addr: tuple[str, int], artifact_id: str) -> Connection:
        remote = self.swarms.get(remote_id)
        if remote is None:
            raise ConnectError(f"no node {remote_id[:8]} here")
        ours, theirs = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self._serve_remote, remote, theirs)
        self.connections += 1
        try:
            return await connections.open_outgoing(
                ours,
                identity=self.identity,
                remote_id=remote_id,
                artifact_id=artifact_id,
                addr="memory",
                path=ConnectionPath.DIRECT,
                handshake_timeout=5,
            )
        except wire.ProtocolError as e:
            await ours.aclose()
            raise ConnectError(str(e)) from None

    async def _serve_remote(self, remote: Swarm, stream: trio.abc.Stream) -> None:
        async with stream:
            try:
                conn = await connections.accept(
                    stream, "memory", IDENTITIES[remote.node_id], handshake_timeout=5, serves=remote.artifact_id.__eq__
                )
            except (PeerClosed, trio.BrokenResourceError, trio.ClosedResourceError, wire.ProtocolError):
                return
            await remote.serve(conn)


def publish(tmp_path: Path) -> tuple[mf.Manifest, str, Path]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.bin").write_bytes(os.urandom(PIECE * 40 + 123))
    (src / "config.json").write_text('{"hidden": 4096}\n' * 2000)  # compresses: travels as zstd
    entries, root, single = storage.scan_source(src)
    m = mf.build(entries, PIECE, storage.hash_pieces(root, entries, PIECE), single_file=single)
    return m, mf.artifact_id(m), src


def seed_swarm(m: mf.Manifest, aid: str, src: Path, tmp_path: Path) -> Swarm:
    return Swarm(
        node_id=SEED_ID,
        artifact_id=aid,
        name="model:1",
        manifest=m,
        store=PieceStore(m, src, writable=False),
        have=bits.full(m.num_pieces),
        catalog=Catalog(tmp_path / "seed"),
        config=SwarmConfig(),
        egress=None,
        ingress=None,
    )


def leech_swarm(m: mf.Manifest, aid: str, tmp_path: Path, connector: MemoryConnector) -> Swarm:
    catalog = Catalog(tmp_path / "leech")
    catalog.save_manifest(aid, m)
    store = PieceStore(m, catalog.staging_root(aid), writable=True)
    store.preallocate()
    journal = catalog.journal(aid, m)
    journal.open(journal.load())

    async def find_peers(_: str) -> list[dict[str, object]]:
        return [{"node_id": SEED_ID, "addr": ["memory", 0]}]

    return Swarm(
        node_id=LEECH_ID,
        artifact_id=aid,
        name="model:1",
        manifest=m,
        store=store,
        have=0,
        catalog=catalog,
        config=SwarmConfig(),
        egress=None,
        ingress=None,
        connector=connector,
        journal=journal,
        find_peers=find_peers,
    )


async def test_a_download_over_streams_that_are_not_sockets(tmp_path: Path) -> None:
    m, aid, src = publish(tmp_path)
    seed = seed_swarm(m, aid, src, tmp_path)
    async with trio.open_nursery() as nursery:
        connector = MemoryConnector(LEECH, nursery, {SEED_ID: seed})
        leech = leech_swarm(m, aid, tmp_path, connector)
        await nursery.start(seed.run)
        await nursery.start(leech.run)
        with trio.fail_after(30):
            await leech.done.wait()
        status = leech.status()
        seed_status = seed.status()
        await leech.leave("test over")
        await seed.leave("test over")
        nursery.cancel_scope.cancel()
    assert status["state"] == "complete" and status["bytes_done"] == m.total_size
    # which path carried the bytes, both ends (the NAT bench reads it to see what went over slow paths)
    assert set(status["bytes_by_path"]) == {"direct"} and status["bytes_by_path"]["direct"]["in"] > 0
    assert status["bytes_by_path"]["direct"]["out"] == 0
    assert seed_status["bytes_by_path"]["direct"]["out"] == status["bytes_by_path"]["direct"]["in"]
    dest = leech.record().path
    for name in ("weights.bin", "config.json"):
        assert (dest / name).read_bytes() == (src / name).read_bytes()
    assert seed.seeding.pieces_sent == m.num_pieces  # one copy of each piece, nothing twice
    assert connector.connections >= 1


async def test_a_connection_answered_by_the_wrong_node_is_refused(tmp_path: Path) -> None:
    m, aid, src = publish(tmp_path)
    seed = seed_swarm(m, aid, src, tmp_path)
    async with trio.open_nursery() as nursery:
        connector = MemoryConnector(LEECH, nursery, {"c" * 32: seed})  # "c..." is answered by the seed
        with pytest.raises(ConnectError, match=f"answered as {SEED_ID[:8]}"):
            await connector.connect("c" * 32, ("memory", 0), aid)
        nursery.cancel_scope.cancel()
    seed.store.close()


async def test_an_incoming_connection_for_an_unknown_artifact_is_told_goodbye() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:

        async def remote() -> None:
            with pytest.raises(PeerClosed) as exc:
                await connections.accept(theirs, "memory", SEED, handshake_timeout=5, serves=lambda _: False)
            assert exc.value.reason is CloseReason.WE_LEFT

        nursery.start_soon(remote)
        await ours.send_all(
            wire.encode(wire.Handshake(wire.PROTOCOL_VERSION, LEECH_ID, "f" * 64, LEECH.key.public, b"n" * 16))
        )
        with trio.fail_after(5):
            reply = wire.FrameDecoder(0).feed(bytes(await ours.receive_some(1024)))
        assert reply == [wire.Goodbye("unknown artifact")]


@pytest.mark.parametrize(
    "hello",
    [
        wire.encode(wire.Handshake(wire.PROTOCOL_VERSION, "short", "f" * 64)),
        wire.encode(wire.Handshake(wire.PROTOCOL_VERSION + 1, LEECH_ID, "f" * 64)),
        wire.encode(wire.Have(1)),
    ],
)
async def test_a_malformed_handshake_is_a_protocol_error(hello: bytes) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    await ours.send_all(hello)
    with pytest.raises(wire.ProtocolError), trio.fail_after(5):
        await connections.accept(theirs, "memory", SEED, handshake_timeout=5, serves=lambda _: True)


async def test_a_silent_dialler_times_out_at_the_handshake(autojump_clock: trio.testing.MockClock) -> None:
    _ours, theirs = trio.testing.memory_stream_pair()
    with pytest.raises(trio.TooSlowError):
        await connections.accept(theirs, "memory", SEED, handshake_timeout=5, serves=lambda _: True)
