"""The seed policy: a complete node sends every piece once before it sends any piece twice.

Duplicate uploads from the seed are what keeps a swarm above the Kumar–Ross bound, so each rule
here is one that a benchmark ratio depends on.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from p2pd.protocol.seeding import DistinctFirstSeeding

PIECES = 64
TAIL = 16
FULL = (1 << PIECES) - 1


def mask(pieces: set[int] | range) -> int:
    return sum(1 << i for i in pieces)


def policy(enabled: bool = True) -> DistinctFirstSeeding[str]:
    return DistinctFirstSeeding(PIECES, enabled=enabled, serve_tail=TAIL)


def test_seed_never_sends_a_second_copy_while_some_piece_was_never_sent() -> None:
    s = policy()
    have = {"a": 0, "b": mask(range(PIECES - TAIL + 1, PIECES))}
    assert not s.defer_request(5, "a", have, complete=True)
    s.sent(5)
    # Asked again, by anyone, even by a requester in its tail: the copy would cost the bottleneck.
    assert s.defer_request(5, "b", have, complete=True)
    assert s.defer_request(5, "b", have, complete=True)
    assert s.defer_request(5, "a", have, complete=True)
    assert not s.defer_request(6, "b", have, complete=True)  # a piece never sent is always served
    assert s.pieces_deferred == 3


def test_the_check_is_repeated_when_the_piece_is_about_to_be_sent() -> None:
    """Two peers asking for the same unsent piece: both requests are accepted, one copy goes out."""
    s = policy()
    have = {"a": 0, "b": 0}
    assert not s.defer_request(9, "a", have, complete=True) and not s.defer_request(9, "b", have, complete=True)
    assert not s.defer_send(9, complete=True)
    s.sent(9)
    assert s.defer_send(9, complete=True)  # b's turn comes: DEFER instead of a second copy


def test_once_everything_was_sent_copies_follow_the_once_and_tail_rules() -> None:
    s = policy()
    for i in range(PIECES):
        s.sent(i)
    have = {"h": mask({3}), "a": 0, "t": mask(set(range(PIECES)) - {3, 4})}
    assert s.defer_request(3, "a", have, complete=True)  # someone connected has it: ask them
    assert not s.defer_request(3, "a", have, complete=True)  # asked again: a found no one else, serve it
    assert not s.defer_request(3, "t", have, complete=True)  # the tail is always served
    assert not s.defer_request(4, "a", have, complete=True)  # nobody else has it
    assert s.pieces_sent == PIECES and s.pieces_sent_again == 0


def test_the_once_rule_starts_over_for_a_peer_that_reconnects() -> None:
    s = policy()
    for i in range(PIECES):
        s.sent(i)
    have = {"h": mask({3}), "a": 0}
    assert s.defer_request(3, "a", have, complete=True)
    s.forget("a")
    assert s.defer_request(3, "a", have, complete=True)


def test_never_defer_to_another_complete_node() -> None:
    s = policy()
    for i in range(PIECES):
        s.sent(i)
    assert not s.defer_request(7, "a", {"s2": FULL, "a": 0}, complete=True)


def test_one_peer_an_incomplete_node_or_the_policy_off_serve_everything() -> None:
    s = policy()
    s.sent(1)
    assert not s.defer_request(1, "a", {"a": 0}, complete=True)  # the only peer: nobody else to ask
    assert not s.defer_request(1, "a", {"a": 0, "b": 0}, complete=False)  # not a seed: no policy
    assert not s.defer_send(1, complete=False)
    off = policy(enabled=False)
    off.sent(1)
    assert not off.defer_request(1, "a", {"a": 0, "b": 0}, complete=True)
    assert not off.defer_send(1, complete=True)


@given(st.lists(st.integers(min_value=0, max_value=PIECES - 1), max_size=300))
def test_no_piece_goes_out_twice_before_every_piece_went_out_once(requests: list[int]) -> None:
    """Whatever the order of requests from two leechers, a seed following the policy sends distinct pieces."""
    s = policy()
    sent: list[int] = []
    have = {"a": 0, "b": 0}
    for k, piece in enumerate(requests):
        requester = "ab"[k % 2]
        if s.defer_request(piece, requester, have, complete=True) or s.defer_send(piece, complete=True):
            continue
        s.sent(piece)
        sent.append(piece)
        have[requester] |= 1 << piece
    first_repeat = next((k for k, p in enumerate(sent) if p in sent[:k]), None)
    if first_repeat is not None:
        assert len(set(sent[:first_repeat])) == PIECES
    assert s.pieces_sent == len(sent)
    assert s.pieces_sent_again == len(sent) - len(set(sent))
