"""Global budgets in the tracker: both stores split them by reported demand, heartbeat replies (UDP and
TCP) carry each node's share, a node keeps its last share through a tracker outage for a grace period,
and the admin API / CLI set, show and clear them with clear errors for bad input."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pd.cluster import LocalCluster
from p2pd.tracker_client import TrackerClient
from tests.tracker.tracker_testutil import nid, start_redis
from tracker.budgets import IDLE_DEMAND, OVERCOMMIT, RAMP_PROGRESS, Budgets
from tracker.server import TrackerServer
from tracker.store import Heartbeat, MemoryStore, Store

INTERVAL = 0.1
BIG = 2.0**60


async def test_shares_follow_demand_within_the_budgets(store: Store) -> None:
    ids = []
    for i, zone in enumerate(["a", "a", "b"]):
        await store.register(nid(i), "10.0.0.1", 7000 + i, {"zone": zone}, "0.1.0")
        ids.append(nid(i))
    assert store.share_of(ids[0]) is None  # no budget: replies carry no share
    assert await store.known_zones() == {"a", "b"}
    # node 0 needs little, 1 and 2 want everything they can get
    demands = [(10.0, 0.0, 8.0, 0.0), (BIG, 0.0, 400.0, 0.0), (BIG, 0.0, 500.0, 0.0)]
    await store.heartbeat_many([Heartbeat(n, None, demand=d) for n, d in zip(ids, demands, strict=True)])
    await store.set_budgets(Budgets(total=1000.0, zones={"a": 300.0}))
    shares = [store.share_of(n) for n in ids]
    assert shares[0] == [pytest.approx(10.0), None]
    assert shares[1] == [pytest.approx(290.0), None]  # zone a: 300 - 10
    assert shares[2] == [pytest.approx(700.0), None]  # the rest of the total
    view = await store.throttle_view()
    assert view["active"] and not view["paused"] and view["budgets"]["total"] == 1000.0
    assert view["use"]["total"] == pytest.approx(908.0) and view["use"]["zones"]["a"] == pytest.approx(408.0)
    assert {n["node_id"]: n["share"] for n in view["nodes"]} == {
        ids[0]: pytest.approx(10.0),
        ids[1]: pytest.approx(290.0),
        ids[2]: pytest.approx(700.0),
    }
    # a change is split at once; the next heartbeat carries it
    await store.set_budgets(Budgets(total=0.0))
    assert [store.share_of(n) for n in ids] == [[0.0, None]] * 3
    assert (await store.throttle_view())["paused"]
    # a node registered since the last split gets nothing until the next one (the sums must hold)
    await store.register(nid(9), "10.0.0.1", 7009, {}, "0.1.0")
    await store.set_budgets(Budgets(total=100.0, cross_zone=10.0))
    assert store.share_of(nid(9)) is not None
    await store.refresh()
    assert sum((store.share_of(n) or [0.0])[0] or 0.0 for n in [*ids, nid(9)]) <= 100.0 + 1e-6
    await store.set_budgets(Budgets())
    assert store.share_of(ids[0]) is None and not (await store.throttle_view())["active"]


async def test_an_increase_is_sent_only_once_the_decrease_making_room_was(store: Store) -> None:
    """Heartbeats out of phase: the seed held the whole budget and now should shrink while two leechers grow.
    A leecher beating before the seed must not get its larger share yet: the sum of the shares nodes hold
    would exceed the budget (by more than the overcommit) until the seed's next heartbeat (ShareLedger)."""
    seed, l1, l2 = nid(0), nid(1), nid(2)
    for i, n in enumerate([seed, l1, l2]):
        await store.register(n, "10.0.0.1", 7000 + i, {}, "0.1.0")
    await store.heartbeat_many([Heartbeat(seed, None, demand=(BIG, 0.0, 90.0, 0.0))])
    await store.set_budgets(Budgets(total=100.0))
    assert [store.share_of(n) for n in (seed, l1, l2)] == [[pytest.approx(100.0), None], [0.0, None], [0.0, None]]
    demand = (30.0, 0.0, 0.0, 0.0)
    await store.heartbeat_many([Heartbeat(n, None, demand=demand) for n in (l1, l2)])
    await store.heartbeat_many([Heartbeat(seed, None, demand=(40.0, 0.0, 90.0, 0.0))])
    await store.refresh()  # the split: 40 / 30 / 30
    assert store.share_of(l1) == [pytest.approx(100.0 * OVERCOMMIT), None]  # the seed still holds all 100
    assert store.share_of(seed) == [pytest.approx(40.0), None]
    assert store.share_of(l1) == [pytest.approx(30.0), None]
    assert store.share_of(l2) == [pytest.approx(30.0), None]
    await store.set_budgets(Budgets())


async def test_a_seed_is_weighted_by_the_fetchers_of_what_it_holds(store: Store) -> None:
    """Both stores know who holds an artifact complete and who is still fetching it: with 1 seed and
    4 fetchers all asking for everything, the seed's share is SEED_MARGIN x budget/4, not budget/5 (seed_weight)."""
    aid = "ab" * 32
    ids = [nid(i) for i in range(5)]
    for i, n in enumerate(ids):
        await store.register(n, "10.0.0.1", 7000 + i, {}, "0.1.0")
    hungry = (BIG, 0.0, 8.0, 0.0)
    beats = [Heartbeat(ids[0], {aid: 1.0}, demand=hungry)]
    beats += [Heartbeat(n, {aid: 0.5}, demand=hungry) for n in ids[1:]]
    await store.heartbeat_many(beats)
    await store.set_budgets(Budgets(total=40.0))
    assert store.share_of(ids[0]) == [pytest.approx(11.0), None]
    assert [store.share_of(n) for n in ids[1:]] == [[pytest.approx(7.25), None]] * 4
    await store.set_budgets(Budgets())


async def test_a_swarm_asks_for_all_from_the_first_split(store: Store) -> None:
    """At the start of a transfer the seed and the fetchers report a second in which they had little or
    nothing to send; the split must not cut them to that, since the fetchers pass on every piece they get
    at once and the seed has them all: the first split is the one the swarm settles to, seed 1.1 x budget/4,
    fetchers 7.25 (passes_on, SEED_MARGIN). A single fetcher has nobody to pass pieces to: its own demand stands, as
    does a fetcher's past the start (RAMP_PROGRESS), so one that runs dry hands its share back."""
    aid, other = "ab" * 32, "cd" * 32
    ids = [nid(i) for i in range(6)]
    for i, n in enumerate(ids):
        await store.register(n, "10.0.0.1", 7000 + i, {}, "0.1.0")
    idle = (0.5, 0.0, 0.0, 0.0)
    beats = [Heartbeat(ids[0], {aid: 1.0, other: 1.0}, demand=(2.0, 0.0, 1.9, 0.0))]
    beats += [Heartbeat(n, {aid: 0.01}, demand=idle) for n in ids[1:5]]
    beats += [Heartbeat(ids[5], {other: 0.01}, demand=idle)]  # alone on `other`: a fetcher, not a source
    await store.heartbeat_many(beats)
    await store.set_budgets(Budgets(total=40.5))
    assert store.share_of(ids[5]) == [pytest.approx(0.5), None]
    assert store.share_of(ids[0]) == [pytest.approx(11.0), None]
    assert [store.share_of(n) for n in ids[1:5]] == [[pytest.approx(7.25), None]] * 4
    # past the start a fetcher's own report counts again; a complete holder still asks for all
    await store.heartbeat_many([Heartbeat(ids[1], {aid: RAMP_PROGRESS}, demand=idle)])
    await store.refresh()
    demands = {n["node_id"]: n["demand"] for n in (await store.throttle_view())["nodes"]}
    assert demands[ids[1]] == pytest.approx(0.5) and demands[ids[2]] == BIG and demands[ids[0]] == BIG
    await store.set_budgets(Budgets())


async def test_the_last_fetcher_hands_its_share_to_the_complete_holders(store: Store) -> None:
    """The end game: once every other fetcher of an artifact is complete, nobody can want the last fetcher's
    pieces, so its report (all it can get: it was passing pieces on a second ago) no longer counts; its
    demand is IDLE_DEMAND and the complete holders, who send it its last pieces, share the rest. A node
    with a complete copy keeps its report, and so does the fetcher once another node fetches the artifact."""
    aid, other = "ab" * 32, "cd" * 32
    ids = [nid(i) for i in range(6)]
    for i, n in enumerate(ids):
        await store.register(n, "10.0.0.1", 7000 + i, {}, "0.1.0")
    hungry = (BIG, 0.0, 0.9e6, 0.0)
    beats = [Heartbeat(n, {aid: 1.0}, demand=hungry) for n in ids[:4]]  # the seed and 3 completed fetchers
    beats += [Heartbeat(ids[4], {aid: 0.93}, demand=hungry)]  # the last fetcher
    beats += [Heartbeat(ids[5], {other: 1.0}, demand=(3e5, 0.0, 2.8e5, 0.0))]  # nobody fetches `other`
    await store.heartbeat_many(beats)
    await store.set_budgets(Budgets(total=5e6))
    demands = {n["node_id"]: n["demand"] for n in (await store.throttle_view())["nodes"]}
    assert demands[ids[4]] == pytest.approx(IDLE_DEMAND) and demands[ids[5]] == pytest.approx(3e5)
    assert store.share_of(ids[4]) == [pytest.approx(IDLE_DEMAND), None]
    assert [store.share_of(n) for n in ids[:4]] == [[pytest.approx((4.7e6 - IDLE_DEMAND) / 4), None]] * 4
    # another node starts fetching the artifact: the last fetcher's pieces are wanted again
    await store.heartbeat_many([Heartbeat(ids[5], {other: 1.0, aid: 0.0}, demand=(3e5, 0.0, 2.8e5, 0.0))])
    await store.refresh()
    demands = {n["node_id"]: n["demand"] for n in (await store.throttle_view())["nodes"]}
    assert demands[ids[4]] == BIG
    await store.heartbeat_many([Heartbeat(ids[5], {other: 1.0}, demand=(3e5, 0.0, 2.8e5, 0.0))])
    await store.refresh()
    demands = {n["node_id"]: n["demand"] for n in (await store.throttle_view())["nodes"]}
    assert demands[ids[4]] == pytest.approx(IDLE_DEMAND)
    await store.set_budgets(Budgets())


async def test_redis_replicas_hand_out_the_same_shares(cluster: LocalCluster) -> None:
    from tracker.redis_store import RedisStore

    url = start_redis(cluster).url
    a = await RedisStore.connect(url, INTERVAL)
    b = await RedisStore.connect(url, INTERVAL)
    try:
        for i in range(3):
            await a.register(nid(i), "10.0.0.1", 7000 + i, {"zone": "z"}, "0.1.0")
        await a.heartbeat_many([Heartbeat(nid(0), None, demand=(5.0, 0.0, 5.0, 0.0))])
        await b.heartbeat_many([Heartbeat(nid(1), None, demand=(BIG, 0.0, 50.0, 0.0))])
        await a.set_budgets(Budgets(total=100.0))
        await b.refresh()  # every replica reads the budgets once per interval
        assert (await b.budgets()).total == 100.0
        for i in range(3):
            assert a.share_of(nid(i)) == b.share_of(nid(i))
        assert b.share_of(nid(0)) == [pytest.approx(5.0), None]
    finally:
        await a.aclose()
        await b.aclose()


@pytest.mark.parametrize("udp", [True, False])
async def test_heartbeat_replies_carry_the_share_and_nodes_report_demand(udp: bool) -> None:
    store = MemoryStore(INTERVAL)
    srv = TrackerServer(store, stun=None)
    shares: list[Any] = []
    async with trio.open_nursery() as n:
        tcp, _ = await n.start(srv.serve, "127.0.0.1", 0, udp)
        async with TrackerClient([("127.0.0.1", tcp)], nid(1), ("127.0.0.1", 9001), {"zone": "z1"}, udp=udp) as tc:
            await n.start(
                lambda task_status: tc.run_heartbeats(
                    dict, on_share=shares.append, get_demand=lambda: [BIG, 0.0, 1234.0, 0.0], task_status=task_status
                )
            )
            with trio.fail_after(5):
                while not shares:
                    await trio.sleep(0.01)
            assert shares[-1] is None  # no budget yet
            await store.set_budgets(Budgets(total=5e6, cross_zone=1e6))
            with trio.fail_after(5):
                while store.reg.nodes[nid(1)].demand is None or shares[-1] in (None, [0.0, 0.0]):
                    await trio.sleep(0.01)
                    await store.refresh()
            assert store.reg.nodes[nid(1)].demand == (BIG, 0.0, 1234.0, 0.0)
            assert shares[-1] == [5e6, 1e6]
            assert (tc.udp_heartbeats > 0) == udp
            await store.set_budgets(Budgets())
            with trio.fail_after(5):
                while shares[-1] is not None:
                    await trio.sleep(0.01)
        n.cancel_scope.cancel()


async def test_a_vanished_tracker_leaves_the_last_share_for_the_grace_period() -> None:
    store = MemoryStore(INTERVAL)
    srv = TrackerServer(store, stun=None)
    shares: list[tuple[float, Any]] = []
    await store.set_budgets(Budgets(total=1e6))
    async with trio.open_nursery() as outer:
        server_scope = trio.CancelScope()

        async def serve(task_status: trio.TaskStatus[tuple[int, int | None]]) -> None:
            with server_scope:
                await srv.serve("127.0.0.1", 0, task_status=task_status)

        tcp, _ = await outer.start(serve)
        async with TrackerClient(
            [("127.0.0.1", tcp)], nid(1), ("127.0.0.1", 9001), call_timeout=0.3, connect_timeout=0.2
        ) as tc:

            def on_share(s: Any) -> None:
                shares.append((trio.current_time(), s))

            await outer.start(
                lambda task_status: tc.run_heartbeats(
                    dict, on_share=on_share, get_demand=lambda: [BIG, 0, 0, 0], share_grace=1.5, task_status=task_status
                )
            )
            with trio.fail_after(5):
                while not shares or shares[-1][1] != [1e6, None]:
                    await trio.sleep(0.02)
                    await store.refresh()
            server_scope.cancel()
            gone = trio.current_time()
            with trio.fail_after(10):
                while shares[-1][1] is not None:
                    await trio.sleep(0.05)
            # on the last share through the grace period, then own limits
            assert shares[-1][0] - gone >= 1.5
            assert all(s == [1e6, None] for t, s in shares[:-1] if t >= gone)
        outer.cancel_scope.cancel()


# ---- admin API and CLI, against a real tracker process ------------------------------------------------

TOKEN = "budget-token"


@pytest.fixture(scope="module")
def admin() -> Iterator[dict[str, Any]]:
    pytest.importorskip("fastapi")
    tmp = tempfile.TemporaryDirectory(prefix="p2p-tracker-budgets-")
    cluster = LocalCluster(Path(tmp.name), secure=False)  # fake node ids: the mechanics of the admin API
    try:
        t = cluster.start_tracker("--admin-listen", "127.0.0.1:0", "--admin-token", TOKEN, interval=5)

        async def populate() -> None:
            async with TrackerClient([t.address], nid(1), ("127.0.0.1", 9001), {"zone": "eu-1"}, "0.1.0") as a:
                await a.register()

        trio.run(populate)
        yield {"url": f"http://127.0.0.1:{t.admin_port}"}
    finally:
        cluster.close()
        tmp.cleanup()


def cli(admin: dict[str, Any], *args: str) -> Any:
    from typer.testing import CliRunner

    from tracker.admin_cli import admin_app

    return CliRunner().invoke(admin_app, [*args, "--tracker", admin["url"], "--token", TOKEN])


def test_admin_api_sets_shows_and_clears_budgets(admin: dict[str, Any]) -> None:
    from tests.tracker.test_tracker_admin import http as http_as

    def http(url: str, path: str, token: str | None = TOKEN, **kw: Any) -> tuple[int, Any]:
        return http_as(url, path, token=token, **kw)

    url = admin["url"]
    status, spec = http(url, "/openapi.json", token=None)
    assert "/v1/throttle" in spec["paths"] and {"get", "put", "delete"} <= set(spec["paths"]["/v1/throttle"])
    status, body = http(url, "/v1/throttle", token="wrong")
    assert status == 401
    status, body = http(url, "/v1/throttle", method="PUT", body=b'{"total": 1000000, "zones": {"eu-1": 500000}}')
    assert status == 200 and body["budgets"]["total"] == 1e6 and body["budgets"]["zones"] == {"eu-1": 5e5}
    assert [n["share"] for n in body["nodes"]] == [5e5]
    for bad, words in [
        (b'{"total": -5}', "negative"),
        (b'{"total": "lots"}', "number"),
        (b'{"total": 1e300}', "absurd"),
        (b'{"zones": {"mars": 5}}', "unknown zone 'mars'"),
        (b'{"totl": 5}', "unknown budget key"),
    ]:
        status, body = http(url, "/v1/throttle", method="PUT", body=bad)
        assert status == 400, bad
        assert words in body["error"]["message"], body
    assert http(url, "/v1/throttle")[1]["budgets"]["total"] == 1e6  # unchanged by the refused ones
    status, body = http(url, "/v1/throttle", method="DELETE")
    assert status == 200 and not body["active"]


def test_admin_cli_throttle(admin: dict[str, Any]) -> None:
    r = cli(admin, "throttle", "set", "--total", "80Mbit/s", "--zone", "eu-1=5MB/s", "--cross-zone", "1MB/s")
    assert r.exit_code == 0, r.output
    assert "total:      10 MB/s" in r.stdout and "zone eu-1: 5 MB/s" in r.stdout
    r = cli(admin, "throttle", "show", "--json")
    got = json.loads(r.stdout)
    assert got["budgets"] == {"total": 10e6, "zones": {"eu-1": 5e6}, "cross_zone": 1e6, "priority": {}}
    r = cli(admin, "throttle", "set", "--total", "0")
    assert r.exit_code == 0 and "0 (paused)" in r.stdout
    for args, words in [
        (["--total", "-5MB/s"], "negative"),
        (["--total", "fast"], "--total"),
        (["--total", "1e30GB/s"], "too large"),
        (["--zone", "eu-1"], "NAME=RATE"),
        (["--zone", "mars=5MB/s"], "unknown zone 'mars'"),
        ([], "at least one"),
    ]:
        r = cli(admin, "throttle", "set", *args)
        assert r.exit_code == 2, (args, r.output)
        assert words in r.output and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    r = cli(admin, "throttle", "clear")
    assert r.exit_code == 0 and "cleared" in r.stdout
    assert "no global budget" in cli(admin, "throttle", "show").stdout


def test_zone_aware_peer_lists_under_a_cross_zone_budget() -> None:
    """With a cross-zone budget, only one node per zone (its gateway) is given peers of other zones."""
    from tracker.registry import Registry

    aid = "c" * 64
    r = Registry(1.0)
    seed = nid(0)
    r.register(seed, "10.0.0.1", 7000, {"zone": "a"}, "0.1.0", 0.0)
    r.heartbeat(seed, {aid: 1.0}, 0.0)
    a1, b1, b2, b3 = nid(1), nid(2), nid(3), nid(4)
    r.register(a1, "10.0.0.1", 7001, {"zone": "a"}, "0.1.0", 0.0)
    for i, n in enumerate((b1, b2, b3)):
        r.register(n, "10.0.0.2", 7002 + i, {"zone": "b"}, "0.1.0", 0.0)
        r.heartbeat(n, {aid: 0.0}, 0.0)
    r.heartbeat(a1, {aid: 0.0}, 0.0)

    def zones(requester: str) -> set[str]:
        return {p["zone"] for p in r.peers(aid, requester)}

    # no cross-zone budget: everyone sees every zone (own zone first)
    assert zones(b2) == {"a", "b"} and zones(a1) == {"a", "b"}
    r.set_budgets(Budgets(cross_zone=1e6))
    assert zones(b1) == {"a", "b"}  # zone b's gateway (its first holder) fetches from zone a
    assert zones(b2) == {"b"} and zones(b3) == {"b"}  # the others spread inside zone b
    assert zones(a1) == {"a"}  # zone a has a complete holder: nothing from zone b
    r.heartbeat(b1, {aid: 1.0}, 0.0)  # the gateway completed: zone b has a complete holder now
    assert zones(b2) == {"b"}
    r.leave(b1)  # the gateway left before completing its copy: the next holder takes over
    r.heartbeat(b2, {aid: 0.5}, 0.0)
    assert zones(r.artifacts[aid].holders[(False, "b")].items[0]) == {"a", "b"}
