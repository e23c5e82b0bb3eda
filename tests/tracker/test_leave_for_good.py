"""A node that said goodbye stays gone: its heartbeat loop, still running while the daemon says goodbye to its
peers, must not find the tracker "not knowing" it and register it again. Before the fix it did, and the tracker
listed the stopped node (peers dialled it and were refused, then held it back) until it expired."""

from __future__ import annotations

import pytest
import trio

from p2pd.tracker_client import TrackerClient
from tests.tracker.tracker_testutil import nid
from tracker.server import TrackerServer
from tracker.store import MemoryStore

INTERVAL = 0.1
AID = "e" * 64


async def listed(watcher: TrackerClient, node: str) -> bool:
    return node in {p["node_id"] for p in await watcher.peers(AID)}


@pytest.mark.parametrize("udp", [True, False])
async def test_no_heartbeat_registers_a_node_again_after_its_goodbye(udp: bool) -> None:
    srv = TrackerServer(MemoryStore(INTERVAL), stun=None)
    async with trio.open_nursery() as n:
        tcp, _ = await n.start(srv.serve, "127.0.0.1", 0, udp)
        trackers = [("127.0.0.1", tcp)]
        async with (
            TrackerClient(trackers, nid(1), ("127.0.0.1", 9001), udp=udp) as tc,
            TrackerClient(trackers, nid(2), ("127.0.0.1", 9002)) as watcher,
        ):
            await n.start(lambda task_status: tc.run_heartbeats(lambda: {AID: 0.5}, task_status=task_status))
            with trio.fail_after(5):
                while not await listed(watcher, nid(1)):
                    await trio.sleep(0.01)
            await tc.leave()
            assert not await listed(watcher, nid(1))
            registrations = tc.registrations
            await trio.sleep(10 * INTERVAL)  # ten heartbeats' time, the loop still running (as in a daemon's stop)
            assert tc.registrations == registrations
            assert not await listed(watcher, nid(1))
        n.cancel_scope.cancel()
