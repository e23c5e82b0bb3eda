"""The local-cluster harness itself (p2pd/cluster.py): readiness, stop/kill/restart, failures, cleanup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from p2pd.cluster import ClusterError, LocalCluster, Process


def gone(pid: int) -> bool:
    """The PID is no process any more, or only a zombie waiting for its new parent to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def test_nodes_answer_stop_kill_restart_and_close_leaves_nothing() -> None:
    with LocalCluster() as c:
        work = c.work
        t = c.start_tracker(interval=0.5)
        a, b = c.start_nodes(["a", "b"], "--egress-limit", "10MB/s")
        assert a.argv[a.argv.index("--tracker") + 1] == t.addr and "--egress-limit" in b.argv
        assert a.call_blocking("status")["node_id"] != b.call_blocking("status")["node_id"]
        assert a.socket == work / "a" / "p2pd.sock" and a.log_path == work / "a.log"

        assert c.stop_node(a) == 0  # SIGTERM: a graceful stop
        assert "goodbye" in a.log_text()
        first_run = a.process
        c.restart_node(a)
        assert a.process is not first_run and a.call_blocking("status")
        assert "goodbye" not in a.process.log_text() and "goodbye" in a.log_text()  # this run vs the node's log
        with pytest.raises(ClusterError, match="still running"):
            c.restart_node(a)

        assert c.kill_node(b) == -signal.SIGKILL
        b.process.signal(signal.SIGTERM)  # a reaped process is never signalled (its PID may be reused)
        helper = c.spawn([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(600)"], "helper")
        a.process.signal(signal.SIGSTOP)  # close() must also end a stopped process
        pids = [p.pid for p in c.processes]
    assert all(gone(pid) for pid in pids)
    assert helper.returncode == -signal.SIGTERM
    assert not work.exists()  # the cluster made it, so the cluster removed it


def test_a_given_work_dir_is_kept_and_nodes_reach_every_tracker(tmp_path: Path) -> None:
    with LocalCluster(tmp_path) as c:
        t1 = c.start_tracker(name="t1")
        t2 = c.start_tracker(name="t2")
        t1.process.stop()
        c.start_tracker(port=t1.port, name="t1-again")  # a restart on its port: one address, listed once
    assert c.tracker_addrs() == f"{t1.addr},{t2.addr}"
    assert (tmp_path / "t1.log").exists()


def test_a_node_that_exits_fails_the_wait_at_once_naming_its_log(tmp_path: Path) -> None:
    with LocalCluster(tmp_path) as c:
        with pytest.raises(ClusterError, match="no tracker yet"):
            c.spawn_node("early")
        c.start_tracker()
        t0 = time.monotonic()
        with pytest.raises(ClusterError) as ei:
            c.start_node("bad", "--egress-limit", "fast please", timeout=60)
        assert time.monotonic() - t0 < 20  # not the 60 s timeout: the exit is noticed
        assert "bad exited with code" in ei.value.message and str(tmp_path / "bad.log") in ei.value.message
        assert "fast please" in ei.value.log_tail  # the daemon's own error, from its log


async def test_trio_flavour_publish_fetch_and_control_api(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 << 20))
    with LocalCluster(tmp_path / "work") as c:
        await c.start_tracker_async()
        seed, leech = await c.start_nodes_async(["seed", "leech"])
        aid = await c.publish_async(seed, src, "blob:v1")
        path = await c.fetch_async(leech, "blob:v1")
        assert path.read_bytes() == src.read_bytes()
        art = await leech.artifact(aid)
        assert art is not None and art["state"] == "complete"
        assert await leech.artifact("0" * 64) is None
        with pytest.raises(ClusterError, match="p2pd fetch on leech failed"):
            await c.fetch_async(leech, "missing:v1")
        r = await c.cli_async(leech, "status")
        assert r.returncode == 0


def test_children_die_with_a_killed_parent(tmp_path: Path) -> None:
    """A caller killed with -9 (no finally, no close) leaves no tracker or daemon behind."""
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from p2pd.cluster import LocalCluster
        c = LocalCluster(Path({str(tmp_path)!r}))
        t = c.start_tracker()
        n = c.start_node("n")
        print(t.process.pid, n.process.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pids = [int(x) for x in parent.stdout.readline().split()]
        assert len(pids) == 2 and not any(gone(p) for p in pids)
    finally:
        parent.kill()
        parent.wait(10)
    deadline = time.monotonic() + 15
    try:
        while not all(gone(p) for p in pids):
            assert time.monotonic() < deadline, f"children {pids} outlived their parent"
            time.sleep(0.05)
    finally:
        for p in pids:  # the orphans of a failed check: ours to end
            if not gone(p):
                os.kill(p, signal.SIGKILL)


def test_process_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    with LocalCluster(tmp_path) as c:
        stubborn = c.spawn(
            [
                sys.executable,
                "-c",
                "import signal, time\n"
                "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\n"
                "time.sleep(600)",
            ],
            "stubborn",
        )
        deadline = time.monotonic() + 15
        while "ready" not in stubborn.log_text():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert isinstance(stubborn, Process)
        assert stubborn.stop(grace=0.5) == -signal.SIGKILL
