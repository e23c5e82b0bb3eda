"""The simulator's exact fast paths: same decisions as the slow path, on random inputs and whole runs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netsim.sim.engine import Simulation, nothing_to_request
from netsim.sim.scenario import NodeClass, Scenario
from p2pd.protocol.picker import Picker
from tests.unit._util import FAST

MB = 1_000_000
MiB = 1 << 20
PIECES = 12
PEERS = 4

# one operation: (kind, peer, piece); kinds are the calls the engine makes on a downloading node's picker
ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "have", "next", "arrive", "defer", "reject", "remove", "undefer"]),
        st.integers(0, PEERS - 1),
        st.integers(0, PIECES - 1),
    ),
    max_size=120,
)


def _drive(picker: Picker[int], script: list[tuple[str, int, int]], skip_held: bool, start: set[int]) -> list[object]:
    """Run the script on `picker`, returning every answer it gives; with `skip_held`, a HAVE for a piece the
    node holds is not passed on (the engine's fast path)."""
    held = set(start)
    out: list[object] = []
    for kind, peer, piece in script:
        known = picker.knows(peer)
        if kind == "add":
            if not known:
                picker.add_peer(peer, range(PIECES) if piece == 0 else range(piece, PIECES, 3))
                out.append(("add", picker.interesting(peer)))
        elif not known:
            continue
        elif kind == "have":
            if skip_held and piece in held:
                out.append(("have", False))
            else:
                out.append(("have", picker.peer_have(peer, piece)))
        elif kind == "next":
            surely_none = nothing_to_request(picker, peer)
            got = picker.next_request(peer)
            assert got is None or not surely_none, "the engine would have skipped a request the picker makes"
            out.append(("next", got, picker.interesting(peer), picker.outstanding(peer)))
        elif kind == "arrive":
            pending = sorted(picker.pending.get(peer, ()))
            if pending:
                p = pending[piece % len(pending)]
                out.append(("arrive", picker.arrived(peer, p)))
                if p not in held:
                    held.add(p)
                    out.append(("verified", sorted(picker.piece_verified(p))))
        elif kind == "defer":
            pending = sorted(picker.pending.get(peer, ()))
            if pending:
                picker.defer(peer, pending[piece % len(pending)])
        elif kind == "reject":
            pending = sorted(picker.pending.get(peer, ()))
            if pending:
                picker.request_failed(peer, pending[piece % len(pending)], peer_lacks=True)
        elif kind == "remove":
            out.append(("remove", sorted(picker.remove_peer(peer))))
        elif kind == "undefer":
            out.append(("undefer", picker.undefer_all()))
        out.append(("state", picker.missing, picker.inflight_mask, picker.done))
    return out


@FAST
@given(script=ops, seed=st.integers(0, 1 << 16), start=st.sets(st.integers(0, PIECES - 1), max_size=4))
def test_skipping_haves_of_held_pieces_changes_no_decision(
    script: list[tuple[str, int, int]], seed: int, start: set[int]
) -> None:
    slow: Picker[int] = Picker(PIECES, start, seed=seed)
    fast: Picker[int] = Picker(PIECES, start, seed=seed)
    # every peer connected with a partial bitfield, then HAVEs of the pieces the node started with, then the rest
    script = [("add", q, q + 1) for q in range(PEERS)] + [("have", p % PEERS, p) for p in sorted(start)] + script
    assert _drive(fast, script, True, start) == _drive(slow, script, False, start)


def _run(sc: Scenario, skip: bool) -> Simulation:
    sim = Simulation(sc)
    sim.skip_held_haves = sim.skip_empty_requests = skip
    sim.run()
    return sim


@pytest.mark.parametrize("policy", ["p2pd", "bittorrent"])
def test_a_run_with_the_fast_paths_is_the_same_run(policy: str) -> None:
    sc = Scenario(
        classes=(NodeClass(12, 30 * MB, 60 * MB),),
        size=32 * MiB,
        piece=MiB,
        seed_up=50 * MB,
        quantum=1e-5,
        rng_seed=5,
        latency=1e-3,
        policy=policy,
    )
    fast, slow = _run(sc, True), _run(sc, False)
    assert fast.haves_skipped > 0 and slow.haves_skipped == 0
    assert fast.requests_skipped > 0 and slow.requests_skipped == 0
    assert [nd.done_at for nd in fast.nodes] == [nd.done_at for nd in slow.nodes]
    assert fast.delivered == slow.delivered and fast.wasted == slow.wasted
    assert [nd.uploaded for nd in fast.nodes] == [nd.uploaded for nd in slow.nodes]
    assert fast.events == slow.events
