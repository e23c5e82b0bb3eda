"""The `chain` reference: the payload relayed byte by byte along seed -> p1 -> ... -> pN over plain TCP.

Not a distribution system (one node's failure stops everyone after it, and nothing is verified on the way; the
harness compares every copy afterwards): a measurement of what the emulated network carries when every link has
one flow and no node ever waits for a piece, the schedule the Kumar-Ross bound assumes for one seed and equal
links. Where p2pd is measured against the bound, this says how much of the gap the network itself leaves: on the
1 + 32 at 50 Mbit/s it finished at 1.01x the measured-rate bound (median of 7 runs, BENCHMARKS.md).
"""

from __future__ import annotations

import os
import subprocess
import sys

from netsim.bench.clients.base import Client
from netsim.bench.harness import Ctx, GatedProcess, Leecher, RunResult, release_and_wait, stop_all, wait_tcp

CHAIN_PORT = 8091


class Chain(Client):
    name = "chain"

    def run(self, ctx: Ctx, run: int) -> RunResult:
        d = ctx.run_dir(self.name, run)
        procs: list[subprocess.Popen] = []
        node = [sys.executable, "-m", "netsim.bench.clients.chain_node"]
        try:
            seed = ctx.net.seed
            src = f"{seed.ip}:{CHAIN_PORT}"
            argv = [*node, "--listen", src, "--file", ctx.payload, "--seed"]
            procs.append(seed.host.popen(argv, log=os.path.join(d, "seed.err")))
            wait_tcp(seed.host, seed.ip, CHAIN_PORT)
            size = str(os.path.getsize(ctx.payload))
            leechers: list[Leecher] = []
            for k, n in enumerate(ctx.net.leechers):
                out = os.path.join(d, f"{n.name}.bin")
                me = f"{n.ip}:{CHAIN_PORT}"
                argv = [*node, "--listen", me, "--upstream", src, "--file", out, "--size", size]
                if k < len(ctx.net.leechers) - 1:
                    argv.append("--forward")
                lc = GatedProcess(n, out, argv, d, n.name)
                procs.append(lc.proc)
                leechers.append(lc)
                src = me
            for gated in leechers:
                assert isinstance(gated, GatedProcess)
                gated.wait_ready()
            ctx.rss_pids = [procs[0].pid]  # the seed's (a leecher's CPU is gone once it exits)
            return release_and_wait(ctx, self.name, run, leechers)
        finally:
            stop_all(ctx.net.topo, procs)
            ctx.finish_run_dir(d)
