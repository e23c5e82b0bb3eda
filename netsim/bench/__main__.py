"""`python -m netsim.bench swarm|pair|tracker|ray ...` -- prints the JSON result, then a one-line headline.

    python -m netsim.bench swarm --peers 4 --size 512MiB --rate 200Mbit/s --clients p2pd,libtorrent,aria2,http \\
        --runs 3 --json swarm.json
    python -m netsim.bench swarm --rates 2@100Mbit/s 6@50Mbit/s --size 64MiB --clients p2pd   # per-class links
    python -m netsim.bench swarm --peers 8 --rate 50Mbit/s --size 64MiB --clients p2pd --churn 2@4:3
    python -m netsim.bench swarm --peers 8 --rate 100Mbit/s --zones 2 --zone-link 20Mbit/s --size 64MiB --clients p2pd
    python -m netsim.bench swarm --topology loopback --peers 4 --size 2GiB --clients p2pd,libtorrent --runs 3
    python -m netsim.bench swarm --peers 32 --size 128MiB --rate 50Mbit/s --clients p2pd --mesh 12  # + loaded network
    python -m netsim.bench swarm --peers 32 --size 128MiB --rate 50Mbit/s --clients chain,p2pd  # + one flow per link
    python -m netsim.bench pair --size 2GiB
    python -m netsim.bench render swarm.json      # the Markdown table for BENCHMARKS.md
    python -m netsim.bench tracker --nodes 100000 --duration 10 --compare-opentracker --json FILE
    python -m netsim.bench ray --size 2GiB --nodes 3
    python -m netsim.bench nat --size 2MiB --swarm-size 128MiB --json nat.json   # NAT matrix + NATed swarm
    python -m netsim.bench throttle --peers 4 --size 64MiB --rate 100Mbit/s --budget 40Mbit/s --json throttle.json
    python -m netsim.bench autothrottle --rate 200Mbit/s --json autothrottle.json  # p2pd beside an iperf3 service
    python -m netsim.bench preheat --peers 8 --size 512MiB --rate 200Mbit/s --json preheat.json  # admin preheat --all

Exit status: 0 when every run of every client completed and verified, 1 when some failed (the JSON says which),
2 when it could not run at all (not root, a tool missing: the message names the package).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from typing import Any

from netsim.bench import autothrottle, nat, preheat, ray_first_result, throttle, tracker_load
from netsim.bench.clients import CLIENT_NAMES, SYSTEMS
from netsim.bench.harness import BenchError, write_json
from netsim.bench.model import ChurnEvent, RateClass, parse_churn, parse_rate_class
from netsim.emu import EmuError, Terminated
from p2pd.units import parse_size, rate_bits


def _clients(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in names if c not in CLIENT_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown client(s) {bad}; choose from {','.join(CLIENT_NAMES)}")
    return names


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _rate_bits(text: str) -> int:
    """Bits per second: what tc shapes and the bound counts (a RATE is bytes/s until converted here)."""
    try:
        return rate_bits(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _rate_class(text: str) -> RateClass:
    try:
        return parse_rate_class(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _churn(text: str) -> ChurnEvent:
    try:
        return parse_churn(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


SWARM_DEFAULT_PEERS = 4
SWARM_DEFAULT_RATE = "200Mbit/s"


def swarm_links(a: argparse.Namespace) -> tuple[int, int, list[RateClass]]:
    """(peers, rate, classes) from --peers/--rate or --rates (which replaces both: giving them too is an error)."""
    if a.rates:
        if a.peers is not None or a.rate is not None:
            raise BenchError(
                "--rates gives every peer's link (COUNT@UP[/DOWN] per class): drop --peers and --rate, or drop --rates"
            )
        classes: list[RateClass] = a.rates
        return sum(c.count for c in classes), max(c.up_bps for c in classes), classes
    peers = SWARM_DEFAULT_PEERS if a.peers is None else a.peers
    return peers, rate_bits(SWARM_DEFAULT_RATE) if a.rate is None else a.rate, []


# the emulated benchmarks whose module brings its own options (add_arguments(parser, size, rate)) and entry point
EMULATED: dict[str, tuple[Any, str, Callable[[argparse.Namespace, str], int]]] = {
    "nat": (nat, "NAT traversal: matrix of NAT kinds, and a swarm behind NATs", nat.run),
    "throttle": (
        throttle,
        "bandwidth governance: global budgets (error per 1-s window, reaction, time vs N·F/budget)",
        throttle.run,
    ),
    "autothrottle": (autothrottle, "auto-throttling: p2pd beside a TCP service on one node's link", autothrottle.main),
    "preheat": (preheat, "preheat from the tracker (admin preheat --all) against the swarm bound", preheat.run),
}


def _described(sub: Any, name: str, module: Any, help_: str) -> argparse.ArgumentParser:
    """A subcommand whose --help shows its module's docstring (what it measures and how)."""
    parsed: argparse.ArgumentParser = sub.add_parser(
        name, help=help_, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    return parsed


def parser() -> argparse.ArgumentParser:
    """The command line (spellings are stable: BENCHMARKS.md and CI script them)."""
    ap = argparse.ArgumentParser(
        prog="python -m netsim.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("swarm", help="1 seed + N peers, all clients side by side")
    s.add_argument("--peers", type=int, default=None, help=f"leechers (default {SWARM_DEFAULT_PEERS})")
    s.add_argument("--size", type=_size, default=parse_size("512MiB"), help="payload SIZE (512MiB, 2GiB, ...)")
    s.add_argument(
        "--rate", type=_rate_bits, default=None, help=f"every link, both ways (RATE, default {SWARM_DEFAULT_RATE})"
    )
    s.add_argument(
        "--rates",
        type=_rate_class,
        nargs="+",
        default=None,
        metavar="COUNT@UP[/DOWN]",
        help="heterogeneous peers, one class per word (2@1Gbit/s 14@100Mbit/s); replaces --peers and --rate",
    )
    s.add_argument(
        "--churn",
        type=_churn,
        nargs="+",
        default=[],
        metavar="K@T[:D]",
        help="K peers' daemons stop gracefully T s into the run and restart D s later on the same data dir "
        "(p2pd only; without :D they come back once the others are done)",
    )
    s.add_argument(
        "--seed-rate",
        type=_rate_bits,
        default=None,
        help="the seed's link (default: --rate; with --rates the fastest class's up rate)",
    )
    s.add_argument(
        "--zones",
        type=int,
        default=1,
        help="2: two switches joined by a trunk; the seed and the first half of the peers in zone a (p2pd runs "
        "with --zone a/b)",
    )
    s.add_argument("--zone-link", type=_rate_bits, default=None, help="the trunk between the two zones, each way")
    s.add_argument(
        "--clients",
        type=_clients,
        default=list(SYSTEMS),
        help=f"comma-separated, from {','.join(CLIENT_NAMES)} (default {','.join(SYSTEMS)}; chain: the payload "
        "relayed byte by byte along every node, what the network carries with one flow per link)",
    )
    s.add_argument("--runs", type=int, default=3)
    s.add_argument("--topology", choices=["emu", "loopback"], default="emu")
    s.add_argument("--loss", type=float, default=0.0, help="random loss on every link's receive side (0..1)")
    s.add_argument("--timeout", type=float, default=None, help="per run, seconds (default: max(120, 10 T_min))")
    s.add_argument("--no-iperf", action="store_true", help="skip the iperf3 link measurement")
    s.add_argument(
        "--mesh",
        type=int,
        default=0,
        metavar="K",
        help="also measure the network with every node sending to K others at once (iperf3): the bound at that "
        "goodput is t_min_mesh_s",
    )
    s.add_argument("--p2pd-egress-limit", default=None, help="pass --egress-limit RATE to every p2pd daemon")
    s.add_argument(
        "--p2pd-run-args",
        type=shlex.split,
        default=[],
        help="extra options for every `p2pd run`, one quoted string (e.g. '--pipeline 8')",
    )
    s.add_argument(
        "--p2pd-insecure",
        action="store_true",
        help="run p2pd's tracker and daemons as an open cluster (--insecure): measures what authentication costs",
    )
    s.add_argument("--keep", action="store_true", help="keep the work dir (logs, copies) in /dev/shm")
    s.add_argument(
        "--trace",
        action="store_true",
        help="record every node's bytes (switch-side counters) each 0.5 s: ramp-up and tail per client",
    )
    s.add_argument("--json", default=None, help="also write the JSON result to this file")
    p = sub.add_parser("pair", help="one p2pd pair vs curl from nginx, loopback")
    p.add_argument("--size", type=_size, default=parse_size("2GiB"))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", default=None)
    r = sub.add_parser("render", help="a result JSON as the Markdown block kept in BENCHMARKS.md")
    r.add_argument("file")
    tracker_load.add_arguments(
        _described(sub, "tracker", tracker_load, "heartbeat load against one tracker process (and opentracker)")
    )
    ray_first_result.add_arguments(
        _described(sub, "ray", ray_first_result, "Ray: submit -> first inference result, against its bound")
    )
    for name, (module, help_, _run) in EMULATED.items():
        module.add_arguments(_described(sub, name, module, help_), _size, _rate_bits)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    argv = sys.argv[1:] if argv is None else argv
    a = parser().parse_args(argv)
    command = "python -m netsim.bench " + shlex.join(argv)
    if a.cmd == "render":
        from netsim.bench.render import render

        with open(a.file) as f:
            print(render(json.load(f)))
        return 0
    if a.cmd == "tracker":
        return tracker_load.run(a, command)
    if a.cmd == "ray":
        return ray_first_result.main(a)
    if a.cmd in EMULATED:
        return _guarded(EMULATED[a.cmd][2], a, command)
    try:
        if a.cmd == "swarm":
            from netsim.bench.swarm import SwarmOptions, run_swarm

            peers, rate, classes = swarm_links(a)
            res = run_swarm(
                SwarmOptions(
                    peers=peers,
                    size=a.size,
                    rate_bps=rate,
                    rate_classes=classes,
                    churn=a.churn,
                    zones=a.zones,
                    zone_link_bps=a.zone_link,
                    seed_rate_bps=a.seed_rate,
                    clients=a.clients,
                    runs=a.runs,
                    topology=a.topology,
                    loss=a.loss,
                    timeout_s=a.timeout,
                    keep=a.keep,
                    iperf=not a.no_iperf,
                    mesh=a.mesh,
                    p2pd_egress_limit=a.p2pd_egress_limit,
                    p2pd_run_args=a.p2pd_run_args,
                    p2pd_insecure=a.p2pd_insecure,
                    trace=a.trace,
                    command=command,
                )
            )
        else:
            from netsim.bench.pair import PairOptions, run_pair

            res = run_pair(PairOptions(size=a.size, runs=a.runs, timeout_s=a.timeout, keep=a.keep, command=command))
    except (BenchError, EmuError) as e:
        print(f"netsim.bench: {e}", file=sys.stderr)
        return 2
    except Terminated as e:
        print(f"netsim.bench: {e}; cleaned up", file=sys.stderr)
        return 128 + e.signum
    print(write_json(res, a.json))
    print(res["headline"])
    return 1 if any(c["failures"] for c in res["clients"].values()) else 0


def _guarded(run: Callable[[argparse.Namespace, str], int], a: argparse.Namespace, command: str) -> int:
    """A benchmark that cannot run at all says why in one line (exit 2); a signal ends it cleaned up."""
    try:
        return run(a, command)
    except (BenchError, EmuError) as e:
        print(f"netsim.bench: {e}", file=sys.stderr)
        return 2
    except Terminated as e:
        print(f"netsim.bench: {e}; cleaned up", file=sys.stderr)
        return 128 + e.signum


if __name__ == "__main__":
    sys.exit(main())
