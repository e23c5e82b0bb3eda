"""`python -m netsim.bench swarm`: 1 seed + N leechers, every client on the same network, payload and rules.

Emulated topology (default): one namespace per node on a bridge, every link tbf-shaped to RATE both ways; the
result is compared with the Kumar-Ross bound, nominal (`t_min_s`) and with the rate iperf3 measured over one link
(`t_min_measured_s`: TCP/IP headers take ~4.5% of a shaped link, so no client can reach the nominal bound).
Loopback topology: all nodes in one fresh namespace on 127.0.0.x, unshaped: the CPU cost of each client, reported
as aggregate delivered MB/s (N·F / T).

Besides the systems compared (p2pd, libtorrent, aria2, http), `chain` relays the payload byte by byte along
seed -> p1 -> ... -> pN: one flow per link and no node waiting for a piece, so it shows how near the bound this
network lets any schedule come (clients/chain.py).

Clients are interleaved run by run (rotating the order, so no client always runs first on a cold cache); medians
and ranges are over the runs that completed and verified. The payload lives on tmpfs (/dev/shm) and so do all
copies, so disks are out of the measurement.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from netsim.bench.clients import SYSTEMS, make_client
from netsim.bench.clients.base import Client
from netsim.bench.harness import REPO_ROOT, BenchError, Ctx, Net, Node, build_net, make_payload, wait_until
from netsim.bench.model import ChurnEvent, RateClass, churn_bound, peer_rates, summarize, zone_bound
from netsim.emu import Topology, new_prefix
from p2pd.units import format_bits_rate, format_size_exact

SHM = "/dev/shm"


@dataclass
class SwarmOptions:
    """What `python -m netsim.bench swarm` was asked for (rates in bit/s, size in bytes)."""

    peers: int = 4
    size: int = 512 << 20
    rate_bps: int = 200_000_000
    seed_rate_bps: int | None = None
    clients: list[str] = field(default_factory=lambda: list(SYSTEMS))
    runs: int = 3
    topology: str = "emu"
    loss: float = 0.0
    timeout_s: float | None = None
    keep: bool = False
    iperf: bool = True
    mesh: int = 0  # > 0: also measure what the network carries with every node sending to this many others
    p2pd_egress_limit: str | None = None
    p2pd_run_args: list[str] = field(default_factory=list)
    p2pd_insecure: bool = False  # tracker and daemons --insecure: the cost of authentication, side by side
    trace: bool = False
    command: str = ""
    rate_classes: list[RateClass] = field(default_factory=list)  # --rates: per-peer links instead of --rate
    churn: list[ChurnEvent] = field(default_factory=list)
    zones: int = 1  # 2: the seed and the first half of the peers in zone a, the rest in zone b
    zone_link_bps: int | None = None  # the trunk between the two zones, each way (None = unshaped)


def link_rates(o: SwarmOptions) -> tuple[int, list[int], list[int]]:
    """(seed up, peers' up, peers' down) in bit/s: from --rates classes when given, else --rate for every peer."""
    if o.rate_classes:
        ups, downs = peer_rates(o.rate_classes)
    else:
        ups, downs = [o.rate_bps] * o.peers, [o.rate_bps] * o.peers
    return o.seed_rate_bps or o.rate_bps, ups, downs


def in_zone_b(o: SwarmOptions) -> list[bool]:
    """Per peer: whether it sits in zone b (with --zones 2, the second half of the peers; the seed is in zone a)."""
    return [o.zones == 2 and i >= o.peers // 2 for i in range(o.peers)]


def build_classes_net(topo: Topology, o: SwarmOptions) -> tuple[Net, tuple[str, str] | None]:
    """Like harness.build_net for the emulated topology, with each peer's link shaped to its --rates class, and
    with --zones 2 two switches joined by a trunk of --zone-link. Returns the net and the trunk's two ends (the
    switch namespaces' interface names) or None."""
    lan = topo.add_switch("lan")
    seed_up, ups, downs = link_rates(o)
    seed = topo.add_host("seed", lan, rate=seed_up, loss=o.loss)
    trunk = None
    zb = None
    if o.zones == 2:
        # one L2 segment over two bridges: zone b's hosts take addresses from zone a's subnet
        zb = topo.add_switch("zb", subnet=str(lan.subnet))
        trunk = topo.join_switches(lan, zb, o.zone_link_bps)
    ls = []
    for i, (up, down, b) in enumerate(zip(ups, downs, in_zone_b(o), strict=True), start=1):
        if b and zb is not None:
            ls.append(topo.add_host(f"p{i}", zb, up=up, down=down, loss=o.loss, ip=str(lan.take_ip())))
        else:
            ls.append(topo.add_host(f"p{i}", lan, up=up, down=down, loss=o.loss))
    zone = (lambda b: "b" if b else "a") if o.zones == 2 else (lambda b: None)
    leechers = [Node(h.name, h, h.ip or "", zone(b)) for h, b in zip(ls, in_zone_b(o), strict=True)]
    return Net("emu", topo, Node("seed", seed, seed.ip or "", zone(False)), leechers, None, seed_up), trunk


def trunk_bytes(net: Net, trunk: tuple[str, str]) -> tuple[int, int]:
    """Bytes that crossed between the zones so far, (a to b, b to a): frames as the trunk carried them."""
    sent = []
    for sw, dev in zip(net.topo.switches.values(), trunk, strict=True):
        cp = subprocess.run(
            ["ip", "-n", sw.ns, "-s", "-j", "link", "show", "dev", dev], capture_output=True, text=True, check=True
        )
        sent.append(int(json.loads(cp.stdout)[0]["stats64"]["tx"]["bytes"]))
    return sent[0], sent[1]


def rates_text(classes: list[RateClass]) -> str:
    """The classes as the command line spells them (for logs and the headline)."""
    return " ".join(
        f"{c.count}@{format_bits_rate(c.up_bps)}"
        + ("" if c.up_bps == c.down_bps else f"/{format_bits_rate(c.down_bps)}")
        for c in classes
    )


def preflight(tools: list[tuple[str, str]]) -> None:
    """Raise BenchError naming exactly what is missing (root, a binary and its Debian package)."""
    if os.geteuid() != 0:
        raise BenchError("needs root: it creates network namespaces (run as root or with CAP_NET_ADMIN+SYS_ADMIN)")
    for tool, pkg in tools:
        if not shutil.which(tool):
            raise BenchError(f"{tool} not found (apt-get install {pkg})")


def measure_iperf(net: Net, seconds: int = 4) -> float:
    """TCP goodput seed -> p1 in bit/s (iperf3, 1 s of slow start omitted): what a shaped link really carries."""
    seed, p1 = net.seed, net.leechers[0]
    srv = seed.host.popen(
        ["iperf3", "-s", "-1", "-B", seed.ip, "-p", "5201"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(50):
            cp = p1.host.run(
                ["iperf3", "-c", seed.ip, "-p", "5201", "-R", "-t", str(seconds), "-O", "1", "-J"],
                check=False,
                timeout=seconds + 30,
            )
            j = json.loads(cp.stdout) if cp.stdout.strip().startswith("{") else {}
            if cp.returncode == 0 and "sum_received" in j.get("end", {}):
                return float(j["end"]["sum_received"]["bits_per_second"])
            time.sleep(0.1)  # server not listening yet (iperf3 -J reports that as {"error": ...})
        raise BenchError(f"iperf3 failed: {cp.stdout[-300:]} {cp.stderr[-300:]}")
    finally:
        net.topo.stop(srv, timeout=3)


def _pin_neighbours(nodes: list[Node]) -> None:
    """Static ARP entries between all the nodes: with every link full at once, ARP replies queue behind data and
    are lost, and a connect begun under that load failed ("No route to host"). They stay: they are the right ones."""
    macs = {}
    for nd in nodes:
        dev = nd.host.links[0].host_if
        macs[nd.ip] = json.loads(nd.host.run(["ip", "-j", "link", "show", "dev", dev]).stdout)[0]["address"]
    for nd in nodes:
        dev = nd.host.links[0].host_if
        lines = [f"neigh replace {d.ip} lladdr {macs[d.ip]} dev {dev} nud permanent" for d in nodes if d is not nd]
        nd.host.run(["ip", "-batch", "-"], input="\n".join(lines) + "\n")


MESH_PORT = 5301  # the mesh's iperf3 servers: node i listens on MESH_PORT + k for its k-th sender
MESH_CONNECT_S = 20.0  # for every flow to connect (a SYN lost to a full queue is resent after 1, 3, 7 s)
MESH_SETTLE_S = 2.0  # from the last flow connected to the window counted: past slow start


def measure_mesh(net: Net, fanout: int, seconds: float = 6.0) -> float:
    """Mean TCP goodput per node in bit/s while every node sends to the next `fanout` nodes at once (iperf3
    flows): what the network carries with every link busy both ways, as in a swarm. One flow's rate
    (`measure_iperf`) leaves out what a swarm meets on every link: senders converging on a receiver's port, and
    ACKs sharing an uplink with data.

    Counted at the receiving sockets (`ss`: bytes received) over one window in which every flow runs: iperf3's own
    reports cover each flow's own seconds, and under this load a flow's connect can lose its SYN and begin
    seconds after the others (its report then measured a network that was still half idle)."""
    nodes = [net.seed, *net.leechers]
    if not 0 < fanout < len(nodes):
        raise BenchError(f"--mesh {fanout}: each of the {len(nodes)} nodes sends to 1..{len(nodes) - 1} others")
    ports = (MESH_PORT, MESH_PORT + fanout)
    procs: list[subprocess.Popen] = []
    try:
        for nd in nodes:
            for k in range(fanout):
                argv = ["iperf3", "-s", "-1", "-B", nd.ip, "-p", str(MESH_PORT + k)]
                procs.append(nd.host.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _until(
            nodes, lambda nd: _mesh_sockets(nd, ports, listening=True)[0] >= fanout, 10.0, "iperf3 servers listening"
        )
        _pin_neighbours(nodes)
        for i, nd in enumerate(nodes):
            for k in range(fanout):
                dst = nodes[(i + 1 + k) % len(nodes)].ip
                argv = ["iperf3", "-c", dst, "-p", str(MESH_PORT + k), "-t", "3600"]
                procs.append(nd.host.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        # each flow: iperf3's control connection and its data connection
        _until(nodes, lambda nd: _mesh_sockets(nd, ports)[0] >= 2 * fanout, MESH_CONNECT_S, "iperf3 flows connected")
        time.sleep(MESH_SETTLE_S)
        first = [(time.monotonic(), _mesh_sockets(nd, ports)[1]) for nd in nodes]
        time.sleep(seconds)
        total = 0.0
        for nd, (t0, b0) in zip(nodes, first, strict=True):
            conns, b1 = _mesh_sockets(nd, ports)
            if conns < 2 * fanout:
                raise BenchError(f"iperf3 mesh: a flow to {nd.name} ended inside the window")
            total += (b1 - b0) * 8 / (time.monotonic() - t0)
        return total / len(nodes)
    finally:  # measuring tools, nothing to wind down: killed, not asked (hundreds of them, on a busy machine)
        for p in procs:
            p.kill()
        for p in procs:
            net.topo.stop(p, timeout=5)


def _until(nodes: list[Node], ready: Callable[[Node], bool], timeout: float, what: str) -> None:
    """`wait_until` for every node against one deadline, node by node (each poll of a node is an `ss` in it)."""
    deadline = time.monotonic() + timeout
    for nd in nodes:
        wait_until(functools.partial(ready, nd), deadline - time.monotonic(), f"iperf3 mesh: {what} on {nd.name}")


def _mesh_sockets(nd: Node, ports: tuple[int, int], *, listening: bool = False) -> tuple[int, int]:
    """(sockets, bytes received) of the node's TCP sockets on local ports [lo, hi): listening, or established."""
    argv = ["ss", "-Hltn"] if listening else ["ss", "-Htin", "state", "established"]
    count = received = 0
    local = ""
    for line in nd.host.run(argv).stdout.splitlines():
        f = line.split()
        if f and not line[0].isspace():  # a socket's line (with -i, its details follow on an indented line)
            local = f[3] if listening else f[2]
            if ports[0] <= int(local.rsplit(":", 1)[1]) < ports[1]:
                count += 1
            else:
                local = ""
        elif local and (m := re.search(r"bytes_received:(\d+)", line)):
            received += int(m.group(1))
    return count, received


def check_options(o: SwarmOptions) -> None:
    """Raise BenchError for options that contradict each other (before anything is built)."""
    if o.peers < 1 or o.runs < 1 or o.size < 1:
        raise BenchError("--peers, --runs and --size must be positive")
    if o.rate_classes and o.topology != "emu":
        raise BenchError("--rates shapes links: it needs --topology emu")
    if o.zones not in (1, 2):
        raise BenchError(f"--zones {o.zones}: the emulation has one zone or two (a trunk between two switches)")
    if o.zones == 2 and (o.topology != "emu" or o.peers < 2):
        raise BenchError("--zones 2 needs --topology emu and at least 2 peers (one per zone)")
    if o.zone_link_bps is not None and o.zones != 2:
        raise BenchError("--zone-link is the trunk between two zones: give --zones 2 with it")
    if o.rate_classes and sum(c.count for c in o.rate_classes) != o.peers:
        raise BenchError(f"--rates counts add up to {sum(c.count for c in o.rate_classes)} peers, not {o.peers}")
    if o.mesh < 0 or o.mesh > o.peers:
        raise BenchError(f"--mesh {o.mesh}: each of the {o.peers + 1} nodes sends to 1..{o.peers} others (0: no mesh)")
    equal = not o.rate_classes and o.zones == 1 and o.seed_rate_bps in (None, o.rate_bps)
    if o.mesh and (o.topology != "emu" or not equal):
        raise BenchError(
            "--mesh measures one switch of equal links: use it on --topology emu without --rates, --zones, --seed-rate"
        )
    if o.churn and (o.clients != ["p2pd"] or o.topology != "emu"):
        raise BenchError("--churn restarts p2pd daemons: use it with --clients p2pd on --topology emu")
    if sum(c.count for c in o.churn) > o.peers:
        raise BenchError(f"--churn takes {sum(c.count for c in o.churn)} peers away, there are only {o.peers}")


def run_swarm(o: SwarmOptions, log: IO[str] = sys.stderr, clients: list[Client] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-able result (clients that failed a run are reported, not raised)."""
    preflight(
        [("ip", "iproute2"), ("tc", "iproute2"), ("cmp", "diffutils")]
        + ([("iperf3", "iperf3")] if (o.iperf or o.mesh) and o.topology == "emu" else [])
        + ([("ss", "iproute2")] if o.mesh else [])
        + ([("iptables", "iptables")] if o.loss else [])
    )
    check_options(o)
    clients = clients if clients is not None else [make_client(c, o) for c in o.clients]
    missing = [f"{c.name}: {m}" for c in clients if (m := c.missing())]
    if missing:
        raise BenchError("cannot run: " + "; ".join(missing))
    need = o.size * (o.peers + 1) + (512 << 20)  # payload + a copy per leecher (deleted after each run)
    free = shutil.disk_usage(SHM).free
    if free < need:
        raise BenchError(f"{SHM} has {free >> 20} MiB free, this run needs ~{need >> 20} MiB")

    prefix = new_prefix()
    work = os.path.join(SHM, f"netsim-{prefix}")
    os.makedirs(os.path.join(work, "payload"))
    os.chmod(work, 0o755)
    os.chmod(os.path.join(work, "payload"), 0o755)
    results: dict[str, list] = {c.name: [] for c in clients}
    crossed: dict[str, list[tuple[int, int]]] = {c.name: [] for c in clients}  # --zones 2: trunk bytes per run
    failures: dict[str, list[str]] = {c.name: [] for c in clients}
    measured_bps: float | None = None
    mesh_bps: float | None = None
    try:
        payload = os.path.join(work, "payload", "payload.bin")
        make_payload(payload, o.size)
        with Topology(prefix) as topo:
            trunk = None
            if o.rate_classes or o.zones == 2:
                net, trunk = build_classes_net(topo, o)
            else:
                net = build_net(
                    topo, o.topology, o.peers, o.rate_bps if o.topology == "emu" else None, o.seed_rate_bps, o.loss
                )
            t_min = t_min_nominal(o)
            timeout = o.timeout_s or (max(120.0, 10 * t_min) if t_min else 600.0)
            ctx = Ctx(
                net=net,
                payload=payload,
                size=o.size,
                work=work,
                timeout_s=timeout,
                log=log,
                keep_logs=o.keep,
                trace=o.trace,
            )
            ctx.say(
                f"{o.topology}: 1 seed + {o.peers} peers, {format_size_exact(o.size)}"
                + (f" at {rates_text(o.rate_classes)}" if o.rate_classes else "")
                + (f" at {format_bits_rate(o.rate_bps)}" if t_min and not o.rate_classes else "")
                + (f", T_min {t_min:.2f} s" if t_min else "")
                + f" ({prefix})"
            )
            if o.topology == "emu" and o.iperf:
                measured_bps = measure_iperf(net)
                ctx.say(f"iperf3 seed->p1: {measured_bps / 1e6:.1f} Mbit/s")
            if o.mesh:
                mesh_bps = measure_mesh(net, o.mesh)
                ctx.say(f"iperf3 mesh, each node to {o.mesh} others: {mesh_bps / 1e6:.1f} Mbit/s per node")
            for c in clients:
                c.prepare(ctx)
            for r in range(o.runs):
                k = r % len(clients)
                for c in clients[k:] + clients[:k]:
                    before = trunk_bytes(net, trunk) if trunk else (0, 0)
                    try:
                        res = c.run(ctx, r)
                    except BenchError as e:
                        failures[c.name].append(f"run {r + 1}: {e}")
                        ctx.say(f"run {r + 1}/{o.runs} {c.name}: FAILED: {e}")
                        continue
                    results[c.name].append(res)
                    if trunk:
                        after = trunk_bytes(net, trunk)
                        crossed[c.name].append((after[0] - before[0], after[1] - before[1]))
                    up = f", seed sent {res.seed_tx_bytes / o.size:.2f} F" if res.seed_tx_bytes is not None else ""
                    if res.client_cpu_cores is not None:
                        up += f", CPU {res.client_cpu_cores:.2f} cores (machine {res.machine_busy_cores:.2f})"
                    if res.wire is not None:
                        up += f", switch dropped {100 * res.wire.dropped:.1f} % of what the uplinks sent"
                    ctx.say(
                        f"run {r + 1}/{o.runs} {c.name}: {res.t_s:.2f} s"
                        + (f" ({res.t_s / t_min:.2f}x T_min)" if t_min else "")
                        + f" {o.peers * o.size / res.t_s / 1e6:.0f} MB/s delivered{up}"
                    )
    finally:
        if not o.keep:
            shutil.rmtree(work, ignore_errors=True)
    return report(o, results, failures, measured_bps, crossed, mesh_bps)


def revision() -> str | None:
    """The repo's commit (+ "-dirty" when p2pd/, tracker/ or netsim/ have uncommitted changes), for BENCHMARKS.md."""
    try:
        head = subprocess.run(
            ["git", "-C", REPO_ROOT, "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", REPO_ROOT, "status", "--porcelain", "--", "p2pd", "tracker", "netsim"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None  # not a git checkout (an installed copy): the JSON says so with null
    return head + ("-dirty" if dirty else "")


def t_min_nominal(o: SwarmOptions) -> float | None:
    """Kumar-Ross bound with the nominal link rates (None on loopback: no rates)."""
    if o.topology != "emu":
        return None
    s, ups, downs = link_rates(o)
    return zone_bound(o.size, s, ups, downs, in_zone_b(o), o.zone_link_bps if o.zones == 2 else None)


def report(
    o: SwarmOptions,
    results: dict[str, list],
    failures: dict[str, list[str]],
    measured_bps: float | None,
    crossed: dict[str, list[tuple[int, int]]] | None = None,
    mesh_bps: float | None = None,
) -> dict[str, Any]:
    """The JSON object: parameters, bounds, and per client times, medians, ranges, ratios, seed upload."""
    t_min = t_min_nominal(o)
    t_min_meas = None
    s, ups, downs = link_rates(o)
    # the measured path is seed-up -> p1-down; every shaped link loses the same share to TCP/IP headers
    scale = measured_bps / min(s, downs[0]) if t_min and measured_bps else None
    if t_min and scale:
        zl = o.zone_link_bps * scale if o.zones == 2 and o.zone_link_bps else None
        t_min_meas = zone_bound(
            o.size, s * scale, [u * scale for u in ups], [d * scale for d in downs], in_zone_b(o), zl
        )
    # equal links only (--mesh): every term of the bound scales with the goodput a busy link gives each node
    t_min_mesh = t_min * o.rate_bps / mesh_bps if t_min and mesh_bps else None
    away = [c.down_s for c in o.churn if c.down_s is not None]
    t_churn = churn_bound(t_min, o.size, downs, away) if t_min and away else None
    t_churn_meas = (
        churn_bound(t_min_meas, o.size, [d * scale for d in downs], away) if t_min_meas and scale and away else None
    )
    out: dict[str, Any] = {
        "benchmark": "swarm",
        "topology": o.topology,
        "command": o.command,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "nproc": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
        },
        "revision": revision(),
        "pythonpath": os.environ.get("PYTHONPATH"),  # set when a snapshot of p2pd/ was benchmarked
        "peers": o.peers,
        "size_bytes": o.size,
        "rate_bps": o.rate_bps if o.topology == "emu" and not o.rate_classes else None,
        "rate_classes": [{"count": c.count, "up_bps": c.up_bps, "down_bps": c.down_bps} for c in o.rate_classes]
        or None,
        "seed_rate_bps": (o.seed_rate_bps or o.rate_bps) if o.topology == "emu" else None,
        "loss": o.loss,
        "runs": o.runs,
        "t_min_s": None if t_min is None else round(t_min, 3),
        "t_min_measured_s": None if t_min_meas is None else round(t_min_meas, 3),
        "iperf3_bps": None if measured_bps is None else round(measured_bps),
        "mesh_fanout": o.mesh or None,
        "mesh_bps_per_node": None if mesh_bps is None else round(mesh_bps),
        "t_min_mesh_s": None if t_min_mesh is None else round(t_min_mesh, 3),
        "zones": o.zones,
        "zone_link_bps": o.zone_link_bps,
        "churn": [{"count": c.count, "at_s": c.at_s, "down_s": c.down_s} for c in o.churn] or None,
        "bound_note": "churn: peers away for part of the run, so t_min_s is a lower bound only, not reachable; "
        "t_churn_s adds the time a peer is away to what its own link needs (F/d + D), the bound the churn allows"
        if o.churn
        else None,
        "t_churn_s": None if t_churn is None else round(t_churn, 3),
        "t_churn_measured_s": None if t_churn_meas is None else round(t_churn_meas, 3),
        "clients": {},
    }
    for name, rs in results.items():
        times = [r.t_s for r in rs]
        st = summarize(times)
        ups = [r.seed_tx_bytes / o.size for r in rs if r.seed_tx_bytes is not None]
        agg = [o.peers * o.size / t / 1e6 for t in times]
        rss = [r.rss_max_mb for r in rs if r.rss_max_mb is not None]
        wires = [(r.wire, r.t_s) for r in rs if r.wire is not None]
        med, lo, hi = st["median"], st["min"], st["max"]
        up_med, agg_med = summarize(ups)["median"], summarize(agg)["median"]  # None when empty
        out["clients"][name] = {
            "times_s": times,
            "median_s": med,
            "min_s": lo,
            "max_s": hi,
            "ratio": None if med is None or not t_min else round(med / t_min, 3),
            "ratio_range": None
            if lo is None or hi is None or not t_min
            else [round(lo / t_min, 3), round(hi / t_min, 3)],
            "ratio_measured": None if med is None or not t_min_meas else round(med / t_min_meas, 3),
            "ratio_mesh": None if med is None or not t_min_mesh else round(med / t_min_mesh, 3),
            "ratio_churn": None if med is None or not t_churn else round(med / t_churn, 3),
            "ratio_churn_measured": None if med is None or not t_churn_meas else round(med / t_churn_meas, 3),
            "seed_upload_F": None if up_med is None else round(up_med, 3),
            "seed_upload_F_runs": [round(u, 3) for u in ups],
            "agg_MBps": None if agg_med is None else round(agg_med, 1),
            "agg_MBps_runs": [round(a, 1) for a in agg],
            "per_leecher_s": [r.per_leecher_s for r in rs],
            "churned": [r.churned for r in rs] if o.churn else None,
            "rss_max_mb": max(rss) if rss else None,
            # per run: cores the client's processes used on average (a run near the machine's nproc is CPU-bound,
            # not a measurement of the protocol), the whole machine's busy cores, and the load average after it
            "client_cpu_cores_runs": [r.client_cpu_cores for r in rs],
            "machine_busy_cores_runs": [r.machine_busy_cores for r in rs],
            # into zone b (the seedless zone: each piece must cross once) and back, frames with headers
            "cross_zone_F_runs": [round(ab / o.size, 3) for ab, _ in (crossed or {}).get(name, [])]
            if o.zones == 2
            else None,
            "cross_zone_back_F_runs": [round(ba / o.size, 3) for _, ba in (crossed or {}).get(name, [])]
            if o.zones == 2
            else None,
            # emulated links, release to the last leecher: frames every uplink sent per byte the leechers needed
            # (a clean transfer ~1.01: the veths count a GSO super-packet's headers once), the share of them
            # dropped at a switch port (sent upstream, wasted), and how full the leechers' downlinks were on average
            "wire_sent_F_runs": [round(w.sent / (o.peers * o.size), 3) for w, _ in wires] if wires else None,
            "switch_dropped_runs": [round(w.dropped, 3) for w, _ in wires] if wires else None,
            "leecher_downlink_use_runs": [round(w.delivered_to_leechers * 8 / (sum(downs) * t), 3) for w, t in wires]
            if wires
            else None,
            "failures": failures[name],
        }
        if o.trace:
            out["clients"][name]["traces"] = [r.trace for r in rs]
    out["headline"] = headline(out)
    return out


def headline(res: dict[str, Any]) -> str:
    """One line: each client's ratio to T_min (emu) or delivered MB/s (loopback), best first."""
    cl = res["clients"]
    size = format_size_exact(res["size_bytes"])
    if res["topology"] == "emu":
        ok = sorted(((v["ratio"], k) for k, v in cl.items() if v["ratio"] is not None))
        parts = [f"{k} {r:.2f}x" for r, k in ok] + [f"{k} FAILED" for k, v in cl.items() if v["ratio"] is None]
        return (
            f"swarm 1+{res['peers']} {size} @ "
            + (
                format_bits_rate(res["rate_bps"])
                if res.get("rate_bps")
                else rates_text([RateClass(c["count"], c["up_bps"], c["down_bps"]) for c in res["rate_classes"]])
            )
            + (" with churn" if res.get("churn") else "")
            + (
                ", 2 zones (trunk "
                + (format_bits_rate(res["zone_link_bps"]) if res.get("zone_link_bps") else "unshaped")
                + ")"
                if res.get("zones") == 2
                else ""
            )
            + ": "
            f"T/T_min (T_min {res['t_min_s']:.2f} s): "
            + ", ".join(parts)
            + (
                f"; T/T_churn (T_churn {res['t_churn_s']:.2f} s): "
                + ", ".join(f"{k} {v['ratio_churn']:.2f}x" for k, v in cl.items() if v.get("ratio_churn") is not None)
                if res.get("t_churn_s")
                else ""
            )
        )
    ok = sorted(((v["agg_MBps"], k) for k, v in cl.items() if v["agg_MBps"] is not None), reverse=True)
    parts = [f"{k} {m:.0f} MB/s" for m, k in ok] + [f"{k} FAILED" for k, v in cl.items() if v["agg_MBps"] is None]
    line = f"swarm loopback 1+{res['peers']} {size}: delivered " + ", ".join(parts)
    if cl.get("p2pd", {}).get("agg_MBps") and cl.get("libtorrent", {}).get("agg_MBps"):
        line += f" (p2pd/libtorrent {cl['p2pd']['agg_MBps'] / cl['libtorrent']['agg_MBps']:.2f})"
    return line
