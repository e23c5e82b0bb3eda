"""The simulator's frames from a node to one peer follow the daemon's rules: HAVEs held as Swarm._announce
holds them, and every frame behind the piece that the connection's writer is sending (PeerConn._writer).

Driven event by event (no flows progress unless a test completes one), so each arrival time is known."""

from __future__ import annotations

import heapq
from dataclasses import replace

from netsim.sim.engine import Node, Simulation
from netsim.sim.scenario import NodeClass, Scenario
from p2pd.config import SwarmConfig

LATENCY = 1e-3
PIECE = 256 << 10


def swarm(peers: int, cfg: SwarmConfig | None = None) -> Simulation:
    sc = Scenario(
        classes=(NodeClass(peers, 1e6, 1e6),),
        size=64 * PIECE,
        piece=PIECE,
        seed_up=1e6,
        latency=LATENCY,
        swarm=cfg or SwarmConfig(),
    )
    sim = Simulation(sc)
    for nd in sim.nodes:
        nd.online = True
    return sim


def drain(sim: Simulation, until: float) -> None:
    """Handle every event due by `until`, in time order."""
    while sim.heap and sim.heap[0][0] <= until:
        t, _, fn, args = heapq.heappop(sim.heap)
        sim.now = max(sim.now, t)
        fn(*args)
    sim.now = max(sim.now, until)


def node1_connected(peers: int, cfg: SwarmConfig | None = None) -> tuple[Simulation, Node, list[Node]]:
    """A swarm of `peers` in which node 1 is connected to the seed and every other peer, at t = 0.5 s."""
    sim = swarm(peers, cfg)
    n1, others = sim.nodes[1], sim.nodes[2:]
    for other in [sim.nodes[0], *others]:
        sim._connect(n1, other, 0)
    drain(sim, 0.5)
    return sim, n1, others


def verify_from_seed(sim: Simulation, nd: Node) -> int:
    """`nd` receives (and verifies) one of the pieces it asked the seed for; returns it."""
    unit = min(nd.picker.pending[0])
    sim._on_piece(nd, 0, unit, PIECE)
    return unit


def knows(nd: Node, sender: Node, unit: int) -> bool:
    return bool(nd.remote_have.get(sender.nid, 0) >> unit & 1)


def test_haves_are_held_for_have_batch_from_have_batch_min_peers_connections() -> None:
    cfg = SwarmConfig()
    assert cfg.have_batch_min_peers == 16 and cfg.have_batch > 10 * LATENCY
    sim, n1, others = node1_connected(cfg.have_batch_min_peers)  # to the seed and 15 others: 16 connections
    unit = verify_from_seed(sim, n1)
    drain(sim, 0.5 + 3 * LATENCY)
    assert not any(knows(o, n1, unit) for o in others)  # held
    # a peer that announces a piece node 1 lacks is asked for it: the held HAVE leaves with that REQUEST
    n2, w = others[0], 63
    n2.have |= 1 << w
    sim._on_have(n2, w, [n1.nid], n2.epoch)
    drain(sim, sim.now + 2 * LATENCY)
    assert knows(n2, n1, unit)
    assert not any(knows(o, n1, unit) for o in others[1:])
    drain(sim, 0.5 + cfg.have_batch - LATENCY)
    assert not any(knows(o, n1, unit) for o in others[1:])
    drain(sim, 0.5 + cfg.have_batch + 2 * LATENCY)  # the flush: every peer's held HAVEs at once
    assert all(knows(o, n1, unit) for o in others)

    # one connection fewer than the gate: each HAVE leaves at once
    sim, n1, others = node1_connected(16, replace(cfg, have_batch_min_peers=17))
    unit = verify_from_seed(sim, n1)
    drain(sim, 0.5 + 2 * LATENCY)
    assert all(knows(o, n1, unit) for o in others)


def test_a_frame_to_a_peer_follows_the_piece_being_sent_to_it() -> None:
    """Node 1 sends node 2 a piece; the HAVE it announces meanwhile reaches node 2 after that piece, while the
    seed (to which node 1 sends nothing) has it one latency after."""
    sim = swarm(2)
    seed, n1, n2 = sim.nodes
    u = 40
    n1.have |= 1 << u  # node 1 holds piece u (from an earlier run), node 2 asks it for it
    sim._connect(n1, seed, 0)
    sim._connect(n1, n2, 0)
    drain(sim, 0.01)
    assert n2.nid in n1.sending  # node 1's writer sends node 2 a piece
    unit = verify_from_seed(sim, n1)
    drain(sim, 0.05)
    assert knows(seed, n1, unit)
    assert not knows(n2, n1, unit)
    sim.now = 0.3
    sim._flow_done(n1.sending[n2.nid])  # the piece has arrived at node 2
    assert n2.have >> u & 1
    drain(sim, 0.3 + 2 * LATENCY)
    assert knows(n2, n1, unit)


def test_held_haves_leave_once_have_batch_pieces_are_held() -> None:
    """Where pieces come fast the hold ends by count, not by `have_batch`: the `have_batch_pieces`-th held piece
    sends every peer's held HAVEs at once (Swarm._announce); one piece fewer stays held."""
    cfg = SwarmConfig()
    k = cfg.have_batch_pieces
    assert k >= 2 and cfg.have_batch > 10 * LATENCY
    sim, n1, others = node1_connected(cfg.have_batch_min_peers)
    units = [verify_from_seed(sim, n1) for _ in range(k - 1)]
    drain(sim, 0.5 + 3 * LATENCY)
    assert not any(knows(o, n1, u) for o in others for u in units)  # k - 1 held: still held
    units.append(verify_from_seed(sim, n1))
    drain(sim, 0.5 + 6 * LATENCY)  # far before `have_batch`
    assert all(knows(o, n1, u) for o in others for u in units)
    # the next piece starts a new hold, timed from itself
    nxt = verify_from_seed(sim, n1)
    drain(sim, 0.5 + cfg.have_batch - LATENCY)
    assert not all(knows(o, n1, nxt) for o in others)  # held (except where another frame took it along)
