"""`python -m netsim.bench preheat`: a preheat from the tracker (issue #16) against the swarm bound.

1 seed + N peers on one switch, every link tbf-shaped to RATE both ways (the swarm bench's topology,
`harness.build_net`); the tracker (with its admin API) in the seed's namespace and a `p2pd run` on
every node. The seed publishes the payload; then `p2p-tracker admin preheat NAME:TAG --all` orders
every node to fetch it into its cache, and nothing else asks for it. While it runs, the order's
status (`GET /v1/preheat`, what `admin preheat status` prints) is polled and every sample kept.

Reported (JSON):
- `t_s`: from the release of the preheat command (`p2p-tracker admin preheat NAME --all`, started
  behind the swarm bench's start gate, so Python's start-up is not counted) to the last peer done,
  read off each daemon's own log line `preheat ...: complete` (wall-clock stamps, ms);
  `t_status_s`: until the status first showed every node complete (what an operator sees:
  holdings reach the tracker with heartbeats, so up to one interval later);
- `t_ordered_s` (the admin command returned) and `t_first_fetch_s` (the first node started: the
  order reached it over its signal channel, or else with a heartbeat reply), the delivery delays
  that count against the bound;
- `t_min_s`, `t_min_measured_s`: the swarm bench's Kumar-Ross bound, nominal and with the rate
  iperf3 measured over one link; `ratio` = t_s / t_min_s;
- `samples`: [t, waiting, fetching, complete, failed, mean progress] per poll; `status_text`: the
  admin CLI's `preheat status` at the end.
Every peer's cached copy is then materialised (`p2pd fetch`, from its own cache) and compared with
the payload (cmp).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from netsim.bench.harness import (
    LAB_ADMIN_PORT,
    LAB_TOKEN,
    NEUTRAL_CWD,
    BenchError,
    GatedProcess,
    Member,
    admin_api,
    build_net,
    child_env,
    log_time,
    make_payload,
    p2pd_cmd,
    publish,
    start_lab,
    stop_all,
    tail,
    tracker_cmd,
    verify_copy,
    write_json,
)
from netsim.bench.model import kumar_ross
from netsim.bench.swarm import SHM, SwarmOptions, measure_iperf, preflight, revision, t_min_nominal
from netsim.emu import Topology, new_prefix
from p2pd.identity import JOIN_SECRET_ENV, new_join_secret
from p2pd.units import format_bits_rate, format_size_exact

NAME = "bench:preheat"
COMPLETE_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*preheat (\S+) \(order (\S+)\): complete")
STARTED_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*preheat (\S+) \(order (\S+)\): fetching")


@dataclass
class PreheatOptions:
    """What `python -m netsim.bench preheat` was asked for (rate in bit/s, size in bytes, times in s)."""

    peers: int = 8
    size: int = 512 << 20
    rate_bps: int = 200_000_000
    interval: float = 1.0
    poll_s: float = 0.25
    iperf: bool = True
    timeout_s: float = 600.0
    keep: bool = False
    command: str = ""


def preheat_times(log_text: str, order: str) -> tuple[float | None, float | None]:
    """(started, complete) epoch seconds of `order` in one daemon's log (None where it has no such line)."""
    started = complete = None
    for line in log_text.splitlines():
        if (m := STARTED_LINE.match(line)) and m.group(3) == order and started is None:
            started = log_time(m.group(1))
        elif (m := COMPLETE_LINE.match(line)) and m.group(3) == order and complete is None:
            complete = log_time(m.group(1))
    return started, complete


def _status(seed: Member) -> dict[str, Any]:
    """The order's status from the admin API (curl: tens of ms, so polling does not lag)."""
    orders = admin_api(seed, "GET", f"/v1/preheat?name={NAME}")["orders"]
    if not orders:
        raise BenchError("admin API GET /v1/preheat: the order is not listed")
    return dict(orders[0])


def run_preheat(o: PreheatOptions, log: IO[str] = sys.stderr) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); returns the JSON-able result."""
    preflight(
        [("ip", "iproute2"), ("tc", "iproute2"), ("cmp", "diffutils"), ("curl", "curl")]
        + ([("iperf3", "iperf3")] if o.iperf else [])
    )
    if o.peers < 1 or o.size < 1:
        raise BenchError("--peers and --size must be positive")
    need = o.size * (o.peers + 3) + (512 << 20)  # payload, every node's cache, one copy being compared
    free = shutil.disk_usage(SHM).free
    if free < need:
        raise BenchError(f"{SHM} has {free >> 20} MiB free, this run needs ~{need >> 20} MiB")
    prefix = new_prefix()
    work = os.path.join(SHM, f"netsim-{prefix}")
    os.makedirs(work)
    os.chmod(work, 0o755)
    procs: list[subprocess.Popen] = []
    # a secured cluster, as deployed (docs/security.md): every process of the lab inherits the secret
    os.environ.setdefault(JOIN_SECRET_ENV, new_join_secret())
    env = child_env()
    bound = SwarmOptions(peers=o.peers, size=o.size, rate_bps=o.rate_bps, topology="emu")
    t_min = t_min_nominal(bound)
    assert t_min is not None  # emu topology: the links have rates

    def say(msg: str) -> None:
        print(f"[preheat] {msg}", file=log, flush=True)

    measured_bps: float | None = None
    samples: list[list[float]] = []
    try:
        payload = os.path.join(work, "payload.bin")
        make_payload(payload, o.size)
        with Topology(prefix) as topo:
            try:
                net = build_net(topo, "emu", o.peers, o.rate_bps, None)
                members = [Member(n.name, n.host, n.ip, "", os.path.join(work, f"data-{n.name}")) for n in net.nodes()]
                seed, peers = members[0], members[1:]
                if o.iperf:
                    measured_bps = measure_iperf(net)
                    say(f"iperf3 seed->p1: {measured_bps / 1e6:.1f} Mbit/s")
                daemons = start_lab(members, work, o.interval, procs)
                publish(seed, payload, NAME)
                time.sleep(2 * o.interval)  # the seed's holdings reached the tracker with a heartbeat
                say(
                    f"1 seed + {o.peers} peers, {format_size_exact(o.size)}, links {format_bits_rate(o.rate_bps)}, "
                    f"T_min {t_min:.2f} s ({prefix})"
                )
                # the admin CLI behind the start gate, as the swarm bench starts `p2pd fetch`: its interpreter
                # start-up (0.5-1 s here) is not the system's time to preheat
                admin = GatedProcess(
                    net.seed,
                    "",
                    [
                        *tracker_cmd(),
                        "admin",
                        "preheat",
                        NAME,
                        "--all",
                        "--tracker",
                        f"http://{seed.ip}:{LAB_ADMIN_PORT}",
                        "--token",
                        LAB_TOKEN,
                        "--json",
                    ],
                    work,
                    "admin-preheat",
                )
                admin.wait_ready()
                t0_wall, t0 = time.time(), time.monotonic()
                admin.go()
                try:
                    rc = admin.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    raise BenchError("p2p-tracker admin preheat did not return within 60 s") from None
                if rc != 0:
                    raise BenchError(f"p2p-tracker admin preheat: exit {rc}: {tail(admin.stderr_path)}")
                t_ordered = time.monotonic() - t0
                with open(admin.stdout_path) as f:
                    ordered = json.load(f)
                order_id = str(ordered["order"])
                say(f"t={t_ordered:.2f}s order {order_id} placed for {len(ordered['nodes'])} nodes")
                t_status: float | None = None
                last: dict[str, Any] = {}
                while t_status is None:
                    now = time.monotonic() - t0
                    if now > o.timeout_s:
                        raise BenchError(f"timeout after {o.timeout_s:.0f} s; last status {last}")
                    dead = [m.name for m in members if daemons[m.name].poll() is not None]
                    if dead:
                        raise BenchError(f"p2pd on {dead[0]} exited: {tail(os.path.join(work, dead[0] + '.log'))}")
                    last = _status(seed)
                    rows = last["nodes"]
                    progress = sum(float(r["progress"]) for r in rows) / len(rows)
                    t = round(time.monotonic() - t0, 2)
                    samples.append([t, last["waiting"], last["fetching"], last["complete"], last["failed"], progress])
                    if last["failed"]:
                        errors = {r["node_id"][:12]: r["error"] for r in rows if r["state"] == "failed"}
                        raise BenchError(f"preheat failed on {len(errors)} node(s): {errors}")
                    if last["complete"] == len(rows):
                        t_status = t
                    else:
                        time.sleep(o.poll_s)
                say(f"t={t_status:.2f}s status: all {len(last['nodes'])} nodes complete")
                cp = seed.host.run(
                    [
                        *tracker_cmd(),
                        "admin",
                        "preheat",
                        "status",
                        NAME,
                        "--tracker",
                        f"http://{seed.ip}:{LAB_ADMIN_PORT}",
                        "--token",
                        LAB_TOKEN,
                    ],
                    check=False,
                    env=child_env({"COLUMNS": "200"}),  # its table's title on one line
                    cwd=NEUTRAL_CWD,
                    timeout=60,
                )
                if cp.returncode != 0:
                    raise BenchError(f"admin preheat status exit {cp.returncode}: {cp.stderr.strip()[-400:]}")
                status_text = cp.stdout
                started: dict[str, float] = {}
                complete: dict[str, float] = {}
                for m in peers:
                    with open(os.path.join(work, m.name + ".log"), errors="replace") as f:
                        s, c = preheat_times(f.read(), order_id)
                    if c is None:
                        raise BenchError(f"{m.name}: status says complete, its log has no preheat complete line")
                    complete[m.name] = c - t0_wall
                    if s is not None:
                        started[m.name] = s - t0_wall
                for m in peers:
                    out = os.path.join(work, f"out-{m.name}")
                    os.makedirs(out)
                    cp = m.host.run(
                        [*p2pd_cmd(), "fetch", NAME, "--dest", out, "--data-dir", m.data],
                        check=False,
                        env=env,
                        cwd=NEUTRAL_CWD,
                        timeout=300,
                    )
                    if cp.returncode != 0:
                        raise BenchError(f"p2pd fetch (from the cache) on {m.name}: {cp.stderr.strip()[-400:]}")
                    verify_copy(payload, out, m.name)
                    shutil.rmtree(out, ignore_errors=True)
            finally:
                stop_all(topo, procs, timeout=10)
    finally:
        if not o.keep:
            shutil.rmtree(work, ignore_errors=True)
    return report(o, t_min, measured_bps, t_ordered, started, complete, t_status, samples, status_text)


def report(
    o: PreheatOptions,
    t_min: float,
    measured_bps: float | None,
    t_ordered: float,
    started: dict[str, float],
    complete: dict[str, float],
    t_status: float,
    samples: list[list[float]],
    status_text: str,
) -> dict[str, Any]:
    t_end = max(complete.values())
    t_min_meas = None
    if measured_bps:
        r = measured_bps  # every link shaped alike: the measured rate stands for each
        t_min_meas = kumar_ross(o.size, r, [r] * o.peers, [r] * o.peers)
    out: dict[str, Any] = {
        "benchmark": "preheat",
        "command": o.command,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "revision": revision(),
        "machine": {"nproc": os.cpu_count(), "loadavg": os.getloadavg()},
        "peers": o.peers,
        "size_bytes": o.size,
        "rate_bps": o.rate_bps,
        "interval_s": o.interval,
        "t_min_s": round(t_min, 3),
        "t_min_measured_s": None if t_min_meas is None else round(t_min_meas, 3),
        "iperf3_bps": None if measured_bps is None else round(measured_bps),
        "t_s": round(t_end, 2),
        "ratio": round(t_end / t_min, 3),
        "ratio_measured": None if t_min_meas is None else round(t_end / t_min_meas, 3),
        "t_status_s": t_status,
        "t_ordered_s": round(t_ordered, 2),
        "t_first_fetch_s": round(min(started.values()), 2) if started else None,
        "t_last_fetch_s": round(max(started.values()), 2) if started else None,
        "per_peer_s": {k: round(v, 2) for k, v in sorted(complete.items())},
        "samples_fields": ["t", "waiting", "fetching", "complete", "failed", "progress"],
        "samples": [[round(x, 3) for x in s] for s in samples],
        "status_text": status_text,
    }
    out["headline"] = (
        f"preheat 1+{o.peers} {format_size_exact(o.size)} @ {format_bits_rate(o.rate_bps)}: "
        f"T {out['t_s']} s = {out['ratio']}x T_min {out['t_min_s']} s"
        + (f" ({out['ratio_measured']}x measured)" if out["ratio_measured"] else "")
        + f"; order delivered by {out['t_last_fetch_s']} s, status complete at {t_status} s"
    )
    return out


def add_arguments(p: argparse.ArgumentParser, size: Callable[[str], int], rate_bits: Callable[[str], int]) -> None:
    p.add_argument("--peers", type=int, default=8)
    p.add_argument("--size", type=size, default=512 << 20, help="payload SIZE")
    p.add_argument("--rate", type=rate_bits, default=200_000_000, help="every link, both ways (RATE)")
    p.add_argument("--interval", type=float, default=1.0, help="the tracker's heartbeat interval (s)")
    p.add_argument("--no-iperf", action="store_true", help="skip the iperf3 measurement of one link")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs) in /dev/shm")
    p.add_argument("--json", default=None, help="also write the JSON result to this file")


def run(a: argparse.Namespace, command: str) -> int:
    """`python -m netsim.bench preheat ...`: print the JSON, then the headline; 2 if it could not run."""
    o = PreheatOptions(
        peers=a.peers,
        size=a.size,
        rate_bps=a.rate,
        interval=a.interval,
        iperf=not a.no_iperf,
        timeout_s=a.timeout,
        keep=a.keep,
        command=command,
    )
    res = run_preheat(o, sys.stderr)
    print(write_json(res, a.json))
    print(res["headline"])
    return 0
