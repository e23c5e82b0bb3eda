"""Real processes on loopback: a tracker and p2pd daemons, each cleaned up by PID."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from p2pd.rpc import connect_unix, free_port


def sha256_tree(root: Path) -> dict[str, str]:
    """Digest of every file under root (or of root itself when it is a file), with hashlib."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    out = {}
    for p in files:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            while chunk := fh.read(8 << 20):
                h.update(chunk)
        out[p.name if root.is_file() else p.relative_to(root).as_posix()] = h.hexdigest()
    return out


def fast_dir(need_bytes: int) -> Iterator[Path]:
    """A temp dir on tmpfs when it has room (transfers measure p2pd, not this VM's disk), else /tmp."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > need_bytes * 1.2 else None
    d = Path(tempfile.mkdtemp(prefix="p2pd-test-", dir=base))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class Node:
    name: str
    data_dir: Path
    port: int
    proc: subprocess.Popen[bytes]
    args: list[str]
    log: Path

    @property
    def sock(self) -> Path:
        return self.data_dir / "p2pd.sock"

    async def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30) -> Any:
        async with connect_unix(str(self.sock)) as c:
            return await c.call(method, params or {}, timeout=timeout)

    async def artifact(self, aid: str) -> dict[str, Any] | None:
        st = await self.call("status")
        for a in st["artifacts"]:
            if a["artifact_id"] == aid:
                return a  # type: ignore[no-any-return]
        return None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


class Cluster:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tracker_port = 0
        self.tracker_proc: subprocess.Popen[bytes] | None = None
        self.nodes: dict[str, Node] = {}

    def _spawn(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as fh:
            p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=fh, start_new_session=True)
        self.procs.append(p)
        return p

    def start_tracker(self, *extra: str, port: int | None = None) -> int:
        self.tracker_port = port or free_port()
        self.tracker_proc = self._spawn([sys.executable, "-m", "tracker.cli", "serve", "--listen",
                                         f"127.0.0.1:{self.tracker_port}", *extra], self.base / "tracker.log")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.tracker_port), timeout=0.5).close()
                return self.tracker_port
            except OSError:
                if self.tracker_proc.poll() is not None:
                    break
                time.sleep(0.05)
        raise RuntimeError(f"tracker did not start: {(self.base / 'tracker.log').read_text()}")

    async def start_node(self, name: str, *extra: str, port: int | None = None) -> Node:
        d = self.base / name
        d.mkdir(exist_ok=True)
        port = port or free_port()
        args = [sys.executable, "-m", "p2pd.cli", "run", "--tracker", f"127.0.0.1:{self.tracker_port}",
                "--listen", f"127.0.0.1:{port}", "--data-dir", str(d), *extra]
        log = self.base / f"{name}.log"
        node = Node(name, d, port, self._spawn(args, log), args, log)
        self.nodes[name] = node
        await self.wait_ready(node)
        return node

    async def restart(self, node: Node) -> Node:
        node.proc = self._spawn(node.args, node.log)
        await self.wait_ready(node)
        return node

    async def wait_ready(self, node: Node) -> None:
        with trio.fail_after(30):
            while True:
                if node.proc.poll() is not None:
                    raise RuntimeError(f"{node.name} exited with {node.proc.returncode}:\n{node.log_text()}")
                if node.sock.exists():
                    try:
                        await node.call("status", timeout=2)
                        return
                    except Exception:  # not answering yet: keep polling until the deadline
                        pass
                await trio.sleep(0.05)

    async def cli(self, node: Node, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
        with trio.fail_after(timeout):
            return await trio.run_process([sys.executable, "-m", "p2pd.cli", *args, "--data-dir", str(node.data_dir)],
                                          capture_stdout=True, capture_stderr=True, check=False)

    async def publish(self, node: Node, path: Path, name: str) -> str:
        r = await self.cli(node, "publish", str(path), "--name", name)
        assert r.returncode == 0, r.stderr.decode()
        return r.stdout.decode().strip().splitlines()[-1]

    async def fetch(self, node: Node, name: str, *extra: str, timeout: float = 300) -> Path:
        r = await self.cli(node, "fetch", name, *extra, timeout=timeout)
        assert r.returncode == 0, f"fetch on {node.name} failed: {r.stderr.decode()}\n{node.log_text()[-3000:]}"
        return Path(r.stdout.decode().strip().splitlines()[-1])

    def kill(self, node: Node, sig: int = signal.SIGKILL) -> None:
        node.proc.send_signal(sig)
        node.proc.wait(timeout=15)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


async def wait_until(pred: Any, timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    with trio.move_on_after(timeout):
        while True:
            v = await pred()
            if v:
                return v
            await trio.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
