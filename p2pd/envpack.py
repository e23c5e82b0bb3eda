"""Packed environments: pack a conda env or venv on a build machine; unpack it safely where it lands.

Why this exists: an AI job needs its Python environment on every node before the model is of any use,
and solving/installing it per node takes minutes. We pack it once (conda-pack / venv-pack), ship the
archive peer to peer like any other artifact, and turn it back into a working env on arrival.

Two entry points:

- :func:`pack` runs on the build machine (the CLI's ``p2pd pack-env``). It returns the archive and the
  ``meta`` the manifest records (kind of env, platform, Python and Ray versions), read from the env's
  files (conda-meta/*.json, pyvenv.cfg, dist-info) without importing anything from it.
- :func:`materialize` runs in the daemon (from a worker thread) when an env artifact is complete. It
  extracts into ``ENVS_ROOT/.tmp-<id>-<random>``, relocates prefixes, checks that ``bin/python``
  starts, writes the ready marker, then renames the directory to ``ENVS_ROOT/<id>`` in one step.

Decisions (the why):

- **Relocation targets the final path while files sit in the temporary dir.** conda-unpack computes the
  new prefix from its own location, so running it in the temporary dir would bake the temporary path
  into every file. We run the archive's own conda-unpack code (``_prefix_records`` and
  ``update_prefix``, loaded with runpy in a subprocess of our interpreter, so a crash or ``sys.exit``
  in it cannot take the daemon down) on the files in the temporary dir with the final path as the new
  prefix. The final directory therefore appears only once it is complete: a crash at any point leaves
  at most a ``.tmp-*`` dir, which the next call for that id (or :func:`cleanup_stale`) removes.
- **Shebangs.** conda-pack and venv-pack rewrite ``#!<prefix>/bin/python`` to ``#!/usr/bin/env
  python``, which only works with the env activated. Cluster launchers (Ray) run ``<env>/bin/...``
  directly, so on arrival a ``#!/usr/bin/env NAME`` line in ``bin/`` whose NAME exists in the env's own
  ``bin/`` is pointed back at ``<final>/bin/NAME`` (distlib's ``/bin/sh`` trampoline when the line
  would exceed the kernel's 127-byte shebang limit).
- **Safe extraction, own loop.** tarfile's ``data`` filter clears setuid bits instead of refusing and
  has no notion of venv interpreter links, so we validate every member ourselves and write with
  ``O_NOFOLLOW``/``O_EXCL``. Rules: no absolute names, no ``..``, no member below a symlink, symlinks
  and hardlinks must resolve inside the env (checked lexically per member and with realpath after the
  whole archive, which catches chains), no devices/fifos, no setuid/setgid, no member over a directory. The
  one exception: in a venv, ``bin/python*`` may be an absolute symlink (a venv's interpreter *is* its
  base interpreter; see docs/envs.md for this venv-pack limit).
- **Locking.** One ``flock`` per artifact id (``ENVS_ROOT/.<id>.lock``, removed by its holder, with an
  inode check on acquire so a removed-and-recreated lock file cannot be held twice). It serializes
  threads and processes; the loser of a race finds the marker and returns the ready dir.
- **Durability.** Before the marker is written the filesystem is flushed (syncfs), so "marker present"
  means "every byte is on disk" even across a power loss, not just a process crash.
- **What is trusted.** Materializing runs code from the env (conda-unpack's replacement functions and
  ``bin/python``). The safety rules protect the node's filesystem from a malformed or hostile archive
  *structure*; they do not make a hostile env safe to run. Only publish envs you would run. That code
  never runs as root: a root daemon runs it as the unpack user (p2pd/runas.py, ``--unpack-user``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import gzip
import json
import os
import platform
import re
import secrets
import shutil
import stat
import subprocess
import sys
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from p2pd import runas

__all__ = [
    "FORMATS",
    "READY_MARKER",
    "EnvPackError",
    "UnsafeArchiveError",
    "cleanup_stale",
    "env_ready",
    "host_platform",
    "materialize",
    "pack",
]

Progress = Callable[[int, int], None]

FORMATS = ("tar.zst", "tar.gz", "tar")
READY_MARKER = ".p2pd-env.json"
# zstd's own default: ~3x faster than conda-pack's 9 for ~10% larger archives; env archives are
# packed once per version but on the critical path of a release, and the swarm makes bytes cheap.
DEFAULT_LEVEL = {"tar.zst": 3, "tar.gz": 4, "tar": 0}
PYTHON_CHECK_TIMEOUT_S = 120.0
UNPACK_TIMEOUT_S = 1800.0
SHEBANG_MAX = 127  # bytes the kernel reads of a "#!" line on older kernels (BINPRM_BUF_SIZE)
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VENV_INTERP_RE = re.compile(r"^bin/python[0-9.]*$")
_ENV_SHEBANG_RE = re.compile(rb"^#!/usr/bin/env ([A-Za-z0-9._+-]+)([ \t][^\n]*)?\n")
_CHUNK = 1 << 20
# Unpacking bounds (issue #14 rows 8, 12): a 32 KB archive that unpacked to 1 GiB was accepted.
UNPACKED_SIZE_KEY = "unpacked_size"  # manifest meta: bytes of the env's regular files, declared by `pack`
UNPACKED_SLACK = 0.05  # conda-pack adds its own small files (conda-unpack, activate): the declaration may be short
UNPACKED_SLACK_BYTES = 64 << 20
MAX_RATIO = 100  # unpacked / archive bytes: real envs are 3-10x (zstd), text-heavy ones up to ~30x
RATIO_FLOOR = 64 << 20  # below this many unpacked bytes no ratio is checked (tiny archives compress absurdly)
FREE_SPACE_RESERVE = 256 << 20  # left free on the envs filesystem after an unpack, for everything else
NO_GROUP_OTHER_WRITE = 0o022  # stripped from every file and dir: an env is shared read-only by its users
_RAY_CONDA_NAMES = ("ray-core", "ray", "ray-default", "ray-all")


class EnvPackError(Exception):
    """Packing or materializing an env failed; the message says what to do about it."""


class UnsafeArchiveError(EnvPackError):
    """An env archive has a member that could write outside its env or create something dangerous."""


# --------------------------------------------------------------------------------------------------
# pack


def pack(
    *,
    conda: str | os.PathLike[str] | None = None,
    venv: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str],
    fmt: str = "tar.zst",
    progress: Progress | None = None,
    name: str | None = None,
    compress_level: int | None = None,
    n_threads: int = -1,
    allow_missing_cache: bool = False,
) -> tuple[Path, dict[str, str]]:
    """Pack a conda env (conda-pack) or a venv (venv-pack) into ``out_dir/<name>.<fmt>``.

    Returns the archive path and the manifest meta: ``env_format``, ``env_type`` ("conda"|"venv"),
    ``platform`` (conda subdir notation, e.g. "linux-64"), ``python_version`` and ``ray_version``
    when present, and for venvs ``venv_python_home`` (the base interpreter every node needs).
    ``progress(bytes_done, total)`` is called as files are added. ``n_threads=-1`` uses every core
    for zstd/gzip. ``allow_missing_cache`` packs a conda env whose package cache was cleaned, at the
    price of binaries with an embedded prefix not being relocated (conda-pack's limitation).
    The archive is written under a temporary name and renamed, so ``out_dir`` never holds a partial
    archive under the final name.
    """
    if (conda is None) == (venv is None):
        raise EnvPackError("pack needs exactly one of conda=PREFIX or venv=PATH")
    if fmt not in FORMATS:
        raise EnvPackError(f"unsupported env format {fmt!r}: use one of {', '.join(FORMATS)}")
    env_type, given = ("conda", conda) if conda is not None else ("venv", venv)
    assert given is not None
    prefix = Path(os.path.abspath(os.path.expanduser(os.fspath(given))))
    if not prefix.exists():
        raise EnvPackError(f"{env_type} env {prefix} does not exist: pass the env's directory (its prefix)")
    if not prefix.is_dir():
        raise EnvPackError(f"{env_type} env {prefix} is not a directory: pass the env's directory (its prefix)")
    out = Path(os.path.abspath(os.fspath(out_dir)))
    if out == prefix or prefix in out.parents:
        raise EnvPackError(f"output dir {out} is inside the env {prefix}: choose a directory outside it")
    base = name or prefix.name
    if not _ID_RE.match(base):
        raise EnvPackError(f"archive name {base!r} must match {_ID_RE.pattern}: pass name=")
    level = DEFAULT_LEVEL[fmt] if compress_level is None else compress_level
    meta = _conda_meta(prefix) if env_type == "conda" else _venv_meta(prefix)
    meta["env_format"] = fmt
    meta[UNPACKED_SIZE_KEY] = str(_tree_size(prefix))
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"{base}.{fmt}"
    partial = out / f".{base}.{fmt}.partial-{secrets.token_hex(4)}"
    try:
        if env_type == "conda":
            _pack_conda(prefix, partial, fmt, level, n_threads, allow_missing_cache, progress)
        else:
            _pack_venv(prefix, partial, fmt, level, n_threads, progress)
        os.chmod(partial, 0o644)  # the packers write 0600 (mkstemp); the archive is meant to be shared
        os.replace(partial, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        raise
    return final, meta


class _ProgressFiles(list[Any]):
    """The packers iterate ``env.files`` once, in order: count bytes as they go (their only hook)."""

    def __init__(self, files: list[Any], sizes: list[int], progress: Progress) -> None:
        super().__init__(files)
        self._sizes = sizes
        self._progress = progress

    def __iter__(self) -> Iterator[Any]:
        total = sum(self._sizes)
        done = 0
        for f, size in zip(list.__iter__(self), self._sizes, strict=True):
            yield f
            done += size
            self._progress(done, total)


def _tree_size(prefix: Path) -> int:
    """Bytes of the regular files under `prefix` (not following symlinks): the size an unpack declares."""
    total = 0
    for dirpath, _dirs, files in os.walk(prefix):
        for f in files:
            total += _lsize(os.path.join(dirpath, f))
    return total


def _lsize(path: str) -> int:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def _pack_conda(
    prefix: Path,
    output: Path,
    fmt: str,
    level: int,
    n_threads: int,
    allow_missing_cache: bool,
    progress: Progress | None,
) -> None:
    try:
        import conda_pack
    except ImportError as e:
        raise EnvPackError("packing a conda env needs conda-pack: pip install conda-pack zstandard") from e
    try:
        env = conda_pack.CondaEnv.from_prefix(str(prefix), on_missing_cache="warn" if allow_missing_cache else "raise")
        if progress is not None:
            env.files = _ProgressFiles(env.files, [_lsize(f.source) for f in env.files], progress)
        if fmt == "tar.zst":  # conda-pack 0.9's zstd writer ignores level and threads (always 9, 1 thread)
            with _tar_then_zstd(output, level, n_threads) as tar_path:
                env.pack(output=str(tar_path), format="tar", force=True)
        else:
            env.pack(output=str(output), format=fmt, compress_level=level, n_threads=n_threads, force=True)
    except conda_pack.CondaPackException as e:
        msg = str(e).strip()
        hint = ""
        if "cache" in msg.lower():
            hint = (
                " (re-install the env's packages so the cache is back, or pack anyway with"
                " allow_missing_cache=True: binaries with an embedded prefix then stay unrelocated)"
            )
        raise EnvPackError(f"conda-pack refused {prefix}: {msg}{hint}") from e


def _pack_venv(prefix: Path, output: Path, fmt: str, level: int, n_threads: int, progress: Progress | None) -> None:
    try:
        import venv_pack
    except ImportError as e:
        raise EnvPackError("packing a venv needs venv-pack: pip install venv-pack zstandard") from e
    try:
        env = venv_pack.Env(str(prefix))
        if progress is not None:
            env.files = _ProgressFiles(env.files, [_lsize(f.source) for f in env.files], progress)
        if fmt == "tar.zst":  # venv-pack has no zstd: tar first, then compress in a stream
            with _tar_then_zstd(output, level, n_threads) as tar_path:
                env.pack(output=str(tar_path), format="tar", force=True)
        else:
            env.pack(output=str(output), format=fmt, compress_level=level, force=True)
    except venv_pack.VenvPackException as e:
        raise EnvPackError(f"venv-pack refused {prefix}: {e}") from e


@contextlib.contextmanager
def _tar_then_zstd(output: Path, level: int, n_threads: int) -> Iterator[Path]:
    """Yield a path for a plain tar; compress it into ``output`` with zstd (streaming) and delete it.

    Why: multi-threaded zstd at level 3 packs a 525 MB env in ~6 s here, conda-pack's own tar.zst
    (level 9, 1 thread) in ~33 s; the price is a temporary tar of the env's size beside the output.
    """
    try:
        import zstandard
    except ImportError as e:
        raise EnvPackError("packing tar.zst needs zstandard: pip install zstandard") from e
    tar_path = output.with_name(output.name + ".tar")
    try:
        yield tar_path
        threads = (os.cpu_count() or 1) if n_threads < 0 else n_threads
        cctx = zstandard.ZstdCompressor(level=level, threads=threads)
        with open(tar_path, "rb") as fin, open(output, "wb") as fout:
            cctx.copy_stream(fin, fout, read_size=_CHUNK, write_size=_CHUNK)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tar_path.unlink()


def host_platform() -> str:
    """This machine in conda's subdir notation ("linux-64", "osx-arm64"), the notation meta uses."""
    system = {"Linux": "linux", "Darwin": "osx", "Windows": "win"}.get(platform.system(), platform.system().lower())
    machine = platform.machine().lower()
    arch = {"x86_64": "64", "amd64": "64", "i686": "32", "i386": "32"}.get(machine)
    if arch is None:
        arch = "arm64" if machine in ("arm64", "aarch64") and system == "osx" else machine
    return f"{system}-{arch}"


def _conda_meta(prefix: Path) -> dict[str, str]:
    cm = prefix / "conda-meta"
    if not cm.is_dir():
        hint = " (it has pyvenv.cfg: pack it as a venv)" if (prefix / "pyvenv.cfg").exists() else ""
        raise EnvPackError(
            f"{prefix} is not a conda env: it has no conda-meta/ directory{hint}; "
            "pass the env's prefix (`conda env list` shows them)"
        )
    meta: dict[str, str] = {"env_type": "conda"}
    subdirs: set[str] = set()
    ray = ""
    for path in sorted(cm.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except PermissionError as e:
            raise EnvPackError(
                f"cannot read {path}: {e.strerror} (rattler writes conda-meta/*.json 0600): "
                "pack as the env's owner or `chmod a+r` them"
            ) from e
        except (OSError, ValueError) as e:
            raise EnvPackError(f"cannot read {path}: {e}: the env's metadata is damaged") from e
        name, version, subdir = rec.get("name"), rec.get("version"), rec.get("subdir")
        if isinstance(subdir, str) and subdir and subdir != "noarch":
            subdirs.add(subdir)
        if name == "python" and isinstance(version, str):
            meta["python_version"] = version
        if name in _RAY_CONDA_NAMES and isinstance(version, str) and not ray:
            ray = version
    if len(subdirs) > 1:
        raise EnvPackError(f"{prefix} mixes packages of platforms {sorted(subdirs)}: rebuild it for one platform")
    meta["platform"] = subdirs.pop() if subdirs else "noarch"
    ray = ray or _dist_version(prefix, "ray")
    if ray:
        meta["ray_version"] = ray
    return meta


def _venv_meta(prefix: Path) -> dict[str, str]:
    cfg_path = prefix / "pyvenv.cfg"
    if not cfg_path.is_file():
        hint = " (it has conda-meta/: pack it as a conda env)" if (prefix / "conda-meta").is_dir() else ""
        raise EnvPackError(f"{prefix} is not a venv: it has no pyvenv.cfg{hint}")
    cfg = _read_pyvenv_cfg(cfg_path)
    meta = {"env_type": "venv", "platform": host_platform()}
    version = cfg.get("version") or cfg.get("version_info") or ""
    m = re.match(r"^(\d+\.\d+\.\d+)", version)
    if m:
        meta["python_version"] = m.group(1)
    elif (prefix / "bin" / "python").exists():
        meta["python_version"] = _run_python_version(prefix / "bin" / "python")
    if cfg.get("home"):
        meta["venv_python_home"] = cfg["home"]
    if cfg.get("include-system-site-packages", "false").lower() == "true":
        meta["venv_system_site_packages"] = "true"
    ray = _dist_version(prefix, "ray")
    if ray:
        meta["ray_version"] = ray
    return meta


def _read_pyvenv_cfg(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip().lower()] = value.strip()
    return out


def _run_python_version(python: Path) -> str:
    try:
        r = subprocess.run(
            [str(python), "-I", "-c", _VERSION_CHECK],
            capture_output=True,
            text=True,
            timeout=PYTHON_CHECK_TIMEOUT_S,
            check=False,
        )
    except OSError as e:
        raise EnvPackError(f"{python} does not start ({e}): fix the env's interpreter") from e
    if r.returncode != 0:
        raise EnvPackError(f"{python} does not start (exit {r.returncode}): {r.stderr.strip()[-500:]}")
    return r.stdout.strip()


def _dist_version(prefix: Path, dist: str) -> str:
    """Version of a pip-installed distribution from its dist-info, without importing it."""
    for sp in sorted(prefix.glob("lib/python*/site-packages")) + sorted(prefix.glob("Lib/site-packages")):
        for info in sorted(sp.glob(f"{dist}-*.dist-info")):
            try:
                text = (info / "METADATA").read_text(errors="replace")
            except FileNotFoundError:
                continue
            name = re.search(r"^Name:\s*(\S+)", text, re.M)
            ver = re.search(r"^Version:\s*(\S+)", text, re.M)
            if name and ver and name.group(1).lower().replace("_", "-") == dist:
                return ver.group(1)
    return ""


# --------------------------------------------------------------------------------------------------
# materialize


def env_ready(envs_root: str | os.PathLike[str], artifact_id: str) -> Path | None:
    """The env dir for ``artifact_id`` when it is completely materialized, else None. Never blocks."""
    final = Path(envs_root) / _check_id(artifact_id)
    return final if _is_ready(final) else None


def materialize(
    archive: str | os.PathLike[str],
    envs_root: str | os.PathLike[str],
    artifact_id: str,
    meta: dict[str, str],
    progress: Progress | None = None,
    unpack_user: str | None = None,
) -> Path:
    """Turn a verified env archive into a ready env at ``envs_root/<artifact_id>``; return that path.

    Idempotent (a ready env is returned as is), crash-safe (the directory appears only complete, with
    its marker) and safe against concurrent callers for the same id (threads or processes). Raises
    UnsafeArchiveError for a dangerous member (nothing of it stays on disk), EnvPackError when the
    archive is corrupt, built for another platform, or the env does not work here. ``progress`` gets
    (compressed bytes read, archive size). ``unpack_user``: who runs the archive's code when this process
    is root (p2pd/runas.py; None: the ``p2pd`` user if it exists, else the env is refused).
    """
    archive = Path(archive)
    envs_root = Path(os.path.abspath(os.fspath(envs_root)))
    final = envs_root / _check_id(artifact_id)
    if _is_ready(final):
        return final
    if meta.get("env_type", "conda") not in ("conda", "venv"):
        raise EnvPackError(f"unknown env_type {meta['env_type']!r} in meta: expected conda or venv")
    want = meta.get("platform", "")
    if want and want != "noarch" and want != host_platform():
        raise EnvPackError(
            f"env {artifact_id} was built for {want}; this node is {host_platform()}: "
            f"pack the env on a {host_platform()} machine"
        )
    try:
        who = runas.resolve(unpack_user)
    except runas.RunAsError as e:
        raise EnvPackError(str(e)) from None
    envs_root.mkdir(parents=True, exist_ok=True)
    if who is not None and (blocked := runas.can_reach(envs_root, who)) is not None:
        raise EnvPackError(
            f"the unpack user {who.name!r} cannot reach {envs_root} (it may not traverse {blocked}): "
            "put the data dir (p2pd run --data-dir) under directories every user can traverse, e.g. /var/lib/p2pd"
        )
    with _id_lock(envs_root, artifact_id):
        if _is_ready(final):
            return final
        _remove_leftovers(envs_root, artifact_id)
        tmp = envs_root / f".tmp-{artifact_id}-{secrets.token_hex(6)}"
        tmp.mkdir(mode=0o755)
        try:
            os.chmod(tmp, 0o755)  # not subject to umask: workers of other users run the env
            fmt = _archive_format(archive, meta.get("env_format", ""))
            env_type = meta.get("env_type", "")
            limits = _unpack_limits(archive, envs_root, meta)
            _safe_extract(archive, fmt, tmp, venv_links=env_type == "venv", progress=progress, limits=limits)
            if not env_type:
                env_type = (
                    "conda"
                    if (tmp / "bin" / "conda-unpack").is_file()
                    else ("venv" if (tmp / "pyvenv.cfg").is_file() else "plain")
                )
            if env_type == "conda":
                _conda_unpack(tmp, final, who)
            elif env_type == "venv":
                _check_venv_home(tmp)
            _fix_shebangs(tmp, final)
            _check_python(tmp, meta.get("python_version", ""), who)
            _flush_filesystem(tmp)
            _write_marker(tmp, artifact_id, env_type, meta)
            os.rename(tmp, final)
            _fsync_dir(envs_root)
        except BaseException:
            _rmtree(tmp)
            raise
    return final


def cleanup_stale(envs_root: str | os.PathLike[str]) -> list[Path]:
    """Remove what crashed materializations left (``.tmp-*`` dirs, unmarked env dirs); return them.

    For the daemon's start. Ids being materialized right now (their lock is held) are skipped.
    """
    root = Path(envs_root)
    if not root.is_dir():
        return []
    ids = set()
    for p in root.iterdir():
        if m := re.fullmatch(r"\.tmp-(.+)-[0-9a-f]{12}|\.(.+)\.lock", p.name):
            ids.add(m.group(1) or m.group(2))
        elif not p.name.startswith(".") and not _is_ready(p):
            ids.add(p.name)
    removed: list[Path] = []
    for artifact_id in sorted(i for i in ids if _ID_RE.match(i)):
        with _id_lock(root, artifact_id, blocking=False) as held:
            if held:
                removed.extend(_remove_leftovers(root, artifact_id))
    return removed


def _check_id(artifact_id: str) -> str:
    if not isinstance(artifact_id, str) or not _ID_RE.match(artifact_id):
        raise EnvPackError(f"bad artifact id {artifact_id!r}: expected {_ID_RE.pattern}")
    return artifact_id


def _is_ready(final: Path) -> bool:
    try:
        st = os.lstat(final)
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(st.st_mode) and os.path.isfile(final / READY_MARKER)


def _remove_leftovers(envs_root: Path, artifact_id: str) -> list[Path]:
    """Under the id's lock: whatever exists for this id and is not ready came from a crash."""
    removed = []
    pattern = re.compile(rf"\.tmp-{re.escape(artifact_id)}-[0-9a-f]{{12}}")
    for p in envs_root.iterdir():
        if pattern.fullmatch(p.name):
            _rmtree(p)
            removed.append(p)
    final = envs_root / artifact_id
    if os.path.lexists(final) and not _is_ready(final):
        _rmtree(final)
        removed.append(final)
    return removed


def _rmtree(path: Path) -> None:
    """Remove a tree we created, even where the archive made dirs read-only; a symlink is unlinked."""
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
        return

    def retry_writable(func: Callable[..., Any], p: str, exc: BaseException) -> None:
        if isinstance(exc, FileNotFoundError):
            return
        if isinstance(exc, PermissionError):  # make the parent writable and try once more
            os.chmod(os.path.dirname(p), 0o700)
            func(p)
            return
        raise exc

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry_writable)
    else:
        shutil.rmtree(path, onerror=lambda func, p, exc_info: retry_writable(func, p, exc_info[1]))


@contextlib.contextmanager
def _id_lock(envs_root: Path, artifact_id: str, blocking: bool = True) -> Iterator[bool]:
    """Exclusive flock on ``.<id>.lock``; the holder unlinks it, so nothing stays behind.

    After locking we check that the path still names the locked inode: a waiter that opened the
    file before the previous holder unlinked it must not think it holds the (new) lock.
    """
    path = envs_root / f".{artifact_id}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                yield False
                return
            st = os.fstat(fd)
            try:
                cur = os.stat(path)
            except FileNotFoundError:
                cur = None
        except BaseException:
            os.close(fd)
            raise
        if cur is not None and (cur.st_dev, cur.st_ino) == (st.st_dev, st.st_ino):
            break
        os.close(fd)
    try:
        yield True
    finally:
        try:
            os.unlink(path)
        finally:
            os.close(fd)


class _CountingReader:
    """Reads the archive in chunks and reports compressed bytes consumed to ``progress``."""

    def __init__(self, raw: IO[bytes], total: int, progress: Progress | None) -> None:
        self._raw = raw
        self._total = total
        self._progress = progress
        self.done = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(_CHUNK if n is None or n < 0 else n)
        self.done += len(data)
        if self._progress is not None and data:
            self._progress(self.done, self._total)
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        """The raw file is closed by its owner; closing this wrapper is a no-op."""


def _archive_format(archive: Path, declared: str) -> str:
    """Sniff the compression from the magic bytes; a declared format must agree with them."""
    if declared and declared not in FORMATS:
        raise EnvPackError(f"unsupported env format {declared!r} in meta: expected one of {', '.join(FORMATS)}")
    try:
        with open(archive, "rb") as f:
            head = f.read(4)
    except FileNotFoundError as e:
        raise EnvPackError(f"env archive {archive} does not exist") from e
    found = "tar.zst" if head == b"\x28\xb5\x2f\xfd" else "tar.gz" if head[:2] == b"\x1f\x8b" else "tar"
    if declared and declared != found:
        raise EnvPackError(f"env archive {archive} is {found}, but its meta says {declared}: re-pack and publish it")
    return found


class _UnpackLimits:
    """How many bytes an unpack may write, and why that many (for the error that stops it)."""

    def __init__(self, max_bytes: int, why: str) -> None:
        self.max_bytes = max_bytes
        self.why = why
        self.written = 0

    def add(self, member: str, size: int) -> None:
        """Count a regular member before a byte of it is written; refuse it past the limit."""
        self.written += size
        if self.written > self.max_bytes:
            raise EnvPackError(
                f"refusing {member!r}: the env would unpack to more than {self.max_bytes} bytes ({self.why})"
            )


def _unpack_limits(archive: Path, envs_root: Path, meta: dict[str, str]) -> _UnpackLimits:
    """The tightest of: the declared unpacked size (with slack), the compression ratio, the free space.

    The free space is checked up front against the declared size (a clear error before anything is
    written) and bounds the unpack while it runs whatever the archive claims.
    """
    compressed = archive.stat().st_size
    free = shutil.disk_usage(envs_root).free - FREE_SPACE_RESERVE
    limits = [
        (
            max(RATIO_FLOOR, compressed * MAX_RATIO),
            f"{MAX_RATIO}x its {compressed}-byte archive: a decompression bomb?",
        ),
        (max(0, free), f"free space in {envs_root} less a {FREE_SPACE_RESERVE >> 20} MiB reserve"),
    ]
    declared_text = meta.get(UNPACKED_SIZE_KEY)
    if declared_text is not None:
        try:
            declared = int(declared_text)
        except ValueError:
            raise EnvPackError(
                f"meta {UNPACKED_SIZE_KEY}={declared_text!r} is not a number: re-pack and publish"
            ) from None
        if declared < 0:
            raise EnvPackError(f"meta {UNPACKED_SIZE_KEY}={declared} is negative: re-pack and publish")
        if declared > free:
            raise EnvPackError(
                f"not enough space in {envs_root} to unpack this env: it needs {declared} bytes, "
                f"{max(0, free)} are free (after a {FREE_SPACE_RESERVE >> 20} MiB reserve): free space"
            )
        allowed = declared + int(declared * UNPACKED_SLACK) + UNPACKED_SLACK_BYTES
        limits.append((allowed, f"its manifest declares {declared} bytes"))
    max_bytes, why = min(limits)
    return _UnpackLimits(max_bytes, why)


def _safe_extract(
    archive: Path,
    fmt: str,
    dest: Path,
    *,
    venv_links: bool,
    progress: Progress | None,
    limits: _UnpackLimits | None = None,
) -> None:
    total = archive.stat().st_size
    with open(archive, "rb") as raw:
        counted = _CountingReader(raw, total, progress)
        stream: Any
        if fmt == "tar.zst":
            try:
                import zstandard
            except ImportError as e:
                raise EnvPackError("unpacking a tar.zst env needs zstandard: pip install zstandard") from e
            decode_errors: tuple[type[BaseException], ...] = (zstandard.ZstdError,)
            # zstandard only calls .read(); its stub asks for a whole IO[bytes]
            stream = zstandard.ZstdDecompressor().stream_reader(
                counted,  # type: ignore[arg-type]
                read_size=_CHUNK,
                read_across_frames=True,
            )
        elif fmt == "tar.gz":
            decode_errors = ()
            # typeshed wants .seek() too; GzipFile only seeks to rewind, which tar's stream mode never does
            stream = gzip.GzipFile(fileobj=counted, mode="rb")  # type: ignore[call-overload]
        else:
            decode_errors = ()
            stream = counted
        corrupt: tuple[type[BaseException], ...] = (
            tarfile.TarError,
            EOFError,
            zlib.error,
            gzip.BadGzipFile,
            *decode_errors,
        )
        ex = _Extractor(dest, venv_links, limits)
        try:
            with contextlib.closing(stream), tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    ex.add(member, tar)
        except corrupt as e:
            raise EnvPackError(f"env archive {archive} is corrupt or truncated: {e}") from e
        ex.finish()
    if progress is not None:
        progress(total, total)


class _Extractor:
    """Writes tar members under ``root`` one at a time, refusing anything that could escape it."""

    def __init__(self, root: Path, venv_links: bool, limits: _UnpackLimits | None = None) -> None:
        self.root = root
        self.venv_links = venv_links
        self.limits = limits
        self.dirs: dict[str, int] = {}  # rel -> mode, applied at the end (a 0555 dir must stay writable until then)
        self.ok_dirs: set[str] = {""}
        self.regular: set[str] = set()
        self.links: list[str] = []  # relative symlinks, re-checked with realpath at the end
        self.abs_links: set[str] = set()  # venv interpreter links allowed to point outside
        self.link_targets: dict[str, str] = {}

    def add(self, m: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        rel = _clean_name(m.name, m.name)
        if m.mode & (stat.S_ISUID | stat.S_ISGID):
            raise UnsafeArchiveError(f"refusing {m.name!r}: setuid/setgid bit set (mode {m.mode:o})")
        if rel == "":
            if not m.isdir():
                raise UnsafeArchiveError(f"refusing {m.name!r}: the env root must be a directory")
            return
        if not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
            kind = (
                "character device"
                if m.ischr()
                else "block device"
                if m.isblk()
                else "fifo"
                if m.isfifo()
                else f"type {m.type!r}"
            )
            raise UnsafeArchiveError(f"refusing {m.name!r}: {kind} not allowed in an env")
        parent, _, _base = rel.rpartition("/")
        self._ensure_dir(parent, m.name)
        path = os.path.join(self.root, rel)
        exists = os.path.lexists(path)
        if m.isdir():
            if exists and (rel not in self.ok_dirs or not stat.S_ISDIR(os.lstat(path).st_mode)):
                raise UnsafeArchiveError(f"refusing {m.name!r}: directory over an existing non-directory")
            if not exists:
                os.mkdir(path, 0o700)
                self.ok_dirs.add(rel)
            self.dirs[rel] = m.mode
            return
        if exists:  # a later member replaces an earlier one (tar semantics; venv-pack adds pyvenv.cfg twice)
            if stat.S_ISDIR(os.lstat(path).st_mode):
                raise UnsafeArchiveError(f"refusing {m.name!r}: would replace the directory {rel!r}")
            os.unlink(path)  # never followed: if it was a symlink, the link itself goes
            self.regular.discard(rel)
            self.abs_links.discard(rel)
            if rel in self.links:
                self.links.remove(rel)
        if m.isreg():
            if self.limits is not None:
                self.limits.add(m.name, m.size)
            src = tar.extractfile(m)
            assert src is not None  # isreg() members always have a file object
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
                os.fchmod(out.fileno(), (m.mode & 0o777 & ~NO_GROUP_OTHER_WRITE) | 0o600)
            os.utime(path, (m.mtime, m.mtime))  # .pyc files are validated against source mtimes
            self.regular.add(rel)
        elif m.issym():
            self._check_symlink(rel, m)
            os.symlink(m.linkname, path)
            self.link_targets[rel] = m.linkname
            os.utime(path, (m.mtime, m.mtime), follow_symlinks=False)
        else:  # hardlink: linkname is another member's name
            if m.linkname.startswith("/") or ".." in m.linkname.split("/"):
                raise UnsafeArchiveError(f"refusing {m.name!r}: hardlink to {m.linkname!r} points outside the env")
            target = _clean_name(m.linkname, m.name)
            if target not in self.regular:
                raise UnsafeArchiveError(
                    f"refusing {m.name!r}: hardlink to {m.linkname!r}, which is not a regular file extracted earlier"
                )
            os.link(os.path.join(self.root, target), path, follow_symlinks=False)
            self.regular.add(rel)

    def _ensure_dir(self, rel: str, member: str) -> None:
        """Create missing parents; refuse when a parent is a symlink (writing through it could escape)."""
        if rel in self.ok_dirs:
            return
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub in self.ok_dirs:
                continue
            path = os.path.join(self.root, sub)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                os.mkdir(path, 0o755)
                self.ok_dirs.add(sub)
                continue
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeArchiveError(f"refusing {member!r}: its path goes through the symlink {sub!r}")
            if not stat.S_ISDIR(st.st_mode):
                raise UnsafeArchiveError(f"refusing {member!r}: {sub!r} is not a directory")
            self.ok_dirs.add(sub)

    def _check_symlink(self, rel: str, m: tarfile.TarInfo) -> None:
        target = m.linkname
        if not target or "\0" in target:
            raise UnsafeArchiveError(f"refusing {m.name!r}: empty symlink target")
        if target.startswith("/"):
            if self.venv_links and _VENV_INTERP_RE.match(rel):
                self.abs_links.add(rel)
                return
            raise UnsafeArchiveError(f"refusing {m.name!r}: symlink to absolute path {target!r} points outside the env")
        resolved = os.path.normpath(os.path.join(os.path.dirname(rel), target))
        if resolved == ".." or resolved.startswith("../") or resolved.startswith("/"):
            raise UnsafeArchiveError(f"refusing {m.name!r}: symlink to {target!r} points outside the env")
        self.links.append(rel)

    def finish(self) -> None:
        """Chains of symlinks can escape where each link alone looks inside: resolve them all for real."""
        root = os.path.realpath(self.root)
        for rel in self.links:
            real = os.path.realpath(os.path.join(self.root, rel))
            if real != root and not real.startswith(root + os.sep) and not self._to_interpreter(rel):
                raise UnsafeArchiveError(
                    f"refusing {rel!r}: symlink resolves to {real!r}, outside the env (through other symlinks)"
                )
        for rel in sorted(self.dirs, key=lambda r: -r.count("/")):
            os.chmod(os.path.join(self.root, rel), (self.dirs[rel] & 0o777 & ~NO_GROUP_OTHER_WRITE) | 0o700)

    def _to_interpreter(self, rel: str) -> bool:
        """venv ``bin/python -> python3 -> /base/python3``: bare-name links in bin/ ending at the interpreter."""
        for _ in range(40):
            if rel in self.abs_links:
                return True
            target = self.link_targets.get(rel)
            if rel not in self.links or not _VENV_INTERP_RE.match(rel) or target is None or "/" in target:
                return False
            rel = "bin/" + target
        return False


def _clean_name(name: str, member: str) -> str:
    """Archive path -> normalized relative path; refuse absolute paths and any ``..`` component."""
    if name.startswith("/") or "\0" in name:
        raise UnsafeArchiveError(f"refusing {member!r}: absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"refusing {member!r}: '..' in path")
    return "/".join(parts)


_VERSION_CHECK = "import platform; print(platform.python_version())"
_UNPACK_DRIVER = r"""
import os, runpy, sys
tmp, final = sys.argv[1], sys.argv[2]
bindir = os.path.join(tmp, "bin")
sys.path.insert(0, bindir)  # conda-unpack imports conda_unpack_progress from its own dir
ns = runpy.run_path(os.path.join(bindir, "conda-unpack"), run_name="conda_unpack")
records, update_prefix = ns.get("_prefix_records"), ns.get("update_prefix")
if records is None or update_prefix is None:
    sys.exit("conda-unpack has no _prefix_records/update_prefix: packed by an unsupported conda-pack version")
for path, placeholder, mode in records:
    update_prefix(os.path.join(tmp, path), final, placeholder, mode=mode)
"""


def _conda_unpack(tmp: Path, final: Path, who: runas.RunAs | None) -> None:
    """Run the archive's conda-unpack replacements on ``tmp`` with ``final`` as the new prefix (as ``who``)."""
    script = tmp / "bin" / "conda-unpack"
    if not script.is_file():
        raise EnvPackError("conda env archive has no bin/conda-unpack: pack it with conda-pack (no --dest-prefix)")
    try:
        python = sys.executable if who is None else runas.interpreter(tmp, who, sys.executable)
        links = {} if who is None else runas.hand_over(tmp, who)
        try:
            r = runas.run([python, "-I", "-c", _UNPACK_DRIVER, str(tmp), str(final)], who, tmp, UNPACK_TIMEOUT_S)
        finally:
            if who is not None:
                runas.take_back(tmp, links)
    except subprocess.TimeoutExpired as e:
        raise EnvPackError(f"conda-unpack did not finish in {UNPACK_TIMEOUT_S:.0f}s") from e
    except runas.RunAsError as e:
        raise EnvPackError(str(e)) from None
    if r.returncode != 0:
        tail = r.stderr.strip()[-1500:]
        hint = ""
        if "negative padding" in tail:
            hint = (
                f" (the env dir path {final} is longer than a binary prefix placeholder of the env: "
                "use a shorter envs dir)"
            )
        raise EnvPackError(f"conda-unpack failed (exit {r.returncode}){hint}: {tail}")


def _check_venv_home(tmp: Path) -> None:
    cfg_path = tmp / "pyvenv.cfg"
    if not cfg_path.is_file():
        raise EnvPackError("venv archive has no pyvenv.cfg: pack it with venv-pack")
    cfg = _read_pyvenv_cfg(cfg_path)
    home = cfg.get("home", "")
    if not home or not os.path.isdir(home):
        version = cfg.get("version") or cfg.get("version_info") or "the same Python"
        raise EnvPackError(
            f"this venv needs its base interpreter at {home or '(no home in pyvenv.cfg)'}, which is missing on this "
            f"node (a venv-pack limit): install Python {version} at that path on every node, or pack a conda env"
        )


def _fix_shebangs(tmp: Path, final: Path) -> None:
    """Point ``#!/usr/bin/env NAME`` scripts in bin/ at the env's own NAME, at the final path."""
    bindir = tmp / "bin"
    if not bindir.is_dir() or bindir.is_symlink():
        return
    for entry in os.scandir(bindir):
        if not entry.is_file(follow_symlinks=False):
            continue
        with open(entry.path, "rb") as f:
            head = f.read(512)
        m = _ENV_SHEBANG_RE.match(head)
        if not m or not os.path.lexists(bindir / m.group(1).decode()):
            continue
        exe = f"{final}/bin/{m.group(1).decode()}".encode()
        opts = m.group(2) or b""
        line = b"#!" + exe + opts + b"\n"
        if len(line) > SHEBANG_MAX:
            if not m.group(1).startswith(b"python"):
                continue  # the trampoline below is Python syntax; leave other long ones to activation
            line = b"#!/bin/sh\n'''exec' \"" + exe + b'"' + opts + b' "$0" "$@"\n' + b"' '''\n"
        with open(entry.path, "rb") as f:
            data = f.read()
        new = line + data[m.end() :]
        st = os.lstat(entry.path)
        tmp_path = entry.path + ".p2pd-tmp"
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(new)
            os.fchmod(out.fileno(), stat.S_IMODE(st.st_mode))
        os.utime(tmp_path, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(tmp_path, entry.path)


def _check_python(tmp: Path, want_version: str, who: runas.RunAs | None) -> None:
    python = tmp / "bin" / "python"
    if not os.path.lexists(python):
        return
    if who is not None and not runas.can_execute(python, who):
        raise EnvPackError(
            f"the unpack user {who.name!r} cannot run the env's bin/python ({os.path.realpath(python)}): a venv's "
            "base interpreter must be one every user can run (not under /root)"
        )
    try:
        r = runas.run([str(python), "-I", "-c", _VERSION_CHECK], who, tmp, PYTHON_CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise EnvPackError(f"the env's bin/python did not answer in {PYTHON_CHECK_TIMEOUT_S:.0f}s") from None
    except OSError as e:
        raise EnvPackError(f"the env's bin/python does not start on this node ({e})") from None
    if r.returncode != 0:
        raise EnvPackError(
            f"the env's bin/python does not start on this node (exit {r.returncode}): {r.stderr.strip()[-500:]}"
        )
    version = r.stdout.strip()
    if want_version and version.split(".")[:2] != want_version.split(".")[:2]:
        raise EnvPackError(
            f"the env's bin/python is Python {version}, but the env was packed with {want_version} "
            "(a venv runs its node's base interpreter): install the same Python on every node"
        )


def _flush_filesystem(path: Path) -> None:
    """syncfs(2): make every extracted byte durable before the marker says the env is complete."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syncfs = getattr(libc, "syncfs", None)
        if syncfs is None:
            os.sync()
        elif syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs: {os.strerror(err)}", str(path))
    finally:
        os.close(fd)


def _write_marker(tmp: Path, artifact_id: str, env_type: str, meta: dict[str, str]) -> None:
    body = json.dumps(
        {"artifact_id": artifact_id, "env_type": env_type, "meta": meta, "materialized_at": time.time()}, sort_keys=True
    ).encode()
    fd = os.open(tmp / READY_MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # some filesystems cannot fsync a directory
            raise
    finally:
        os.close(fd)
