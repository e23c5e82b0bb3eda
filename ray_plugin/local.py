"""A whole p2pd + Ray cluster on one machine: tracker, one daemon per Ray node, and a local Ray cluster.

For the example, the benchmark and the tests: the real `p2p-tracker serve` and `p2pd run` as
subprocesses on 127.0.0.1 (stopped by PID), and a `ray.cluster_utils.Cluster` whose nodes each see
their own daemon. How each node gets its own daemon is the part worth reading: `P2PD_SOCKET` goes into
`RayParams.env_vars` of that node, which its raylet, runtime_env agent and workers inherit; the plugin
is registered by `RAY_RUNTIME_ENV_PLUGINS` in the environment of this process before the cluster
starts (every node inherits it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The children get SIGTERM when this process dies (a killed test run or benchmark leaves no daemon behind).
# util-linux's setpriv sets it and execs, which is safe with threads (a preexec_fn is not).
_DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "TERM", "--"] if shutil.which("setpriv") else []
PLUGINS = '[{"class": "ray_plugin.plugin.P2PPlugin"}]'


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
            proc = subprocess.Popen(
                [*_DIE_WITH_PARENT, *argv], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
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


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so `finally` blocks (stopping daemons and Ray) run; for CLIs."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


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


@contextlib.contextmanager
def _environ(**changes: str | None) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in changes}
    try:
        _apply_environ(changes)
        yield
    finally:
        _apply_environ(old)


def _apply_environ(values: dict[str, str | None]) -> None:
    """Set each variable; None removes it."""
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _retry_start(start: Callable[[], Any], attempts: int = 3) -> Any:
    """Start a Ray node, again if it times out: Ray gives a raylet a fixed 30 s to register, which an
    overloaded machine can miss. The processes of a failed attempt (our new children) are stopped by PID."""
    import psutil  # a dependency of ray

    me = psutil.Process()
    for attempt in range(1, attempts + 1):
        before = {p.pid for p in me.children(recursive=True)}
        try:
            return start()
        except Exception as e:  # Ray raises a bare Exception for this timeout
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise
            new = [p for p in me.children(recursive=True) if p.pid not in before]
            for p in new:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.terminate()
            psutil.wait_procs(new, timeout=10)
            print(f"ray node start timed out (attempt {attempt}); retrying", file=sys.stderr)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def ray_cluster(
    sockets: list[Path], num_cpus: int = 2, num_gpus: int = 0, extra_env: dict[str, str] | None = None
) -> Iterator[tuple[Any, list[str]]]:
    """A local Ray cluster, node i talking to the daemon at sockets[i]; yields (cluster, node ids), connected.

    Everything stays on loopback: Ray otherwise resolves 127.0.0.1 to the host's outward address
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 for the nodes; the flag is read at import, so the already
    imported driver gets it patched in for the duration).
    """
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    cluster: Any = None
    saved = ray_constants.ENABLE_RAY_CLUSTER
    env = {
        "RAY_RUNTIME_ENV_PLUGINS": PLUGINS,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "P2PD_SOCKET": None,
        "P2PD_DATA_DIR": None,
        **(extra_env or {}),
    }
    common = {
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "node_ip_address": "127.0.0.1",
        "object_store_memory": 80 * 1024 * 1024,
    }
    try:
        with _environ(**env):
            ray_constants.ENABLE_RAY_CLUSTER = False
            cluster = _retry_start(
                lambda: Cluster(
                    initialize_head=True,
                    head_node_args={**common, "include_dashboard": False, "env_vars": {"P2PD_SOCKET": str(sockets[0])}},
                )
            )
            nodes = [cluster.head_node]
            for sock in sockets[1:]:
                nodes.append(_retry_start(lambda s=sock: cluster.add_node(**common, env_vars={"P2PD_SOCKET": str(s)})))
            ray.init(address=cluster.address, log_to_driver=False)
        yield cluster, [n.node_id for n in nodes]
    finally:
        try:
            if ray.is_initialized():
                ray.shutdown()
            if cluster is not None:
                cluster.shutdown()
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = saved
