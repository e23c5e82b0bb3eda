"""Heartbeat load benchmark: `python -m netsim.bench tracker --nodes N --duration S --json FILE`.

One tracker process (started here, or opentracker with `--target opentracker`) and `--loaders`
separate load-generator processes over loopback. Each loader registers its share of the N nodes over
the TCP RPC (what a daemon does: in the secured cluster the benchmark runs, a challenge per
connection, then per node an Ed25519 key proof, the join secret's MAC and an X25519 session key),
announces holdings (one heartbeat each), then sends real UDP heartbeats (the same datagrams as
`p2pd.tracker_client`, MACed under each node's session key) in two phases:
1. `max`: closed loop, `--window` requests in flight per loader: the throughput (heartbeats_per_s).
2. `half`: open loop at half that rate: the latency a node sees at half load (p50_ms, p99_ms).
`rss_mb` is the tracker's resident memory with every node registered (and `bytes_per_node` the growth
per node). The JSON has the issue's keys (heartbeats_per_s, p50_ms, p99_ms, rss_mb, nodes) and detail.

Loaders are plain blocking-socket loops (no trio) so the generator is as cheap as it can be in
Python; its limit is printed (`loader_cpu`) so a reader can tell who ran out first.

`--target opentracker` drives Debian's opentracker (C, UDP, BEP 15) with the same loop shape:
a connect, then announces with `num_want=0` (the equivalent of a heartbeat: register presence, get
nothing back but counts) from N distinct peers on whitelisted infohashes. `--compare-opentracker`
runs both targets in one run and prints the ratio.

`--memory-only` builds the registry in this process (no sockets) and reports bytes per node, which is
how the 1M-node memory figure is measured without registering a million nodes over loopback.

The tracker, its Redis and opentracker are processes of a `p2pd.cluster.LocalCluster` (killed by PID
at the end, pass or fail); the loaders are `python -m netsim.bench.tracker_load --loader SPEC`,
driven over their stdin/stdout.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import random
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from p2pd.cluster import LocalCluster, Process, ToolMissing, child_env
from p2pd.protocol import auth
from p2pd.protocol.framing import FrameReader, encode_frame
from p2pd.protocol.heartbeat import UDP_VERSION, UDP_VERSION_AUTH, UdpReply, UdpRequest, seal
from p2pd.rpc import free_port

RING = 1 << 20
ARTIFACTS = 100


def node_id(i: int) -> str:
    return f"{i:032x}"


def artifact(k: int) -> str:
    return f"{k:064x}"


def holdings_of(i: int) -> dict[str, float]:
    """Every node holds one artifact of 100: 3/4 complete, 1/4 partial (a fleet mid-rollout)."""
    return {artifact(i % ARTIFACTS): 1.0 if i % 4 else 0.5}


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def udp_rcvbuf_errors() -> int:
    """Datagrams dropped on full receive buffers, whole machine (/proc/net/snmp)."""
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    return int(rows[1][rows[0].index("RcvbufErrors")])


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(parts[11]) / tick, int(parts[12]) / tick


def cpu_seconds(pid: int) -> float:
    user, system = cpu_times(pid)
    return user + system


# ---- load generator (runs in its own process) --------------------------------------------------------


class Loader:
    """Sends heartbeats for nodes [first, first+count) and measures round trips."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.mode = spec["mode"]
        self.first, self.count = spec["first"], spec["count"]
        self.target = (spec["host"], spec["port"])
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.connect(self.target)
        self.sock.setblocking(False)
        self.sessions: list[int] = []
        self.ring = [0.0] * RING
        self.seq = 0
        self.cursor = 0
        self.conn_id = 0
        self.with_holdings = False
        self.churn = float(spec.get("churn", 0.0))
        self.unknown = 0
        self.rng = random.Random(spec["first"])
        enc = msgspec.msgpack.Encoder()
        self._enc = enc.encode
        self._dec = msgspec.msgpack.Decoder(UdpReply).decode
        self.ids = [node_id(self.first + k) for k in range(self.count)]
        self.cluster: auth.ClusterSecret | None = None
        self.keys: list[auth.NodeKey] = []
        self.session_keys: list[bytes] = []
        if spec.get("join_secret_file"):
            from p2pd.identity import read_join_secret

            secret = read_join_secret(Path(spec["join_secret_file"]))
            assert secret is not None
            self.cluster = auth.ClusterSecret(secret)
            self.keys = [
                auth.NodeKey.from_seed(hashlib.sha256(b"bench node %d" % (self.first + k)).digest())
                for k in range(self.count)
            ]
            self.ids = [k.node_id for k in self.keys]
        self.infohashes = [bytes.fromhex(artifact(k)[:40]) for k in range(ARTIFACTS)]

    # registration over the real TCP RPC (the shared frame codec): frames written in batches of 512 on
    # one connection (the generic RpcClient sends one frame per call: the generator would be the bottleneck)
    def register(self) -> None:
        if self.mode == "opentracker":
            return
        sessions = [0] * self.count
        self.session_keys = [b""] * self.count
        ephs: list[Any] = [None] * self.count
        reader = FrameReader()

        def answers(s: socket.socket, n: int) -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            while len(out) < n:
                data = s.recv(1 << 20)
                if not data:
                    raise RuntimeError("tracker closed the connection during registration")
                for f in reader.feed(data):
                    if "error" in f:
                        raise RuntimeError(f"register failed: {f['error']}")
                    out.append(f)
            return out

        with socket.create_connection(self.target, timeout=60) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nonce = b""
            if self.cluster is not None:
                s.sendall(encode_frame({"id": -1, "method": "challenge", "params": {}}))
                nonce = answers(s, 1)[0]["result"]["nonce"]
            for start in range(0, self.count, 512):
                batch = range(start, min(self.count, start + 512))
                s.sendall(b"".join(encode_frame(self._register_frame(k, nonce, ephs)) for k in batch))
                for f in answers(s, len(batch)):
                    k, r = f["id"], f["result"]
                    sessions[k] = r["session"]
                    if self.cluster is not None:
                        self.session_keys[k] = auth.session_key(ephs[k], r["eph"], nonce, self.ids[k])
        self.sessions = sessions

    def _register_frame(self, k: int, nonce: bytes, ephs: list[Any]) -> dict[str, Any]:
        host, port = "127.0.0.1", 10000 + (self.first + k) % 50000
        params: dict[str, Any] = {
            "node_id": self.ids[k],
            "addr": [host, port],
            "labels": {"zone": f"z{(self.first + k) % 8}"},
            "version": "bench",
        }
        if self.cluster is not None:
            from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

            key = self.keys[k]
            eph = ephs[k] = X25519PrivateKey.generate()
            eph_pub = auth.x25519_public(eph)
            t = auth.register_transcript(nonce, self.ids[k], key.public, eph_pub, host, port)
            params.update(key=key.public, eph=eph_pub, proof=key.sign(t), member=self.cluster.mac(t))
        return {"id": k, "method": "register", "params": params}

    def ot_connect(self) -> None:
        tid = 7
        for _ in range(50):
            self.sock.send(struct.pack("!QII", 0x41727101980, 0, tid))
            r, _, _ = select.select([self.sock], [], [], 0.2)
            if r:
                data = self.sock.recv(2048)
                action, rtid, cid = struct.unpack_from("!IIQ", data)
                if action == 0 and rtid == tid:
                    self.conn_id = cid
                    return
        raise RuntimeError("opentracker did not answer a connect")

    def send_one(self) -> None:
        k = self.cursor
        self.cursor = k + 1 if k + 1 < self.count else 0
        self.seq += 1
        seq = self.seq & 0xFFFFFFFF
        i = self.first + k
        if self.mode == "opentracker":
            left = 0 if i % 4 else 1 << 30
            pkt = struct.pack(
                "!QII20s20sQQQIIIiH",
                self.conn_id,
                1,
                seq,
                self.infohashes[i % ARTIFACTS],
                b"-PB0001-" + i.to_bytes(12, "big"),
                0,
                left,
                0,
                0,
                0,
                i & 0xFFFFFFFF,
                0,
                10000 + i % 50000,
            )
        else:
            h = None
            if self.with_holdings or (self.churn and self.rng.random() < self.churn):
                h = holdings_of(i)
                if not self.with_holdings:  # a progress update
                    h = {a: self.rng.random() for a in h}
            if self.cluster is not None:
                body = self._enc(UdpRequest(UDP_VERSION_AUTH, self.ids[k], self.sessions[k], seq, h))
                pkt = seal(body, self.session_keys[k])
            else:
                pkt = self._enc(UdpRequest(UDP_VERSION, self.ids[k], self.sessions[k], seq, h))
        self.ring[seq & (RING - 1)] = time.perf_counter()
        try:
            self.sock.send(pkt)
        except BlockingIOError:
            pass

    def drain(self, lat: list[float], keep_every: int) -> int:
        got = 0
        recv = self.sock.recv
        ring = self.ring
        ot = self.mode == "opentracker"
        dec = self._dec
        while True:
            try:
                data = recv(2048)
            except BlockingIOError:
                return got
            except ConnectionRefusedError:
                return got
            now = time.perf_counter()
            if ot:
                seq = struct.unpack_from("!I", data, 4)[0]
            else:
                rep = dec(data)
                seq = rep.seq
                if not rep.known:
                    self.unknown += 1
            slot = seq & (RING - 1)
            t = ring[slot]
            if t == 0.0:
                continue  # duplicate, or answered after we counted it lost
            ring[slot] = 0.0
            got += 1
            if got % keep_every == 0:
                lat.append(now - t)

    def _reap(self, tail: int, now: float, max_age: float = 0.25) -> tuple[int, int]:
        """Count requests unanswered for max_age as lost; returns (new tail, lost)."""
        ring = self.ring
        lost = 0
        while tail < self.seq:
            t = ring[(tail + 1) & (RING - 1)]
            if t != 0.0 and now - t < max_age:
                break
            if t != 0.0:
                ring[(tail + 1) & (RING - 1)] = 0.0
                lost += 1
            tail += 1
        return tail, lost

    def closed(self, duration: float, window: int) -> dict[str, Any]:
        lat: list[float] = []
        self.unknown = 0
        sent = done = lost = 0
        inflight = 0
        tail = self.seq
        c0 = time.process_time()
        t0 = time.perf_counter()
        end = t0 + duration
        last_reap = t0
        while True:
            now = time.perf_counter()
            if now >= end:
                break
            while inflight < window:
                self.send_one()
                sent += 1
                inflight += 1
            r, _, _ = select.select([self.sock], [], [], 0.05)
            if r:
                got = self.drain(lat, 1)
                done += got
                inflight -= got
            if now - last_reap > 0.05:
                tail, n = self._reap(tail, now)
                lost += n
                inflight -= n
                last_reap = now
        elapsed = time.perf_counter() - t0
        done += self._settle(lat)
        return {
            "sent": sent,
            "done": done,
            "elapsed": elapsed,
            "lat": lat,
            "cpu": time.process_time() - c0,
            "unknown": self.unknown,
        }

    def open(self, duration: float, rate: float) -> dict[str, Any]:
        lat: list[float] = []
        self.unknown = 0
        sent = done = 0
        step = 1.0 / rate
        c0 = time.process_time()
        t0 = time.perf_counter()
        nxt = t0
        end = t0 + duration
        while True:
            now = time.perf_counter()
            if now >= end:
                break
            burst = 0
            while nxt <= now and burst < 1000:
                self.send_one()
                sent += 1
                nxt += step
                burst += 1
            if nxt < now - 0.1:  # falling behind by more than 100 ms: do not "catch up" with a burst
                nxt = now
            r, _, _ = select.select([self.sock], [], [], max(0.0, min(nxt - time.perf_counter(), 0.01)))
            if r:
                done += self.drain(lat, 1)
        elapsed = time.perf_counter() - t0
        done += self._settle(lat)
        return {
            "sent": sent,
            "done": done,
            "elapsed": elapsed,
            "lat": lat,
            "cpu": time.process_time() - c0,
            "unknown": self.unknown,
        }

    def _settle(self, lat: list[float]) -> int:
        got = 0
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:
            r, _, _ = select.select([self.sock], [], [], 0.05)
            if r:
                got += self.drain(lat, 1)
        return got

    def warm(self) -> None:
        """One heartbeat per node with holdings (p2p: the holdings announce; ot: event=started)."""
        self.with_holdings = True
        self.cursor = 0
        lat: list[float] = []
        inflight = sent = 0
        tail = self.seq
        deadline = time.perf_counter() + 300
        while (sent < self.count or inflight > 0) and time.perf_counter() < deadline:
            while inflight < 64 and sent < self.count:
                self.send_one()
                sent += 1
                inflight += 1
            r, _, _ = select.select([self.sock], [], [], 0.05)
            if r:
                inflight -= self.drain(lat, 1 << 30)
            tail, lost = self._reap(tail, time.perf_counter(), 1.0)
            inflight -= lost
        self.with_holdings = False
        self.cursor = 0


def loader_main(spec_json: str) -> None:
    """Loader process: commands on stdin, one JSON line per command on stdout."""
    ld = Loader(json.loads(spec_json))
    t = time.perf_counter()
    ld.register()
    if ld.mode == "opentracker":
        ld.ot_connect()
    ld.warm()
    print(json.dumps({"ready": True, "setup_s": time.perf_counter() - t}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if ld.mode == "opentracker":
            ld.ot_connect()
        res = ld.closed(float(cmd[1]), int(cmd[2])) if cmd[0] == "closed" else ld.open(float(cmd[1]), float(cmd[2]))
        lat = res.pop("lat")
        lat.sort()
        step = max(1, len(lat) // 20000)  # a sorted subsample is enough for percentiles
        res["lat"] = lat[::step]
        print(json.dumps(res), flush=True)


# ---- orchestration -----------------------------------------------------------------------------------


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


class Target:
    port: int
    name: str
    process: Process

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        self.process.kill()


class P2PTracker(Target):
    name = "p2pd"

    def __init__(self, cluster: LocalCluster, interval: float, store: str, metrics: bool = True) -> None:
        extra = ["--log-level", "warning"]
        self.token = os.urandom(8).hex()
        try:
            if metrics:
                import fastapi  # noqa: F401  (admin API available: /metrics tells where the time went)

                extra += ["--admin-listen", "127.0.0.1:0", "--admin-token", self.token]
        except ImportError:
            pass
        t = cluster.start_tracker(*extra, interval=interval, store=store)
        self.join_secret_file = cluster.join_secret_file  # a secured tracker, as deployed (docs/security.md)
        self.process = t.process
        self.port = t.port
        self.admin_port = t.admin_port

    def udp_batch_histogram(self) -> dict[str, int]:
        """Cumulative counts of UDP batch processing times, from the tracker's /metrics."""
        if not self.admin_port:
            return {}
        import urllib.request

        req = urllib.request.Request(
            f"http://127.0.0.1:{self.admin_port}/metrics", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("p2p_tracker_udp_batch_seconds_bucket"):
                out[line.split('le="')[1].split('"')[0]] = int(line.rsplit(" ", 1)[1])
            elif line.startswith(("p2p_tracker_udp_datagrams_total", "p2p_tracker_udp_batch_seconds_count")):
                out[line.split()[0]] = int(float(line.split()[1]))
        return out


class OpenTracker(Target):
    """Debian's opentracker in a chroot dir with a whitelist of the benchmark's infohashes."""

    name = "opentracker"

    def __init__(self, cluster: LocalCluster, tmp: Path) -> None:
        exe = shutil.which("opentracker")
        if exe is None:
            raise ToolMissing("opentracker not found: install the Debian package opentracker")
        root = tmp / "ot"
        root.mkdir()
        (root / "whitelist.txt").write_text("".join(artifact(k)[:40] + "\n" for k in range(ARTIFACTS)))
        os.chmod(root, 0o755)
        self.port = free_port()
        conf = root / "opentracker.conf"
        conf.write_text(
            f"listen.udp 127.0.0.1:{self.port}\nlisten.tcp 127.0.0.1:{free_port()}\n"
            f"access.whitelist /whitelist.txt\ntracker.rootdir {root}\ntracker.user nobody\n"
        )
        self.process = cluster.spawn([exe, "-f", str(conf)], "opentracker")
        time.sleep(0.5)
        if not self.process.alive():
            raise RuntimeError(f"opentracker exited: {self.process.log_text()}")


def run_target(target: Target, mode: str, a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    base_rss = rss_mb(target.pid)
    per = a.nodes // a.loaders
    loaders = []
    t_setup = time.perf_counter()
    try:
        for j in range(a.loaders):
            first = j * per
            count = per if j < a.loaders - 1 else a.nodes - first
            spec = {
                "mode": mode,
                "host": "127.0.0.1",
                "port": target.port,
                "first": first,
                "count": count,
                "churn": a.churn,
                "join_secret_file": str(target.join_secret_file or "") if isinstance(target, P2PTracker) else "",
            }
            loaders.append(
                subprocess.Popen(
                    [sys.executable, "-m", "netsim.bench.tracker_load", "--loader", json.dumps(spec)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    env=child_env(),
                    start_new_session=True,
                )
            )
        for p in loaders:
            line = p.stdout.readline() if p.stdout else ""
            if not line:
                raise RuntimeError("a load generator died during setup")
        setup_s = time.perf_counter() - t_setup
        time.sleep(0.5)
        gc_rss = rss_mb(target.pid)

        def phase(cmd: str) -> dict[str, Any]:
            e0 = udp_rcvbuf_errors()
            h0 = target.udp_batch_histogram() if isinstance(target, P2PTracker) else {}
            u0, s0 = cpu_times(target.pid)
            r0 = cpu_seconds(a.redis_pid) if a.redis_pid else 0.0
            for p in loaders:
                assert p.stdin is not None
                p.stdin.write(cmd + "\n")
                p.stdin.flush()
            res = [json.loads(p.stdout.readline()) for p in loaders if p.stdout]
            u1, s1 = cpu_times(target.pid)
            tracker_cpu = (u1 - u0) + (s1 - s0)
            redis_cpu = cpu_seconds(a.redis_pid) - r0 if a.redis_pid else None
            elapsed = max(r["elapsed"] for r in res)
            lat = [x for r in res for x in r["lat"]]
            done = sum(r["done"] for r in res)
            sent = sum(r["sent"] for r in res)
            return {
                "heartbeats_per_s": round(done / elapsed),
                "sent": sent,
                "answered": done,
                "lost": max(0, sent - done),
                "unknown": sum(r["unknown"] for r in res),
                "p50_ms": round(pct(lat, 50) * 1000, 3),
                "p99_ms": round(pct(lat, 99) * 1000, 3),
                "tracker_cpu": round(tracker_cpu / elapsed, 2),
                "heartbeats_per_tracker_cpu_s": round(done / max(tracker_cpu, 1e-9)),
                # the tracker's CPU per answered heartbeat, in the kernel (the two syscalls, loopback
                # delivery) and in user space (for p2pd: the interpreter's work around them)
                "tracker_us_per_heartbeat": {
                    "user": round((u1 - u0) / max(done, 1) * 1e6, 2),
                    "system": round((s1 - s0) / max(done, 1) * 1e6, 2),
                },
                "loader_cpu": [round(r["cpu"] / r["elapsed"], 2) for r in res],
                "udp_rcvbuf_errors_system_wide": udp_rcvbuf_errors() - e0,
                **(
                    {"tracker_udp_batches": {k: v - h0.get(k, 0) for k, v in target.udp_batch_histogram().items()}}
                    if h0 and isinstance(target, P2PTracker)
                    else {}
                ),
                **({"redis_cpu": round(redis_cpu / elapsed, 2)} if redis_cpu is not None else {}),
            }

        ops_before = redis_ops(a.redis_url) if a.redis_url else None
        mx = phase(f"closed {a.duration} {a.window}")
        half_rate = mx["heartbeats_per_s"] / 2
        half = phase(f"open {a.duration} {half_rate / a.loaders}")
        half["target_rate"] = round(half_rate)
        extra: dict[str, Any] = {}
        if ops_before is not None:  # steady state only: registration and the holdings announce excluded
            after = redis_ops(a.redis_url)
            beats = mx["answered"] + half["answered"]
            delta = {k: after.get(k, 0) - ops_before.get(k, 0) for k in after}
            delta.pop("info", None)
            scripts = delta.get("evalsha", 0)
            extra["redis"] = {
                "ops_per_heartbeat": round((sum(delta.values()) - scripts) / max(1, beats), 2),
                "round_trips_per_heartbeat": round(scripts / max(1, beats), 4),
                "heartbeats_per_round_trip": round(beats / max(1, scripts), 1),
                "commands": {k: v for k, v in sorted(delta.items()) if v},
            }
        return {
            **extra,
            "target": target.name,
            "nodes": a.nodes,
            "heartbeats_per_s": mx["heartbeats_per_s"],
            "heartbeats_per_tracker_cpu_s": mx["heartbeats_per_tracker_cpu_s"],
            "p50_ms": half["p50_ms"],
            "p99_ms": half["p99_ms"],
            "rss_mb": round(gc_rss, 1),
            "bytes_per_node": round((gc_rss - base_rss) * (1 << 20) / a.nodes),
            "setup_s": round(setup_s, 1),
            "max": mx,
            "half": half,
        }
    finally:
        for p in loaders:
            if p.poll() is None:
                try:
                    if p.stdin:
                        p.stdin.close()
                    p.wait(5)
                except (subprocess.TimeoutExpired, BrokenPipeError):
                    p.kill()
                    p.wait(5)


def redis_ops(url: str) -> dict[str, int]:
    """Total calls per command from INFO commandstats (scripts' inner commands included)."""
    from tracker.resp import parse_url

    host, port, _, _ = parse_url(url)
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"INFO commandstats\r\n")
        buf = b""
        while not buf.endswith(b"\r\n") or buf.count(b"\r\n") < 2:
            buf += s.recv(65536)
        n = int(buf[1 : buf.index(b"\r\n")])
        while len(buf) < buf.index(b"\r\n") + 2 + n:
            buf += s.recv(65536)
    out = {}
    for line in buf.decode().splitlines():
        if line.startswith("cmdstat_"):
            name, rest = line[8:].split(":", 1)
            out[name] = int(rest.split(",")[0].split("=")[1])
    return out


def memory_only(n: int) -> dict[str, Any]:
    """Registry with n nodes in this process: bytes of RSS growth per registered node."""
    from tracker.registry import Registry

    gc.collect()
    base = rss_mb(os.getpid())
    reg = Registry(interval=10.0)
    t0 = time.perf_counter()
    for i in range(n):
        nid = node_id(i)
        reg.register(nid, f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 7000, {"zone": f"z{i % 8}"}, "0.1.0", 0.0)
        reg.heartbeat(nid, holdings_of(i), 0.0)
    build_s = time.perf_counter() - t0
    gc.collect()
    rss = rss_mb(os.getpid())
    t0 = time.perf_counter()
    k = min(n, 200_000)
    for i in range(k):
        reg.heartbeat(node_id(i), None, 1.0)
    hb_us = (time.perf_counter() - t0) / k * 1e6
    return {
        "nodes": n,
        "rss_mb": round(rss, 1),
        "registry_mb": round(rss - base, 1),
        "bytes_per_node": round((rss - base) * (1 << 20) / n),
        "build_s": round(build_s, 1),
        "heartbeat_us_in_process": round(hb_us, 2),
    }


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of `python -m netsim.bench tracker` (spellings are stable: BENCHMARKS.md scripts them)."""
    ap.add_argument("--nodes", type=int, default=100_000)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    ap.add_argument("--json", type=Path, help="write the result here")
    ap.add_argument("--loaders", type=int, default=2, help="load-generator processes")
    ap.add_argument("--window", type=int, default=64, help="requests in flight per loader (max phase)")
    ap.add_argument(
        "--interval",
        type=float,
        default=120.0,
        help="tracker interval: long, so no node expires while the others register",
    )
    ap.add_argument("--store", default="memory", help="memory, redis://HOST:PORT/DB, or 'redis' (private server)")
    ap.add_argument("--churn", type=float, default=0.0, help="fraction of heartbeats carrying a progress change")
    ap.add_argument("--target", choices=["p2pd", "opentracker"], default="p2pd")
    ap.add_argument("--compare-opentracker", action="store_true", help="run p2pd, then opentracker, same load")
    ap.add_argument("--memory-only", action="store_true", help="registry bytes per node, in this process")
    ap.add_argument("--no-metrics", action="store_true", help="run the tracker without its admin API")


def run(a: argparse.Namespace, command: str) -> int:
    """Run the benchmark `a` asks for; prints the JSON (and the opentracker ratio on stderr)."""
    if a.memory_only:
        result: dict[str, Any] = memory_only(a.nodes)
    else:
        result = {
            "command": command,
            "cpus": os.cpu_count(),
            "loaders": a.loaders,
            "window": a.window,
            "duration": a.duration,
        }
        with tempfile.TemporaryDirectory(prefix="p2p-bench-") as tmpd, LocalCluster(Path(tmpd)) as cluster:
            tmp = Path(tmpd)
            a.redis_pid = None
            store = a.store
            if store == "redis":
                try:
                    redis = cluster.start_redis()
                except ToolMissing as e:
                    raise SystemExit(f"netsim.bench tracker: {e.message}") from None
                store = redis.url
                a.redis_pid = redis.process.pid
            targets = ["p2pd", "opentracker"] if a.compare_opentracker else [a.target]
            for name in targets:
                try:
                    t: Target = (
                        P2PTracker(cluster, a.interval, store, not a.no_metrics)
                        if name == "p2pd"
                        else OpenTracker(cluster, tmp)
                    )
                except ToolMissing as e:
                    raise SystemExit(f"netsim.bench tracker: {e.message}") from None
                try:
                    a.redis_url = store if name == "p2pd" and store.startswith("redis") else None
                    r = run_target(t, name, a, tmp)
                finally:
                    t.stop()
                result[name] = r
        main_r = result[targets[0]]
        for k in ("nodes", "heartbeats_per_s", "p50_ms", "p99_ms", "rss_mb", "bytes_per_node"):
            result[k] = main_r[k]
        if a.compare_opentracker:
            result["ratio_vs_opentracker"] = round(
                result["p2pd"]["heartbeats_per_s"] / max(1, result["opentracker"]["heartbeats_per_s"]), 3
            )
            # the same ratio per CPU-second of the tracker process: robust to how the machine's other
            # load shares the CPU between the two runs
            result["cpu_efficiency_vs_opentracker"] = round(
                result["p2pd"]["heartbeats_per_tracker_cpu_s"]
                / max(1, result["opentracker"]["heartbeats_per_tracker_cpu_s"]),
                3,
            )
    text = json.dumps(result, indent=2)
    if a.json:
        a.json.write_text(text + "\n")
    print(text)
    if "ratio_vs_opentracker" in result:
        print(
            f"p2pd {result['p2pd']['heartbeats_per_s']}/s vs opentracker "
            f"{result['opentracker']['heartbeats_per_s']}/s: ratio {result['ratio_vs_opentracker']} "
            f"(per tracker CPU-second: {result['cpu_efficiency_vs_opentracker']})",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":  # a load-generator process, started by run_target
    _ap = argparse.ArgumentParser(
        prog="python -m netsim.bench.tracker_load", description="one load generator of `python -m netsim.bench tracker`"
    )
    _ap.add_argument("--loader", required=True, help="JSON spec (run_target writes it)")
    loader_main(_ap.parse_args().loader)
