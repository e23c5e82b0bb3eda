"""Inference workers that start the moment their model lands, and a latency-aware router in front.

    with InferencePool("mlp:v1", num_workers=3) as pool:
        y = pool.infer(x)                  # one request, routed to the best ready worker
        ys = pool.map([x1, x2, x3, ...])   # many, kept in flight across the workers

Each worker is a Ray actor that loads its model the moment the model is on its node: either its
runtime_env is `{"p2p": {"model": ..., "env": ...}}` and Ray starts it only when the p2p plugin has the
artifacts there (on arrival), or it starts at once in a warm worker process and asks its node's daemon
itself (early start, the default without an env; see InferenceWorker). Workers are spread over nodes and take a
GPU each when the cluster has GPUs. Requests go to the ready workers through `LatencyRouter` (dynamic
weighted SWRR): a slow worker gets proportionally fewer requests, a dead one none (its requests are
retried elsewhere) except an occasional probe.

`preheat(NAME:TAG)` asks the daemon of every alive node to fetch an artifact ahead of any job.

Single-threaded by design: one driver thread uses a pool at a time.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ray_plugin import models
from ray_plugin.router import LatencyRouter
from ray_plugin.spec import FIELD, parse_spec

Loader = Callable[[str, str], Callable[[Any], Any]]


class NoWorkersError(RuntimeError):
    """No inference worker is ready or can become ready; the message carries the first worker's failure."""


class InferenceWorker:
    """One model replica: gets the model onto its node, loads it, then serves requests.

    Two ways to start, chosen by the pool:
    - `models=None` (on arrival): the actor's runtime_env carries the `p2p` model, so Ray runs this
      constructor only once the plugin has the model on the node, and P2P_MODEL_DIR points at it.
    - `models=[...]` (early start): the actor has no runtime_env (so Ray can hand it a warm worker
      process), or, inside a runtime_env of the user's, `{"p2p": {"model": ..., "wait": False}}` so that
      the plugin starts the download at placement without holding the worker back. The worker asks its
      node's daemon for the models (joining a download already running), so the imports and CUDA
      initialisation (`models.warmup`) happen under the download instead of after it. Same daemon,
      same cache, same verified bytes.
    """

    def __init__(self, loader: Loader, device: str = "auto", models: Sequence[str] | None = None) -> None:
        t0 = time.monotonic()
        self.constructed = time.time()
        self.fetch_s = 0.0
        # of the early start, measured apart: the download alone and the device's start, which overlap
        self.download_s = self.warmup_s = 0.0
        if models:
            dirs = self._fetch_early(list(models), loader, device)
            os.environ["P2P_MODEL_DIR"] = dirs[0]
            os.environ["P2P_MODEL_DIRS"] = os.pathsep.join(dirs)
            self.fetch_s = time.monotonic() - t0
        self.model_dir = os.environ["P2P_MODEL_DIR"]
        t1 = time.monotonic()
        self.predict = loader(self.model_dir, device)
        self.load_s = time.monotonic() - t1
        self.started = time.time()

    def _fetch_early(self, names: list[str], loader: Loader, device: str) -> list[str]:
        """Fetch through this node's daemon in a thread while this thread warms the loader up."""
        from ray_plugin import daemon_client

        result: dict[str, Any] = {}

        def fetch() -> None:
            async def all_of() -> list[dict[str, Any]]:
                return list(await asyncio.gather(*(daemon_client.fetch(n) for n in names)))

            t0 = time.monotonic()
            try:
                result["ok"] = asyncio.run(all_of())
            except BaseException as e:  # handed to the constructor's thread, which raises it
                result["error"] = e
            self.download_s = time.monotonic() - t0

        thread = threading.Thread(target=fetch, name="p2p-fetch", daemon=True)
        thread.start()
        warmup = getattr(loader, "warmup", None)
        t0 = time.monotonic()
        if callable(warmup):
            warmup(device)
        self.warmup_s = time.monotonic() - t0
        thread.join()
        if "error" in result:
            err = result["error"]
            raise RuntimeError(f"p2p: fetching {', '.join(names)} on this node failed: {err}") from err
        return [str(r["path"]) for r in result["ok"]]

    @ray.method  # a no-op at run time; types `handle.ready.remote()`
    def ready(self) -> dict[str, Any]:
        """Where and how this worker runs (the pool adds it to the router when this returns)."""
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "python": sys.executable,
            "model_dir": self.model_dir,
            "device": getattr(self.predict, "device", "cpu"),
            "backend": getattr(self.predict, "backend", ""),
            "device_name": getattr(self.predict, "device_name", ""),
            "fetch_s": self.fetch_s,
            "download_s": self.download_s,
            "warmup_s": self.warmup_s,
            "load_s": self.load_s,
            "constructed": self.constructed,
            "started": self.started,
        }

    @ray.method
    def infer(self, batch: Any) -> Any:
        return self.predict(batch)


class InferencePool:
    """K inference workers behind a latency-weighted smooth round-robin router (see the module docstring)."""

    def __init__(
        self,
        model: str | Sequence[str],
        num_workers: int = 2,
        *,
        env: str | None = None,
        loader: Loader = models.load_mlp,
        device: str = "auto",
        num_gpus: float | None = None,
        num_cpus: float = 1,
        scheduling_strategy: Any = "SPREAD",
        extra_runtime_env: dict[str, Any] | None = None,
        router: LatencyRouter[int] | None = None,
        max_attempts: int = 3,
        early_start: bool | None = None,
    ) -> None:
        spec = {"model": model if isinstance(model, str) else list(model)}
        if env is not None:
            spec["env"] = env
        names = list(parse_spec(spec).models)  # fail here, on the driver, rather than in every worker
        # Early start (default without an env): the worker process starts while the model downloads.
        # In an env the worker may lack p2pd's client, so the model comes through the plugin there.
        self.early_start = env is None if early_start is None else early_start
        if self.early_start and env is not None:
            raise ValueError("early_start needs p2pd importable in the worker: not supported with env=")
        runtime_env = dict(extra_runtime_env or {})
        if not self.early_start:
            runtime_env[FIELD] = spec
        elif runtime_env:
            # Early start in a runtime_env of the user's: the node's plugin starts the download as soon
            # as Ray places the actor ("wait": False lets the worker process start meanwhile); the
            # worker's own fetch then joins that download.
            runtime_env[FIELD] = {**spec, "wait": False}
        # Early start without one: no runtime_env at all. Ray keeps warm worker processes only for the
        # job's default environment; any runtime_env means a fresh process (8-10 s measured here under
        # a download, 1 s for a warm one), and the worker's constructor starts the download itself.
        if num_gpus is None:  # a GPU each where the cluster has them, the CPU otherwise
            num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        if env is not None:
            # The worker then runs the env's interpreter, which has Ray but not necessarily p2pd:
            # ship the worker code by value instead of by import.
            from ray import cloudpickle

            for mod in (sys.modules[__name__], models):
                cloudpickle.register_pickle_by_value(mod)
        actor_cls = ray.remote(InferenceWorker)
        self.runtime_env = runtime_env
        self.workers = [
            actor_cls.options(
                runtime_env=runtime_env or None,
                num_gpus=num_gpus,
                num_cpus=num_cpus,
                scheduling_strategy=scheduling_strategy,
                max_restarts=0,
            ).remote(loader, device, names if self.early_start else None)
            for _ in range(num_workers)
        ]
        self.router: LatencyRouter[int] = router if router is not None else LatencyRouter()
        self.max_attempts = max_attempts
        self.info: dict[int, dict[str, Any]] = {}
        self.errors: dict[int, BaseException] = {}
        self._pending_ready = {w.ready.remote(): i for i, w in enumerate(self.workers)}
        self.started = time.monotonic()

    # -- readiness -------------------------------------------------------------------------------------

    def _poll_ready(self, timeout: float = 0) -> None:
        """Move workers whose `ready` has returned into the router (or into `errors`)."""
        if not self._pending_ready:
            return
        done, _ = ray.wait(list(self._pending_ready), num_returns=1, timeout=timeout)
        if done:  # take everything else that is already done too
            more, _ = ray.wait(list(self._pending_ready), num_returns=len(self._pending_ready), timeout=0)
            done = list(dict.fromkeys([*done, *more]))
        for ref in done:
            i = self._pending_ready.pop(ref)
            try:
                self.info[i] = ray.get(ref)
                self.info[i]["ready_s"] = time.monotonic() - self.started
                self.router.add(i)
            except (RayActorError, RayTaskError, ray.exceptions.RuntimeEnvSetupError) as e:
                self.errors[i] = e

    def wait_ready(self, n: int | None = None, timeout: float | None = None) -> int:
        """Block until `n` workers (default: all) are ready; return how many are. Raises if none can be."""
        want = len(self.workers) if n is None else n
        deadline = None if timeout is None else time.monotonic() + timeout
        self._poll_ready(0)
        while len(self.info) < want and self._pending_ready:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            self._poll_ready(left if left is not None else 3600)
        if not self.info and not self._pending_ready:
            raise self._no_workers()
        return len(self.info)

    def _no_workers(self) -> NoWorkersError:
        if self.errors:
            first = next(iter(self.errors.values()))
            return NoWorkersError(f"no inference worker could start; the first failure was: {first}")
        return NoWorkersError("every inference worker has failed")

    # -- requests --------------------------------------------------------------------------------------

    def _pick(self, deadline: float | None) -> int:
        """The worker for the next request, waiting for a first worker to become ready when needed."""
        while True:
            self._poll_ready(0)
            key = self.router.pick(time.monotonic())
            if key is not None:
                return key
            probe_at = self.router.next_probe_at()
            if not self._pending_ready and probe_at is None:
                raise self._no_workers()
            now = time.monotonic()
            waits = [w for w in (probe_at, deadline) if w is not None]
            wait = max(0.0, min(waits) - now) if waits else 3600.0
            if deadline is not None and now >= deadline:
                raise TimeoutError("no inference worker became available in time")
            if self._pending_ready:
                self._poll_ready(wait)
            else:
                time.sleep(wait)

    def infer(self, batch: Any, timeout: float | None = None) -> Any:
        """Run one request on the best ready worker; a dead worker's request is retried on another."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last: BaseException | None = None
        for _ in range(self.max_attempts):
            key = self._pick(deadline)
            t0 = time.monotonic()
            ref = self.workers[key].infer.remote(batch)
            try:
                out = ray.get(ref, timeout=None if deadline is None else max(0.0, deadline - t0))
            except RayActorError as e:  # the worker died: route around it, retry the request
                self.router.record_failure(key, time.monotonic())
                last = e
                continue
            except GetTimeoutError:
                self.router.record_failure(key, time.monotonic())
                ray.cancel(ref)
                raise
            self.router.record_success(key, time.monotonic() - t0, time.monotonic())
            return out
        raise NoWorkersError(f"request failed on {self.max_attempts} workers; last error: {last}")

    def map(self, batches: Iterable[Any], max_in_flight: int | None = None) -> list[Any]:
        """Run many requests, keeping up to `max_in_flight` (default 2 per worker) in flight; results in order."""
        items = list(batches)
        limit = max_in_flight or 2 * len(self.workers)
        results: list[Any] = [None] * len(items)
        attempts = [0] * len(items)
        todo = list(range(len(items)))[::-1]
        inflight: dict[Any, tuple[int, int, float]] = {}  # ref -> (item, worker, t0)
        while todo or inflight:
            while todo and len(inflight) < limit:
                i = todo.pop()
                key = self._pick(None)
                inflight[self.workers[key].infer.remote(items[i])] = (i, key, time.monotonic())
            done, _ = ray.wait(list(inflight), num_returns=1)
            for ref in done:
                i, key, t0 = inflight.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except RayActorError as e:
                    self.router.record_failure(key, time.monotonic())
                    attempts[i] += 1
                    if attempts[i] >= self.max_attempts:
                        raise NoWorkersError(f"request {i} failed on {attempts[i]} workers; last error: {e}") from e
                    todo.append(i)
                    continue
                self.router.record_success(key, time.monotonic() - t0, time.monotonic())
        return results

    # -- lifecycle -------------------------------------------------------------------------------------

    def stats(self) -> dict[int, dict[str, Any]]:
        """Per worker: router state (EWMA latency, weight, picks, failures) and where it runs."""
        weights = self.router.weights()
        out: dict[int, dict[str, Any]] = {}
        for i in range(len(self.workers)):
            s = self.router.workers.get(i)
            out[i] = {
                "ready": i in self.info,
                "error": str(self.errors[i]) if i in self.errors else None,
                "weight": weights.get(i, 0.0),
                "ewma_s": s.ewma if s else None,
                "picks": s.picks if s else 0,
                "failures": s.failures if s else 0,
                **self.info.get(i, {}),
            }
        return out

    def shutdown(self) -> None:
        """Kill every worker (their model stays in the daemon's cache for the next pool)."""
        for w in self.workers:
            try:
                ray.kill(w)  # type: ignore[arg-type]  # Ray's ActorProxy adds type[T] for typing only
            except ValueError:  # already gone
                continue
        self.workers = []
        self._pending_ready = {}

    def __enter__(self) -> InferencePool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


def _fetch_here(name: str) -> dict[str, Any]:
    """Runs on one node: ask that node's daemon (found via P2PD_SOCKET / P2PD_DATA_DIR) for `name`."""
    from ray_plugin import daemon_client

    t0 = time.monotonic()
    result = asyncio.run(daemon_client.fetch(name))
    result["node_id"] = ray.get_runtime_context().get_node_id()
    result["socket"] = str(daemon_client.socket_path())
    result["seconds"] = time.monotonic() - t0
    return result


def preheat(
    name: str, *, timeout: float | None = None, node_ids: Iterable[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Fetch `name` on every alive node (or on `node_ids`) ahead of jobs; {node_id: daemon's fetch result}.

    One zero-CPU task per node, pinned with a hard NodeAffinitySchedulingStrategy, so it runs even on a
    busy node and never lands elsewhere; each calls its own node's daemon, and all run at once, so the
    swarm shares the pieces between them. Raises the first failure (with the node it happened on).
    """
    parse_spec({"model": name})
    nodes = list(node_ids) if node_ids is not None else [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    task = ray.remote(num_cpus=0, max_retries=0)(_fetch_here)
    refs = {
        nid: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(nid, soft=False)).remote(name)
        for nid in nodes
    }
    results: dict[str, dict[str, Any]] = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    for nid, ref in refs.items():
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            results[nid] = ray.get(ref, timeout=left)
        except RayTaskError as e:
            for r in refs.values():
                ray.cancel(r)
            raise RuntimeError(f"preheat of {name} failed on node {nid}: {e.cause if e.cause else e}") from e
    return results
