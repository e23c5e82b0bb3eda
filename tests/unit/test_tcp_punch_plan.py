"""The TCP birthday punch's roles (p2pd/protocol/tcp_punch.py): only a cone and a symmetric NAT take them; and
the SYNs its sockets put on the wire, which auto-throttling must be told of."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import trio
import trio.testing

from p2pd.protocol.nat import NatType
from p2pd.protocol.tcp_punch import CONES, HARD_SOCKETS, SPRAY_PROBES, SYN_RTO, SYN_WIRE, Role, role, syns_sent

ALL = [t.value for t in NatType] + [""]


@pytest.mark.parametrize("cone", sorted(CONES))
def test_a_cone_and_a_symmetric_nat_take_opposite_roles(cone: str) -> None:
    assert role("symmetric", cone) is Role.HARD
    assert role(cone, "symmetric") is Role.EASY


@pytest.mark.parametrize("own", ALL)
@pytest.mark.parametrize("peer", ALL)
def test_every_other_pair_punches_plain(own: str, peer: str) -> None:
    """Never towards a public or unclassified peer (sprayed SYNs at a public host could reach whatever else it
    runs), never between two symmetric NATs (the relay's), and never without both types (an older peer)."""
    if {own, peer} & {"symmetric"} and ({own, peer} - {"symmetric"}) <= CONES and own != peer:
        return  # the roles above
    assert role(own, peer) is Role.PLAIN


def test_both_sides_of_a_pair_agree_that_exactly_one_sprays() -> None:
    for own in ALL:
        for peer in ALL:
            mine, theirs = role(own, peer), role(peer, own)
            assert (mine is Role.EASY) == (theirs is Role.HARD), (own, peer)


def test_a_birthday_punch_takes_a_place_in_the_nodes_gate_and_a_plain_one_none() -> None:
    """A TCP birthday punch holds hundreds to thousands of sockets for a second: with the node's gate full,
    one more fails at once instead of opening its sockets; a plain punch takes no place."""
    from p2pd.connections import ConnectError
    from p2pd.traversal import birthday_place
    from p2pd.udp_punch import BirthdayGate

    gate = BirthdayGate(1)
    with birthday_place(Role.HARD, gate):
        assert gate.running == 1
        with pytest.raises(ConnectError, match="under way already"), birthday_place(Role.EASY, gate):
            pass
        with birthday_place(Role.PLAIN, gate):
            assert gate.running == 1
    assert gate.running == 0
    with pytest.raises(RuntimeError), birthday_place(Role.EASY, gate):
        assert gate.running == 1
        raise RuntimeError("the punch failed")
    assert gate.running == 0  # freed on failure too


class _DroppedSocket:
    """A TCP socket whose SYNs the NATs drop: its connect never completes (the kernel would resend the SYN)."""

    def __init__(self, log: list[_DroppedSocket]) -> None:
        self.connect_at: float | None = None
        self.closed_at: float | None = None
        self.port = 0
        log.append(self)

    def setsockopt(self, *args: object) -> None:
        pass

    async def bind(self, addr: tuple[str, int]) -> None:
        self.port = addr[1] or 40000

    def listen(self, backlog: int) -> None:
        pass

    def getsockname(self) -> tuple[str, int]:
        return ("0.0.0.0", self.port)

    async def accept(self) -> tuple[object, tuple[str, int]]:
        await trio.sleep_forever()
        raise AssertionError

    async def connect(self, addr: tuple[str, int]) -> None:
        self.connect_at = trio.current_time()
        await trio.sleep_forever()

    def close(self) -> None:
        if self.closed_at is None:
            self.closed_at = trio.current_time()


class _Factory(trio.abc.SocketFactory):
    def __init__(self) -> None:
        self.made: list[_DroppedSocket] = []

    def socket(self, family: int | None = None, type: int | None = None, proto: int | None = None) -> Any:  # noqa: A002
        return _DroppedSocket(self.made)


async def _punch_counting(role_: Role, timeout: float) -> tuple[int, list[_DroppedSocket]]:
    from p2pd.stream_io import TRAFFIC
    from p2pd.traversal import PunchFailed, PunchPort

    factory = _Factory()
    trio.socket.set_custom_socket_factory(factory)
    before = TRAFFIC.sent
    async with PunchPort(socket.AF_INET) as port:
        with pytest.raises(PunchFailed):
            await port.connect_to(("198.18.0.9", 40001), timeout, role_)
    return TRAFFIC.sent - before, factory.made


async def test_a_hard_side_counts_the_syns_the_kernel_sends_again(autojump_clock: trio.testing.MockClock) -> None:
    """Auto-throttling reads every byte on the wire it was not told of as another service's: the 256 birthday
    sockets and the plain dial of a 3.5 s punch whose SYNs the NATs drop each put a SYN out at 0, 1 and 3 s."""
    sent, _ = await _punch_counting(Role.HARD, 3.5)
    assert sent == (HARD_SOCKETS + 1) * 3 * SYN_WIRE[4]
    assert [syns_sent(t) for t in (0.0, 0.99, 1.0, 2.99, 3.0, 6.99, 7.0)] == [1, 1, 2, 2, 3, 3, 4]


async def test_a_sprayed_probe_closes_before_its_syn_is_sent_again(autojump_clock: trio.testing.MockClock) -> None:
    """Each probe of the easy side is one SYN on the wire, counted once; only the plain dial waits long enough
    for the kernel to send its SYN again (at 1 s of the 2.5 s punch)."""
    sent, made = await _punch_counting(Role.EASY, 2.5)
    probes = [s for s in made if s.connect_at is not None][1:]  # the first: the plain dial from the punch port
    assert len(probes) == SPRAY_PROBES
    held = [s.closed_at - s.connect_at for s in probes if s.closed_at is not None and s.connect_at is not None]
    assert len(held) == SPRAY_PROBES and max(held) < SYN_RTO
    assert sent == (SPRAY_PROBES + 2) * SYN_WIRE[4]
