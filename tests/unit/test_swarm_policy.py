"""The swarm's timing rules: how soon it finds peers, and where it verifies pieces.

Real Swarm objects over real (tiny) stores; time is trio's mock clock. The seed policy has its own
tests (test_seeding.py), the per-connection rules too (test_session.py).
"""

from __future__ import annotations

import collections
import functools
import os
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from p2pd import connections, storage, swarm
from p2pd.config import SwarmConfig
from p2pd.connections import ConnectionPath
from p2pd.protocol import bitfield as bits
from p2pd.protocol import manifest as mf
from p2pd.protocol import session as ps
from p2pd.protocol import wire
from p2pd.racing import Path as RacePath
from p2pd.racing import RacingConnector
from p2pd.storage import Catalog, PieceStore
from p2pd.swarm import Swarm

PIECE = 1 << 16
PIECES = 64


def make_swarm(tmp_path: Path, *, complete: bool, **kw: Any) -> Swarm:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "blob.bin").write_bytes(os.urandom(PIECE * PIECES))
    entries, root, single = storage.scan_source(src)
    m = mf.build(entries, PIECE, storage.hash_pieces(root, entries, PIECE), single_file=single)
    store = PieceStore(m, src if complete else tmp_path / "staging", writable=not complete)
    if not complete:
        store.preallocate()
    return Swarm(
        node_id="a" * 32,
        artifact_id="b" * 64,
        name="x:1",
        manifest=m,
        store=store,
        have=bits.full(m.num_pieces) if complete else 0,
        catalog=Catalog(tmp_path / "data"),
        config=SwarmConfig(),
        egress=None,
        ingress=None,
        **kw,
    )


# --------------------------------------------------------------------------------------------- peer lookups
async def test_first_lookups_come_quickly_then_back_off(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """Peers released together find each other at the second lookup, a quarter second in."""
    times: list[float] = []

    async def find_peers(aid: str) -> list[dict[str, Any]]:
        times.append(trio.current_time())
        return []

    sw = make_swarm(tmp_path, complete=False, find_peers=find_peers)
    start = trio.current_time()
    async with trio.open_nursery() as n:
        await n.start(sw.run)
        await trio.sleep(5)
        n.cancel_scope.cancel()
    gaps = [round(b - a, 2) for a, b in zip([start, *times], times, strict=False)]
    assert gaps[:3] == [0.0, SwarmConfig.peer_lookup_first, 2 * SwarmConfig.peer_lookup_first]
    assert max(gaps) == SwarmConfig.peer_lookup_alone  # with nobody connected it keeps asking twice a second
    sw.store.close()


async def test_a_relayed_peer_we_dialled_is_punched_again_one_at_a_time(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A peer left on the relay (its first punch refused: the node's birthday punches were all taken) is
    punched again `relay_upgrade_every` later, one punch at a time, until one comes up; a direct peer, or a
    relayed one that dialled us (it punches itself), is not."""
    every = SwarmConfig.relay_upgrade_every
    tries: list[tuple[float, str]] = []

    class Punch:
        async def connect(self, remote_id: str, addr: tuple[str, int], artifact_id: str) -> connections.Connection:
            tries.append((trio.current_time(), remote_id))
            await trio.sleep(0.5)
            raise connections.ConnectError("1 birthday punch(es) under way already")

    sw = make_swarm(tmp_path, complete=False, upgrader=Punch())
    me = sw.node_id

    def conn(nid: str, path: str, initiator: str) -> Any:
        return SimpleNamespace(remote_id=nid, path=ConnectionPath(path), initiator=initiator)

    sw._dialled = {nid: ("10.0.0.9", 1) for nid in ("r1", "r2", "d", "in")}
    sw.conns = {
        "r1": conn("r1", "relay", me),
        "r2": conn("r2", "relay", me),
        "d": conn("d", "direct", me),
        "in": conn("in", "relay", "in"),
    }
    start = trio.current_time()
    async with trio.open_nursery() as n:
        for _ in range(int(4 * every / 0.25)):
            sw._upgrade_relayed(n)
            await trio.sleep(0.25)
        n.cancel_scope.cancel()
    assert {nid for _, nid in tries} == {"r1", "r2"}
    times = [round(t - start, 2) for t, _ in tries]
    assert times[0] == every  # not at once: the race has just chosen the relay
    assert all(b - a >= 0.5 for a, b in zip(times, times[1:], strict=False))  # one at a time
    per_peer = [t for t, nid in tries if nid == "r1"]
    assert all(b - a >= every for a, b in zip(per_peer, per_peer[1:], strict=False))
    sw.store.close()


async def test_lookups_remember_which_peers_have_few_fast_paths(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The tracker's lists carry each peer's NAT type: a peer behind a symmetric NAT is one this node leaves
    its uplink to (seeding.leave_to_few_paths), and stops being one when listed otherwise."""
    lists = [
        [
            {"node_id": "s" * 32, "addr": ["10.0.0.2", 7000], "nat_type": "symmetric"},
            {"node_id": "c" * 32, "addr": ["10.0.0.3", 7000], "nat_type": "port-restricted-cone"},
            {"node_id": "o" * 32, "addr": ["10.0.0.4", 7000]},  # a node that reported no NAT type
        ],
        [{"node_id": "s" * 32, "addr": ["10.0.0.2", 7000], "nat_type": "open"}],
    ]
    seen: list[set[str]] = []

    async def find_peers(aid: str) -> list[dict[str, Any]]:
        seen.append(set(sw.few_paths))
        return lists[min(len(seen) - 1, 1)]

    class NoDial:
        async def connect(self, remote_id: str, addr: tuple[str, int], artifact_id: str) -> connections.Connection:
            raise connections.ConnectError("not in this test")

    sw = make_swarm(tmp_path, complete=False, find_peers=find_peers, connector=NoDial())
    async with trio.open_nursery() as n:
        await n.start(sw.run)
        await trio.sleep(1)
        n.cancel_scope.cancel()
    assert seen[:3] == [set(), {"s" * 32}, set()]
    sw.store.close()


def test_a_symmetric_peer_waiting_gets_the_uplink_of_an_incomplete_node(tmp_path: Path) -> None:
    """A public peer (incomplete) serving a symmetric one sends a cone's request for a piece another cone
    holds there (DEFER); with nothing of the symmetric peer's queued, or none connected, it serves it."""
    sw = make_swarm(tmp_path, complete=False)
    answers: list[tuple[str, str, int]] = []

    class Peer:  # what on_event touches of a PeerConn (hashable: the seed policy keys on connections)
        def __init__(self, nid: str, have: int) -> None:
            self.remote_id, self.uploading = nid, False
            self.session = SimpleNamespace(remote_have=have, uploads=collections.deque())
            self.session.defer = lambda i: answers.append((nid, "defer", i))
            self.session.accept_upload = lambda i: answers.append((nid, "accept", i))

    def peer(nid: str, have: int) -> Any:
        return Peer(nid, have)

    sw.conns = {"c1": peer("c1", 0), "c2": peer("c2", 1 << 3), "sym": peer("sym", 0)}
    sw.have_mask = bits.full(PIECES)

    def ask(nid: str, i: int) -> str:
        sw.on_event(sw.conns[nid], ps.UploadRequested(i))
        return answers[-1][1]

    assert ask("c1", 3) == "accept"  # no peer with few paths known
    sw.few_paths = {"sym"}
    assert ask("c1", 3) == "accept"  # the symmetric peer asks us nothing now
    sw.conns["sym"].session.uploads.append(7)
    assert ask("c1", 3) == "defer"  # c2 holds it: fetch it there
    assert ask("c1", 3) == "accept"  # asked again: served
    assert ask("c1", 4) == "accept"  # nobody else holds it
    assert ask("sym", 3) == "accept"
    sw.store.close()


# --------------------------------------------------------------------------------------------- verification
@pytest.fixture
def thread_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The pieces handed to a worker thread (trio.to_thread.run_sync's first argument after the function)."""
    calls: list[int] = []
    real_run_sync = trio.to_thread.run_sync

    async def counting_run_sync(fn: Any, *args: Any, **kw: Any) -> Any:
        calls.append(args[0])
        return await real_run_sync(fn, *args, **kw)

    monkeypatch.setattr(trio.to_thread, "run_sync", counting_run_sync)
    return calls


async def test_pieces_are_verified_inline_until_a_write_is_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, thread_calls: list[int]
) -> None:
    sw = make_swarm(tmp_path, complete=False)
    src = PieceStore(sw.manifest, tmp_path / "src", writable=False)
    assert await sw._verify_and_write_soon(0, src.read_piece(0))
    assert thread_calls == []  # fast page-cache write: done on the event loop
    real_write = sw.store.write_piece

    def slow_write(i: int, data: Any) -> None:
        time.sleep(swarm.INLINE_VERIFY_SLOW * 3)
        real_write(i, data)

    monkeypatch.setattr(sw.store, "write_piece", slow_write)
    assert await sw._verify_and_write_soon(1, src.read_piece(1))
    assert await sw._verify_and_write_soon(2, src.read_piece(2))
    assert thread_calls == [2]  # after a slow write, the next ones go to a thread
    bad = src.read_piece(3)
    bad[0] ^= 1
    assert not await sw._verify_and_write_soon(3, bad)
    assert sw.store.read_piece(1) == src.read_piece(1)
    src.close()
    sw.store.close()


async def test_a_write_slow_only_for_want_of_cpu_stays_inline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, thread_calls: list[int]
) -> None:
    """Preemption (many daemons on few cores) must not move verification to threads, which cost more CPU."""
    sw = make_swarm(tmp_path, complete=False)
    src = PieceStore(sw.manifest, tmp_path / "src", writable=False)
    real_write = sw.store.write_piece

    def busy_write(i: int, data: Any) -> None:
        end = time.monotonic() + swarm.INLINE_VERIFY_SLOW * 3
        while time.monotonic() < end:  # slow, but never sleeping in the kernel
            pass
        real_write(i, data)

    monkeypatch.setattr(sw.store, "write_piece", busy_write)
    for i in range(3):
        assert await sw._verify_and_write_soon(i, src.read_piece(i))
    assert thread_calls == []
    assert sw.store.read_piece(2) == src.read_piece(2)
    src.close()
    sw.store.close()


class _Conn:
    """What `Swarm._register` looks at on a connection."""

    def __init__(self, remote_id: str, initiator: str, path: str) -> None:
        self.remote_id, self.initiator, self.path, self.addr = remote_id, initiator, path, "x"
        self.closed_with: object = None
        self.bytes_up = self.bytes_down = 0
        self.booked = False
        self.session = type("S", (), {"send_bitfield": lambda self, have: None})()

    def close(self, reason: object, detail: str = "") -> None:
        self.closed_with = reason


@pytest.mark.parametrize("order", ["relay first", "direct first"])
def test_of_two_connections_to_a_peer_the_direct_one_stays_whoever_dialled(tmp_path: Path, order: str) -> None:
    """Both ends decide alike (the better path, then the lower id's outgoing one), in whatever order they came."""
    me, other = "a" * 32, "c" * 32  # we have the lower id: on equal paths our outgoing one would win
    relay = _Conn(other, me, "relay")
    direct = _Conn(other, other, "tcp-punch")
    sw = make_swarm(tmp_path, complete=True)
    first, second = (relay, direct) if order == "relay first" else (direct, relay)
    assert sw._register(first)  # type: ignore[arg-type]
    sw._register(second)  # type: ignore[arg-type]
    assert sw.conns[other] is direct  # type: ignore[comparison-overlap]
    assert relay.closed_with is not None or order == "direct first"


def test_a_replaced_connection_s_bytes_are_counted_once(tmp_path: Path) -> None:
    """A duplicate that loses (a relayed connection replaced by a punched one) is closed by `_register` and
    again when its run ends: its bytes by path are counted once (the NAT bench read 0.25 F received over
    the relay where the relay had forwarded 0.135 F)."""

    class Conn:
        remote_id = "r" * 32
        path = ConnectionPath.RELAY
        bytes_down, bytes_up = 1000, 10
        booked = False
        session = object()

    sw = make_swarm(tmp_path, complete=True)
    c = Conn()
    sw.on_close(c)  # type: ignore[arg-type]
    sw.on_close(c)  # type: ignore[arg-type]
    assert sw.path_totals() == {("relay", "in"): 1000, ("relay", "out"): 10}
    sw.store.close()


def test_the_picker_caps_the_sources_as_configured(tmp_path: Path) -> None:
    """The daemon's picker runs rule 6 with SwarmConfig's numbers (the simulator's engine passes the same)."""
    s = make_swarm(tmp_path, complete=False)
    cfg = SwarmConfig()
    assert s.picker.source_cap == cfg.download_sources
    assert s.picker.source_cap_min_peers == cfg.upload_slots_min_peers
    s2 = Swarm(
        node_id=s.node_id,
        artifact_id=s.artifact_id,
        name=s.name,
        manifest=s.manifest,
        store=s.store,
        have=0,
        catalog=s.catalog,
        config=replace(cfg, download_sources=4),
        egress=None,
        ingress=None,
    )
    assert s2.picker.source_cap == 4


# --------------------------------------------------------------------------------------------- HAVE batching
def counted_conn(sw: Swarm, wakeups: collections.Counter[str], nid: str) -> Any:
    """A connection to `nid`, past its BITFIELD, whose writer wakeups are counted in `wakeups`."""
    s = ps.PeerSession(sw.manifest, sw.picker, on_output=lambda: wakeups.update([nid]))
    s.send_bitfield(0)
    s.take_output()
    return SimpleNamespace(remote_id=nid, session=s)


@pytest.mark.parametrize("peers", [8, 16])
async def test_haves_are_held_for_have_batch_in_a_big_swarm_only(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, peers: int
) -> None:
    """With `have_batch_min_peers` connections, the HAVEs of pieces verified within `have_batch` leave together:
    one wakeup of each connection's writer for all of them; in a smaller swarm each leaves at once."""
    cfg = SwarmConfig()
    assert cfg.have_batch > 0 and cfg.have_batch_min_peers == 16
    sw = make_swarm(tmp_path, complete=False)
    wakeups: collections.Counter[str] = collections.Counter()
    conn = functools.partial(counted_conn, sw, wakeups)
    sw.conns = {f"p{k}": conn(f"p{k}") for k in range(peers)}
    wakeups.clear()
    async with trio.open_nursery() as n:
        n.start_soon(sw._have_flush_loop)
        held = (5, 9, 2)[: cfg.have_batch_pieces - 1]  # fewer than end a hold by count
        assert len(held) >= 2
        for i in held:
            sw._announce(i)
            await trio.sleep(cfg.have_batch / 10)
        batched = peers >= cfg.have_batch_min_peers
        assert sum(wakeups.values()) == (0 if batched else len(held) * peers)
        await trio.sleep(cfg.have_batch)
        assert wakeups == collections.Counter({f"p{k}": 1 if batched else len(held) for k in range(peers)})
        for c in sw.conns.values():
            assert wire.FrameDecoder(PIECE).feed(c.session.take_output()) == [wire.Have(i) for i in held]
        sw._announce(7)  # a later piece starts a new window
        await trio.sleep(cfg.have_batch * 1.5)
        assert all(c.session.take_output() == wire.encode(wire.Have(7)) for c in sw.conns.values())
        n.cancel_scope.cancel()
    sw.store.close()


async def test_held_haves_leave_once_have_batch_pieces_are_held(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Where pieces come fast the hold ends by count: the `have_batch_pieces`-th held piece sends every peer's
    held HAVEs at once, in one wakeup each, long before `have_batch`; the next piece starts a new hold, timed
    from itself (a fixed 0.1 s there withheld ~12 pieces of news: the simulated 200 nodes at 250 MB/s)."""
    cfg = SwarmConfig()
    k = cfg.have_batch_pieces
    assert k >= 2 and cfg.have_batch_min_peers == 16
    sw = make_swarm(tmp_path, complete=False)
    wakeups: collections.Counter[str] = collections.Counter()
    conn = functools.partial(counted_conn, sw, wakeups)
    peers = cfg.have_batch_min_peers
    sw.conns = {f"p{j}": conn(f"p{j}") for j in range(peers)}
    wakeups.clear()
    dt = cfg.have_batch / (4 * k)
    async with trio.open_nursery() as n:
        n.start_soon(sw._have_flush_loop)
        for i in range(k - 1):
            sw._announce(i)
            await trio.sleep(dt)
        assert sum(wakeups.values()) == 0  # one piece short: still held
        sw._announce(k - 1)
        assert wakeups == collections.Counter({f"p{j}": 1 for j in range(peers)})
        want = [wire.Have(i) for i in range(k)]
        for c in sw.conns.values():
            assert wire.FrameDecoder(PIECE).feed(c.session.take_output()) == want
        t0 = trio.current_time()
        await trio.sleep(cfg.have_batch - (k - 1) * dt + dt / 2)  # past the old hold's deadline: nothing left
        sw._announce(k)  # a new hold: due `have_batch` after this, not after the first hold's start
        await trio.sleep(cfg.have_batch - dt)
        assert all(c.session.take_output() == b"" for c in sw.conns.values())
        await trio.sleep(2 * dt)
        assert all(c.session.take_output() == wire.encode(wire.Have(k)) for c in sw.conns.values())
        assert trio.current_time() - t0 < 2.5 * cfg.have_batch
        n.cancel_scope.cancel()
    sw.store.close()


# --------------------------------------------------------------------------------------------- who dials whom
async def test_of_two_natted_downloaders_the_lower_id_dials(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Both ends of a pair dial each other as they find each other; towards a NATed node each dial is a punch (a
    birthday punch with a symmetric NAT, in a gate of 4 per node). So a NATed downloader with a lower id than ours
    is left to dial us, and dialled only `nat_dial_wait` later if it did not; a public, complete or higher one at
    once, and anyone once the lookup did not list the whole swarm (the peer's lookups may not list us)."""
    me = "a" * 32
    listed = [
        {"node_id": "0" * 32, "addr": ["10.0.0.2", 7000], "nat_type": "symmetric", "progress": 0.2},  # theirs
        {"node_id": "1" * 32, "addr": ["10.0.0.3", 7000], "nat_type": "port-restricted-cone", "progress": 0.0},
        {"node_id": "f" * 32, "addr": ["10.0.0.4", 7000], "nat_type": "port-restricted-cone", "progress": 0.2},
        {"node_id": "2" * 32, "addr": ["10.0.0.5", 7000], "nat_type": "open", "progress": 0.2},
        {"node_id": "3" * 32, "addr": ["10.0.0.6", 7000], "nat_type": "symmetric", "progress": 1.0},
        {"node_id": "4" * 32, "addr": ["10.0.0.7", 7000], "progress": 0.2},  # a node that reported no NAT type
    ]
    first_dial: dict[str, float] = {}

    class NoDial:
        async def connect(self, remote_id: str, addr: tuple[str, int], artifact_id: str) -> connections.Connection:
            first_dial.setdefault(remote_id, trio.current_time())
            raise connections.ConnectError("not in this test")

    async def find_peers(aid: str) -> list[dict[str, Any]]:
        return listed

    sw = make_swarm(tmp_path, complete=False, find_peers=find_peers, connector=NoDial())
    assert sw.node_id == me
    start = trio.current_time()
    async with trio.open_nursery() as n:
        await n.start(sw.run)
        await trio.sleep(6)
        n.cancel_scope.cancel()
    at = {nid[0]: round(t - start, 2) for nid, t in first_dial.items()}
    assert {k: at[k] for k in "f234"} == dict.fromkeys("f234", 0.0)
    wait = SwarmConfig.nat_dial_wait
    assert wait <= at["0"] <= wait + SwarmConfig.peer_lookup_alone and wait <= at["1"] <= wait + 0.5
    sw.store.close()

    # a lookup that returns as many peers as asked for is a sample: the peer may never see us, so we dial it
    full = [{**listed[0], "node_id": f"{i:032x}"} for i in range(SwarmConfig.peers_per_lookup)]
    first_dial.clear()
    listed = full
    sw = make_swarm(tmp_path, complete=False, find_peers=find_peers, connector=NoDial())
    async with trio.open_nursery() as n:
        await n.start(sw.run)
        await trio.sleep(0.1)
        n.cancel_scope.cancel()
    assert len(first_dial) == SwarmConfig.max_peers
    sw.store.close()


async def test_a_dial_stops_once_the_peer_reached_us_on_a_fast_path(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Our dial to a peer (its punches and their sockets) is called off when that peer's own connection to us
    is registered on a path as good as any the dial could bring and would win over ours at both ends (the lower
    id's); not when it came over the relay, nor when ours would win (then both ends keep ours)."""
    cancelled: list[str] = []

    class Slow:
        async def connect(self, remote_id: str, addr: tuple[str, int], artifact_id: str) -> connections.Connection:
            try:
                await trio.sleep(30)
            except trio.Cancelled:
                cancelled.append(remote_id)
                raise
            raise connections.ConnectError("timed out")

    sw = make_swarm(tmp_path, complete=False, connector=Slow())
    fast, relayed, higher = "0" * 32, "1" * 32, "c" * 32  # we are "a" * 32
    async with trio.open_nursery() as n:
        for nid in (fast, relayed, higher):
            sw.connecting.add(nid)
            n.start_soon(sw._dial, nid, ("10.0.0.9", 7000))
        await trio.sleep(1)
        assert sw._register(_Conn(fast, fast, "tcp-punch"))  # type: ignore[arg-type]
        assert sw._register(_Conn(relayed, relayed, "relay"))  # type: ignore[arg-type]
        assert sw._register(_Conn(higher, higher, "direct"))  # type: ignore[arg-type]
        await trio.sleep(1)
        assert cancelled == [fast]
        assert fast not in sw.connecting and fast not in sw.retry_after  # not a failure: nothing to wait for
        n.cancel_scope.cancel()
    sw.store.close()


def test_keeps_says_what_register_would_adopt(tmp_path: Path) -> None:
    """`Swarm.keeps` (asked by Traversal before and while it answers a punch) agrees with `_register`: a
    connection is kept if none is held, if its path is better, or on the same path if it is the lower id's
    and the held one is not."""
    me, lower, higher = "a" * 32, "0" * 32, "c" * 32
    sw = make_swarm(tmp_path, complete=True)
    assert sw.keeps(higher, "udp-punch", higher)  # nothing held
    assert sw._register(_Conn(higher, higher, "tcp-punch"))  # type: ignore[arg-type]
    assert not sw.keeps(higher, "udp-punch", higher)  # a worse path: an answered UDP punch is wasted
    assert not sw.keeps(higher, "relay", higher)
    assert not sw.keeps(higher, "tcp-punch", higher)  # same path, not the lower id's
    assert sw.keeps(higher, "direct", me)  # same rank, ours (the lower id's) replaces theirs
    assert sw._register(_Conn(lower, me, "relay"))  # type: ignore[arg-type]
    assert sw.keeps(lower, "udp-punch", lower)  # better than the relay
    assert sw.keeps(lower, "relay", lower)  # the lower id's, replacing ours
    assert not sw.keeps(lower, "relay", me)
    sw.store.close()


async def test_lookups_tell_the_race_which_peers_are_behind_a_nat(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The swarm passes each listed peer's NAT type to its racing connector, whose punch then starts at once
    (racing.RacingConnector.behind_nat); a peer listed public again is raced as before."""

    class Never:
        async def connect(self, remote_id: str, addr: tuple[str, int], artifact_id: str) -> connections.Connection:
            await trio.sleep_forever()
            raise AssertionError("unreachable")

    told: dict[str, bool] = {}

    class Race(RacingConnector):
        def behind_nat(self, remote_id: str, nated: bool) -> None:
            told[remote_id] = nated
            super().behind_nat(remote_id, nated)

    listed = [
        {"node_id": "1" * 32, "addr": ["10.0.0.1", 7700], "nat_type": "symmetric", "progress": 1.0},
        {"node_id": "2" * 32, "addr": ["10.0.0.2", 7700], "nat_type": "port-restricted-cone", "progress": 1.0},
        {"node_id": "3" * 32, "addr": ["10.0.0.3", 7700], "nat_type": "public", "progress": 1.0},
    ]

    async def find_peers(aid: str) -> list[dict[str, Any]]:
        return [dict(p) for p in listed]  # (the swarm shuffles what it is given)

    race = Race([RacePath("direct", Never(), 0.0)])
    sw = make_swarm(tmp_path, complete=False, find_peers=find_peers, connector=race)
    async with trio.open_nursery() as n:
        await n.start(sw.run)
        await trio.sleep(1)
        assert told == {"1" * 32: True, "2" * 32: True, "3" * 32: False}
        listed[0] = {**listed[0], "nat_type": "public"}
        await trio.sleep(2 * SwarmConfig.peer_lookup_every + 1)  # the next lookup, whatever its backoff
        assert told["1" * 32] is False
        n.cancel_scope.cancel()
    sw.store.close()
