"""The two BitTorrent baselines: libtorrent 2.x (C++, via its Python wheel) and aria2c.

Both use the same v1 .torrent (pure-Python SHA-1, `netsim.bench.bt`), the same minimal tracker started afresh for
every run in the seed's namespace, and piece size chosen like the research runs (4 MiB; 1 MiB under 256 MiB so a
small CI payload still has enough pieces to swarm). A finished leecher keeps seeding until the last one is done.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from typing import Any

from netsim.bench.bt import make_torrent
from netsim.bench.clients.base import Client, LineLeecher
from netsim.bench.harness import (
    NEUTRAL_CWD,
    BenchError,
    Ctx,
    GatedProcess,
    Leecher,
    Node,
    RunResult,
    child_env,
    release_and_wait,
    stop_all,
)

TRACKER_PORT = 6969


def piece_size(size: int) -> int:
    """4 MiB pieces (as in research FINDINGS §4), 1 MiB for payloads under 256 MiB."""
    return 4 << 20 if size >= 256 << 20 else 1 << 20


class _TorrentClient(Client):
    """Shared: torrent file, tracker per run."""

    def prepare(self, ctx: Ctx) -> None:
        self.torrent = os.path.join(ctx.work, f"{self.name}.torrent")
        url = f"http://{ctx.net.seed.ip}:{TRACKER_PORT}/announce"
        make_torrent(ctx.payload, self.torrent, url, piece_size(ctx.size))

    def start_tracker(self, ctx: Ctx, d: str) -> subprocess.Popen:
        """Start the BitTorrent tracker in the seed's namespace and wait until it listens."""
        seed = ctx.net.seed
        p = seed.host.popen(
            [sys.executable, "-m", "netsim.bench.bt", "tracker", "--listen", f"{seed.ip}:{TRACKER_PORT}"],
            stdout=subprocess.PIPE,
            log=os.path.join(d, "tracker.log"),
            text=True,
            env=child_env(),
            cwd=NEUTRAL_CWD,
        )
        assert p.stdout is not None
        if p.stdout.readline().strip() != "READY":
            raise BenchError(f"BitTorrent tracker did not start (exit {p.poll()})")
        return p

    def wait_announced(self, ctx: Ctx, n: int) -> None:
        """Block until the tracker knows `n` peers (the seed has announced)."""
        seed = ctx.net.seed
        cp = seed.host.run(
            [
                sys.executable,
                "-m",
                "netsim.bench.bt",
                "wait-peers",
                f"http://{seed.ip}:{TRACKER_PORT}/stats",
                str(n),
                "--timeout",
                "30",
            ],
            check=False,
            env=child_env(),
            cwd=NEUTRAL_CWD,
            timeout=60,
        )
        if cp.returncode != 0:
            raise BenchError(f"{self.name}: seed did not announce within 30 s")


class Libtorrent(_TorrentClient):
    """libtorrent-rasterbar (pip wheel `libtorrent`), one session per node, TCP only."""

    name = "libtorrent"

    def missing(self) -> str | None:
        if importlib.util.find_spec("libtorrent") is None:
            return "python module libtorrent not importable (pip install libtorrent)"
        return None

    def run(self, ctx: Ctx, run: int) -> RunResult:
        d = ctx.run_dir(self.name, run)
        procs: list[subprocess.Popen] = []
        leechers: list[LineLeecher] = []
        port = 7000 + run % 100
        try:
            procs.append(self.start_tracker(ctx, d))
            seed_node = ctx.net.seed
            log = os.path.join(d, "nodes.log")

            def node(role: str, n: Node, save: str) -> LineLeecher:
                argv = [
                    sys.executable,
                    "-m",
                    "netsim.bench.clients.lt_node",
                    "--role",
                    role,
                    "--torrent",
                    self.torrent,
                    "--save",
                    save,
                    "--listen",
                    f"{n.ip}:{port}",
                ]
                p = n.host.popen(
                    argv,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    log=log,
                    text=True,
                    bufsize=1,
                    env=child_env(),
                    cwd=NEUTRAL_CWD,
                )
                procs.append(p)
                return LineLeecher(n, save, p)

            seed = node("seed", seed_node, os.path.dirname(ctx.payload))
            seed.expect("READY", 30)
            for n in ctx.net.leechers:
                out = os.path.join(d, n.name)
                os.makedirs(out)
                leechers.append(node("leech", n, out))
            for lc in leechers:
                lc.expect("READY", 30)
            ctx.rss_pids = [p.pid for p in procs[1:]]
            res = release_and_wait(ctx, self.name, run, leechers)
            for lc in [seed, *leechers]:
                lc.send("QUIT")
            for lc in [seed, *leechers]:
                lc.expect("BYE", 10)
            return res
        finally:
            stop_all(ctx.net.topo, procs)
            ctx.finish_run_dir(d)


class _FileLeecher(GatedProcess):
    """aria2c behind the start gate; done when its on-bt-download-complete hook wrote the wall-clock time."""

    def __init__(self, *a: Any, done_file: str, **kw: Any) -> None:  # forwards GatedProcess's
        super().__init__(*a, **kw)
        self.done_file = done_file

    def poll(self, t0_mono: float, t0_wall: float) -> None:
        if self.done_at is not None or self.error is not None:
            return
        if os.path.exists(self.done_file):
            with open(self.done_file) as f:
                text = f.read().strip()
            if text:
                self.done_at = t0_mono + (float(text) - t0_wall)
                return
        rc = self.proc.poll()
        if rc is not None:
            self.error = f"{self.node.name}: aria2c exited {rc} before completing: {self.stderr_path}"


class Aria2(_TorrentClient):
    """aria2c 1.36 (Debian `aria2`), BitTorrent mode, one process per node."""

    name = "aria2"

    def missing(self) -> str | None:
        return None if shutil.which("aria2c") else "aria2c not found (apt-get install aria2)"

    def argv(self, ip: str, port: int, d: str, log: str) -> list[str]:
        """aria2c options: only our tracker, no DHT/LPD, no limits, keep seeding (we stop it)."""
        return [
            "aria2c",
            f"--dir={d}",
            f"--listen-port={port}",
            f"--interface={ip}",
            f"--log={log}",
            "--log-level=notice",
            "--enable-dht=false",
            "--enable-dht6=false",
            "--bt-enable-lpd=false",
            "--disable-ipv6=true",
            "--seed-ratio=0.0",
            "--bt-max-peers=0",
            "--max-overall-upload-limit=0",
            "--max-overall-download-limit=0",
            "--file-allocation=none",
            "--summary-interval=0",
            "--console-log-level=warn",
            "--bt-tracker-interval=5",
            "--follow-torrent=false",
            "--enable-rpc=false",
            "--auto-save-interval=0",
        ]

    def run(self, ctx: Ctx, run: int) -> RunResult:
        d = ctx.run_dir(self.name, run)
        procs: list[subprocess.Popen] = []
        port = 7200 + run % 100
        hook = os.path.join(d, "done_hook.sh")
        with open(hook, "w") as f:
            f.write('#!/bin/sh\n# aria2 --on-bt-download-complete: GID NFILES PATH\ndate +%s.%N > "$NETSIM_DONE"\n')
        os.chmod(hook, 0o755)
        try:
            procs.append(self.start_tracker(ctx, d))
            seed = ctx.net.seed
            argv = self.argv(seed.ip, port, os.path.dirname(ctx.payload), os.path.join(d, "seed.log"))
            procs.append(
                seed.host.popen(
                    [*argv, "--bt-seed-unverified=true", "--check-integrity=false", self.torrent],
                    stdout=subprocess.DEVNULL,
                    log=os.path.join(d, "seed.err"),
                    env=child_env(),
                )
            )
            self.wait_announced(ctx, 1)
            leechers: list[Leecher] = []
            for n in ctx.net.leechers:
                out = os.path.join(d, n.name)
                os.makedirs(out)
                done = os.path.join(d, f"{n.name}.done")
                argv = [
                    *self.argv(n.ip, port, out, os.path.join(d, f"{n.name}.log")),
                    f"--on-bt-download-complete={hook}",
                    self.torrent,
                ]
                lc = _FileLeecher(n, out, argv, d, n.name, env={"NETSIM_DONE": done}, done_file=done)
                procs.append(lc.proc)
                leechers.append(lc)
            for gated in leechers:
                assert isinstance(gated, GatedProcess)
                gated.wait_ready()
            ctx.rss_pids = [p.pid for p in procs[1:]]  # gated leechers exec aria2c: same PID
            return release_and_wait(ctx, self.name, run, leechers)
        finally:
            stop_all(ctx.net.topo, procs)
            ctx.finish_run_dir(d)
