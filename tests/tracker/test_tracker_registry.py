"""Registry unit tests with a fake clock: expiry, leave, holdings, peer selection, names."""

from __future__ import annotations

import random

import pytest

from p2pd.errors import ErrorCode
from p2pd.protocol import manifest as mf
from tests.tracker.tracker_testutil import make_manifest, nid
from tracker.registry import Bag, Registry, sample_union
from tracker.validate import TrackerError

A1 = "a" * 64
A2 = "b" * 64


def reg(interval: float = 1.0) -> Registry:
    return Registry(interval=interval, misses=3, rng=random.Random(7))


def add(r: Registry, i: int, now: float = 0.0, zone: str = "z1") -> str:
    r.register(nid(i), "10.0.0.1", 7000 + i, {"zone": zone}, "0.1.0", now)
    return nid(i)


def test_expiry_after_three_missed_intervals() -> None:
    r = reg(interval=1.0)
    a, b = add(r, 1), add(r, 2)
    for t in (1.0, 2.0):
        assert r.heartbeat(b, None, t)
    assert r.expire(2.99) == []
    assert r.expire(3.0) == []  # exactly 3 intervals silent: not yet
    assert r.expire(3.01) == [a]  # a missed three heartbeats
    assert a not in r.nodes and b in r.nodes
    assert r.expire(5.0) == []
    assert r.expire(5.01) == [b]
    assert not r.heartbeat(a, None, 6.0)  # unknown: must register again
    assert r.counters.expirations == 2 and r.counters.unknown_heartbeats == 1


def test_heartbeat_keeps_node_alive_and_expiry_is_in_last_seen_order() -> None:
    r = reg()
    ids = [add(r, i, now=0.0) for i in range(5)]
    for t in range(1, 20):
        for i in ids[1:]:
            r.heartbeat(i, None, float(t))
        gone = r.expire(float(t))
        if t < 4:
            assert gone == []
        elif t == 4:
            assert gone == [ids[0]]
    assert set(r.nodes) == set(ids[1:])
    assert r.next_expiry() == 19.0 + 3.0


def test_leave_removes_at_once_from_peer_lists() -> None:
    r = reg()
    a, b, c = add(r, 1), add(r, 2), add(r, 3)
    r.heartbeat(a, {A1: 1.0}, 0.5)
    r.heartbeat(b, {A1: 0.5}, 0.5)
    assert {p["node_id"] for p in r.peers(A1, c)} == {a, b}
    assert r.leave(a)
    assert [p["node_id"] for p in r.peers(A1, c)] == [b]
    assert not r.leave(a)
    assert r.evict(b)
    assert r.peers(A1, c) == []
    assert A1 not in r.artifacts  # no holder, no manifest: forgotten


def test_peer_list_order_complete_first_zone_preferred_bounded_and_excludes_requester() -> None:
    r = reg()
    me = add(r, 0, zone="z1")
    complete_same = [add(r, i, zone="z1") for i in range(1, 4)]
    complete_other = [add(r, i, zone="z2") for i in range(4, 7)]
    partial_same = [add(r, i, zone="z1") for i in range(7, 10)]
    for n in complete_same + complete_other:
        r.heartbeat(n, {A1: 1.0}, 0.1)
    for n in partial_same:
        r.heartbeat(n, {A1: 0.25}, 0.1)
    r.heartbeat(me, {A1: 0.1}, 0.1)
    got = r.peers(A1, me, 50)
    ids = [p["node_id"] for p in got]
    assert me not in ids
    assert set(ids[:3]) == set(complete_same)
    assert set(ids[3:6]) == set(complete_other)
    assert set(ids[6:]) == set(partial_same)
    assert all(p["progress"] == 1.0 for p in got[:6]) and all(p["progress"] == 0.25 for p in got[6:])
    assert got[0]["addr"][0] == "10.0.0.1"
    assert len(r.peers(A1, me, 4)) == 4
    assert set(p["node_id"] for p in r.peers(A1, me, 4)[:3]) == set(complete_same)
    assert r.peers(A1, me, 0) == []
    assert r.peers(A2, me, 10) == []


def test_peer_lists_are_shuffled_and_spread_load() -> None:
    r = reg()
    holders = [add(r, i) for i in range(1, 201)]
    for n in holders:
        r.heartbeat(n, {A1: 1.0}, 0.1)
    counts = dict.fromkeys(holders, 0)
    firsts = set()
    for _ in range(200):
        got = r.peers(A1, None, 10)
        assert len({p["node_id"] for p in got}) == 10
        firsts.add(got[0]["node_id"])
        for p in got:
            counts[p["node_id"]] += 1
    # 2000 picks over 200 holders: uniform sampling gives every holder some, none a big share
    assert min(counts.values()) >= 1 and max(counts.values()) <= 30
    assert len(firsts) > 50


def test_progress_changes_move_holders_between_groups() -> None:
    r = reg()
    a, b = add(r, 1), add(r, 2)
    r.heartbeat(a, {A1: 0.5, A2: 1.0}, 0.1)
    assert r.artifacts[A1].holder_count() == (0, 1)
    r.heartbeat(a, {A1: 1.0, A2: 1.0}, 0.2)
    assert r.artifacts[A1].holder_count() == (1, 0)
    r.heartbeat(a, {A1: 1.0}, 0.3)  # dropped A2 from its cache
    assert A2 not in r.artifacts
    assert r.peers(A1, b)[0]["progress"] == 1.0
    r.heartbeat(a, {}, 0.4)
    assert A1 not in r.artifacts and r.nodes[a].holdings is None


def test_register_again_keeps_holdings_and_moves_zone() -> None:
    r = reg()
    a = add(r, 1, zone="z1")
    r.heartbeat(a, {A1: 1.0}, 0.1)
    r.register(a, "10.0.0.9", 9000, {"zone": "z2"}, "0.2.0", 0.2)
    assert r.artifacts[A1].holders.keys() == {(True, "z2")}
    peer = r.peers(A1, None)[0]
    assert peer["addr"] == ["10.0.0.9", 9000]


def test_session_mismatch_is_unknown() -> None:
    r = reg()
    node = r.register(nid(1), "h", 1, {}, "", 0.0, session=42)
    assert r.heartbeat(node.node_id, None, 0.1, session=42)
    assert not r.heartbeat(node.node_id, None, 0.2, session=41)


def test_publish_resolve_tag_history_and_immutable_ids() -> None:
    r = reg()
    m1, m2 = make_manifest(1), make_manifest(2)
    id1 = r.publish("llama:v1", m1, wall=100.0)
    assert id1 == mf.artifact_id(mf.decode(m1))
    assert r.resolve("llama:v1") == (id1, m1)
    assert r.manifest(id1) == m1
    id2 = r.publish("llama:latest", m2, wall=101.0)
    r.publish("llama:latest", m2, wall=102.0)  # same target: no new history entry
    assert r.tag("llama:latest", id1, wall=103.0)  # move the tag back
    assert r.resolve("llama:latest")[0] == id1
    assert [h["artifact_id"] for h in r.history("llama:latest")] == [id2, id1]
    assert r.manifest(id2) == m2  # an id never changes or disappears when a tag moves
    with pytest.raises(TrackerError) as e:
        r.resolve("nope:v1")
    assert e.value.code is ErrorCode.NOT_FOUND
    with pytest.raises(TrackerError) as e:
        r.tag("x:y", "c" * 64, wall=1.0)
    assert e.value.code is ErrorCode.NOT_FOUND
    with pytest.raises(TrackerError) as e:
        r.publish("bad:manifest", b"\x93\x01\x02", wall=1.0)
    assert e.value.code is ErrorCode.BAD_REQUEST
    names = {a["artifact_id"]: a["names"] for a in r.artifact_list()}
    assert names[id1] == ["llama:latest", "llama:v1"] and names[id2] == []


def test_admin_views() -> None:
    r = reg()
    a = add(r, 1)
    aid = r.publish("m:v1", make_manifest(3), wall=1.0)
    r.heartbeat(a, {aid: 0.5}, 2.0)
    info = r.node_list(now=3.0)[0]
    assert info["node_id"] == a and info["holdings"] == 1 and info["last_seen_s"] == 1.0
    sw = r.swarm(aid)
    assert sw["partial"] == 1 and sw["holders"][0]["progress"] == 0.5
    st = r.stats()
    assert st["nodes"] == 1 and st["artifacts"] == 1 and st["heartbeats"] == 1


def test_labels_are_shared_between_nodes() -> None:
    r = reg()
    add(r, 1, zone="z9")
    add(r, 2, zone="z9")
    assert r.nodes[nid(1)].labels is r.nodes[nid(2)].labels


def test_bag_and_sample_union() -> None:
    rng = random.Random(1)
    b1, b2 = Bag(), Bag()
    for i in range(100):
        (b1 if i % 2 else b2).add(str(i))
    b1.discard("1")
    b1.discard("1")
    assert len(b1) == 49 and "1" not in b1 and "3" in b1
    got = sample_union([b1, b2], 20, "4", rng)
    assert len(set(got)) == 20 and "4" not in got and "1" not in got
    assert sorted(sample_union([b1, b2], 1000, "", rng), key=int) == sorted(b1.items + b2.items, key=int)
    assert sample_union([], 5, "", rng) == []
