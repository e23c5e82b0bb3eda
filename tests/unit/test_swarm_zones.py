"""A peer in another zone is asked only for what no peer of our own zone holds (SwarmConfig.prefer_zone).

Zones are racks or availability zones whose links between them are the thin ones: each piece should cross once
and spread inside the zone (BENCHMARKS "Two zones"). A connection the other node opened to us carries no zone, so
the swarm remembers every peer's zone from the tracker's lists; here a complete node of zone `a` dials a
downloading node of zone `b` over real TCP on loopback, and the downloading side must rank it as cross-zone.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from p2pd import connections, storage
from p2pd.config import SwarmConfig
from p2pd.connections import ConnectionPath
from p2pd.protocol import bitfield as bits
from p2pd.protocol import manifest as mf
from p2pd.protocol.auth import ClusterSecret, Identity, NodeKey
from p2pd.storage import Catalog, PieceStore
from p2pd.swarm import Swarm

PIECE = 64 << 10
PIECES = 8
CLUSTER = ClusterSecret(b"a join secret for these tests")
SEED, LEECH = Identity(NodeKey.from_seed(b"\x03" * 32), CLUSTER), Identity(NodeKey.from_seed(b"\x04" * 32), CLUSTER)


def swarms(tmp_path: Path, *, config: SwarmConfig) -> tuple[Swarm, Swarm]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.bin").write_bytes(os.urandom(PIECE * PIECES))
    entries, root, single = storage.scan_source(src)
    m = mf.build(entries, PIECE, storage.hash_pieces(root, entries, PIECE), single_file=single)
    aid = mf.artifact_id(m)
    seed = Swarm(
        node_id=SEED.node_id,
        artifact_id=aid,
        name="model:1",
        manifest=m,
        store=PieceStore(m, src, writable=False),
        have=bits.full(m.num_pieces),
        catalog=Catalog(tmp_path / "seed"),
        config=config,
        egress=None,
        ingress=None,
        zone="a",
    )
    store = PieceStore(m, tmp_path / "staging", writable=True)
    store.preallocate()
    leech = Swarm(
        node_id=LEECH.node_id,
        artifact_id=aid,
        name="model:1",
        manifest=m,
        store=store,
        have=0,
        catalog=Catalog(tmp_path / "leech"),
        config=config,
        egress=None,
        ingress=None,
        zone="b",
    )
    return seed, leech


async def rank_of_accepted_peer(
    tmp_path: Path, config: SwarmConfig, seed_zone_listed: str | None, listed_later: str | None = None
) -> int:
    """The picker rank the leech gives a seed that connected to it (the seed's zone as its lookups listed it,
    before the connection or, `listed_later`, once the seed's bitfield is in); -1 for a rank 1 that is not
    also the picker's other-zone mark (rule 7)."""
    seed, leech = swarms(tmp_path, config=config)
    if seed_zone_listed is not None:
        leech.zones[SEED.node_id] = seed_zone_listed  # what a lookup (Swarm._find_peers) records
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    rank = -1
    with trio.fail_after(10):
        async with trio.open_nursery() as n:

            async def run_leech() -> None:
                sock, _ = await listener.accept()
                conn = await connections.accept(
                    trio.SocketStream(sock), "seed", LEECH, handshake_timeout=5, serves=leech.artifact_id.__eq__
                )
                try:
                    await leech.serve(conn)
                finally:
                    await conn.aclose()

            async def run_seed() -> None:
                sock = trio.socket.socket()
                await sock.connect(listener.getsockname())
                conn = await connections.open_outgoing(
                    trio.SocketStream(sock),
                    identity=SEED,
                    remote_id=LEECH.node_id,
                    artifact_id=seed.artifact_id,
                    addr="leech",
                    path=ConnectionPath.DIRECT,
                    handshake_timeout=5,
                )
                try:
                    await seed.serve(conn, "b")
                finally:
                    await conn.aclose()

            n.start_soon(run_leech)
            n.start_soon(run_seed)
            while not (SEED.node_id in leech.conns and leech.picker.knows(leech.conns[SEED.node_id].session)):
                await trio.sleep(0.01)
            session = leech.conns[SEED.node_id].session
            if listed_later is not None:
                leech.zones[SEED.node_id] = listed_later
                leech._learn_zones()  # what a lookup does once it has recorded the zones it lists
            rank = leech.picker.rank.get(session, 0)
            if rank and config.zone_stripe and session not in leech.picker.cross:
                rank = -1
            n.cancel_scope.cancel()
    listener.close()
    seed.store.close()
    leech.store.close()
    return rank


@pytest.mark.parametrize(
    ("listed", "prefer_zone", "want"),
    [("a", True, 1), ("b", True, 0), (None, True, 0), ("a", False, 0)],
    ids=["other-zone", "same-zone", "zone-unknown", "rule-off"],
)
async def test_an_accepted_peer_of_another_zone_ranks_behind_our_zone(
    tmp_path: Path, listed: str | None, prefer_zone: bool, want: int
) -> None:
    cfg = SwarmConfig(compress=False, prefer_zone=prefer_zone)
    assert await rank_of_accepted_peer(tmp_path, cfg, listed) == want


@pytest.mark.parametrize(("later", "want"), [("a", 1), ("b", 0)], ids=["other-zone", "same-zone"])
async def test_a_peer_whose_zone_the_lookups_list_after_it_connected_is_ranked_then(
    tmp_path: Path, later: str, want: int
) -> None:
    """Nodes released together: a zone-a node found us before our lookups listed it, and its connection
    won against ours. Our next lookup lists its zone; from then on it is an other-zone peer (rank and
    stripe rule), not a zone mate for the rest of the download."""
    cfg = SwarmConfig(compress=False)
    assert await rank_of_accepted_peer(tmp_path, cfg, None, listed_later=later) == want
