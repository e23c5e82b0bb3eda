"""The swarm's scheduling rules that decide how close a transfer gets to the Kumar–Ross bound.

Real Swarm objects over real (tiny) stores; connections are stand-ins carrying only what the rules
read (announced pieces, deferrals), and time is trio's mock clock.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from p2pd import storage, swarm
from p2pd.protocol import bitfield as bits
from p2pd.protocol import manifest as mf
from p2pd.storage import Catalog, PieceStore
from p2pd.swarm import SERVE_TAIL, Swarm, SwarmConfig

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
    return Swarm(node_id="a" * 32, artifact_id="b" * 64, name="x:1", manifest=m, store=store,
                 have=bits.full(m.num_pieces) if complete else 0, catalog=Catalog(tmp_path / "data"),
                 config=SwarmConfig(), egress=None, ingress=None, **kw)


def peer(name: str, have: set[int] | None = None, complete: bool = False) -> Any:
    mask = bits.full(PIECES) if complete else sum(1 << i for i in (have or set()))
    return SimpleNamespace(remote_id=name, have_mask=mask, deferred=set())


def connect(sw: Swarm, *peers: Any) -> None:
    for p in peers:
        sw.conns[p.remote_id] = p


# --------------------------------------------------------------------------------------------- seed policy
def test_seed_never_sends_a_second_copy_while_some_piece_was_never_sent(tmp_path: Path) -> None:
    sw = make_swarm(tmp_path, complete=True)
    a, b = peer("a"), peer("b", have=set(range(PIECES - SERVE_TAIL + 1, PIECES)))
    connect(sw, a, b)
    assert not sw.should_defer(a, 5)
    sw.note_piece_sent(5)
    # Asked again, by anyone, even by a requester in its tail: the copy would cost the bottleneck.
    assert sw.should_defer(b, 5)
    assert sw.should_defer(b, 5)
    assert sw.should_defer(a, 5)
    assert not sw.should_defer(b, 6)  # a piece never sent is always served
    assert sw.pieces_deferred == 3


def test_the_check_is_repeated_when_the_piece_is_about_to_be_sent(tmp_path: Path) -> None:
    """Two peers asking for the same unsent piece: both requests are accepted, one copy goes out."""
    sw = make_swarm(tmp_path, complete=True)
    a, b = peer("a"), peer("b")
    connect(sw, a, b)
    assert not sw.should_defer(a, 9) and not sw.should_defer(b, 9)
    assert not sw.sent_while_unsent_remain(9)
    sw.note_piece_sent(9)
    assert sw.sent_while_unsent_remain(9)  # b's turn comes: DEFER instead of a second copy


def test_once_everything_was_sent_copies_follow_the_once_and_tail_rules(tmp_path: Path) -> None:
    sw = make_swarm(tmp_path, complete=True)
    for i in range(PIECES):
        sw.note_piece_sent(i)
    holder = peer("h", have={3})
    a = peer("a")
    tail = peer("t", have=set(range(PIECES)) - {3, 4})
    connect(sw, holder, a, tail)
    assert sw.should_defer(a, 3)  # someone connected has it: ask them
    assert not sw.should_defer(a, 3)  # asked again: a found no one else, serve it
    assert not sw.should_defer(tail, 3)  # the tail is always served
    assert not sw.should_defer(a, 4)  # nobody else has it
    assert sw.pieces_sent == PIECES


def test_never_defer_to_another_complete_node(tmp_path: Path) -> None:
    sw = make_swarm(tmp_path, complete=True)
    for i in range(PIECES):
        sw.note_piece_sent(i)
    other_seed, a = peer("s2", complete=True), peer("a")
    connect(sw, other_seed, a)
    assert not sw.should_defer(a, 7)


def test_a_seed_with_one_peer_or_policy_off_serves_everything(tmp_path: Path) -> None:
    sw = make_swarm(tmp_path, complete=True)
    a = peer("a")
    connect(sw, a)
    sw.note_piece_sent(1)
    assert not sw.should_defer(a, 1)  # the only peer: nobody else to ask
    sw.config.seed_distinct = False
    connect(sw, peer("b"))
    assert not sw.should_defer(a, 1)


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
    assert gaps[:3] == [0.0, swarm.PEER_LOOKUP_FIRST, 2 * swarm.PEER_LOOKUP_FIRST]
    assert max(gaps) == swarm.PEER_LOOKUP_ALONE  # with nobody connected it keeps asking twice a second
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


async def test_pieces_are_verified_inline_until_a_write_is_slow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               thread_calls: list[int]) -> None:
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


async def test_a_write_slow_only_for_want_of_cpu_stays_inline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              thread_calls: list[int]) -> None:
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
