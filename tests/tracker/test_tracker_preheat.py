"""Preheat orders in the tracker: node selection, the order book (delivered once, failures recorded,
states for `preheat status`), both stores, and delivery through heartbeat replies (UDP flag, then TCP)
with and without global budgets (the share and the preheat flag share the UDP reply's tail)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import trio

from p2pd.cluster import LocalCluster
from p2pd.protocol.heartbeat import UdpReply
from p2pd.tracker_client import TrackerClient
from tests.tracker.tracker_testutil import make_manifest, nid, start_redis
from tracker.budgets import Budgets
from tracker.preheat import PreheatBook, select
from tracker.server import TrackerServer
from tracker.store import MemoryStore, Store

INTERVAL = 0.1
NODES = [
    {"node_id": nid(1), "labels": {"zone": "a"}},
    {"node_id": nid(2), "labels": {"zone": "a", "gpu": "h100"}},
    {"node_id": nid(3), "labels": {"zone": "b"}},
    {"node_id": nid(4), "labels": {}},
]


def test_select_by_zone_label_or_all_and_clear_errors() -> None:
    assert select(NODES, all_nodes=True) == ([nid(1), nid(2), nid(3), nid(4)], "all")
    assert select(NODES, zone="a") == ([nid(1), nid(2)], "zone=a")
    assert select(NODES, label=("gpu", "h100")) == ([nid(2)], "gpu=h100")
    assert select(NODES, label=("zone", "b")) == ([nid(3)], "zone=b")
    for kw, needle in [
        ({"zone": "c"}, "unknown zone 'c': no registered node has zone=c (known: a, b)"),
        ({"label": ("gpu", "a100")}, "unknown label gpu 'a100'"),
        ({"label": ("", "x")}, "needs a key"),
        ({}, "exactly one of"),
        ({"zone": "a", "all_nodes": True}, "exactly one of"),
    ]:
        with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            select(NODES, **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no node is registered"):
        select([], all_nodes=True)


def test_book_delivers_once_records_failures_and_reports_states() -> None:
    book = PreheatBook()
    o = book.add("m:v1", "a" * 64, [nid(1), nid(2), nid(3)], "all", now=100.0)
    o2 = book.add("n:v1", "b" * 64, [nid(1)], "zone=a", now=101.0)
    assert o.order_id != o2.order_id
    assert book.pending(nid(1)) and not book.pending(nid(4))
    assert [x["order"] for x in book.take(nid(1))] == [o.order_id, o2.order_id]
    assert book.take(nid(1)) == [] and not book.pending(nid(1))
    book.take(nid(2))
    assert book.fail(nid(2), o.order_id, "disk full")
    assert not book.fail(nid(4), o.order_id, "not chosen") and not book.fail(nid(2), "nope", "x")
    progress = {nid(1): 1.0, nid(2): 0.3}
    (st,) = book.status(lambda aid, n: progress.get(n) if aid == "a" * 64 else None, "m:v1")
    states = {r["node_id"]: (r["state"], r["error"]) for r in st["nodes"]}
    assert states == {nid(1): ("complete", None), nid(2): ("failed", "disk full"), nid(3): ("waiting", None)}
    assert (st["complete"], st["failed"], st["waiting"], st["fetching"]) == (1, 1, 1, 0)
    book.take(nid(3))
    (st,) = book.status(lambda aid, n: None, "m:v1")
    assert st["nodes"][2]["state"] == "fetching"
    assert [s["name"] for s in book.status(lambda aid, n: None)] == ["n:v1", "m:v1"]  # newest first
    again = PreheatBook.from_json(msgspec.json.decode(msgspec.json.encode(book.to_json())))
    assert again.status(lambda a, n: None) == book.status(lambda a, n: None)


async def test_stores_keep_orders(store: Store) -> None:
    o = await store.preheat_add("m:v1", "a" * 64, [nid(1), nid(2)], "all")
    await store.refresh()
    assert store.preheat_pending(nid(1)) and store.preheat_pending(nid(2)) and not store.preheat_pending(nid(3))
    assert await store.preheat_take(nid(1)) == [{"order": o.order_id, "name": "m:v1", "artifact_id": "a" * 64}]
    await store.refresh()
    assert not store.preheat_pending(nid(1)) and await store.preheat_take(nid(1)) == []
    assert await store.preheat_fail(nid(1), o.order_id, "boom")
    assert not await store.preheat_fail(nid(3), o.order_id, "not chosen")
    book = await store.preheat_book()
    assert book.failures == {o.order_id: {nid(1): "boom"}}
    assert book.undelivered == {nid(2): [o.order_id]}
    assert book.orders[o.order_id].nodes == [nid(1), nid(2)]


async def test_redis_replicas_share_orders(cluster: LocalCluster) -> None:
    from tracker.redis_store import RedisStore

    url = start_redis(cluster).url
    a = await RedisStore.connect(url, INTERVAL)
    b = await RedisStore.connect(url, INTERVAL)
    try:
        o = await a.preheat_add("m:v1", "a" * 64, [nid(1)], "all")
        await b.refresh()
        assert b.preheat_pending(nid(1))
        assert [x["order"] for x in await b.preheat_take(nid(1))] == [o.order_id]
        await a.refresh()
        assert not a.preheat_pending(nid(1)) and await a.preheat_take(nid(1)) == []
    finally:
        await a.aclose()
        await b.aclose()


@pytest.mark.parametrize("budgets", [False, True])
@pytest.mark.parametrize("udp", [True, False])
async def test_heartbeat_replies_deliver_orders_once(udp: bool, budgets: bool) -> None:
    store = MemoryStore(INTERVAL)
    srv = TrackerServer(store, stun=None)
    got: list[list[dict[str, Any]]] = []
    shares: list[Any] = []
    aid = await store.publish("m:v1", make_manifest())
    async with trio.open_nursery() as n:
        tcp, udp_port = await n.start(srv.serve, "127.0.0.1", 0, udp)
        async with TrackerClient([("127.0.0.1", tcp)], nid(1), ("127.0.0.1", 9001), {"zone": "z1"}, udp=udp) as tc:
            await n.start(
                lambda task_status: tc.run_heartbeats(
                    dict, on_share=shares.append, on_preheat=got.append, task_status=task_status
                )
            )
            if budgets:
                await store.set_budgets(Budgets(total=5e6))
            with trio.fail_after(5):
                while len(shares) < 3:
                    await trio.sleep(0.01)
            assert got == []  # nothing pending: no TCP round trip
            o = await store.preheat_add("m:v1", aid, [nid(1), nid(2)], "all")
            with trio.fail_after(5):
                while not got:
                    await trio.sleep(0.01)
            assert got == [[{"order": o.order_id, "name": "m:v1", "artifact_id": aid}]]
            assert not store.preheat_pending(nid(1)) and store.preheat_pending(nid(2))
            n_shares = len(shares)
            with trio.fail_after(5):
                while len(shares) < n_shares + 3:
                    await trio.sleep(0.01)
            assert len(got) == 1 and (shares[-1] is not None) == budgets  # delivered once; share intact
            assert (tc.udp_heartbeats > 0) == udp
            await tc.preheat_report(o.order_id, "disk full")  # what the daemon sends when its fetch fails
            assert store.preheat.failures == {o.order_id: {nid(1): "disk full"}}
        n.cancel_scope.cancel()


def test_udp_reply_without_preheat_decodes_as_before() -> None:
    enc = msgspec.msgpack.Encoder()
    old = msgspec.msgpack.decode(enc.encode([1, 7, True, 1.0, {}]), type=UdpReply)
    assert old.preheat is None and old.share is None
    new = msgspec.msgpack.decode(enc.encode([1, 7, True, 1.0, {}, None, True]), type=UdpReply)
    assert new.preheat is True and new.share is None
