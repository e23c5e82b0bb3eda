"""The coarse model (netsim.sim.coarse): known answers, and agreement with the piece-level engine."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from netsim.sim.__main__ import main
from netsim.sim.coarse import (
    Tree,
    fanout,
    hop_s,
    run_coarse,
    sample_scenario,
    simulate_coarse,
    weighted_quantiles,
)
from netsim.sim.report import simulate
from netsim.sim.scenario import NodeClass, Scenario
from tests.unit.test_sim_engine import MB, MiB, one


@pytest.mark.parametrize(("seed_up", "down"), [(100 * MB, 50 * MB), (40 * MB, 80 * MB)])
def test_one_seed_one_peer_takes_size_over_the_slower_link(seed_up: float, down: float) -> None:
    sc = one(1, 10 * MB, down, seed_up=seed_up)
    r = simulate_coarse(sc, sample=1)
    assert r["completed"] == 1
    assert r["completion_s"]["max"] == pytest.approx(sc.size / min(seed_up, down), rel=0.01)
    assert r["seed_upload_F"] == pytest.approx(1.0)


def test_one_sampled_node_standing_for_two_adds_one_generation() -> None:
    """A sample of one for two nodes: the second gets the last unit one hop after the first completes."""
    sc = one(2, 50 * MB, 50 * MB, seed_up=40 * MB)
    r = simulate_coarse(sc, sample=1)
    first = sc.size / (40 * MB)
    hop = 2 * sc.latency + sc.unit_bytes / min(50 * MB / fanout(sc, "p2pd"), 50 * MB)
    assert r["completed"] == 2
    assert r["completion_s"]["p50"] == pytest.approx(first, rel=0.01)
    assert r["completion_s"]["max"] == pytest.approx(first + hop, rel=0.01)
    assert r["coarse"]["generations"] == 1


def test_tree_generations_count_every_node_once() -> None:
    t = Tree(fanout=4, hop_s=0.01)
    gens = t.generations(1000.0)
    assert [g for g, _ in gens] == [0, 1, 2, 3, 4, 5]
    assert [m for _, m in gens][:4] == [1.0, 4.0, 20.0, 100.0]
    assert sum(m for _, m in gens) == pytest.approx(1000.0)
    assert t.generations(1.0) == [(0, 1.0)]


def test_weighted_quantiles_match_the_expanded_sample() -> None:
    rng = np.random.default_rng(3)
    v = rng.uniform(1, 2, 400)
    w = rng.integers(1, 6, 400).astype(float)
    q = weighted_quantiles(v, w)
    expanded = np.sort(np.repeat(v, w.astype(int)))
    for key, f in (("p50", 0.5), ("p99", 0.99), ("p999", 0.999)):
        k = int(np.ceil(f * len(expanded))) - 1
        assert q[key] == pytest.approx(expanded[k])
    assert q["max"] == pytest.approx(expanded[-1])
    assert q["mean"] == pytest.approx(expanded.mean())


def test_sample_scales_classes_and_arrivals_and_refuses_a_zone_link() -> None:
    sc = Scenario(
        classes=(NodeClass(900, 10 * MB, 10 * MB, "a"), NodeClass(100, 50 * MB, 50 * MB, "a")),
        size=64 * MiB,
        piece=MiB,
        seed_up=100 * MB,
        arrival_rate=100.0,
    )
    sub, weights = sample_scenario(sc, 50)
    assert [c.count for c in sub.classes] == [45, 5]
    assert weights == [20.0, 20.0]
    assert sub.arrival_rate == pytest.approx(5.0)
    with pytest.raises(ValueError, match="zone"):
        sample_scenario(replace(sc, zone_link=10 * MB), 50)
    with pytest.raises(ValueError, match="at least 1"):
        sample_scenario(sc, 0)


def test_ample_peers_reach_the_kumar_ross_bound_within_the_stated_error() -> None:
    """Peers' uplinks 5x the seed's (the issue's shape): the bound is F/u_s. The model's stated error over the
    sampled sub-swarm is the tree's generations x hop (here 2 x 42 ms of 6.7 s: 1.3%)."""
    sc = one(400, 50 * MB, 50 * MB, seed_up=10 * MB, size=64 * MiB, piece=512 << 10, quantum=None)
    r = simulate_coarse(sc, sample=40)
    bound = sc.size / (10 * MB)
    assert r["bound_s"] == pytest.approx(bound)
    assert r["completed"] == 400
    extra = r["coarse"]["generations"] * r["coarse"]["hop_s"][0] / bound
    assert r["coarse"]["generations"] == 2
    assert extra < 0.015
    sample = r["coarse"]["sample_over_bound"]
    assert sample["max"] < 1.15
    assert r["over_bound"]["p50"] >= sample["p50"] >= 1.0
    assert r["over_bound"]["max"] == pytest.approx(sample["max"] + extra)
    assert r["seed_upload_F"] < 1.1


@pytest.mark.parametrize("policy", ["p2pd", "bittorrent"])
def test_agrees_with_the_piece_level_engine(policy: str) -> None:
    """200 nodes, 64 pieces, seed-limited: the coarse model from 100 sampled nodes (2 nodes each) within 10% of
    the engine's p50 and p99 over the bound, and within 0.15 F of its seed upload.

    With the daemon's HAVE hold as configured: ended after `have_batch_pieces` pieces, it withholds little
    here (with only the 0.1 s, ~12 pieces' news, the engine's p50 was 1.89x and the coarse model's 1.58x: the
    tree's hop has no hold)."""
    sc = one(200, 250 * MB, 250 * MB, seed_up=100 * MB, size=128 * MiB, piece=2 * MiB, quantum=None, policy=policy)
    full = simulate(sc)
    coarse = simulate_coarse(sc, sample=100)
    assert full["completed"] == coarse["completed"] == 200
    for key in ("p50", "p99"):
        assert coarse["over_bound"][key] == pytest.approx(full["over_bound"][key], rel=0.10), key
    assert coarse["seed_upload_F"] == pytest.approx(full["seed_upload_F"], abs=0.15)


def test_cli_runs_the_coarse_model(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "--nodes",
            "5000",
            "--size",
            "32MiB",
            "--piece",
            "1MiB",
            "--seed-up",
            "100MB/s",
            "--up",
            "200MB/s",
            "--down",
            "200MB/s",
            "--coarse",
            "--sample",
            "20",
            "--policies",
            "p2pd",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    summary = json.loads(out[: out.rindex("}") + 1])
    r = summary["results"]["p2pd"]
    assert summary["model"] == "coarse"
    assert r["nodes"] == 5000 and r["completed"] == 5000
    assert r["coarse"]["sample"] == 20
    assert r["coarse"]["generations"] >= 3


def test_cli_refuses_a_zone_link_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--nodes", "500", "--zones", "2", "--zone-link", "1Gbit/s", "--coarse", "--sample", "10"])
    assert e.value.code == 2
    assert "zone" in capsys.readouterr().err


def test_hop_uses_the_holders_share_of_its_uplink() -> None:
    sc = one(10, 40 * MB, 1000 * MB, latency=0.001)
    assert hop_s(sc, sc.classes[0], 4) == pytest.approx(0.002 + MiB / (10 * MB))
    assert fanout(sc, "bittorrent") == 5
    assert fanout(sc, "p2pd") == sc.swarm.upload_slots
    assert fanout(replace(sc, swarm=replace(sc.swarm, upload_slots=0)), "p2pd") == 2 * sc.swarm.max_peers


def test_one_sample_run_serves_every_swarm_size() -> None:
    """--also-nodes: a size extended from the shared sample run is the same as its own coarse run."""
    sc = one(600, 50 * MB, 50 * MB, seed_up=20 * MB, size=16 * MiB, piece=512 << 10, quantum=None)
    out = run_coarse(sc, ["p2pd"], sample=20, also=(6000,))
    alone = simulate_coarse(replace(sc, classes=(replace(sc.classes[0], count=6000),)), sample=20)
    shared = out["also"]["6000"]["results"]["p2pd"]
    assert shared["over_bound"] == alone["over_bound"]
    assert (
        shared["coarse"]["generations"]
        == alone["coarse"]["generations"]
        > out["results"]["p2pd"]["coarse"]["generations"]
    )
    assert out["results"]["p2pd"]["nodes"] == 600 and shared["completed"] == 6000
