"""Bigger emulations (issue #15) in small: heterogeneous links and churn with real p2pd daemons.

1 seed + 4 peers (2 at 100 Mbit/s, 2 at 50 Mbit/s), 24 MiB; one peer's daemon stops gracefully 1 s in and restarts
1 s later on the same data dir. Every copy must be byte-identical (cmp) and the run must complete; the time is only
checked against a loose multiple of the bound (churn makes the bound a lower bound)."""

from __future__ import annotations

import io

import pytest

from netsim.bench.clients import make_client
from netsim.bench.model import ChurnEvent, RateClass
from netsim.bench.swarm import SwarmOptions, run_swarm
from p2pd.units import parse_size, rate_bits

pytestmark = [pytest.mark.emu, pytest.mark.slow]


def test_p2pd_heterogeneous_churn(emu: None) -> None:
    why = make_client("p2pd").missing()
    if why:
        pytest.skip(f"p2pd: {why}")
    classes = [RateClass(2, rate_bits("100Mbit/s"), rate_bits("100Mbit/s")), RateClass(2, 50_000_000, 50_000_000)]
    log = io.StringIO()
    res = run_swarm(
        SwarmOptions(
            peers=4,
            size=parse_size("24MiB"),
            rate_bps=rate_bits("100Mbit/s"),
            rate_classes=classes,
            churn=[ChurnEvent(1, 1.0, 1.0)],
            clients=["p2pd"],
            runs=1,
            iperf=False,
            timeout_s=90,
        ),
        log=log,
    )
    c = res["clients"]["p2pd"]
    assert c["failures"] == [], f"{c['failures']}\n{log.getvalue()}"
    # 50 Mbit/s downloaders bind: F / d_min
    assert res["t_min_s"] == pytest.approx(24 * 2**20 * 8 / 50e6, rel=1e-3)
    assert res["rate_classes"][1] == {"count": 2, "up_bps": 50_000_000, "down_bps": 50_000_000}
    assert "lower bound" in res["bound_note"]
    (churned,) = c["churned"]
    assert len(churned) == 1 and churned[0]["peer"] == "p4" and churned[0]["back_s"] is not None, log.getvalue()
    assert c["ratio"] < 4.0, f"{res['headline']}\n{log.getvalue()}"


def test_p2pd_two_zones_thin_trunk(emu: None) -> None:
    """Two zones joined by a 20 Mbit/s trunk, 100 Mbit/s hosts: the trunk binds, and it is the trunk that binds
    (zone b finishes no sooner than one copy can cross it); each piece crosses about once."""
    why = make_client("p2pd").missing()
    if why:
        pytest.skip(f"p2pd: {why}")
    log = io.StringIO()
    size = parse_size("16MiB")
    res = run_swarm(
        SwarmOptions(
            peers=4,
            size=size,
            rate_bps=rate_bits("100Mbit/s"),
            zones=2,
            zone_link_bps=rate_bits("20Mbit/s"),
            clients=["p2pd"],
            runs=1,
            iperf=False,
            timeout_s=90,
        ),
        log=log,
    )
    c = res["clients"]["p2pd"]
    assert c["failures"] == [], f"{c['failures']}\n{log.getvalue()}"
    assert res["t_min_s"] == pytest.approx(size * 8 / 20e6, rel=1e-3)  # one copy over the trunk
    (per_leecher,) = c["per_leecher_s"]
    assert min(per_leecher[2:]) >= 0.95 * res["t_min_s"], f"zone b beat its trunk: {per_leecher}\n{log.getvalue()}"
    assert max(per_leecher[:2]) < min(per_leecher[2:]), f"zone a is not behind the trunk: {per_leecher}"
    (crossed,) = c["cross_zone_F_runs"]
    assert 1.0 <= crossed <= 1.6, f"{crossed} F crossed into zone b\n{log.getvalue()}"
