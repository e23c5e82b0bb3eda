"""`p2pd demo`: a tracker and several daemons on this machine share a generated model snapshot.

Everything runs as real processes on loopback (the same binaries a cluster runs, started, watched and
stopped by `p2pd.cluster`, the harness the tests and benchmarks use too); the seed publishes
a generated multi-GB "model" and every other node fetches it at once, with live progress. Finally
each copy is compared byte for byte with the source, independently of p2pd's own verification.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from p2pd.cluster import ClusterError, LocalCluster, Node, scratch_parent
from p2pd.rpc import RpcError
from p2pd.trio_util import collapse_single
from p2pd.units import format_rate, format_size

console = Console(stderr=True)
POOL = 16 << 20


def generate_model(root: Path, size: int, seed: int = 7) -> None:
    """A model-shaped directory: config, tokenizer, and safetensors-named shards of random bytes.

    Shards are built from a random pool at random offsets (fast; every 1 MiB distinct and
    incompressible), so generating gigabytes takes seconds, not minutes.
    """
    rng = random.Random(seed)
    pool = os.urandom(POOL)
    pool2 = pool + pool
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "demo", "hidden_size": 4096, "num_layers": 32}))
    vocab = {f"tok{i}": i for i in range(50_000)}
    (root / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}}))
    shards = max(1, min(8, size // (512 << 20)))
    per = size // shards
    for s in range(shards):
        n = per if s < shards - 1 else size - per * (shards - 1)
        with open(root / f"model-{s + 1:05d}-of-{shards:05d}.safetensors", "wb") as fh:
            block = 0
            while n > 0:
                off = rng.randrange(POOL)
                chunk = bytearray(pool2[off : off + min(1 << 20, n)])
                chunk[:8] = (s << 40 | block).to_bytes(8, "little")[: len(chunk[:8])]
                fh.write(chunk)
                n -= len(chunk)
                block += 1


def same_tree(a: Path, b: Path) -> int:
    """Compare two trees byte for byte; return bytes compared; raise AssertionError on a difference."""
    total = 0
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    if fa != fb:
        raise AssertionError(f"file lists differ: {set(fa) ^ set(fb)}")
    for rel in fa:
        with open(a / rel, "rb") as x, open(b / rel, "rb") as y:
            while True:
                bx, by = x.read(8 << 20), y.read(8 << 20)
                if bx != by:
                    raise AssertionError(f"{rel} differs")
                if not bx:
                    break
                total += len(bx)
    return total


def pick_workdir(size: int, nodes: int) -> Path:
    need = size * (nodes + 2)
    parent = scratch_parent(need)
    if shutil.disk_usage(parent).free < need:
        raise SystemExit(f"p2pd demo: need {format_size(need)} free in /dev/shm or {parent}; use a smaller --size")
    return Path(tempfile.mkdtemp(prefix="p2pd-demo-", dir=parent))


def run_demo(*, nodes: int, size: int, workdir: Path | None, egress_limit: str | None) -> int:
    own = workdir is None
    work = pick_workdir(size, nodes) if workdir is None else workdir
    work.mkdir(parents=True, exist_ok=True)
    try:
        console.print(f"[bold]p2pd demo[/]: 1 seed + {nodes} nodes on loopback, workdir {work}")
        t0 = time.monotonic()
        src = work / "source" / "demo-model"
        generate_model(src, size)
        console.print(f"generated a {format_size(size)} model snapshot in {time.monotonic() - t0:.1f} s: {src}")
        extra = ["--egress-limit", egress_limit] if egress_limit else []
        with LocalCluster(work) as cluster:
            cluster.start_tracker()
            daemons = [cluster.spawn_node(f"node{i}", *extra) for i in range(nodes + 1)]
            code = trio.run(_drive, cluster, src, daemons, size)
        if code != 0:
            own = False
        return code
    except ClusterError as e:
        own = False  # keep the logs for a look
        raise SystemExit(f"p2pd demo: {e.message}; logs in {work}") from None
    except BaseException:
        own = False
        raise
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


async def _drive(cluster: LocalCluster, src: Path, daemons: list[Node], size: int) -> int:
    await cluster.wait_ready_async(*daemons)
    work = cluster.work
    t0 = time.monotonic()
    res = await daemons[0].call("publish", {"path": str(src), "name": "demo-model:v1"}, timeout=120)
    console.print(
        f"seed published demo-model:v1 = {res['artifact_id'][:16]}… "
        f"({res['pieces']} pieces, hashed in {time.monotonic() - t0:.1f} s)"
    )
    results: dict[int, Any] = {}
    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=console
    ) as progress:
        tasks = {i: progress.add_task(f"node{i}", total=size) for i in range(1, len(daemons))}
        start = time.monotonic()

        async def fetch(i: int) -> None:
            def on_event(ev: dict[str, Any]) -> None:
                progress.update(
                    tasks[i], completed=ev.get("bytes_done", 0), description=f"node{i} · {ev.get('peers', 0)} peers"
                )

            results[i] = await daemons[i].call(
                "fetch", {"name": "demo-model:v1", "dest": str(work / f"out{i}")}, timeout=300, on_event=on_event
            )
            results[i]["seconds"] = time.monotonic() - start
            progress.update(tasks[i], completed=size)

        try:
            with collapse_single():
                async with trio.open_nursery() as nursery:
                    for i in tasks:
                        nursery.start_soon(fetch, i)
        except RpcError as e:
            console.print(f"[red]fetch failed:[/] {e}; logs in {work}")
            return 1
        elapsed = time.monotonic() - start
    verified = 0
    for i in tasks:
        verified += await trio.to_thread.run_sync(same_tree, src, Path(results[i]["path"]))
    n = len(tasks)
    summary = {
        "nodes": n,
        "artifact_bytes": size,
        "seconds": round(elapsed, 2),
        "aggregate_MBps": round(n * size / elapsed / 1e6, 1),
        "per_node_seconds": {f"node{i}": round(results[i]["seconds"], 2) for i in tasks},
        "bytes_verified_independently": verified,
    }
    console.print(
        f"[bold green]done[/]: {n} nodes × {format_size(size)} in {elapsed:.1f} s — "
        f"{format_rate(n * size / elapsed)} delivered in total; {format_size(verified)} compared "
        "byte for byte with the source: identical"
    )
    print(json.dumps(summary))
    return 0
