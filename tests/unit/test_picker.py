"""Piece picker (p2pd/protocol/picker.py): random first order, rarest-first, endgame, safety invariants."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from p2pd.protocol.bitfield import indices
from p2pd.protocol.picker import Arrival, Picker, zone_stripe
from tests.unit._util import QUICK

T = TypeVar("T")


# ------------------------------------------------------------------------------------------ random order
def test_first_requests_of_different_nodes_differ() -> None:
    firsts = []
    for seed in range(20):
        p: Picker[Any] = Picker(256, seed=seed)
        p.add_peer("seed", range(256))
        firsts.append(p.next_request("seed"))
    assert len(set(firsts)) >= 17  # 20 draws from 256: ~0.7 collisions expected


def test_first_wave_spreads_over_the_seed() -> None:
    asked: list[int] = []
    for seed in range(20):
        p: Picker[Any] = Picker(256, seed=1000 + seed)
        p.add_peer("seed", range(256))
        asked += [p.next_request("seed") for _ in range(8)]  # type: ignore[misc]
    # 160 uniformly random requests cover ~1-e^(-160/256) = 46% of 256 pieces (~119); a shared order would give 8.
    assert len(set(asked)) >= 95


def test_unseeded_pickers_use_different_orders() -> None:
    orders = {tuple(Picker(64).perm) for _ in range(5)}
    assert len(orders) == 5


def test_same_seed_same_order_and_perm_is_a_permutation() -> None:
    a: Picker[str] = Picker(100, seed=7)
    b: Picker[str] = Picker(100, seed=7)
    assert a.perm == b.perm
    assert sorted(a.perm) == list(range(100))
    assert all(a.perm[a.pos[p]] == p for p in range(100))


def test_full_seed_is_drained_in_permutation_order() -> None:
    p: Picker[Any] = Picker(50, seed=3)
    p.add_peer("s", range(50))
    got = [p.next_request("s") for _ in range(50)]
    assert got == p.perm
    assert p.next_request("s") is None  # endgame duplicates go to other peers, never to the one already asked


def test_single_peer_is_never_asked_twice_for_a_piece() -> None:
    p: Picker[Any] = Picker(10, seed=3)
    p.add_peer("s", range(10))
    got = [p.next_request("s") for _ in range(10)]
    assert sorted(got) == list(range(10))  # type: ignore[type-var]
    assert p.next_request("s") is None


# ------------------------------------------------------------------------------------------ rarest first
@pytest.mark.parametrize("seed", range(10))
def test_rarest_first(seed: int) -> None:
    p: Picker[Any] = Picker(16, seed=seed)
    rare = 11
    p.add_peer("a", range(16))
    p.add_peer("b", [i for i in range(16) if i != rare])
    p.add_peer("c", [i for i in range(16) if i != rare])
    assert p.next_request("a") == rare
    # The next ones from "a" are all held by 3 peers; none held by fewer exists any more.
    assert p.next_request("a") != rare


def test_rarest_first_follows_haves() -> None:
    p: Picker[Any] = Picker(8, seed=1)
    for peer in "abc":
        p.add_peer(peer, [])
    for peer in "abc":
        for i in range(8):
            if i != 5 or peer == "a":
                p.peer_have(peer, i)
    assert p.next_request("a") == 5


def test_levels_prefer_two_over_three() -> None:
    rng = random.Random(0)
    for seed in range(10):
        p: Picker[Any] = Picker(30, seed=seed)
        holders = {i: rng.randint(1, 4) for i in range(30)}
        for k in range(4):
            p.add_peer(k, [i for i, h in holders.items() if h > k])
        got = [p.next_request(0) for _ in range(30)]
        counts = [holders[i] for i in got]  # type: ignore[index]
        assert counts == sorted(counts)  # non-decreasing availability


def test_never_asks_for_a_piece_we_have() -> None:
    p: Picker[Any] = Picker(10, have=[0, 1, 2, 3, 4], seed=0)
    p.add_peer("s", range(10))
    got = {p.next_request("s") for _ in range(5)}
    assert got == {5, 6, 7, 8, 9}
    assert p.next_request("s") is None
    assert p.missing_count == 5
    assert sorted(p.have_pieces()) == [0, 1, 2, 3, 4]


def test_never_asks_a_peer_without_the_piece() -> None:
    p: Picker[Any] = Picker(10, seed=0)
    p.add_peer("odd", range(1, 10, 2))
    got = [p.next_request("odd") for _ in range(5)]
    assert sorted(got) == [1, 3, 5, 7, 9]  # type: ignore[type-var]
    assert p.next_request("odd") is None
    assert not p.interesting("unknown")


def test_peer_have_reports_new_interest() -> None:
    p: Picker[Any] = Picker(4, have=[0], seed=0)
    p.add_peer("x", [])
    assert not p.interesting("x")
    assert p.peer_have("x", 0) is False  # we have it already
    assert not p.interesting("x")
    assert p.peer_have("x", 2) is True
    assert p.peer_have("x", 2) is False  # repeated HAVE
    assert p.interesting("x")
    assert p.next_request("x") == 2


def test_add_peer_twice_is_an_error() -> None:
    p: Picker[Any] = Picker(4)
    p.add_peer("x", [1])
    with pytest.raises(ValueError, match="already known"):
        p.add_peer("x", [2])


# ------------------------------------------------------------------------------------------ endgame
def test_endgame_duplicates_at_most_max_dup() -> None:
    p: Picker[Any] = Picker(2, seed=0, max_dup=2)
    for peer in "abcde":
        p.add_peer(peer, [0, 1])
    first = {p.next_request("a"), p.next_request("b")}
    assert first == {0, 1}
    dups = [p.next_request(peer) for peer in "cde"]
    # Two pieces x max_dup 2 = 4 requests in all: c and d duplicate, e gets nothing.
    assert sorted(d for d in dups if d is not None) == [0, 1]
    assert dups[2] is None
    assert all(len(asked) == 2 for asked in p.inflight.values())
    # A peer already asked for a piece is not asked for it again.
    assert p.next_request("a") is None


def test_endgame_only_when_everything_missing_is_in_flight() -> None:
    p: Picker[Any] = Picker(3, seed=0)
    p.add_peer("x", [0, 1])
    p.add_peer("y", [0, 1, 2])
    p.add_peer("z", [0, 1])
    assert p.next_request("y") == 2  # the rarest
    a, b = p.next_request("x"), p.next_request("x")
    assert {a, b} == {0, 1}
    dup = p.next_request("z")  # all three in flight: endgame
    assert dup in (0, 1)
    q: Picker[str] = Picker(3, seed=0)
    q.add_peer("x", [0, 1])
    q.add_peer("z", [0, 1])
    assert {q.next_request("x"), q.next_request("x")} == {0, 1}
    assert q.next_request("z") is None  # piece 2 missing and not requested (no one has it): no endgame


@pytest.mark.parametrize("max_dup", [1, 2, 3])
def test_max_dup(max_dup: int) -> None:
    p: Picker[Any] = Picker(1, max_dup=max_dup)
    peers = list(range(6))
    for peer in peers:
        p.add_peer(peer, [0])
    got = [p.next_request(peer) for peer in peers]
    assert got.count(0) == max_dup


def test_piece_verified_returns_other_askers_and_ends_requests() -> None:
    p: Picker[Any] = Picker(1, max_dup=3)
    for peer in "abc":
        p.add_peer(peer, [0])
        assert p.next_request(peer) == 0
    assert p.piece_verified(0) == {"a", "b", "c"}
    assert p.done and p.missing_count == 0 and p.inflight == {} and p.inflight_mask == 0
    assert p.next_request("a") is None
    p.request_failed("b", 0)  # late failure of a cancelled duplicate: harmless
    assert p.inflight == {}


# ------------------------------------------------------------------------------------------ failures
def test_remove_peer_releases_its_in_flight_pieces() -> None:
    p: Picker[Any] = Picker(6, seed=4)
    p.add_peer("a", range(6))
    p.add_peer("b", range(6))
    asked = [p.next_request("a") for _ in range(3)]
    assert sorted(p.remove_peer("a")) == sorted(asked)  # type: ignore[type-var]
    assert p.in_flight_to("a") == []
    got = {p.next_request("b") for _ in range(6)}
    assert got == set(range(6))
    assert p.avail == [1] * 6


def test_remove_full_peer_restores_levels() -> None:
    p: Picker[Any] = Picker(5, seed=0)
    p.add_peer("seed", range(5))
    p.add_peer("half", [0, 1])
    p.remove_peer("seed")
    assert p.avail == [1, 1, 0, 0, 0]
    assert p.next_request("half") in (0, 1)


def test_request_failed_makes_piece_available_elsewhere() -> None:
    p: Picker[Any] = Picker(1)
    p.add_peer("a", [0])
    p.add_peer("b", [0])
    assert p.next_request("a") == 0
    p.request_failed("a", 0)
    assert p.next_request("b") == 0


def test_request_failed_peer_lacks_stops_asking_that_peer() -> None:
    p: Picker[Any] = Picker(3, seed=0)
    p.add_peer("a", range(3))
    p.add_peer("b", [0])
    first = p.next_request("a")
    assert first is not None
    p.request_failed("a", first, peer_lacks=True)
    rest = [p.next_request("a") for _ in range(3)]
    assert first not in rest
    assert sorted(r for r in rest if r is not None) == sorted(set(range(3)) - {first})
    assert p.avail[first] == (1 if first == 0 else 0)
    # A later HAVE makes it askable again.
    assert p.peer_have("a", first) is True


def test_request_failed_for_full_peer_then_remove() -> None:
    p: Picker[Any] = Picker(4, seed=0)
    p.add_peer("seed", range(4))
    p.add_peer("other", [1])
    p.request_failed("seed", 2, peer_lacks=True)
    p.remove_peer("seed")
    assert p.avail == [0, 1, 0, 0]


# ------------------------------------------------------------------------------------------ defer
def test_defer_skips_the_piece_at_that_peer_until_undefer() -> None:
    p: Picker[Any] = Picker(3, seed=0)
    p.add_peer("seed", range(3))
    p.add_peer("other", [0, 1, 2])
    first = p.next_request("seed")
    assert first is not None
    p.defer("seed", first)
    assert p.in_flight_to("seed") == []
    rest = {p.next_request("seed"), p.next_request("seed")}
    assert rest == set(range(3)) - {first}
    assert p.next_request("seed") is None  # the deferred piece is not asked of "seed" again, even in endgame
    assert p.next_request("other") == first  # but it is free for everyone else
    assert p.undefer_all() is True
    assert p.undefer_all() is False
    p.request_failed("other", first)
    assert p.next_request("seed") == first


def test_defer_is_forgotten_with_the_peer() -> None:
    p: Picker[Any] = Picker(2, seed=0)
    p.add_peer("a", [0, 1])
    p.defer("a", 0)
    p.remove_peer("a")
    assert p.undefer_all() is False
    p.add_peer("a", [0, 1])
    assert {p.next_request("a"), p.next_request("a")} == {0, 1}


# ------------------------------------------------------------------------------------------ random operation sequences
K = st.integers(min_value=0, max_value=1 << 16)  # an arbitrary choice among whatever exists at that step


def _pick(options: Iterable[T], k: int) -> T:
    seq = sorted(options)  # type: ignore[type-var]
    return seq[k % len(seq)]


class PickerMachine(RuleBasedStateMachine):
    """Drives a Picker with random operations and checks it against a plain-set model.

    Rules take integer choices rather than drawing from hypothesis directly, so the same machine is also
    driven by a plain seeded loop (`test_random_operation_sequences`), which covers many more sequences
    per second than hypothesis' stateful engine.
    """

    @initialize(
        n=st.integers(min_value=1, max_value=20),
        seed=st.integers(min_value=0, max_value=1000),
        max_dup=st.integers(min_value=1, max_value=3),
        have_frac=st.sampled_from([0.0, 0.0, 0.0, 0.5]),
        cap=st.sampled_from([0, 0, 1, 2, 3]),
        cap_min=st.sampled_from([0, 3]),
    )
    def setup(self, n: int, seed: int, max_dup: int, have_frac: float, cap: int = 0, cap_min: int = 0) -> None:
        rng = random.Random(seed)
        self.n = n
        self.have = {i for i in range(n) if rng.random() < have_frac}
        self.picker: Picker[int] = Picker(
            n, self.have, seed=seed, max_dup=max_dup, source_cap=cap, source_cap_min_peers=cap_min
        )
        self.max_dup = max_dup
        self.cap = cap  # rule 6: peers asked at once...
        self.cap_min = cap_min  # ...with at least this many peers
        self.peers: dict[int, set[int]] = {}
        self.inflight: dict[int, set[int]] = {}
        self.deferred: dict[int, set[int]] = {}
        self.pending: dict[int, set[int]] = {}  # asked and not arrived
        self.cancelled: dict[int, set[int]] = {}  # asked, then cancelled: may still arrive
        self.rank: dict[int, int] = {}  # path rank (0 direct, higher slower)
        self.rate: dict[int, float] = {}  # measured rate, bytes/s
        self.next_peer = 0

    # -- helpers
    def _missing(self) -> set[int]:
        return set(range(self.n)) - self.have

    def _avail(self, piece: int) -> int:
        return sum(piece in s for s in self.peers.values())

    def _asked_pairs(self) -> list[tuple[int, int]]:
        return [(p, i) for i, ps in self.inflight.items() for p in ps]

    def _drop_inflight(self, peer: int, piece: int) -> None:
        self.pending.get(peer, set()).discard(piece)
        self.inflight[piece].discard(peer)
        if not self.inflight[piece]:
            del self.inflight[piece]

    # -- rules
    @rule(
        kind=st.integers(min_value=0, max_value=3),
        bits=st.integers(min_value=0, max_value=(1 << 20) - 1),
        rank=st.sampled_from([0, 0, 1, 2]),
    )
    def add_peer(self, kind: int, bits: int, rank: int = 0) -> None:
        pieces = set(range(self.n)) if kind == 0 else {i for i in range(self.n) if bits >> i & 1}
        peer = self.next_peer
        self.next_peer += 1
        self.picker.add_peer(peer, pieces, rank=rank)
        self.peers[peer] = set(pieces)
        self.rank[peer] = rank

    @precondition(lambda self: self.peers)
    @rule(k=K, rate=st.sampled_from([1.0, 5e6, 1e9]))
    def set_rate(self, k: int, rate: float) -> None:
        peer = _pick(self.peers, k)
        self.picker.set_rate(peer, rate)
        self.rate[peer] = rate

    @precondition(lambda self: self.peers)
    @rule(k=K, piece=K)
    def peer_have(self, k: int, piece: int) -> None:
        peer = _pick(self.peers, k)
        piece %= self.n
        newly = piece not in self.peers[peer]
        assert self.picker.peer_have(peer, piece) == (newly and piece not in self.have)
        self.peers[peer].add(piece)

    @precondition(lambda self: self.peers)
    @rule(k=K, times=st.integers(min_value=1, max_value=4))
    def next_request(self, k: int, times: int) -> None:
        peer = _pick(self.peers, k)
        for _ in range(times):
            self._one_request(peer)

    def _serving(self) -> set[int]:
        return {q for q, s in self.pending.items() if s}

    def _capped(self, peer: int) -> bool:
        """Rule 6, stated plainly: enough other peers serve us, they still offer a fresh piece, and this peer
        has none rarer than theirs."""
        serving = self._serving()
        if not self.cap or len(self.peers) < self.cap_min or peer in serving or len(serving) < self.cap:
            return False
        free = self._missing() - set(self.inflight)
        offered = {i for q in serving for i in self.peers[q] - self.deferred.get(q, set())} & free
        if not offered:
            return False
        mine = (self.peers[peer] - self.deferred.get(peer, set())) & free
        return not mine or min(map(self._avail, offered)) <= min(map(self._avail, mine))

    def _one_request(self, peer: int) -> None:
        if self._capped(peer):
            assert self.picker.next_request(peer) is None, "asked one more source past the cap"
            return
        has = self.peers[peer] - self.deferred.get(peer, set())
        for q, ps in self.peers.items():  # a slower path gets only what no better path gives
            if self.rank[q] < self.rank[peer]:
                has -= ps
        missing = self._missing()
        fresh = has & missing - set(self.inflight)
        endgame = not (missing - set(self.inflight))
        dup_ok = {
            i
            for i in has & missing & set(self.inflight)
            if peer not in self.inflight[i] and len(self.inflight[i]) < self.max_dup
        }
        got = self.picker.next_request(peer)
        if got is None:
            assert not fresh
            assert not (endgame and dup_ok)
            return
        assert got in self.peers[peer], "asked a peer for a piece it does not have"
        assert got in has, "asked a peer for a piece it deferred"
        assert got not in self.have, "asked for a piece we have"
        if fresh:
            assert got in fresh, "duplicated a request outside endgame"
            best = min(self._avail(i) for i in fresh)
            assert self._avail(got) == best, "not rarest-first"
            tied = [i for i in fresh if self._avail(i) == best]
            assert self.picker.pos[got] == min(self.picker.pos[i] for i in tied), "ties not in own random order"
        else:
            assert endgame, "duplicated a request outside endgame"
            assert got in dup_ok, "endgame duplicate beyond max_dup or to a peer already asked"

            def best_source(i: int) -> float:
                return max(self.rate.get(q, 0.0) for q in self.inflight[i])

            slowest = min(best_source(i) for i in dup_ok)
            assert best_source(got) == slowest, "an endgame duplicate must relieve the slowest source first"
            tied = [i for i in dup_ok if best_source(i) == slowest]
            assert self.picker.pos[got] == min(self.picker.pos[i] for i in tied), "ties not in own random order"
        self.inflight.setdefault(got, set()).add(peer)
        self.pending.setdefault(peer, set()).add(got)

    def _pending_pairs(self) -> list[tuple[int, int]]:
        return [(p, i) for p, s in self.pending.items() for i in sorted(s)]

    @precondition(lambda self: self._pending_pairs())
    @rule(k=K)
    def arrive(self, k: int) -> None:
        """A requested piece arrives whole: no longer pending, still in flight until verified."""
        peer, piece = _pick(self._pending_pairs(), k)
        assert self.picker.arrival(peer, piece) is Arrival.EXPECTED
        assert self.picker.arrived(peer, piece) is Arrival.EXPECTED
        self.pending[peer].discard(piece)

    @precondition(lambda self: any(self.cancelled.values()))
    @rule(k=K)
    def arrive_late(self, k: int) -> None:
        peer, piece = _pick([(p, i) for p, s in self.cancelled.items() for i in sorted(s)], k)
        assert self.picker.arrived(peer, piece) is Arrival.LATE
        self.cancelled[peer].discard(piece)

    @precondition(lambda self: self.inflight)
    @rule(k=K, lacks=st.booleans())
    def request_failed(self, k: int, lacks: bool) -> None:
        peer, piece = _pick(self._asked_pairs(), k)
        self.picker.request_failed(peer, piece, peer_lacks=lacks)
        self._drop_inflight(peer, piece)
        if lacks:
            self.peers[peer].discard(piece)

    @precondition(lambda self: self.inflight)
    @rule(k=K)
    def defer(self, k: int) -> None:
        peer, piece = _pick(self._asked_pairs(), k)
        self.picker.defer(peer, piece)
        self._drop_inflight(peer, piece)
        self.deferred.setdefault(peer, set()).add(piece)

    @precondition(lambda self: any(self.deferred.values()))
    @rule()
    def undefer_all(self) -> None:
        assert self.picker.undefer_all() is True
        self.deferred.clear()

    @precondition(lambda self: self.inflight)
    @rule(k=K)
    def piece_verified(self, k: int) -> None:
        piece = _pick(self.inflight, k)
        asked = self.inflight.pop(piece)
        to_cancel = {p for p in asked if piece in self.pending.get(p, set())}
        assert self.picker.piece_verified(piece) == to_cancel
        for p in to_cancel:
            self.pending[p].discard(piece)
            self.cancelled.setdefault(p, set()).add(piece)
        self.have.add(piece)

    @precondition(lambda self: self._missing() - set(self.inflight))
    @rule(k=K)
    def piece_arrived_unasked(self, k: int) -> None:
        """E.g. a duplicate whose cancel crossed it on the wire."""
        piece = _pick(self._missing() - set(self.inflight), k)
        assert self.picker.piece_verified(piece) == set()
        self.have.add(piece)

    @precondition(lambda self: self.peers)
    @rule(k=K)
    def remove_peer(self, k: int) -> None:
        peer = _pick(self.peers, k)
        expected = sorted(i for i, ps in self.inflight.items() if peer in ps)
        assert sorted(self.picker.remove_peer(peer)) == expected
        del self.peers[peer]
        del self.rank[peer]
        self.rate.pop(peer, None)
        self.deferred.pop(peer, None)
        self.cancelled.pop(peer, None)
        for i in expected:
            self._drop_inflight(peer, i)

    # -- invariants
    @invariant()
    def state_matches_model(self) -> None:
        p = self.picker
        assert {i: set(ps) for i, ps in p.inflight.items()} == self.inflight
        assert all(0 < len(ps) <= self.max_dup for ps in p.inflight.values())
        assert p.inflight_mask == p.to_mask(self.inflight)
        assert p.serving == self._serving()
        assert p.missing_count == len(self._missing())
        assert p.done == (not self._missing())
        assert sorted(p.have_pieces()) == sorted(self.have)
        assert not set(p.inflight) & self.have
        for peer in self.peers:
            assert p.interesting(peer) == bool(self.peers[peer] & self._missing())
            assert sorted(p.in_flight_to(peer)) == sorted(i for i, ps in self.inflight.items() if peer in ps)
            assert p.outstanding(peer) == len(self.pending.get(peer, ()))
            for i in range(self.n):
                want = (
                    Arrival.EXPECTED
                    if i in self.pending.get(peer, ())
                    else Arrival.LATE
                    if i in self.cancelled.get(peer, ())
                    else Arrival.UNREQUESTED
                )
                assert p.arrival(peer, i) is want

    @invariant()
    def availability_matches_model(self) -> None:
        p = self.picker
        for i in range(self.n):
            a = self._avail(i)
            assert p.avail[i] == a
            bit = 1 << p.pos[i]
            assert [lvl for lvl, m in enumerate(p.levels) if m & bit] == [a]


TestPickerMachine = PickerMachine.TestCase
TestPickerMachine.settings = settings(max_examples=20, stateful_step_count=30, deadline=None, database=None)

_RULES: list[tuple[str, Callable[[PickerMachine], bool], Callable[[random.Random], dict[str, int | bool | float]]]] = [
    (
        "add_peer",
        lambda m: len(m.peers) < 6,
        lambda r: {"kind": r.randrange(4), "bits": r.getrandbits(20), "rank": r.choice([0, 0, 1, 2])},
    ),
    ("set_rate", lambda m: bool(m.peers), lambda r: {"k": r.getrandbits(16), "rate": r.choice([1.0, 5e6, 1e9])}),
    ("peer_have", lambda m: bool(m.peers), lambda r: {"k": r.getrandbits(16), "piece": r.getrandbits(16)}),
    ("next_request", lambda m: bool(m.peers), lambda r: {"k": r.getrandbits(16), "times": r.randint(1, 4)}),
    ("next_request", lambda m: bool(m.peers), lambda r: {"k": r.getrandbits(16), "times": r.randint(1, 4)}),
    ("request_failed", lambda m: bool(m.inflight), lambda r: {"k": r.getrandbits(16), "lacks": r.random() < 0.3}),
    ("defer", lambda m: bool(m.inflight), lambda r: {"k": r.getrandbits(16)}),
    ("undefer_all", lambda m: any(m.deferred.values()), lambda r: {}),
    ("piece_verified", lambda m: bool(m.inflight), lambda r: {"k": r.getrandbits(16)}),
    ("piece_verified", lambda m: bool(m.inflight), lambda r: {"k": r.getrandbits(16)}),
    ("piece_arrived_unasked", lambda m: bool(m._missing() - set(m.inflight)), lambda r: {"k": r.getrandbits(16)}),
    ("remove_peer", lambda m: bool(m.peers), lambda r: {"k": r.getrandbits(16)}),
    ("arrive", lambda m: bool(m._pending_pairs()), lambda r: {"k": r.getrandbits(16)}),
    ("arrive", lambda m: bool(m._pending_pairs()), lambda r: {"k": r.getrandbits(16)}),
    ("arrive_late", lambda m: any(m.cancelled.values()), lambda r: {"k": r.getrandbits(16)}),
]


@pytest.mark.parametrize("block", range(4))
def test_random_operation_sequences(block: int) -> None:
    """The machine's rules and invariants over many seeded random sequences (cheap, so many of them)."""
    for seed in range(block * 100, block * 100 + 100):
        rng = random.Random(seed)
        m = PickerMachine()
        m.setup(
            n=rng.randint(1, 16),
            seed=seed,
            max_dup=rng.randint(1, 3),
            have_frac=rng.choice([0.0, 0.0, 0.5]),
            cap=rng.choice([0, 0, 1, 2, 3]),
            cap_min=rng.choice([0, 3]),
        )
        for _ in range(60):
            name, enabled, args = rng.choice([r for r in _RULES if r[1](m)])
            getattr(m, name)(**args(rng))
            m.state_matches_model()
            m.availability_matches_model()


@QUICK
@given(st.integers(min_value=1, max_value=40), st.integers(min_value=2, max_value=6), st.randoms(use_true_random=False))
def test_swarm_simulation_completes_without_duplicates_outside_endgame(n: int, npeers: int, rng: random.Random) -> None:
    """Random peers with random bitfields; serve requests in random order until done."""
    p: Picker[Any] = Picker(n, seed=rng.randrange(1 << 30), max_dup=2)
    holdings = {k: {i for i in range(n) if rng.random() < 0.5} for k in range(npeers)}
    holdings[0] = set(range(n))  # one seed so the download can complete
    for k, s in holdings.items():
        p.add_peer(k, s)
    outstanding: list[tuple[int, int]] = []
    received = 0
    for _ in range(20 * n):
        for k in holdings:
            while len([1 for peer, _ in outstanding if peer == k]) < 2:
                piece = p.next_request(k)
                if piece is None:
                    break
                assert piece in holdings[k]
                outstanding.append((k, piece))
        if not outstanding:
            break
        peer, piece = outstanding.pop(rng.randrange(len(outstanding)))
        if piece in p.inflight and peer in p.inflight[piece]:
            p.piece_verified(piece)
            received += 1
            outstanding = [(q, i) for q, i in outstanding if i != piece]  # cancelled duplicates
    assert p.done
    assert received == n


def test_cancel_all_turns_every_pending_request_into_a_late_one() -> None:
    p: Picker[Any] = Picker(8, seed=1)
    p.add_peer("a", range(8))
    asked = [p.next_request("a"), p.next_request("a")]
    assert all(i is not None for i in asked)
    assert p.cancel_all() == {"a": sorted(i for i in asked if i is not None)}
    assert p.outstanding("a") == 0 and not p.inflight and p.inflight_mask == 0
    assert all(p.arrival("a", i) is Arrival.LATE for i in asked if i is not None)


# -- paths by their speed (issue #12 item 3) ------------------------------------------------------------------
def test_a_relayed_peer_is_asked_only_for_what_no_direct_peer_has() -> None:
    p: Picker[str] = Picker(8, seed=3)
    p.add_peer("direct", range(6))
    p.add_peer("relay", range(8), rank=2)
    asked = [p.next_request("relay") for _ in range(3)]
    assert sorted(i for i in asked if i is not None) == [6, 7] and asked[2] is None


def test_a_piece_the_direct_peer_sends_us_away_for_waits_for_it_not_for_the_relay() -> None:
    """A DEFER means "someone else has it", but the deferring node cannot know that the someone else is
    reachable from here only by relay or udp-punch: the piece is asked of the direct peer again once the
    deferral expires (it serves a repeated request), never of the slower path."""
    p: Picker[str] = Picker(2, seed=3)
    p.add_peer("direct", [0, 1])
    p.add_peer("relay", [0, 1], rank=2)
    assert p.next_request("relay") is None
    i = p.next_request("direct")
    assert i is not None
    p.defer("direct", i)
    assert p.next_request("relay") is None, "a deferred piece of a better peer is not the relay's"
    other = p.next_request("direct")
    assert other == 1 - i, "the direct peer is asked for the rest meanwhile"
    assert p.next_request("direct") is None, "and not again for the deferred one before the deferral expires"
    assert p.undefer_all()
    assert p.next_request("direct") == i


def test_a_piece_only_the_relayed_peer_has_still_comes_by_relay_when_the_direct_peer_defers_others() -> None:
    p: Picker[str] = Picker(3, seed=3)
    p.add_peer("direct", [0, 1])
    p.add_peer("relay", [0, 1, 2], rank=2)
    i = p.next_request("direct")
    assert i is not None
    p.defer("direct", i)
    assert p.next_request("relay") == 2 and p.next_request("relay") is None


def test_a_relayed_peer_gets_the_pieces_of_a_direct_peer_that_left() -> None:
    p: Picker[str] = Picker(4, seed=1)
    p.add_peer("direct", range(4))
    p.add_peer("relay", range(4), rank=2)
    assert p.next_request("relay") is None
    p.remove_peer("direct")
    assert p.next_request("relay") is not None


def test_a_rank_is_relative_a_relay_among_relays_is_used() -> None:
    p: Picker[str] = Picker(4, seed=1)
    p.add_peer("r1", range(4), rank=2)
    p.add_peer("r2", range(4), rank=2)
    assert p.next_request("r1") is not None and p.next_request("r2") is not None


def test_endgame_fetches_again_first_what_waits_at_the_slowest_peer() -> None:
    p: Picker[str] = Picker(3, seed=5)
    for peer in ("slow", "mid", "fast"):
        p.add_peer(peer, range(3))
    p.set_rate("slow", 5e6)
    p.set_rate("mid", 100e6)
    p.set_rate("fast", 1e9)
    at_slow, at_mid = p.next_request("slow"), p.next_request("mid")
    other = p.next_request("mid")
    assert at_slow is not None and at_mid is not None and other is not None
    assert p.next_request("fast") == at_slow, "the piece waiting at the slow peer is duplicated first"


@QUICK
@given(st.integers(min_value=1, max_value=40), st.integers(min_value=2, max_value=6), st.randoms(use_true_random=False))
def test_with_relayed_peers_a_swarm_completes_and_relays_carry_only_what_no_direct_peer_had(
    n: int, npeers: int, rng: random.Random
) -> None:
    """Random holdings and ranks: the download completes, and a relayed peer is never asked for a piece that a
    direct peer had announced when it was asked."""
    p: Picker[Any] = Picker(n, seed=rng.randrange(1 << 30), max_dup=2)
    holdings = {k: {i for i in range(n) if rng.random() < 0.5} for k in range(npeers)}
    holdings[0] = set(range(n))  # one seed so the download can complete, on any path
    ranks = {k: rng.choice([0, 2]) for k in holdings}
    for k, s in holdings.items():
        p.add_peer(k, s, rank=ranks[k])
    outstanding: list[tuple[int, int]] = []
    for _ in range(20 * n):
        for k in holdings:
            while len([1 for peer, _ in outstanding if peer == k]) < 2:
                piece = p.next_request(k)
                if piece is None:
                    break
                assert piece in holdings[k]
                if ranks[k]:
                    assert not any(piece in holdings[q] for q in holdings if ranks[q] < ranks[k]), "relayed needlessly"
                outstanding.append((k, piece))
        if not outstanding:
            break
        peer, piece = outstanding.pop(rng.randrange(len(outstanding)))
        if piece in p.inflight and peer in p.inflight[piece]:
            p.piece_verified(piece)
            outstanding = [(q, i) for q, i in outstanding if i != piece]
    assert p.done


def test_a_last_resort_peer_waits_while_a_direct_peer_offers_anything() -> None:
    """The NAT swarm's relay share: a symmetric node fetched over the relay the pieces only cones held when the
    seed left, although its public peers held hundreds of others it needed (and got those pieces from the cones
    within a second). A last-resort peer is asked only once the direct peers offer nothing askable."""
    p: Picker[str] = Picker(8, seed=3)
    p.add_peer("direct", range(6))
    p.add_peer("relay", range(8), rank=2, last_resort=True)
    assert p.next_request("relay") is None, "the direct peer still offers pieces we miss"
    assert p.held_back == {"relay"}
    assert p.release_held_back() == [], "not while the direct peer offers anything"
    asked = [p.next_request("direct") for _ in range(6)]
    assert sorted(i for i in asked if i is not None) == list(range(6))
    assert p.release_held_back() == ["relay"], "everything the direct peer has is in flight"
    assert sorted([p.next_request("relay"), p.next_request("relay")]) == [6, 7]  # type: ignore[type-var]


def test_a_last_resort_peer_is_asked_when_the_direct_peer_defers_what_it_offered() -> None:
    p: Picker[str] = Picker(3, seed=3)
    p.add_peer("direct", [0, 1])
    p.add_peer("relay", [0, 1, 2], rank=2, last_resort=True)
    assert p.next_request("relay") is None
    for _ in range(2):
        i = p.next_request("direct")
        assert i is not None
        p.defer("direct", i)
    assert p.release_held_back() == ["relay"] and p.next_request("relay") == 2


def test_a_last_resort_peer_alone_is_asked_and_one_that_left_is_forgotten() -> None:
    p: Picker[str] = Picker(4, seed=1)
    p.add_peer("relay", range(4), rank=2, last_resort=True)
    assert p.next_request("relay") is not None, "no other peer: nothing to wait for"
    p.add_peer("direct", range(4))
    assert p.next_request("relay") is None and p.held_back == {"relay"}
    p.remove_peer("relay")
    assert not p.held_back and not p.last_resort


@QUICK
@given(st.integers(min_value=1, max_value=40), st.integers(min_value=2, max_value=6), st.randoms(use_true_random=False))
def test_with_last_resort_peers_a_swarm_completes_and_they_are_asked_only_when_the_others_offer_nothing(
    n: int, npeers: int, rng: random.Random
) -> None:
    """Random holdings, some peers last resorts, a caller that asks the held-back ones when `release_held_back`
    says so (as the daemon's fill does): the download completes, and a last-resort peer is given a fresh piece
    only while no other peer offers one that is neither in flight nor deferred there."""
    p: Picker[Any] = Picker(n, seed=rng.randrange(1 << 30), max_dup=2)
    holdings = {k: {i for i in range(n) if rng.random() < 0.5} for k in range(npeers)}
    holdings[rng.randrange(npeers)] = set(range(n))  # one seed so the download can complete, on any path
    last = {k for k in holdings if rng.random() < 0.5}
    for k, s in holdings.items():
        p.add_peer(k, s, rank=2 if k in last else 0, last_resort=k in last)
    outstanding: list[tuple[int, int]] = []
    verified: set[int] = set()
    deferred: dict[int, set[int]] = {}
    deferred_once: set[tuple[int, int]] = set()

    def ask(k: int) -> None:
        while len([1 for peer, _ in outstanding if peer == k]) < 2:
            free = set(range(n)) - verified - set(p.inflight)
            others = any(free & holdings[q] - deferred.get(q, set()) for q in holdings if q not in last)
            piece = p.next_request(k)
            if piece is None:
                break
            if k in last and p.inflight[piece] == {k}:  # a fresh piece, not an endgame duplicate
                assert not others, "a last resort was asked while another peer offered a piece"
            outstanding.append((k, piece))

    for _ in range(40 * n):
        for k in holdings:
            ask(k)
        for k in p.release_held_back():
            ask(k)
        if not outstanding:
            if p.undefer_all():  # the daemon's defer_retry
                deferred.clear()
                continue
            break
        peer, piece = outstanding.pop(rng.randrange(len(outstanding)))
        if piece in p.inflight and peer in p.inflight[piece]:
            if rng.random() < 0.1 and (peer, piece) not in deferred_once:  # a peer defers once per piece
                deferred_once.add((peer, piece))
                p.defer(peer, piece)
                deferred.setdefault(peer, set()).add(piece)
            else:
                p.piece_verified(piece)
                verified.add(piece)
                outstanding = [(q, i) for q, i in outstanding if i != piece]
    assert p.done


# ------------------------------------------------------------------------------------------ rule 6: sources at once
def test_a_capped_node_asks_no_new_peer_while_its_sources_have_more() -> None:
    p: Picker[str] = Picker(16, seed=1, source_cap=2)
    for q in "abc":
        p.add_peer(q, range(16))
    assert p.next_request("a") is not None
    assert p.next_request("b") is not None
    assert p.serving == {"a", "b"}
    assert p.next_request("c") is None  # a and b have more to give
    assert p.next_request("a") is not None  # a source is asked as before


def test_a_capped_node_still_asks_a_peer_for_a_piece_rarer_than_its_sources_offer() -> None:
    """The seed's pieces nobody else has yet (and any piece rarer than what the sources give) come first, as
    rarest-first says: a cap that left them waiting held the 200-node swarm's last piece back (p99 1.50x)."""
    p: Picker[str] = Picker(16, seed=1, source_cap=2)
    for q in "abd":
        p.add_peer(q, range(15))
    p.add_peer("c", range(16))
    assert p.next_request("a") is not None and p.next_request("b") is not None
    assert p.next_request("d") is None  # its pieces are as common as a's and b's
    assert p.next_request("c") == 15  # c alone has piece 15
    assert p.serving == {"a", "b", "c"}


def test_the_cap_lifts_when_a_source_stops_serving() -> None:
    p: Picker[str] = Picker(16, seed=1, source_cap=2)
    for q in "abc":
        p.add_peer(q, range(16))
    a = p.next_request("a")
    b = p.next_request("b")
    assert a is not None and b is not None
    assert p.next_request("c") is None
    p.defer("a", a)  # a sends us away: it no longer serves us
    assert p.serving == {"b"}
    assert p.next_request("c") is not None
    assert p.arrived("b", b) is Arrival.EXPECTED  # b's request answered: b is no longer a source either
    assert p.serving == {"c"}


def test_the_cap_lifts_while_the_sources_have_nothing_fresh_we_miss() -> None:
    p: Picker[str] = Picker(16, seed=1, source_cap=2)
    p.add_peer("a", [0, 1])
    p.add_peer("b", [2])
    p.add_peer("c", range(16))
    assert {p.next_request("a"), p.next_request("a"), p.next_request("b")} == {0, 1, 2}
    assert p.next_request("c") is not None  # a and b hold nothing more that we miss: no stall
    q: Picker[str] = Picker(16, seed=1, source_cap=1)
    q.add_peer("a", [0, 1])
    q.add_peer("c", range(16))
    x = q.next_request("a")
    assert x is not None
    q.defer("a", x)
    assert q.next_request("a") == 1 - x
    assert q.serving == {"a"}
    assert q.next_request("c") is not None  # a's other piece is deferred there: it offers nothing fresh


def test_the_cap_lifts_in_the_endgame() -> None:
    p: Picker[str] = Picker(2, seed=1, source_cap=1)
    for q in "ab":
        p.add_peer(q, range(2))
    assert p.next_request("a") is not None and p.next_request("a") is not None
    assert p.next_request("b") is not None  # every missing piece is in flight: b may duplicate one


def test_the_cap_holds_only_from_its_peer_count() -> None:
    p: Picker[str] = Picker(16, seed=1, source_cap=1, source_cap_min_peers=3)
    for q in "ab":
        p.add_peer(q, range(16))
    assert not p.capping
    assert p.next_request("a") is not None and p.next_request("b") is not None  # two peers: below the gate
    p.add_peer("c", range(16))
    assert p.capping
    assert p.next_request("c") is None


def _answer_one(p: Picker[Any], outstanding: list[Any], rng: random.Random, defer_p: float) -> bool:
    """One step of a random swarm driving the picker: a random outstanding request is DEFERred (with chance
    `defer_p`) or answered (its duplicates cancelled); with none outstanding, the swarm's periodic undefer.
    False once the download is done."""
    if not outstanding:
        if p.done:
            return False
        assert p.undefer_all(), "nothing asked, nothing deferred, not done: stalled"
        return True
    peer, piece = outstanding.pop(rng.randrange(len(outstanding)))
    if rng.random() < defer_p:
        p.defer(peer, piece)
    elif p.arrived(peer, piece) is Arrival.EXPECTED:
        p.piece_verified(piece)
        outstanding[:] = [(q, i) for q, i in outstanding if i != piece]  # cancelled duplicates
    return True


@QUICK
@given(
    st.integers(min_value=1, max_value=40),
    st.integers(min_value=2, max_value=8),
    st.integers(min_value=1, max_value=3),
    st.floats(min_value=0.0, max_value=0.6),
    st.randoms(use_true_random=False),
)
def test_a_capped_node_completes_whatever_its_peers_hold_and_defer(
    n: int, npeers: int, cap: int, defer_p: float, rng: random.Random
) -> None:
    """Random holdings, peers that DEFER requests at random, the swarm's fill order (every peer after each
    answer) and its periodic undefer: the capped download always completes, and before the endgame it adds
    a source past the cap only while the sources it has offer nothing fresh."""
    p: Picker[Any] = Picker(n, seed=rng.randrange(1 << 30), max_dup=2, source_cap=cap)
    holdings = {k: {i for i in range(n) if rng.random() < 0.5} for k in range(npeers)}
    holdings[rng.randrange(npeers)] = set(range(n))  # one seed so the download can complete
    for k, s in holdings.items():
        p.add_peer(k, s)
    outstanding: list[tuple[int, int]] = []
    for _ in range(60 * n):
        for k in holdings:
            while len([1 for peer, _ in outstanding if peer == k]) < 2:
                before = set(p.serving)
                free = p.missing & ~p.inflight_mask
                piece = p.next_request(k)
                if piece is None:
                    break
                if k not in before and len(before) >= cap and free:
                    offered = [p.peer_mask[q] & free & ~p.deferred.get(q, 0) for q in before]
                    rarest = min((p.avail[p.perm[b]] for m in offered for b in indices(m)), default=0)
                    assert not rarest or p.avail[piece] < rarest, "past the cap for a piece no rarer than theirs"
                outstanding.append((k, piece))
        if not _answer_one(p, outstanding, rng, defer_p):
            break
    assert p.done


# ------------------------------------------------------------------------------------------ rule 7: zone stripes
def test_zone_stripe_is_off_without_another_zone() -> None:
    assert zone_stripe("n1", "", {"n2": "a", "n3": "b"}) == (0, 0), "no zone of ours"
    assert zone_stripe("n1", "a", {"n2": "a", "n3": "a"}) == (0, 0), "one zone: no thin link to cross"
    assert zone_stripe("n1", "a", {}) == (0, 0)


def test_zone_stripe_numbers_a_zones_nodes_alike_at_every_node() -> None:
    zones = {"s": "a", "p1": "a", "p5": "b", "p6": "b", "p7": "b", "p8": "b"}
    got = {nid: zone_stripe(nid, z, {k: v for k, v in zones.items() if k != nid}) for nid, z in zones.items()}
    assert sorted(got[n] for n in ("p5", "p6", "p7", "p8")) == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert {got["s"], got["p1"]} == {(0, 2), (1, 2)}


@QUICK
@given(st.integers(min_value=1, max_value=300), st.integers(min_value=1, max_value=12), st.integers(0, 1 << 30))
def test_the_stripes_of_a_zone_cover_every_piece_once(n: int, m: int, seed: int) -> None:
    stripes = []
    for i in range(m):
        p: Picker[Any] = Picker(n, seed=seed)
        p.set_stripe(i, m)
        stripes.append(set(p.perm[k] for k in indices(p.stripe)) if m > 1 else set(range(n)))
    assert set().union(*stripes) == set(range(n))
    assert sum(len(s) for s in stripes) == n, "a piece in two stripes"


def test_an_other_zone_peer_is_asked_first_for_our_stripe() -> None:
    p: Picker[Any] = Picker(40, seed=5)
    p.set_stripe(1, 4)
    p.add_peer("far", range(40), rank=1, cross_zone=True)
    p.add_peer("mate", range(0, 40, 2))  # a zone mate with the even pieces
    got = [p.next_request("far") for _ in range(5)]
    # our stripe is 1, 5, 9, ...: ten pieces, none held by the mate (rule 5 keeps those off the far peer anyway)
    assert all(i is not None and i % 4 == 1 for i in got)
    p2: Picker[Any] = Picker(40, seed=5)
    p2.add_peer("far", range(40), rank=1, cross_zone=True)
    p2.add_peer("mate", range(0, 40, 2))
    assert any(p2.next_request("far") % 4 != 1 for _ in range(5)), "without a stripe: any odd piece"  # type: ignore[operator]


def test_outside_our_stripe_an_other_zone_peer_waits_until_the_stripe_is_fetched_or_in_flight() -> None:
    p: Picker[Any] = Picker(8, seed=2)
    p.set_stripe(0, 2)  # pieces 0, 2, 4, 6
    p.add_peer("far", range(8), rank=1, cross_zone=True)
    asked = [p.next_request("far") for _ in range(4)]
    assert sorted(asked) == [0, 2, 4, 6]  # type: ignore[type-var]
    assert p.next_request("far") in (1, 3, 5, 7), "stripe all in flight: anything, never a stall"
    q: Picker[Any] = Picker(8, seed=2)
    q.set_stripe(0, 2)
    q.add_peer("far", range(8), rank=1, cross_zone=True)
    q.add_peer("far2", range(1, 8, 2), rank=1, cross_zone=True)  # offers only the other stripe
    assert q.next_request("far2") is None, "our stripe is still to fetch from `far`: no crossing for the mate's"
    first = q.next_request("far")
    q.defer("far", first)  # type: ignore[arg-type]
    for _ in range(3):
        q.next_request("far")
    assert q.next_request("far2") is None, "a deferred stripe piece waits for the undefer, as in rule 5"
    assert q.undefer_all()
    assert q.next_request("far") == first
    assert q.next_request("far2") is not None, "our stripe is all in flight: cross for the rest"


def test_the_stripe_rule_leaves_same_zone_peers_and_the_endgame_alone() -> None:
    p: Picker[Any] = Picker(8, seed=4)
    p.set_stripe(0, 2)
    p.add_peer("mate", range(8))
    assert sorted(p.next_request("mate") for _ in range(8)) == list(range(8))  # type: ignore[type-var]
    p.add_peer("far", range(8), rank=1, cross_zone=True)
    assert p.next_request("far") is None, "rule 5: everything is at a zone mate"
    p.remove_peer("mate")
    assert sorted(p.next_request("far") for _ in range(8)) == list(range(8)), "the mate left: all from afar"  # type: ignore[type-var]


def test_a_stripe_is_set_once_per_change() -> None:
    p: Picker[Any] = Picker(16, seed=1)
    p.set_stripe(2, 4)
    assert {p.perm[k] for k in indices(p.stripe)} == {2, 6, 10, 14}
    p.set_stripe(0, 1)
    assert p.stripe == 0, "a zone of one: the rule is off"
    p.set_stripe(5, 4)
    assert p.stripe == 0, "an index outside the count (bad input) turns it off"


@QUICK
@given(
    st.integers(min_value=1, max_value=40),
    st.integers(min_value=2, max_value=5),
    st.floats(min_value=0.0, max_value=0.3),
    st.randoms(use_true_random=False),
)
def test_a_striped_node_completes_when_zone_mates_leave_and_crosses_for_its_stripe_first(
    n: int, m: int, defer_p: float, rng: random.Random
) -> None:
    """Node 0 of a zone of `m`, its zone mates holding random pieces and leaving at random (a stripe owner
    gone), other-zone peers with random holdings (one of them complete), DEFERs at random, the swarm's fill
    order and periodic undefer: the download completes, and an other-zone peer is asked for a piece outside
    our stripe only while no piece of the stripe is left to fetch across from an other-zone peer."""
    p: Picker[Any] = Picker(n, seed=rng.randrange(1 << 30), max_dup=2)
    p.set_stripe(0, m)
    stripe = {i for i in range(n) if i % m == 0}
    far = {f"far{k}": {i for i in range(n) if rng.random() < 0.5} for k in range(3)}
    far["far0"] = set(range(n))
    mates = {f"mate{k}": {i for i in range(n) if rng.random() < 0.5} for k in range(m - 1)}
    holdings = {**far, **mates}
    for k, s in far.items():
        p.add_peer(k, s, rank=1, cross_zone=True)
    for k, s in mates.items():
        p.add_peer(k, s)
    outstanding: list[tuple[str, int]] = []
    for _ in range(60 * n):
        if mates and rng.random() < 0.05:
            gone = rng.choice(sorted(mates))
            del mates[gone], holdings[gone]
            p.remove_peer(gone)
            outstanding = [(q, i) for q, i in outstanding if q != gone]
        for k in holdings:
            while len([1 for peer, _ in outstanding if peer == k]) < 2:
                free = p.missing & ~p.inflight_mask
                todo = {p.perm[b] for b in indices(free)} & stripe
                todo -= {i for s in mates.values() for i in s}
                todo &= {i for s in far.values() for i in s}
                piece = p.next_request(k)
                if piece is None:
                    break
                assert piece in holdings[k]
                if k in far and free and piece not in stripe:
                    assert not todo, f"crossed for {piece} while stripe pieces {todo} were to fetch"
                outstanding.append((k, piece))
        if not _answer_one(p, outstanding, rng, defer_p):
            break
    assert p.done
