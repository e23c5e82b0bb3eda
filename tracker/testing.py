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

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (the tracker binds both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


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
        for p in self.all:
            p.kill()


def make_manifest(seed: int = 0, size: int = 3 << 20) -> bytes:
    """A valid canonical manifest (digests are arbitrary: the tracker never sees piece data)."""
    piece = mf.choose_piece_size(size)
    n = mf.num_pieces(size, piece)
    digests = bytes((seed + i) % 256 for i in range(n * mf.DIGEST_SIZE))
    m = mf.build([mf.FileEntry(f"model-{seed}.safetensors", size)], piece, digests)
    return mf.encode(m)


def nid(i: int) -> str:
    return f"{i:032x}"
