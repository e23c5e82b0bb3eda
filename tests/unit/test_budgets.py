"""The budget allocator (tracker/budgets.py): sums within budgets, max-min fairness, demand respected."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracker.budgets import (
    OVERCOMMIT,
    SEED_MARGIN,
    Budgets,
    Demand,
    Share,
    ShareLedger,
    allocate,
    max_min,
    parse_report,
    seed_weight,
    usage,
    weight_of,
)
from tracker.validate import TrackerError

rates = st.floats(min_value=0, max_value=1e10, allow_nan=False, allow_infinity=False)
demand_maps = st.dictionaries(st.text("abcdefgh", min_size=1, max_size=3), rates | st.just(math.inf), max_size=12)
EPS = 1e-6


@given(capacity=rates, demands=demand_maps)
def test_max_min_sum_within_capacity_and_every_demand_met_or_fair(capacity: float, demands: dict[str, float]) -> None:
    got = max_min(capacity, demands)
    assert set(got) == set(demands)
    assert sum(got.values()) <= capacity * (1 + 1e-9) + EPS
    assert all(v >= 0 for v in got.values())
    if not demands:
        return
    # the largest allocation that falls short of its demand is the fair level; everyone unsatisfied has it
    short = [n for n in demands if got[n] < demands[n] * (1 - 1e-9) - EPS]
    if short:
        level = max(got[n] for n in short)
        for n in short:
            assert got[n] == pytest.approx(level, rel=1e-6, abs=1e-3)
        # nobody gets more than the level unless it demanded less than it (the rest was shared first)
        for n in demands:
            assert got[n] <= max(level, demands[n]) * (1 + 1e-9) + EPS
        # the budget is used up when someone is short
        assert sum(got.values()) == pytest.approx(capacity, rel=1e-6, abs=1e-3)
    else:
        # everyone satisfied: work conserving, the surplus was handed out too
        assert sum(got.values()) == pytest.approx(capacity, rel=1e-6, abs=1e-3)


def test_max_min_small_demand_gets_what_it_needs_rest_shared() -> None:
    got = max_min(100.0, {"a": 10.0, "b": 1000.0, "c": 1000.0})
    assert got == pytest.approx({"a": 10.0, "b": 45.0, "c": 45.0})


def test_max_min_surplus_spread_when_all_satisfied() -> None:
    got = max_min(100.0, {"a": 10.0, "b": 30.0})
    assert got == pytest.approx({"a": 40.0, "b": 60.0})


def test_max_min_weights() -> None:
    got = max_min(90.0, {"a": 1000.0, "b": 1000.0}, {"a": 2.0, "b": 1.0})
    assert got == pytest.approx({"a": 60.0, "b": 30.0})


def test_zero_budget_gives_zero_to_everyone() -> None:
    shares = allocate(Budgets(total=0.0), {"a": Demand(egress=5.0), "b": Demand(egress=0.0)})
    assert {n: s.egress for n, s in shares.items()} == {"a": 0.0, "b": 0.0}


zones = st.sampled_from(["", "z1", "z2", "z3"])
demands_st = st.dictionaries(
    st.text("abcdefghij", min_size=1, max_size=2),
    st.builds(
        Demand, zone=zones, egress=rates | st.just(math.inf), cross=rates, weight=st.sampled_from([1.0, 2.0, 5.0])
    ),
    max_size=10,
)
budgets_st = st.builds(
    Budgets,
    total=st.none() | rates,
    zones=st.dictionaries(st.sampled_from(["z1", "z2"]), rates, max_size=2),
    cross_zone=st.none() | rates,
)


@settings(max_examples=300)
@given(b=budgets_st, demands=demands_st)
def test_allocate_never_exceeds_any_budget(b: Budgets, demands: dict[str, Demand]) -> None:
    shares = allocate(b, demands)
    assert set(shares) == set(demands)
    if b.total is not None:
        assert all(s.egress is not None for s in shares.values())
        assert sum(s.egress or 0.0 for s in shares.values()) <= b.total * (1 + 1e-9) + EPS
    for z, cap in b.zones.items():
        members = [n for n, d in demands.items() if d.zone == z]
        assert sum(shares[n].egress or 0.0 for n in members) <= cap * (1 + 1e-9) + EPS
    for n, d in demands.items():
        s = shares[n]
        if b.total is None and d.zone not in b.zones:
            assert s.egress is None  # no budget applies: its own limits only
        if b.cross_zone is not None:
            assert s.cross is not None
            if s.egress is not None:
                assert s.cross <= s.egress * (1 + 1e-9) + EPS
        else:
            assert s.cross is None
    if b.cross_zone is not None:
        assert sum(s.cross or 0.0 for s in shares.values()) <= b.cross_zone * (1 + 1e-9) + EPS


def test_zone_budget_caps_what_its_nodes_take_from_the_total() -> None:
    d = {
        "a1": Demand(zone="a", egress=math.inf),
        "a2": Demand(zone="a", egress=math.inf),
        "b1": Demand(zone="b", egress=math.inf),
    }
    shares = allocate(Budgets(total=300.0, zones={"a": 60.0}), d)
    assert shares["a1"].egress == pytest.approx(30.0)
    assert shares["a2"].egress == pytest.approx(30.0)
    # the total is not wasted on zone a, which cannot use more than 60
    assert shares["b1"].egress == pytest.approx(240.0)


def test_cross_zone_split_by_cross_demand() -> None:
    d = {"a": Demand(zone="a", egress=100.0, cross=5.0), "b": Demand(zone="b", egress=100.0, cross=1000.0)}
    shares = allocate(Budgets(cross_zone=50.0), d)
    assert shares["a"].egress is None
    # a needs 5 and gets it, b gets the other 45 (no surplus left to spread)
    assert shares["a"].cross == pytest.approx(5.0)
    assert shares["b"].cross == pytest.approx(45.0)


def test_no_budget_no_share() -> None:
    assert allocate(Budgets(), {"a": Demand(egress=1.0)})["a"].egress is None


def test_budgets_validation_errors_are_clear() -> None:
    ok = Budgets.from_json({"total": 1e6, "zones": {"eu": 5e5}, "cross_zone": 0})
    assert ok.total == 1e6 and ok.zones == {"eu": 5e5} and ok.cross_zone == 0.0 and ok.active
    assert Budgets.from_json(ok.to_json()) == ok
    assert Budgets.from_json({"total": 0}).paused
    for bad, words in [
        ({"total": -1}, "negative"),
        ({"total": "fast"}, "number"),
        ({"total": 1e30}, "absurd"),
        ({"total": float("nan")}, "number"),
        ({"zones": {"": 5}}, "zone name"),
        ({"zones": {"eu": -5}}, "negative"),
        ({"speed": 1}, "unknown budget key"),
        ({"priority": {"x": 2}}, "artifact ids"),
        ({"priority": {"a" * 64: 0}}, "weight"),
        ([1], "map"),
    ]:
        with pytest.raises(TrackerError, match=words):
            Budgets.from_json(bad)


def test_parse_report_rejects_hostile_values() -> None:
    assert parse_report([1, 2, 3, 4]) == (1.0, 2.0, 3.0, 4.0)
    for bad in (None, [1, 2, 3], [1, 2, 3, -1], [1, 2, 3, float("nan")], [1, 2, 3, "x"], [True, 1, 1, 1], "abcd"):
        assert parse_report(bad) is None


def test_weight_and_usage() -> None:
    aid = "a" * 64
    assert weight_of({aid: 0.5, "b" * 64: 1.0}, {aid: 3.0}) == 3.0
    assert weight_of({"b" * 64: 1.0}, {aid: 3.0}) == 1.0
    u = usage({"x": Demand(zone="z", egress_rate=5.0, cross_rate=1.0), "y": Demand(zone="z", egress_rate=2.0)})
    assert u == {"total": 7.0, "cross_zone": 1.0, "zones": {"z": 7.0}}


def _sums_within(b: Budgets, zone_of: dict[str, str], holds: dict[str, Share]) -> None:
    over = 1 + OVERCOMMIT + 1e-9
    if b.total is not None:
        assert sum(s.egress or 0.0 for s in holds.values()) <= b.total * over + EPS
    for z, cap in b.zones.items():
        assert sum(s.egress or 0.0 for n, s in holds.items() if zone_of[n] == z) <= cap * over + EPS
    if b.cross_zone is not None:
        assert sum(s.cross or 0.0 for s in holds.values()) <= b.cross_zone * over + EPS


@settings(max_examples=200)
@given(
    b=budgets_st,
    zone_of=st.dictionaries(st.sampled_from("abcdef"), zones, min_size=1),
    rounds=st.lists(
        st.tuples(
            st.dictionaries(st.sampled_from("abcdef"), st.tuples(rates, rates)),  # demands this interval
            st.lists(st.sampled_from("abcdef"), max_size=12),  # heartbeats until the next split, in order
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_held_shares_never_add_up_to_more_than_a_budget_and_a_stable_split_is_in_force_in_two_rounds(
    b: Budgets, zone_of: dict[str, str], rounds: list[tuple[dict[str, tuple[float, float]], list[str]]]
) -> None:
    """Heartbeats in any order between splits: at every moment the shares nodes hold (the last one sent;
    a node not sent one yet counts at its first split share) are within every budget (plus the overcommit)."""
    ledger = ShareLedger()
    holds: dict[str, Share] = {}
    split: dict[str, Share] = {}
    for want, beats in rounds:
        demands = {n: Demand(z, *want.get(n, (0.0, 0.0))) for n, z in zone_of.items()}
        split = allocate(b, demands)
        ledger.resplit(b, split, zone_of)
        for n, s in split.items():
            holds.setdefault(n, s)
        for n in beats:
            if n in zone_of:
                got = ledger.grant(n)
                assert got is not None
                holds[n] = got
                _sums_within(b, zone_of, holds)
    for _ in range(2):  # demands stable from here: every node beats twice, in any order
        for n in zone_of:
            holds[n] = ledger.grant(n)  # type: ignore[assignment]
            _sums_within(b, zone_of, holds)
    assert holds == split


def test_an_increase_waits_for_the_decrease_that_makes_room_for_it() -> None:
    """The seed held the whole budget; leechers now ask for most of it: a leecher beating before the seed
    gets only what is free (the overcommit), and the rest at its next heartbeat after the seed's decrease."""
    b = Budgets(total=100.0)
    zone_of = {"seed": "", "l1": "", "l2": ""}
    ledger = ShareLedger()
    ledger.resplit(b, allocate(b, {"seed": Demand("", 1e9), "l1": Demand(), "l2": Demand()}), zone_of)
    assert ledger.grant("seed") == Share(100.0, None)
    assert ledger.grant("l1") == Share(0.0, None)
    ledger.resplit(b, allocate(b, {"seed": Demand("", 40.0), "l1": Demand("", 30.0), "l2": Demand("", 30.0)}), zone_of)
    free = 100.0 * OVERCOMMIT
    first = ledger.grant("l1")  # the seed still holds all 100
    assert first is not None and first.egress == pytest.approx(free)
    assert ledger.grant("seed") == Share(40.0, None)  # a decrease is given at once
    assert ledger.grant("l2") == Share(30.0, None)  # 40 + 30 + 5 held
    assert ledger.grant("l1") == Share(30.0, None)


def test_a_seed_is_weighted_to_the_share_its_leechers_can_pass_on() -> None:
    """1 seed + 4 leechers, all held back: an equal split gives the seed 8 of 40 and the leechers can pass
    on at most 3 x 8 = 24 of their 32 (the throttle bench's dips to 0.8); weighted, the seed gets SEED_MARGIN
    x 40/4 = 11 and every leecher 7.25, less than the 3 x 11 / 4 each they could pass on (not exactly as much:
    then any second the seed sends a little less dries a leecher up)."""
    w = seed_weight(1, 4)
    got = max_min(40.0, {"seed": math.inf, **{f"l{i}": math.inf for i in range(4)}}, {"seed": w})
    assert got["seed"] == pytest.approx(40.0 / 4 * SEED_MARGIN) == pytest.approx(11.0)
    assert all(got[f"l{i}"] == pytest.approx(7.25) for i in range(4))
    assert all(got[f"l{i}"] < 3 * got["seed"] / 4 for i in range(4))
    assert seed_weight(1, 1) == 1.0  # a lone fetcher passes nothing on: no swarm arithmetic to correct
    assert seed_weight(0, 5) == 1.0 and seed_weight(3, 0) == 1.0
    assert seed_weight(3, 4) == 1.0  # several seeds already get more than budget/partial from an equal split
    # 1 + 2: the seed SEED_MARGIN x half, whatever the number of fetchers (partial >= 2)
    for k in (2, 3, 8, 100):
        got = max_min(1.0, {"seed": math.inf, **{f"l{i}": math.inf for i in range(k)}}, {"seed": seed_weight(1, k)})
        assert got["seed"] == pytest.approx(SEED_MARGIN / k)
