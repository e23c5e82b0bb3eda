"""venv-pack: a real venv of this interpreter, packed, materialized elsewhere, run; and its limits.

The limit that matters: a venv's bin/python is a link to its base interpreter, so every node needs
that interpreter at the same absolute path (pyvenv.cfg ``home``) and of the same minor version.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from condabuild import Venv, base_python

from p2pd.envpack import EnvPackError, host_platform, materialize, pack


def run(*cmd: str | Path) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}): {r.stderr}"
    return r.stdout


@pytest.mark.parametrize("fmt", ["tar.zst", "tar.gz"])
def test_venv_runs_from_new_prefix(venv_env: Venv, envs_root: Path, fmt: str) -> None:
    archive, meta = venv_env.archives[fmt]
    assert meta["env_format"] == fmt
    env = materialize(archive, envs_root, "v" * 64, meta)
    out = run(env / "bin" / "python", "-c", "import sys, hellopip; print(sys.prefix); print(hellopip.__file__)")
    prefix, module = out.splitlines()
    assert prefix == str(env) and module.startswith(str(env) + "/lib/")
    # the console script runs without activation: its shebang now names the new env's python
    assert run(env / "bin" / "hellopip") == f"hellopip {env}/bin/python {env}\n"
    assert not os.path.exists(venv_env.prefix.with_name("venv1")), "the build venv should be gone"
    assert sorted(os.listdir(envs_root)) == ["v" * 64]


def test_venv_meta(venv_env: Venv) -> None:
    meta = dict(venv_env.archives["tar.zst"][1])
    base = os.path.realpath(base_python())  # the venv's base interpreter (tests/env/conftest.py venv_env)
    assert int(meta.pop("unpacked_size")) > 0  # declared for the unpack bound
    assert meta == {
        "env_format": "tar.zst",
        "env_type": "venv",
        "platform": host_platform(),
        "python_version": run(base, "-c", "import platform; print(platform.python_version())").strip(),
        "venv_python_home": os.path.dirname(base),
    }


def test_venv_without_its_base_interpreter_is_refused_clearly(venv_env: Venv, envs_root: Path, workdir: Path) -> None:
    """Simulate a node lacking the base interpreter: pyvenv.cfg names a home that does not exist."""
    src, meta = venv_env.archives["tar.gz"]
    edited = workdir / "venv-nohome.tar"
    with tarfile.open(src) as tin, tarfile.open(edited, "w") as tout:
        for m in tin:
            f = tin.extractfile(m) if m.isreg() else None
            if m.name.lstrip("./") == "pyvenv.cfg" and f is not None:
                data = f.read().replace(meta["venv_python_home"].encode(), b"/opt/no-such-python/bin")
                m.size = len(data)
                f = io.BytesIO(data)
            tout.addfile(m, f)
    with pytest.raises(EnvPackError, match="base interpreter at /opt/no-such-python/bin"):
        materialize(edited, envs_root, "w" * 64, {**meta, "env_format": "tar"})
    assert os.listdir(envs_root) == []


def test_venv_python_version_mismatch_is_refused(venv_env: Venv, envs_root: Path) -> None:
    archive, meta = venv_env.archives["tar.zst"]
    with pytest.raises(EnvPackError, match="packed with 2.7.18"):
        materialize(archive, envs_root, "x" * 64, {**meta, "python_version": "2.7.18"})
    assert os.listdir(envs_root) == []


def test_pack_venv_errors(workdir: Path) -> None:
    pytest.importorskip("venv_pack", reason="venv-pack is not installed: pip install venv-pack")
    d = workdir / "not-a-venv"
    (d / "conda-meta").mkdir(parents=True, exist_ok=True)
    with pytest.raises(EnvPackError, match="not a venv.*pack it as a conda env"):
        pack(venv=d, out_dir=workdir / "out-venv-err")
    shutil.rmtree(d)
