"""What every client runner shares: the network under test, the start gate, the stop rule, verification, counters.

The rules are the same for every client so that the numbers compare:
- start: every process of the swarm is started and ready first (seed serving, leechers warmed up at their gate);
  then all leechers are released within microseconds of each other (`release_and_wait`), and the clock starts;
- stop: the last leecher reports completion through the client's own verified-completion signal (p2pd fetch exit
  0, libtorrent's torrent_finished, aria2's on-bt-download-complete, curl exit 0); then every copy is compared to
  the payload with `cmp` (an independent program, not our code) — a run with any mismatch fails;
- seed upload: bytes sent by the seed's veth (interface counters, headers included) during the timed window.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from netsim.emu import Host, Topology

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Children run from here, not from the repo: `python -m` puts the working directory first on sys.path, which would
# shadow a PYTHONPATH that points at a snapshot of p2pd/ being benchmarked. The repo is on PYTHONPATH (last).
NEUTRAL_CWD = "/"
FAILED_LOGS = "/tmp/netsim-failed"  # logs of failed runs (the run folders themselves live on tmpfs and are deleted)
PYCACHE = os.path.join(tempfile.gettempdir(), f"netsim-pycache-{os.getuid()}")  # child processes' bytecode
PROXY_VARS = (
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "no_proxy",
    "NO_PROXY",
)


def write_json(res: dict[str, Any], path: str | None) -> str:
    """The result as indented JSON, also written to `path` (the `--json FILE` of every benchmark)."""
    text = json.dumps(res, indent=2)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
    return text


class BenchError(RuntimeError):
    """A run could not be completed or verified; the message says what was seen."""


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for every process we start: no proxies (nothing may try to leave the namespace), the repo on
    PYTHONPATH (so `python -m netsim...` and an uninstalled p2pd import inside the namespaces)."""
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    # the repo last: a PYTHONPATH set by the caller (e.g. a snapshot of p2pd/ to benchmark) takes precedence
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), REPO_ROOT) if p)
    # bytecode cached as an installed p2pd has it (pip compiles it): with the caller's PYTHONDONTWRITEBYTECODE
    # (set in some shells) every process compiled p2pd from source at each start, ~0.25 s of CPU, most of what
    # a --churn restart waited for on a busy 2-core machine. The cache goes to a folder of its own, never into
    # the source tree (a checkout being benchmarked stays as it is); Python checks each entry against its source.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.setdefault("PYTHONPYCACHEPREFIX", PYCACHE)
    env.update(extra or {})
    return env


@dataclass
class Node:
    """One swarm member: the namespace it runs in and the address it listens on."""

    name: str
    host: Host
    ip: str
    zone: str | None = None  # `p2pd run --zone` (swarm --zones): the tracker lists same-zone peers first


@dataclass
class Net:
    """The network of one benchmark invocation. kind 'emu': one namespace per node on a shaped bridge;
    kind 'loopback': every node in one fresh namespace on its own 127.0.0.x address (no shaping: CPU cost)."""

    kind: str
    topo: Topology
    seed: Node
    leechers: list[Node]
    up_bps: int | None = None
    seed_up_bps: int | None = None

    def nodes(self) -> list[Node]:
        """Seed first, then leechers."""
        return [self.seed, *self.leechers]

    def port_bytes(self) -> dict[str, tuple[int, int]] | None:
        """Per node: (bytes delivered to it, bytes it sent), read off the switch side of every link in one call
        (None on loopback). Client-agnostic progress, for --trace and each run's `Wire`."""
        if self.kind != "emu":
            return None
        by_sw: dict[str, dict[str, Any]] = {}
        out = {}
        for n in self.nodes():
            link = n.host.links[0]
            if link.switch.ns not in by_sw:  # one call per switch (two with --zones)
                cp = subprocess.run(
                    ["ip", "-n", link.switch.ns, "-s", "-j", "link", "show"], capture_output=True, text=True, check=True
                )
                by_sw[link.switch.ns] = {d["ifname"]: d["stats64"] for d in json.loads(cp.stdout) if "stats64" in d}
            st = by_sw[link.switch.ns][link.switch_if]
            out[n.name] = (st["tx"]["bytes"], st["rx"]["bytes"])
        return out

    def seed_tx_bytes(self) -> int | None:
        """Bytes the seed's link has sent so far (None on loopback, where there is no per-node interface)."""
        return self.seed.host.counters()["tx_bytes"] if self.kind == "emu" else None


def build_net(
    topo: Topology, kind: str, peers: int, rate_bps: int | None, seed_rate_bps: int | None, loss: float = 0.0
) -> Net:
    """Create the namespaces for 1 seed + `peers` leechers."""
    if kind == "loopback":
        h = topo.add_host("lo")
        return Net(
            kind,
            topo,
            Node("seed", h, "127.0.0.1"),
            [Node(f"p{i}", h, f"127.0.0.{10 + i}") for i in range(1, peers + 1)],
        )
    if kind != "emu":
        raise ValueError(f"unknown topology {kind!r}")
    lan = topo.add_switch("lan")
    srate = seed_rate_bps or rate_bps
    seed = topo.add_host("seed", lan, rate=srate, loss=loss)
    ls = [topo.add_host(f"p{i}", lan, rate=rate_bps, loss=loss) for i in range(1, peers + 1)]
    return Net(
        kind,
        topo,
        Node("seed", seed, seed.ip or ""),
        [Node(h.name, h, h.ip or "") for h in ls],
        up_bps=rate_bps,
        seed_up_bps=srate,
    )


@dataclass
class Ctx:
    """Everything a client runner needs for one invocation: network, payload, scratch space, limits."""

    net: Net
    payload: str
    size: int
    work: str
    timeout_s: float
    log: IO[str] = sys.stderr
    keep_logs: bool = False
    trace: bool = False
    rss_pids: list[int] = field(default_factory=list)

    def run_dir(self, client: str, run: int) -> str:
        """A fresh scratch folder for one client's run (on tmpfs, like the payload)."""
        d = os.path.join(self.work, f"{client}-r{run}")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        os.chmod(d, 0o755)
        return d

    def finish_run_dir(self, d: str) -> None:
        """After a run (called from the runner's `finally`, so also after a failure): keep the logs of a failed run
        outside tmpfs, then delete the folder (copies of the payload are GBs of RAM) unless --keep."""
        failed = sys.exc_info()[0] is not None
        if failed:
            dest = os.path.join(FAILED_LOGS, os.path.basename(self.work), os.path.basename(d))
            try:
                shutil.copytree(d, dest, dirs_exist_ok=True, ignore=_not_a_log)
                self.say(f"logs of the failed run kept in {dest}")
            except (OSError, shutil.Error) as e:  # the run's own error is what matters: report, don't replace it
                self.say(f"could not keep the logs of the failed run in {dest}: {e}")
        if not self.keep_logs:
            shutil.rmtree(d, ignore_errors=True)

    def say(self, msg: str) -> None:
        """Progress line on stderr (stdout carries only the JSON and the headline)."""
        print(f"[netsim {time.strftime('%H:%M:%S')}] {msg}", file=self.log, flush=True)


def _not_a_log(base: str, names: list[str]) -> list[str]:
    """copytree filter for salvaging logs: skip sockets/FIFOs and files over 16 MiB (payload copies)."""
    skip = []
    for n in names:
        st = os.lstat(os.path.join(base, n))
        if stat.S_ISDIR(st.st_mode):
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_size > 16 << 20:
            skip.append(n)
    return skip


class Leecher:
    """One leecher under measurement: how to release it, and how to see that it finished (monotonic time)."""

    def __init__(self, node: Node, output: str) -> None:
        self.node = node
        self.output = output  # file (or folder holding the payload's file name) to compare with the payload
        self.done_at: float | None = None
        self.error: str | None = None

    def go(self) -> None:
        """Release it (called for all leechers back to back)."""
        raise NotImplementedError

    def final_output(self) -> str:
        """Where the finished copy is (file, or folder holding a file of the payload's name)."""
        return self.output

    def poll(self, t0_mono: float, t0_wall: float) -> None:
        """Set `done_at` (monotonic) or `error` when the client reports completion or failure."""
        raise NotImplementedError


class GatedProcess(Leecher):
    """A command started behind `netsim.bench.gate`: done when it exits 0 (p2pd fetch, curl)."""

    def __init__(
        self, node: Node, output: str, argv: Sequence[str], logdir: str, tag: str, env: dict[str, str] | None = None
    ) -> None:
        super().__init__(node, output)
        self.stdout_path = os.path.join(logdir, f"{tag}.out")
        self.stderr_path = os.path.join(logdir, f"{tag}.err")
        gate = [
            sys.executable,
            "-m",
            "netsim.bench.gate",
            "--stdout",
            self.stdout_path,
            "--stderr",
            self.stderr_path,
            "--",
            *argv,
        ]
        self.proc = node.host.popen(
            gate, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env(env), cwd=NEUTRAL_CWD
        )

    def wait_ready(self, timeout: float = 60) -> None:
        """Block until the gate printed READY (the command is warmed up)."""
        line = _readline_timeout(self.proc, timeout)
        if line.strip() != "READY":
            raise BenchError(f"{self.node.name}: gate not ready (got {line!r}, exit {self.proc.poll()})")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("GO\n")
        self.proc.stdin.flush()

    def poll(self, t0_mono: float, t0_wall: float) -> None:
        rc = self.proc.poll()
        if rc is None or self.done_at is not None or self.error is not None:
            return
        if rc == 0:
            self.done_at = time.monotonic()
        else:
            self.error = f"{self.node.name}: exit {rc}: {tail(self.stderr_path)}"

    def last_stdout_line(self) -> str:
        """The command's last line of output (p2pd fetch prints the final path there)."""
        with open(self.stdout_path) as f:
            lines = [x for x in f.read().splitlines() if x.strip()]
        return lines[-1].strip() if lines else ""


def _readline_timeout(p: subprocess.Popen, timeout: float) -> str:
    """readline() from a child's stdout with a deadline (a thread, so a hung child cannot hang the benchmark)."""
    box: list[str] = []
    out = p.stdout
    assert out is not None
    th = threading.Thread(target=lambda: box.append(out.readline()), daemon=True)
    th.start()
    th.join(timeout)
    if th.is_alive():
        raise BenchError(f"no output from pid {p.pid} within {timeout:.0f} s")
    return box[0]


def tail(path: str, n: int = 600) -> str:
    """Last `n` characters of a log file, for error messages."""
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:].strip()
    except FileNotFoundError:
        return "(no log)"


def rss_mb(pid: int) -> float | None:
    """Resident set size of a process in MB (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds_tree(pids: Sequence[int]) -> float:
    """CPU seconds (user + system) used so far by these processes and all their descendants.

    Why: on a 2-core machine an emulated swarm can be CPU-bound rather than network-bound; a run whose clients
    need most of the cores measures the machine, not the protocol (BENCHMARKS.md, 2026-11-27)."""
    return sum(cpu_seconds_by_root({str(p): p for p in pids}).values())


def cpu_seconds_by_root(roots: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each named process with its descendants, from one scan of /proc.

    Why: the NAT swarm's timeline shows which daemon (public, cone, symmetric) or the tracker (it splices the relay)
    spends the 2 cores; one scan for all of them keeps the sampling cheap. A root that has exited counts 0."""
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                line = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited while we scanned
        fields = line[line.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
        pid = int(entry)
        parent[pid] = int(fields[1])
        ticks[pid] = int(fields[11]) + int(fields[12])  # utime, stime
    children: dict[int, list[int]] = {}
    for pid, pp in parent.items():
        children.setdefault(pp, []).append(pid)
    out: dict[str, float] = {}
    for name, root in roots.items():
        total, todo, seen = 0, [root], set()
        while todo:  # the root and its descendants
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            total += ticks.get(pid, 0)
            todo.extend(children.get(pid, ()))
        out[name] = total / _CLK_TCK
    return out


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine spent not idle (any process: ours, the kernel's, other users')."""
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    idle = cpu[3] + (cpu[4] if len(cpu) > 4 else 0)  # idle, iowait
    guest = sum(cpu[8:10]) if len(cpu) > 9 else 0  # guest time is also counted in user: not twice
    return (sum(cpu) - idle - guest) / _CLK_TCK


@dataclass
class RunResult:
    """One client's run: completion time of each leecher (s after release), seed upload, peak RSS."""

    client: str
    run: int
    per_leecher_s: list[float]
    t_s: float
    seed_tx_bytes: int | None
    rss_max_mb: float | None
    trace: dict[str, list] | None = None
    churned: list[dict[str, Any]] | None = None  # --churn: who left and came back when (p2pd)
    # cores the client's processes (ctx.rss_pids and their children) used on average during the run, and the
    # whole machine's busy cores meanwhile: near os.cpu_count() means the run was CPU-bound
    client_cpu_cores: float | None = None
    machine_busy_cores: float | None = None
    wire: Wire | None = None  # what the emulated switch saw (None on loopback)


@dataclass(frozen=True)
class Wire:
    """Frames (with headers) the emulated switch saw from the release to the last leecher (`Net.port_bytes`
    differences). What the uplinks sent and no downlink delivered was dropped at a switch port: uplink capacity
    spent for nothing."""

    sent: int  # onto every node's uplink
    delivered: int  # to every node over its downlink
    delivered_to_leechers: int

    @classmethod
    def between(cls, before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], seed: str) -> Wire:
        return cls(
            sum(after[n][1] - before[n][1] for n in after),
            sum(after[n][0] - before[n][0] for n in after),
            sum(after[n][0] - before[n][0] for n in after if n != seed),
        )

    @property
    def dropped(self) -> float:
        """The share of what the uplinks sent that no downlink delivered."""
        return 1 - self.delivered / self.sent if self.sent else 0.0


def release_and_wait(
    ctx: Ctx, client: str, run: int, leechers: Sequence[Leecher], extra_check: Callable[[], str | None] | None = None
) -> RunResult:
    """Apply the start and stop rules: release all leechers at once, wait for the last, verify every copy.

    `extra_check` is polled too (e.g. "a daemon died") and fails the run with its message."""
    tx0 = ctx.net.seed_tx_bytes()
    cpu0, busy0 = cpu_seconds_tree(ctx.rss_pids), machine_busy_seconds()
    base = ctx.net.port_bytes()  # read before the clock starts: one `ip` call per switch
    t0_wall = time.time()
    t0 = time.monotonic()
    for lc in leechers:
        lc.go()
    deadline = t0 + ctx.timeout_s
    rss_peak: float | None = None
    next_rss = 0.0
    trace: dict[str, list] | None = None
    if ctx.trace and base is not None:
        names = [lc.node.name for lc in leechers]
        trace = {"t_s": [], "down_MB": [], "seed_up_MB": [], "leechers": names}
    next_trace = t0
    while True:
        now = time.monotonic()
        for lc in leechers:
            lc.poll(t0, t0_wall)
        errs = [lc.error for lc in leechers if lc.error]
        if not errs and extra_check is not None:
            e = extra_check()
            errs = [e] if e else []
        if errs:
            raise BenchError("; ".join(errs))
        if all(lc.done_at is not None for lc in leechers):
            break
        if now > deadline:
            left = [lc.node.name for lc in leechers if lc.done_at is None]
            raise BenchError(f"timeout after {ctx.timeout_s:.0f} s; unfinished: {left}")
        if trace is not None and base is not None and now >= next_trace:
            next_trace += 0.5
            pb = ctx.net.port_bytes() or {}
            trace["t_s"].append(round(now - t0, 2))
            trace["down_MB"].append([round((pb[n][0] - base[n][0]) / 1e6, 1) for n in names])
            trace["seed_up_MB"].append(round((pb["seed"][1] - base["seed"][1]) / 1e6, 1))
        if now >= next_rss:
            next_rss = now + 0.25
            for pid in ctx.rss_pids:
                r = rss_mb(pid)
                if r is not None:
                    rss_peak = r if rss_peak is None else max(rss_peak, r)
        time.sleep(0.005)
    tx1 = ctx.net.seed_tx_bytes()
    end = ctx.net.port_bytes()
    wall = time.monotonic() - t0
    cpu1, busy1 = cpu_seconds_tree(ctx.rss_pids), machine_busy_seconds()
    times = [round((lc.done_at or 0.0) - t0, 3) for lc in leechers]
    for lc in leechers:
        verify_copy(ctx.payload, lc.final_output(), lc.node.name)
    return RunResult(
        client,
        run,
        times,
        max(times),
        None if tx0 is None or tx1 is None else tx1 - tx0,
        None if rss_peak is None else round(rss_peak, 1),
        trace,
        client_cpu_cores=round((cpu1 - cpu0) / wall, 2) if ctx.rss_pids else None,
        machine_busy_cores=round((busy1 - busy0) / wall, 2),
        wire=None if base is None or end is None else Wire.between(base, end, ctx.net.seed.name),
    )


def verify_copy(payload: str, output: str, who: str) -> None:
    """`cmp` the leecher's copy with the payload (a folder output must hold a file of the payload's name)."""
    path = output
    if os.path.isdir(path):
        path = os.path.join(path, os.path.basename(payload))
    if not os.path.isfile(path):
        raise BenchError(f"{who}: no output file at {path}")
    cp = subprocess.run(["cmp", "-s", payload, path], check=False)
    if cp.returncode != 0:
        raise BenchError(f"{who}: {path} differs from the payload (cmp exit {cp.returncode})")


def wait_tcp(host: Host, ip: str, port: int, timeout: float = 30) -> None:
    """Block until something accepts TCP connections on ip:port inside `host`'s namespace."""
    code = (
        "import socket,sys,time\nend=time.time()+float(sys.argv[3])\nwhile True:\n"
        " try:\n  socket.create_connection((sys.argv[1],int(sys.argv[2])),1).close();break\n"
        " except OSError:\n  time.sleep(0.05)\n  if time.time()>end: sys.exit(1)\n"
    )
    cp = host.run([sys.executable, "-c", code, ip, str(port), str(timeout)], check=False, timeout=timeout + 10)
    if cp.returncode != 0:
        raise BenchError(f"nothing listening on {ip}:{port} in {host.name} after {timeout:.0f} s")


def wait_until(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll `pred` until true or raise BenchError naming `what`."""
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise BenchError(f"timeout waiting for {what}")
        time.sleep(interval)


def make_payload(path: str, size: int) -> None:
    """`size` random bytes at `path` (os.urandom: incompressible, so no client gains from compression)."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 << 20)
            f.write(os.urandom(n))
            left -= n
    os.chmod(path, 0o644)


def stop_all(topo: Topology, procs: Sequence[subprocess.Popen | None], timeout: float = 5.0) -> None:
    """Stop our processes (SIGTERM, then SIGKILL after `timeout`), last started first."""
    for p in reversed([p for p in procs if p is not None]):
        topo.stop(p, timeout=timeout)


def p2pd_cmd() -> list[str]:
    """How to invoke the p2pd CLI."""
    if os.environ.get("NETSIM_P2PD_CMD"):
        return shlex.split(os.environ["NETSIM_P2PD_CMD"])
    return ["p2pd"] if shutil.which("p2pd") else [sys.executable, "-m", "p2pd.cli"]


def tracker_cmd() -> list[str]:
    """How to invoke the tracker CLI."""
    if os.environ.get("NETSIM_TRACKER_CMD"):
        return shlex.split(os.environ["NETSIM_TRACKER_CMD"])
    return ["p2p-tracker"] if shutil.which("p2p-tracker") else [sys.executable, "-m", "tracker.cli"]


# The admin-driven benches (throttle, preheat): a tracker with its admin API in the seed's namespace and a
# `p2pd run` daemon on every node, driven as an operator would (admin CLI and API, p2pd CLI).
LAB_TRACKER_PORT = 7400
LAB_NODE_PORT = 7401
LAB_ADMIN_PORT = 7402
LAB_TOKEN = "netsim-admin"


@dataclass
class Member:
    """One node of an admin-driven lab: its namespace, address, zone label ("" = none) and data dir."""

    name: str
    host: Host
    ip: str
    zone: str
    data: str = ""


def admin_cli(seed: Member, *args: str) -> Any:
    """`p2p-tracker admin ... --json` in the seed's namespace (the admin API listens there)."""
    cp = seed.host.run(
        [*tracker_cmd(), "admin", *args, "--tracker", f"http://{seed.ip}:{LAB_ADMIN_PORT}", "--token", LAB_TOKEN]
        + ["--json"],
        check=False,
        env=child_env(),
        cwd=NEUTRAL_CWD,
        timeout=60,
    )
    if cp.returncode != 0:
        raise BenchError(f"p2p-tracker admin {' '.join(args)}: exit {cp.returncode}: {cp.stderr.strip()[-400:]}")
    return json.loads(cp.stdout) if cp.stdout.strip() else None


def admin_api(seed: Member, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One admin API call with curl in the seed's namespace: tens of milliseconds, so polling and sampling
    do not pause and the time of a change is known to within that (the admin CLI, a Python process, can
    take seconds to start on a busy machine)."""
    argv = ["curl", "-sS", "-f", "-X", method, "-H", f"Authorization: Bearer {LAB_TOKEN}"]
    if body is not None:
        argv += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
    cp = seed.host.run([*argv, f"http://{seed.ip}:{LAB_ADMIN_PORT}{path}"], check=False, timeout=30)
    if cp.returncode != 0:
        raise BenchError(f"admin API {method} {path}: curl exit {cp.returncode}: {cp.stderr.strip()[-300:]}")
    return json.loads(cp.stdout)


def _wait_status(m: Member, proc: subprocess.Popen, logdir: str) -> None:
    """Until `p2pd status` on `m` exits 0 (the daemon is up and registered its control socket)."""
    end = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise BenchError(
                f"p2pd on {m.name} exited {proc.returncode}: {tail(os.path.join(logdir, m.name + '.log'))}"
            )
        cp = m.host.run(
            [*p2pd_cmd(), "status", "--data-dir", m.data], check=False, env=child_env(), cwd=NEUTRAL_CWD, timeout=60
        )
        if cp.returncode == 0:
            return
        if time.monotonic() > end:
            raise BenchError(f"p2pd on {m.name}: status never exited 0: {cp.stderr.strip()[-300:]}")
        time.sleep(0.1)


def start_lab(
    members: Sequence[Member], work: str, interval: float, procs: list[subprocess.Popen], zones: bool = False
) -> dict[str, subprocess.Popen]:
    """The tracker (admin API on) in the first member's namespace, then `p2pd run` on every member (with
    `--zone` when `zones`), each answering `p2pd status`; every process is appended to `procs` as it starts
    (the caller stops them). Logs: WORK/tracker.log and WORK/NAME.log; data dirs: each member's `data`."""
    seed = members[0]
    env = child_env()
    tracker = f"{seed.ip}:{LAB_TRACKER_PORT}"
    argv = [*tracker_cmd(), "serve", "--listen", tracker, "--interval", str(interval)]
    argv += ["--admin-listen", f"{seed.ip}:{LAB_ADMIN_PORT}", "--admin-token", LAB_TOKEN]
    procs.append(seed.host.popen(argv, log=os.path.join(work, "tracker.log"), env=env, cwd=NEUTRAL_CWD))
    wait_tcp(seed.host, seed.ip, LAB_TRACKER_PORT)
    wait_tcp(seed.host, seed.ip, LAB_ADMIN_PORT)
    daemons = {}
    for m in members:
        os.makedirs(m.data)
        argv = [*p2pd_cmd(), "run", "--tracker", tracker, "--listen", f"{m.ip}:{LAB_NODE_PORT}", "--data-dir", m.data]
        if zones:
            argv += ["--zone", m.zone]
        daemons[m.name] = m.host.popen(argv, log=os.path.join(work, m.name + ".log"), env=env, cwd=NEUTRAL_CWD)
        procs.append(daemons[m.name])
    for m in members:
        _wait_status(m, daemons[m.name], work)
    return daemons


def publish(m: Member, payload: str, name: str) -> None:
    """`p2pd publish PAYLOAD --name NAME` on `m`'s daemon."""
    cp = m.host.run(
        [*p2pd_cmd(), "publish", payload, "--name", name, "--data-dir", m.data],
        check=False,
        env=child_env(),
        cwd=NEUTRAL_CWD,
        timeout=300,
    )
    if cp.returncode != 0:
        raise BenchError(f"p2pd publish exit {cp.returncode}: {cp.stderr.strip()[-600:]}")


def log_time(line_stamp: str) -> float:
    """A logging asctime ('2026-11-26 19:10:00,123', local time) as epoch seconds."""
    return datetime.datetime.strptime(line_stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
