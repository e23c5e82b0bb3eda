"""The plugin's asyncio behaviour against a fake daemon: overlap, dedup, cancellation, errors, context.

These are the properties Ray's agent relies on but that a real daemon cannot be made to show on cue
(a fetch held open at a chosen moment). End-to-end behaviour is in test_ray_cluster.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import shlex
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[test]' (or 'ray[default]==2.60.0')")

import ray  # noqa: E402
from ray._private.runtime_env.context import RuntimeEnvContext  # noqa: E402
from ray_testutil import Emit, FakeDaemon, FakeDaemonError, write_fake_python  # noqa: E402

from p2pd.errors import ErrorCode  # noqa: E402
from ray_plugin import plugin as plugin_module  # noqa: E402
from ray_plugin.plugin import P2PPlugin, P2PSetupError  # noqa: E402
from ray_plugin.spec import ArtifactRef  # noqa: E402

ID = "ab" * 32


class ListLogger(logging.Logger):
    def __init__(self) -> None:
        super().__init__("test-p2p", logging.DEBUG)
        self.lines: list[str] = []

    def handle(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _model_result(name: str, path: str) -> dict[str, Any]:
    return {"artifact_id": ID, "name": name, "kind": "files", "path": path, "meta": {}}


def _uri(kind: str, name: str) -> str:
    return ArtifactRef(kind, name).uri


def _fake_env(root: Path, python_version: str | None = None, ray_version: str | None = None) -> Path:
    env = root / "env dir"  # a space: py_executable must be quoted
    report = {
        "python_version": python_version or platform.python_version(),
        "ray_version": ray_version if ray_version != "" else None,
    }
    if ray_version is None:
        report["ray_version"] = ray.__version__
    write_fake_python(env / "bin" / "python", f"echo '{json.dumps(report)}'")
    return env


def test_validate_rejects_bad_specs_with_the_key_at_fault() -> None:
    for spec, needle in [
        ("m:v1", "must be a dict"),
        ({}, "needs 'model'"),
        ({"model": "noversion"}, "NAME:TAG"),
        ({"model": []}, "empty list"),
        ({"model": ["a:1", 3]}, "must be a string"),
        ({"modle": "a:1"}, "unknown key"),
        ({"env": "bad name:1"}, "['env']"),
    ]:
        with pytest.raises(ValueError, match=None) as ei:
            P2PPlugin.validate({"p2p": spec})
        assert needle in str(ei.value), (spec, str(ei.value))
    P2PPlugin.validate({"p2p": {"model": ["org/llama-3-8b:v2", ID], "env": "infer:7"}})


def test_get_uris_never_raises() -> None:
    p = P2PPlugin()
    assert p.get_uris({"p2p": {"model": "a:1", "env": "e:2"}}) == ["p2p://model/a:1", "p2p://env/e:2"]
    assert p.get_uris({"p2p": "garbage"}) == []
    assert p.get_uris({}) == []
    assert p.get_uris({"p2p": {"model": ["a:1", "a:1"]}}) == ["p2p://model/a:1"]


def test_first_create_starts_every_fetch_and_context_points_at_them(daemon_env: Path, tmp_path: Path) -> None:
    gate = asyncio.Event
    env_dir = _fake_env(tmp_path)
    for name in ("a:1", "b:1"):
        (tmp_path / name).mkdir()

    async def main() -> tuple[RuntimeEnvContext, list[str]]:
        release = gate()

        async def handler(method: str, params: dict[str, Any], emit: Emit) -> Any:
            await emit({"phase": "downloading", "bytes_done": 0, "size": 10, "peers": 2, "down_rate": 0})
            await release.wait()
            name = params["name"]
            if name == "e:1":
                return {
                    "artifact_id": ID,
                    "name": name,
                    "kind": "env",
                    "path": "/x.tar",
                    "env_dir": str(env_dir),
                    "meta": {"env_type": "conda", "python_version": platform.python_version()},
                }
            return _model_result(name, str(tmp_path / name))

        plugin, log = P2PPlugin(), ListLogger()
        renv = {"p2p": {"model": ["a:1", "b:1"], "env": "e:1"}}
        async with FakeDaemon(daemon_env, handler) as fake:
            first = asyncio.create_task(plugin.create(_uri("model", "a:1"), renv, RuntimeEnvContext(), log))
            for _ in range(100):
                if len(fake.requests) == 3:
                    break
                await asyncio.sleep(0.01)
            assert sorted(p["name"] for _, p in fake.requests) == ["a:1", "b:1", "e:1"]  # all at once
            release.set()
            assert await first == 0
            for uri in plugin.get_uris(renv)[1:]:
                assert await plugin.create(uri, renv, RuntimeEnvContext(), log) == 0
            assert len(fake.requests) == 3
        ctx = RuntimeEnvContext(env_vars={"PATH": "/opt/custom:${PATH}"})
        plugin.modify_context(plugin.get_uris(renv), renv, ctx, log)
        return ctx, log.lines

    ctx, lines = asyncio.run(main())
    assert ctx.env_vars["P2P_MODEL_DIR"] == str(tmp_path / "a:1")
    assert ctx.env_vars["P2P_MODEL_DIRS"] == os.pathsep.join([str(tmp_path / "a:1"), str(tmp_path / "b:1")])
    assert ctx.py_executable == shlex.quote(str(env_dir / "bin" / "python"))
    assert ctx.env_vars["PATH"] == f"{env_dir}/bin{os.pathsep}/opt/custom:${{PATH}}"
    assert ctx.env_vars["CONDA_PREFIX"] == str(env_dir)
    assert any("downloading" in line and "2 peers" in line for line in lines)
    assert any("ready at" in line for line in lines)


def test_concurrent_creates_of_one_artifact_share_one_fetch(daemon_env: Path) -> None:
    async def main() -> int:
        release = asyncio.Event()

        async def handler(method: str, params: dict[str, Any], emit: Emit) -> Any:
            await release.wait()
            return _model_result(params["name"], "/cache/m")

        plugin = P2PPlugin()
        async with FakeDaemon(daemon_env, handler) as fake:
            a = {"p2p": {"model": "m:1"}}
            b = {"p2p": {"model": ["m:1", "n:1"]}}  # a different runtime_env naming the same model
            t1 = asyncio.create_task(plugin.create(_uri("model", "m:1"), a, RuntimeEnvContext(), ListLogger()))
            t2 = asyncio.create_task(plugin.create(_uri("model", "m:1"), b, RuntimeEnvContext(), ListLogger()))
            await asyncio.sleep(0.1)
            release.set()
            await asyncio.gather(t1, t2)
            return sum(1 for _, p in fake.requests if p["name"] == "m:1")

    assert asyncio.run(main()) == 1


def test_each_fetch_leases_its_artifact_against_cache_eviction(daemon_env: Path) -> None:
    """What the workers are given must not be evicted by the daemon's --cache-max right after (p2pd/cache.py)."""

    async def main() -> list[dict[str, Any]]:
        async def handler(method: str, params: dict[str, Any], emit: Emit) -> Any:
            return _model_result(params["name"], "/cache/m")

        async with FakeDaemon(daemon_env, handler) as fake:
            await P2PPlugin().create(_uri("model", "m:1"), {"p2p": {"model": "m:1"}}, RuntimeEnvContext(), ListLogger())
            return [p for _, p in fake.requests]

    (params,) = asyncio.run(main())
    lease = params["lease"]
    assert lease["holder"].startswith("ray-runtime-env-agent:") and str(os.getpid()) in lease["holder"]
    assert lease["ttl"] == plugin_module.LEASE_TTL > 0


def test_cancelled_create_hangs_up_and_a_retry_asks_again(daemon_env: Path) -> None:
    async def main() -> None:
        calls = 0

        async def handler(method: str, params: dict[str, Any], emit: Emit) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                await asyncio.sleep(30)  # the first attempt outlives Ray's setup timeout
            return _model_result(params["name"], "/cache/m")

        plugin, log = P2PPlugin(), ListLogger()
        renv = {"p2p": {"model": "m:1"}}
        async with FakeDaemon(daemon_env, handler) as fake:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(plugin.create(_uri("model", "m:1"), renv, RuntimeEnvContext(), log), 0.2)
            await asyncio.wait_for(fake.closed_event.wait(), 2)  # the connection was closed ...
            assert any("keeps downloading" in line for line in log.lines)
            assert await plugin.create(_uri("model", "m:1"), renv, RuntimeEnvContext(), log) == 0  # ... retry works
            assert calls == 2

    asyncio.run(main())


def test_one_waiter_cancelled_does_not_cancel_the_fetch_for_others(daemon_env: Path) -> None:
    async def main() -> None:
        release = asyncio.Event()

        async def handler(method: str, params: dict[str, Any], emit: Emit) -> Any:
            await release.wait()
            return _model_result(params["name"], "/cache/m")

        plugin = P2PPlugin()
        renv = {"p2p": {"model": "m:1"}}
        async with FakeDaemon(daemon_env, handler) as fake:
            short = asyncio.create_task(plugin.create(_uri("model", "m:1"), renv, RuntimeEnvContext(), ListLogger()))
            long = asyncio.create_task(plugin.create(_uri("model", "m:1"), renv, RuntimeEnvContext(), ListLogger()))
            await asyncio.sleep(0.05)
            short.cancel()
            await asyncio.sleep(0.05)
            release.set()
            assert await long == 0
            assert fake.closed == 0 or len(fake.requests) == 1
            assert len(fake.requests) == 1

    asyncio.run(main())


@pytest.mark.parametrize(
    ("code", "needles"),
    [
        (ErrorCode.NOT_FOUND, ["no artifact named m:9", "p2pd publish PATH --name m:9"]),
        (ErrorCode.INTEGRITY, ["integrity", "republish"]),
        (ErrorCode.UNREACHABLE, ["cannot reach its tracker", "p2p-tracker serve"]),
        ("tracker_unreachable", ["cannot reach its tracker", "p2p-tracker serve"]),  # a daemon before ErrorCode
        (ErrorCode.DISK_FULL, ["disk space", "--data-dir"]),
        (ErrorCode.STORAGE, ["could not store", "permissions"]),
        (ErrorCode.INTERNAL, ["(internal)", "daemon's log"]),
        ("a_code_of_a_newer_daemon", ["(internal)", "daemon's log", "same p2pd version"]),
    ],
)
def test_daemon_errors_become_messages_that_say_what_to_do(daemon_env: Path, code: str, needles: list[str]) -> None:
    async def handler(method: str, params: dict[str, Any], emit: Emit) -> Any:
        raise FakeDaemonError(code, f"daemon says {code}")

    async def main() -> None:
        async with FakeDaemon(daemon_env, handler):
            await P2PPlugin().create(_uri("model", "m:9"), {"p2p": {"model": "m:9"}}, RuntimeEnvContext(), ListLogger())

    with pytest.raises(P2PSetupError) as ei:
        asyncio.run(main())
    for needle in needles:
        assert needle in str(ei.value)
    assert f"daemon says {code}" in str(ei.value)


def test_daemon_down_says_how_to_start_it(daemon_env: Path) -> None:
    with pytest.raises(P2PSetupError) as ei:
        asyncio.run(
            P2PPlugin().create(_uri("model", "m:1"), {"p2p": {"model": "m:1"}}, RuntimeEnvContext(), ListLogger())
        )
    assert "p2pd run" in str(ei.value) and str(daemon_env) in str(ei.value)


def _env_create(daemon_env: Path, env_dir: Path | None, meta: dict[str, Any]) -> None:
    async def handler(method: str, params: dict[str, Any], emit: Emit) -> Any:
        return {
            "artifact_id": ID,
            "name": params["name"],
            "kind": "env",
            "path": "/x.tar",
            "env_dir": str(env_dir) if env_dir else None,
            "meta": meta,
        }

    async def main() -> None:
        async with FakeDaemon(daemon_env, handler):
            await P2PPlugin().create(_uri("env", "e:1"), {"p2p": {"env": "e:1"}}, RuntimeEnvContext(), ListLogger())

    asyncio.run(main())


def test_env_with_other_python_minor_is_refused_by_its_manifest(daemon_env: Path, tmp_path: Path) -> None:
    with pytest.raises(P2PSetupError, match=r"Python 3\.9\.1 \(its manifest\).*rebuild the env"):
        _env_create(daemon_env, _fake_env(tmp_path), {"python_version": "3.9.1"})


def test_env_with_other_ray_is_refused(daemon_env: Path, tmp_path: Path) -> None:
    with pytest.raises(P2PSetupError, match=r"Ray 2\.1\.0 .*install ray=="):
        _env_create(daemon_env, _fake_env(tmp_path), {"ray_version": "2.1.0"})


def test_env_whose_interpreter_lacks_ray_is_refused(daemon_env: Path, tmp_path: Path) -> None:
    # The manifest says nothing about Ray: the probe of bin/python finds out.
    with pytest.raises(P2PSetupError, match=r"does not contain Ray .*bin/python.*would hang"):
        _env_create(daemon_env, _fake_env(tmp_path, ray_version=""), {})


def test_env_with_other_python_patch_is_refused_with_the_match_level_hint(
    daemon_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    major, minor, patch = platform.python_version().split(".")[:3]
    other = f"{major}.{minor}.{int(patch) + 1}"
    env = _fake_env(tmp_path, python_version=other)
    with pytest.raises(P2PSetupError, match="RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL=minor"):
        _env_create(daemon_env, env, {})
    monkeypatch.setenv("RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL", "minor")
    _env_create(daemon_env, env, {})  # accepted when the cluster accepts patch differences


def test_env_for_another_platform_is_refused(daemon_env: Path, tmp_path: Path) -> None:
    with pytest.raises(P2PSetupError, match="built for osx-arm64"):
        _env_create(daemon_env, _fake_env(tmp_path), {"platform": "osx-arm64"})


def test_env_without_interpreter_or_unpacked_dir_is_refused(daemon_env: Path, tmp_path: Path) -> None:
    with pytest.raises(P2PSetupError, match="not a packed environment"):
        _env_create(daemon_env, None, {})
    (tmp_path / "empty").mkdir()
    with pytest.raises(P2PSetupError, match="no bin/python"):
        _env_create(daemon_env, tmp_path / "empty", {})


def test_modify_context_notices_an_artifact_the_daemon_removed_and_fetches_it_again(
    daemon_env: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"

    async def handler(method: str, params: dict[str, Any], emit: Emit) -> Any:
        model.mkdir(exist_ok=True)  # the daemon (re)materializes the artifact
        return _model_result(params["name"], str(model))

    plugin = P2PPlugin()
    renv = {"p2p": {"model": "m:1"}}
    uris = plugin.get_uris(renv)

    async def main() -> None:
        async with FakeDaemon(daemon_env, handler) as fake:
            await plugin.create(uris[0], renv, RuntimeEnvContext(), ListLogger())
            plugin.modify_context(uris, renv, RuntimeEnvContext(), ListLogger())
            model.rmdir()  # the daemon's GC removed it; Ray still has the URI cached and won't call create
            with pytest.raises(P2PSetupError, match="no longer at .*fetching it again"):
                plugin.modify_context(uris, renv, RuntimeEnvContext(), ListLogger())
            for _ in range(100):  # Ray retries a second later: by then the background fetch is done
                await asyncio.sleep(0.01)
                if uris[0] in plugin._installed:
                    break
            ctx = RuntimeEnvContext()
            plugin.modify_context(uris, renv, ctx, ListLogger())
            assert ctx.env_vars["P2P_MODEL_DIR"] == str(model)
            assert len(fake.requests) == 2

    asyncio.run(main())
    assert plugin.delete_uri(uris[0], ListLogger()) == 0


def test_wait_false_starts_the_download_but_does_not_gate_the_worker(daemon_env: Path, tmp_path: Path) -> None:
    """What InferencePool's early start relies on: create(None) returns at once, the fetch goes on."""

    async def main() -> None:
        release = asyncio.Event()

        async def handler(method: str, params: dict[str, Any], emit: Emit) -> Any:
            await release.wait()
            return _model_result(params["name"], str(tmp_path))

        plugin = P2PPlugin()
        renv = {"p2p": {"model": ["m:1", "n:1"], "wait": False}}
        assert plugin.get_uris(renv) == []  # nothing for Ray to wait for: it calls create(None, ...)
        async with FakeDaemon(daemon_env, handler) as fake:
            assert await asyncio.wait_for(plugin.create(None, renv, RuntimeEnvContext(), ListLogger()), 1) == 0
            ctx = RuntimeEnvContext()
            plugin.modify_context([], renv, ctx, ListLogger())
            assert ctx.env_vars == {"P2P_MODEL_NAMES": "m:1,n:1"}
            for _ in range(100):
                if len(fake.requests) == 2:
                    break
                await asyncio.sleep(0.01)
            assert sorted(p["name"] for _, p in fake.requests) == ["m:1", "n:1"]  # both downloads started
            release.set()
            for _ in range(100):
                if len(plugin._installed) == 2:
                    break
                await asyncio.sleep(0.01)
            assert set(plugin._installed) == {"p2p://model/m:1", "p2p://model/n:1"}

    asyncio.run(main())


def test_wait_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="'wait'] must be True or False"):
        P2PPlugin.validate({"p2p": {"model": "m:1", "wait": "no"}})
