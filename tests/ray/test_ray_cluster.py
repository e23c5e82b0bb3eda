"""End to end on a real local multi-node Ray cluster, each Ray node with its own real p2pd daemon.

One tracker and three daemons (`p2p-tracker serve`, `p2pd run`) run as subprocesses on 127.0.0.1; a
three-node `ray.cluster_utils.Cluster` is started with the plugin registered (RAY_RUNTIME_ENV_PLUGINS
in the environment of the process that starts the cluster) and each Ray node pointed at its own daemon
through `P2PD_SOCKET` in that node's environment (RayParams.env_vars, which the raylet, its
runtime_env agent and its workers inherit). The first daemon is the publisher (it seeds in place).

Everything is module-scoped (one cluster, ~15 s to start on 2 cores) and torn down by PID at the end,
pass or fail. The last test stops a daemon, so the order of the tests in this file matters.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[test]' (or 'ray[default]==2.60.0')")
pytest.importorskip("numpy", reason="numpy is not installed: pip install -e '.[test]' (or numpy)")
pytest.importorskip("safetensors", reason="safetensors is not installed: pip install -e '.[test]' (or safetensors)")

import numpy as np  # noqa: E402
from ray.exceptions import RuntimeEnvSetupError  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402
from ray_testutil import tree_digests  # noqa: E402

from p2pd.cluster import LocalCluster, Node  # noqa: E402
from ray_plugin import daemon_client, models  # noqa: E402
from ray_plugin.inference import InferencePool, preheat  # noqa: E402
from ray_plugin.local import ray_cluster  # noqa: E402
from ray_plugin.spec import FIELD  # noqa: E402

pytestmark = pytest.mark.ray

NODES = 3
MLP_SIZES = [16, 64, 64, 4]


@dataclass
class Env:
    net: LocalCluster
    cluster: Any
    node_ids: list[str]  # node_ids[i] runs against daemons[i]
    daemons: list[Node]
    root: Path

    def on(self, i: int) -> NodeAffinitySchedulingStrategy:
        return NodeAffinitySchedulingStrategy(self.node_ids[i], soft=False)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    root = Path(tempfile.mkdtemp(prefix="p2pray-", dir="/tmp"))  # short: Unix socket paths are limited
    root.chmod(0o755)  # as root, the daemons unpack envs as an unprivileged user (p2pd/runas.py)
    user = f"p2prt{os.getpid() % 100000}" if os.geteuid() == 0 else None
    if user is not None:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user], check=True)
    net = LocalCluster(root, env={"P2PD_UNPACK_USER": user} if user else None)
    try:
        net.start_tracker()
        daemons = net.start_nodes([f"n{i}" for i in range(NODES)])
        # Ray retries a failed setup 3 times, 1 s apart; 0.2 s here keeps the failure tests quick.
        extra = {"RUNTIME_ENV_RETRY_INTERVAL_MS": "200"}
        if _base_python() != sys.executable:  # the packed env's python is the system's: same minor, maybe not patch
            extra["RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL"] = "minor"
        with ray_cluster([d.socket for d in daemons], extra_env=extra) as (
            cluster,
            node_ids,
        ):
            yield Env(net, cluster, node_ids, daemons, root)
    finally:
        net.close()
        shutil.rmtree(root, ignore_errors=True)
        if user is not None:
            subprocess.run(["userdel", user], check=True, timeout=60)


def _digests_task(model_env: str = "P2P_MODEL_DIR") -> Any:
    @ray.remote(num_cpus=0, max_retries=0)
    def read_model() -> dict[str, Any]:
        import hashlib
        import os
        from pathlib import Path

        base = Path(os.environ[model_env])
        files = sorted(p for p in base.rglob("*") if p.is_file())
        return {
            "socket": os.environ.get("P2PD_SOCKET"),
            "dir": str(base),
            "dirs": os.environ.get("P2P_MODEL_DIRS"),
            "digests": {str(p.relative_to(base)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files},
        }

    return read_model


def _make_files(root: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    (root / "weights.bin").write_bytes(rng.bytes(3 * 1024 * 1024 + 123))  # several pieces, a ragged tail
    (root / "sub").mkdir()
    (root / "sub" / "tokenizer.json").write_text('{"vocab": ["a", "b"]}')
    (root / "config.json").write_text(json.dumps({"seed": seed}))
    return root


def test_task_reads_the_published_files_on_every_node(env: Env) -> None:
    src = _make_files(env.root / "src-files", seed=1)
    env.net.publish(env.daemons[0], src, "files:v1")
    want = tree_digests(src)
    t0 = time.monotonic()
    task = _digests_task()
    renv = {"p2p": {"model": "files:v1"}}
    got = ray.get(
        [task.options(runtime_env=renv, scheduling_strategy=env.on(i)).remote() for i in range(NODES)], timeout=120
    )
    print(f"3 nodes: submit -> files read everywhere in {time.monotonic() - t0:.2f} s")
    for i, g in enumerate(got):
        assert g["digests"] == want, f"node {i}"
        assert g["socket"] == str(env.daemons[i].socket)  # each Ray node used its own daemon
        assert g["dirs"] == g["dir"]
        if i > 0:  # fetched into that node's daemon cache, not read from the publisher's copy
            assert g["dir"].startswith(str(env.daemons[i].data_dir)), g["dir"]


def test_several_models_and_preheat(env: Env) -> None:
    a = _make_files(env.root / "src-a", seed=2)
    b = _make_files(env.root / "src-b", seed=3)
    env.net.publish(env.daemons[0], a, "multi-a:v1")
    env.net.publish(env.daemons[0], b, "multi-b:v1")
    results = preheat("multi-b:v1", timeout=120)  # every node fetches ahead of the job
    assert set(results) == set(env.node_ids)
    for i, nid in enumerate(env.node_ids):
        assert results[nid]["socket"] == str(env.daemons[i].socket)
        assert tree_digests(results[nid]["path"]) == tree_digests(b)
    task = _digests_task().options(
        runtime_env={"p2p": {"model": ["multi-a:v1", "multi-b:v1"]}}, scheduling_strategy=env.on(2)
    )
    got = ray.get(task.remote(), timeout=120)
    dirs = got["dirs"].split(os.pathsep)
    assert len(dirs) == 2 and got["dir"] == dirs[0]
    assert tree_digests(dirs[0]) == tree_digests(a) and tree_digests(dirs[1]) == tree_digests(b)
    assert dirs[1] == results[env.node_ids[2]]["path"]  # the preheated copy


def test_inference_workers_serve_the_model_and_route_around_a_killed_one(env: Env) -> None:
    layers = models.make_mlp(MLP_SIZES, seed=7)
    models.save_mlp(layers, env.root / "src-mlp", activation="relu")
    env.net.publish(env.daemons[0], env.root / "src-mlp", "mlp:v1")
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((5, MLP_SIZES[0])).astype(np.float32) for _ in range(30)]

    t0 = time.monotonic()
    pool = InferencePool("mlp:v1", num_workers=NODES, num_cpus=0.5)  # early start: workers fetch themselves
    assert pool.early_start and pool.runtime_env == {}  # no runtime_env: a warm worker process, which fetches
    try:
        first = pool.infer(batches[0], timeout=120)
        print(f"submit -> first inference result: {time.monotonic() - t0:.2f} s")
        np.testing.assert_allclose(first, models.forward_numpy(layers, batches[0]), rtol=1e-4, atol=1e-5)
        assert pool.wait_ready(timeout=120) == NODES
        assert {info["node_id"] for info in pool.info.values()} == set(env.node_ids)  # SPREAD: one per node
        for info in pool.info.values():  # each loaded the copy its own node's daemon holds
            i = env.node_ids.index(info["node_id"])
            assert (
                info["model_dir"] == str(env.root / "src-mlp")
                if i == 0
                else info["model_dir"].startswith(str(env.daemons[i].data_dir))
            )

        outs = pool.map(batches)
        for x, y in zip(batches, outs, strict=True):
            np.testing.assert_allclose(y, models.forward_numpy(layers, x), rtol=1e-4, atol=1e-5)

        victim = 1
        others = [i for i in range(NODES) if i != victim]
        served_before = pool.router.workers[victim].successes
        others_before = sum(pool.router.workers[i].successes for i in others)
        ray.kill(pool.workers[victim])
        t_kill = time.monotonic()
        outs = pool.map(batches)  # every request still answered, correctly
        elapsed = time.monotonic() - t_kill
        for x, y in zip(batches, outs, strict=True):
            np.testing.assert_allclose(y, models.forward_numpy(layers, x), rtol=1e-4, atol=1e-5)
        st = pool.stats()
        assert st[victim]["failures"] >= 1 and st[victim]["weight"] == 0.0
        assert pool.router.workers[victim].successes == served_before
        # The victim's attempts: what was in flight to it when its first failure came back, plus its probes,
        # which the backoff spaces 1, 2, 4, ... s apart (on a loaded machine the map can outlast the first); all
        # of them were retried on the others. In flight is at most the map's window (2 per worker): SWRR gives a
        # faster worker more than its 1/NODES of it, and picks go on while the first failure is on its way
        # (CI saw 4 within 0.1 s, before any probe was due). A router that kept picking a failed worker would
        # give it about a third of the 30 requests or more.
        probes = 1 + int(math.log2(1 + elapsed / pool.router.retry_after))
        assert st[victim]["picks"] - served_before <= 2 * NODES + probes, (st[victim], elapsed)
        assert sum(pool.router.workers[i].successes for i in others) - others_before == len(batches)
        np.testing.assert_allclose(
            pool.infer(batches[3], timeout=60), models.forward_numpy(layers, batches[3]), rtol=1e-4, atol=1e-5
        )
    finally:
        pool.shutdown()


def test_pool_started_on_arrival_through_the_runtime_env(env: Env) -> None:
    """The other start mode: the `p2p` runtime_env gates the actor, P2P_MODEL_DIR comes from the plugin."""
    layers = models.make_mlp(MLP_SIZES, seed=8)
    models.save_mlp(layers, env.root / "src-mlp2", activation="tanh")
    env.net.publish(env.daemons[0], env.root / "src-mlp2", "mlp:v2")
    x = np.random.default_rng(1).standard_normal((3, MLP_SIZES[0])).astype(np.float32)
    with InferencePool("mlp:v2", num_workers=2, num_cpus=0.5, early_start=False) as pool:
        assert pool.runtime_env == {"p2p": {"model": "mlp:v2"}}
        np.testing.assert_allclose(
            pool.infer(x, timeout=120), models.forward_numpy(layers, x, "tanh"), rtol=1e-4, atol=1e-5
        )
        assert pool.wait_ready(timeout=120) == 2
        assert all(info["fetch_s"] == 0.0 for info in pool.info.values())  # the plugin fetched, not the worker


def test_pool_early_start_in_a_users_runtime_env_starts_the_download_through_the_plugin(env: Env) -> None:
    """With a runtime_env of the user's (a fresh worker process anyway), the plugin starts the fetch at placement."""
    layers = models.make_mlp(MLP_SIZES, seed=9)
    models.save_mlp(layers, env.root / "src-mlp3")
    env.net.publish(env.daemons[0], env.root / "src-mlp3", "mlp:v3")
    x = np.random.default_rng(2).standard_normal((2, MLP_SIZES[0])).astype(np.float32)
    extra = {"env_vars": {"P2P_TEST_MARKER": "1"}}
    with InferencePool("mlp:v3", num_workers=1, num_cpus=0.5, extra_runtime_env=extra) as pool:
        assert pool.early_start
        assert pool.runtime_env == {**extra, FIELD: {"model": "mlp:v3", "wait": False}}
        np.testing.assert_allclose(pool.infer(x, timeout=120), models.forward_numpy(layers, x), rtol=1e-4, atol=1e-5)


def _base_python() -> str:
    """As root the env's python check runs as the unpack user: a base interpreter it can run (not under /root)."""
    real = Path(os.path.realpath(sys.executable))
    if os.geteuid() != 0 or all(os.stat(d).st_mode & 0o001 for d in real.parents):
        return sys.executable
    same = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    return same if os.path.exists(same) else sys.executable  # then the env test fails naming the interpreter


def _make_venv(path: Path, system_site: bool) -> Path:
    argv = [_base_python(), "-m", "venv", "--without-pip", str(path)]
    if system_site:
        argv.insert(-1, "--system-site-packages")  # Ray comes from the cluster's own site-packages
    subprocess.run(argv, check=True, timeout=120)
    site = path / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (site / "p2p_env_marker.py").write_text(f"WHERE = {path.name!r}\n")
    if system_site and sys.prefix != sys.base_prefix:
        # These tests run in a virtualenv (README's commands): there the cluster's Ray is in that venv's
        # site-packages, not in the base interpreter's that --system-site-packages adds. A .pth line adds
        # it as a site-wide install would be (an `import` line: venv-pack refuses plain outside paths,
        # which it takes for editable installs).
        paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
        adds = "; ".join(f"site.addsitedir({p!r})" for p in paths)
        (site / "cluster-site-packages.pth").write_text(f"import site; {adds}\n")
    return path


def _publish_env(env: Env, venv: Path, name: str) -> None:
    from p2pd import envpack

    archive, meta = envpack.pack(venv=venv, out_dir=env.root / "packed", fmt="tar", name=venv.name)
    params = {"path": str(archive), "name": name, "kind": "env", "meta": meta}
    asyncio.run(daemon_client.call("publish", params, path=env.daemons[0].socket))


def test_actor_runs_in_the_packed_env(env: Env) -> None:
    pytest.importorskip("venv_pack", reason="venv-pack is not installed: pip install venv-pack")
    _publish_env(env, _make_venv(env.root / "venv-good", system_site=True), "pyenv:v1")

    class InEnv:
        def where(self) -> dict[str, Any]:
            import os
            import sys

            import p2p_env_marker  # only the packed env has it

            return {
                "executable": sys.executable,
                "prefix": sys.prefix,
                "marker": p2p_env_marker.WHERE,
                "env_dir": os.environ.get("P2P_ENV_DIR"),
                "path0": os.environ["PATH"].split(os.pathsep)[0],
            }

    in_env = ray.remote(num_cpus=0)(InEnv)  # not a decorator: mypy would not see the class it returns
    actor = in_env.options(runtime_env={"p2p": {"env": "pyenv:v1"}}, scheduling_strategy=env.on(1)).remote()
    try:
        got = ray.get(actor.where.remote(), timeout=120)
    finally:
        ray.kill(actor)
    env_dir = got["env_dir"]
    assert env_dir and env_dir.startswith(str(env.daemons[1].data_dir))  # unpacked by node 1's daemon
    assert got["executable"] == os.path.join(env_dir, "bin", "python")
    assert got["prefix"] == env_dir and got["marker"] == "venv-good"
    assert got["path0"] == os.path.join(env_dir, "bin")


def test_env_without_ray_is_refused_with_our_message(env: Env) -> None:
    pytest.importorskip("venv_pack", reason="venv-pack is not installed: pip install venv-pack")
    _publish_env(env, _make_venv(env.root / "venv-noray", system_site=False), "noray:v1")

    @ray.remote(num_cpus=0, max_retries=0)
    def never() -> None:
        raise AssertionError("must not start: Ray would hang in an env without ray")

    with pytest.raises(RuntimeEnvSetupError) as ei:
        ray.get(never.options(runtime_env={"p2p": {"env": "noray:v1"}}).remote(), timeout=120)
    assert "does not contain Ray" in str(ei.value) and "install ray==" in str(ei.value)


def test_unknown_name_surfaces_our_message(env: Env) -> None:
    task = _digests_task().options(runtime_env={"p2p": {"model": "nope:404"}})
    with pytest.raises(RuntimeEnvSetupError) as ei:
        ray.get(task.remote(), timeout=120)
    msg = str(ei.value)
    assert "no artifact named nope:404" in msg and "p2pd publish PATH --name nope:404" in msg


def test_invalid_spec_is_rejected_with_the_key_at_fault(env: Env) -> None:
    @ray.remote(num_cpus=0, max_retries=0)
    def f() -> None: ...

    with pytest.raises(RuntimeEnvSetupError, match=r"unknown key\(s\) \['modle'\]; allowed keys: 'model', 'env'"):
        ray.get(f.options(runtime_env={"p2p": {"modle": "x:1"}}).remote(), timeout=60)


def test_daemon_down_surfaces_our_message(env: Env) -> None:
    """Last: it stops node 2's daemon."""
    env.net.stop_node(env.daemons[2])
    task = _digests_task().options(runtime_env={"p2p": {"model": "files:v2"}}, scheduling_strategy=env.on(2))
    with pytest.raises(RuntimeEnvSetupError) as ei:
        ray.get(task.remote(), timeout=120)
    msg = str(ei.value)
    assert str(env.daemons[2].socket) in msg and "p2pd run" in msg
