"""A TCP birthday punch under way holds the later paths of the race (the UDP punch, the relay) until its
outcome, as the UDP punch's does: in CI the NAT matrix's UDP-blocked -> symmetric cell once went over the
relay, which had started at its 2.5 s stagger, and nothing moves such a pair off the relay again."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from p2pd import traversal, udp_punch
from p2pd.config import SwarmConfig, TraversalConfig
from p2pd.connections import ConnectError, ConnectionPath
from p2pd.protocol.nat import NatType
from p2pd.protocol.tcp_punch import Role
from p2pd.racing import Path, RacingConnector
from tests.unit.test_racing import AID, PEER, Scripted
from tests.unit.test_udp_punch_gate import ME, nat


class Signal:
    """A signal channel that is up; the tracker's punch answer comes from `PunchPort.ask_tracker` below."""

    up = True
    addr = ("127.0.0.1", 7070)

    def identity(self) -> dict[str, Any]:
        return {}


async def punch_once(
    own: NatType, peer_nat: str, gate: udp_punch.BirthdayGate, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[str], Role | None]:
    """One punch whose SYNs never meet: what happened, in order, and the role the punch ran in."""
    events: list[str] = []
    roles: list[Role] = []

    async def ask_tracker(self: traversal.PunchPort, tracker: Any, method: str, params: Any, timeout: float) -> Any:
        events.append("rendezvous")
        return {"addr": ["127.0.0.2", 4000], "nat": peer_nat}

    async def connect_to(self: traversal.PunchPort, remote: Any, timeout: float, role: Role = Role.PLAIN) -> Any:
        events.append("punch")
        roles.append(role)
        raise traversal.PunchFailed("no SYN met")

    monkeypatch.setattr(traversal.PunchPort, "ask_tracker", ask_tracker)
    monkeypatch.setattr(traversal.PunchPort, "connect_to", connect_to)
    connector = traversal.PunchConnector(
        ME,
        Signal(),  # type: ignore[arg-type]
        timeout=3.0,
        handshake_timeout=1.0,
        nat=nat(own),
        gate=gate,
    )
    with pytest.raises(ConnectError):
        await connector.connect(PEER, ("127.0.0.2", 7401), AID, reached=lambda: events.append("reached"))
    return events, roles[0] if roles else None


@pytest.mark.parametrize(
    ("own", "peer_nat", "role"),
    [
        (NatType.FULL_CONE, "symmetric", Role.EASY),
        (NatType.UDP_BLOCKED, "symmetric", Role.EASY),  # the matrix cell: its TCP is a cone's
        (NatType.SYMMETRIC, "port-restricted-cone", Role.HARD),
    ],
)
async def test_a_birthday_punch_reports_itself_under_way_before_it_sprays(
    own: NatType, peer_nat: str, role: Role, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = udp_punch.BirthdayGate(1)
    events, ran = await punch_once(own, peer_nat, gate, monkeypatch)
    assert events == ["rendezvous", "reached", "punch"]
    assert ran is role
    assert gate.running == 0  # its place is given back when it fails


@pytest.mark.parametrize(
    ("own", "peer_nat"),
    [
        (NatType.FULL_CONE, "port-restricted-cone"),  # done in milliseconds or not at all
        (NatType.SYMMETRIC, "symmetric"),  # cannot punch: the relay keeps its stagger
    ],
)
async def test_a_plain_punch_does_not_hold_the_race(
    own: NatType, peer_nat: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    events, ran = await punch_once(own, peer_nat, udp_punch.BirthdayGate(1), monkeypatch)
    assert events == ["rendezvous", "punch"]
    assert ran is Role.PLAIN


async def test_a_birthday_punch_refused_by_a_full_gate_holds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = udp_punch.BirthdayGate(1)
    assert gate.try_enter()
    events, ran = await punch_once(NatType.FULL_CONE, "symmetric", gate, monkeypatch)
    assert events == ["rendezvous"]
    assert ran is None
    assert gate.running == 1


async def test_the_relay_waits_for_a_punch_under_way(autojump_clock: trio.testing.MockClock) -> None:
    """The relay's stagger passes while a birthday punch sprays (2.8 s on a busy host): the punch wins, the
    UDP punch and the relay never start. When the punch fails instead, the UDP punch starts at once, and the
    relay as soon as that fails too."""

    def paths(punch: Scripted, udp: Scripted, relay: Scripted) -> RacingConnector:
        return RacingConnector(
            [
                # a NATed peer drops our SYN: the direct dial fails at its connect timeout
                Path("direct", Scripted(ConnectionPath.DIRECT, 3.0, ok=False), 0.0, reports_transport=True),
                Path("tcp-punch", punch, 0.15, reports_transport=True),
                Path("udp-punch", udp, 1.0, reports_transport=True),
                Path("relay", relay, 2.5),
            ]
        )

    punch, udp, relay = (
        Scripted(ConnectionPath.TCP_PUNCH, 2.8),
        Scripted(ConnectionPath.UDP_PUNCH, 0.01, ok=False),
        Scripted(ConnectionPath.RELAY, 0.01),
    )
    punch.reach_after = 0.1
    conn = await paths(punch, udp, relay).connect(PEER, ("x", 1), AID)
    assert conn.path is ConnectionPath.TCP_PUNCH
    assert udp.started == [] and relay.started == []

    t0 = trio.current_time()
    punch, udp, relay = (
        Scripted(ConnectionPath.TCP_PUNCH, 3.0, ok=False),
        Scripted(ConnectionPath.UDP_PUNCH, 0.01, ok=False),
        Scripted(ConnectionPath.RELAY, 0.01),
    )
    punch.reach_after = 0.1
    conn = await paths(punch, udp, relay).connect(PEER, ("x", 1), AID)
    assert conn.path is ConnectionPath.RELAY
    fail_at = t0 + 0.15 + 3.0
    assert udp.started == [pytest.approx(fail_at)] and relay.started == [pytest.approx(fail_at + 0.01)]


def test_the_daemons_race_lets_the_punches_report_their_progress() -> None:
    """Which of the daemon's paths hold the later ones once under way: a relay never does (it is the last)."""
    t = traversal.Traversal(ME, TraversalConfig(), SwarmConfig(), serves=lambda aid: True, serve=_no_serve)
    held = {p.name: p.reports_transport for p in t.connector.paths}
    assert held == {"direct": True, "tcp-punch": True, "udp-punch": True, "relay": False}


async def _no_serve(conn: Any) -> None:
    raise AssertionError("nothing is served here")
