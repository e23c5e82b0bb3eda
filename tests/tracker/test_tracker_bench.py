"""Smoke test of the load benchmark command (tiny load), so `python -m netsim.bench tracker` keeps working."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from p2pd.cluster import child_env


def test_bench_command_writes_the_issue_keys() -> None:
    compare = shutil.which("opentracker") is not None  # CI installs it; locally it is optional here
    with tempfile.TemporaryDirectory(prefix="p2p-tracker-bench-") as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [
            sys.executable,
            "-m",
            "netsim.bench",
            "tracker",
            "--nodes",
            "300",
            "--duration",
            "0.5",
            "--loaders",
            "1",
            "--no-metrics",
            "--json",
            str(out),
        ]
        if compare:
            cmd.append("--compare-opentracker")
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=child_env())
        assert r.returncode == 0, r.stderr[-3000:]
        result = json.loads(out.read_text())
    for key in ("heartbeats_per_s", "p50_ms", "p99_ms", "rss_mb", "nodes"):
        assert key in result, key
    assert result["nodes"] == 300 and result["heartbeats_per_s"] > 0 and result["p2pd"]["max"]["unknown"] == 0
    assert result["command"].startswith("python -m netsim.bench tracker --nodes 300")
    if compare:
        assert result["opentracker"]["heartbeats_per_s"] > 0 and "ratio_vs_opentracker" in result
