"""The same behaviour from both stores: MemoryStore and RedisStore (a real redis-server per test)."""

from __future__ import annotations

import signal

import pytest
import trio

from p2pd.cluster import LocalCluster
from p2pd.errors import ErrorCode
from tests.tracker.tracker_testutil import make_manifest, nid, start_redis
from tracker.store import Heartbeat, Store
from tracker.validate import TrackerError

A1, A2 = "a" * 64, "b" * 64
INTERVAL = 0.1


async def add(store: Store, i: int, zone: str = "z1") -> tuple[str, int]:
    r = await store.register(nid(i), "10.0.0.1", 7000 + i, {"zone": zone}, "0.1.0")
    return nid(i), r.session


async def beat(store: Store, node: str, holdings: dict[str, float] | None, session: int | None = None) -> bool:
    (k,) = await store.heartbeat_many([Heartbeat(node, holdings, session)])
    return k


async def test_peer_order_zone_exclusion_and_bounds(store: Store) -> None:
    me, _ = await add(store, 0, "z1")
    same = [(await add(store, i, "z1"))[0] for i in range(1, 4)]
    other = [(await add(store, i, "z2"))[0] for i in range(4, 7)]
    partial = [(await add(store, i, "z1"))[0] for i in range(7, 9)]
    known = await store.heartbeat_many(
        [Heartbeat(n, {A1: 1.0}) for n in same + other]
        + [Heartbeat(n, {A1: 0.5}) for n in partial]
        + [Heartbeat(me, {A1: 0.0}), Heartbeat(nid(99), None)]
    )
    assert known == [True] * 9 + [False]
    got = await store.peers(A1, me, 50)
    ids = [p["node_id"] for p in got]
    assert set(ids[:3]) == set(same) and set(ids[3:6]) == set(other) and set(ids[6:]) == set(partial)
    assert me not in ids
    assert got[0]["addr"][0] == "10.0.0.1" and got[0]["progress"] == 1.0 and got[-1]["progress"] == 0.5
    assert len(await store.peers(A1, me, 2)) == 2
    assert await store.peers(A2, me, 10) == []
    assert len(await store.peers(A1, None, 50)) == 9  # requester unknown: everyone, incl. node 0 (progress 0)


async def test_holdings_delta_session_and_leave(store: Store) -> None:
    a, sa = await add(store, 1)
    b, _ = await add(store, 2)
    assert await beat(store, a, {A1: 0.5, A2: 1.0})
    assert await beat(store, a, None, sa)  # unchanged: holdings kept
    assert not await beat(store, a, None, sa + 1)  # wrong session: unknown
    assert [p["progress"] for p in await store.peers(A1, b, 5)] == [0.5]
    assert await beat(store, a, {A1: 1.0, A2: 1.0})
    assert [p["progress"] for p in await store.peers(A1, b, 5)] == [1.0]
    assert [p["node_id"] for p in await store.peers(A2, b, 5)] == [a]
    assert await beat(store, a, {A1: 1.0})
    assert await store.peers(A2, b, 5) == []
    assert await store.leave(a)
    assert not await store.leave(a)
    assert await store.peers(A1, b, 5) == []
    assert not await beat(store, a, None, sa)
    c, _ = await add(store, 3)
    await beat(store, c, {A1: 1.0})
    assert await store.evict(c)
    assert await store.peers(A1, b, 5) == []
    st = await store.stats()
    assert st["nodes"] == 1 and st["leaves"] == 1 and st["evictions"] == 1


async def test_expiry_after_three_intervals(store: Store) -> None:
    a, _ = await add(store, 1)
    b, _ = await add(store, 2)
    await beat(store, a, {A1: 1.0})
    for _ in range(5):  # b heartbeats, a falls silent
        await trio.sleep(INTERVAL)
        assert await beat(store, b, None)
        gone = await store.expire()
        if a in gone:
            break
    assert a in gone and b not in gone
    assert await store.peers(A1, b, 5) == []
    assert [n["node_id"] for n in await store.node_list(100)] == [b]


async def test_names_tags_history(store: Store) -> None:
    m1, m2 = make_manifest(1), make_manifest(2)
    id1 = await store.publish("llama:v1", m1)
    id2 = await store.publish("llama:v1", m2)  # moving a tag by publishing again
    assert await store.resolve("llama:v1") == (id2, m2)
    assert await store.manifest(id1) == m1  # ids never change or vanish
    assert await store.tag("llama:v1", id1)
    assert not await store.tag("llama:v1", id1)
    assert [h["artifact_id"] for h in await store.history("llama:v1")] == [id1, id2, id1]
    for coro in (store.resolve("x:y"), store.manifest("c" * 64), store.tag("x:y", "c" * 64)):
        with pytest.raises(TrackerError) as e:
            await coro
        assert e.value.code is ErrorCode.NOT_FOUND
    with pytest.raises(TrackerError) as e:
        await store.publish("x:y", b"junk")
    assert e.value.code is ErrorCode.BAD_REQUEST


async def test_admin_views(store: Store) -> None:
    a, _ = await add(store, 1, "z7")
    aid = await store.publish("m:v1", make_manifest(3))
    await beat(store, a, {aid: 0.25, A2: 1.0})
    (node,) = await store.node_list(10)
    assert node["node_id"] == a and node["labels"] == {"zone": "z7"} and node["holdings"] == 2
    arts = {x["artifact_id"]: x for x in await store.artifact_list()}
    assert arts[aid]["names"] == ["m:v1"] and arts[aid]["partial"] == 1 and arts[aid]["size"] == 3 << 20
    assert arts[A2]["complete"] == 1 and not arts[A2]["has_manifest"]
    sw = await store.swarm(aid)
    assert sw["holders"] == [{"node_id": a, "addr": ["10.0.0.1", 7001], "zone": "z7", "progress": 0.25}]
    st = await store.stats()
    assert st["nodes"] == 1 and st["publishes"] == 1 and st["heartbeats"] >= 1
    with pytest.raises(TrackerError):
        await store.swarm("c" * 64)


async def test_policy_is_shared_and_survives_refresh(store: Store) -> None:
    assert await store.policy() == {}
    await store.set_policy({"egress_limit": 5e7})
    await store.refresh()  # a Redis replica re-reads it every interval
    assert await store.policy() == {"egress_limit": 5e7}


async def test_redis_flushed_scripts_are_reloaded_and_a_dead_redis_is_unreachable(cluster: LocalCluster) -> None:
    from tracker.redis_store import RedisStore

    redis = start_redis(cluster)
    s = await RedisStore.connect(redis.url, INTERVAL)
    try:
        await add(s, 1)
        await s.redis.execute("SCRIPT", "FLUSH")  # as after a Redis restart: the next call gets NOSCRIPT
        await add(s, 2)  # reloaded on that reply's code, not reported as an internal error
        redis.process.signal(signal.SIGKILL)
        with pytest.raises(TrackerError) as e:
            await add(s, 3)
        assert e.value.code is ErrorCode.UNREACHABLE  # nodes try another replica on it
    finally:
        await s.aclose()


async def test_node_info_is_what_signalling_checks(store: Store) -> None:
    a, sa = await add(store, 1)
    assert await store.node_info(a) == ("10.0.0.1", 7001, sa)
    assert await store.node_info(nid(42)) is None
    assert await store.leave(a)
    assert await store.node_info(a) is None


async def test_cluster_view_counts_every_node_lists_bounded_rows_swarms_and_use(store: Store) -> None:
    """The cluster page's data (GET /v1/cluster) from either store: every node counted by zone, `rows` listed,
    the artifact's holders with progress, and use summed from the demand reports (gone when a node leaves)."""
    aid = await store.publish("m:v1", make_manifest(1))
    nodes = [(await add(store, i, "z1" if i < 3 else "z2"))[0] for i in range(5)]
    await store.heartbeat_many(
        [
            Heartbeat(n, {aid: 1.0 if i % 2 else 0.5}, demand=(1e6, 0.0, 1000.0 * (i + 1), 10.0))
            for i, n in enumerate(nodes)
        ]
    )
    await store.refresh()
    v = await store.cluster_view(2)
    assert v["nodes"]["total"] == 5 and len(v["nodes"]["rows"]) == 2
    assert [(z["zone"], z["nodes"], z["ok"], z["nat"]) for z in v["nodes"]["zones"]] == [
        ("z1", 3, 3, {"unknown": 3}),
        ("z2", 2, 2, {"unknown": 2}),
    ]
    row = v["nodes"]["rows"][0]
    assert row["health"] == "ok" and row["reached"].startswith("direct or relay") and row["holdings"] == 1
    (art,) = v["artifacts"]
    assert art["artifact_id"] == aid and art["names"] == ["m:v1"] and (art["complete"], art["partial"]) == (2, 3)
    assert sorted(h["progress"] for h in art["holders"]) == [0.5, 0.5, 0.5, 1.0, 1.0]
    assert v["budgets"]["use"]["total"] == 15000.0
    assert v["budgets"]["use"]["zones"] == {"z1": 6000.0, "z2": 9000.0}
    assert v["budgets"]["budgets"]["total"] is None and not v["budgets"]["active"]
    assert await store.use_totals() == (15000.0, 50.0)
    assert await store.leave(nodes[4])
    assert await store.use_totals() == (10000.0, 40.0)
