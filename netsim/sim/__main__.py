"""`python -m netsim.sim` -- simulate a swarm; prints the JSON summary, writes the full JSON and a plot.

    python -m netsim.sim --nodes 1000 --size 8GiB --piece 4MiB --seed-up 10Gbit/s --up 25Gbit/s \\
        --down 25Gbit/s --json out.json --plot out.png
    python -m netsim.sim --class 900,100Mbit/s,100Mbit/s,a --class 100,1Gbit/s,1Gbit/s,b --zone-link 1Gbit/s ...
    python -m netsim.sim validate --json validate.json     # predictions vs the emulated swarms (docs/simulator.md)

Exit status: 0 when every node completed in every policy, 1 when some did not (within the horizon),
2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from netsim.sim.coarse import SAMPLE, run_coarse
from netsim.sim.report import brief, plot, run_policies
from netsim.sim.scenario import POLICIES, NodeClass, Scenario, auto_grain
from p2pd.config import SwarmConfig
from p2pd.units import parse_duration, parse_rate, parse_size


def _arg(fn: Any) -> Any:
    def conv(text: str) -> Any:
        try:
            return fn(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from e

    conv.__name__ = fn.__name__
    return conv


def node_class(text: str) -> NodeClass:
    """COUNT,UP,DOWN[,ZONE] -- e.g. 100,1Gbit/s,1Gbit/s,b."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (3, 4):
        raise ValueError(f"a node class is COUNT,UP,DOWN[,ZONE] (e.g. 100,1Gbit/s,1Gbit/s,b), got {text!r}")
    try:
        count = int(parts[0])
    except ValueError:
        raise ValueError(f"a node class's COUNT must be a whole number, got {parts[0]!r}") from None
    return NodeClass(count, parse_rate(parts[1]), parse_rate(parts[2]), parts[3] if len(parts) == 4 else "z0")


def policies(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in POLICIES]
    if bad or not names:
        raise ValueError(f"unknown policy {bad or text!r}; choose from {','.join(POLICIES)}")
    return names


def grain(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        g = int(text)
    except ValueError:
        raise ValueError(f"grain is 'auto' or a number of pieces per unit, got {text!r}") from None
    if g < 1:
        raise ValueError(f"grain must be at least 1 piece, got {g}")
    return g


def node_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--also-nodes is a comma-separated list of node counts, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise ValueError(f"--also-nodes needs node counts of at least 1, got {text!r}")
    return counts


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m netsim.sim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--nodes", type=int, default=1000, help="downloading nodes of the default class")
    ap.add_argument("--up", type=_arg(parse_rate), default=parse_rate("25Gbit/s"), help="default class upload RATE")
    ap.add_argument("--down", type=_arg(parse_rate), default=parse_rate("25Gbit/s"), help="default class download")
    ap.add_argument("--zones", type=int, default=1, help="spread the default class over this many zones")
    ap.add_argument(
        "--class",
        dest="classes",
        type=_arg(node_class),
        action="append",
        default=[],
        help="COUNT,UP,DOWN[,ZONE]: a node class (repeatable; replaces --nodes/--up/--down)",
    )
    ap.add_argument("--size", type=_arg(parse_size), default=parse_size("8GiB"), help="artifact SIZE")
    ap.add_argument("--piece", type=_arg(parse_size), default=parse_size("4MiB"), help="the daemon's piece size")
    ap.add_argument("--grain", type=_arg(grain), default=None, help="pieces per simulated unit, or auto (default)")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--seed-up", type=_arg(parse_rate), default=parse_rate("10Gbit/s"))
    ap.add_argument("--arrival", default="all", help="'all' (t = 0) or poisson:RATE in nodes per second")
    ap.add_argument("--churn", type=float, default=0.0, help="fraction of nodes that leave once mid-download")
    ap.add_argument("--churn-away", type=_arg(parse_duration), default=5.0, help="how long they stay away")
    ap.add_argument("--zone-link", type=_arg(parse_rate), default=None, help="RATE between two zones, each way")
    ap.add_argument("--latency", type=_arg(parse_duration), default=1e-4, help="one-way control latency")
    ap.add_argument("--egress-limit", type=_arg(parse_rate), default=None, help="every node's --egress-limit")
    ap.add_argument("--quantum", type=_arg(parse_duration), default=None, help="event batching window")
    ap.add_argument("--policies", type=_arg(policies), default=list(POLICIES), help="p2pd,bittorrent")
    ap.add_argument("--rng-seed", type=int, default=0)
    ap.add_argument(
        "--upload-slots", type=int, default=None, help="SwarmConfig.upload_slots (0: no cap; default: the daemon's)"
    )
    ap.add_argument(
        "--download-sources",
        type=int,
        default=None,
        help="SwarmConfig.download_sources: peers a node asks at once (0: no cap; default: the daemon's)",
    )
    ap.add_argument(
        "--model",
        choices=("piece", "coarse"),
        default="piece",
        help="piece: every node (the engine); coarse: a sampled sub-swarm plus dissemination-tree generations",
    )
    ap.add_argument("--coarse", dest="model", action="store_const", const="coarse", help="same as --model coarse")
    ap.add_argument("--sample", type=int, default=SAMPLE, help="--model coarse: nodes the engine simulates")
    ap.add_argument(
        "--also-nodes",
        type=_arg(node_counts),
        default=(),
        help="--model coarse: more swarm sizes (N1,N2,...) extended from the same sample run",
    )
    ap.add_argument("--horizon", type=_arg(parse_duration), default=None, help="stop after this simulated time")
    ap.add_argument("--json", type=Path, default=None, help="write the full result (per-node times) here")
    ap.add_argument("--plot", type=Path, default=None, help="write the PNG plot here (needs matplotlib)")
    return ap


def scenario_from(a: argparse.Namespace) -> Scenario:
    classes = list(a.classes)
    if not classes:
        if a.zones < 1:
            raise ValueError(f"--zones must be at least 1, got {a.zones}")
        per, extra = divmod(a.nodes, a.zones)
        classes = [NodeClass(per + (z < extra), a.up, a.down, f"z{z}") for z in range(a.zones)]
    arrival_rate: float | None = None
    if a.arrival != "all":
        kind, _, rate = a.arrival.partition(":")
        try:
            arrival_rate = float(rate) if kind == "poisson" else None
        except ValueError:
            arrival_rate = None
        if arrival_rate is None:
            raise ValueError(f"--arrival is 'all' or poisson:RATE (nodes per second), got {a.arrival!r}")
    peers = sum(c.count for c in classes)
    pieces = -(-a.size // a.piece)
    kw: dict[str, Any] = {}
    if a.zone_link is not None:
        kw["zone_link"] = a.zone_link
    swarm = SwarmConfig()
    if a.upload_slots is not None:
        if a.upload_slots < 0:
            raise ValueError(f"--upload-slots is 0 (no cap) or a positive count, got {a.upload_slots}")
        swarm = replace(swarm, upload_slots=a.upload_slots)
    if a.download_sources is not None:
        if a.download_sources < 0:
            raise ValueError(f"--download-sources is 0 (no cap) or a positive count, got {a.download_sources}")
        swarm = replace(swarm, download_sources=a.download_sources)
    kw["swarm"] = swarm
    return Scenario(
        classes=tuple(c for c in classes if c.count),
        size=a.size,
        piece=a.piece,
        seed_up=a.seed_up,
        seeds=a.seeds,
        grain=a.grain if a.grain is not None else auto_grain(peers, pieces),
        arrival_rate=arrival_rate,
        churn=a.churn,
        churn_away=a.churn_away,
        latency=a.latency,
        quantum=a.quantum,
        egress_limit=a.egress_limit,
        rng_seed=a.rng_seed,
        horizon=a.horizon,
        **kw,
    )


def headline(out: dict[str, Any]) -> str:
    parts = []
    for p, r in out["results"].items():
        ob = r["over_bound"]
        if ob["p50"] is None:
            parts.append(f"{p}: none completed")
            continue
        parts.append(
            f"{p} p50 {ob['p50']:.3f}x p99 {ob['p99']:.3f}x p99.9 {ob['p999']:.3f}x seed {r['seed_upload_F']:.2f} F"
            f" ({r['completed']}/{r['nodes']} done, {r['engine']['wall_s']:.0f} s wall)"
        )
    return f"Headline: sim bound {out['bound_s']:.3f} s: " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["validate"]:
        from netsim.sim.validate import main as validate_main

        rc: int = validate_main(argv[1:])
        return rc
    ap = parser()
    a = ap.parse_args(argv)
    try:
        sc = scenario_from(a)
    except ValueError as e:
        ap.error(str(e))
    if a.model == "coarse":
        if a.grain is None:  # auto grain for the sample the engine runs, not for the whole swarm
            sc = replace(sc, grain=auto_grain(min(a.sample, sc.peers), sc.pieces))
        try:
            out = run_coarse(sc, a.policies, a.sample, a.also_nodes)
        except ValueError as e:
            ap.error(str(e))
    else:
        out = run_policies(sc, a.policies)
    if a.json is not None:
        a.json.write_text(json.dumps(out) + "\n")
    if a.plot is not None:
        plot(out, a.plot)
    print(json.dumps(brief(out), indent=2))
    print(headline(out))
    for n, more in out.get("also", {}).items():
        print(f"{n} nodes: " + headline(more))
    return 0 if all(r["completed"] == r["nodes"] for r in out["results"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
