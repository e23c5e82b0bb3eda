"""Start gate: a process that is started (and warmed up) before the clock starts, and runs its command on GO.

    python -m netsim.bench.gate --stdout OUT --stderr ERR -- ARGV...

Prints READY on stdout once warm, waits for a line `GO` on stdin, points stdout/stderr at the files, then runs
ARGV. Why: the benchmark's start rule is "all leechers released at once after setup". Interpreter start-up and
imports of a Python CLI (p2pd fetch) take 0.2-1 s on this 2-core machine, while libtorrent's sessions are fully
set up before GO; so a Python command (`python -m MOD ...` or a console script with an entry point) is imported
here before READY and then run in-process, and anything else (aria2c, curl: C binaries that start in
milliseconds) is exec'd, keeping its PID. Either way the command's exit status is the process's exit status.
Imports that a Python CLI makes only when it parses its first command line count as imports too: typer builds
its argument converters then (importing pydantic, 0.2 s of CPU per process, four of them at once on two cores),
so those modules are imported here as well (LAZY_IMPORTS).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import runpy
import shutil
import sys
from collections.abc import Callable

LAZY_IMPORTS = ("typer._adapters",)


def _warm_lazy_imports() -> None:
    for name in LAZY_IMPORTS:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # another CLI framework or version: nothing to warm


def _exit_now(command: Callable[[], object]) -> None:
    """Run an in-process command and exit with its status as soon as its output is flushed.

    Tearing down an interpreter that imported typer, pydantic and trio takes ~0.1 s, which an exec'd C
    client does not pay; the command's work (and every byte it prints) is complete before this point.
    """
    try:
        result = command()
    except SystemExit as e:
        result = e.code
        if result is not None and not isinstance(result, int):
            print(result, file=sys.stderr)
    rc = result if isinstance(result, int) else (0 if result is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def _python_module(argv: list[str]) -> str | None:
    """`MOD` if argv is `<python> -m MOD ...`."""
    if len(argv) >= 3 and os.path.basename(argv[0]).startswith("python") and argv[1] == "-m":
        return argv[2]
    return None


def _entry_point(argv: list[str]) -> Callable[[], object] | None:
    """The console-script function behind argv[0], when it is an installed Python entry point."""
    path = shutil.which(argv[0])
    if not path:
        return None
    name = os.path.basename(path)
    for ep in importlib.metadata.entry_points(group="console_scripts"):
        if ep.name == name:
            fn: Callable[[], object] = ep.load()
            return fn
    return None


def _redirect(path: str, fd: int, flags: int) -> None:
    new = os.open(path, flags, 0o644)
    os.dup2(new, fd)
    os.close(new)


def main() -> int:
    """Warm up, announce READY, wait for GO, run the command."""
    ap = argparse.ArgumentParser(prog="python -m netsim.bench.gate")
    ap.add_argument("--stdout", default=os.devnull)
    ap.add_argument("--stderr", default=os.devnull)
    ap.add_argument("argv", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    argv = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
    if not argv:
        ap.error("no command")
    module = _python_module(argv)
    func = None
    if module:
        importlib.import_module(module)
    else:
        func = _entry_point(argv)
    if module or func is not None:
        _warm_lazy_imports()
    print("READY", flush=True)
    line = sys.stdin.readline()
    if line.strip() != "GO":
        return 3  # the driver went away before releasing us: never run the command
    _redirect(os.devnull, 0, os.O_RDONLY)
    _redirect(a.stdout, 1, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    _redirect(a.stderr, 2, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    if module:
        sys.argv = [module, *argv[3:]]
        _exit_now(lambda: runpy.run_module(module, run_name="__main__", alter_sys=True))
    if func is not None:
        sys.argv = list(argv)
        _exit_now(func)
    os.execvp(argv[0], argv)
    return 127  # not reached: execvp raises on failure


if __name__ == "__main__":
    sys.exit(main())
