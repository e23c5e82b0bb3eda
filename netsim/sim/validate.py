"""`python -m netsim.sim validate`: the simulator's predictions for the emulated swarms, against measurements.

Each case is a `python -m netsim.bench swarm` scenario (1 seed + N peers, every link shaped to RATE). The
prediction simulates it at piece level with the links at the TCP goodput iperf3 measured over one shaped
link (191.3 Mbit/s of 200: headers take ~4.5%), since flows in the model carry payload only.

By default the measured side is the median recorded in BENCHMARKS.md (named per case). With `--emulate`
the emulated swarms run now (root and network namespaces needed; the p2pd client only, `--runs` runs
each) and their medians are used instead; `--wait-while FILE` holds each run while FILE exists (the
machine's quiet-period marker), so benchmarks of others are not disturbed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from netsim.sim.report import simulate
from netsim.sim.scenario import NodeClass, Scenario
from p2pd.protocol.manifest import choose_piece_size
from p2pd.units import parse_size, rate_bits

MEASURED_GOODPUT_BPS = 191.3e6  # iperf3 over one 200 Mbit/s shaped link (BENCHMARKS.md, 2026-11-24 07:02)
LATENCY = 2e-4  # one way on the emulated bridge (a few hops through veth and tbf queues)


@dataclass(frozen=True)
class Case:
    name: str
    peers: int
    size: int
    rate_bps: int
    p2pd_s: float  # measured median, p2pd
    libtorrent_s: float | None  # measured median, libtorrent (the BitTorrent reference)
    source: str

    def scenario(self, goodput_bps: float, policy: str = "p2pd") -> Scenario:
        rate = goodput_bps / 8
        return Scenario(
            classes=(NodeClass(self.peers, rate, rate),),
            size=self.size,
            piece=choose_piece_size(self.size),
            seed_up=rate,
            latency=LATENCY,
            policy=policy,
        )


CASES = [
    Case(
        "1+4",
        4,
        parse_size("512MiB"),
        rate_bits("200Mbit/s"),
        22.75,
        31.70,
        "BENCHMARKS.md: 1+4, 2026-11-24T07:02 (7241f44), medians of 3",
    ),
    Case(
        "1+8",
        8,
        parse_size("512MiB"),
        rate_bits("200Mbit/s"),
        23.64,
        36.96,
        "BENCHMARKS.md: 1+8 after NAT traversal, 2026-11-26 14:07-14:18 (9ea1bf6), p2pd median of 3; "
        "libtorrent: 1+8 every client, 13:20-13:28 (752f6f7)",
    ),
]


def emulate(case: Case, runs: int, wait_while: Path | None) -> float:
    """Run the emulated swarm now (p2pd only); return its median."""
    if wait_while is not None:
        while wait_while.exists():
            time.sleep(15)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "swarm.json"
        cmd = [sys.executable, "-m", "netsim.bench", "swarm", "--peers", str(case.peers), "--size", str(case.size)]
        cmd += ["--rate", f"{case.rate_bps}bit/s", "--clients", "p2pd", "--runs", str(runs), "--no-iperf"]
        cmd += ["--json", str(out)]
        cp = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if not out.exists():
            raise RuntimeError(f"emulated {case.name} did not run: {(cp.stderr or cp.stdout).strip()[-300:]}")
        med = json.loads(out.read_text())["clients"]["p2pd"]["median_s"]
        if med is None:
            raise RuntimeError(f"emulated {case.name}: no p2pd run completed")
        return float(med)


def validate(emulate_runs: int | None, wait_while: Path | None) -> dict[str, Any]:
    rows = []
    for case in CASES:
        sc = case.scenario(MEASURED_GOODPUT_BPS)
        p = simulate(sc)
        bt = simulate(replace(sc, policy="bittorrent"))
        measured = emulate(case, emulate_runs, wait_while) if emulate_runs else case.p2pd_s
        predicted = p["completion_s"]["max"]
        bt_pred = bt["completion_s"]["max"]
        rows.append(
            {
                "case": case.name,
                "bound_nominal_s": Scenario(
                    classes=(NodeClass(case.peers, case.rate_bps / 8, case.rate_bps / 8),),
                    size=case.size,
                    piece=choose_piece_size(case.size),
                    seed_up=case.rate_bps / 8,
                ).bound(),
                "bound_goodput_s": sc.bound(),
                "p2pd_predicted_s": predicted,
                "p2pd_measured_s": measured,
                "p2pd_error": predicted / measured - 1,
                "p2pd_seed_upload_F_predicted": p["seed_upload_F"],
                "bittorrent_predicted_s": bt_pred,
                "libtorrent_measured_s": case.libtorrent_s,
                "bittorrent_error": None if case.libtorrent_s is None else bt_pred / case.libtorrent_s - 1,
                "measured_from": "emulated now" if emulate_runs else case.source,
                "piece": sc.piece,
            }
        )
    return {"goodput_bps": MEASURED_GOODPUT_BPS, "latency_s": LATENCY, "cases": rows}


def table(res: dict[str, Any]) -> str:
    lines = [
        "| case | bound (goodput) s | p2pd predicted s | p2pd measured s | error | BitTorrent-like predicted s "
        "| libtorrent measured s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["cases"]:
        lt = "–" if r["libtorrent_measured_s"] is None else f"{r['libtorrent_measured_s']:.2f}"
        lines.append(
            f"| {r['case']} | {r['bound_goodput_s']:.2f} | {r['p2pd_predicted_s']:.2f} | {r['p2pd_measured_s']:.2f} "
            f"| {100 * r['p2pd_error']:+.1f}% | {r['bittorrent_predicted_s']:.2f} | {lt} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m netsim.sim validate", description=__doc__)
    ap.add_argument("--json", type=Path, default=None, help="write the result here")
    ap.add_argument("--emulate", type=int, default=None, metavar="RUNS", help="run the emulated swarms now")
    ap.add_argument("--wait-while", type=Path, default=None, metavar="FILE", help="hold runs while FILE exists")
    a = ap.parse_args(argv)
    if a.emulate is not None and a.emulate < 1:
        ap.error(f"--emulate needs at least 1 run, got {a.emulate}")
    try:
        res = validate(a.emulate, a.wait_while)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json is not None:
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    print(table(res))
    return 0
