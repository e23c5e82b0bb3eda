"""Env artifacts end to end with real processes: ``p2pd pack-env`` on one daemon, ``p2pd fetch`` on others.

Real conda envs (built offline with py-rattler from the session's channel) and a real venv are packed
by the CLI, published by a seed daemon, downloaded through the swarm by two other daemons on loopback,
unpacked there into ``DATA_DIR/envs/<artifact id>`` and run from that dir. The build envs are renamed
away before fetching, so nothing can work by reaching back into them. A hostile archive published as an
env is refused on arrival with a clear error, and leaves nothing under ``DATA_DIR/envs``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from condabuild import PY_VER, CondaEnvs, base_python, build_wheel, pip_install
from test_envpack_conda import assert_relocated

from p2pd.cluster import LocalCluster, Node, scratch_dir
from p2pd.envpack import READY_MARKER, host_platform

HERE = Path(__file__).resolve().parent


def run(*cmd: str | Path) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}): {r.stdout}\n{r.stderr}"
    return r.stdout


def condabuild(*args: str | Path) -> None:
    """condabuild.py in a subprocess (py-rattler may crash at interpreter exit; see its module doc)."""
    r = subprocess.run(
        [sys.executable, str(HERE / "condabuild.py"), *map(str, args)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, f"condabuild {args[0]} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"


@dataclass
class BuildEnvs:
    """Live build envs of this module (the session's own are renamed away by the ``packed`` fixture)."""

    hello: Path  # conda: text + binary placeholders
    py: Path  # conda: python + hellopy (conda) + hellopip (pip-installed)
    venv: Path  # venv of this interpreter + hellopip


@pytest.fixture(scope="module")
def build_envs(conda_envs: CondaEnvs, workdir: Path) -> BuildEnvs:
    pytest.importorskip("venv_pack", reason="venv-pack is not installed: pip install venv-pack")
    root = workdir / "e2e-build"
    envs = BuildEnvs(root / "hello", root / "py", root / "venv")
    condabuild("env", conda_envs.channel, envs.hello, conda_envs.cache, "hello")
    condabuild("env", conda_envs.channel, envs.py, conda_envs.cache, f"python {PY_VER}.*", "hellopy")
    pip_install(envs.py / "bin" / "python", conda_envs.wheel)
    subprocess.run([base_python(), "-m", "venv", "--without-pip", str(envs.venv)], check=True, timeout=120)
    pip_install(envs.venv / "bin" / "python", build_wheel(workdir / "e2e-whl"))
    return envs


@pytest.fixture
def base() -> Iterator[Path]:
    """Data dirs of the daemons (tmpfs when it has room); removed after the test, pass or fail."""
    with scratch_dir(1 << 30, prefix="p2pd-test-") as d:
        d.chmod(0o755)  # as root, the unpack user reaches the envs dirs below it (p2pd/runas.py)
        yield d


@asynccontextmanager
async def cluster_of(base: Path, *names: str) -> AsyncIterator[tuple[LocalCluster, list[Node]]]:
    """A tracker and one daemon per name; every process is stopped by PID afterwards, pass or fail."""
    with LocalCluster(base) as c:
        await c.start_tracker_async()
        yield c, await c.start_nodes_async(names)


async def pack_env(c: LocalCluster, seed: Node, flag: str, env: Path, name: str, *extra: str) -> str:
    r = await c.cli_async(seed, "pack-env", flag, str(env), "--name", name, "--out-dir", str(c.work / "packed"), *extra)
    assert r.returncode == 0, f"pack-env {env} failed ({r.returncode}): {r.stderr.decode()}\n{seed.log_text()[-3000:]}"
    aid = r.stdout.decode().strip().splitlines()[-1]
    assert len(aid) == 64, r.stdout.decode()
    return aid


def move_away(env: Path) -> Path:
    """Rename a packed build env, so a fetched env that still reaches into it fails."""
    moved = env.with_name(env.name + ".moved")
    os.rename(env, moved)
    return moved


async def fetch_all(c: LocalCluster, jobs: list[tuple[Node, str]], timeout: float = 120) -> dict[tuple[str, str], Path]:
    """Fetch every (node, NAME:TAG) at the same time; return the env dirs printed by ``p2pd fetch``."""
    out: dict[tuple[str, str], Path] = {}

    async def one(node: Node, name: str) -> None:
        out[node.name, name] = await c.fetch_async(node, name, timeout=timeout + 60)

    with trio.move_on_after(timeout):
        async with trio.open_nursery() as n:
            for node, name in jobs:
                n.start_soon(one, node, name)
    missing = [f"{node.name} {name}" for node, name in jobs if (node.name, name) not in out]
    if missing:
        logs = "\n".join(f"--- {n.name}.log\n{n.log_text()[-2000:]}" for n in c.nodes.values())
        raise AssertionError(f"not fetched within {timeout:g} s: {missing}\n{logs}")
    return out


def ready_envs(node: Node) -> list[str]:
    return sorted(os.listdir(node.data_dir / "envs"))


async def test_conda_envs_pack_publish_fetch_on_two_daemons_and_run(build_envs: BuildEnvs, base: Path) -> None:
    async with cluster_of(base, "seed", "peerA", "peerB") as (c, (seed, a, b)):
        hello_aid = await pack_env(c, seed, "--conda", build_envs.hello, "e2e-hello:v1", "--format", "tar.gz")
        py_aid = await pack_env(c, seed, "--conda", build_envs.py, "e2e-py:v1")  # default: tar.zst
        assert (c.work / "packed" / "e2e-hello-v1.tar.gz").is_file()
        assert (c.work / "packed" / "e2e-py-v1.tar.zst").is_file()
        old_hello, old_py = build_envs.hello, build_envs.py
        move_away(old_hello)
        move_away(old_py)

        envs = await fetch_all(c, [(a, "e2e-hello:v1"), (a, "e2e-py:v1"), (b, "e2e-hello:v1"), (b, "e2e-py:v1")])

        for node in (a, b):
            hello = envs[node.name, "e2e-hello:v1"]
            py = envs[node.name, "e2e-py:v1"]
            assert hello == node.data_dir / "envs" / hello_aid
            assert py == node.data_dir / "envs" / py_aid
            assert ready_envs(node) == sorted([hello_aid, py_aid]), "temporary dirs or lock files left behind"
            # a compiled binary (binary placeholder) and a shell script (text placeholders) of the env
            assert run(hello / "bin" / "hello-bin") == f"binary prefix: {hello}\n"
            out = run(hello / "bin" / "hello")
            assert f"hello from {hello}\n" in out and "greetings from hellodata" in out
            assert f"binary prefix: {hello}\n" in out
            assert (hello / "etc/hellodata/config.ini").read_text().endswith(f"data = {hello}/share/hellodata\n")
            # the env's own interpreter imports a conda package and a pip-installed one
            code = "import sys, hellopy, hellopip; print(sys.prefix); print(hellopip.__file__)"
            prefix, module = run(py / "bin" / "python", "-c", code).splitlines()
            assert prefix == str(py) and module.startswith(f"{py}/lib/")
            assert run(py / "bin" / "hellopip") == f"hellopip {py}/bin/python {py}\n"  # console script, no activation
            assert_relocated(hello, old_hello)  # every placeholder points at the new prefix
            assert_relocated(py, old_py)

        # a second fetch reuses the ready env: same dir, not re-extracted, quick
        py_a = envs[a.name, "e2e-py:v1"]
        marker = (py_a / READY_MARKER).read_text()
        (py_a / "reuse-probe").write_text("still here")
        t0 = time.monotonic()
        r = await c.cli_async(a, "fetch", "e2e-py:v1", "--json")
        elapsed = time.monotonic() - t0
        assert r.returncode == 0, r.stderr.decode()
        res = json.loads(r.stdout)
        assert res["env_dir"] == str(py_a) and res["kind"] == "env" and res["artifact_id"] == py_aid
        assert res["meta"]["env_type"] == "conda" and res["meta"]["platform"] == host_platform()
        assert res["meta"]["python_version"].startswith(PY_VER + ".")
        assert (py_a / READY_MARKER).read_text() == marker and (py_a / "reuse-probe").exists()
        assert elapsed < 10, f"reusing a ready env took {elapsed:.1f} s"


async def test_venv_pack_publish_fetch_on_two_daemons_and_run(build_envs: BuildEnvs, base: Path) -> None:
    """venv-pack works the same way on nodes that share the base interpreter (here: the same machine)."""
    async with cluster_of(base, "seed", "peerA", "peerB") as (c, (seed, a, b)):
        aid = await pack_env(c, seed, "--venv", build_envs.venv, "e2e-venv:v1")
        move_away(build_envs.venv)
        envs = await fetch_all(c, [(a, "e2e-venv:v1"), (b, "e2e-venv:v1")])
        for node in (a, b):
            env = envs[node.name, "e2e-venv:v1"]
            assert env == node.data_dir / "envs" / aid and ready_envs(node) == [aid]
            code = "import sys, hellopip; print(sys.prefix); print(hellopip.__file__)"
            prefix, module = run(env / "bin" / "python", "-c", code).splitlines()
            assert prefix == str(env) and module.startswith(f"{env}/lib/")
            assert run(env / "bin" / "hellopip") == f"hellopip {env}/bin/python {env}\n"
            assert json.loads((env / READY_MARKER).read_text())["env_type"] == "venv"


def _member(
    name: str, *, data: bytes | None = None, kind: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644
) -> tuple[tarfile.TarInfo, bytes | None]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.linkname = kind, mode, link
    if kind == tarfile.REGTYPE:
        ti.size = len(data or b"")
    if kind == tarfile.CHRTYPE:
        ti.devmajor, ti.devminor = 1, 3
    return ti, data


EVIL = {  # name -> (hostile member, what the error must say)
    "dotdot": (_member("bin/../../escape.txt", data=b"pwned\n"), "'..' in path"),
    "symlink": (
        _member("lib/evil", kind=tarfile.SYMTYPE, link="/etc"),
        "symlink to absolute path '/etc' points outside the env",
    ),
    "device": (_member("dev-null", kind=tarfile.CHRTYPE), "character device not allowed"),
}


def evil_tar(path: Path, hostile: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    """Harmless members first (so the refusal comes after a partial extraction), then the hostile one."""
    members = [
        _member("bin", kind=tarfile.DIRTYPE, mode=0o755),
        _member("bin/tool", data=b"#!/bin/sh\necho ok\n", mode=0o755),
        _member("share/data.txt", data=b"data" * 5000),
        hostile,
    ]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for ti, data in members:
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    return path


async def test_malicious_env_archive_is_refused_and_leaves_nothing(base: Path) -> None:
    async with cluster_of(base, "seed", "peer") as (c, (seed, peer)):
        meta = {"env_type": "conda", "env_format": "tar", "platform": host_platform()}
        aids = {}
        for key, (hostile, _why) in EVIL.items():
            archive = evil_tar(base / f"evil-{key}.tar", hostile)
            res = await seed.call(
                "publish", {"path": str(archive), "name": f"evil-{key}:v1", "kind": "env", "meta": meta}
            )
            aids[key] = res["artifact_id"]
        results: dict[str, subprocess.CompletedProcess[bytes]] = {}

        async def fetch(key: str) -> None:
            results[key] = await c.cli_async(peer, "fetch", f"evil-{key}:v1", timeout=60)

        async with trio.open_nursery() as n:
            for key in EVIL:
                n.start_soon(fetch, key)
        for key, (hostile, why) in EVIL.items():
            r, err = results[key], results[key].stderr.decode()
            assert r.returncode != 0, f"{key}: fetch succeeded:\n{r.stdout.decode()}"
            assert f"p2pd: error: refusing '{hostile[0].name}': {why}" in err, f"{key}: unclear error:\n{err}"
            assert r.stdout.decode().strip() == "", f"{key}: fetch printed a path: {r.stdout.decode()}"
            assert await peer.artifact(aids[key]) is not None  # the daemon is still up and answering
        envs = peer.data_dir / "envs"
        assert not envs.exists() or os.listdir(envs) == [], f"left under DATA_DIR/envs: {os.listdir(envs)}"
        assert not (peer.data_dir / "escape.txt").exists() and not (base / "escape.txt").exists()
        assert peer.process.alive()
