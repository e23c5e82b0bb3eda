"""A local cluster: a tracker and p2pd daemons as real processes on loopback, owned by PID.

The one harness for everything that runs "a tracker and N daemons" on one machine: `p2pd demo`, the
integration, tracker, env and Ray tests, and the benchmarks in `netsim/`. Real processes, not objects
in this interpreter, so that what runs is exactly what a cluster runs (`p2pd run`, `p2p-tracker
serve`) and a crash test can kill -9 a node.

Rules, the same for every user:
- Every child is ours: started here with this interpreter (`python -m p2pd.cli`, `-m tracker.cli`;
  the directory this p2pd was imported from is put on its PYTHONPATH, so a checkout that is not
  installed runs too), in a session of its own (a Ctrl-C meant for the caller does not reach it
  twice), signalled only through the PID we got from starting it, and always reaped. `close()` —
  also the exit of the `with` block, pass or fail — stops every one still running: SIGCONT (a test
  may have stopped it), SIGTERM (a daemon says goodbye to the tracker), SIGKILL after a grace period.
- `die_with_parent` (default on): the children also get SIGTERM when the thread that started them
  dies (`setpriv --pdeathsig`), so even a caller killed with -9 leaves nothing behind. The kernel
  ties this to the starting *thread*: start processes from one that outlives the cluster (the main
  thread; trio's own thread — not `trio.to_thread`, whose threads exit when idle).
- Ready means answering: a tracker has written its `--ready-file` (it listens on TCP and UDP); a
  daemon answers `status` on its control socket. A wait fails as soon as the process exits, with the
  log file named in the message and its tail attached.
- Every process writes stdout and stderr to `WORK/NAME.log`, appended across restarts; a node's
  data dir is `WORK/NAME` unless given.
- What waits exists twice, blocking and trio (`start_node` / `start_node_async`, ...): the Ray tests,
  the example and the benchmarks are plain Python; the integration tests and the demo's driver run
  in trio, where blocking the loop would stall the transfers being measured. Both flavours share the
  same readiness probes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import trio

from p2pd.identity import JOIN_SECRET_ENV, JOIN_SECRET_FILE_ENV, write_join_secret
from p2pd.paths import SOCKET_NAME
from p2pd.rpc import RpcError, call_blocking, connect_unix, free_port

HOST = "127.0.0.1"
P2PD_CLI: tuple[str, ...] = (sys.executable, "-m", "p2pd.cli")
TRACKER_CLI: tuple[str, ...] = (sys.executable, "-m", "tracker.cli")
DEFAULT_TIMEOUT = 30.0  # starting a daemon imports a lot of Python: seconds on a loaded 2-core machine
POLL_S = 0.05
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


class ClusterError(RuntimeError):
    """A process of the cluster did not start, did not get ready, or a command against it failed.

    `message` is one line naming what failed and its log file; `log_tail` (shown by `str()`) is the
    end of that log, for test output."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.log_tail = log_tail

    def __str__(self) -> str:
        return f"{self.message}\n{self.log_tail}" if self.log_tail else self.message


class ToolMissing(ClusterError):
    """A system program the cluster needs is not installed; the message names the Debian package."""


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every child: this one, the directory p2pd was imported from appended to
    PYTHONPATH (unless it is a site directory: then the child finds it anyway), then `extra`."""
    env = dict(os.environ)
    site_dirs = {*site.getsitepackages(), site.getusersitepackages()}
    if _PACKAGE_ROOT not in site_dirs:
        parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if _PACKAGE_ROOT not in parts:
            env["PYTHONPATH"] = os.pathsep.join([*parts, _PACKAGE_ROOT])
    env.update(extra or {})
    return env


def scratch_parent(need_bytes: int) -> Path:
    """/dev/shm when it has room for `need_bytes` (plus a fifth), else the temp dir: transfers on
    loopback then measure p2pd, not this machine's disk."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > need_bytes * 1.2:
        return shm
    return Path(tempfile.gettempdir())


@contextlib.contextmanager
def scratch_dir(need_bytes: int, prefix: str = "p2pd-") -> Iterator[Path]:
    """A fresh directory under `scratch_parent(need_bytes)`, removed afterwards (pass or fail)."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=scratch_parent(need_bytes)))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Process:
    """One child process of a cluster. Signals go to the PID only while it has not been reaped (so
    never to a recycled PID); every way to end it reaps it."""

    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, popen: subprocess.Popen[bytes], log_offset: int
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.popen = popen
        self._log_offset = log_offset  # the log is shared by restarts: this run's output starts here

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """Send `sig` if the process still runs (SIGSTOP/SIGCONT for stall tests, SIGTERM, ...)."""
        self.popen.send_signal(sig)  # checks poll() first: nothing is sent to a reaped PID

    def wait(self, timeout: float) -> int:
        """Exit status once it exited; subprocess.TimeoutExpired after `timeout` seconds."""
        return self.popen.wait(timeout)

    def kill(self, timeout: float = 10.0) -> int:
        """SIGKILL (a crash: no goodbye, no journal flush) and reap."""
        self.signal(signal.SIGKILL)
        return self.popen.wait(timeout)

    def stop(self, grace: float = 10.0) -> int:
        """SIGTERM (the graceful shutdown), SIGKILL if it is still running after `grace` seconds."""
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            return self.kill()

    def log_text(self) -> str:
        """What this run of the process wrote (stdout and stderr)."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self._log_offset)
                return fh.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_text()[-chars:]


@dataclass
class Tracker:
    """A `p2p-tracker serve` on 127.0.0.1: TCP RPC and UDP heartbeats on `port`."""

    name: str
    port: int
    process: Process
    udp_port: int | None = None
    admin_port: int | None = None
    info: dict[str, Any] = field(default_factory=dict)  # everything its ready file said (stun, relay port, ...)

    @property
    def addr(self) -> str:
        """HOST:PORT, as `p2pd run --tracker` takes it."""
        return f"{HOST}:{self.port}"

    @property
    def address(self) -> tuple[str, int]:
        return HOST, self.port


@dataclass
class Redis:
    """A private redis-server on 127.0.0.1 (no persistence), for trackers that share state."""

    port: int
    process: Process

    @property
    def url(self) -> str:
        """What `p2p-tracker serve --store` takes."""
        return f"redis://{HOST}:{self.port}/0"


@dataclass
class Node:
    """A `p2pd run` daemon. `argv` is its command line: a restart runs it again, same port and data dir."""

    name: str
    data_dir: Path
    port: int
    argv: list[str]
    process: Process

    @property
    def socket(self) -> Path:
        """The control socket (what `P2PD_SOCKET` points a client at)."""
        return self.data_dir / SOCKET_NAME

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def log_text(self) -> str:
        """Everything this node's daemon wrote, over all its restarts."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        timeout: float = 30.0,
        on_event: Callable[[dict[str, Any]], Any] | None = None,
    ) -> Any:
        """One request to the daemon's control API (trio); RpcError for what the daemon refused."""
        async with connect_unix(str(self.socket)) as c:
            return await c.call(method, params or {}, timeout=timeout, on_event=on_event)

    def call_blocking(self, method: str, params: dict[str, Any] | None = None, *, timeout: float = 30.0) -> Any:
        """The same, blocking (for code outside trio); `timeout` bounds the connect and each read."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.socket))
            return call_blocking(s, method, params)

    async def artifact(self, artifact_id: str) -> dict[str, Any] | None:
        """This artifact's entry in the daemon's `status`, or None when it has none."""
        status = await self.call("status")
        for a in status["artifacts"]:
            if a["artifact_id"] == artifact_id:
                return a  # type: ignore[no-any-return]
        return None

    def answers(self) -> bool:
        """The readiness probe: the control socket exists and `status` answers."""
        if not self.socket.exists():
            return False
        try:
            self.call_blocking("status", timeout=2.0)
        except (OSError, RpcError):  # not listening yet, or not serving yet
            return False
        return True


class LocalCluster:
    """Trackers, p2pd daemons and helper processes under one work dir, stopped by PID on `close()`.

    `work`: where data dirs and logs go (created if missing, never removed: the caller owns it);
    None makes a temp dir that `close()` removes unless `keep`. `env`: extra environment for every
    child. Use it as a context manager (sync `with`, also inside trio code).

    The cluster is secured like a real one (docs/security.md): a new join secret in WORK/join-secret
    (mode 0600) reaches the tracker and every node through $P2PD_JOIN_SECRET_FILE, unless `env`
    names a secret of its own; `secure=False` runs everything with `--insecure` instead."""

    def __init__(
        self,
        work: Path | None = None,
        *,
        env: Mapping[str, str] | None = None,
        die_with_parent: bool = True,
        keep: bool = False,
        secure: bool = True,
    ) -> None:
        self._owns_work = work is None
        self.work = Path(tempfile.mkdtemp(prefix="p2pd-cluster-")) if work is None else work
        self.work.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.env = child_env(env)
        self.secure = secure
        self.join_secret_file: Path | None = None
        if not secure:
            for var in (JOIN_SECRET_ENV, JOIN_SECRET_FILE_ENV):
                self.env.pop(var, None)
        elif not (env and (env.get(JOIN_SECRET_ENV) or env.get(JOIN_SECRET_FILE_ENV))):
            self.join_secret_file = self.work / "join-secret"
            self.join_secret_file.unlink(missing_ok=True)
            write_join_secret(self.join_secret_file)
            self.env.pop(JOIN_SECRET_ENV, None)
            self.env[JOIN_SECRET_FILE_ENV] = str(self.join_secret_file)
        setpriv = shutil.which("setpriv") if die_with_parent else None
        self._prefix: list[str] = [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []
        self.processes: list[Process] = []
        self.trackers: list[Tracker] = []
        self.nodes: dict[str, Node] = {}

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ---------------------------------------------------------------------------------- any process
    def spawn(self, argv: Sequence[str], name: str, *, env: Mapping[str, str] | None = None) -> Process:
        """Start any command as a process of this cluster (redis, opentracker, a test's helper); output
        goes to WORK/NAME.log."""
        log_path = self.work / f"{name}.log"
        with open(log_path, "ab") as log:
            offset = log.tell()
            popen = subprocess.Popen(
                [*self._prefix, *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**self.env, **(env or {})},
                start_new_session=True,
            )
        proc = Process(name, argv, log_path, popen, offset)
        self.processes.append(proc)
        return proc

    # ---------------------------------------------------------------------------------- trackers
    def spawn_tracker(
        self,
        *extra: str,
        port: int | None = None,
        interval: float | None = None,
        store: str | None = None,
        name: str = "tracker",
    ) -> tuple[Process, Path]:
        """Start `p2p-tracker serve` on 127.0.0.1:`port` (a free one by default) without waiting;
        returns the process and its ready file. `store`: a redis:// URL (replicas share one)."""
        ready = self.work / f"{name}.ready.json"
        ready.unlink(missing_ok=True)
        argv = [*TRACKER_CLI, "serve", "--listen", f"{HOST}:{port or free_port()}", "--ready-file", str(ready)]
        if interval is not None:
            argv += ["--interval", f"{interval:g}"]
        if store is not None:
            argv += ["--store", store]
        if not self.secure:
            argv.append("--insecure")
        return self.spawn([*argv, *extra], name), ready

    def start_tracker(
        self,
        *extra: str,
        port: int | None = None,
        interval: float | None = None,
        store: str | None = None,
        name: str = "tracker",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Tracker:
        """Start a tracker and wait until it serves (blocking). `extra`: more `serve` options."""
        proc, ready = self.spawn_tracker(*extra, port=port, interval=interval, store=store, name=name)
        _wait_blocking([(proc, ready.exists)], "its ready file", timeout)
        return self._tracker_ready(name, proc, ready)

    async def start_tracker_async(
        self,
        *extra: str,
        port: int | None = None,
        interval: float | None = None,
        store: str | None = None,
        name: str = "tracker",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Tracker:
        """`start_tracker` for trio code: the other tasks keep running while it starts."""
        proc, ready = self.spawn_tracker(*extra, port=port, interval=interval, store=store, name=name)
        await _wait_async([(proc, ready.exists)], "its ready file", timeout)
        return self._tracker_ready(name, proc, ready)

    def _tracker_ready(self, name: str, proc: Process, ready: Path) -> Tracker:
        info = json.loads(ready.read_text())
        t = Tracker(name, int(info["tcp_port"]), proc, info.get("udp_port"), info.get("admin_port"), info)
        self.trackers.append(t)
        return t

    @property
    def tracker(self) -> Tracker:
        """The tracker started last."""
        if not self.trackers:
            raise ClusterError("no tracker started in this cluster: call start_tracker() first")
        return self.trackers[-1]

    def tracker_addrs(self) -> str:
        """Every tracker started, as `p2pd run --tracker` takes them (comma-separated, in order, each
        address once: a tracker restarted on its port is one address)."""
        return ",".join(dict.fromkeys(t.addr for t in self.trackers))

    # ---------------------------------------------------------------------------------- redis
    def start_redis(self, port: int | None = None, timeout: float = 10.0) -> Redis:
        """A private redis-server (no persistence, data in WORK/redis-PORT); waits until it answers PING."""
        exe = shutil.which("redis-server")
        if exe is None:
            raise ToolMissing(
                "redis-server not found: install the Debian package redis-server (apt-get install redis-server)"
            )
        port = port or free_port()
        d = self.work / f"redis-{port}"
        d.mkdir(exist_ok=True)
        proc = self.spawn(
            [
                exe,
                "--port",
                str(port),
                "--bind",
                HOST,
                "--dir",
                str(d),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--protected-mode",
                "yes",
            ],
            f"redis-{port}",
        )

        def pong() -> bool:
            try:
                with socket.create_connection((HOST, port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(100).startswith(b"+PONG")
            except OSError:
                return False

        _wait_blocking([(proc, pong)], "an answer to PING", timeout)
        return Redis(port, proc)

    # ---------------------------------------------------------------------------------- nodes
    def spawn_node(
        self, name: str, *extra: str, port: int | None = None, data_dir: Path | None = None, tracker: str | None = None
    ) -> Node:
        """Start `p2pd run` without waiting. `extra`: more `run` options (`--egress-limit 40MB/s`);
        `tracker`: HOST:PORT[,...] (default: every tracker of this cluster); `data_dir`: default WORK/NAME."""
        tracker = tracker or self.tracker_addrs()
        if not tracker:
            raise ClusterError(f"cannot start {name}: no tracker yet (call start_tracker() first, or pass tracker=)")
        d = self.work / name if data_dir is None else data_dir
        d.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        argv = [*P2PD_CLI, "run", "--tracker", tracker, "--listen", f"{HOST}:{port}", "--data-dir", str(d), *extra]
        if not self.secure:
            argv.append("--insecure")
        node = Node(name, d, port, argv, self.spawn(argv, name))
        self.nodes[name] = node
        return node

    def start_node(
        self,
        name: str,
        *extra: str,
        port: int | None = None,
        data_dir: Path | None = None,
        tracker: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Node:
        """Start a daemon and wait until its control socket answers (blocking)."""
        node = self.spawn_node(name, *extra, port=port, data_dir=data_dir, tracker=tracker)
        self.wait_ready(node, timeout=timeout)
        return node

    async def start_node_async(
        self,
        name: str,
        *extra: str,
        port: int | None = None,
        data_dir: Path | None = None,
        tracker: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Node:
        """`start_node` for trio code."""
        node = self.spawn_node(name, *extra, port=port, data_dir=data_dir, tracker=tracker)
        await self.wait_ready_async(node, timeout=timeout)
        return node

    def start_nodes(self, names: Sequence[str], *extra: str, timeout: float = DEFAULT_TIMEOUT) -> list[Node]:
        """Start several daemons at once, then wait for all (faster than one by one)."""
        nodes = [self.spawn_node(n, *extra) for n in names]
        self.wait_ready(*nodes, timeout=timeout)
        return nodes

    async def start_nodes_async(
        self, names: Sequence[str], *extra: str, timeout: float = DEFAULT_TIMEOUT
    ) -> list[Node]:
        nodes = [self.spawn_node(n, *extra) for n in names]
        await self.wait_ready_async(*nodes, timeout=timeout)
        return nodes

    def wait_ready(self, *nodes: Node, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Block until every node answers on its control socket."""
        _wait_blocking([(n.process, n.answers) for n in nodes], "an answer on its control socket", timeout)

    async def wait_ready_async(self, *nodes: Node, timeout: float = DEFAULT_TIMEOUT) -> None:
        await _wait_async([(n.process, n.answers) for n in nodes], "an answer on its control socket", timeout)

    def stop_node(self, node: Node, grace: float = 10.0) -> int:
        """Graceful stop (SIGTERM: the node says goodbye), SIGKILL after `grace`; returns the exit status."""
        return node.process.stop(grace)

    def kill_node(self, node: Node) -> int:
        """kill -9: a crash (no goodbye; the journal has what was flushed)."""
        return node.process.kill()

    def restart_node(self, node: Node, timeout: float = DEFAULT_TIMEOUT) -> Node:
        """Run the node's command again (same name, port, data dir, log) once it has exited; wait until ready."""
        self._respawn(node)
        self.wait_ready(node, timeout=timeout)
        return node

    async def restart_node_async(self, node: Node, timeout: float = DEFAULT_TIMEOUT) -> Node:
        self._respawn(node)
        await self.wait_ready_async(node, timeout=timeout)
        return node

    def _respawn(self, node: Node) -> None:
        if node.process.alive():
            raise ClusterError(f"{node.name} is still running (pid {node.process.pid}): stop or kill it first")
        node.process = self.spawn(node.argv, node.name)

    # ---------------------------------------------------------------------------------- the CLI on a node
    def cli_argv(self, node: Node, *args: str) -> list[str]:
        """`p2pd ARGS --data-dir NODE_DIR`: a CLI command against this node's daemon."""
        return [*P2PD_CLI, *args, "--data-dir", str(node.data_dir)]

    def cli(self, node: Node, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[bytes]:
        """Run `p2pd ARGS` against the node (blocking); the result whatever the exit status."""
        return subprocess.run(
            self.cli_argv(node, *args), capture_output=True, env=self.env, timeout=timeout, check=False
        )

    async def cli_async(self, node: Node, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[bytes]:
        with trio.fail_after(timeout):
            return await trio.run_process(
                self.cli_argv(node, *args), capture_stdout=True, capture_stderr=True, env=self.env, check=False
            )

    def publish(self, node: Node, path: Path, name: str, timeout: float = 300.0) -> str:
        """`p2pd publish PATH --name NAME` on the node; returns the artifact id."""
        return _last_line(self.cli(node, "publish", str(path), "--name", name, timeout=timeout), node, "publish")

    async def publish_async(self, node: Node, path: Path, name: str, timeout: float = 300.0) -> str:
        r = await self.cli_async(node, "publish", str(path), "--name", name, timeout=timeout)
        return _last_line(r, node, "publish")

    def fetch(self, node: Node, name: str, *extra: str, timeout: float = 300.0) -> Path:
        """`p2pd fetch NAME [EXTRA]` on the node; returns the path it printed (verified by p2pd)."""
        return Path(_last_line(self.cli(node, "fetch", name, *extra, timeout=timeout), node, "fetch"))

    async def fetch_async(self, node: Node, name: str, *extra: str, timeout: float = 300.0) -> Path:
        r = await self.cli_async(node, "fetch", name, *extra, timeout=timeout)
        return Path(_last_line(r, node, "fetch"))

    # ---------------------------------------------------------------------------------- teardown
    def close(self, grace: float = 10.0) -> None:
        """Stop every process still running (all signalled at once, then each waited for; SIGKILL for
        those still running after `grace`), then remove the work dir if the cluster made it. Safe to call
        twice. Raises ClusterError only if a process could not be stopped at all."""
        live = [p for p in reversed(self.processes) if p.alive()]
        for p in live:
            p.signal(signal.SIGCONT)
            p.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        stuck = []
        for p in live:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    p.kill()
                except subprocess.TimeoutExpired:
                    stuck.append(f"{p.name} (pid {p.pid})")
        if self._owns_work and not self.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        if stuck:
            raise ClusterError(f"could not stop {', '.join(stuck)} even with SIGKILL")

    def log_tails(self, lines: int = 15) -> dict[str, list[str]]:
        """The last lines of every log in the work dir, by name (for the report of a failed run)."""
        return {p.stem: p.read_text(errors="replace").splitlines()[-lines:] for p in sorted(self.work.glob("*.log"))}


def _last_line(r: subprocess.CompletedProcess[bytes], node: Node, what: str) -> str:
    """The last stdout line of a CLI command that succeeded (the artifact id, the path)."""
    lines = r.stdout.decode(errors="replace").strip().splitlines()
    if r.returncode != 0 or not lines:
        err = r.stderr.decode(errors="replace").strip()
        raise ClusterError(
            f"p2pd {what} on {node.name} failed (exit {r.returncode}): {err[-2000:]}; daemon log: {node.log_path}",
            node.log_text()[-3000:],
        )
    return lines[-1].strip()


Probe = tuple[Process, Callable[[], bool]]


def _not_running(proc: Process, what: str) -> ClusterError | None:
    code = proc.returncode
    if code is None:
        return None
    return ClusterError(f"{proc.name} exited with code {code} before {what}; log: {proc.log_path}", proc.log_tail())


def _timed_out(pending: list[Probe], what: str, timeout: float) -> ClusterError:
    proc = pending[0][0]
    names = ", ".join(p.name for p, _ in pending)
    return ClusterError(f"no {what} from {names} within {timeout:g} s; log: {proc.log_path}", proc.log_tail())


def _wait_blocking(probes: list[Probe], what: str, timeout: float) -> None:
    """Poll each (process, ready) until ready; fail as soon as a process exits, or at the deadline."""
    deadline = time.monotonic() + timeout
    pending = list(probes)
    while True:
        pending = [(p, ready) for p, ready in pending if not ready()]
        if not pending:
            return
        for p, _ in pending:
            if err := _not_running(p, what):
                raise err
        if time.monotonic() > deadline:
            raise _timed_out(pending, what, timeout)
        time.sleep(POLL_S)


async def _wait_async(probes: list[Probe], what: str, timeout: float) -> None:
    """`_wait_blocking` for trio: each probe runs in a worker thread (a probe may block up to 2 s)."""
    deadline = trio.current_time() + timeout
    pending = list(probes)
    while True:
        still = []
        for p, ready in pending:
            if not await trio.to_thread.run_sync(ready):
                still.append((p, ready))
        pending = still
        if not pending:
            return
        for p, _ in pending:
            if err := _not_running(p, what):
                raise err
        if trio.current_time() > deadline:
            raise _timed_out(pending, what, timeout)
        await trio.sleep(POLL_S)
