"""The processes a benchmark starts load p2pd as an installed p2pd does, from cached bytecode: a caller's
PYTHONDONTWRITEBYTECODE made every daemon compile p2pd from source at each start, and a --churn restart
waited for that (~0.25 s of CPU, several times that on the busy 2-core machine)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from netsim.bench.harness import REPO_ROOT, child_env


def test_children_cache_bytecode_outside_the_source_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.delenv("PYTHONPYCACHEPREFIX", raising=False)
    env = child_env()
    assert "PYTHONDONTWRITEBYTECODE" not in env
    prefix = env["PYTHONPYCACHEPREFIX"]
    assert not os.path.abspath(prefix).startswith(os.path.abspath(REPO_ROOT) + os.sep)
    # a second start of the same module reads the bytecode the first one wrote, instead of compiling the source
    code = "import sys, p2pd.units; print(p2pd.units.__spec__.cached)"
    run = [sys.executable, "-c", code]
    cached = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    assert cached.startswith(prefix) and os.path.exists(cached)
    verbose = subprocess.run([sys.executable, "-v", "-c", code], env=env, capture_output=True, text=True, timeout=60)
    units = [line for line in verbose.stderr.splitlines() if "code object from" in line and "p2pd/units" in line]
    assert units and all(line.rstrip("'").endswith(".pyc") for line in units), units
