"""A whole p2pd + Ray cluster on one machine: tracker, one daemon per Ray node, and a local Ray cluster.

For the example, the benchmark (`python -m netsim.bench ray`) and the tests: the tracker and the
daemons are a `p2pd.cluster.LocalCluster` (the real `p2p-tracker serve` and `p2pd run` on 127.0.0.1,
stopped by PID); `ray_cluster` adds a `ray.cluster_utils.Cluster` whose nodes each see their own daemon:

    with LocalCluster(root) as p2p:
        p2p.start_tracker()
        daemons = p2p.start_nodes(["n0", "n1", "n2"])
        with ray_cluster([d.socket for d in daemons]) as (cluster, node_ids):
            ...

How each node gets its own daemon is the part worth reading: `P2PD_SOCKET` goes into
`RayParams.env_vars` of that node, which its raylet, runtime_env agent and workers inherit; the plugin
is registered by `RAY_RUNTIME_ENV_PLUGINS` in the environment of this process before the cluster
starts (every node inherits it).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PLUGINS = '[{"class": "ray_plugin.plugin.P2PPlugin"}]'


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so `finally` blocks (stopping daemons and Ray) run; for CLIs."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


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
                nodes.append(
                    _retry_start(functools.partial(cluster.add_node, **common, env_vars={"P2PD_SOCKET": str(sock)}))
                )
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
