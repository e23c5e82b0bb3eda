"""Tracker replicas sharing a real redis-server: nodes fail over, killing a replica loses nothing."""

from __future__ import annotations

import trio

from p2pd.cluster import LocalCluster
from p2pd.rpc import free_port
from p2pd.tracker_client import TrackerClient
from tests.tracker.tracker_testutil import make_manifest, nid, start_redis


async def test_kill_a_replica_mid_transfer_loses_nothing(cluster: LocalCluster) -> None:
    url = start_redis(cluster).url
    interval = 0.2
    a, b = (cluster.start_tracker(store=url, interval=interval, name=n) for n in ("a", "b"))
    trackers = [a.address, b.address]
    m = make_manifest(5)
    progress = 0.0
    async with (
        TrackerClient(trackers, nid(1), ("127.0.0.1", 9001), {"zone": "z"}) as seed,
        TrackerClient(trackers, nid(2), ("127.0.0.1", 9002), {"zone": "z"}) as leech,
        TrackerClient(list(reversed(trackers)), nid(3), ("127.0.0.1", 9003)) as watcher,
    ):
        aid = await seed.publish("model:v1", m)
        async with trio.open_nursery() as nursery:
            await nursery.start(seed.run_heartbeats, lambda: {aid: 1.0})
            await nursery.start(leech.run_heartbeats, lambda: {aid: progress})
            assert seed.current == trackers[0] and watcher.current == trackers[1]

            async def progress_seen() -> float:
                progress_of: dict[str, float] = {p["node_id"]: p["progress"] for p in await watcher.peers(aid)}
                return progress_of.get(nid(2), -1.0)

            # the "transfer": the leech's progress grows with every heartbeat
            for step in range(1, 6):
                progress = step / 10
                with trio.fail_after(3):
                    while await progress_seen() != progress:
                        await trio.sleep(0.02)
                if step == 2:
                    a.process.kill()  # SIGKILL the replica both nodes talk to
            # both nodes moved to replica b; nothing was lost: names, manifests, holders, sessions
            assert seed.current == trackers[1] and leech.current == trackers[1]
            assert await watcher.resolve("model:v1") == (aid, m)
            peers = {p["node_id"]: p["progress"] for p in await watcher.peers(aid)}
            assert peers == {nid(1): 1.0, nid(2): 0.5}
            # no node expired or re-registered during the failover (UDP heartbeats kept their session)
            udp_before = seed.udp_heartbeats
            await trio.sleep(4 * interval)
            assert seed.udp_heartbeats >= udp_before + 2  # back on UDP, at the new replica
            assert seed.registrations == 1 and leech.registrations == 1
            # a replica started now serves the same state at once (it holds none of its own)
            # async: the heartbeat tasks must keep running
            c = await cluster.start_tracker_async(store=url, interval=interval, port=free_port(), name="c")
            async with TrackerClient([c.address], nid(4), ("127.0.0.1", 9004)) as late:
                assert (await late.resolve("model:v1"))[0] == aid
                assert {p["node_id"] for p in await late.peers(aid)} == {nid(1), nid(2)}
            nursery.cancel_scope.cancel()
