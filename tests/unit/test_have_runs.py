"""HAVEs come in runs (a big swarm holds them and sends each peer's together): the reader decodes a run in
one pass and the swarm acts on it once (issue #15: at 1 + 32 they were 92 % of the frames a node read)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from p2pd.config import SwarmConfig
from p2pd.connections import ConnectionPath
from p2pd.peer import PeerConn
from p2pd.protocol import bitfield as bits
from p2pd.protocol import manifest as mf
from p2pd.protocol import session as ps
from p2pd.protocol import wire
from p2pd.protocol.picker import Picker
from p2pd.stream_io import StreamIO
from tests.unit.test_swarm_policy import PIECE, PIECES, make_swarm


def manifest() -> mf.Manifest:
    return mf.build(
        [mf.FileEntry("blob.bin", PIECE * PIECES)], PIECE, b"\0" * (mf.DIGEST_SIZE * PIECES), single_file=True
    )


async def test_the_reader_hands_a_run_of_haves_over_as_one_event_in_frame_order() -> None:
    m = manifest()
    events: list[ps.Event] = []
    host: Any = SimpleNamespace(
        manifest=m,
        config=SwarmConfig(),
        picker=Picker(m.num_pieces, set(), seed=1),
        on_event=lambda conn, event: events.append(event),
    )
    ours, theirs = trio.testing.memory_stream_pair()
    conn: Any = SimpleNamespace(
        io=StreamIO(ours), remote_id="r" * 32, addr="peer", path=ConnectionPath.DIRECT, initiator=True
    )
    peer = PeerConn(host, conn)
    frames: list[wire.Message] = [
        wire.Bitfield(bits.to_bytes(0, PIECES)),
        wire.Have(1),
        wire.Have(2),
        wire.Have(3),
        wire.Request(4),
    ]
    frames += [wire.Have(5), wire.Goodbye("done")]
    await theirs.send_all(b"".join(wire.encode(f) for f in frames))
    with pytest.raises(ps.PeerClosed):
        await peer._reader()
    assert events == [
        ps.BitfieldReceived(0),
        ps.HavesReceived([1, 2, 3]),
        ps.UploadRequested(4),
        ps.HavesReceived([5]),
    ]
    assert peer.session.remote_have == 0b101110


def test_a_run_of_haves_refills_the_peer_once_and_only_if_it_became_interesting(tmp_path: Path) -> None:
    sw = make_swarm(tmp_path, complete=False)
    s = ps.PeerSession(sw.manifest, sw.picker)
    s.on_control(wire.MsgType.BITFIELD, bits.to_bytes(0, PIECES))
    sw.picker.add_peer(s, [])
    conn: Any = SimpleNamespace(remote_id="c" * 32, session=s, closed=False)
    fills: list[Any] = []
    sw.fill = fills.append  # type: ignore[method-assign,assignment]
    sw.bad_from[2] = {conn.remote_id, "d" * 32}
    sw.on_event(conn, s.on_haves([1, 2, 3]))
    assert fills == [conn]  # one refill for the run
    assert all(sw.picker.peer_has(s, i) for i in (1, 2, 3))
    assert sw.bad_from[2] == {"d" * 32}  # it announced the piece again: it repaired its copy
    sw.on_event(conn, s.on_haves([2, 1]))
    assert fills == [conn]  # nothing new: no refill
    sw.store.close()
