"""The swarm benchmark in small (1 seed + 3 peers, 64 MiB, 100 Mbit/s links): p2pd completes with every copy
byte-identical (cmp) within 1.5x the Kumar-Ross bound; the baselines run through the same harness (so it cannot
rot), and HTTP's ~3x proves the links are really shaped. Namespaces are gone afterwards (the `emu` fixture)."""

from __future__ import annotations

import io
import shutil
from typing import Any

import pytest

from netsim.bench.clients import make_client
from netsim.bench.harness import build_net
from netsim.bench.swarm import SwarmOptions, measure_iperf, measure_mesh, run_swarm
from netsim.emu import Topology
from p2pd.units import parse_size, rate_bits

pytestmark = pytest.mark.emu

SMALL: dict[str, Any] = {
    "peers": 3,
    "size": parse_size("64MiB"),
    "rate_bps": rate_bits("100Mbit/s"),
    "runs": 1,
    "iperf": False,
}


def swarm(clients: list[str]) -> dict:
    """Run the small swarm for `clients` (skipping, with the reason, if one of them cannot run here)."""
    for c in clients:
        why = make_client(c).missing()
        if why:
            pytest.skip(f"{c}: {why}")
    log = io.StringIO()
    res = run_swarm(SwarmOptions(clients=clients, **SMALL), log=log)
    for name, c in res["clients"].items():
        assert c["failures"] == [], f"{name}: {c['failures']}\n{log.getvalue()}"
        assert len(c["times_s"]) == 1 and len(c["per_leecher_s"][0]) == 3
    return res


def test_p2pd_small_swarm(emu: None) -> None:
    """Completion, identical bytes and a swarming seed are asserted on every attempt; the time ratio gets one
    second attempt, because on this shared 2-core machine one run's start-up can take a second longer than usual
    (a 64 MiB swarm at 100 Mbit/s is only 5.4 s of T_min, so that alone moves the ratio by 0.2)."""
    ratios = []
    for _ in range(2):
        res = swarm(["p2pd"])
        c = res["clients"]["p2pd"]
        assert res["t_min_s"] == pytest.approx(64 * 2**20 * 8 / 100e6, rel=1e-3)
        assert c["seed_upload_F"] < 3.0, "the seed sent (nearly) a copy per peer: no swarming"
        ratios.append(c["ratio"])
        if c["ratio"] <= 1.5:
            break
    assert min(ratios) <= 1.5, f"T/T_min {ratios} (headline: {res['headline']})"


def test_baselines_small_swarm(emu: None) -> None:
    res = swarm(["http", "aria2", "libtorrent"])
    http = res["clients"]["http"]
    # the seed's 100 Mbit/s link carries 3 copies: 3 T_min plus TCP/IP headers (~4.5%); far less = not shaped
    assert 2.8 <= http["ratio"] <= 3.8, res["headline"]
    assert 2.9 <= http["seed_upload_F"] <= 3.3
    # the switch's own counters: each leecher's copy crossed the seed's uplink once, with headers, and nothing was
    # dropped on the way down (three downlinks of 100 Mbit/s share one uplink of 100)
    (sent_f,) = http["wire_sent_F_runs"]
    assert 1.0 <= sent_f <= 1.15
    assert http["switch_dropped_runs"][0] < 0.02
    assert 0.2 < http["leecher_downlink_use_runs"][0] <= 0.4  # a third of each downlink, at most
    for bt in ("aria2", "libtorrent"):
        assert res["clients"][bt]["ratio"] < 3.0, res["headline"]


def test_chain_reference_small_swarm(emu: None) -> None:
    """The byte-by-byte chain puts one flow on every link and makes no node wait for a piece: it ends within a few
    percent of the measured-rate bound, with one copy from the seed and nothing dropped, so it says what the network
    allows. A chain slower than that (a node waiting, a link shared) would not be a reference."""
    res = swarm(["chain"])
    chain = res["clients"]["chain"]
    assert chain["ratio"] <= 1.15, res["headline"]  # headers take ~4.5 % of the nominal rate
    assert 0.99 <= chain["seed_upload_F"] <= 1.06
    assert chain["switch_dropped_runs"][0] < 0.005


def test_mesh_is_what_busy_links_carry(emu: None) -> None:
    """Every node sending to two others at once fills every shaped link nearly as one flow fills one (headers and
    ACKs aside), and never more than the shaping allows: the mesh measures the network, not the hosts."""
    if not shutil.which("iperf3"):
        pytest.skip("iperf3 not found (apt-get install iperf3)")
    rate = rate_bits("50Mbit/s")
    with Topology() as topo:
        net = build_net(topo, "emu", 3, rate, rate)
        one_flow = measure_iperf(net, seconds=3)
        per_node = measure_mesh(net, 2, seconds=4)
    assert 0.85 * rate < one_flow < rate
    assert 0.85 * rate < per_node < rate, f"mesh {per_node / 1e6:.1f} Mbit/s per node, one flow {one_flow / 1e6:.1f}"
