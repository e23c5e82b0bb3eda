"""The race between paths (Happy Eyeballs): staggered starts, a failure starts the next path at once, the
first handshaken connection wins, every other one is closed by the attempt that opened it, and a peer
reached directly is dialled directly only."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
import trio.testing

from p2pd.connections import ConnectError, Connection, ConnectionPath
from p2pd.racing import Path, RacingConnector
from p2pd.stream_io import StreamIO

PEER, AID = "b" * 32, "f" * 64


class FakeStream(trio.abc.Stream):
    """Stands for a connection's stream: only whether its opener closed it matters here."""

    def __init__(self) -> None:
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise trio.BrokenResourceError

    async def wait_send_all_might_not_block(self) -> None:
        return None

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return b""


class Scripted:
    """A connector that succeeds or fails after `delay` seconds; records what it handed out."""

    def __init__(self, path: ConnectionPath, delay: float, ok: bool = True, deaf: bool = False) -> None:
        self.path, self.delay, self.ok, self.deaf = path, delay, ok, deaf
        self.reach_after: float | None = None  # when (if ever) it reports its transport connected
        self.started: list[float] = []
        self.handed: list[FakeStream] = []
        self.cancelled = 0

    async def connect(
        self, remote_id: str, addr: tuple[str, int], artifact_id: str, *, reached: Callable[[], None] | None = None
    ) -> Connection:
        self.started.append(trio.current_time())
        try:
            with trio.CancelScope(shield=self.deaf):  # deaf: completes even when cancelled meanwhile
                if reached is not None and self.reach_after is not None:
                    await trio.sleep(self.reach_after)
                    reached()
                    await trio.sleep(self.delay - self.reach_after)
                else:
                    await trio.sleep(self.delay)
        except trio.Cancelled:
            self.cancelled += 1
            raise
        if not self.ok:
            raise ConnectError(f"{self.path} refused")
        s = FakeStream()
        self.handed.append(s)
        return Connection(s, StreamIO(s), remote_id, artifact_id, "x:1", self.path, "a" * 32)


def race(direct: Scripted, punch: Scripted, relay: Scripted) -> RacingConnector:
    return RacingConnector(
        [
            Path("direct", direct, 0.0, reports_transport=True),
            Path("tcp-punch", punch, 0.15),
            Path("relay", relay, 1.0),
        ],
        remember_direct=60,
    )


async def test_direct_wins_and_nothing_else_starts(autojump_clock: trio.testing.MockClock) -> None:
    d, p, r = (
        Scripted(ConnectionPath.DIRECT, 0.01),
        Scripted(ConnectionPath.TCP_PUNCH, 0.01),
        Scripted(ConnectionPath.RELAY, 0.01),
    )
    conn = await race(d, p, r).connect(PEER, ("x", 1), AID)
    assert conn.path is ConnectionPath.DIRECT
    assert p.started == [] and r.started == []


async def test_staggered_starts_and_losers_cancelled(autojump_clock: trio.testing.MockClock) -> None:
    t0 = trio.current_time()
    d, p, r = (
        Scripted(ConnectionPath.DIRECT, 10),
        Scripted(ConnectionPath.TCP_PUNCH, 10),
        Scripted(ConnectionPath.RELAY, 0.2),
    )
    conn = await race(d, p, r).connect(PEER, ("x", 1), AID)
    assert conn.path is ConnectionPath.RELAY
    assert d.started == [t0] and p.started == [pytest.approx(t0 + 0.15)] and r.started == [pytest.approx(t0 + 1.0)]
    assert d.cancelled == 1 and p.cancelled == 1
    assert trio.current_time() - t0 == pytest.approx(1.2)


async def test_a_failed_path_starts_the_next_at_once(autojump_clock: trio.testing.MockClock) -> None:
    t0 = trio.current_time()
    d, p, r = (
        Scripted(ConnectionPath.DIRECT, 0.01, ok=False),
        Scripted(ConnectionPath.TCP_PUNCH, 0.02, ok=False),
        Scripted(ConnectionPath.RELAY, 0.05),
    )
    conn = await race(d, p, r).connect(PEER, ("x", 1), AID)
    assert conn.path is ConnectionPath.RELAY
    assert p.started == [pytest.approx(t0 + 0.01)] and r.started == [pytest.approx(t0 + 0.03)]


async def test_all_failing_names_every_path(autojump_clock: trio.testing.MockClock) -> None:
    d, p, r = (
        Scripted(ConnectionPath.DIRECT, 0.01, ok=False),
        Scripted(ConnectionPath.TCP_PUNCH, 0.5, ok=False),
        Scripted(ConnectionPath.RELAY, 0.1, ok=False),
    )
    with pytest.raises(ConnectError) as e:
        await race(d, p, r).connect(PEER, ("x", 1), AID)
    assert all(name in str(e.value) for name in ("direct refused", "tcp-punch refused", "relay refused"))


async def test_a_late_winner_is_closed_by_its_attempt(autojump_clock: trio.testing.MockClock) -> None:
    """A path that completes after another won (its cancel came too late) has its connection closed."""
    d, p, r = (
        Scripted(ConnectionPath.DIRECT, 0.2),
        Scripted(ConnectionPath.TCP_PUNCH, 0.3, deaf=True),
        Scripted(ConnectionPath.RELAY, 1),
    )
    conn = await race(d, p, r).connect(PEER, ("x", 1), AID)
    assert conn.path is ConnectionPath.DIRECT
    assert p.handed and all(s.closed for s in p.handed)
    assert not d.handed[0].closed


async def test_a_peer_reached_directly_is_dialled_directly_only(autojump_clock: trio.testing.MockClock) -> None:
    d, p, r = (
        Scripted(ConnectionPath.DIRECT, 0.01),
        Scripted(ConnectionPath.TCP_PUNCH, 0.01),
        Scripted(ConnectionPath.RELAY, 0.01),
    )
    rc = race(d, p, r)
    await rc.connect(PEER, ("x", 1), AID)
    d.delay = 5  # slower than the stagger: a race would start the punch
    conn = await rc.connect(PEER, ("x", 1), AID)
    assert conn.path is ConnectionPath.DIRECT and p.started == []
    d.ok = False  # it moved: the failure is reported, and the next connect races again
    with pytest.raises(ConnectError):
        await rc.connect(PEER, ("x", 1), AID)
    conn = await rc.connect(PEER, ("x", 1), AID)
    assert conn.path is ConnectionPath.TCP_PUNCH and len(p.started) == 1
    d.ok, d.delay = True, 0.01
    assert (await rc.connect(PEER, ("x", 1), AID)).path is ConnectionPath.DIRECT  # remembered again
    await trio.sleep(61)  # longer than remember_direct: forgotten, raced again
    d.delay = 5
    assert (await rc.connect(PEER, ("x", 1), AID)).path is ConnectionPath.TCP_PUNCH


async def test_a_connected_direct_path_holds_the_race_until_its_handshake_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A busy peer: TCP connects at once but the handshake is slow. Nothing else starts meanwhile; when the
    handshake fails, the next path starts at once."""
    t0 = trio.current_time()
    d, p, r = (
        Scripted(ConnectionPath.DIRECT, 2.0),
        Scripted(ConnectionPath.TCP_PUNCH, 0.01),
        Scripted(ConnectionPath.RELAY, 0.01),
    )
    d.reach_after = 0.01
    assert (await race(d, p, r).connect(PEER, ("x", 1), AID)).path is ConnectionPath.DIRECT
    assert p.started == [] and r.started == []
    d.ok = False
    conn = await race(d, p, r).connect(PEER, ("x", 1), AID)
    assert conn.path is ConnectionPath.TCP_PUNCH
    assert p.started == [pytest.approx(t0 + 4.0)] and r.started == []


@pytest.mark.parametrize(("told", "punch_at"), [((True,), 0.0), ((), 0.15), ((True, False), 0.15)])
async def test_a_peer_behind_a_nat_is_punched_at_once(
    autojump_clock: trio.testing.MockClock, told: tuple[bool, ...], punch_at: float
) -> None:
    """A peer the tracker lists behind a NAT drops our SYN: its punch starts with the direct dial, not 150 ms
    later; the paths after it keep their times; a peer no longer listed so is raced as before."""
    t0 = trio.current_time()
    d, p, r = (
        Scripted(ConnectionPath.DIRECT, 10),
        Scripted(ConnectionPath.TCP_PUNCH, 10),
        Scripted(ConnectionPath.RELAY, 0.2),
    )
    rc = race(d, p, r)
    for nated in told:
        rc.behind_nat(PEER, nated)
    conn = await rc.connect(PEER, ("x", 1), AID)
    assert conn.path is ConnectionPath.RELAY
    assert d.started == [t0] and p.started == [pytest.approx(t0 + punch_at)] and r.started == [pytest.approx(t0 + 1.0)]
