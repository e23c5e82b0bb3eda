"""`python -m netsim.envbench --peers 4 --json FILE` -- a large packed conda env: pack, distribute, unpack.

    python -m netsim.envbench --peers 4 --json envbench.json
    python -m netsim.envbench --peers 4 --format tar --cache-dir /data/envbench --workdir /data/tmp

Steps, each timed, with real processes on loopback (a tracker and 1 + PEERS p2pd daemons, a
``p2pd.cluster.LocalCluster``):

1. **build** (skipped when the cache has it): a REAL conda env of a few hundred MB in which ``import ray``
   works, built offline with ``tests/env/condabuild.py`` (a local channel whose ``pybundle`` package holds
   the installed distributions ``--dists`` and their requirements, plus this machine's CPython repackaged as
   ``python``; py-rattler solves and installs it). Kept in ``--cache-dir`` with rattler's package cache,
   which conda-pack needs at pack time.
2. **pack**: ``p2pd pack-env --conda ENV`` on the seed daemon: conda-pack into ``--format``, then publish
   (hashing the archive into a manifest of kind ``env``). ``pack_s`` is the packing alone (the CLI reports
   it); ``publish_s`` is the rest of that command.
3. **distribute + unpack**: every peer asks its daemon to ``fetch`` the env at the same time (the control API
   call ``p2pd fetch`` makes); the daemon downloads it through the swarm, then unpacks it (safe extraction,
   conda-unpack to the final path, ``bin/python`` check, atomic rename). The daemon's first "unpacking"
   event splits each peer's time into ``download_s`` and ``unpack_s``.
4. **verify**: ``<env>/bin/python -c "import ray, numpy, scipy"`` in every peer's env dir (one at a time);
   a second fetch on one peer must reuse the env (``reuse_s``).

Prints one JSON object (also written to ``--json``). Exit status 0 when every peer's env imports ray, 1 when
something failed (the message says what), 2 when it cannot run here (a tool missing: the message names it).
Needs a p2pd checkout: the env is built with ``tests/env/condabuild.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import resource
import shlex
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parent.parent
CONDABUILD = REPO / "tests" / "env" / "condabuild.py"
MIN_ENV_BYTES = 300 * 10**6
STAMP = "envbench-built.json"


class BenchError(Exception):
    """The benchmark failed; the message says where."""


class CannotRun(Exception):
    """The benchmark cannot run on this machine (a tool or package missing)."""


def log(msg: str) -> None:
    print(f"[envbench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- build
def tree_size(root: Path) -> tuple[int, int]:
    """(bytes, files) of the regular files under root, each inode counted once (rattler hardlinks)."""
    seen: set[tuple[int, int]] = set()
    total = files = 0
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            st = os.lstat(os.path.join(dirpath, n))
            if not stat.S_ISREG(st.st_mode):
                continue
            files += 1
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total, files


def _condabuild(*args: str | Path) -> None:
    r = subprocess.run(
        [sys.executable, str(CONDABUILD), *map(str, args)], capture_output=True, text=True, timeout=3600, check=False
    )
    if r.returncode != 0:
        raise BenchError(f"condabuild {args[0]} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")


def check_tools() -> None:
    import importlib.util

    for module, install in (
        ("rattler", "pip install 'py-rattler>=0.28,<0.29'"),
        ("conda_package_handling", "pip install conda-package-handling"),
        ("conda_pack", "pip install conda-pack"),
        ("zstandard", "pip install zstandard"),
    ):
        if importlib.util.find_spec(module) is None:
            raise CannotRun(f"{module} is not installed: {install}")
    if shutil.which("gcc") is None:
        raise CannotRun("gcc not found (condabuild compiles a test program): apt-get install gcc")
    if not CONDABUILD.is_file():
        raise CannotRun(f"{CONDABUILD} not found: run from a p2pd checkout")


def import_check(python: Path, dists: list[str]) -> float:
    """Seconds for ``python -c "import DISTS"``; raises BenchError when it fails."""
    code = f"import {', '.join(d.replace('-', '_') for d in dists)}"
    t0 = time.monotonic()
    r = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=300, check=False)
    if r.returncode != 0:
        raise BenchError(f"{python} -c {code!r} failed ({r.returncode}): {r.stderr[-2000:]}")
    return time.monotonic() - t0


def build_env(cache: Path, dists: list[str]) -> tuple[Path, float | None]:
    """The cached big env (built when missing or built from other dists); returns (prefix, build seconds)."""
    env, chan, pkgs = cache / "env", cache / "channel", cache / "pkgs"
    stamp = cache / STAMP
    want = {"dists": dists, "python": sys.version.split()[0], "executable": os.path.realpath(sys.executable)}
    try:
        if json.loads(stamp.read_text()) == want and (env / "conda-meta").is_dir():
            log(f"reusing the env built earlier in {env}")
            return env, None
    except (FileNotFoundError, ValueError):
        pass
    log(f"building a conda env with {','.join(dists)} in {cache} (a few minutes; cached for the next run)")
    t0 = time.monotonic()
    stamp.unlink(missing_ok=True)
    for d in (env, chan, pkgs):
        shutil.rmtree(d, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    _condabuild("channel", chan, ",".join(dists))
    _condabuild("env", chan, env, pkgs, f"python {sysconfig.get_python_version()}.*", "pybundle")
    import_check(env / "bin" / "python", dists)
    stamp.write_text(json.dumps(want))
    return env, time.monotonic() - t0


# ----------------------------------------------------------------------------------------- run
def proc_cpu_s(pid: int) -> float | None:
    """utime + stime + waited-for children of a live process, from /proc (None when unavailable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    """CPU seconds of this process's waited-for children (and theirs), user + system."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def unpack_alone(archive: Path, base: Path, aid: str, meta: dict[str, str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one materialize() of the archive in this process, nothing else unpacking."""
    from p2pd.envpack import materialize

    envs = base / "alone" / "envs"
    t0, ru0 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = children_cpu_s()
    try:
        env = materialize(archive, envs, aid, meta, unpack_user=os.environ.get("P2PD_UNPACK_USER"))
        wall = time.monotonic() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime + children_cpu_s() - cpu0
        if not (env / "bin" / "python").exists():
            raise BenchError(f"materialize() alone produced no bin/python in {env}")
    finally:
        shutil.rmtree(envs.parent, ignore_errors=True)
    return wall, cpu


def fs_type(path: Path) -> str:
    r = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=False)
    return r.stdout.strip() or "unknown"


@contextlib.contextmanager
def work_dir(given: Path | None, need_bytes: int) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        d = Path(tempfile.mkdtemp(prefix="envbench-", dir=given))
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)
        return
    from p2pd.cluster import scratch_dir

    with scratch_dir(need_bytes, prefix="envbench-") as d:
        yield d


async def run_bench(args: argparse.Namespace, env: Path, base: Path, diag: dict[str, Any]) -> dict[str, Any]:
    from p2pd.cluster import LocalCluster, Node

    name = "envbench:v1"
    c = LocalCluster(base)
    try:
        await c.start_tracker_async()
        seed, *peers = await c.start_nodes_async(["seed", *(f"peer{i}" for i in range(args.peers))])
        log(f"tracker + seed + {args.peers} peers up; packing {env} as {args.format}")

        # -- pack (+ publish)
        t0, cpu0 = time.monotonic(), children_cpu_s()
        r = await c.cli_async(
            seed,
            "pack-env",
            "--conda",
            str(env),
            "--name",
            name,
            "--format",
            args.format,
            "--out-dir",
            str(base / "packed"),
            timeout=3600,
        )
        pack_cmd_s, pack_cpu_s = time.monotonic() - t0, children_cpu_s() - cpu0
        err = r.stderr.decode(errors="replace")
        if r.returncode != 0:
            raise BenchError(f"pack-env failed ({r.returncode}): {err[-3000:]}")
        aid = r.stdout.decode().strip().splitlines()[-1]
        m = re.search(r"^packed .* in ([0-9.]+) s$", err, re.M)
        pack_s = float(m.group(1)) if m else None
        art = await seed.artifact(aid)
        assert art is not None
        archive_bytes, pieces = int(art["size"]), int(art["pieces_total"])
        log(
            f"pack-env took {pack_cmd_s:.1f} s (pack {pack_s} s); archive {archive_bytes / 1e6:.1f} MB, "
            f"{pieces} pieces; fetching on {args.peers} peers"
        )

        # -- distribute + unpack, on every peer at once
        per_peer: dict[str, dict[str, Any]] = {}

        last_event: dict[str, dict[str, Any]] = {}

        async def fetch(node: Node, start: float) -> None:
            t_unpack: list[float] = []

            def on_event(ev: dict[str, Any]) -> None:
                last_event[node.name] = ev
                if ev.get("phase") == "unpacking" and not t_unpack:
                    t_unpack.append(time.monotonic())

            res = await node.call("fetch", {"name": name, "dest": None}, timeout=1800, on_event=on_event)
            end = time.monotonic()
            last_event[node.name] = {"phase": "ready"}
            split = t_unpack[0] if t_unpack else end
            per_peer[node.name] = {
                "download_s": round(split - start, 2),
                "unpack_s": round(end - split, 2),
                "ready_s": round(end - start, 2),
                "env_dir": res["env_dir"],
            }

        t0 = time.monotonic()
        with trio.move_on_after(args.timeout) as cs:
            async with trio.open_nursery() as n:
                for p in peers:
                    n.start_soon(fetch, p, t0)
        if cs.cancelled_caught:
            where = {
                k: "ready"
                if v.get("phase") == "ready"
                else f"{v.get('phase')} {v.get('bytes_done', 0) / max(1, v.get('size') or 1):.0%} "
                f"({v.get('peers', '?')} peers)"
                for k, v in sorted(last_event.items())
            }
            raise BenchError(f"the peers did not all have the env within {args.timeout:g} s: {where}")
        all_ready_s = time.monotonic() - t0
        cpu = {node.name: proc_cpu_s(node.process.pid) for node in (seed, *peers)}
        uploaded = {node.name: (await node.artifact(aid) or {}).get("uploaded") for node in (seed, *peers)}
        log(f"all {args.peers} envs ready in {all_ready_s:.1f} s; verifying imports")

        # -- verify, one at a time (so the import time is not contended), then reuse
        for node in peers:
            env_dir = Path(per_peer[node.name]["env_dir"])
            if env_dir != node.data_dir / "envs" / aid:
                raise BenchError(f"{node.name}: env dir {env_dir} is not DATA_DIR/envs/<artifact id>")
            per_peer[node.name]["import_s"] = round(import_check(env_dir / "bin" / "python", args.dists), 2)
        t0 = time.monotonic()
        r = await c.cli_async(peers[0], "fetch", name, timeout=120)
        reuse_s = time.monotonic() - t0
        if r.returncode != 0 or r.stdout.decode().strip().splitlines()[-1] != per_peer[peers[0].name]["env_dir"]:
            raise BenchError(f"second fetch did not reuse the env: {r.stdout.decode()} {r.stderr.decode()}")
        meta_r = await c.cli_async(peers[0], "fetch", name, "--json", timeout=120)
        meta = json.loads(meta_r.stdout)["meta"] if meta_r.returncode == 0 else {}
        unpacked_bytes, unpacked_files = tree_size(Path(per_peer[peers[0].name]["env_dir"]))
        # the same unpack once more with no other peer unpacking: how much the 4-way run was CPU-contended
        archive = Path(str((await seed.artifact(aid) or {})["path"]))
        unpack_alone_s, unpack_alone_cpu_s = await trio.to_thread.run_sync(unpack_alone, archive, base, aid, meta)
        log(f"one unpack alone: {unpack_alone_s:.1f} s ({unpack_alone_cpu_s:.1f} s CPU)")
    except BaseException:
        c.close()
        diag["log_tails"] = c.log_tails()
        raise
    finally:
        c.close()
    downloads = [p["download_s"] for p in per_peer.values()]
    unpacks = [p["unpack_s"] for p in per_peer.values()]
    return {
        "artifact_id": aid,
        "archive": {"format": args.format, "bytes": archive_bytes, "pieces": pieces},
        "meta": meta,
        "unpacked": {"bytes": unpacked_bytes, "files": unpacked_files},
        "steps_s": {
            "pack": pack_s,
            "publish": round(pack_cmd_s - pack_s, 2) if pack_s is not None else None,
            "pack_env_command": round(pack_cmd_s, 2),
            "distribute_max": max(downloads),
            "unpack_max": max(unpacks),
            "unpack_mean": round(sum(unpacks) / len(unpacks), 2),
            "all_ready": round(all_ready_s, 2),
            "reuse": round(reuse_s, 2),
            "unpack_alone": round(unpack_alone_s, 2),
        },
        "cpu_s": {
            "pack_env_command": round(pack_cpu_s, 1),
            "unpack_alone": round(unpack_alone_cpu_s, 1),
            "daemons": {k: round(v, 1) if v is not None else None for k, v in cpu.items()},
        },
        "peers": per_peer,
        "uploaded_bytes": uploaded,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m netsim.envbench",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--peers", type=int, default=4, help="daemons that fetch the env (besides the seed)")
    ap.add_argument("--json", type=Path, help="also write the result to this file")
    ap.add_argument("--format", default="tar.zst", choices=["tar.zst", "tar.gz", "tar"], help="archive format")
    ap.add_argument(
        "--dists",
        default="ray,numpy,scipy",
        help="installed distributions to bundle into the env (with their requirements)",
    )
    ap.add_argument(
        "--cache-dir",
        type=Path,
        default=Path.home() / ".cache" / "p2pd" / "envbench",
        help="where the built env (and rattler's package cache) is kept between runs",
    )
    ap.add_argument(
        "--timeout", type=float, default=600, help="seconds the distribute + unpack step may take before the run fails"
    )
    ap.add_argument(
        "--workdir",
        type=Path,
        help="parent of the daemons' data dirs (default: tmpfs when it has "
        "room, else the temp dir); removed afterwards",
    )
    ap.add_argument(
        "--unpack-user",
        default=os.environ.get("P2PD_UNPACK_USER"),
        help="as root: the unprivileged user that runs the env's code in every daemon and in the unpack-alone "
        "step (default: $P2PD_UNPACK_USER, else the p2pd user; see `p2pd run --unpack-user`)",
    )
    args = ap.parse_args(argv)
    args.dists = [d.strip() for d in args.dists.split(",") if d.strip()]
    from p2pd.runas import RunAsError, resolve

    try:
        resolve(args.unpack_user)  # as root: the user must exist now, not after the env is built and packed
    except RunAsError as e:
        ap.error(str(e))
    if args.unpack_user:
        os.environ["P2PD_UNPACK_USER"] = args.unpack_user  # the daemons LocalCluster starts inherit it
    if args.peers < 1:
        ap.error("--peers must be at least 1")
    from p2pd.cluster import ClusterError
    from p2pd.rpc import RpcError
    from p2pd.trio_util import leaf_exceptions

    result: dict[str, Any] = {
        "bench": "envbench",
        "command": shlex.join(["python", "-m", "netsim.envbench", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": {
            "cpus": os.cpu_count(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "python": sys.version.split()[0],
        },
        "n_peers": args.peers,
        "format": args.format,
        "ok": False,
    }
    code = 0
    try:
        check_tools()
        env, build_s = build_env(args.cache_dir.expanduser().resolve(), args.dists)
        env_bytes, env_files = tree_size(env)
        result["env"] = {
            "prefix": str(env),
            "dists": args.dists,
            "bytes": env_bytes,
            "files": env_files,
            "build_s": round(build_s, 1) if build_s is not None else None,
        }
        if env_bytes < MIN_ENV_BYTES:
            raise BenchError(
                f"the env is only {env_bytes / 1e6:.0f} MB (< {MIN_ENV_BYTES / 1e6:.0f} MB): "
                "add distributions with --dists"
            )
        need = int(env_bytes * 2.5 * (args.peers + 1))
        with work_dir(args.workdir, need) as base:
            base.chmod(0o755)  # the unpack user must reach the daemons' envs dirs under it
            result["host"]["workdir_fs"] = fs_type(base)
            diag: dict[str, Any] = {}
            try:
                result.update(trio.run(run_bench, args, env, base, diag))
            finally:
                result.update(diag)
        result["ok"] = True
    except CannotRun as e:
        result["error"] = str(e)
        code = 2
    except (BenchError, ClusterError, OSError, subprocess.SubprocessError, trio.TooSlowError) as e:
        result["error"] = f"{type(e).__name__}: {e}"
        code = 1
    except RpcError as e:
        result["error"] = f"daemon: {e.code}: {e.message}"
        code = 1
    except KeyboardInterrupt:  # the daemons and the work dir are already gone (finally clauses)
        result["error"] = "interrupted"
        code = 130
    except BaseExceptionGroup as eg:  # from the per-peer fetch tasks
        leaves = leaf_exceptions(eg)
        if any(isinstance(x, KeyboardInterrupt) for x in leaves):
            result["error"], code = "interrupted", 130
        elif all(isinstance(x, Exception) for x in leaves):
            result["error"], code = "; ".join(f"{type(x).__name__}: {x}" for x in leaves), 1
        else:
            raise
    result["host"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    if code:
        print(f"envbench: {result['error']}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
