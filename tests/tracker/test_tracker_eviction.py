"""Eviction timing with real processes: a tracker, node processes, SIGTERM (leave) and SIGKILL (crash)."""

from __future__ import annotations

import signal

import trio

from p2pd.cluster import LocalCluster
from p2pd.tracker_client import TrackerClient
from tests.tracker.tracker_testutil import nid, node_cmd

AID = "f" * 64


async def wait_listed(tc: TrackerClient, node: str, present: bool, timeout: float) -> float:
    """Poll peer lists every 10 ms until `node` is (or is not) in them; returns the time it took."""
    t0 = trio.current_time()
    with trio.fail_after(timeout):
        while (node in {p["node_id"] for p in await tc.peers(AID)}) != present:
            await trio.sleep(0.01)
    return trio.current_time() - t0


async def test_graceful_leave_under_1s_and_crash_within_3_intervals(cluster: LocalCluster) -> None:
    interval = 1.0  # the default
    trackers = [cluster.start_tracker(interval=interval).address]
    leaver = cluster.spawn(node_cmd(trackers, nid(1), {AID: 1.0}), "leaver")
    crasher = cluster.spawn(node_cmd(trackers, nid(2), {AID: 1.0}), "crasher")
    async with TrackerClient(trackers, nid(3), ("127.0.0.1", 9999)) as watcher:
        await wait_listed(watcher, nid(1), True, 15)
        await wait_listed(watcher, nid(2), True, 15)

        leaver.signal(signal.SIGTERM)
        gone_after = await wait_listed(watcher, nid(1), False, 5)
        assert leaver.wait(5) == 0 and "node left" in leaver.log_text()
        assert gone_after < 1.0, f"graceful leave took {gone_after:.3f}s"

        crasher.signal(signal.SIGKILL)
        crash_gone = await wait_listed(watcher, nid(2), False, 3 * interval + 2)
        # dropped after 3 missed heartbeats: at most 3 intervals after its last one + one sweep (interval/10)
        assert crash_gone <= 3 * interval + interval / 10 + 0.1, f"crashed node listed for {crash_gone:.3f}s"
    print(f"graceful leave gone after {gone_after * 1000:.0f} ms; crash gone after {crash_gone:.2f} s")
