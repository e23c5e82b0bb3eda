"""Bigger emulations (issue #15): `--rates` classes, `--churn` events, and the bound for heterogeneous peers.

Pure: no namespaces, no daemons (the emulated run is tests/emu/test_emu_swarm_scale.py)."""

from __future__ import annotations

import pytest

from netsim.bench.__main__ import parser, swarm_links
from netsim.bench.harness import BenchError, RunResult, Wire
from netsim.bench.model import (
    ChurnEvent,
    RateClass,
    churn_bound,
    kumar_ross,
    parse_churn,
    parse_rate_class,
    peer_rates,
    zone_bound,
)
from netsim.bench.swarm import SwarmOptions, check_options, in_zone_b, report, t_min_nominal


def test_rate_class_one_rate_both_ways() -> None:
    assert parse_rate_class("2@1Gbit/s") == RateClass(2, 1_000_000_000, 1_000_000_000)
    assert parse_rate_class("14@100Mbit/s") == RateClass(14, 100_000_000, 100_000_000)
    assert parse_rate_class("3@25MB/s") == RateClass(3, 200_000_000, 200_000_000)


def test_rate_class_up_down() -> None:
    # RATE strings contain '/': the split is the one '/' where both sides are rates
    assert parse_rate_class("4@50Mbit/s/200Mbit/s") == RateClass(4, 50_000_000, 200_000_000)
    assert parse_rate_class("1@10Mbit/1Gbit") == RateClass(1, 10_000_000, 1_000_000_000)


@pytest.mark.parametrize("bad", ["2", "@1Gbit/s", "0@1Gbit/s", "-1@1Gbit/s", "x@1Gbit/s", "2@", "2@fast", "2@1Gbit/s/"])
def test_rate_class_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="COUNT@UP"):
        parse_rate_class(bad)


def test_churn_parse() -> None:
    assert parse_churn("2@5") == ChurnEvent(2, 5.0, None)
    assert parse_churn("2@5s:3") == ChurnEvent(2, 5.0, 3.0)
    assert parse_churn("1@1.5s:500ms") == ChurnEvent(1, 1.5, 0.5)
    for bad in ("2", "0@5", "a@5", "2@", "2@5:", "2@-1", "2@5:x"):
        with pytest.raises(ValueError, match="K@T"):
            parse_churn(bad)


def test_general_bound_by_hand() -> None:
    # 2 fast + 2 slow peers, seed 100: F=800 bits; F/u_s = 8, F/d_min = 800/50 = 16, N·F/(u_s+Σu) = 3200/(100+300) = 8
    ups, downs = peer_rates([RateClass(2, 100, 100), RateClass(2, 50, 50)])
    assert ups == [100, 100, 50, 50] and downs == [100, 100, 50, 50]
    assert kumar_ross(100, 100, ups, downs) == pytest.approx(16.0)
    # fast downloaders, slow uploaders: the swarm's total upload binds: 4·800/(100+4·10) = 22.86
    ups, downs = peer_rates([RateClass(4, 10, 1000)])
    assert kumar_ross(100, 100, ups, downs) == pytest.approx(3200 / 140)


def test_t_min_nominal_uses_classes() -> None:
    classes = [RateClass(2, 1_000_000_000, 1_000_000_000), RateClass(14, 100_000_000, 100_000_000)]
    o = SwarmOptions(peers=16, size=64 << 20, rate_bps=1_000_000_000, rate_classes=classes)
    f = (64 << 20) * 8
    # seed at 1 Gbit/s: F/u_s = 0.54 s, F/d_min = 5.37 s, 16F/(1G + 2G + 1.4G) = 1.95 s: the slow downloaders bind
    assert t_min_nominal(o) == pytest.approx(f / 100e6)
    # peers that upload at 10 Mbit/s and download at 1 Gbit/s behind a 1 Gbit/s seed: the total upload binds
    slow_up = [RateClass(16, 10_000_000, 1_000_000_000)]
    o2 = SwarmOptions(peers=16, size=64 << 20, rate_bps=10_000_000, seed_rate_bps=1_000_000_000, rate_classes=slow_up)
    assert t_min_nominal(o2) == pytest.approx(16 * f / (1e9 + 16 * 10e6))


def test_command_line_rates_replace_peers_and_rate() -> None:
    a = parser().parse_args(["swarm", "--rates", "2@1Gbit/s", "14@100Mbit/s", "--churn", "2@5:3"])
    peers, rate, classes = swarm_links(a)
    assert peers == 16 and rate == 1_000_000_000 and [c.count for c in classes] == [2, 14]
    assert a.churn == [ChurnEvent(2, 5.0, 3.0)]
    a = parser().parse_args(["swarm"])
    assert swarm_links(a) == (4, 200_000_000, [])
    for extra in (["--peers", "16"], ["--rate", "1Gbit/s"]):
        a = parser().parse_args(["swarm", "--rates", "2@1Gbit/s", *extra])
        with pytest.raises(BenchError, match="drop --peers and --rate"):
            swarm_links(a)


def test_command_line_bad_class_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parser().parse_args(["swarm", "--rates", "2@fast"])
    assert e.value.code == 2
    assert "COUNT@UP" in capsys.readouterr().err


def test_zone_bound_by_hand() -> None:
    # seed 100 + 2 peers of 100 in zone a, 2 peers of 100 in zone b, trunk 20; F = 800 bits
    ups = downs = [100, 100, 100, 100]
    in_b = [False, False, True, True]
    assert zone_bound(100, 100, ups, downs, in_b, None) == pytest.approx(kumar_ross(100, 100, ups, downs))
    # one copy over the trunk: 800/20 = 40; zone b's cut: 2·800/(200 + 20) = 7.3; zone a's: 2·800/(300 + 20) = 5
    assert zone_bound(100, 100, ups, downs, in_b, 20) == pytest.approx(40.0)
    # a fat trunk: zone b's own upload binds, 2·800/(2·10 + 100) = 13.3 (slow uploaders in zone b)
    assert zone_bound(100, 100, [100, 100, 10, 10], downs, in_b, 100) == pytest.approx(1600 / 120)


def test_zones_options_checked() -> None:
    a = parser().parse_args(["swarm", "--peers", "8", "--zones", "2", "--zone-link", "20Mbit/s"])
    assert a.zones == 2 and a.zone_link == 20_000_000
    o = SwarmOptions(peers=8, size=64 << 20, rate_bps=100_000_000, zones=2, zone_link_bps=20_000_000)
    assert in_zone_b(o) == [False] * 4 + [True] * 4  # the seed and the first half in zone a
    assert t_min_nominal(o) == pytest.approx((64 << 20) * 8 / 20e6)
    for bad, msg in (
        (SwarmOptions(peers=8, zones=3), "one zone or two"),
        (SwarmOptions(peers=1, zones=2), "at least 2 peers"),
        (SwarmOptions(peers=8, zone_link_bps=1), "give --zones 2"),
    ):
        with pytest.raises(BenchError, match=msg):
            check_options(bad)


def test_churn_bound_adds_the_time_away_to_the_peers_own_link() -> None:
    # F = 800 bits, downloads of 100: a peer away for 3 s needs 8 s of its link besides: 11 s, above Kumar-Ross's 8
    assert churn_bound(8.0, 100, [100, 100], [3.0]) == pytest.approx(11.0)
    # the fastest link stands for whoever leaves (800/200 + 3 = 7 < 8): Kumar-Ross binds
    assert churn_bound(8.0, 100, [100, 200], [3.0]) == pytest.approx(8.0)
    # peers that stay away until the rest are done add nothing here
    assert churn_bound(8.0, 100, [100, 100], []) == pytest.approx(8.0)


def test_the_report_judges_churn_against_the_churn_bound() -> None:
    o = SwarmOptions(peers=8, size=64 << 20, rate_bps=50_000_000, churn=[ChurnEvent(2, 4.0, 3.0)])
    run = RunResult(client="p2pd", run=1, per_leecher_s=[15.0] * 8, t_s=15.0, seed_tx_bytes=64 << 20, rss_max_mb=None)
    res = report(o, {"p2pd": [run]}, {"p2pd": []}, 47_000_000)
    f = (64 << 20) * 8
    assert res["t_min_s"] == pytest.approx(f / 50e6, abs=1e-3)
    assert res["t_churn_s"] == pytest.approx(f / 50e6 + 3.0, abs=1e-3)
    assert res["t_churn_measured_s"] == pytest.approx(f / 47e6 + 3.0, abs=1e-3)
    assert res["clients"]["p2pd"]["ratio_churn"] == pytest.approx(15.0 / (f / 50e6 + 3.0), abs=1e-3)
    assert "T/T_churn" in res["headline"]
    # no churn: no churn bound
    plain = report(SwarmOptions(peers=8, size=64 << 20, rate_bps=50_000_000), {"p2pd": [run]}, {"p2pd": []}, None)
    assert plain["t_churn_s"] is None and plain["clients"]["p2pd"]["ratio_churn"] is None


def test_mesh_options_checked() -> None:
    assert parser().parse_args(["swarm", "--peers", "8", "--mesh", "4"]).mesh == 4
    check_options(SwarmOptions(peers=8, mesh=4))
    for bad in (
        SwarmOptions(peers=8, mesh=4, topology="loopback"),
        SwarmOptions(peers=8, mesh=4, zones=2),
        SwarmOptions(peers=2, mesh=1, rate_classes=[parse_rate_class("2@100Mbit/s")]),
        SwarmOptions(peers=8, mesh=4, rate_bps=100_000_000, seed_rate_bps=200_000_000),
    ):
        with pytest.raises(BenchError, match="--mesh measures one switch"):
            check_options(bad)
    for bad in (SwarmOptions(peers=8, mesh=-1), SwarmOptions(peers=8, mesh=9)):
        with pytest.raises(BenchError, match="sends to 1..8 others"):
            check_options(bad)
    check_options(SwarmOptions(peers=8, mesh=8))  # every other node


def test_mesh_bound_scales_with_the_goodput_of_a_busy_link() -> None:
    o = SwarmOptions(peers=8, size=64 << 20, rate_bps=100_000_000, mesh=4)
    res = report(o, {"p2pd": []}, {"p2pd": []}, None, None, 90_000_000)
    assert res["mesh_fanout"] == 4 and res["mesh_bps_per_node"] == 90_000_000
    t_min = t_min_nominal(o)
    assert t_min is not None and res["t_min_mesh_s"] == pytest.approx(t_min / 0.9, abs=1e-3)
    assert res["clients"]["p2pd"]["ratio_mesh"] is None  # no run, no ratio


def test_the_wire_says_what_the_switch_dropped() -> None:
    # port_bytes: per node (delivered to it, it sent); the seed sent 300, the leechers 100 each; 60 were dropped
    before = {"seed": (0, 1000), "p1": (500, 0), "p2": (0, 0)}
    after = {"seed": (10, 1300), "p1": (700, 100), "p2": (230, 100)}
    w = Wire.between(before, after, "seed")
    assert (w.sent, w.delivered, w.delivered_to_leechers) == (500, 440, 430)
    assert w.dropped == pytest.approx(0.12)
    assert Wire(0, 0, 0).dropped == 0.0  # an idle switch dropped nothing
    o = SwarmOptions(peers=2, size=200, rate_bps=1000)
    run = RunResult("p2pd", 0, [1.0, 2.0], 2.0, 300, None, wire=w)
    c = report(o, {"p2pd": [run]}, {"p2pd": []}, None)["clients"]["p2pd"]
    assert c["wire_sent_F_runs"] == [1.25]  # 500 bytes on the uplinks for 2 x 200 delivered
    assert c["switch_dropped_runs"] == [0.12]
    assert c["leecher_downlink_use_runs"] == [0.86]  # 430 B x 8 over 2 links x 1000 bit/s x 2 s
    # loopback runs have no switch: no figures, not zeros
    bare = RunResult("p2pd", 0, [1.0], 1.0, None, None)
    assert report(o, {"p2pd": [bare]}, {"p2pd": []}, None)["clients"]["p2pd"]["switch_dropped_runs"] is None
