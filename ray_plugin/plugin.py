"""Ray runtime_env plugin "p2p": a task or actor starts once its model and env are on its node.

    runtime_env={"p2p": {"model": "llama-3-8b:v2", "env": "infer:7"}}

Registration (every node, in the environment of `ray start`, or of the driver that starts a local
cluster): `RAY_RUNTIME_ENV_PLUGINS='[{"class":"ray_plugin.plugin.P2PPlugin"}]'`.

How it behaves, and why (the interface and its traps are in research FINDINGS §1):
- Ray runs one plugin instance per node inside the runtime_env agent, a single asyncio loop. Nothing
  here blocks: the daemon is asked over its Unix socket with asyncio, the env's interpreter is probed
  with an asyncio subprocess.
- Ray calls `create` once per uncached URI, one after the other. The first call starts the fetches of
  every artifact of the runtime_env, so a model and an env download at the same time.
- Two runtime_envs naming the same artifact at once get `create` twice in parallel: one fetch task per
  URI is shared by every waiter (and a fetch started ahead of its own `create` is joined, not repeated).
- On a setup timeout Ray cancels `create`: the waiter stops, and when nobody else waits the request's
  connection is closed. The daemon keeps downloading (its API guarantees it), so Ray's retry, or the
  next job, finds the artifact further along or complete.
- `create` returns 0 bytes: the artifact lives in the daemon's cache, whose lifetime is the daemon's
  decision, so Ray's URI cache (sized by bytes) never evicts it and never calls `delete_uri` for space.
  Each fetch leases the artifact for LEASE_TTL, so the daemon's cache cap does not evict it under the
  workers Ray starts right after (`p2pd ls` shows the lease).
  Ray remembers per node, for the agent's lifetime, that the URI is installed; `modify_context` checks
  the directory still exists and says what to do if the daemon removed it.
- Errors become `P2PSetupError` whose message says what to do; Ray shows it at the end of the
  `RuntimeEnvSetupError` the caller gets (after its own 3 retries).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import platform
import shlex
import time
from dataclasses import dataclass, field
from typing import Any

from ray._private.runtime_env.context import RuntimeEnvContext
from ray._private.runtime_env.plugin import RuntimeEnvPlugin

from p2pd.errors import ErrorCode
from p2pd.units import format_rate, format_size
from ray_plugin import daemon_client
from ray_plugin.daemon_client import DaemonError, DaemonUnavailable
from ray_plugin.spec import FIELD, ArtifactRef, EnvMismatch, P2PSpec, check_env_compat, parse_spec

default_logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 2.0
PROBE_TIMEOUT_S = 120.0
_PROBE_CODE = (
    "import json, platform\n"
    "try:\n"
    "    import ray\n"
    "    v = ray.__version__\n"
    "except ImportError:\n"
    "    v = None\n"
    "print(json.dumps({'python_version': platform.python_version(), 'ray_version': v}))\n"
)


# The daemon's cache (`p2pd run --cache-max`) does not evict what this node's Ray workers were just given:
# each fetch leases its artifact for LEASE_TTL (p2pd/cache.py). Ray starts workers right after `create`.
LEASE_TTL = 3600.0
LEASE_HOLDER = f"ray-runtime-env-agent:{platform.node()}:{os.getpid()}"


class P2PSetupError(RuntimeError):
    """A `p2p` runtime_env could not be set up; the message tells the user what to do."""


@dataclass
class Installed:
    """An artifact verified on this node, as the daemon reported it."""

    ref: ArtifactRef
    artifact_id: str
    path: str  # model: the files; env: the archive
    env_dir: str | None = None  # env only: the unpacked environment
    meta: dict[str, Any] = field(default_factory=dict)
    conda: bool = False


@dataclass
class _Fetch:
    """One in-flight request to the daemon, shared by everyone waiting for the same URI."""

    ref: ArtifactRef
    task: asyncio.Task[Installed] | None = None
    loggers: list[logging.Logger] = field(default_factory=list)
    waited: bool = False  # a `create` has waited on it (a fetch nobody asked for yet runs on as a prefetch)
    waiters: int = 0
    last_log: float = 0.0
    last_phase: str = ""


def explain(ref: ArtifactRef, err: DaemonError) -> str:
    """Turn a daemon error code into a message that says what to do about it.

    UNREACHABLE means two things by where it comes from: raised here (`DaemonUnavailable`), the
    daemon itself; in the daemon's reply, the daemon answered, so it is its tracker that did not.
    """
    what = f"{ref.kind} {ref.name}"
    if isinstance(err, DaemonUnavailable):
        return f"p2p: cannot fetch {what}: {err.message}"
    code = err.code
    if code == ErrorCode.NOT_FOUND:
        return (
            f"p2p: no artifact named {ref.name} is known to the tracker: check the name and tag, or publish it "
            f"first (`p2pd publish PATH --name {ref.name}` on a node that has the files"
            + (", or `p2pd pack-env ... --name " + ref.name + "` for an env" if ref.kind == "env" else "")
            + f"). Daemon said: {err.message}"
        )
    if code in (ErrorCode.UNREACHABLE, ErrorCode.TIMEOUT):
        return (
            f"p2p: the p2pd daemon on this node cannot reach its tracker to resolve {what}: check that "
            f"`p2p-tracker serve` is running and the daemon's --tracker address. Daemon said: {err.message}"
        )
    if code == ErrorCode.INTEGRITY:
        return (
            f"p2p: no peer has verified data for {what} (every source failed the integrity check): republish it "
            f"from a good copy (`p2pd publish PATH --name NAME:NEWTAG`) and use the new tag. Daemon said: {err.message}"
        )
    if code == ErrorCode.DISK_FULL:
        return (
            f"p2p: not enough disk space on this node for {what} in the p2pd data dir: free space there or move "
            f"the daemon's --data-dir to a larger disk. Daemon said: {err.message}"
        )
    if code == ErrorCode.ENV:
        return (
            f"p2p: the p2pd daemon could not unpack env {ref.name} on this node: {err.message}. Repack the env "
            f"(`p2pd pack-env`) and publish it under a new tag"
        )
    if code == ErrorCode.STORAGE:
        return (
            f"p2p: the p2pd daemon could not store {what} on this node: {err.message}. Check free space and "
            "permissions of the daemon's --data-dir"
        )
    return (
        f"p2p: the p2pd daemon failed to fetch {what} ({code}): {err.message}. If this persists, check the daemon's "
        "log on this node and that the plugin and daemon come from the same p2pd version"
    )


class P2PPlugin(RuntimeEnvPlugin):
    """The `p2p` runtime_env field (see the module docstring)."""

    name = FIELD

    def __init__(self) -> None:
        self._inflight: dict[str, _Fetch] = {}
        self._installed: dict[str, Installed] = {}
        self._probed: dict[str, dict[str, Any]] = {}  # env_dir -> versions its interpreter reported

    # -- Ray's interface -------------------------------------------------------------------------------

    @staticmethod
    def validate(runtime_env_dict: dict[str, Any]) -> None:
        """Reject a malformed spec when the job is submitted, with the key at fault and an example."""
        parse_spec(runtime_env_dict[FIELD])

    def get_uris(self, runtime_env: Any) -> list[str]:
        """Ray calls this in many places (also when a worker exits), so it must never raise."""
        try:
            return [ref.uri for ref in parse_spec(runtime_env[FIELD]).gating_refs]
        except (ValueError, KeyError, TypeError) as e:
            default_logger.warning("p2p: ignoring invalid runtime_env['p2p'] in get_uris: %s", e)
            return []

    async def create(
        self, uri: str | None, runtime_env: Any, context: RuntimeEnvContext, logger: logging.Logger = default_logger
    ) -> int:
        """Make `uri`'s artifact present on this node; the first call starts every fetch of the runtime_env."""
        spec = parse_spec(runtime_env[FIELD])
        for ref in spec.refs:  # overlap: Ray would otherwise fetch one artifact after the other
            self._ensure_started(ref, logger)
        if uri is None or uri in self._installed:
            return 0
        fetch = self._inflight.get(uri)
        if fetch is None:  # finished between the loop above and here, or an unknown URI
            if uri in self._installed:
                return 0
            raise P2PSetupError(f"p2p: URI {uri} does not belong to runtime_env['p2p'] = {spec.to_dict()!r}")
        await self._wait(fetch, logger)
        return 0

    def modify_context(
        self, uris: list[str], runtime_env: Any, context: RuntimeEnvContext, logger: logging.Logger = default_logger
    ) -> None:
        """Point the worker at its artifacts: P2P_MODEL_DIR(S), and the env's interpreter and PATH."""
        spec: P2PSpec = parse_spec(runtime_env[FIELD])
        model_dirs: list[str] = []
        if spec.models:
            context.env_vars["P2P_MODEL_NAMES"] = ",".join(spec.models)
        for ref in spec.gating_refs:
            inst = self._installed.get(ref.uri)
            target = None if inst is None else (inst.env_dir if ref.kind == "env" else inst.path)
            if inst is None or target is None or not os.path.exists(target):
                # Ray believes the URI is installed (it never calls `create` again for it) but the files are
                # gone. Fetch again in the background, so that one of Ray's retries finds them back.
                self._installed.pop(ref.uri, None)
                self._refetch(ref, logger)
                where = (
                    f"no longer at {target} (the p2pd daemon removed it after Ray had cached it)"
                    if inst
                    else ("not known to this node's runtime_env agent (it may have restarted)")
                )
                raise P2PSetupError(
                    f"p2p: {ref.kind} {ref.name} is {where}; fetching it again in the background: Ray's retry or the "
                    "next task will find it. Keep artifacts in use out of the daemon's garbage collection (docs/ray.md)"
                )
            if ref.kind == "model":
                model_dirs.append(target)
            else:
                bin_dir = os.path.join(target, "bin")
                context.py_executable = shlex.quote(os.path.join(bin_dir, "python"))
                path = context.env_vars.get("PATH", "${PATH}")
                context.env_vars["PATH"] = f"{bin_dir}{os.pathsep}{path}"
                context.env_vars["P2P_ENV_DIR"] = target
                if inst.conda:
                    context.env_vars["CONDA_PREFIX"] = target
                logger.info("p2p: worker runs in env %s (%s)", ref.name, target)
        if model_dirs:
            context.env_vars["P2P_MODEL_DIR"] = model_dirs[0]
            context.env_vars["P2P_MODEL_DIRS"] = os.pathsep.join(model_dirs)
            logger.info("p2p: P2P_MODEL_DIRS=%s", context.env_vars["P2P_MODEL_DIRS"])

    def delete_uri(self, uri: str, logger: logging.Logger = default_logger) -> int:
        """Forget the URI; the files stay in the daemon's cache, which decides when they go."""
        self._installed.pop(uri, None)
        return 0

    # -- fetching ---------------------------------------------------------------------------------------

    def _ensure_started(self, ref: ArtifactRef, logger: logging.Logger) -> None:
        if ref.uri in self._installed or ref.uri in self._inflight:
            return
        fetch = _Fetch(ref)
        fetch.loggers.append(logger)
        fetch.task = asyncio.get_running_loop().create_task(self._fetch(fetch), name=f"p2p-fetch:{ref.uri}")
        fetch.task.add_done_callback(functools.partial(self._finished, fetch))
        self._inflight[ref.uri] = fetch
        logger.info("p2p: asking this node's p2pd daemon for %s %s", ref.kind, ref.name)

    def _refetch(self, ref: ArtifactRef, logger: logging.Logger) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # not called from the agent's loop (never the case in Ray): nothing to schedule on
            return
        self._ensure_started(ref, logger)

    def _finished(self, fetch: _Fetch, task: asyncio.Task[Installed]) -> None:
        """Record the outcome for everyone, waiting or not (and retrieve a failure nobody awaited)."""
        if self._inflight.get(fetch.ref.uri) is fetch:
            del self._inflight[fetch.ref.uri]
        if task.cancelled():
            return
        err = task.exception()
        if err is None:
            self._installed[fetch.ref.uri] = task.result()
        elif not fetch.waited:
            default_logger.warning("p2p: prefetch of %s %s failed: %s", fetch.ref.kind, fetch.ref.name, err)

    async def _wait(self, fetch: _Fetch, logger: logging.Logger) -> Installed:
        """Wait for a shared fetch; being cancelled (Ray's setup timeout) must not cancel it for others."""
        assert fetch.task is not None
        fetch.waited = True
        fetch.waiters += 1
        if logger not in fetch.loggers:
            fetch.loggers.append(logger)
        try:
            return await asyncio.shield(fetch.task)
        except asyncio.CancelledError:
            logger.info(
                "p2p: stopped waiting for %s %s (setup cancelled or timed out); the p2pd daemon keeps downloading it",
                fetch.ref.kind,
                fetch.ref.name,
            )
            if fetch.waiters == 1 and not fetch.task.done():
                fetch.task.cancel()  # hang up; the daemon's download goes on, a retry asks again
            raise
        finally:
            fetch.waiters -= 1
            with contextlib.suppress(ValueError):
                fetch.loggers.remove(logger)

    async def _fetch(self, fetch: _Fetch) -> Installed:
        ref = fetch.ref
        t0 = time.monotonic()
        try:
            result = await daemon_client.fetch(
                ref.name, on_event=lambda ev: self._progress(fetch, ev), lease=(LEASE_HOLDER, LEASE_TTL)
            )
        except DaemonError as e:
            raise P2PSetupError(explain(ref, e)) from e
        inst = Installed(
            ref=ref,
            artifact_id=str(result.get("artifact_id", "")),
            path=str(result["path"]),
            env_dir=result.get("env_dir"),
            meta=dict(result.get("meta") or {}),
        )
        if ref.kind == "env":
            await self._check_env(inst)
        self._log(
            fetch,
            logging.INFO,
            f"p2p: {ref.kind} {ref.name} ready at {inst.env_dir or inst.path} "
            f"({inst.artifact_id[:12]}) after {time.monotonic() - t0:.1f} s",
        )
        return inst

    def _progress(self, fetch: _Fetch, event: dict[str, Any]) -> None:
        """Progress into Ray's runtime_env setup log, at most every couple of seconds per artifact."""
        now = time.monotonic()
        phase = str(event.get("phase", ""))
        if phase == fetch.last_phase and now - fetch.last_log < PROGRESS_INTERVAL_S:
            return
        fetch.last_phase, fetch.last_log = phase, now
        done, size = event.get("bytes_done") or 0, event.get("size") or 0
        pct = f"{100.0 * done / size:.0f}% " if size else ""
        rate = event.get("down_rate")
        extra = f", {event.get('peers')} peers" if event.get("peers") is not None else ""
        extra += f", {format_rate(rate)}" if rate else ""
        self._log(
            fetch,
            logging.INFO,
            f"p2p: {fetch.ref.kind} {fetch.ref.name} {phase} {pct}({format_size(done)} of {format_size(size)}{extra})",
        )

    def _log(self, fetch: _Fetch, level: int, msg: str) -> None:
        for lg in fetch.loggers or [default_logger]:
            lg.log(level, msg)

    # -- envs --------------------------------------------------------------------------------------------

    async def _check_env(self, inst: Installed) -> None:
        """Refuse an env Ray would hang in: wrong Python or Ray by its manifest, then by its interpreter."""
        name = inst.ref.name
        if not inst.env_dir:
            raise P2PSetupError(
                f"p2p: {name} is not a packed environment (the daemon unpacked nothing): publish envs with "
                f"`p2pd pack-env (--conda PREFIX | --venv PATH) --name {name}`, and pass models as 'model'"
            )
        import ray  # the agent runs the cluster's Ray and Python: they are the reference

        from p2pd.envpack import host_platform

        cluster = {
            "cluster_python": platform.python_version(),
            "cluster_ray": ray.__version__,
            "match_level": os.environ.get("RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL", "patch"),
            "cluster_platform": host_platform(),
        }
        try:
            check_env_compat(name, inst.meta, source="its manifest", **cluster)
            versions = await self._probe(inst.env_dir, name)
            check_env_compat(name, versions, source=f"{inst.env_dir}/bin/python", **cluster)
        except EnvMismatch as e:
            raise P2PSetupError(str(e)) from e
        inst.conda = inst.meta.get("env_type") == "conda" or os.path.isdir(os.path.join(inst.env_dir, "conda-meta"))

    async def _probe(self, env_dir: str, name: str) -> dict[str, Any]:
        """Run the env's interpreter once (asyncio subprocess, so the agent's loop keeps running)."""
        if env_dir in self._probed:
            return self._probed[env_dir]
        python = os.path.join(env_dir, "bin", "python")
        if not os.path.exists(python):
            raise P2PSetupError(
                f"p2p: env {name} has no bin/python at {python}: Ray workers need a Python interpreter in the env; "
                "pack an env that contains python and ray"
            )
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        try:
            proc = await asyncio.create_subprocess_exec(
                python, "-c", _PROBE_CODE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
            )
        except OSError as e:
            raise P2PSetupError(
                f"p2p: cannot run {python} of env {name}: {e}; is the env built for this platform?"
            ) from e
        try:
            out, err = await asyncio.wait_for(proc.communicate(), PROBE_TIMEOUT_S)
        except TimeoutError as e:
            proc.kill()
            await proc.wait()
            raise P2PSetupError(
                f"p2p: {python} of env {name} did not finish `import ray` in {PROBE_TIMEOUT_S:.0f} s"
            ) from e
        except asyncio.CancelledError:
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            tail = err.decode(errors="replace").strip().splitlines()[-3:]
            raise P2PSetupError(
                f"p2p: {python} of env {name} failed to start (exit {proc.returncode}): {' | '.join(tail)}"
            )
        try:
            versions: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError) as e:
            raise P2PSetupError(f"p2p: {python} of env {name} printed no version report: {out[-200:]!r}") from e
        self._probed[env_dir] = versions
        return versions
