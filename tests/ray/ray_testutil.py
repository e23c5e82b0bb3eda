"""Helpers of the Ray suite (imported by name: pytest puts this directory on sys.path).

`FakeDaemon` speaks the daemon's local control API (docs/interfaces.md) on a Unix socket with asyncio.
It exists only for protocol-level unit tests of the client and the plugin (ordering, cancellation,
error mapping) that a real daemon cannot be made to exhibit on cue; everything end to end runs
against the real `p2pd` and `p2p-tracker` (test_ray_cluster.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pd.protocol.framing import FrameReader, encode_frame

Emit = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[str, dict[str, Any], Emit], Awaitable[Any]]


class FakeDaemonError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class FakeDaemon:
    """An asyncio server for the control API whose behaviour is one handler coroutine."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.opened = 0
        self.closed = 0
        self.closed_event = asyncio.Event()
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> FakeDaemon:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await t
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.opened += 1
        frames = FrameReader()
        lock = asyncio.Lock()

        async def send(obj: dict[str, Any]) -> None:
            async with lock:
                writer.write(encode_frame(obj))
                await writer.drain()

        async def run(req: dict[str, Any]) -> None:
            async def emit(event: dict[str, Any]) -> None:
                await send({"id": req["id"], "event": event})

            try:
                result = await self.handler(req["method"], req["params"], emit)
            except FakeDaemonError as e:
                await send({"id": req["id"], "error": {"code": e.code, "message": e.message}})
            else:
                await send({"id": req["id"], "result": result})

        try:
            while data := await reader.read(65536):
                for req in frames.feed(data):
                    self.requests.append((req["method"], req["params"]))
                    task = asyncio.get_running_loop().create_task(run(req))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        finally:
            self.closed += 1
            self.closed_event.set()
            writer.close()


def write_fake_python(path: Path, body: str) -> None:
    """A stand-in interpreter (shell script) for env checks that must not depend on a real env."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    os.chmod(path, 0o755)


# -- real tracker and daemons, as subprocesses on 127.0.0.1 ---------------------------------------------


def _cli(script: str, module: str) -> list[str]:
    """The installed console script when there is one, else the module (a checkout without `pip install -e .`)."""
    found = shutil.which(script)
    return [found] if found else [sys.executable, "-m", module]


P2PD = _cli("p2pd", "p2pd.cli")
TRACKER = _cli("p2p-tracker", "tracker")


@dataclass
class Daemon:
    name: str
    data_dir: Path
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def socket(self) -> Path:
        return self.data_dir / "p2pd.sock"


class P2PNet:
    """A tracker and node daemons under one temp dir; `close` stops them by PID and removes the dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []
        self.daemons: dict[str, Daemon] = {}
        self.tracker_addr = ""

    def _spawn(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def start_tracker(self, timeout: float = 30) -> str:
        ready = self.root / "tracker.json"
        log = self.root / "tracker.log"
        proc = self._spawn([*TRACKER, "serve", "--listen", "127.0.0.1:0", "--ready-file", str(ready)], log)
        _wait(lambda: ready.exists() and ready.stat().st_size > 0, proc, log, timeout, "tracker ready file")
        port = json.loads(ready.read_text())["tcp_port"]
        self.tracker_addr = f"127.0.0.1:{port}"
        return self.tracker_addr

    def start_daemon(self, name: str, timeout: float = 30) -> Daemon:
        data_dir = self.root / name
        data_dir.mkdir(parents=True, exist_ok=True)
        log = self.root / f"{name}.log"
        argv = [*P2PD, "run", "--tracker", self.tracker_addr, "--listen", "127.0.0.1:0", "--data-dir", str(data_dir)]
        d = Daemon(name, data_dir, self._spawn(argv, log), log)
        _wait(lambda: d.socket.exists(), d.proc, log, timeout, f"control socket {d.socket}")
        self.daemons[name] = d
        return d

    def stop_daemon(self, d: Daemon) -> None:
        _stop(d.proc)

    def publish(self, path: Path, name: str, via: Daemon) -> str:
        out = subprocess.run(
            [*P2PD, "publish", str(path), "--name", name, "--data-dir", str(via.data_dir)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"p2pd publish {path} --name {name} failed ({out.returncode}): {out.stderr[-2000:]}")
        return out.stdout.strip().splitlines()[-1]

    def close(self) -> None:
        for proc in reversed(self.procs):
            _stop(proc)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.root.glob("*.log"))


def _wait(cond: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode} before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args}: no {what} after {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes], grace: float = 10) -> None:
    """SIGTERM (the daemons' graceful leave), then SIGKILL; by PID, never by name."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)


def tree_digests(root: str | os.PathLike[str]) -> dict[str, str]:
    """{relative path: sha256} of every file under root (or of root itself when it is a file)."""
    base = Path(root)
    files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
    return {
        (p.name if p == base else str(p.relative_to(base))): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
    }
