"""`python -m netsim.bench throttle`: bandwidth governance (issue #13) measured on emulated links.

Scenario `budget` (global budgets, tracker/budgets.py): 1 seed + N leechers on one switch, every link
tbf-shaped to RATE; the tracker (with its admin API) in the seed's namespace, a `p2pd run` per node
(`--zone`, when --zones > 1). A budget is set with `p2p-tracker admin throttle set` before the
leechers start; optionally changed at --change-at seconds (--change), then paused (`--total 0`) for
--pause seconds and cleared. What every node sends is read off the switch side of its link (bytes the
switch received from it: TCP/IP headers included, nothing the node says about itself) every 0.1 s.

Reported (JSON):
- per 1-s window (aligned to the start) the summed upload and the budget in force; `budget_error_max`
  is the largest |rate / budget - 1| over steady windows (those starting one interval + 1 s after a
  start or change, and ending before the first leecher completes), `budget_ratio_mean` their mean;
  `max_error_judged` / `ratio_mean_judged` over `windows_judged`: the windows in which data moves for the
  whole window (one interval + 1 s after a start or change, the issue's allowance, until the last byte of
  the last copy, `t_last_byte_s`, from each leecher daemon's `complete` log line); a window holding the
  end of the transfer is not a budget error, every other under- or overshoot counts;
  `max_error_all_fetching` over `windows_all_fetching`: the judged windows that end by the FIRST copy's
  last byte (every leecher still fetching). In a window where copies complete, the last pieces go
  to fewer receivers than there are senders, faster than a split (one interval, 1-2 s) can move the
  shares of the nodes left without requests (BENCHMARKS.md, "every window within 5 %");
- `reaction_s`: from the change to the end of the first 1-s window (sliding, 0.1 s steps) whose
  rate is within 0.8-1.1x the new budget (the issue's bounds for a budget that holds);
- `pause_rate_max_bps`: the fastest window of the pause after one interval + 1 s (heartbeats only,
  ideally);
- `t_s` (last leecher done) against `t_budget_s` = N·F / budget (the bound when the budget binds);
- with --zones > 1 and --cross-zone: `cross_zone_F`, bytes sent between zones (iptables counters in
  every namespace, per destination address) over the payload size F.
Times count from the first 256 KiB on the wire. Every copy is compared with the payload (cmp).

Other scenarios (automatic node throttling) register in SCENARIOS with their own runner.
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
    NEUTRAL_CWD,
    BenchError,
    Member,
    admin_api,
    admin_cli,
    child_env,
    log_time,
    make_payload,
    p2pd_cmd,
    publish,
    start_lab,
    stop_all,
    tail,
    verify_copy,
    write_json,
)
from netsim.bench.swarm import SHM, preflight, revision
from netsim.emu import Topology, new_prefix
from p2pd.identity import JOIN_SECRET_ENV, new_join_secret
from p2pd.units import format_bits_rate, format_size_exact

SAMPLE_EVERY = 0.1
REACHED = (0.8, 1.1)  # a 1-s window within these fractions of a new budget: the change took effect
# a daemon's log line when its copy is whole and verified (p2pd/swarm.py): the moment its last byte arrived
COMPLETE_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .* complete: \d+ bytes verified")
FIRST_BYTES = 256 * 1024  # switch-side bytes that mark the start of the transfer (heartbeats are far less)


@dataclass
class ThrottleOptions:
    """What `python -m netsim.bench throttle` was asked for (rates in bit/s, sizes in bytes, times in s)."""

    scenario: str = "budget"
    peers: int = 4
    size: int = 64 << 20
    rate_bps: int = 100_000_000
    budget_bps: int = 40_000_000
    change_bps: int | None = None  # the budget after `change_at`
    change_at: float = 0.0
    pause_s: float = 0.0  # after the change (or at change_at without one): --total 0 this long, then clear
    zones: int = 1
    cross_zone_bps: int | None = None
    interval: float = 1.0
    timeout_s: float = 300.0
    keep: bool = False
    trace: bool = False
    command: str = ""


def _switch_rx(sw_ns: str, ifs: dict[str, str]) -> dict[str, int]:
    """Bytes the switch received from each node (= what the node sent), one `ip` call for all ports."""
    cp = subprocess.run(["ip", "-n", sw_ns, "-s", "-j", "link", "show"], capture_output=True, text=True, check=True)
    by_if = {d["ifname"]: d["stats64"] for d in json.loads(cp.stdout) if "stats64" in d}
    return {name: int(by_if[i]["rx"]["bytes"]) for name, i in ifs.items()}


def _count_cross_zone(members: list[Member]) -> None:
    """An iptables counting rule (no target) per destination in another zone, in every namespace."""
    for m in members:
        for o in members:
            if o.zone != m.zone:
                m.host.run(["iptables", "-A", "OUTPUT", "-d", o.ip, "-p", "tcp"], timeout=30)


def _cross_zone_bytes(members: list[Member]) -> int:
    total = 0
    for m in members:
        cp = m.host.run(["iptables", "-L", "OUTPUT", "-v", "-x", "-n"], timeout=30)
        for line in cp.stdout.splitlines()[2:]:
            parts = line.split()
            if len(parts) >= 2 and parts[0].isdigit():
                total += int(parts[1])
    return total


def run_budget(o: ThrottleOptions, log: IO[str]) -> dict[str, Any]:
    """The `budget` scenario (see the module docstring)."""
    preflight(
        [("ip", "iproute2"), ("tc", "iproute2"), ("cmp", "diffutils"), ("curl", "curl")]
        + ([("iptables", "iptables")] if o.zones > 1 else [])
    )
    if o.peers < 1 or o.size < 1 or o.zones < 1 or o.zones > o.peers + 1:
        raise BenchError("--peers and --size must be positive, --zones between 1 and peers + 1")
    prefix = new_prefix()
    work = os.path.join(SHM, f"netsim-{prefix}")
    os.makedirs(work)
    os.chmod(work, 0o755)
    procs: list[subprocess.Popen] = []
    # a secured cluster, as deployed (docs/security.md): every process of the lab inherits the secret
    os.environ.setdefault(JOIN_SECRET_ENV, new_join_secret())
    env = child_env()

    def say(msg: str) -> None:
        print(f"[throttle] {msg}", file=log, flush=True)

    try:
        payload = os.path.join(work, "payload.bin")
        make_payload(payload, o.size)
        with Topology(prefix) as topo:
            try:
                lan = topo.add_switch("lan")
                members: list[Member] = []
                for i in range(o.peers + 1):
                    name = "seed" if i == 0 else f"p{i}"
                    h = topo.add_host(name, lan, rate=o.rate_bps)
                    zone = f"z{i * o.zones // (o.peers + 1)}"
                    members.append(Member(name, h, h.ip or "", zone, os.path.join(work, f"data-{name}")))
                seed, leechers = members[0], members[1:]
                ifs = {m.name: m.host.links[0].switch_if for m in members}
                if o.zones > 1:
                    _count_cross_zone(members)
                start_lab(members, work, o.interval, procs, zones=o.zones > 1)
                publish(seed, payload, "bench:throttle")
                budget_args = ["--total", f"{o.budget_bps}bit/s"]
                if o.cross_zone_bps is not None:
                    budget_args += ["--cross-zone", f"{o.cross_zone_bps}bit/s"]
                admin_cli(seed, "throttle", "set", *budget_args)
                say(
                    f"1 seed + {o.peers} peers, {format_size_exact(o.size)}, links {format_bits_rate(o.rate_bps)}, "
                    f"budget {format_bits_rate(o.budget_bps)} ({prefix})"
                )
                time.sleep(o.interval * 2)  # every node has its share before the leechers start
                fetches = {}
                outs = {}
                for m in leechers:
                    outs[m.name] = os.path.join(work, f"out-{m.name}")
                    os.makedirs(outs[m.name])
                    fetches[m.name] = m.host.popen(
                        [*p2pd_cmd(), "fetch", "bench:throttle", "--dest", outs[m.name], "--data-dir", m.data],
                        log=os.path.join(work, f"fetch-{m.name}.log"),
                        stdout=subprocess.DEVNULL,
                        env=env,
                        cwd=NEUTRAL_CWD,
                    )
                    procs.append(fetches[m.name])
                # the clock starts with the first bytes of the payload (not with `p2pd fetch` starting up)
                base = _switch_rx(lan.ns, ifs)
                end = time.monotonic() + 60
                while True:
                    rx = _switch_rx(lan.ns, ifs)
                    if sum(n - base[k] for k, n in rx.items()) >= FIRST_BYTES:
                        break
                    bad = [k for k, p in fetches.items() if p.poll() is not None and p.returncode != 0]
                    if bad or time.monotonic() > end:
                        why = tail(os.path.join(work, f"fetch-{bad[0]}.log")) if bad else "no bytes in 60 s"
                        raise BenchError(f"the transfer never started: {why}")
                    time.sleep(0.02)
                t0, t0_wall = time.monotonic(), time.time()
                base = rx
                samples: list[tuple[float, int]] = [(0.0, 0)]
                by_node: dict[str, list[tuple[float, int]]] = {k: [(0.0, 0)] for k in rx}  # --trace: per sender
                # (time, budget in force, bit/s; None = cleared)
                events: list[tuple[float, float | None]] = [(0.0, float(o.budget_bps))]
                plan: list[tuple[float, Callable[[], None], float | None]] = []
                at = o.change_at
                cross_bytes = None if o.cross_zone_bps is None else o.cross_zone_bps / 8
                if o.change_bps is not None:
                    cb = o.change_bps
                    plan.append(
                        (
                            at,
                            lambda: admin_api(
                                seed, "PUT", "/v1/throttle", {"total": cb / 8, "cross_zone": cross_bytes}
                            ),
                            float(cb),
                        )
                    )
                if o.pause_s > 0:
                    start = at + (o.pause_s if o.change_bps is None else max(o.pause_s, 4.0 * o.interval + 2.0))
                    if o.change_bps is None:
                        start = at
                    plan.append(
                        (
                            start,
                            lambda: admin_api(seed, "PUT", "/v1/throttle", {"total": 0, "cross_zone": cross_bytes}),
                            0.0,
                        )
                    )
                    plan.append((start + o.pause_s, lambda: admin_api(seed, "DELETE", "/v1/throttle"), None))
                done: dict[str, float] = {}
                # --trace: every node's [rate, demand, share] Mbit/s and its progress (0-1) each second
                trace: list[dict[str, Any]] = []
                next_trace = 0.0
                while len(done) < len(leechers):
                    now = time.monotonic() - t0
                    if now > o.timeout_s:
                        raise BenchError(
                            f"timeout after {o.timeout_s:.0f} s; unfinished: {sorted(set(fetches) - set(done))}"
                        )
                    while plan and now >= plan[0][0]:
                        _, act, new = plan.pop(0)
                        t_call = time.monotonic() - t0
                        act()
                        events.append(((t_call + time.monotonic() - t0) / 2, new))
                        what = "cleared" if new is None else format_bits_rate(int(new))
                        say(f"t={events[-1][0]:.1f}s budget -> {what}")
                    for name, p in fetches.items():
                        if name not in done and p.poll() is not None:
                            if p.returncode != 0:
                                why = tail(os.path.join(work, f"fetch-{name}.log"))
                                raise BenchError(f"fetch on {name} exit {p.returncode}: {why}")
                            done[name] = time.monotonic() - t0
                    rx = _switch_rx(lan.ns, ifs)
                    samples.append((time.monotonic() - t0, sum(rx[k] - base[k] for k in rx)))
                    for k, series in by_node.items():
                        series.append((samples[-1][0], rx[k] - base[k]))
                    if o.trace and samples[-1][0] >= next_trace:
                        next_trace += 1.0
                        view = admin_api(seed, "GET", "/v1/throttle")
                        swarm = admin_api(seed, "GET", "/v1/swarm?name=bench:throttle")
                        progress = {h["node_id"]: h["progress"] for h in swarm["holders"]}
                        trace.append(
                            {
                                "t": round(samples[-1][0], 2),
                                "nodes": {
                                    n["node_id"][:8]: [
                                        *(
                                            round(n[k] * 8 / 1e6, 1) if n[k] is not None else None
                                            for k in ("rate", "demand", "share")
                                        ),
                                        round(progress.get(n["node_id"], 0.0), 3),
                                    ]
                                    for n in view["nodes"]
                                },
                            }
                        )
                    time.sleep(SAMPLE_EVERY)
                for m in leechers:
                    verify_copy(payload, outs[m.name], m.name)
                last_byte = {m.name: completed_at(os.path.join(work, m.name + ".log")) - t0_wall for m in leechers}
                cross = _cross_zone_bytes(members) if o.zones > 1 else None
            finally:
                stop_all(topo, procs, timeout=10)
    finally:
        if not o.keep:
            shutil.rmtree(work, ignore_errors=True)
    res = report(o, samples, events, done, cross, last_byte)
    if o.trace:
        res["trace"] = trace
        # what each node sent in each 1-s window (Mbit/s, at the switch): who fell short in an off window
        res["window_nodes"] = [
            {
                k: None if (r := rate_at(series, w["t"], w["t"] + 1)) is None else round(r / 1e6, 2)
                for k, series in by_node.items()
            }
            for w in res["windows"]
        ]
    return res


def completed_at(log_path: str) -> float:
    """Epoch time of the daemon's `complete: N bytes verified` line (its copy's last byte, verified)."""
    with open(log_path, errors="replace") as f:
        for line in f:
            if m := COMPLETE_LINE.match(line):
                return log_time(m.group(1))
    raise BenchError(f"{log_path}: the fetch exited 0 but the daemon never logged its copy complete")


def _count_at(samples: list[tuple[float, int]], t: float) -> float | None:
    """Bytes sent by time t, interpolated between the samples around it (None outside the samples)."""
    for (ta, na), (tb, nb) in zip(samples, samples[1:], strict=False):
        if ta <= t <= tb:
            return na + (nb - na) * (t - ta) / (tb - ta) if tb > ta else float(nb)
    return None


def rate_at(samples: list[tuple[float, int]], a: float, b: float) -> float | None:
    """Bits/s between times a and b (None when the samples do not cover both)."""
    na, nb = _count_at(samples, a), _count_at(samples, b)
    return None if na is None or nb is None else (nb - na) * 8 / (b - a)


def budget_at(events: list[tuple[float, float | None]], t: float) -> float | None:
    cur: float | None = None
    for at, b in events:
        if at <= t:
            cur = b
    return cur


def report(
    o: ThrottleOptions,
    samples: list[tuple[float, int]],
    events: list[tuple[float, float | None]],
    done: dict[str, float],
    cross: int | None,
    last_byte: dict[str, float] | None = None,
) -> dict[str, Any]:
    """`done`: when each leecher's `p2pd fetch` exited; `last_byte`: when its daemon had the whole copy
    (its log; defaults to `done`). Windows are judged while data moves for the whole window: steady
    (one interval + 1 s after a start or change, the issue's allowance) and ending by the last byte."""
    first_done = min(done.values())
    data_end = max((last_byte or done).values())
    first_copy = min((last_byte or done).values())
    t_end = max(done.values())
    settle = o.interval + 1.0
    windows: list[dict[str, Any]] = []
    k = 0
    while k + 1 <= samples[-1][0]:
        r = rate_at(samples, k, k + 1)
        b = budget_at(events, k)
        # one budget in force for the whole window, set at least one interval + 1 s before it starts
        settled = (
            r is not None
            and b is not None
            and b > 0
            and budget_at(events, k + 1 - 1e-6) == b
            and all(k + 1 <= at or k >= at + settle for at, _ in events)
        )
        steady = settled and k + 1 <= first_done
        judged = settled and k + 1 <= data_end
        windows.append(
            {
                "t": k,
                "rate_bps": None if r is None else round(r),
                "budget_bps": b,
                "steady": steady,
                "judged": judged,
                "all_fetching": judged and k + 1 <= first_copy,
            }
        )
        k += 1
    ratios = [w["rate_bps"] / w["budget_bps"] for w in windows if w["steady"]]
    judged_ratios = [w["rate_bps"] / w["budget_bps"] for w in windows if w["judged"]]
    fetching_ratios = [w["rate_bps"] / w["budget_bps"] for w in windows if w["all_fetching"]]
    reaction = None
    change = next(((at, b) for at, b in events[1:] if b), None)
    if change is not None:
        at, b = change
        t = at + 1.0
        while t <= samples[-1][0]:
            r = rate_at(samples, t - 1.0, t)
            if r is not None and REACHED[0] <= r / b <= REACHED[1]:
                reaction = round(t - at, 2)
                break
            t += SAMPLE_EVERY
    pause = next(((at, nxt) for (at, b), (nxt, _) in zip(events, events[1:], strict=False) if b == 0), None)
    pause_max = None
    if pause is not None:
        rs = []
        t = pause[0] + settle + 1.0
        while t <= pause[1]:
            r = rate_at(samples, t - 1.0, t)
            if r is not None:
                rs.append(r)
            t += SAMPLE_EVERY
        pause_max = round(max(rs)) if rs else None
    t_budget = o.peers * o.size * 8 / o.budget_bps
    out: dict[str, Any] = {
        "benchmark": "throttle",
        "scenario": o.scenario,
        "command": o.command,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "revision": revision(),
        "machine": {"nproc": os.cpu_count()},
        "peers": o.peers,
        "size_bytes": o.size,
        "rate_bps": o.rate_bps,
        "budget_bps": o.budget_bps,
        "change_bps": o.change_bps,
        "interval_s": o.interval,
        "zones": o.zones,
        "cross_zone_bps": o.cross_zone_bps,
        "events": [{"t": round(at, 2), "budget_bps": b} for at, b in events],
        "windows": windows,
        "steady_windows": len(ratios),
        "budget_error_max": None if not ratios else round(max(abs(x - 1) for x in ratios), 4),
        "budget_ratio_mean": None if not ratios else round(sum(ratios) / len(ratios), 4),
        "budget_ratio_max": None if not ratios else round(max(ratios), 4),
        "windows_judged": len(judged_ratios),
        "max_error_judged": None if not judged_ratios else round(max(abs(x - 1) for x in judged_ratios), 4),
        "ratio_mean_judged": None if not judged_ratios else round(sum(judged_ratios) / len(judged_ratios), 4),
        "windows_all_fetching": len(fetching_ratios),
        "max_error_all_fetching": None if not fetching_ratios else round(max(abs(x - 1) for x in fetching_ratios), 4),
        "t_last_byte_s": round(data_end, 2),
        "reaction_s": reaction,
        "pause_rate_max_bps": pause_max,
        "t_s": round(t_end, 2),
        "per_leecher_s": {k: round(v, 2) for k, v in sorted(done.items())},
        "last_byte_per_leecher_s": {k: round(v, 2) for k, v in sorted((last_byte or done).items())},
        "t_budget_s": round(t_budget, 2),
        "t_over_t_budget": round(t_end / t_budget, 3),
        "cross_zone_F": None if cross is None else round(cross / o.size, 3),
    }
    out["headline"] = (
        f"throttle 1+{o.peers} {format_size_exact(o.size)} budget {format_bits_rate(o.budget_bps)}: "
        f"max error {out['max_error_judged']} over {len(judged_ratios)} judged windows "
        f"(mean {out['ratio_mean_judged']}x budget), "
        f"T/(N·F/budget) {out['t_over_t_budget']}"
        + (f", reaction {reaction} s" if reaction is not None else "")
        + (f", cross-zone {out['cross_zone_F']} F" if cross is not None else "")
    )
    return out


SCENARIOS: dict[str, Callable[[ThrottleOptions, IO[str]], dict[str, Any]]] = {"budget": run_budget}


def add_arguments(p: argparse.ArgumentParser, size: Callable[[str], int], rate_bits: Callable[[str], int]) -> None:
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="budget")
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--size", type=size, default=64 << 20, help="payload SIZE")
    p.add_argument("--rate", type=rate_bits, default=100_000_000, help="every link, both ways (RATE)")
    p.add_argument("--budget", type=rate_bits, default=40_000_000, help="global total budget (RATE)")
    p.add_argument("--change", type=rate_bits, default=None, help="the budget after --change-at (RATE)")
    p.add_argument("--change-at", type=float, default=0.0, help="seconds after the leechers start")
    p.add_argument("--pause", type=float, default=0.0, help="then pause (--total 0) this long and clear (s)")
    p.add_argument("--zones", type=int, default=1, help="nodes spread over this many zones")
    p.add_argument("--cross-zone", type=rate_bits, default=None, help="cross-zone budget (RATE)")
    p.add_argument("--interval", type=float, default=1.0, help="the tracker's heartbeat interval (s)")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs) in /dev/shm")
    p.add_argument("--trace", action="store_true", help="every node's rate, demand, share and progress each second")
    p.add_argument("--json", default=None, help="also write the JSON result to this file")


def run(a: argparse.Namespace, command: str) -> int:
    """`python -m netsim.bench throttle ...`: print the JSON, then the headline; 2 if it could not run."""

    o = ThrottleOptions(
        scenario=a.scenario,
        peers=a.peers,
        size=a.size,
        rate_bps=a.rate,
        budget_bps=a.budget,
        change_bps=a.change,
        change_at=a.change_at,
        pause_s=a.pause,
        zones=a.zones,
        cross_zone_bps=a.cross_zone,
        interval=a.interval,
        timeout_s=a.timeout,
        keep=a.keep,
        trace=a.trace,
        command=command,
    )
    res = SCENARIOS[o.scenario](o, sys.stderr)  # BenchError/EmuError/Terminated: netsim.bench's main says it
    print(write_json(res, a.json))
    print(res["headline"])
    return 0
