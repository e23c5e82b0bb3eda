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
    have = {"a": 0, "b": mask(range(PIECES - TAIL + 1, PIECES)), "c": 0}
    assert not s.defer_request(5, "a", have, complete=True)
    s.sent(5)
    # Asked by anyone else, even by a requester in its tail: the copy would cost the bottleneck.
    assert s.defer_request(5, "b", have, complete=True)
    assert s.defer_request(5, "c", have, complete=True)
    assert not s.defer_request(6, "b", have, complete=True)  # a piece never sent is always served
    assert s.pieces_deferred == 2


def test_a_requester_lacking_a_piece_never_sent_is_sent_away_every_time() -> None:
    """It has something better to ask us for: asked again before the first copy's holder announced it (after
    `defer_retry`), a once-only deferral let the seed send the copy after all (100 of 612 seed uploads in the
    emulated 1 + 32)."""
    s = policy()
    have = {"a": 0, "b": 0}
    s.sent(5)
    for _ in range(3):
        assert s.defer_request(5, "b", have, complete=True)
        assert s.defer_send(5, "b", have["b"], complete=True)
    for i in range(PIECES):
        s.sent(i)
    have["h"] = mask({5})
    assert not s.defer_request(5, "b", have, complete=True)  # every piece went out: the once rule again
    assert s.pieces_sent_again == 1


def test_a_requester_holding_every_piece_never_sent_is_served_when_it_asks_again() -> None:
    """Another seed sent it those pieces: it may have no one else to ask for this one (its holder left), so the
    once rule applies, or it would wait until this seed had sent every piece once."""
    s = policy()
    s.sent(5)
    others = FULL & ~mask({5})  # every piece but 5, from another seed
    have = {"a": 0, "b": others}
    assert s.defer_request(5, "b", have, complete=True)
    assert not s.defer_request(5, "b", have, complete=True)
    assert not s.defer_send(5, "b", others, complete=True)
    assert s.defer_send(5, "a", 0, complete=True)  # a lacks pieces never sent: sent away, also at send time
    assert s.defer_send(5, "a", 0, complete=True)


def test_the_check_is_repeated_when_the_piece_is_about_to_be_sent() -> None:
    """Two peers asking for the same unsent piece: both requests are accepted, one copy goes out."""
    s = policy()
    have = {"a": 0, "b": 0}
    assert not s.defer_request(9, "a", have, complete=True) and not s.defer_request(9, "b", have, complete=True)
    assert not s.defer_send(9, "a", 0, complete=True)
    s.sent(9)
    assert s.defer_send(9, "b", 0, complete=True)  # b's turn comes: DEFER instead of a second copy


def test_once_everything_was_sent_copies_follow_the_once_and_tail_rules() -> None:
    s = policy()
    for i in range(PIECES):
        s.sent(i)
    have = {"h": mask({3}), "a": 0, "t": mask(set(range(PIECES)) - {3, 4})}
    assert s.defer_request(3, "a", have, complete=True)  # someone connected has it: ask them
    assert not s.defer_request(3, "a", have, complete=True)  # asked again: a found no one else, serve it
    assert not s.defer_request(3, "t", have, complete=True)  # the tail is always served
    have["h"] |= mask({4})
    assert not s.defer_request(4, "t", have, complete=True)  # announced by an incomplete peer: the tail is served
    assert s.pieces_sent == PIECES and s.pieces_sent_again == 0


def test_a_piece_sent_but_announced_by_nobody_yet_is_deferred_once_even_in_the_tail() -> None:
    """Its first copy is still on its way: a second copy now would cost the seed's uplink for nothing."""
    s = policy()
    for i in range(PIECES):
        s.sent(i)
    have = {"h": mask({3}), "a": 0, "t": mask(set(range(PIECES)) - {3, 4})}
    assert s.defer_request(4, "a", have, complete=True)  # sent, nobody announced it: in flight
    assert s.defer_request(4, "t", have, complete=True)  # also in the tail
    assert not s.defer_request(4, "t", have, complete=True)  # asked again: its holder left, serve it
    assert not s.defer_request(4, "a", have, complete=True)
    fresh = policy()
    assert not fresh.defer_request(4, "a", have, complete=True)  # never sent: nothing in flight


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
    assert not s.defer_send(1, "a", 0, complete=False)
    off = policy(enabled=False)
    off.sent(1)
    assert not off.defer_request(1, "a", {"a": 0, "b": 0}, complete=True)
    assert not off.defer_send(1, "a", 0, complete=True)


@given(
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=2), st.integers(min_value=0, max_value=PIECES - 1)), max_size=300
    ),
    st.integers(min_value=0, max_value=FULL),
)
def test_a_second_copy_before_every_piece_went_out_only_goes_to_a_requester_with_no_one_else(
    requests: list[tuple[int, int]], from_elsewhere: int
) -> None:
    """Whatever the order of requests from three leechers (c holding some pieces another seed sent): while some
    piece was never sent, a piece goes out again only to a requester that holds every piece never sent and was
    told DEFER for it before (it found no one else)."""
    s = policy()
    sent: set[int] = set()
    deferred: set[tuple[str, int]] = set()
    have = {"a": 0, "b": 0, "c": from_elsewhere}
    uploads = 0
    for who, piece in requests:
        requester = "abc"[who]
        has = have[requester]
        if s.defer_request(piece, requester, have, complete=True) or s.defer_send(piece, requester, has, complete=True):
            deferred.add((requester, piece))
            continue
        if piece in sent and len(sent) < PIECES:
            assert (requester, piece) in deferred
            assert mask(set(range(PIECES)) - sent) & ~has == 0  # it holds every piece never sent
        s.sent(piece)
        sent.add(piece)
        uploads += 1
        have[requester] |= 1 << piece
    assert s.pieces_sent == uploads
    assert s.pieces_sent_again == uploads - len(sent)


def test_upload_slots_defer_a_new_requester_while_every_slot_is_busy() -> None:
    s = DistinctFirstSeeding[str](PIECES, serve_tail=TAIL, upload_slots=2, slots_min_peers=3)
    assert not s.slots_busy("a", [], peers=3)
    assert not s.slots_busy("b", ["a"], peers=3)
    assert s.slots_busy("c", ["a", "b"], peers=3)  # both slots busy
    assert s.slots_busy("c", ["a", "b"], peers=3)  # and again: not once-only
    assert not s.slots_busy("a", ["a", "b"], peers=3)  # a holds a slot already
    assert not s.slots_busy("c", ["a"], peers=3)  # a slot came free
    assert (s.pieces_deferred, s.slot_deferrals) == (2, 2)


def test_upload_slots_apply_only_from_slots_min_peers_connections() -> None:
    """A small swarm (the 1 + 8) has few requesters per node: sharing the uplink costs it nothing."""
    s = DistinctFirstSeeding[str](PIECES, upload_slots=2, slots_min_peers=16)
    assert not s.slots_busy("c", ["a", "b"], peers=15)
    assert s.slots_busy("c", ["a", "b"], peers=16)


def test_no_upload_slots_means_no_cap() -> None:
    s = DistinctFirstSeeding[str](PIECES, serve_tail=TAIL)
    assert not any(s.slots_busy(p, "abcdefg", peers=100) for p in "abcdefgh")


@given(
    slots=st.integers(1, 6),
    arrivals=st.lists(st.tuples(st.integers(0, 9), st.booleans()), max_size=60),
)
def test_upload_slots_never_let_more_peers_be_served_at_once(slots: int, arrivals: list[tuple[int, bool]]) -> None:
    """Whatever the order of requests and finished uploads, at most `slots` peers are being served, and a
    requester is deferred only while every slot is taken by others."""
    s = DistinctFirstSeeding[int](PIECES, serve_tail=0, upload_slots=slots)
    serving: set[int] = set()
    for peer, finish in arrivals:
        if finish:
            serving.discard(peer)
            continue
        busy = s.slots_busy(peer, serving, peers=10)
        assert busy == (peer not in serving and len(serving) >= slots)
        if not busy:
            serving.add(peer)
        assert len(serving) <= slots


# --------------------------------------------------------------------------------- peers with few fast paths
def few_paths_policy(on: bool = True) -> DistinctFirstSeeding[str]:
    return DistinctFirstSeeding(PIECES, serve_tail=TAIL, few_paths_first=on)


def test_a_peer_with_few_fast_paths_waiting_gets_the_uplink() -> None:
    """A symmetric peer waits on this uplink: a cone asking for a piece another cone holds is sent there,
    once; a piece only we, the complete seed or a symmetric peer hold is served (the cone needs us for it)."""
    s = few_paths_policy()
    few = {"sym"}
    have = {"c1": 0, "c2": mask({5, 9}), "seed": FULL, "sym": mask({7}), "pub": mask({9})}
    assert s.leave_to_few_paths(5, "c1", have, few, waiting=True)
    assert not s.leave_to_few_paths(5, "c1", have, few, waiting=True)  # asked again: nobody else gave it
    assert s.leave_to_few_paths(5, "pub", have, few, waiting=True)  # another requester: its own once
    assert not s.leave_to_few_paths(6, "c1", have, few, waiting=True)  # only the complete seed has it
    assert not s.leave_to_few_paths(7, "c1", have, few, waiting=True)  # only the symmetric peer has it
    assert not s.leave_to_few_paths(8, "c1", have, few, waiting=True)  # nobody else has it
    assert not s.leave_to_few_paths(9, "c1", have, few, waiting=False)  # no such peer waits here now
    assert not s.leave_to_few_paths(9, "sym", have | {"sym2": 0}, few | {"sym2"}, waiting=True)  # never them
    assert (s.pieces_deferred, s.few_paths_deferrals) == (2, 2)


def test_a_piece_served_to_one_cone_is_not_served_to_the_next_while_a_symmetric_peer_waits() -> None:
    """Two cones asking a public peer for the same piece before either announced it: the second fetches it
    from the first over their punched path, and the public peer's uplink goes to the symmetric peer."""
    s = few_paths_policy()
    few = {"sym"}
    have = {"c1": 0, "c2": 0, "sym": 0}
    assert not s.leave_to_few_paths(3, "c1", have, few, waiting=True)  # only we have it: served
    assert not s.leave_to_few_paths(3, "c1", have, few, waiting=True)  # the same requester again: served
    assert s.leave_to_few_paths(3, "c2", have, few, waiting=True)  # c1 will have it
    assert not s.leave_to_few_paths(3, "c2", have, few, waiting=True)  # asked again: served
    assert not s.leave_to_few_paths(4, "c1", have, few, waiting=False)
    assert not s.leave_to_few_paths(4, "c2", have, few, waiting=False)  # nobody waits: served to both
    assert s.few_paths_deferrals == 1


def test_the_tail_and_a_swarm_without_few_path_peers_are_served() -> None:
    """A requester missing at most `serve_tail` pieces is always served; off, or with no such peer (the
    1 + 8 without NAT), nothing is deferred."""
    s = few_paths_policy()
    tail = mask(range(PIECES - TAIL, PIECES)) ^ FULL  # missing exactly TAIL pieces
    have = {"c1": tail, "c2": mask({1, PIECES - 1}), "sym": 0}
    assert not s.leave_to_few_paths(PIECES - 1, "c1", have, {"sym"}, waiting=True)
    have = {"c1": 0, "c2": mask({1}), "sym": 0}
    assert not s.leave_to_few_paths(1, "c1", have, (), waiting=False)
    off = few_paths_policy(False)
    assert not off.leave_to_few_paths(1, "c1", have, {"sym"}, waiting=True)
    assert s.pieces_deferred == off.pieces_deferred == 0


@given(
    holders=st.lists(st.tuples(st.sampled_from(["c1", "c2", "c3", "sym", "seed"]), st.integers(0, PIECES - 1))),
    asks=st.lists(st.tuples(st.sampled_from(["c1", "c2", "sym"]), st.integers(0, PIECES - 1), st.booleans())),
)
def test_few_paths_deferrals_only_to_another_incomplete_holder_once(
    holders: list[tuple[str, int]], asks: list[tuple[str, int, bool]]
) -> None:
    """Whatever the holdings and the order: a deferral needs a waiting symmetric peer and another incomplete,
    non-symmetric holder (or the piece served to another such requester before), never hits a symmetric
    requester, and never twice for one requester and piece."""
    s = few_paths_policy()
    have = {"c1": 0, "c2": 0, "c3": 0, "sym": 0, "seed": FULL}
    for p, i in holders:
        if p != "seed":
            have[p] |= 1 << i
    deferred: set[tuple[str, int]] = set()
    served: dict[int, str] = {}  # piece -> the first cone it was served to
    for requester, piece, waiting in asks:
        d = s.leave_to_few_paths(piece, requester, have, {"sym"}, waiting=waiting)
        if d:
            assert waiting and requester != "sym" and (requester, piece) not in deferred
            held = any(have[p] >> piece & 1 for p in ("c1", "c2", "c3") if p != requester)
            assert held or served.get(piece, requester) != requester
            deferred.add((requester, piece))
        elif requester != "sym":
            served.setdefault(piece, requester)
    assert s.few_paths_deferrals == len(deferred)


def test_a_complete_node_does_not_send_a_peer_with_few_paths_to_the_other_holders() -> None:
    """The other holders are mostly cones a symmetric peer reaches only by a UDP punch or the relay: a complete
    public peer serves it instead of sending it there (and waiting `defer_retry` per piece); the seed's
    rules (no second copy while a piece was never sent) still hold for it."""
    have = {"sym": 0, "c1": mask({2, 5}), "c2": 0}
    s = few_paths_policy()
    assert not s.defer_request(5, "sym", have, complete=True, few_paths=True)
    assert s.defer_request(5, "c2", have, complete=True)  # a cone still fetches it from c1
    s.sent(7)
    assert s.defer_request(7, "sym", have, complete=True, few_paths=True)  # a second copy while some never went
    off = few_paths_policy(False)
    assert off.defer_request(2, "sym", have, complete=True, few_paths=True)
