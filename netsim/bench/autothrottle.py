"""Automatic node throttling in emulation: a TCP service (iperf3) shares a node's link with p2pd.

    python -m netsim.bench autothrottle --rate 200Mbit/s --json autothrottle.json
    python -m netsim.bench autothrottle --directions upload --services greedy --modes on,off

One run: three namespaces on a switch. `node`'s link is shaped to RATE both ways (the only bottleneck; the
others are unshaped); `peer` is the other p2pd node (and runs the tracker); `svc` runs `iperf3 -s`.
Upload: `node` seeds a payload that `peer` fetches, and the service is `iperf3 -c svc` on `node` (node -> svc).
Download: `peer` seeds, `node` fetches, and the service is `iperf3 -c svc -R` (svc -> node). Timeline: the
service alone first (its idle-link rate), then p2pd alone for --warmup s, then the service for --service s
beside p2pd, then p2pd alone for --after s. Rates are read off the switch side of each port every 0.25 s
(wire bytes, headers included), so the numbers do not depend on either program's own reports.

Reported per run (goals from issue #13): the service's average over its run / its idle-link rate (>= 0.9),
seconds until the service reaches 0.8x its idle rate (<= 2), p2pd's average while the service runs / what
the service leaves free (what the link carries - service; >= 0.9; meaningful for a paced service, which leaves
room; `p2pd_use_of_nominal_free` is the same against the nominal rate, which tbf's link does not reach on the
switch-side counters), seconds until the node sets a limit (`p2pd_yield_s`: is the newcomer seen at all? the
`small` service, paced at --small-rate, asks that of one well under p2pd's rate), and seconds after the
service stops until p2pd is back at 0.8x the link (<= 3). `--modes off` runs p2pd with
`--auto-throttle off` for comparison: then the service gets only its TCP share beside p2pd's connections.
`--modes utp` runs libtorrent in p2pd's place (same payload, seed and leecher, its own tracker on `peer`) with
uTP only (no TCP), so its every byte is under LEDBAT, the less-than-best-effort congestion control BitTorrent
uses to yield to other traffic: the comparison issue #13 asks for, in the same columns.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any, Generic, Self, TypeVar

from netsim.bench.bt import make_torrent
from netsim.bench.clients.base import LineLeecher
from netsim.bench.clients.bittorrent import TRACKER_PORT as BT_TRACKER_PORT
from netsim.bench.clients.bittorrent import piece_size
from netsim.bench.clients.p2pd import NODE_PORT, TRACKER_PORT
from netsim.bench.harness import (
    NEUTRAL_CWD,
    BenchError,
    Node,
    child_env,
    make_payload,
    p2pd_cmd,
    stop_all,
    tail,
    tracker_cmd,
    wait_tcp,
    write_json,
)
from netsim.emu import Host, Topology
from p2pd.identity import JOIN_SECRET_ENV, new_join_secret
from p2pd.rpc import RpcError, call_blocking
from p2pd.units import format_bits_rate, parse_size

TICK = 0.25
T = TypeVar("T")
IPERF_PORT = 5201
LT_PORT = 7001


@dataclass
class Options:
    rate_bps: int = 200_000_000
    size: int = parse_size("512MiB")
    directions: list[str] = field(default_factory=lambda: ["upload", "download"])
    services: list[str] = field(default_factory=lambda: ["greedy", "half"])  # half: iperf3 -b rate/2
    small_bps: int = 10_000_000  # the `small` service: iperf3 -b this (a newcomer well under p2pd's rate)
    modes: list[str] = field(default_factory=lambda: ["on", "off"])
    warmup_s: float = 8.0
    service_s: float = 10.0
    after_s: float = 5.0
    idle_s: float = 4.0
    p2pd_run_args: list[str] = field(default_factory=list)
    keep: bool = False
    command: str = ""


def missing() -> str | None:
    """Why the scenario cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "tc", "iperf3"):
        if not shutil.which(tool):
            return f"`{tool}` not found (apt-get install {'iperf3' if tool == 'iperf3' else 'iproute2'})"
    return None


class _Ticker(Generic[T]):
    """A thread that takes one sample every TICK s while its `with` block lasts; a read that fails stops it
    and leaves the reason in `error`."""

    join_timeout = 5.0

    def __init__(self) -> None:
        self.samples: list[tuple[float, T]] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.join_timeout)

    def _sample(self) -> T | None:
        raise NotImplementedError

    def _loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                sample = self._sample()
            except (OSError, subprocess.CalledProcessError, KeyError, ValueError) as e:
                self.error = f"{type(e).__name__}: {e}"
                return
            if sample is not None:
                self.samples.append((t, sample))
            next_at += TICK
            self._stop.wait(max(0.0, next_at - time.monotonic()))


class Sampler(_Ticker[dict[str, tuple[int, int]]]):
    """Switch-side byte counters of every port (host -> (to host, from host)), one `ip -s -j link` per sample."""

    def __init__(self, switch_ns: str, ports: dict[str, str]) -> None:
        super().__init__()
        self.switch_ns = switch_ns
        self.ports = ports  # host name -> switch-side interface

    def _sample(self) -> dict[str, tuple[int, int]]:
        cp = subprocess.run(
            ["ip", "-n", self.switch_ns, "-s", "-j", "link", "show"], capture_output=True, text=True, check=True
        )
        by_if = {d["ifname"]: d["stats64"] for d in json.loads(cp.stdout) if "stats64" in d}
        return {h: (by_if[i]["tx"]["bytes"], by_if[i]["rx"]["bytes"]) for h, i in self.ports.items()}

    def rates(self, host: str, toward: bool) -> list[tuple[float, float]]:
        """(time at the end of each interval, bytes/s) delivered to `host` (toward) or sent by it."""
        k = 0 if toward else 1
        out = []
        for (t0, a), (t1, b) in zip(self.samples, self.samples[1:], strict=False):
            out.append((t1, (b[host][k] - a[host][k]) / (t1 - t0)))
        return out


class StatusSampler(_Ticker[dict[str, Any]]):
    """The node's own view (its control socket): p2pd's auto-throttle limit, what it measured, and
    what sits in its sockets' queues; next to the switch-side rates this shows whether a slow yield is the
    controller's decision or bytes that were already queued when the limit dropped."""

    join_timeout = 10.0

    def __init__(self, sock_path: str) -> None:
        super().__init__()
        self.sock_path = sock_path

    def _sample(self) -> dict[str, Any] | None:
        auto = (_status(self.sock_path) or {}).get("auto_throttle") or {}
        return auto or None

    def trace(self, direction: str, t0: float) -> list[list[Any]]:
        """[t, limit, own, other, queued] per sample (bytes/s; limit None = none; queued: unsent on upload,
        unread on download)."""
        key, q = ("egress", "unsent") if direction == "upload" else ("ingress", "unread")
        out: list[list[Any]] = []
        for t, auto in self.samples:
            d = auto.get(key) or {}
            lim = d.get("limit")
            out.append(
                [
                    round(t - t0, 2),
                    None if lim is None else round(lim),
                    round(d.get("own") or 0),
                    round(d.get("other") or 0),
                    (auto.get("queued") or {}).get(q),
                ]
            )
        return out


def _mean(xs: list[tuple[float, float]], start: float, end: float) -> float | None:
    vals = [r for t, r in xs if start < t <= end]
    return sum(vals) / len(vals) if vals else None


def _first_at(xs: list[tuple[float, float]], start: float, level: float, window: int = 2) -> float | None:
    """Seconds after `start` until `window` consecutive intervals average >= level (None: never)."""
    after = [(t, r) for t, r in xs if t > start]
    for i in range(len(after) - window + 1):
        if sum(r for _, r in after[i : i + window]) / window >= level:
            return round(after[i + window - 1][0] - start, 2)
    return None


def _yield_after(trace: list[list[Any]], start: float) -> float | None:
    """Seconds after `start` (timeline seconds) until the node's trace first shows an auto-throttle limit."""
    return next((round(t - start, 2) for t, limit, *_ in trace if t >= start and limit is not None), None)


def run_one(opts: Options, direction: str, service: str, mode: str, work: str, log: IO[str]) -> dict[str, Any]:
    """One scenario in a fresh topology; the result dict (rates in bytes/s on the wire)."""
    link = opts.rate_bps / 8
    # secured, as deployed (docs/security.md): without a join secret the tracker refuses to start
    env = child_env({JOIN_SECRET_ENV: os.environ.get(JOIN_SECRET_ENV) or new_join_secret()})
    p2pd = p2pd_cmd()
    procs: list[subprocess.Popen | None] = []
    d = tempfile.mkdtemp(prefix=f"{direction}-{service}-{mode}-", dir=work)
    with Topology() as topo:
        lan = topo.add_switch("lan")
        node = topo.add_host("node", lan, rate=opts.rate_bps)
        peer = topo.add_host("peer", lan)
        svc = topo.add_host("svc", lan)
        hosts: dict[str, Host] = {"node": node, "peer": peer, "svc": svc}
        ports = {name: h.links[0].switch_if for name, h in hosts.items()}
        ips = {name: h.ip or "" for name, h in hosts.items()}
        try:
            procs.append(svc.popen(["iperf3", "-s", "-p", str(IPERF_PORT)], log=os.path.join(d, "iperf3-s.log")))
            wait_tcp(svc, ips["svc"], IPERF_PORT)
            iperf = ["iperf3", "-c", ips["svc"], "-p", str(IPERF_PORT), "-J"]
            if direction == "download":
                iperf.append("-R")
            if service == "half":
                iperf += ["-b", str(opts.rate_bps // 2)]
            elif service == "small":
                iperf += ["-b", str(opts.small_bps)]
            svc_to = direction == "upload"  # the service's bytes: delivered to svc (upload) or sent by it
            with Sampler(lan.ns, ports) as sampler:
                # setup: tracker, daemons, the payload published
                seed, leecher = (node, peer) if direction == "upload" else (peer, node)
                if mode == "utp":
                    lt_leech = _start_libtorrent(seed, leecher, ips["peer"], d, opts.size, procs)
                else:
                    lt_leech = None
                    _start_p2pd(opts, mode, hosts, ips, seed, d, env, procs)
                # 1. the service alone: its idle-link rate (the daemons idle)
                t_idle = time.monotonic()
                node.run([*iperf, "-t", str(int(opts.idle_s))], timeout=opts.idle_s + 30)
                t_idle_end = time.monotonic()
                # 2. p2pd (or libtorrent) alone
                out = os.path.join(d, "out")
                if lt_leech is not None:
                    lt_leech.send("GO")
                    fetch = lt_leech.proc
                else:
                    os.makedirs(out)
                    fetch = leecher.popen(
                        [
                            *p2pd,
                            "fetch",
                            "bench:auto",
                            "--dest",
                            out,
                            "--data-dir",
                            os.path.join(d, f"data-{leecher.name}"),
                        ],
                        log=os.path.join(d, "fetch.log"),
                        env=env,
                        cwd=NEUTRAL_CWD,
                    )
                    procs.append(fetch)
                t_fetch = time.monotonic()
                time.sleep(max(0.0, opts.warmup_s - 2.0))
                node_sock = os.path.join(d, "data-node", "p2pd.sock")
                with contextlib.ExitStack() as stack:
                    node_view = None if lt_leech is not None else stack.enter_context(StatusSampler(node_sock))
                    time.sleep(min(2.0, opts.warmup_s))
                    # 3. the service beside p2pd
                    t_svc = time.monotonic()
                    client = node.popen([*iperf, "-t", str(int(opts.service_s))], log=os.path.join(d, "iperf3-c.log"))
                    procs.append(client)
                    time.sleep(opts.service_s / 2)
                    status = None if lt_leech is not None else _status(node_sock)
                    if client.wait(timeout=opts.service_s + 30) != 0:
                        raise BenchError(
                            f"iperf3 client exit {client.returncode}: {tail(os.path.join(d, 'iperf3-c.log'))}"
                        )
                    t_svc_end = time.monotonic()
                    # 4. p2pd alone again
                    time.sleep(opts.after_s)
                    t_end = time.monotonic()
                if fetch.poll() is not None and fetch.returncode != 0:
                    what = "libtorrent leecher" if lt_leech is not None else "p2pd fetch"
                    log_name = "nodes.log" if lt_leech is not None else "fetch.log"
                    raise BenchError(f"{what} exit {fetch.returncode}: {tail(os.path.join(d, log_name))}")
                if lt_leech is not None and any(line.startswith("DONE") for _, line in lt_leech.lines):
                    raise BenchError("the libtorrent leecher finished before the run ended: raise --size")
            if sampler.error:
                raise BenchError(f"counter sampling failed: {sampler.error}")
            svc_rates = sampler.rates("svc", toward=svc_to)
            p2p_rates = sampler.rates("peer", toward=direction == "upload")
            idle = _mean(svc_rates, t_idle + 1.0, t_idle_end - 0.3) or 0.0
            # the service's run: from its first busy interval to its last (not iperf3's connect and teardown)
            svc_start = min((t - TICK for t, r in svc_rates if t > t_svc and r > 0.05 * link), default=t_svc)
            svc_stop = max((t for t, r in svc_rates if t <= t_svc_end + 1 and r > 0.05 * link), default=t_svc_end)
            svc_avg = _mean(svc_rates, svc_start, svc_stop) or 0.0
            svc_steady = _mean(svc_rates, t_svc + 2.0, t_svc_end - 0.3) or 0.0
            p2pd_alone = _mean(p2p_rates, t_svc - 2.0, t_svc) or 0.0
            p2pd_during = _mean(p2p_rates, t_svc + 2.0, t_svc_end - 0.3) or 0.0
            # what the service leaves free: what the link carries (p2pd alone just before, or the service alone;
            # tbf's wire rate is ~4 % under the nominal one on the switch-side counters: nobody can use that part)
            # less the service's steady rate; meaningful for a paced service (a greedy one leaves nothing free)
            carried = max(p2pd_alone, idle)
            free = max(carried - svc_steady, 1.0)
            trace = node_view.trace(direction, t_idle) if node_view is not None else None
            res: dict[str, Any] = {
                "direction": direction,
                "service": service,
                "auto_throttle": mode,
                "link_Bps": link,
                "service_idle_Bps": round(idle),
                "service_avg_Bps": round(svc_avg),
                "service_ratio": round(svc_avg / idle, 3) if idle else None,
                "service_reach_080_s": _first_at(svc_rates, svc_start, 0.8 * idle) if idle else None,
                "p2pd_alone_Bps": round(p2pd_alone),
                "p2pd_during_Bps": round(p2pd_during),
                "link_carried_Bps": round(carried),
                "p2pd_use_of_free": round(p2pd_during / free, 3),
                # the same against the nominal link (before 2026-11-27 07:50 this was `p2pd_use_of_free`, and
                # `p2pd_use_of_free_carried` the one above)
                "p2pd_use_of_nominal_free": round(p2pd_during / max(link - svc_steady, 1.0), 3),
                # seconds from the service's first busy interval until the node set a limit (None: it never did)
                "p2pd_yield_s": _yield_after(trace, svc_start - t_idle) if trace is not None else None,
                "p2pd_back_080_s": _first_at(p2p_rates, svc_stop, 0.8 * link),
                "p2pd_back_080_of_alone_s": _first_at(p2p_rates, svc_stop, 0.8 * p2pd_alone),
                "fetch_started_s_before_service": round(t_svc - t_fetch, 2),
                "timeline": {
                    "t0": round(t_idle, 3),
                    "service_start": round(svc_start - t_idle, 2),
                    "service_stop": round(svc_stop - t_idle, 2),
                    "end": round(t_end - t_idle, 2),
                    "service_Bps": [[round(t - t_idle, 2), round(r)] for t, r in svc_rates],
                    "p2pd_Bps": [[round(t - t_idle, 2), round(r)] for t, r in p2p_rates],
                    # the node's own view: [t, limit, own, other, bytes queued in its sockets]
                    "node_auto": trace,
                },
            }
            res["node_status_during_service"] = status
            return res
        finally:
            stop_all(topo, procs, timeout=10)
            if not opts.keep:
                shutil.rmtree(d, ignore_errors=True)
            else:
                print(f"kept {d}", file=log)


def _start_p2pd(
    opts: Options,
    mode: str,
    hosts: dict[str, Host],
    ips: dict[str, str],
    seed: Host,
    d: str,
    env: dict[str, str],
    procs: list[subprocess.Popen | None],
) -> None:
    """The tracker on `peer`, a daemon on `node` and `peer`, the payload published by the seed."""
    p2pd, peer = p2pd_cmd(), hosts["peer"]
    procs.append(
        peer.popen(
            [*tracker_cmd(), "serve", "--listen", f"{ips['peer']}:{TRACKER_PORT}"],
            log=os.path.join(d, "tracker.log"),
            env=env,
            cwd=NEUTRAL_CWD,
        )
    )
    wait_tcp(peer, ips["peer"], TRACKER_PORT)
    for name in ("node", "peer"):
        argv = [
            *p2pd,
            "run",
            "--tracker",
            f"{ips['peer']}:{TRACKER_PORT}",
            "--listen",
            f"{ips[name]}:{NODE_PORT}",
            "--data-dir",
            os.path.join(d, f"data-{name}"),
            "--auto-throttle",
            mode,
            *opts.p2pd_run_args,
        ]
        procs.append(hosts[name].popen(argv, log=os.path.join(d, f"daemon-{name}.log"), env=env, cwd=NEUTRAL_CWD))
    for name in ("node", "peer"):
        _wait_status(hosts[name], os.path.join(d, f"data-{name}"), os.path.join(d, f"daemon-{name}.log"))
    payload = os.path.join(d, "payload.bin")
    make_payload(payload, opts.size)
    seed_dir = os.path.join(d, f"data-{seed.name}")
    cp = seed.run(
        [*p2pd, "publish", payload, "--name", "bench:auto", "--data-dir", seed_dir],
        check=False,
        env=env,
        cwd=NEUTRAL_CWD,
        timeout=300,
    )
    if cp.returncode != 0:
        raise BenchError(f"p2pd publish exit {cp.returncode}: {cp.stderr.strip()[-600:]}")


def _start_libtorrent(
    seed: Host, leecher: Host, tracker_ip: str, d: str, size: int, procs: list[subprocess.Popen | None]
) -> LineLeecher:
    """libtorrent on uTP only (LEDBAT), in place of p2pd: the BitTorrent tracker on `peer`, a seeding session on
    the seed, a paused leeching session (released by GO) on the other; no auto-throttle, LEDBAT is the yielding."""
    payload = os.path.join(d, "payload.bin")
    make_payload(payload, size)
    torrent = os.path.join(d, "bench.torrent")
    make_torrent(payload, torrent, f"http://{tracker_ip}:{BT_TRACKER_PORT}/announce", piece_size(size))
    peer = seed if seed.name == "peer" else leecher
    tracker = peer.popen(
        [sys.executable, "-m", "netsim.bench.bt", "tracker", "--listen", f"{tracker_ip}:{BT_TRACKER_PORT}"],
        stdout=subprocess.PIPE,
        log=os.path.join(d, "tracker.log"),
        text=True,
        env=child_env(),
        cwd=NEUTRAL_CWD,
    )
    procs.append(tracker)
    assert tracker.stdout is not None
    if tracker.stdout.readline().strip() != "READY":
        raise BenchError(f"BitTorrent tracker did not start (exit {tracker.poll()})")
    out = os.path.join(d, "out")
    os.makedirs(out)

    def session(role: str, h: Host, save: str) -> LineLeecher:
        argv = [sys.executable, "-m", "netsim.bench.clients.lt_node", "--role", role, "--torrent", torrent]
        argv += ["--save", save, "--listen", f"{h.ip}:{LT_PORT}", "--utp-only"]
        p = h.popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            log=os.path.join(d, "nodes.log"),
            text=True,
            bufsize=1,
            env=child_env(),
            cwd=NEUTRAL_CWD,
        )
        procs.append(p)
        return LineLeecher(Node(h.name, h, h.ip or ""), save, p)

    try:
        session("seed", seed, d).expect("READY", 60)
        lt_leech = session("leech", leecher, out)
        lt_leech.expect("READY", 60)
    except RuntimeError as e:
        raise BenchError(f"libtorrent: {e}: {tail(os.path.join(d, 'nodes.log'))}") from e
    return lt_leech


def _status(sock_path: str) -> dict[str, Any] | None:
    """The node's limits and auto-throttle state, straight from its control socket (a Unix socket is not
    confined to a network namespace; a `p2pd status` process would take seconds to start on a loaded machine)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(sock_path)
            res = call_blocking(s, "status", {})
    except (OSError, RpcError):
        return None
    return {k: v for k, v in res.items() if k in ("limits", "auto_throttle")}


def _wait_status(h: Host, data_dir: str, logfile: str) -> None:
    end = time.monotonic() + 60
    while True:
        cp = h.run([*p2pd_cmd(), "status", "--data-dir", data_dir], check=False, env=child_env(), cwd=NEUTRAL_CWD)
        if cp.returncode == 0:
            return
        if time.monotonic() > end:
            raise BenchError(f"p2pd on {h.name} never answered status: {tail(logfile)}")
        time.sleep(0.2)


def run(opts: Options, log: IO[str] = sys.stderr) -> dict[str, Any]:
    why = missing()
    if why:
        raise BenchError(why)
    work = tempfile.mkdtemp(prefix="autothrottle-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    runs = []
    try:
        for direction in opts.directions:
            for service in opts.services:
                for mode in opts.modes:
                    print(f"autothrottle: {direction} {service} auto-throttle {mode}", file=log, flush=True)
                    r = run_one(opts, direction, service, mode, work, log)
                    print(f"  {_line(r)}", file=log, flush=True)
                    runs.append(r)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "command": opts.command,
        "rate": format_bits_rate(opts.rate_bps),
        "size": opts.size,
        "runs": runs,
        "headline": "; ".join(_line(r) for r in runs),
    }


def _line(r: dict[str, Any]) -> str:
    return (
        f"{r['direction']} {r['service']} auto {r['auto_throttle']}: service {r['service_ratio']} of idle "
        f"(0.8x after {r['service_reach_080_s']} s), p2pd yields after {r['p2pd_yield_s']} s, uses "
        f"{r['p2pd_use_of_free']} of free (what the link carried alone less the service; "
        f"{r['p2pd_use_of_nominal_free']} of the nominal link less the service), "
        f"back to 0.8 link {r['p2pd_back_080_s']} s after"
    )


def add_arguments(ap: argparse.ArgumentParser, size: Any, rate_bits: Any) -> None:
    def names(allowed: tuple[str, ...]) -> Any:
        def parse(text: str) -> list[str]:
            got = [x.strip() for x in text.split(",") if x.strip()]
            bad = [x for x in got if x not in allowed]
            if bad or not got:
                raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(allowed)}")
            return got

        return parse

    ap.add_argument("--rate", type=rate_bits, default=200_000_000, help="the node's link, both ways (RATE)")
    ap.add_argument("--size", type=size, default=parse_size("512MiB"), help="payload (more than the run moves)")
    ap.add_argument("--directions", type=names(("upload", "download")), default=["upload", "download"])
    ap.add_argument(
        "--services",
        type=names(("greedy", "half", "small")),
        default=["greedy", "half"],
        help="greedy: iperf3 unpaced; half: paced at RATE/2; small: paced at --small-rate (is a small newcomer seen?)",
    )
    ap.add_argument("--small-rate", type=rate_bits, default=10_000_000, help="the `small` service's rate")
    ap.add_argument(
        "--modes",
        type=names(("on", "off", "utp")),
        default=["on", "off"],
        help="on/off: p2pd with --auto-throttle on/off; utp: libtorrent on uTP only (LEDBAT) in p2pd's place",
    )
    ap.add_argument("--warmup", type=float, default=8.0, help="seconds of p2pd alone before the service")
    ap.add_argument("--service", type=float, default=10.0, help="seconds the service runs")
    ap.add_argument("--after", type=float, default=5.0, help="seconds of p2pd alone after it")
    ap.add_argument("--p2pd-run-args", default="", help="extra options for every `p2pd run`, one quoted string")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", default=None)


def main(a: argparse.Namespace, command: str) -> int:
    import shlex

    opts = Options(
        rate_bps=a.rate,
        size=a.size,
        directions=a.directions,
        services=a.services,
        small_bps=a.small_rate,
        modes=a.modes,
        warmup_s=a.warmup,
        service_s=a.service,
        after_s=a.after,
        p2pd_run_args=shlex.split(a.p2pd_run_args),
        keep=a.keep,
        command=command,
    )
    res = run(opts)
    write_json(res, a.json)
    print(json.dumps({k: v for k, v in res.items() if k != "runs"} | {"runs": [_brief(r) for r in res["runs"]]}))
    print(res["headline"])
    return 0


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k != "timeline"}
