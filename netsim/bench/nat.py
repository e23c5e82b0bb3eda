"""`python -m netsim.bench nat`: NAT traversal in emulated networks -- the matrix of NAT kinds and a NATed swarm.

Matrix: one tracker on a public segment and, for every kind in `netsim.emu.nat.NAT_KINDS`, two daemons (`a` and
`b`), each alone behind its own router. Cell (X, Y) is the `a` daemon of kind X seeding a fresh artifact to the
`b` daemon of kind Y, so each cell is its own pair of daemons and all cells run at once (one tracker, one daemon
per site, one artifact per cell): the whole matrix costs about one cell's time. Per cell: whether the leech got
the bytes (sha256 against the source, independent of p2pd's own checks), the path its connection to the seed
took (`p2pd status`), and the time from asking for the artifact to its first verified piece (`pieces_done` >= 1,
polled every 50 ms). Then the same cone pair moves a larger artifact alone, against a public pair: what the NATs
and the punched path cost in throughput.

Swarm: 1 public seed and 8 peers (4 behind port-restricted cones, 2 behind symmetric NATs, 2 public), every host
link tbf-shaped to RATE. The seed leaves as soon as it has uploaded every piece once
(`pieces_sent - pieces_sent_again`); everyone must still complete, byte-identical. T is compared with the
Kumar-Ross bound, and the tracker's relay counter
(`relay_bytes_relayed`, admin `/v1/stats`) is reported in F (multiples of the artifact size).

The functions here return JSON-able results and assert nothing: tests/emu/test_emu_nat_matrix.py and
test_emu_nat_swarm.py hold the expectations, the benchmark prints the numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import trio

from netsim.bench.harness import BenchError, cpu_seconds_by_root, machine_busy_seconds, write_json
from netsim.bench.model import kumar_ross
from netsim.bench.nat_lt import (
    first_piece,
    grid_table,
    libtorrent_missing,
    lt_matrix_table,
    lt_summary,
    p95,
    parse_clients,
    run_lt_matrix,
)
from netsim.bench.swarm import preflight, revision
from netsim.emu import Host, Switch, Topology
from netsim.emu.nat import NAT_KINDS, add_nat_site
from p2pd.cluster import Node, Process, scratch_dir
from p2pd.identity import JOIN_SECRET_ENV, new_join_secret
from p2pd.rpc import RpcError
from p2pd.units import format_bits_rate, format_size_exact

MiB = 1 << 20
TRACKER_PORT, ADMIN_PORT, NODE_PORT = 7070, 7071, 7700
TOKEN = "netsim-nat-token"
SHORT = {"public": "pub", "full-cone": "fc", "port-restricted-cone": "prc", "symmetric": "sym", "udp-blocked": "blk"}
POLL_S = 0.05
# the swarm's timeline: one sample of every peer's connections this often
TIMELINE_S = 0.25


def expected_path(seed_kind: str, leech_kind: str) -> str:
    """The path a cell takes today. The leech dials the seed. For TCP, full cone and UDP-blocked routers are
    port-restricted cones (unsolicited SYNs dropped). A public seed is dialled directly. A NATed seed with a
    public leech cannot be dialled and does not dial leeches itself, so the leech's race falls to the punch,
    whose SYN from the seed's side reaches the public leech's punch listener (a connection reversal, reported
    as `tcp-punch`; it works even from a symmetric NAT). Two cones punch TCP. A cone (for TCP: every kind but
    symmetric, UDP-blocked included) and a symmetric NAT meet by the TCP birthday punch (`tcp-punch`,
    p2pd/protocol/tcp_punch.py), before the UDP punch starts; two symmetric NATs leave only the relay."""
    if seed_kind == "public":
        return "direct"
    if seed_kind == leech_kind == "symmetric":
        return "relay"
    return "tcp-punch"


def _log(log: IO[str], msg: str) -> None:
    print(f"[nat] {msg}", file=log, flush=True)


class NatLab:
    """A tracker (with admin API) on a public segment plus daemons started on hosts of the topology."""

    def __init__(self, topo: Topology, work: Path) -> None:
        self.topo = topo
        self.work = work
        self.wan: Switch = topo.add_switch("wan")
        self.tracker_host = topo.add_host("tracker", self.wan)
        self.nodes: dict[str, Node] = {}
        self.tracker_pid: int | None = None
        # a secured cluster, as deployed (docs/security.md): every process of the lab inherits the secret
        os.environ.setdefault(JOIN_SECRET_ENV, new_join_secret())

    @property
    def tracker(self) -> str:
        return f"{self.tracker_host.ip}:{TRACKER_PORT}"

    def start_tracker(self, timeout: float = 30.0) -> None:
        ready = self.work / "tracker.json"
        log = self.work / "tracker.log"
        ip = self.tracker_host.ip
        # a second address for RFC 3489 CHANGE-REQUEST, so each daemon learns its NAT type (the UDP punch
        # needs it: a symmetric side opens many ports, a cone side sprays them)
        ip2 = str(self.wan.take_ip())
        self.tracker_host.run(
            ["ip", "addr", "add", f"{ip2}/{self.wan.subnet.prefixlen}", "dev", self.tracker_host.links[0].host_if]
        )
        self.tracker_pid = self.tracker_host.popen(
            [
                sys.executable,
                "-m",
                "tracker.cli",
                "serve",
                "--listen",
                f"{ip}:{TRACKER_PORT}",
                "--admin-listen",
                f"{ip}:{ADMIN_PORT}",
                "--admin-token",
                TOKEN,
                "--stun-alt",
                f"{ip2}:{TRACKER_PORT + 9}",
                "--ready-file",
                str(ready),
            ],
            log=str(log),
        ).pid
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if time.monotonic() > deadline:
                raise BenchError(f"tracker not ready after {timeout:.0f} s: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(POLL_S)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds each daemon (by host name) and the tracker (`tracker`: it splices the relay) used so far."""
        roots = {name: node.process.pid for name, node in self.nodes.items()}
        if self.tracker_pid is not None:
            roots["tracker"] = self.tracker_pid
        return cpu_seconds_by_root(roots)

    def tracker_stats(self) -> dict[str, Any]:
        """The tracker's admin `/v1/stats` (relay counters among them), asked from inside its namespace."""
        cp = self.tracker_host.run(
            [
                sys.executable,
                "-m",
                "tracker.cli",
                "admin",
                "stats",
                "--tracker",
                f"http://{self.tracker_host.ip}:{ADMIN_PORT}",
                "--token",
                TOKEN,
                "--json",
            ],
            timeout=60,
        )
        return dict(json.loads(cp.stdout))

    async def start_daemon(self, host: Host, timeout: float = 60.0, extra: tuple[str, ...] = ()) -> Node:
        """`p2pd run` on `host` (with `extra` arguments); ready once its signal channel to the tracker is up and
        its NAT is classified (what traversal needs)."""
        d = self.work / host.name
        d.mkdir()
        args = [
            sys.executable,
            "-m",
            "p2pd.cli",
            "run",
            "--tracker",
            self.tracker,
            "--listen",
            f"0.0.0.0:{NODE_PORT}",
            "--data-dir",
            str(d),
            *extra,
        ]
        log = self.work / f"{host.name}.log"
        node = Node(host.name, d, NODE_PORT, args, Process(host.name, args, log, host.popen(args, log=str(log)), 0))
        self.nodes[host.name] = node
        with trio.move_on_after(timeout):
            while True:
                if node.process.returncode is not None:
                    raise BenchError(f"{host.name}: p2pd exited: {node.log_text()[-2000:]}")
                if node.socket.exists():
                    try:
                        st = await node.call("status", timeout=2)
                        # and its NAT type known (the UDP punch's roles depend on it)
                        if st["traversal"]["signal_channel"] and st.get("nat", {}).get("state") != "detecting":
                            return node
                    except (OSError, RpcError):
                        pass  # not serving yet
                await trio.sleep(POLL_S)
        raise BenchError(f"{host.name}: no signal channel after {timeout:.0f} s: {node.log_text()[-2000:]}")


def sha256_tree(root: Path) -> dict[str, str]:
    """Digest of every file under root, with hashlib: a check independent of p2pd's own xxh3 verification."""
    out = {}
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            while chunk := fh.read(8 * MiB):
                h.update(chunk)
        out[p.relative_to(root).as_posix()] = h.hexdigest()
    return out


def make_artifact(root: Path, size: int, tag: str) -> Path:
    """A fresh directory with `size` random bytes (one file) and a small config."""
    src = root / f"src-{tag}"
    src.mkdir()
    with open(src / "weights.bin", "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MiB)
            f.write(os.urandom(n))
            left -= n
    (src / "config.json").write_text(json.dumps({"tag": tag}))
    return src


@dataclass
class Fetched:
    """One leech's fetch of one artifact: when its first piece and the whole artifact were there."""

    first_piece_s: float | None = None
    total_s: float | None = None
    path: Path | None = None
    error: str | None = None


async def fetch_timed(leech: Node, name: str, aid: str, timeout: float) -> Fetched:
    """Fetch `name` on `leech`; a watcher polls its status for the first verified piece meanwhile."""
    out = Fetched()
    t0 = trio.current_time()

    async def watch(cancel: trio.CancelScope) -> None:
        while out.first_piece_s is None:
            try:
                art = await leech.artifact(aid)
            except (OSError, RpcError):
                art = None
            if art is not None and art["pieces_done"] >= 1:
                out.first_piece_s = trio.current_time() - t0
                return
            await trio.sleep(POLL_S)

    async def fetch(cancel: trio.CancelScope) -> None:
        try:
            res = await leech.call("fetch", {"name": name}, timeout=timeout)
        except (OSError, RpcError, trio.TooSlowError) as e:
            out.error = f"{leech.name}: fetch {name}: {e}"
        else:
            out.total_s = trio.current_time() - t0
            out.path = Path(res["path"])
            if out.first_piece_s is None:  # finished between two polls
                out.first_piece_s = out.total_s
        cancel.cancel()

    with trio.move_on_after(timeout + 5) as scope:
        async with trio.open_nursery() as n:
            n.start_soon(watch, n.cancel_scope)
            n.start_soon(fetch, n.cancel_scope)
    if scope.cancelled_caught and out.error is None and out.total_s is None:
        out.error = f"{leech.name}: fetch {name}: no result after {timeout + 5:.0f} s"
    return out


async def _path_to(leech: Node, aid: str, seed_id: str) -> str | None:
    art = await leech.artifact(aid)
    paths = sorted({c["path"] for c in (art or {}).get("connections", []) if c["node_id"] == seed_id})
    return ",".join(paths) or None


@contextmanager
def _lab(work_bytes: int, prefix: str) -> Iterator[tuple[Topology, Path]]:
    with scratch_dir(work_bytes, prefix=prefix) as work, Topology() as topo:
        os.chmod(work, 0o755)
        yield topo, work


# ----------------------------------------------------------------------------------------------- matrix
def run_matrix(
    size: int = 2 * MiB,
    throughput_size: int = 32 * MiB,
    kinds: tuple[str, ...] = tuple(NAT_KINDS),
    timeout_s: float = 120.0,
    log: IO[str] = sys.stderr,
    clients: tuple[str, ...] = ("p2pd",),
    lt_timeout_s: float = 30.0,
) -> dict[str, Any]:
    """Every ordered pair of `kinds`, all at once; then cone<->cone against public<->public throughput. With
    "libtorrent" in `clients`, the same cells and pair again with libtorrent on the same hosts (netsim.bench.nat_lt),
    after p2pd's, under the key `libtorrent`."""
    cells: list[dict[str, Any]] = []
    throughput: dict[str, Any] = {}
    lt_result: dict[str, Any] | None = None
    with _lab((len(kinds) ** 2 * 2 * size + 4 * throughput_size) * 2, "p2pd-natmatrix-") as (topo, work):
        lab = NatLab(topo, work)
        hosts: dict[tuple[str, str], Host] = {}
        for kind in kinds:
            for side in ("a", "b"):
                hosts[(kind, side)] = add_nat_site(topo, f"{SHORT[kind]}{side}", lab.wan, kind)[1]
        # libtorrent's BEP 55 rendezvous relay: a public peer connected to both sides
        lt_helper = topo.add_host("lthelper", lab.wan) if "libtorrent" in clients else None
        if "p2pd" in clients:
            lab.start_tracker()
            _log(log, f"matrix: {len(kinds)} kinds x 2 daemons, {len(kinds) ** 2} cells of {format_size_exact(size)}")

        async def main() -> None:
            async with trio.open_nursery() as n:
                for h in hosts.values():
                    n.start_soon(lab.start_daemon, h)
            ids = {name: (await node.call("status"))["node_id"] for name, node in lab.nodes.items()}

            async def cell(sk: str, lk: str, nbytes: int, tag: str) -> dict[str, Any]:
                seed, leech = lab.nodes[hosts[(sk, "a")].name], lab.nodes[hosts[(lk, "b")].name]
                src = await trio.to_thread.run_sync(make_artifact, work, nbytes, tag)
                name = f"nat-{tag}:v1"
                pub = await seed.call("publish", {"path": str(src), "name": name}, timeout=timeout_s)
                got = await fetch_timed(leech, name, pub["artifact_id"], timeout_s)
                same = None
                if got.path is not None:
                    same = await trio.to_thread.run_sync(sha256_tree, got.path) == await trio.to_thread.run_sync(
                        sha256_tree, src
                    )
                path = await _path_to(leech, pub["artifact_id"], ids[seed.name])
                return {
                    "seed": sk,
                    "leech": lk,
                    "expected_path": expected_path(sk, lk),
                    "path": path,
                    "ok": bool(same),
                    "identical": same,
                    "first_piece_s": None if got.first_piece_s is None else round(got.first_piece_s, 3),
                    "total_s": None if got.total_s is None else round(got.total_s, 3),
                    "error": got.error or (None if same in (None, True) else "bytes differ"),
                }

            async def one(sk: str, lk: str) -> None:
                cells.append(await cell(sk, lk, size, f"{SHORT[sk]}{SHORT[lk]}"))

            t0 = time.monotonic()
            async with trio.open_nursery() as n:
                for sk in kinds:
                    for lk in kinds:
                        n.start_soon(one, sk, lk)
            _log(log, f"matrix: all cells done in {time.monotonic() - t0:.1f} s")
            for label, kind, leech_kind in (
                ("cone", "port-restricted-cone", "port-restricted-cone"),
                ("public", "public", "public"),
                ("cone-symmetric", "port-restricted-cone", "symmetric"),  # the TCP birthday punch
            ):
                if kind not in kinds or leech_kind not in kinds or not throughput_size:
                    continue
                c = await cell(kind, leech_kind, throughput_size, f"tp{SHORT[kind]}{SHORT[leech_kind]}")
                mbps = throughput_size / c["total_s"] / 1e6 if c["total_s"] else None
                throughput[label] = {**c, "MBps": None if mbps is None else round(mbps, 1)}
                _log(log, f"throughput {label}<->{label}: {c['path']}, {c['total_s']} s")

        if "p2pd" in clients:
            trio.run(main)
        if lt_helper is not None:
            _log(log, f"libtorrent: {len(kinds) ** 2} cells of {format_size_exact(size)}, 1 public helper peer")
            lt_result = run_lt_matrix(
                topo, lab.tracker_host, lt_helper, hosts, kinds, SHORT, work, size, throughput_size, lt_timeout_s, log
            )
    order = {k: i for i, k in enumerate(kinds)}
    cells.sort(key=lambda c: (order[c["seed"]], order[c["leech"]]))
    out = {"kinds": list(kinds), "size_bytes": size, "cells": cells, "throughput": throughput}
    if lt_result is not None:
        out["libtorrent"] = lt_result
    return out


def matrix_table(m: dict[str, Any]) -> str:
    """Cell: path and time to first piece."""
    return grid_table(m, lambda c: f"{c['path'] or 'FAILED'} {first_piece(c)}" + ("" if c["ok"] else " !"))


def matrix_summary(m: dict[str, Any]) -> dict[str, Any]:
    """Connect success, time to first piece per path class (p95 for punched and direct, worst for relay)."""
    cells = m["cells"]

    def times(path: str) -> list[float]:
        return [c["first_piece_s"] for c in cells if c["path"] == path and c["first_piece_s"] is not None]

    relay = times("relay")
    tp = m["throughput"]
    ratio = None
    if tp.get("cone", {}).get("MBps") and tp.get("public", {}).get("MBps"):
        ratio = round(tp["cone"]["MBps"] / tp["public"]["MBps"], 3)
    return {
        "cells": len(cells),
        "connected": sum(1 for c in cells if c["ok"]),
        "as_expected": sum(1 for c in cells if c["ok"] and c["path"] == c["expected_path"]),
        "first_piece_p95_direct_s": p95(times("direct")),
        "first_piece_p95_punched_s": p95(times("tcp-punch")),
        "first_piece_p95_udp_punch_s": p95(times("udp-punch")),
        "first_piece_worst_relay_s": max(relay) if relay else None,
        "cone_over_public_throughput": ratio,
        "udp_punch_MBps": tp.get("cone-symmetric", {}).get("MBps"),
    }


# ----------------------------------------------------------------------------------------------- swarm
SWARM_PEERS = ("port-restricted-cone",) * 4 + ("symmetric",) * 2 + ("public",) * 2


def run_nat_swarm(
    size: int = 64 * MiB,
    rate_bps: int = 200_000_000,
    peer_kinds: tuple[str, ...] = SWARM_PEERS,
    timeout_s: float | None = None,
    log: IO[str] = sys.stderr,
    keep_logs: Path | None = None,
) -> dict[str, Any]:
    """1 public seed + NATed peers on shaped links; the seed leaves after one copy; T, T_min and relay bytes.

    `keep_logs`: copy the tracker's and every daemon's log there (the lab's work dir is removed).
    """
    t_min = kumar_ross(size, rate_bps, [rate_bps] * len(peer_kinds), [rate_bps] * len(peer_kinds))
    timeout = timeout_s or max(120.0, 15 * t_min)
    with _lab(size * (len(peer_kinds) + 2) * 2, "p2pd-natswarm-") as (topo, work):
        lab = NatLab(topo, work)
        seed_host = add_nat_site(topo, "seed", lab.wan, "public", rate=rate_bps)[1]
        peers = [add_nat_site(topo, f"p{i}{SHORT[k]}", lab.wan, k, rate=rate_bps)[1] for i, k in enumerate(peer_kinds)]
        lab.start_tracker()
        _log(
            log,
            f"swarm: 1 public seed + {len(peers)} peers ({', '.join(peer_kinds)}), {format_size_exact(size)} at "
            f"{format_bits_rate(rate_bps)}, T_min {t_min:.2f} s",
        )
        src = make_artifact(work, size, "swarm")
        result: dict[str, Any] = {}

        async def main() -> None:
            async with trio.open_nursery() as n:
                for h in [seed_host, *peers]:
                    n.start_soon(lab.start_daemon, h)
            seed = lab.nodes["seed"]
            pub = await seed.call("publish", {"path": str(src), "name": "nat-swarm:v1"}, timeout=timeout)
            aid, pieces = pub["artifact_id"], pub["pieces"]
            fetched: dict[str, Fetched] = {}
            seed_left: list[float] = []
            seed_paths: dict[str, Any] = {}
            # CPU: each process's seconds at the start, the last seen (the seed's before it stops), the machine's
            cpu0 = lab.cpu_seconds()
            cpu_seen = dict(cpu0)
            busy0 = machine_busy_seconds()
            t0 = trio.current_time()

            async def leech(h: Host) -> None:
                fetched[h.name] = await fetch_timed(lab.nodes[h.name], "nat-swarm:v1", aid, timeout)

            async def seed_leaves() -> None:
                with trio.move_on_after(timeout):
                    while True:
                        art = await seed.artifact(aid)
                        # every piece out at least once (a repeat to a requester sent away before counts once)
                        if art is not None and art["pieces_sent"] - art["pieces_sent_again"] >= pieces:
                            seed_paths.update(art.get("bytes_by_path", {}))
                            break
                        await trio.sleep(POLL_S)
                seed_left.append(trio.current_time() - t0)
                cpu_seen["seed"] = lab.cpu_seconds()["seed"]
                await trio.to_thread.run_sync(seed.process.stop)

            names = {(await node.call("status"))["node_id"]: name for name, node in lab.nodes.items()}
            timeline: list[dict[str, Any]] = []

            async def sample() -> None:
                while True:
                    s = await timeline_sample(lab, peers, aid, names, trio.current_time() - t0)
                    cpu = lab.cpu_seconds()
                    for name, sec in cpu.items():
                        cpu_seen[name] = max(cpu_seen[name], sec)
                    # CPU seconds each process used since the start (the seed's stays at its last reading)
                    s["cpu_s"] = {name: round(cpu_seen[name] - cpu0[name], 2) for name in sorted(cpu_seen)}
                    timeline.append(s)
                    await trio.sleep(TIMELINE_S)

            async with trio.open_nursery() as outer:
                outer.start_soon(sample)
                async with trio.open_nursery() as n:
                    n.start_soon(seed_leaves)
                    for h in peers:
                        n.start_soon(leech, h)
                outer.cancel_scope.cancel()
            t = max((f.total_s or math.inf) for f in fetched.values())
            wall, busy = trio.current_time() - t0, machine_busy_seconds() - busy0
            for name, sec in lab.cpu_seconds().items():
                cpu_seen[name] = max(cpu_seen[name], sec)
            used = {name: cpu_seen[name] - cpu0[name] for name in cpu_seen}
            identical = {}
            want = await trio.to_thread.run_sync(sha256_tree, src)
            for name, f in fetched.items():
                identical[name] = f.path is not None and await trio.to_thread.run_sync(sha256_tree, f.path) == want
            paths: dict[str, list[str]] = {}
            by_path: dict[str, dict[str, dict[str, int]]] = {}
            for h in peers:
                art = await lab.nodes[h.name].artifact(aid)
                paths[h.name] = sorted({c["path"] for c in (art or {}).get("connections", [])})
                by_path[h.name] = (art or {}).get("bytes_by_path", {})
            result.update(
                t_s=None if math.isinf(t) else round(t, 3),
                seed_left_s=round(seed_left[0], 3) if seed_left else None,
                per_peer_s={k: f.total_s and round(f.total_s, 3) for k, f in sorted(fetched.items())},
                identical=identical,
                errors=[f.error for f in fetched.values() if f.error],
                paths_at_end=paths,
                # piece bytes each peer received ("in") and sent ("out") over each path; the seed's at its leaving
                bytes_by_path=by_path,
                seed_bytes_by_path=seed_paths,
                received_by_path=received_by_path(by_path),
                pieces=pieces,
                timeline=timeline,
                # cores used on average over the run: every daemon with the seed (until it left), the tracker,
                # and the whole machine (near its nproc: the run is CPU-bound and T measures the machine)
                daemons_cpu_cores=round(sum(v for k, v in used.items() if k != "tracker") / wall, 2),
                tracker_cpu_cores=round(used.get("tracker", 0.0) / wall, 2),
                machine_busy_cores=round(busy / wall, 2),
                cpu_s=dict(sorted((k, round(v, 2)) for k, v in used.items())),
            )

        try:
            trio.run(main)
        finally:
            if keep_logs is not None:
                keep_lab_logs(work, keep_logs, log)
        stats = lab.tracker_stats()
    relayed = int(stats.get("relay_bytes_relayed", 0))
    t = result["t_s"]
    return {
        **result,
        "peer_kinds": list(peer_kinds),
        "size_bytes": size,
        "rate_bps": rate_bps,
        "t_min_s": round(t_min, 3),
        "ratio": None if t is None else round(t / t_min, 3),
        "relay_bytes": relayed,
        "relay_F": round(relayed / size, 3),
        "relay_pairs_spliced": stats.get("relay_pairs_spliced"),
    }


async def timeline_sample(lab: NatLab, peers: list[Host], aid: str, names: dict[str, str], t: float) -> dict[str, Any]:
    """Each peer at time `t`: pieces done and, per connected peer (by name), path and piece bytes received.

    A series of these shows when each path came up and its rate over time (which peer trails, and why).
    """
    out: dict[str, Any] = {"t": round(t, 3)}

    async def one(h: Host) -> None:
        t_call = trio.current_time()
        try:
            art = await lab.nodes[h.name].artifact(aid)
        except (OSError, RpcError):
            art = None
        if art is None:
            return
        out[h.name] = {
            "done": art["pieces_done"],
            # how long the node's control socket took to answer: a busy or blocked event loop shows here
            "rpc_s": round(trio.current_time() - t_call, 3),
            "conns": {
                names.get(c["node_id"], c["node_id"][:8]): [c["path"], c.get("bytes_down", 0)]
                for c in art.get("connections", [])
            },
        }

    async with trio.open_nursery() as n:
        for h in peers:
            n.start_soon(one, h)
    return out


def received_by_path(by_path: dict[str, dict[str, dict[str, int]]]) -> dict[str, int]:
    """Piece bytes the peers received over each path, all peers together (how much went over slow paths)."""
    total: dict[str, int] = {}
    for paths in by_path.values():
        for path, n in paths.items():
            total[path] = total.get(path, 0) + int(n.get("in", 0))
    return dict(sorted(total.items()))


def keep_lab_logs(work: Path, dest: Path, log: IO[str]) -> None:
    """Copy the lab's logs (tracker.log, one per daemon) to `dest`, which is created."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(work.glob("*.log")):
        shutil.copy2(f, dest / f.name)
    _log(log, f"logs kept in {dest}")


# ----------------------------------------------------------------------------------------------- command
def add_arguments(ap: argparse.ArgumentParser, size_type: Any, rate_type: Any) -> None:
    ap.add_argument("--size", type=size_type, default=2 * MiB, help="artifact of every matrix cell (SIZE)")
    ap.add_argument("--throughput-size", type=size_type, default=64 * MiB, help="cone vs public pair (SIZE)")
    ap.add_argument("--swarm-size", type=size_type, default=128 * MiB, help="artifact of the NAT swarm (SIZE)")
    ap.add_argument("--rate", type=rate_type, default=200_000_000, help="swarm links, both ways (RATE)")
    ap.add_argument("--skip-swarm", action="store_true")
    ap.add_argument("--skip-matrix", action="store_true")
    ap.add_argument("--json", default=None, help="also write the JSON result to this file")
    ap.add_argument("--keep-logs", type=Path, default=None, metavar="DIR", help="copy the swarm's logs to DIR")
    ap.add_argument(
        "--swarm-peers",
        type=_peers_arg,
        default=SWARM_PEERS,
        help="the swarm's peers, comma list of NAT kinds (e.g. 8 x public: a control without NATs); "
        "default 4 port-restricted-cone, 2 symmetric, 2 public",
    )
    ap.add_argument(
        "--clients",
        type=_clients_arg,
        default=("p2pd",),
        help="matrix clients, comma list of p2pd,libtorrent (default p2pd; libtorrent runs after p2pd, same hosts)",
    )
    ap.add_argument("--lt-timeout", type=float, default=30.0, help="libtorrent: seconds per matrix cell")


def _clients_arg(text: str) -> tuple[str, ...]:
    try:
        return parse_clients(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _peers_arg(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    if not kinds or any(k not in NAT_KINDS for k in kinds):
        raise argparse.ArgumentTypeError(f"NAT kinds are {', '.join(NAT_KINDS)}; got {text!r}")
    return kinds


def run(a: argparse.Namespace, command: str) -> int:
    """The `nat` subcommand: JSON, then the matrix table and a headline. Exit 1 when a cell or peer failed."""
    preflight([("ip", "iproute2"), ("tc", "iproute2"), ("iptables", "iptables")])
    if "libtorrent" in a.clients and not a.skip_matrix and (why := libtorrent_missing()):
        raise BenchError(why)  # before p2pd's part runs, not after
    out: dict[str, Any] = {
        "benchmark": "nat",
        "command": command,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"nproc": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()]},
        "revision": revision(),
        "libtorrent": "not compared (run with --clients p2pd,libtorrent)",
    }
    parts = []
    failed = False
    if not a.skip_matrix:
        m = run_matrix(size=a.size, throughput_size=a.throughput_size, clients=a.clients, lt_timeout_s=a.lt_timeout)
        lt_m = m.pop("libtorrent", None)
        if "p2pd" in a.clients:
            s = matrix_summary(m)
            out["matrix"] = {**m, "summary": s}
            failed |= s["connected"] < s["cells"]
            parts.append(
                f"matrix {s['connected']}/{s['cells']} connected, {s['as_expected']} on the expected path; "
                f"first piece p95 direct {s['first_piece_p95_direct_s']} s, "
                f"punched {s['first_piece_p95_punched_s']} s, "
                f"udp-punch {s['first_piece_p95_udp_punch_s']} s at {s['udp_punch_MBps']} MB/s, "
                f"relay worst {s['first_piece_worst_relay_s']} s; "
                f"cone/public throughput {s['cone_over_public_throughput']}"
            )
        if lt_m is not None:  # the baseline: its failed cells are the finding, not a failure of the run
            ls = lt_summary(lt_m)
            out["libtorrent"] = {**lt_m, "summary": ls}
            parts.append(
                f"libtorrent {ls['connected']}/{ls['cells']} connected, {ls['complete']} complete "
                f"({ls['over_utp']} uTP, {ls['over_tcp']} TCP, {ls['holepunched']} holepunched); first piece p95 "
                f"{ls['first_piece_p95_s']} s; cone {ls['cone_MBps']} MB/s vs public {ls['public_MBps']} MB/s"
            )
    if not a.skip_swarm:
        sw = run_nat_swarm(size=a.swarm_size, rate_bps=a.rate, peer_kinds=a.swarm_peers, keep_logs=a.keep_logs)
        out["swarm"] = sw
        failed |= sw["t_s"] is None or not all(sw["identical"].values())
        parts.append(
            f"NAT swarm 1+{len(sw['peer_kinds'])} {format_size_exact(sw['size_bytes'])} @ "
            f"{format_bits_rate(sw['rate_bps'])}: T {sw['t_s']} s = {sw['ratio']}x T_min ({sw['t_min_s']} s), "
            f"relay {sw['relay_F']} F; peers received "
            + ", ".join(f"{p} {n / sw['size_bytes']:.2f} F" for p, n in sw["received_by_path"].items())
            + f"; daemons {sw['daemons_cpu_cores']} cores, tracker {sw['tracker_cpu_cores']}, "
            f"machine {sw['machine_busy_cores']} of {os.cpu_count()}"
        )
    out["headline"] = "nat: " + " | ".join(parts)
    print(write_json(out, a.json))
    lt_m = out["libtorrent"] if isinstance(out["libtorrent"], dict) else None
    if "matrix" in out:
        if lt_m is not None:
            print("p2pd (path, time to first piece):")
        print(matrix_table(out["matrix"]))
    if lt_m is not None:
        print(f"libtorrent (transport, time to first piece; {lt_m['setup']}):")
        print(lt_matrix_table(lt_m))
    print(out["headline"])
    return 1 if failed else 0
