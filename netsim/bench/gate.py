"""Start gate: a process that is started (and warmed up) before the clock starts, and runs its command on GO.

    python -m netsim.bench.gate --stdout OUT --stderr ERR -- ARGV...

Prints READY on stdout once warm, waits for a line `GO` on stdin, points stdout/stderr at the files, then runs
ARGV. Why: the benchmark's start rule is "all leechers released at once after setup". Interpreter start-up and
imports of a Python CLI (p2pd fetch) take 0.2-1 s on this 2-core machine, while libtorrent's sessions are fully
set up before GO; so a Python command (`python -m MOD ...` or a console script with an entry point) is imported
here before READY and then run in-process, and anything else (aria2c, curl: C binaries that start in
milliseconds) is exec'd, keeping its PID. Either way the command's exit status is the process's exit status.
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
            return ep.load()
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
    print("READY", flush=True)
    line = sys.stdin.readline()
    if line.strip() != "GO":
        return 3  # the driver went away before releasing us: never run the command
    _redirect(os.devnull, 0, os.O_RDONLY)
    _redirect(a.stdout, 1, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    _redirect(a.stderr, 2, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    if module:
        sys.argv = [module, *argv[3:]]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0
    if func is not None:
        sys.argv = list(argv)
        rc = func()
        return rc if isinstance(rc, int) else (0 if rc is None else 1)
    os.execvp(argv[0], argv)
    return 127  # not reached: execvp raises on failure


if __name__ == "__main__":
    sys.exit(main())
