"""Preheat from the tracker with real processes on loopback: `p2p-tracker admin preheat NAME:TAG --all`
makes every node fetch the artifact into its cache without any `p2pd fetch`; `--label zone=a` picks only
the nodes so labelled; `preheat status` shows each chosen node's progress and failures; bad input is one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from p2pd.cluster import HOST, TRACKER_CLI, LocalCluster, Node, child_env

TOKEN = "preheat-test-token"
MiB = 1 << 20


def admin(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    env = child_env({"P2P_TRACKER_ADMIN_URL": f"http://{HOST}:{port}", "P2P_TRACKER_ADMIN_TOKEN": TOKEN})
    return subprocess.run([*TRACKER_CLI, "admin", *args], capture_output=True, text=True, timeout=60, env=env)


def status(port: int, name: str) -> list[dict[str, Any]]:
    r = admin(port, "preheat", "status", name, "--json")
    assert r.returncode == 0, r.stderr
    orders: list[dict[str, Any]] = json.loads(r.stdout)["orders"]
    return orders


def wait_complete(port: int, name: str, n: int, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        order = status(port, name)[0]
        if order["complete"] == n:
            return order
        assert order["failed"] == 0, order
        assert time.monotonic() < deadline, order
        time.sleep(0.3)


def cached_bytes(node: Node, aid: str) -> bytes:
    files = [p for p in (node.data_dir / "cache" / aid).rglob("*") if p.is_file()]
    assert len(files) == 1, files
    return files[0].read_bytes()


def test_preheat_all_then_by_label_status_and_errors(tmp_path: Path) -> None:
    with LocalCluster(tmp_path / "c") as c:
        t = c.start_tracker("--admin-listen", f"{HOST}:0", "--admin-token", TOKEN, interval=0.5)
        assert t.admin_port
        port = t.admin_port
        seed = c.start_node("seed", "--label", "zone=s")
        a1 = c.start_node("a1", "--label", "zone=a")
        a2 = c.start_node("a2", "--label", "zone=a")
        b1 = c.start_node("b1", "--label", "zone=b")
        ids = {n.name: n.call_blocking("status")["node_id"] for n in (a1, a2, b1)}
        data = os.urandom(6 * MiB + 123)
        src = tmp_path / "model.bin"
        src.write_bytes(data)
        aid = c.publish(seed, src, "model:v1")
        small = tmp_path / "small.bin"
        small.write_bytes(os.urandom(2 * MiB))
        aid2 = c.publish(seed, small, "small:v1")

        # --label zone=a: only a1 and a2
        r = admin(port, "preheat", "small:v1", "--label", "zone=a")
        assert r.returncode == 0 and "2 node(s)" in r.stdout, r.stderr
        order = wait_complete(port, "small:v1", 2)
        assert {n["node_id"] for n in order["nodes"]} == {ids["a1"], ids["a2"]}
        assert order["selector"] == "zone=a"
        assert cached_bytes(a1, aid2) == small.read_bytes() == cached_bytes(a2, aid2)
        assert not (b1.data_dir / "cache" / aid2).exists()

        # --all: every registered node (the seed holds it already), identical bytes on all three
        r = admin(port, "preheat", "model:v1", "--all")
        assert r.returncode == 0 and "4 node(s)" in r.stdout, r.stderr
        order = wait_complete(port, "model:v1", 4)
        assert all(n["progress"] == 1.0 and n["error"] is None for n in order["nodes"])
        for node in (a1, a2, b1):
            assert cached_bytes(node, aid) == data
        r = admin(port, "preheat", "status", "model:v1")
        assert r.returncode == 0 and "4 complete" in r.stdout and "0 failed" in r.stdout, r.stdout

        # bad input: one line each, with the exit status of its code
        for args, needle, code in [
            (["preheat", "nothing:here", "--all"], "unknown name", 3),
            (["preheat", "model:v1", "--zone", "mars"], "unknown zone 'mars'", 2),
            (["preheat", "model:v1", "--label", "gpu=h100"], "no registered node has gpu=h100", 2),
            (["preheat", "model:v1"], "exactly one of --zone", 2),
            (["preheat", "model:v1", "--all", "--zone", "a"], "exactly one of --zone", 2),
            (["preheat", "model:v1", "--label", "gpu"], "KEY=VALUE", 2),
        ]:
            r = admin(port, *args)
            assert r.returncode == code and needle in r.stderr, (args, r.returncode, r.stderr)
            assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_an_order_reaches_nodes_at_once_over_their_signal_channels(tmp_path: Path) -> None:
    """With a 30 s heartbeat interval, waiting for the next heartbeat reply would leave a preheat idle for up to
    30 s; the tracker's nudge over each node's signal channel starts it at once (here: done within 15 s)."""
    with LocalCluster(tmp_path / "c") as c:
        t = c.start_tracker("--admin-listen", f"{HOST}:0", "--admin-token", TOKEN, interval=30.0)
        assert t.admin_port
        seed = c.start_node("seed")
        nodes = [c.start_node(f"n{i}") for i in range(2)]
        src = tmp_path / "model.bin"
        src.write_bytes(os.urandom(3 * MiB + 5))
        aid = c.publish(seed, src, "model:v1")
        deadline = time.monotonic() + 30
        while not all(n.call_blocking("status")["traversal"]["signal_channel"] for n in nodes):
            assert time.monotonic() < deadline, "signal channels did not open"
            time.sleep(0.2)
        started = time.monotonic()
        r = admin(t.admin_port, "preheat", "model:v1", "--all")
        assert r.returncode == 0, r.stderr
        deadline = started + 15

        def complete(n: Node) -> bool:
            return any(a["artifact_id"] == aid and a["state"] == "complete" for a in n.call_blocking("ls")["artifacts"])

        while not all(complete(n) for n in nodes):
            assert time.monotonic() < deadline, [n.process.log_tail(2000) for n in nodes]
            time.sleep(0.2)
        for n in nodes:
            assert cached_bytes(n, aid) == src.read_bytes()
        log = "".join(n.process.log_tail(20000) for n in nodes)
        assert log.count("preheat model:v1") >= 2
