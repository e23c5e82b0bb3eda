"""The chain schedule: its order (p2pd/protocol/chain.py) and the picker's rule 8 (p2pd/protocol/picker.py)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from p2pd.protocol.chain import predecessor
from p2pd.protocol.picker import Picker

NODE_IDS = st.text(alphabet="0123456789abcdef", min_size=4, max_size=4)


# ------------------------------------------------------------------------------------------ the order
def test_each_node_follows_the_one_before_it_by_id_and_the_first_wraps_round() -> None:
    listed = {"s": 1.0, "b": 0.2, "d": 0.0}
    assert predecessor("c", listed) == "b"
    assert predecessor("b", listed) == "s"  # the first by id follows the last
    assert predecessor("t", listed) == "s"


def test_a_node_that_completes_keeps_its_place() -> None:
    before = predecessor("c", {"s": 1.0, "a": 0.1, "b": 0.5})
    after = predecessor("c", {"s": 1.0, "a": 1.0, "b": 1.0})
    assert before == after == "b"


def test_no_chain_until_a_complete_node_is_listed() -> None:
    assert predecessor("a", {}) is None
    assert predecessor("a", {"b": 0.5, "a": 1.0}) is None  # a stale entry of our own does not count


@given(
    st.dictionaries(NODE_IDS, st.sampled_from([0.0, 0.3, 1.0]), min_size=1, max_size=30).filter(
        lambda d: any(v >= 1.0 for v in d.values())
    )
)
def test_the_fetching_nodes_form_chains_each_headed_by_a_complete_node(progress: dict[str, float]) -> None:
    """Every node that agrees on the list finds a different predecessor, and following predecessors from any
    fetching node ends at a complete one: no loops, no node fed twice, one chain per complete node at most."""
    fetching = [n for n, v in progress.items() if v < 1.0]
    preds = {n: predecessor(n, {k: v for k, v in progress.items() if k != n}) for n in fetching}
    assert len(set(preds.values())) == len(fetching)
    for n in fetching:
        seen = set()
        while progress.get(n, 0.0) < 1.0:
            assert n not in seen
            seen.add(n)
            nxt = preds[n]
            assert nxt is not None
            n = nxt
    tails = [n for n in fetching if n not in preds.values()]
    assert len(tails) <= sum(v >= 1.0 for v in progress.values())


# ------------------------------------------------------------------------------------------ rule 8
def chain_picker(n: int = 16) -> Picker[Any]:
    p: Picker[Any] = Picker(n, seed=1)
    p.add_peer("pred", [0])  # it has announced only piece 0 so far
    p.add_peer("other", range(n))
    p.chain_source = "pred"
    return p


def test_the_source_is_asked_in_order_ahead_of_its_announcements() -> None:
    p = chain_picker()
    assert [p.next_request("pred") for _ in range(4)] == [0, 1, 2, 3]


def test_no_one_else_is_asked_while_there_is_a_source() -> None:
    p = chain_picker()
    assert p.next_request("other") is None


def test_pieces_held_or_in_flight_are_skipped() -> None:
    p = chain_picker()
    assert p.next_request("pred") == 0
    p.piece_verified(0)
    p.missing &= ~(1 << p.pos[2])  # piece 2 arrived from elsewhere (before the chain formed)
    assert [p.next_request("pred") for _ in range(2)] == [1, 3]


def test_a_piece_the_source_deferred_is_asked_of_it_after_the_others() -> None:
    p = chain_picker()
    assert p.next_request("pred") == 0
    p.defer("pred", 0)  # a seed defers a piece it sent to another node first
    assert p.next_request("pred") == 1
    p.undefer_all()
    assert p.next_request("pred") == 0


def test_the_swarms_rules_return_when_the_source_goes() -> None:
    p = chain_picker()
    assert p.next_request("pred") == 0
    assert p.remove_peer("pred") == [0]
    assert p.chain_source is None
    assert p.next_request("other") is not None  # rarest first again, from anyone


def test_requests_withdrawn_from_a_former_source_are_asked_of_the_next() -> None:
    p = chain_picker()
    assert [p.next_request("pred") for _ in range(3)] == [0, 1, 2]
    assert p.withdraw("pred") == [0, 1, 2]
    assert p.outstanding("pred") == 0
    p.chain_source = "other"
    assert p.next_request("other") == 0
    assert p.arrived("pred", 1).value == "late"  # a copy that was already on its way is dropped, not an error


def test_a_piece_lost_on_disk_is_asked_again() -> None:
    p = chain_picker()
    for i in range(3):
        assert p.next_request("pred") == i
        p.piece_verified(i)
    p.piece_lost(1)  # it failed verification on disk: the chain's order must come back for it
    assert p.next_request("pred") == 1
