"""Bad pieces (issue #14 row 7): strikes with expiry, the BAD_PIECE report, and `integrity` when no
honest source is left. Real Swarm objects over tiny stores; time is trio's mock clock."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import trio
import trio.testing

from p2pd.config import SwarmConfig
from p2pd.errors import CloseReason, ErrorCode
from p2pd.protocol import session as ps
from p2pd.protocol import wire
from p2pd.swarm import Swarm
from tests.unit.test_swarm_policy import make_swarm


@dataclass(eq=False)  # hashable by identity, as PeerConn (the swarm keys per-connection state by it)
class FakeConn:
    """What `Swarm._bad_piece` touches of a PeerConn."""

    remote_id: str
    session: ps.PeerSession
    addr: str = "127.0.0.9:1"
    closed_for: list[CloseReason] = field(default_factory=list)

    @property
    def closed(self) -> bool:
        return bool(self.closed_for)

    def close(self, reason: CloseReason, detail: str = "") -> None:
        self.closed_for.append(reason)

    def watchdog(self, now: float) -> None:
        """(The swarm's watchdog looks at its connections while it runs; a fake peer never stalls.)"""


def connect(sw: Swarm, nid: str) -> FakeConn:
    s = ps.PeerSession(sw.manifest, sw.picker)
    sw.picker.add_peer(s, range(sw.n))
    return FakeConn(nid, s)


async def test_strikes_then_a_ban_that_expires(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    cfg = SwarmConfig(strikes_to_ban=2, strike_expiry=30.0)
    sw = make_swarm(tmp_path, complete=False)
    sw.config = cfg
    c = connect(sw, "p" * 32)
    sw._bad_piece(c, 3)  # type: ignore[arg-type]
    assert not sw.is_banned(c.remote_id) and not c.closed  # one bad piece: told, not banned
    assert wire.FrameDecoder(sw.manifest.piece_size).feed(c.session.take_output()) == [wire.BadPiece(3)]
    assert not sw.picker.peer_has(c.session, 3)  # not asked for that piece again on this connection
    await trio.sleep(31)
    sw._bad_piece(c, 4)  # type: ignore[arg-type]
    assert not sw.is_banned(c.remote_id)  # the first strike expired
    sw._bad_piece(c, 5)  # type: ignore[arg-type]
    assert sw.is_banned(c.remote_id) and c.closed_for == [CloseReason.BANNED]
    assert sw.status()["banned_peers"] == 1
    await trio.sleep(29)
    assert sw.is_banned(c.remote_id)
    await trio.sleep(2)
    assert not sw.is_banned(c.remote_id)  # not for ever: it may have repaired its copy
    assert sw.status()["banned_peers"] == 0
    sw.store.close()


async def test_no_honest_source_left_fails_with_integrity(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sw = make_swarm(tmp_path, complete=False)
    async with trio.open_nursery() as n:
        await n.start(sw.run)
        liar = connect(sw, "l" * 32)
        sw.conns[liar.remote_id] = liar  # type: ignore[assignment]
        sw._bad_piece(liar, 7)  # type: ignore[arg-type]
        honest = connect(sw, "h" * 32)
        sw.conns[honest.remote_id] = honest  # type: ignore[assignment]
        await trio.sleep(sw.config.integrity_wait * 2)
        assert sw.error is None  # another peer still has piece 7
        del sw.conns[honest.remote_id]
        sw.picker.remove_peer(honest.session)
        await trio.sleep(sw.config.integrity_wait + 1)
        assert sw.error_code is ErrorCode.INTEGRITY and sw.error is not None
        assert "piece 7" in sw.error and "corrupt" in sw.error
        n.cancel_scope.cancel()
    sw.store.close()


async def test_a_rotten_piece_we_served_is_dropped_when_reported(tmp_path: Path) -> None:
    damaged: list[int] = []
    sw = make_swarm(tmp_path, complete=True, on_damaged=lambda s, i: damaged.append(i))
    c = connect(sw, "r" * 32)
    path = tmp_path / "src" / "blob.bin"
    await sw._reverify(c, 2)  # type: ignore[arg-type]
    assert sw.has_piece(2) and damaged == []  # our copy verifies: nothing changes
    with open(path, "r+b") as fh:
        fh.seek(2 * sw.manifest.piece_size + 10)
        fh.write(b"\x00\x01\x02")
    await sw._reverify(c, 2)  # type: ignore[arg-type]
    assert not sw.has_piece(2) and damaged == [2]
    assert sw.progress < 1.0  # the tracker is told: no longer complete here
    sw.store.close()
