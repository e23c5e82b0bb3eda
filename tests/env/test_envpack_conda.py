"""Real conda envs (built offline with py-rattler): pack -> materialize elsewhere -> run; plus pack errors.

What "works" means here: the env's compiled binary and shell scripts run from the new prefix, its
Python imports a conda-installed and a pip-installed package, console scripts run without activation,
and every prefix placeholder (text and binary) now holds the new prefix.
"""

from __future__ import annotations

import ast
import json
import os
import platform
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from condabuild import CondaEnvs, Packed

from p2pd import envpack
from p2pd.envpack import READY_MARKER, EnvPackError, env_ready, materialize, pack

PLACEHOLDER = "/opt/placeholder_env_" + "placehold_" * 20


def run(*cmd: str | Path) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}): {r.stderr}"
    return r.stdout


def prefix_records(env: Path) -> list[tuple[str, str, str]]:
    """The (path, placeholder, mode) list conda-unpack carries, read without running it."""
    tree = ast.parse((env / "bin" / "conda-unpack").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_prefix_records" for t in node.targets):
            records: list[tuple[str, str, str]] = ast.literal_eval(node.value)
            return records
    raise AssertionError("no _prefix_records in conda-unpack")


def files_containing(env: Path, needle: str) -> list[str]:
    found = []
    for p in env.rglob("*"):
        if p.is_file() and not p.is_symlink() and needle.encode() in p.read_bytes():
            found.append(str(p.relative_to(env)))
    return sorted(found)


def assert_relocated(env: Path, old_prefix: Path) -> None:
    """Every placeholder holds the new prefix; nothing but bookkeeping still names the old ones."""
    records = prefix_records(env)
    assert records, "conda-pack recorded no prefix placeholders"
    for path, placeholder, mode in records:
        data = (env / path).read_bytes()
        assert placeholder.encode() not in data, f"{path}: placeholder left ({mode})"
        if mode == "binary":
            assert str(env).encode() + b"\0" in data, f"{path}: binary prefix not replaced"
    # conda-unpack's own record list and conda-meta keep the placeholders as data; .pyc files keep
    # the path they were compiled at (only shown in tracebacks).
    allowed = {"bin/conda-unpack"}
    for needle in (str(old_prefix), PLACEHOLDER):
        left = [
            f
            for f in files_containing(env, needle)
            if f not in allowed and not f.startswith("conda-meta/") and not f.endswith(".pyc")
        ]
        assert left == [], f"files still naming {needle[:40]}...: {left}"


@pytest.mark.parametrize("key", ["hello.tar.gz", "hello.tar"])
def test_hello_env_runs_from_new_prefix(packed: Packed, envs_root: Path, key: str) -> None:
    archive, meta = packed.archives[key]
    env = materialize(archive, envs_root, "a" * 64, meta)
    assert env == envs_root / ("a" * 64)
    assert env_ready(envs_root, "a" * 64) == env
    out = run(env / "bin" / "hello")  # shell script with text placeholders; calls the C binary
    assert f"hello from {env}\n" in out
    assert "greetings from hellodata" in out
    assert f"binary prefix: {env}\n" in out
    assert run(env / "bin" / "hello-bin") == f"binary prefix: {env}\n"
    assert (env / "etc/hellodata/config.ini").read_text().endswith(f"data = {env}/share/hellodata\n")
    assert (env / "bin/hello-shebang").read_text().startswith(f"#!{env}/bin/hello\n")
    assert f"hello from {env}" in run(env / "bin" / "hello-shebang")  # runs via its shebang, no activation
    assert_relocated(env, packed.old_prefix["hello"])
    assert sorted(os.listdir(envs_root)) == ["a" * 64], "temporary dirs or lock files left behind"


def test_python_env_imports_conda_and_pip_packages(packed: Packed, envs_root: Path) -> None:
    archive, meta = packed.archives["py.tar.zst"]
    env = materialize(archive, envs_root, "b" * 64, meta)
    code = "import sys, hellopy, hellopip; print(sys.prefix); print(hellopip.__file__)"
    out = run(env / "bin" / "python", "-c", code)
    prefix, module = out.splitlines()
    assert prefix == str(env)
    assert module.startswith(str(env) + "/lib/")
    # console scripts: a conda entry point and a pip one, run directly (shebangs point at the new env)
    assert f"prefix {env}" in run(env / "bin" / "hellopy")
    assert run(env / "bin" / "hellopip") == f"hellopip {env}/bin/python {env}\n"
    assert (env / "bin" / "hellopip").read_text().startswith(f"#!{env}/bin/python")
    assert_relocated(env, packed.old_prefix["py"])
    marker = json.loads((env / READY_MARKER).read_text())
    assert marker["artifact_id"] == "b" * 64 and marker["meta"] == meta


def test_pack_meta(packed: Packed) -> None:
    hello_archive, hello = packed.archives["hello.tar.gz"]
    assert hello_archive.name == "hello.tar.gz" and hello_archive.is_file()
    hello, py = dict(hello), dict(packed.archives["py.tar.zst"][1])
    assert int(hello.pop("unpacked_size")) > 0 and int(py.pop("unpacked_size")) > 0  # declared for the unpack bound
    assert hello == {"env_format": "tar.gz", "env_type": "conda", "platform": "linux-64"}
    assert py == {
        "env_format": "tar.zst",
        "env_type": "conda",
        "platform": "linux-64",
        "python_version": platform.python_version(),
    }
    assert envpack.host_platform() == "linux-64" or platform.machine() != "x86_64"


def test_second_request_reuses_env(packed: Packed, envs_root: Path) -> None:
    archive, meta = packed.archives["hello.tar"]
    env = materialize(archive, envs_root, "c" * 64, meta)
    calls: list[int] = []
    (env / "reuse-probe").write_text("still here")
    assert materialize(archive, envs_root, "c" * 64, meta, progress=lambda d, t: calls.append(d)) == env
    assert calls == [] and (env / "reuse-probe").exists(), "a ready env must be reused, not re-extracted"


def test_concurrent_callers_extract_once(packed: Packed, envs_root: Path) -> None:
    archive, meta = packed.archives["py.tar"]
    extractors: set[int] = set()
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(
                materialize(
                    archive, envs_root, "d" * 64, meta, progress=lambda d, t: extractors.add(threading.get_ident())
                )
            )
        except BaseException as e:  # collected and re-raised by the test below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert results == [envs_root / ("d" * 64)] * 4
    assert len(extractors) == 1, "the archive was extracted more than once"
    assert sorted(os.listdir(envs_root)) == ["d" * 64]
    run(results[0] / "bin" / "python", "-c", "import hellopip")


def test_materialize_refuses_other_platform_and_bad_input(packed: Packed, envs_root: Path, workdir: Path) -> None:
    archive, meta = packed.archives["hello.tar.gz"]
    with pytest.raises(EnvPackError, match="built for linux-aarch64"):
        materialize(archive, envs_root, "e" * 64, {**meta, "platform": "linux-aarch64"})
    with pytest.raises(EnvPackError, match="meta says tar.zst"):
        materialize(archive, envs_root, "e" * 64, {**meta, "env_format": "tar.zst"})
    with pytest.raises(EnvPackError, match="unsupported env format 'zip'"):
        materialize(archive, envs_root, "e" * 64, {**meta, "env_format": "zip"})
    with pytest.raises(EnvPackError, match="unknown env_type 'docker'"):
        materialize(archive, envs_root, "e" * 64, {**meta, "env_type": "docker"})
    with pytest.raises(EnvPackError, match="bad artifact id"):
        materialize(archive, envs_root, "../e", meta)
    truncated = workdir / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(EnvPackError, match="corrupt or truncated"):
        materialize(truncated, envs_root, "e" * 64, meta)
    assert not envs_root.exists() or os.listdir(envs_root) == []


def test_env_path_longer_than_binary_placeholder(packed: Packed, envs_root: Path) -> None:
    """conda's binary placeholders cap the env path; the error says so and nothing is left."""
    archive, meta = packed.archives["hello.tar"]
    deep = envs_root / ("x" * 200)
    with pytest.raises(EnvPackError, match="shorter envs dir"):
        materialize(archive, deep, "f" * 64, meta)
    assert os.listdir(deep) == []


# ---- pack errors ---------------------------------------------------------------------------------


def test_pack_rejects_bad_arguments(conda_envs: CondaEnvs, workdir: Path) -> None:
    out = workdir / "bad-out"
    with pytest.raises(EnvPackError, match="exactly one of"):
        pack(out_dir=out)
    with pytest.raises(EnvPackError, match="exactly one of"):
        pack(conda=conda_envs.scratch, venv=conda_envs.scratch, out_dir=out)
    with pytest.raises(EnvPackError, match="unsupported env format 'zip'"):
        pack(conda=conda_envs.scratch, out_dir=out, fmt="zip")
    with pytest.raises(EnvPackError, match="does not exist"):
        pack(conda=workdir / "no-such-env", out_dir=out)
    empty = workdir / "not-an-env"
    empty.mkdir(exist_ok=True)
    with pytest.raises(EnvPackError, match="not a conda env.*conda-meta"):
        pack(conda=empty, out_dir=out)
    (empty / "pyvenv.cfg").write_text("home = /usr/bin\n")
    with pytest.raises(EnvPackError, match="pack it as a venv"):
        pack(conda=empty, out_dir=out)
    with pytest.raises(EnvPackError, match="inside the env"):
        pack(conda=conda_envs.scratch, out_dir=conda_envs.scratch / "out")
    assert not out.exists() or os.listdir(out) == []


@pytest.fixture
def scratch_copy(conda_envs: CondaEnvs, workdir: Path) -> Iterator[Path]:
    dst = workdir / "scratch-copies" / "env"
    shutil.copytree(conda_envs.scratch, dst, symlinks=True)
    try:
        yield dst
    finally:
        shutil.rmtree(dst.parent)


def test_pack_refuses_env_with_conda_files_removed(scratch_copy: Path, workdir: Path) -> None:
    (scratch_copy / "bin" / "hello").unlink()
    with pytest.raises(EnvPackError, match="(?s)conda-pack refused .*bin/hello"):
        pack(conda=scratch_copy, out_dir=workdir / "out-refused")
    assert os.listdir(workdir / "out-refused") == []


def test_pack_refuses_missing_package_cache_unless_allowed(scratch_copy: Path, workdir: Path) -> None:
    for f in (scratch_copy / "conda-meta").glob("hello-*.json"):
        rec = json.loads(f.read_text())
        rec["link"]["source"] = str(workdir / "cleaned-cache" / "hello")
        f.write_text(json.dumps(rec))
    out = workdir / "out-cache"
    with pytest.raises(EnvPackError, match="allow_missing_cache"):
        pack(conda=scratch_copy, out_dir=out, fmt="tar")
    with pytest.warns(UserWarning, match="without entries in the package cache"):
        archive, meta = pack(conda=scratch_copy, out_dir=out, fmt="tar", allow_missing_cache=True)
    assert archive.is_file() and meta["env_type"] == "conda"


def test_pack_reads_ray_version_and_reports_progress(scratch_copy: Path, workdir: Path) -> None:
    info = scratch_copy / "lib" / "python3.11" / "site-packages" / "ray-2.9.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ray\nVersion: 2.9.3\n")
    seen: list[tuple[int, int]] = []
    archive, meta = pack(
        conda=scratch_copy,
        out_dir=workdir / "out-ray",
        fmt="tar.gz",
        name="rayenv",
        progress=lambda d, t: seen.append((d, t)),
    )
    assert archive.name == "rayenv.tar.gz"
    assert meta["ray_version"] == "2.9.3"
    assert seen and seen[-1][0] == seen[-1][1] > 0
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:], strict=False))
