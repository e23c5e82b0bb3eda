"""The TCP birthday punch's roles (p2pd/protocol/tcp_punch.py): only a cone and a symmetric NAT take them."""

from __future__ import annotations

import pytest

from p2pd.protocol.nat import NatType
from p2pd.protocol.tcp_punch import CONES, Role, role

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
