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
import shlex
import shutil
import socket
import subprocess
import sys
import time
from typing import Any

from netsim.bench.clients.base import Client
from netsim.bench.harness import (
    NEUTRAL_CWD,
    BenchError,
    Ctx,
    GatedProcess,
    Leecher,
    RunResult,
    child_env,
    release_and_wait,
    stop_all,
    tail,
    wait_tcp,
)
from p2pd.identity import JOIN_SECRET_ENV, new_join_secret, read_join_secret
from p2pd.protocol import auth
from p2pd.rpc import RpcError, call_blocking, parse_hostport

TRACKER_PORT = 7400
NODE_PORT = 7401


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

    def final_output(self) -> str:
        path = self.last_stdout_line()
        if not path:
            raise BenchError(f"{self.node.name}: p2pd fetch printed no path")
        return path


class P2pd(Client):
    """p2pd daemons + p2p-tracker, via the CLI contract."""

    name = "p2pd"

    def __init__(self, egress_limit: str | None = None, run_args: list[str] | None = None) -> None:
        self.egress_limit = egress_limit
        self.run_args = list(run_args or [])  # extra `p2pd run` options, for tuning experiments

    def missing(self) -> str | None:
        return _works(p2pd_cmd()) or _works(tracker_cmd())

    def run(self, ctx: Ctx, run: int) -> RunResult:
        d = ctx.run_dir(self.name, run)
        procs: list[subprocess.Popen] = []
        env = child_env({JOIN_SECRET_ENV: new_join_secret()})  # secured, as deployed (docs/security.md)
        p2pd = p2pd_cmd()
        seed = ctx.net.seed
        tracker = f"{seed.ip}:{TRACKER_PORT}"
        daemons: dict[str, subprocess.Popen] = {}
        try:
            procs.append(
                seed.host.popen(
                    [*tracker_cmd(), "serve", "--listen", tracker],
                    log=os.path.join(d, "tracker.log"),
                    env=env,
                    cwd=NEUTRAL_CWD,
                )
            )
            wait_tcp(seed.host, seed.ip, TRACKER_PORT)  # `p2pd run` exits at once if no tracker answers
            for n in ctx.net.nodes():
                dd = os.path.join(d, f"data-{n.name}")
                os.makedirs(dd)
                argv = [*p2pd, "run", "--tracker", tracker, "--listen", f"{n.ip}:{NODE_PORT}", "--data-dir", dd]
                if self.egress_limit:
                    argv += ["--egress-limit", self.egress_limit]
                argv += self.run_args
                p = n.host.popen(argv, log=os.path.join(d, f"daemon-{n.name}.log"), env=env, cwd=NEUTRAL_CWD)
                procs.append(p)
                daemons[n.name] = p
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
            leechers: list[Leecher] = []
            for n in ctx.net.leechers:
                out = os.path.join(d, f"out-{n.name}")
                os.makedirs(out)
                argv = [*p2pd, "fetch", name, "--dest", out, "--data-dir", os.path.join(d, f"data-{n.name}")]
                lc = _Fetch(n, out, argv, d, f"fetch-{n.name}")
                procs.append(lc.proc)
                leechers.append(lc)
            for gated in leechers:
                assert isinstance(gated, GatedProcess)
                gated.wait_ready()
            ctx.rss_pids = [p.pid for p in daemons.values()]

            def daemons_alive() -> str | None:
                dead = [k for k, p in daemons.items() if p.poll() is not None]
                if dead:
                    return f"p2pd daemon(s) died: {dead}: {tail(os.path.join(d, f'daemon-{dead[0]}.log'))}"
                return None

            return release_and_wait(ctx, self.name, run, leechers, extra_check=daemons_alive)
        finally:
            stop_all(ctx.net.topo, procs, timeout=10)
            ctx.finish_run_dir(d)

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
