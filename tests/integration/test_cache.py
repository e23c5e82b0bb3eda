"""A node with --cache-max fetching artifact after artifact: never over the cap by more than a piece, evicts
only unpinned idle ones, the tracker stops listing it as a holder at once; `p2pd ls/rm/pin/unpin`.

Scaled from issue #16's 1 GiB cap and five 300 MiB artifacts to 100 MiB and 30 MiB (the same ratios).
"""

from __future__ import annotations

import json
import os
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from p2pd.cluster import HOST, LocalCluster
from p2pd.errors import ErrorCode
from p2pd.protocol.manifest import choose_piece_size
from p2pd.rpc import RpcError

MiB = 1 << 20
CAP = 100 * MiB
SIZE = 30 * MiB
TOKEN = "cache-test-token"


def stored_bytes(data_dir: Path) -> int:
    """Bytes of files in the node's cache and staging dirs (what --cache-max caps)."""
    total = 0
    for sub in ("cache", "staging"):
        for root, _dirs, files in os.walk(data_dir / sub):
            for f in files:
                try:
                    total += os.stat(os.path.join(root, f)).st_size
                except FileNotFoundError:
                    pass  # renamed or deleted while we looked
    return total


class Sampler(threading.Thread):
    """The largest cache size seen, sampled every 20 ms while the fetches run."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(daemon=True)
        self.data_dir = data_dir
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            self.peak = max(self.peak, stored_bytes(self.data_dir))


def holders(admin_port: int, aid: str) -> set[str]:
    req = urllib.request.Request(
        f"http://{HOST}:{admin_port}/v1/swarm?artifact_id={aid}", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return {h["node_id"] for h in json.loads(r.read())["holders"]}


def cli_json(c: LocalCluster, node: Any, *args: str) -> Any:
    r = c.cli(node, *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_cache_cap_evicts_least_recently_used_idle_artifacts_and_the_tracker_learns(tmp_path: Path) -> None:
    with LocalCluster(tmp_path / "c") as c:
        t = c.start_tracker("--admin-listen", f"{HOST}:0", "--admin-token", TOKEN, interval=0.5)
        assert t.admin_port
        seed = c.start_node("seed")
        node = c.start_node("node", "--cache-max", "100MiB")
        node_id = node.call_blocking("status")["node_id"]
        ids = []
        for k in range(5):
            f = tmp_path / f"m{k}.bin"
            f.write_bytes(os.urandom(SIZE))
            ids.append(c.publish(seed, f, f"m{k}:v1"))

        sampler = Sampler(node.data_dir)
        sampler.start()
        try:
            for k in range(5):
                c.fetch(node, f"m{k}:v1")
                assert node_id in holders(t.admin_port, ids[k])
                if k == 0:
                    assert c.cli(node, "pin", "m0:v1").returncode == 0
                if k == 1:  # what the Ray plugin does for its workers
                    node.call_blocking("lease", {"ref": ids[1], "holder": "ray-job-7", "ttl": 600})
                if k == 3:  # m2 made room for m3 (90 + 30 > 100): gone from the tracker already
                    assert node_id not in holders(t.admin_port, ids[2])
        finally:
            sampler.done.set()
            sampler.join()

        assert sampler.peak <= CAP + choose_piece_size(SIZE), sampler.peak
        listed = cli_json(c, node, "ls")
        by_id = {a["artifact_id"]: a for a in listed["artifacts"]}
        assert set(by_id) == {ids[0], ids[1], ids[4]}  # m2 and m3 evicted; pinned m0, leased m1 kept
        assert by_id[ids[0]]["pinned"] and by_id[ids[1]]["leased_by"] == ["ray-job-7"]
        assert all(a["seeding"] and a["in_cache"] and a["last_used"] for a in by_id.values())
        assert listed["evictions"] == 2 and listed["cache_bytes"] == 3 * SIZE and listed["cache_max"] == CAP
        for gone in ids[2:4]:
            assert node_id not in holders(t.admin_port, gone)
            assert not (node.data_dir / "cache" / gone).exists()
        assert stored_bytes(node.data_dir) == 3 * SIZE

        # rm refuses what is pinned or leased unless forced; unpin makes it removable
        r = c.cli(node, "rm", "m0:v1")
        assert r.returncode != 0 and b"pinned" in r.stderr
        assert c.cli(node, "unpin", "m0:v1").returncode == 0
        r = c.cli(node, "rm", ids[0][:10])
        assert r.returncode == 0, r.stderr
        r = c.cli(node, "rm", "m1:v1")
        assert r.returncode != 0 and b"leased by ray-job-7" in r.stderr
        assert c.cli(node, "rm", "m1:v1", "--force").returncode == 0
        assert node_id not in holders(t.admin_port, ids[0]) and node_id not in holders(t.admin_port, ids[1])
        assert {a["artifact_id"] for a in cli_json(c, node, "ls")["artifacts"]} == {ids[4]}
        r = c.cli(node, "rm", "nothing:here")
        assert r.returncode == 3 and b"not on this node" in r.stderr  # NOT_FOUND's exit status

        # a published artifact is only forgotten, never deleted
        assert c.cli(seed, "rm", "m4:v1").returncode == 0
        assert (tmp_path / "m4.bin").exists()
        # and the node fetches it back from... nobody but itself now: it still has m4
        assert ids[4] in {a["artifact_id"] for a in cli_json(c, node, "ls")["artifacts"]}


def test_a_download_that_cannot_fit_under_the_cap_says_so(tmp_path: Path) -> None:
    with LocalCluster(tmp_path / "c") as c:
        c.start_tracker(interval=0.5)
        seed = c.start_node("seed")
        node = c.start_node("node", "--cache-max", "40MiB")
        for k in range(2):
            f = tmp_path / f"m{k}.bin"
            f.write_bytes(os.urandom(SIZE))
            c.publish(seed, f, f"m{k}:v1")
        with pytest.raises(RpcError) as e:  # a lease that is not one is refused before anything happens
            node.call_blocking("fetch", {"name": "m0:v1", "lease": {"holder": "", "ttl": 60}})
        assert e.value.code == ErrorCode.BAD_REQUEST and "holder" in e.value.message
        # what the Ray plugin does: the fetch leases what it hands over
        node.call_blocking("fetch", {"name": "m0:v1", "lease": {"holder": "ray-agent", "ttl": 600}}, timeout=120)
        assert cli_json(c, node, "ls")["artifacts"][0]["leased_by"] == ["ray-agent"]
        r = c.cli(node, "fetch", "m1:v1")
        assert r.returncode == 5, r.stderr  # DISK_FULL's exit status
        msg = r.stderr.decode()
        assert "no room in the cache" in msg and "m0:v1: leased" in msg and msg.count("\n") == 1
        node.call_blocking("lease", {"ref": "m0:v1", "holder": "ray-agent", "release": True})
        c.fetch(node, "m1:v1")  # m0 may go now
        assert [a["name"] for a in cli_json(c, node, "ls")["artifacts"]] == ["m1:v1"]
