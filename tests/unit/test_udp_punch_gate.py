"""The birthday-punch gate: a node runs at most `max_birthday_punches` at once, refusing more before it
opens the hard side's 256 sockets or asks the tracker (the NAT swarm's symmetric nodes were starved by
several at once, BENCHMARKS.md "The NAT swarm's symmetric nodes")."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import trio

from p2pd import udp_punch
from p2pd.connections import ConnectError
from p2pd.errors import ErrorCode
from p2pd.nat_detect import NatStatus
from p2pd.protocol import udp_punch as up
from p2pd.protocol.auth import ClusterSecret, Identity, NodeKey
from p2pd.protocol.framing import RpcError
from p2pd.protocol.nat import NatType
from p2pd.stream_io import TRAFFIC

ME = Identity(NodeKey.from_seed(b"\x0a" * 32), ClusterSecret(b"the cluster's join secret, 32 by"))
PEER = "b" * 64


class RecordingSignal:
    """A signal channel that is up and records the calls made on it (none, when the gate refuses)."""

    up = True
    addr = ("127.0.0.1", 7070)

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def call(self, method: str, params: dict[str, Any], timeout: float) -> dict[str, Any]:
        self.calls.append(method)
        raise RpcError(ErrorCode.UNREACHABLE, "not in this test")


def nat(kind: NatType) -> udp_punch.NatGetter:
    status = NatStatus(state="done", nat_type=kind, server=("127.0.0.1", 3478))
    return lambda: status


def test_gate_admits_up_to_its_limit() -> None:
    gate = udp_punch.BirthdayGate(1)
    assert gate.try_enter()
    assert not gate.try_enter()
    gate.leave()
    assert gate.try_enter()


@pytest.mark.parametrize(
    ("own", "asker", "refused"),
    [
        (NatType.SYMMETRIC, "port-restricted-cone", True),  # we would be the hard side: refused
        (NatType.PORT_RESTRICTED_CONE, "symmetric", True),  # we would spray: refused
        (NatType.PORT_RESTRICTED_CONE, "port-restricted-cone", False),  # a plain punch is cheap: not gated
    ],
)
def test_answer_refuses_a_birthday_punch_while_the_gate_is_full(own: NatType, asker: str, refused: bool) -> None:
    signal = RecordingSignal()
    gate = udp_punch.BirthdayGate(1)
    assert gate.try_enter()  # one punch under way

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            conn = await udp_punch.answer(
                ME,
                signal,  # type: ignore[arg-type]
                {
                    "from": PEER,
                    "artifact_id": "a" * 64,
                    "rendezvous": "00" * 8,
                    "addr": ["127.0.0.2", 4000],
                    "nat": asker,
                },
                nat=nat(own),
                nursery=nursery,
                credentials=None,  # type: ignore[arg-type]
                rendezvous_timeout=1.0,
                timeout=1.0,
                handshake_timeout=1.0,
                serves=lambda aid: True,
                gate=gate,
            )
            assert conn is None

    trio.run(main)
    assert signal.calls == ([] if refused else ["udp_punch_answer"])
    assert gate.running == 1  # a refused or failed answer leaves the place of the punch under way alone


class AnsweringSignal(RecordingSignal):
    """The tracker answers the rendezvous: the peer is of NAT type `peer_nat`."""

    def __init__(self, peer_nat: str) -> None:
        super().__init__()
        self.peer_nat = peer_nat

    async def call(self, method: str, params: dict[str, Any], timeout: float) -> dict[str, Any]:
        self.calls.append(method)
        return {"addr": ["127.0.0.2", 4000], "nat": self.peer_nat, "rendezvous": "00" * 8}


@pytest.mark.parametrize(
    ("peer_nat", "error"),
    [
        ("port-restricted-cone", "birthday punch"),  # we would be the hard side: refused before the 256 sockets
        ("symmetric", "no UDP path"),  # no punch at all: the gate is not asked (no place taken for nothing)
    ],
)
def test_a_symmetric_node_does_not_start_a_second_punch(
    peer_nat: str, error: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    signal = AnsweringSignal(peer_nat)
    gate = udp_punch.BirthdayGate(1)
    assert gate.try_enter()
    grown: list[int] = []

    opened = udp_punch.PunchSockets.grow

    async def grow(self: udp_punch.PunchSockets, count: int) -> None:
        if count > 1:
            grown.append(count)
        await opened(self, count)

    monkeypatch.setattr(udp_punch.PunchSockets, "grow", grow)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            connector = udp_punch.UdpPunchConnector(
                ME,
                signal,  # type: ignore[arg-type]
                nat=nat(NatType.SYMMETRIC),
                nursery=lambda: nursery,
                rendezvous_timeout=1.0,
                timeout=1.0,
                handshake_timeout=1.0,
                gate=gate,
            )
            with pytest.raises(ConnectError, match=error):
                await connector.connect(PEER, ("127.0.0.2", 7700), "a" * 64)

    trio.run(main)
    assert signal.calls == ["udp_punch"]
    assert grown == []  # neither refused nor hopeless punches open the hard side's sockets
    assert gate.running == 1  # the punch under way keeps its place; a refused connect took none


async def test_probes_count_as_own_traffic_with_their_headers() -> None:
    """A probe is 28 bytes, its headers 42 more: counting only the payload, a spray read as another service's
    traffic to auto-throttling, and a cone yielded its upload while it sprayed (the NAT swarm)."""
    probe = up.encode(up.Kind.PROBE, b"r" * up.RID_SIZE, "c" * 64)
    rx = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await rx.bind(("127.0.0.1", 0))
    sent0 = TRAFFIC.sent
    async with udp_punch.PunchSockets(socket.AF_INET, 2) as socks:
        socks.send_now(socks.socks[0], probe, rx.getsockname())
        await udp_punch._send(socks.socks[1], probe, rx.getsockname())
    rx.close()
    assert TRAFFIC.sent - sent0 == 2 * (up.PROBE_SIZE + 42)
