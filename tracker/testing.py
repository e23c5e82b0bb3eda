"""Helpers for tests of the tracker and of nodes that talk to it (like `trio.testing`).

Real tracker processes on loopback, owned by PID so a test can always kill and reap what it started;
valid manifests without data; node ids.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from p2pd.protocol import manifest as mf
from p2pd.rpc import free_port

REPO = Path(__file__).resolve().parents[1]


def tracker_cmd() -> list[str]:
    exe = shutil.which("p2p-tracker")
    return [exe] if exe else [sys.executable, "-m", "tracker"]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Proc:
    """A child process owned by a test: killed by PID and reaped at teardown."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in kill())
        self.popen = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=subprocess_env(),
                                      cwd=REPO, start_new_session=True)
        self.pid = self.popen.pid

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        try:
            self.popen.wait(10)
        finally:
            self._log.close()


class Procs:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.all: list[Proc] = []

    def start(self, args: list[str], name: str) -> Proc:
        p = Proc(args, self.tmp / f"{name}-{len(self.all)}.log")
        self.all.append(p)
        return p

    def tracker(self, *extra: str, port: int | None = None, interval: float = 1.0, name: str = "tracker",
                timeout: float = 15.0) -> tuple[Proc, dict[str, int]]:
        """Start `p2p-tracker serve` on 127.0.0.1 and wait until it listens; returns (proc, ports)."""
        ready = self.tmp / f"{name}-{len(self.all)}.ready.json"
        port = free_port() if port is None else port
        p = self.start([*tracker_cmd(), "serve", "--listen", f"127.0.0.1:{port}", "--interval", str(interval),
                        "--ready-file", str(ready), *extra], name)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if p.popen.poll() is not None:
                raise RuntimeError(f"tracker exited with {p.popen.returncode}:\n{p.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"tracker not ready within {timeout}s:\n{p.log()}")
            time.sleep(0.02)
        return p, json.loads(ready.read_text())

    def kill_all(self) -> None:
        """Kill and reap every process by PID; all are tried even if one fails."""
        errors = []
        for p in self.all:
            try:
                p.kill()
            except (OSError, subprocess.TimeoutExpired) as e:
                errors.append(f"pid {p.pid}: {e!r}")
        if errors:
            raise RuntimeError("could not stop: " + "; ".join(errors))


def make_manifest(seed: int = 0, size: int = 3 << 20) -> bytes:
    """A valid canonical manifest (digests are arbitrary: the tracker never sees piece data)."""
    piece = mf.choose_piece_size(size)
    n = mf.num_pieces(size, piece)
    digests = bytes((seed + i) % 256 for i in range(n * mf.DIGEST_SIZE))
    m = mf.build([mf.FileEntry(f"model-{seed}.safetensors", size)], piece, digests)
    return mf.encode(m)


def nid(i: int) -> str:
    return f"{i:032x}"


def require(binary: str, package: str) -> str:
    """Path of `binary`, or skip the test naming the Debian package that provides it."""
    import pytest

    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} not found: install the Debian package {package} (apt-get install {package})")
    return path


def start_redis(procs: Procs, port: int | None = None, timeout: float = 10.0) -> tuple[Proc, str]:
    """A private redis-server on 127.0.0.1 (temp dir, no persistence); returns (proc, redis:// URL)."""
    exe = require("redis-server", "redis-server")
    port = free_port() if port is None else port
    d = procs.tmp / f"redis-{port}"
    d.mkdir(exist_ok=True)
    p = procs.start([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d), "--save", "",
                     "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes"], "redis")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(100).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        if p.popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"redis-server did not start:\n{p.log()}")
        time.sleep(0.02)
    return p, f"redis://127.0.0.1:{port}/0"


def node_cmd(trackers: list[tuple[str, int]], node_id: str, holdings: dict[str, float], *,
             port: int = 9000, zone: str = "", udp: bool = True) -> list[str]:
    """Command line of a minimal node process (`python -m tracker.testing`): heartbeats until SIGTERM,
    then says goodbye to the tracker; SIGKILL is a crash."""
    args = [sys.executable, "-m", "tracker.testing", "--node-id", node_id, "--port", str(port),
            "--holdings", json.dumps(holdings), "--zone", zone]
    for h, p in trackers:
        args += ["--tracker", f"{h}:{p}"]
    if not udp:
        args.append("--no-udp")
    return args


async def _node_main(argv: list[str]) -> None:
    import argparse

    import trio

    from p2pd.rpc import parse_hostport
    from p2pd.tracker_client import TrackerClient

    ap = argparse.ArgumentParser(prog="python -m tracker.testing")
    ap.add_argument("--tracker", action="append", required=True)
    ap.add_argument("--node-id", required=True)
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--holdings", default="{}")
    ap.add_argument("--zone", default="")
    ap.add_argument("--no-udp", action="store_true")
    a = ap.parse_args(argv)
    holdings = json.loads(a.holdings)
    labels = {"zone": a.zone} if a.zone else {}
    trackers = [parse_hostport(t) for t in a.tracker]
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with TrackerClient(trackers, a.node_id, ("127.0.0.1", a.port), labels, "test",
                                 udp=not a.no_udp) as tc:
            async with trio.open_nursery() as nursery:
                await nursery.start(tc.run_heartbeats, lambda: holdings)
                print("node running", flush=True)
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()
            await tc.leave()
            print("node left", flush=True)


if __name__ == "__main__":
    import trio

    trio.run(_node_main, sys.argv[1:])
