"""The p2pd runner: drives the real daemons through their command-line contract (docs/interfaces.md) only.

Per run, in fresh data dirs on tmpfs: `p2p-tracker serve` in the seed's namespace, `p2pd run` on every node, each
waited for with `p2pd status` (exit 0), `p2pd publish` on the seed, then a wait until the tracker lists the seed as
a complete holder (tracker RPC `peers`, so "setup done" means the same as for the BitTorrent seeds: announced);
then every leecher's `p2pd fetch NAME:TAG --dest DIR` is released at once from the start gate, and a leecher is
done when its fetch exits 0 (every byte verified by p2pd); the last stdout line is the path we `cmp`.

Commands: the console scripts `p2pd` / `p2p-tracker` if on PATH, else `python -m p2pd.cli` / `python -m
tracker.cli`; override with NETSIM_P2PD_CMD / NETSIM_TRACKER_CMD (shell-quoted command lines).

Also a helper run inside the seed's namespace: `python -m netsim.bench.clients.p2pd wait-holder --tracker
HOST:PORT --artifact ID [--timeout S]`.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from netsim.bench.clients.base import Client
from netsim.bench.harness import (
    NEUTRAL_CWD,
    BenchError,
    Ctx,
    GatedProcess,
    Node,
    RunResult,
    child_env,
    p2pd_cmd,
    release_and_wait,
    stop_all,
    tail,
    tracker_cmd,
    wait_tcp,
)
from netsim.bench.model import ChurnEvent
from p2pd.identity import JOIN_SECRET_ENV, new_join_secret, read_join_secret
from p2pd.protocol import auth
from p2pd.rpc import RpcError, call_blocking, parse_hostport

TRACKER_PORT = 7400
NODE_PORT = 7401


def _works(argv: list[str]) -> str | None:
    try:
        cp = subprocess.run(
            [*argv, "--help"], capture_output=True, text=True, timeout=60, env=child_env(), cwd=NEUTRAL_CWD, check=False
        )
    except OSError as e:
        return f"{' '.join(argv)}: {e}"
    if cp.returncode != 0:
        return f"`{' '.join(argv)} --help` exit {cp.returncode}: {cp.stderr.strip()[-300:]}"
    return None


class _Fetch(GatedProcess):
    """`p2pd fetch` behind the start gate; the contract says its last stdout line is the verified path."""

    def __init__(self, node: Node, output: str, fetch_args: list[str], logdir: str, tag: str) -> None:
        super().__init__(node, output, [*p2pd_cmd(), "fetch", *fetch_args], logdir, tag)
        self.fetch_args = fetch_args  # to run it again after --churn restarted the daemon
        self.away = False  # --churn stopped it: its exit is expected, not a failure

    def poll(self, t0_mono: float, t0_wall: float) -> None:
        if not self.away:
            super().poll(t0_mono, t0_wall)

    def final_output(self) -> str:
        path = self.last_stdout_line()
        if not path:
            raise BenchError(f"{self.node.name}: p2pd fetch printed no path")
        return path


class P2pd(Client):
    """p2pd daemons + p2p-tracker, via the CLI contract."""

    name = "p2pd"

    def __init__(
        self,
        egress_limit: str | None = None,
        run_args: list[str] | None = None,
        churn: list[ChurnEvent] | None = None,
        insecure: bool = False,
    ) -> None:
        self.insecure = insecure  # an open cluster (no join secret, no authentication): what security costs
        self.egress_limit = egress_limit
        self.run_args = list(run_args or [])  # extra `p2pd run` options, for tuning experiments
        self.churn = list(churn or [])  # --churn: leechers whose daemon stops and restarts mid-run

    def missing(self) -> str | None:
        return _works(p2pd_cmd()) or _works(tracker_cmd())

    def run(self, ctx: Ctx, run: int) -> RunResult:
        d = ctx.run_dir(self.name, run)
        procs: list[subprocess.Popen] = []
        # secured, as deployed (docs/security.md), unless --p2pd-insecure asks for an open cluster
        env = child_env({JOIN_SECRET_ENV: new_join_secret()})
        if self.insecure:
            del env[JOIN_SECRET_ENV]  # (nor one from the caller's environment)
        open_cluster = ["--insecure"] if self.insecure else []
        p2pd = p2pd_cmd()
        seed = ctx.net.seed
        tracker = f"{seed.ip}:{TRACKER_PORT}"
        daemons: dict[str, subprocess.Popen] = {}
        try:
            procs.append(
                seed.host.popen(
                    [*tracker_cmd(), "serve", "--listen", tracker, *open_cluster],
                    log=os.path.join(d, "tracker.log"),
                    env=env,
                    cwd=NEUTRAL_CWD,
                )
            )
            wait_tcp(seed.host, seed.ip, TRACKER_PORT)  # `p2pd run` exits at once if no tracker answers

            def start_daemon(n: Node) -> subprocess.Popen:
                dd = os.path.join(d, f"data-{n.name}")
                os.makedirs(dd, exist_ok=True)  # a churned daemon restarts on the data dir it left
                argv = [*p2pd, "run", "--tracker", tracker, "--listen", f"{n.ip}:{NODE_PORT}", "--data-dir", dd]
                argv += open_cluster
                if self.egress_limit:
                    argv += ["--egress-limit", self.egress_limit]
                if n.zone:
                    argv += ["--zone", n.zone]
                argv += self.run_args
                p = n.host.popen(argv, log=os.path.join(d, f"daemon-{n.name}.log"), env=env, cwd=NEUTRAL_CWD)
                procs.append(p)
                daemons[n.name] = p
                return p

            for n in ctx.net.nodes():
                start_daemon(n)
            for n in ctx.net.nodes():
                self._wait_status(ctx, n, os.path.join(d, f"data-{n.name}"), daemons[n.name], d)
            name = f"bench:r{run}"
            cp = seed.host.run(
                [*p2pd, "publish", ctx.payload, "--name", name, "--data-dir", os.path.join(d, "data-seed")],
                check=False,
                env=env,
                cwd=NEUTRAL_CWD,
                timeout=300,
            )
            if cp.returncode != 0:
                raise BenchError(f"p2pd publish exit {cp.returncode}: {cp.stderr.strip()[-600:]}")
            artifact = (cp.stdout.strip().splitlines() or [""])[-1].strip()
            self._wait_holder(ctx, tracker, artifact, env)
            leechers: list[_Fetch] = []
            for n in ctx.net.leechers:
                out = os.path.join(d, f"out-{n.name}")
                os.makedirs(out)
                args = [name, "--dest", out, "--data-dir", os.path.join(d, f"data-{n.name}")]
                lc = _Fetch(n, out, args, d, f"fetch-{n.name}")
                procs.append(lc.proc)
                leechers.append(lc)
            for gated in leechers:
                assert isinstance(gated, GatedProcess)
                gated.wait_ready()
            ctx.rss_pids = [p.pid for p in daemons.values()]
            churn = _Churn(ctx, self.churn, leechers, daemons, start_daemon, procs, d, env) if self.churn else None

            def daemons_alive() -> str | None:
                if churn is not None:
                    err = churn.step()
                    if err:
                        return err
                away = churn.away if churn is not None else set()
                dead = [k for k, p in daemons.items() if p.poll() is not None and k not in away]
                if dead:
                    return f"p2pd daemon(s) died: {dead}: {tail(os.path.join(d, f'daemon-{dead[0]}.log'))}"
                return None

            res = release_and_wait(ctx, self.name, run, leechers, extra_check=daemons_alive)
            if churn is not None:
                res.churned = churn.log
            if ctx.keep_logs:
                self._save_status(ctx, d, env)
            return res
        finally:
            stop_all(ctx.net.topo, procs, timeout=10)
            ctx.finish_run_dir(d)

    def _save_status(self, ctx: Ctx, d: str, env: dict[str, str]) -> None:
        """--keep: every daemon's `p2pd status --json` after the run, as `status-NODE.json` in the run's folder:
        its connections' bytes each way say who sent what to whom (across the trunk, with --zones)."""
        for n in ctx.net.nodes():
            cp = n.host.run(
                [*p2pd_cmd(), "status", "--json", "--data-dir", os.path.join(d, f"data-{n.name}")],
                check=False,
                env=env,
                cwd=NEUTRAL_CWD,
                timeout=60,
            )
            if cp.returncode == 0:
                with open(os.path.join(d, f"status-{n.name}.json"), "w") as f:
                    f.write(cp.stdout)
            else:
                ctx.say(f"p2pd status on {n.name} after the run: exit {cp.returncode}: {cp.stderr.strip()[-200:]}")

    def _wait_status(self, ctx: Ctx, n: Any, data_dir: str, proc: subprocess.Popen, d: str) -> None:
        """Poll `p2pd status --data-dir` until it exits 0 (the daemon answers)."""
        end = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise BenchError(
                    f"p2pd on {n.name} exited {proc.returncode}: {tail(os.path.join(d, f'daemon-{n.name}.log'))}"
                )
            cp = n.host.run(
                [*p2pd_cmd(), "status", "--data-dir", data_dir],
                check=False,
                env=child_env(),
                cwd=NEUTRAL_CWD,
                timeout=60,
            )
            if cp.returncode == 0:
                return
            if time.monotonic() > end:
                raise BenchError(f"p2pd on {n.name}: status never exited 0: {cp.stderr.strip()[-300:]}")
            time.sleep(0.1)

    def _wait_holder(self, ctx: Ctx, tracker: str, artifact: str, env: dict[str, str]) -> None:
        seed = ctx.net.seed
        cp = seed.host.run(
            [
                sys.executable,
                "-m",
                "netsim.bench.clients.p2pd",
                "wait-holder",
                "--tracker",
                tracker,
                "--artifact",
                artifact,
            ],
            check=False,
            env=env,  # the cluster's join secret: only members may ask the tracker for peers
            cwd=NEUTRAL_CWD,
            timeout=60,
        )
        if cp.returncode != 0:
            raise BenchError(f"tracker never listed the seed as holder of {artifact!r}: {cp.stderr.strip()[-300:]}")


class _Churn:
    """--churn, polled from the run's wait loop (never blocking it, so the others' completion times stay exact):
    at T a leecher's daemon gets SIGTERM (a graceful stop: it says goodbye and keeps its pieces) and its fetch is
    stopped; D s later the daemon restarts on the same data dir, and once it created its control socket and `p2pd
    status` answers, the same `p2pd fetch` runs again, resuming from the pieces on disk. The leecher is done when
    that fetch exits 0."""

    def __init__(
        self,
        ctx: Ctx,
        events: list[ChurnEvent],
        leechers: list[_Fetch],
        daemons: dict[str, subprocess.Popen],
        start_daemon: Callable[[Node], subprocess.Popen],
        procs: list[subprocess.Popen],
        d: str,
        env: dict[str, str],
    ) -> None:
        self.ctx, self.events, self.leechers, self.daemons = (
            ctx,
            sorted(events, key=lambda e: e.at_s),
            leechers,
            daemons,
        )
        self.start_daemon, self.procs, self.d, self.env = start_daemon, procs, d, env
        self.t0: float | None = None
        self.next_event = 0
        self.away: set[str] = set()  # daemon stopped or restarting: its exits are expected
        self.plan: list[tuple[_Fetch, float | None]] = []  # leecher, when it comes back (None: once the rest are done)
        self.probes: dict[str, subprocess.Popen] = {}  # `p2pd status` of a restarting daemon
        self.starting: set[str] = set()  # restarted, control socket not there yet
        self.log: list[dict[str, Any]] = []

    def step(self) -> str | None:
        now = time.monotonic()
        if self.t0 is None:
            self.t0 = now  # first poll: right after the leechers were released
        t = now - self.t0
        while self.next_event < len(self.events) and t >= self.events[self.next_event].at_s:
            ev = self.events[self.next_event]
            self.next_event += 1
            # the last leechers still fetching leave (the last ones: with --rates, the slow classes come last)
            cands = [lc for lc in reversed(self.leechers) if lc.done_at is None and lc.node.name not in self.away]
            for lc in cands[: ev.count]:
                name = lc.node.name
                self.away.add(name)
                lc.away = True
                # signals only, no wait: the loop must keep timing the others (the restart reaps them)
                for p in (self.daemons[name], lc.proc):
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                back = None if ev.down_s is None else ev.at_s + ev.down_s
                self.plan.append((lc, back))
                # the timeline of the event, seconds since the release (None until it happened): the old daemon
                # exited (graceful goodbye done), the new one was started, it answered `p2pd status`, the fetch
                # was run again; `wall` pins left_s to the daemons' log timestamps
                self.log.append(
                    {
                        "peer": name,
                        "left_s": round(t, 3),
                        "left_wall": datetime.now().strftime("%H:%M:%S.%f")[:-3],
                        "exited_s": None,
                        "started_s": None,
                        "socket_s": None,
                        "answered_s": None,
                        "back_s": None,
                    }
                )
                self.ctx.say(f"churn: {name} left at {t:.1f} s")
            if len(cands) < ev.count:
                self.ctx.say(f"churn: only {len(cands)} of {ev.count} peers were still fetching at {ev.at_s} s")
        for e in self.log:
            if e["exited_s"] is None and self.daemons[e["peer"]].poll() is not None:
                e["exited_s"] = round(t, 3)
        rest_done = all(lc.done_at is not None for lc in self.leechers if lc.node.name not in self.away)
        for lc, back in list(self.plan):
            if (back is not None and t >= back) or (back is None and rest_done):
                self.plan.remove((lc, back))
                self.ctx.net.topo.stop(lc.proc, timeout=5)
                self.ctx.net.topo.stop(self.daemons[lc.node.name], timeout=10)  # graceful exit done (or killed)
                self.start_daemon(lc.node)
                self._mark(lc.node.name, "started_s", time.monotonic() - self.t0)
                self.starting.add(lc.node.name)
        for name in list(self.starting):
            # `p2pd status` (a Python process of its own, ~0.3 s of CPU) is started once the daemon created its
            # control socket (docs/interfaces.md: "once it is ready to serve"), not over and over while it
            # starts: the probes competed for the 2 cores with the very start they were waiting for
            if self.daemons[name].poll() is not None or os.path.exists(self._socket(name)):
                self.starting.discard(name)
                self._mark(name, "socket_s", t)
                self.probes[name] = self._status_probe(next(x for x in self.leechers if x.node.name == name))
        for name, probe in list(self.probes.items()):
            rc = probe.poll()
            if rc is None:
                continue
            del self.probes[name]
            lc = next(x for x in self.leechers if x.node.name == name)
            if self.daemons[name].poll() is not None:
                return f"p2pd on {name} exited {self.daemons[name].returncode} after its restart: " + tail(
                    os.path.join(self.d, f"daemon-{name}.log")
                )
            if rc != 0:
                self.probes[name] = self._status_probe(lc)  # not answering yet
                continue
            self._mark(name, "answered_s", t)
            self._refetch(lc)
            self.away.discard(name)
            lc.away = False
            self._mark(name, "back_s", time.monotonic() - self.t0)
            self.ctx.say(f"churn: {name} back at {t:.1f} s")
        return None

    def _mark(self, peer: str, key: str, t: float) -> None:
        """Record phase `key` of `peer`'s current churn event (the one not back yet)."""
        for e in self.log:
            if e["peer"] == peer and e["back_s"] is None:
                e[key] = round(t, 3)

    def _socket(self, name: str) -> str:
        return os.path.join(self.d, f"data-{name}", "p2pd.sock")

    def _status_probe(self, lc: _Fetch) -> subprocess.Popen:
        argv = [*p2pd_cmd(), "status", "--data-dir", os.path.join(self.d, f"data-{lc.node.name}")]
        p = lc.node.host.popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env(), cwd=NEUTRAL_CWD
        )
        self.procs.append(p)
        return p

    def _refetch(self, lc: _Fetch) -> None:
        """The same `p2pd fetch` again, unGated (the clock is running); its output replaces the first one's."""
        name = lc.node.name
        argv = [*p2pd_cmd(), "fetch", *lc.fetch_args]
        lc.stdout_path = os.path.join(self.d, f"refetch-{name}.out")
        lc.stderr_path = os.path.join(self.d, f"refetch-{name}.err")
        with open(lc.stdout_path, "wb") as out, open(lc.stderr_path, "wb") as err:
            lc.proc = lc.node.host.popen(argv, stdout=out, stderr=err, env=self.env, cwd=NEUTRAL_CWD)
        self.procs.append(lc.proc)


# ----------------------------------------------------------------------------- tracker RPC probe (own process)
def join_as_member(s: socket.socket) -> None:
    """Register a throwaway node on this tracker connection when the cluster is secured (its join secret
    in the environment), so the connection may ask for peers (docs/security.md)."""
    secret = read_join_secret(None)
    if secret is None:
        return
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    cluster, key = auth.ClusterSecret(secret), auth.NodeKey.from_seed(os.urandom(32))
    nonce = call_blocking(s, "challenge", {})["nonce"]
    eph = auth.x25519_public(X25519PrivateKey.generate())
    t = auth.register_transcript(nonce, key.node_id, key.public, eph, "127.0.0.1", 9)
    params = {"node_id": key.node_id, "addr": ["127.0.0.1", 9], "labels": {}, "version": "bench-probe"}
    params.update(key=key.public, eph=eph, proof=key.sign(t), member=cluster.mac(t))
    call_blocking(s, "register", params, req_id=2)


def wait_holder(tracker: str, artifact: str, timeout: float) -> bool:
    """True once the tracker lists a complete holder of `artifact`."""
    host, port = parse_hostport(tracker)
    end = time.monotonic() + timeout
    last = ""
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=5) as s:  # the tracker RPC, docs/interfaces.md
                join_as_member(s)
                r = call_blocking(s, "peers", {"artifact_id": artifact, "node_id": "0" * 32, "max": 50})
                if any(p.get("progress", 0) >= 1.0 for p in r.get("peers", [])):
                    return True
                last = f"peers: {r}"
        except (OSError, RpcError) as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.05)
    print(f"timeout; last answer: {last}", file=sys.stderr)
    return False


def main() -> int:
    """`wait-holder --tracker HOST:PORT --artifact ID`."""
    ap = argparse.ArgumentParser(prog="python -m netsim.bench.clients.p2pd")
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wait-holder")
    w.add_argument("--tracker", required=True)
    w.add_argument("--artifact", required=True)
    w.add_argument("--timeout", type=float, default=30)
    a = ap.parse_args()
    return 0 if wait_holder(a.tracker, a.artifact, a.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
