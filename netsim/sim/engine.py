"""The discrete-event, flow-level simulation of one swarm, every node running the daemon's own rules.

What is the daemon's code here, imported and driven the way p2pd.swarm and p2pd.peer drive it:
- which piece to ask which peer for, the record of requests in flight, endgame duplicates, deferrals
  and cancels: `p2pd.protocol.picker.Picker`, called in the swarm's order (add_peer on a bitfield,
  peer_have on a HAVE, next_request until `pipeline_depth` are outstanding, arrived / piece_verified /
  cancel_all, defer, request_failed, remove_peer, undefer_all every `defer_retry`);
- what a node uploads and what it defers: `p2pd.protocol.seeding.DistinctFirstSeeding`, asked at
  request time (defer_request, only once complete) and at send time (defer_send, then sent);
- each connection's pipeline depth, from the rate that peer delivers at while asked (`p2pd.protocol.pacing`
  PeerRate and pipeline_depth, updated where Swarm.fill and Swarm.on_piece update them): a peer slower
  than a piece per `slow_piece_time` holds one request, which on a thin link between zones is what keeps
  nodes of one zone from fetching the same piece across it together;
- peer counts, lookup schedule and every other number: `p2pd.config.SwarmConfig`;
- node rate limits: `p2pd.protocol.ratelimit` token buckets, whose long-run rate caps a node's link;
- peer lists, registration, heartbeats, leaves: `tracker.registry.Registry`, the tracker's state.

What is modelled instead of run: bytes move as flows whose rates are max-min fair over the nodes'
up- and downlinks (and the links between zones), recomputed whenever a flow starts or ends; each
connection's writer sends one unit at a time in request order, as PeerConn's writer does, and the control
frames queued to a peer while a unit is being sent to it follow that unit (one stream each way); control
messages take `latency` one way; HAVEs are held as Swarm._announce holds them (`have_batch` or
`have_batch_pieces` once a node has `have_batch_min_peers` connections, released early with any other frame
to that peer); hashing, disks, TCP
dynamics and the stall watchdog are not modelled.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import math
import random
from collections.abc import Callable
from typing import Any

import numpy as np

from netsim.sim.fairshare import IncrementalMaxMin, max_min_rates
from netsim.sim.scenario import Scenario
from p2pd.protocol.pacing import PeerRate, swarm_depth
from p2pd.protocol.picker import Arrival, Picker, zone_stripe
from p2pd.protocol.ratelimit import Hierarchy, TokenBucket
from p2pd.protocol.seeding import DistinctFirstSeeding
from tracker.registry import Registry

ARTIFACT = "sim-artifact"
BT_UNCHOKE_SLOTS = 4  # BitTorrent's regular unchoke slots (plus one optimistic)
BT_RECHOKE_EVERY = 10.0  # seconds between rechokes
BT_OPTIMISTIC_EVERY = 3  # rechokes between optimistic unchoke rotations (30 s)


class Node:
    """One node's state for the one artifact: its picker, its seed policy, its connections."""

    __slots__ = (
        "nid",
        "name",
        "up",
        "down",
        "zone",
        "seed",
        "picker",
        "seeding",
        "have",
        "complete",
        "downloading",
        "online",
        "queue",
        "sending",
        "remote_have",
        "connecting",
        "arrived",
        "done_at",
        "uploaded",
        "unchoked",
        "optimistic",
        "recv_from",
        "rechokes",
        "epoch",
        "rates",
        "depths",
        "zones",
        "held",
        "flush_due",
        "held_pieces",
        "hold_gen",
        "outbox",
    )

    def __init__(
        self,
        nid: int,
        up: float,
        down: float,
        zone: str,
        seed: bool,
        units: int,
        picker_seed: int,
        upload_slots: int,
        slots_min_peers: int,
        download_sources: int,
    ) -> None:
        self.nid = nid
        self.name = f"n{nid}"
        self.up = up
        self.down = down
        self.zone = zone
        self.seed = seed
        full = (1 << units) - 1
        self.picker: Picker[int] = Picker(
            units,
            range(units) if seed else (),
            seed=picker_seed,
            source_cap=download_sources,
            source_cap_min_peers=slots_min_peers,
        )
        self.seeding: DistinctFirstSeeding[int] = DistinctFirstSeeding(
            units, upload_slots=upload_slots, slots_min_peers=slots_min_peers
        )
        self.have = full if seed else 0
        self.complete = seed
        self.downloading = not seed
        self.online = False
        self.queue: dict[int, collections.deque[int]] = {}  # peer -> units it asked us for, not yet sent
        self.sending: dict[int, int] = {}  # peer -> flow slot of the unit being sent to it
        self.remote_have: dict[int, int] = {}  # peer -> units it announced (what the seed policy looks at)
        self.connecting: set[int] = set()
        self.arrived = math.nan
        self.done_at = 0.0 if seed else math.nan
        self.uploaded = 0
        self.unchoked: set[int] = set()  # bittorrent: peers we upload to
        self.optimistic: int | None = None
        self.recv_from: dict[int, int] = {}  # bittorrent: bytes received per peer since the last rechoke
        self.rechokes = 0
        self.epoch = 0  # bumped when the node leaves: its pending timers die
        self.rates: dict[int, PeerRate] = {}  # peer -> its delivery rate while our requests wait there...
        self.depths: dict[int, int] = {}  # ...and the pipeline depth that rate asks for (Swarm.rates, .depths)
        self.zones: dict[str, str] = {}  # node name -> zone, from the tracker's lists (Swarm.zones)
        self.held: dict[int, list[int]] = {}  # peer -> HAVEs held for it, oldest first (PeerSession.hold_have)
        self.flush_due = False  # a `_flush_haves` is scheduled (Swarm._have_flush_loop is sleeping)
        self.held_pieces = 0  # pieces held since the last flush (Swarm._held_pieces, `have_batch_pieces`)
        self.hold_gen = 0  # bumped by a flush by count: the timer of the hold it ended is void
        # peer -> control frames queued while our writer sends it a piece: they follow the piece on the stream
        self.outbox: dict[int, list[tuple[Callable[..., None], tuple[Any, ...]]]] = {}


class Flows:
    """Every transfer in progress, as numpy columns (a slot per flow, reused)."""

    def __init__(self, cap: int = 1024) -> None:
        self.src = np.zeros(cap, dtype=np.int64)
        self.dst = np.zeros(cap, dtype=np.int64)
        self.zl = np.full(cap, -1, dtype=np.int64)
        self.rem = np.zeros(cap)
        self.rate = np.zeros(cap)
        self.alive = np.zeros(cap, dtype=bool)
        self.unit = [0] * cap
        self.free = list(range(cap - 1, -1, -1))
        self.count = 0

    def _grow(self) -> None:
        cap = len(self.src)
        for name in ("src", "dst", "zl", "rem", "rate", "alive"):
            old = getattr(self, name)
            new = np.zeros(2 * cap, dtype=old.dtype)
            if name == "zl":
                new[:] = -1
            new[:cap] = old
            setattr(self, name, new)
        self.unit.extend([0] * cap)
        self.free.extend(range(2 * cap - 1, cap - 1, -1))

    def start(self, src: int, dst: int, zl: int, nbytes: float, unit: int) -> int:
        if not self.free:
            self._grow()
        s = self.free.pop()
        self.src[s], self.dst[s], self.zl[s], self.rem[s], self.rate[s] = src, dst, zl, nbytes, 0.0
        self.alive[s] = True
        self.unit[s] = unit
        self.count += 1
        return s

    def stop(self, s: int) -> None:
        self.alive[s] = False
        self.rate[s] = 0.0
        self.free.append(s)
        self.count -= 1


class Simulation:
    """One run of one scenario; `run()` returns the raw results (see netsim.sim.report)."""

    def __init__(self, sc: Scenario) -> None:
        self.sc = sc
        self.cfg = sc.swarm
        self.bt = sc.policy == "bittorrent"
        self.rng = random.Random(sc.rng_seed)
        self.registry = Registry(interval=sc.tracker.interval, rng=random.Random(sc.rng_seed + 1))
        self.units = sc.units
        self.serve_tail_units = -(-self.cfg.serve_tail // sc.grain)
        self.now = 0.0
        self.quantum = sc.quantum if sc.quantum is not None else sc.default_quantum()
        self.heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self.seq = itertools.count()
        self.flows = Flows()
        self.dirty = False
        # rates of flows that ended in this step, by their links: a flow started on the same links in the
        # same step takes one over (max-min rates depend only on which links each flow crosses, so the
        # allocation is unchanged and needs no recomputation); any left over at the step's end mean a change
        self.freed: dict[tuple[int, int, int], list[float]] = {}
        self.rates_reused = 0
        # HAVEs of units the receiver holds skip Picker.peer_have (same decisions, see _on_have); False: every
        # HAVE reaches the picker (the reference the tests compare against)
        self.skip_held_haves = True
        self.haves_skipped = 0
        # _fill skips Picker.next_request where it surely returns None (see nothing_to_request); False: always asks
        self.skip_empty_requests = True
        self.requests_skipped = 0
        self.nodes: list[Node] = []
        zones = sc.zones
        self.zone_index = {z: i for i, z in enumerate(zones)}
        for _ in range(sc.seeds):
            self._add_node(sc.seed_up, sc.seed_down, sc.seed_zone or zones[0], seed=True)
        for c in sc.classes:
            for _ in range(c.count):
                self._add_node(c.up, c.down, c.zone, seed=False)
        n = len(self.nodes)
        nz = len(zones)
        self.capacity = np.full(2 * n + nz * nz, float(sc.zone_link))
        for nd in self.nodes:
            self.capacity[nd.nid] = self._limited(nd.up, sc.egress_limit)
            self.capacity[n + nd.nid] = self._limited(nd.down, sc.ingress_limit)
        # the allocation kept up to date by re-solving what each change reaches; False: every change recomputes
        # all flows with max_min_rates (the reference the tests compare against)
        self.incremental = True
        self.maxmin = IncrementalMaxMin(self.capacity)
        self.zone_of = np.array([self.zone_index[nd.zone] for nd in self.nodes], dtype=np.int64)
        self.done_count = 0
        self.peers_total = sc.peers
        self.delivered = 0  # unit bytes that arrived whole and were wanted
        self.wasted = 0  # bytes of endgame duplicates and aborted transfers
        self.cross_zone = 0
        self.timeline: list[tuple[float, int, int, int]] = []  # (t, delivered, seed uploaded, nodes done)
        self.steps = 0
        self.recomputes = 0
        self.events = 0
        self.lookups_per_second: collections.Counter[int] = collections.Counter()

    # -- setup -----------------------------------------------------------------------------------
    def _limited(self, link: float, limit: float | None) -> float:
        """A node's link capped by its daemon's rate limit: a token bucket's long-run rate is its rate."""
        if limit is None:
            return link
        return min(link, Hierarchy(TokenBucket(limit)).rate)

    def _add_node(self, up: float, down: float, zone: str, *, seed: bool) -> None:
        nid = len(self.nodes)
        self.nodes.append(
            Node(
                nid,
                up,
                down,
                zone,
                seed,
                self.units,
                self.rng.getrandbits(32),
                self.cfg.upload_slots,
                self.cfg.upload_slots_min_peers,
                0 if self.bt else self.cfg.download_sources,  # BitTorrent's unchoking decides its sources
            )
        )
        if self.bt:
            self.nodes[-1].seeding.enabled = False  # BitTorrent has no seed rule

    # -- the event queue -------------------------------------------------------------------------
    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self.heap, (t, next(self.seq), fn, args))

    def run(self) -> None:
        sc = self.sc
        bound = sc.bound()
        for nd in self.nodes[: sc.seeds]:
            self.at(0.0, self._arrive, nd)
        t = 0.0
        for nd in self.nodes[sc.seeds :]:
            if sc.arrival_rate is not None:
                t += self.rng.expovariate(sc.arrival_rate)
            self.at(t, self._arrive, nd)
            if sc.churn and sc.churn_at is None and self.rng.random() < sc.churn:
                self.at(t + self.rng.uniform(0.0, bound), self._leave, nd, sc.churn_away)
        if sc.churn and sc.churn_at is not None:
            self.at(sc.churn_at, self._churn_at_once, round(sc.churn * self.peers_total), sc.churn_away)
        horizon = sc.horizon if sc.horizon is not None else 100 * bound + t + sc.churn_away
        self.at(0.0, self._tracker_tick)
        last_sample = -math.inf
        sample_every = bound / 200
        fl = self.flows
        while self.done_count < self.peers_total:
            if self.freed:
                self.dirty = True
                for src, dst, zl in self.freed:  # ended flows no new flow replaced
                    self.maxmin.touch([src, len(self.nodes) + dst, zl])
                self.freed.clear()
            if self.dirty:
                self._recompute()
            alive = np.flatnonzero(fl.alive)
            t_flow = math.inf
            if len(alive):
                t_flow = self.now + float(np.min(fl.rem[alive] / fl.rate[alive]))
            t_ev = self.heap[0][0] if self.heap else math.inf
            t_next = min(t_flow, t_ev)
            if t_next > horizon:
                break
            dt = t_next - self.now
            if len(alive) and dt > 0:
                fl.rem[alive] -= fl.rate[alive] * dt
            self.now = max(self.now, t_next)
            self.steps += 1
            if len(alive):
                done = alive[fl.rem[alive] <= fl.rate[alive] * self.quantum + 1e-3]
                for s in done.tolist():
                    if fl.alive[s]:
                        self._flow_done(s)
            end = self.now + self.quantum
            while self.heap and self.heap[0][0] <= end:
                _, _, fn, args = heapq.heappop(self.heap)
                self.events += 1
                fn(*args)
            if self.now - last_sample >= sample_every:
                last_sample = self.now
                self._sample()
        self._sample()

    def _sample(self) -> None:
        seed_up = sum(nd.uploaded for nd in self.nodes[: self.sc.seeds])
        self.timeline.append((self.now, self.delivered, seed_up, self.done_count))

    def _recompute(self) -> None:
        fl = self.flows
        if self.incremental:
            changed = self.maxmin.solve()
            if changed:
                fl.rate[list(changed)] = list(changed.values())
        else:
            idx = np.flatnonzero(fl.alive)
            n = len(self.nodes)
            fl.rate[idx] = max_min_rates(self.capacity, [fl.src[idx], n + fl.dst[idx], fl.zl[idx]])
            for s, r in zip(idx.tolist(), fl.rate[idx].tolist(), strict=True):
                self.maxmin.rate[s] = r  # the same state either way, so the flag may change between steps
            self.maxmin.touched.clear()
        self.dirty = False
        self.recomputes += 1

    # -- flows -----------------------------------------------------------------------------------
    def _start_flow(self, up: Node, dst: Node, unit: int) -> None:
        zl = -1
        if up.zone != dst.zone and math.isfinite(self.sc.zone_link):
            nz = len(self.zone_index)
            zl = 2 * len(self.nodes) + self.zone_index[up.zone] * nz + self.zone_index[dst.zone]
        s = self.flows.start(up.nid, dst.nid, zl, self.sc.unit_length(unit), unit)
        up.sending[dst.nid] = s
        links = [up.nid, len(self.nodes) + dst.nid, zl]
        same = self.freed.get((up.nid, dst.nid, zl))
        if same:
            self.flows.rate[s] = same.pop()
            self.maxmin.add(s, links, rate=float(self.flows.rate[s]))
            if not same:
                del self.freed[(up.nid, dst.nid, zl)]
            self.rates_reused += 1
        else:
            self.maxmin.add(s, links)
            self.flows.rate[s] = self.maxmin.rate[s]
            self.dirty = True

    def _abort_flow(self, s: int) -> None:
        self.wasted += int(self.sc.unit_length(self.flows.unit[s]) - max(0.0, float(self.flows.rem[s])))
        self.flows.stop(s)
        self.maxmin.remove(s)
        self.dirty = True

    def _flow_done(self, s: int) -> None:
        fl = self.flows
        up, dst, unit = self.nodes[int(fl.src[s])], self.nodes[int(fl.dst[s])], fl.unit[s]
        self.freed.setdefault((up.nid, dst.nid, int(fl.zl[s])), []).append(float(fl.rate[s]))
        fl.stop(s)
        self.maxmin.remove(s, settled=True)  # until the step's end shows whether a flow took its place
        length = self.sc.unit_length(unit)
        up.uploaded += length
        if up.zone != dst.zone:
            self.cross_zone += length
        del up.sending[dst.nid]
        box = up.outbox.pop(dst.nid, None)
        if box:  # PeerConn._writer, the piece sent: what was queued meanwhile goes out before the next piece
            for fn, args in box:
                self.at(self.now + self.sc.latency, fn, *args)
        self._next_upload(up, dst.nid)
        self._on_piece(dst, up.nid, unit, length)

    # -- uploading (the writer of each connection, and the swarm's may_upload) --------------------
    def _on_request(self, up: Node, rid: int, unit: int) -> None:
        if not up.online or rid not in up.queue:
            return  # the connection closed meanwhile: the requester's picker released the request
        if (not self.bt and self._slots_busy(up, rid)) or (
            up.complete and up.seeding.enabled and self._defer_request(up, rid, unit)
        ):
            self._frame(up, rid, self._on_defer, self.nodes[rid], up.nid, unit, up.epoch)
            return
        if self.bt and rid not in up.unchoked:  # a request from a choked peer is dropped, as the choke says
            self.at(self.now + self.sc.latency, self._bt_choked, self.nodes[rid], up.nid, [unit])
            return
        up.queue[rid].append(unit)
        if rid not in up.sending:
            self._next_upload(up, rid)

    def _slots_busy(self, up: Node, rid: int) -> bool:
        """Swarm.on_event's slot check (every node; BitTorrent has its own unchoke slots instead)."""
        s = up.seeding
        if not s.upload_slots or len(up.queue) < s.slots_min_peers:
            return False
        serving = {p for p, q in up.queue.items() if q} | up.sending.keys()
        return s.slots_busy(rid, serving, peers=len(up.queue))

    def _defer_request(self, up: Node, rid: int, unit: int) -> bool:
        seeding = up.seeding
        tail = seeding.serve_tail
        seeding.serve_tail = self.serve_tail_units
        try:
            return seeding.defer_request(unit, rid, up.remote_have, complete=True)
        finally:
            seeding.serve_tail = tail

    def _next_upload(self, up: Node, rid: int) -> None:
        """PeerConn._writer woken (an upload queued, or the last one sent): held HAVEs leave first, then a piece."""
        self._release_haves(up, rid)
        q = up.queue.get(rid)
        while q:
            unit = q.popleft()
            dst = self.nodes[rid]
            if not up.have >> unit & 1:
                self._frame(up, rid, self._on_reject, dst, up.nid, unit, up.epoch)
                continue
            if up.seeding.defer_send(unit, rid, up.remote_have.get(rid, 0), complete=up.complete):
                self._frame(up, rid, self._on_defer, dst, up.nid, unit, up.epoch)
                continue
            up.seeding.sent(unit)
            self._start_flow(up, dst, unit)
            return

    def _on_cancel(self, up: Node, rid: int, unit: int) -> None:
        q = up.queue.get(rid)
        if q is not None and unit in q:
            q.remove(unit)

    # -- downloading (the swarm's event handlers) ------------------------------------------------
    def _connected(self, a: Node, b: Node) -> bool:
        return b.nid in a.queue

    def _fill(self, nd: Node, pid: int) -> None:
        """Swarm.fill: ask for more, then note whether requests now wait at the peer (its rate counts only then)."""
        if not nd.downloading or pid not in nd.queue:
            return
        self._request_more(nd, pid)
        if self.bt:
            return  # BitTorrent's reference keeps the fixed pipeline
        rate = nd.rates.get(pid)
        if rate is None:
            rate = nd.rates[pid] = PeerRate()
        if nd.picker.pending.get(pid):  # outstanding(pid) > 0
            rate.waiting(self.now)
        else:
            rate.idle()

    def _paced(self, nd: Node, pid: int, length: int) -> None:
        """Swarm.on_piece's pacing: a requested piece arrived; the peer's rate sets its depth (and endgame order)."""
        rate = nd.rates.get(pid)
        if rate is None:
            return
        picker = nd.picker
        rate.delivered(length, self.now, more_waiting=picker.outstanding(pid) > 0)
        r = rate.rate
        if r is not None:
            picker.set_rate(pid, r)
            nd.depths[pid] = swarm_depth(r, self.sc.piece, self.cfg)

    def _request_more(self, nd: Node, pid: int) -> None:
        """session.request_more(depth): ask until the peer's depth of requests are outstanding (Swarm.depths:
        `pipeline_depth` until its rate is measured; looked up inline here and in `_fill_all` / `_on_have`)."""
        picker = nd.picker
        if not picker.knows(pid):
            return
        if self.bt and nd.nid not in self.nodes[pid].unchoked:
            if picker.interesting(pid):
                self._bt_interested(self.nodes[pid], nd)
            return
        if not picker.interesting(pid):
            return  # next_request would find nothing to ask this peer (and change nothing)
        depth = nd.depths.get(pid, self.cfg.pipeline_depth)
        up = self.nodes[pid]
        while picker.outstanding(pid) < depth:
            if self.skip_empty_requests and nothing_to_request(picker, pid):
                self.requests_skipped += 1
                break
            i = picker.next_request(pid)
            if i is None:
                break
            self._frame(nd, pid, self._on_request, up, nd.nid, i)

    def _fill_all(self, nd: Node) -> None:
        depth = self.cfg.pipeline_depth
        depths = nd.depths
        picker = nd.picker
        for pid in list(nd.queue):
            if picker.outstanding(pid) < depths.get(pid, depth):
                self._fill(nd, pid)

    def _on_defer(self, nd: Node, pid: int, unit: int, epoch: int) -> None:
        if nd.online and pid in nd.queue and nd.picker.knows(pid) and self.nodes[pid].epoch == epoch:
            nd.picker.defer(pid, unit)
            self._fill(nd, pid)
            if nd.picker.capping and not nd.picker.outstanding(pid):
                self._fill_all(nd)  # as Swarm.on_event: it stopped serving, a place among the sources is free

    def _on_reject(self, nd: Node, pid: int, unit: int, epoch: int) -> None:
        if nd.online and pid in nd.queue and nd.picker.knows(pid) and self.nodes[pid].epoch == epoch:
            nd.picker.request_failed(pid, unit, peer_lacks=True)
            self._fill_all(nd)

    def _on_piece(self, nd: Node, pid: int, unit: int, length: int) -> None:
        picker = nd.picker
        if self.bt:
            nd.recv_from[pid] = nd.recv_from.get(pid, 0) + length
        if picker.arrived(pid, unit) is not Arrival.EXPECTED:
            self.wasted += length  # cancelled (another copy won): read and dropped
            return
        self._paced(nd, pid, length)
        if nd.have >> unit & 1 or not nd.downloading:
            self.wasted += length
            self._fill(nd, pid)
            return
        self.delivered += length
        nd.have |= 1 << unit
        for peer in picker.piece_verified(unit):
            self._frame(nd, peer, self._on_cancel, self.nodes[peer], nd.nid, unit)
        self._announce(nd, unit)
        if picker.done:
            self._finish(nd)
        else:
            self._fill_all(nd)

    # -- frames from a node to one peer: control frames, and HAVEs at once or held ----------------
    def _frame(self, nd: Node, pid: int, fn: Callable[..., None], *args: Any) -> None:
        """A control frame from `nd` to `pid`: the HAVEs held for `pid` leave first (PeerSession._queue)."""
        self._release_haves(nd, pid)
        self._send(nd, pid, fn, args)

    def _send(self, nd: Node, pid: int, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        """One connection's writer sends a whole piece before the frames queued meanwhile (PeerConn._writer),
        and they share one TCP stream: a frame to a peer we are sending a piece to arrives after that piece.
        (Not for the BitTorrent reference: its clients interleave messages between 16 KiB blocks.)"""
        if not self.bt and pid in nd.sending:
            box = nd.outbox.get(pid)
            if box is None:
                nd.outbox[pid] = [(fn, args)]
            else:
                box.append((fn, args))
        else:
            self.at(self.now + self.sc.latency, fn, *args)

    def _release_haves(self, nd: Node, pid: int) -> None:
        held = nd.held.pop(pid, None)
        if held:
            self._send(nd, pid, self._on_haves, (nd, pid, held, nd.epoch))

    def _announce(self, nd: Node, unit: int) -> None:
        """Swarm._announce: a HAVE to every peer, at once in a swarm of fewer than `have_batch_min_peers`
        connections, else held (PeerSession.hold_have) until `have_batch` after the first held one
        (Swarm._have_flush_loop), until `have_batch_pieces` pieces are held, or until another frame goes to that
        peer, whichever comes first."""
        cfg = self.cfg
        if self.bt or cfg.have_batch <= 0 or len(nd.queue) < cfg.have_batch_min_peers:
            for pid in list(nd.held):  # held while it had more connections: they go first (PeerSession._queue)
                self._release_haves(nd, pid)
            busy = nd.sending
            now = [pid for pid in nd.queue if pid not in busy] if busy and not self.bt else list(nd.queue)
            self.at(self.now + self.sc.latency, self._on_have, nd, unit, now, nd.epoch)
            if len(now) < len(nd.queue):
                for pid in busy:
                    if pid in nd.queue:
                        self._send(nd, pid, self._on_haves, (nd, pid, [unit], nd.epoch))
            return
        for pid in nd.queue:
            held = nd.held.get(pid)
            if held is None:
                nd.held[pid] = [unit]
            else:
                held.append(unit)
        nd.held_pieces += self.sc.grain
        if 0 < cfg.have_batch_pieces <= nd.held_pieces:
            nd.hold_gen += 1
            self._flush_haves(nd, nd.epoch, nd.hold_gen)
        elif not nd.flush_due:
            nd.flush_due = True
            self.at(self.now + cfg.have_batch, self._flush_haves, nd, nd.epoch, nd.hold_gen)

    def _flush_haves(self, nd: Node, epoch: int, gen: int) -> None:
        if nd.epoch != epoch or nd.hold_gen != gen:
            return  # it left (and dropped what it held), or a flush by count ended that hold: a later hold times itself
        nd.flush_due = False
        nd.held_pieces = 0
        for pid in list(nd.held):
            self._release_haves(nd, pid)

    def _on_have(self, sender: Node, unit: int, peers: list[int], epoch: int) -> None:
        if sender.epoch != epoch:
            return
        nodes = self.nodes
        for pid in peers:
            self._have_at(sender, nodes[pid], unit)

    def _on_haves(self, sender: Node, pid: int, units: list[int], epoch: int) -> None:
        """Held HAVEs arrive at `pid` together, read one frame after another."""
        if sender.epoch != epoch:
            return
        nd = self.nodes[pid]
        for unit in units:
            self._have_at(sender, nd, unit)

    def _have_at(self, sender: Node, nd: Node, unit: int) -> None:
        sid = sender.nid
        if sid not in nd.queue:
            return
        bit = 1 << unit
        nd.remote_have[sid] = nd.remote_have.get(sid, 0) | bit
        picker = nd.picker
        if self.skip_held_haves and nd.downloading and nd.have & bit:
            # exact fast path: a HAVE for a unit the node holds changes only the availability count of a
            # piece the picker no longer looks at (every decision masks with `missing`), and returns False
            self.haves_skipped += 1
            return
        # _fill asks nothing while `depth` requests are out (BitTorrent's may still signal interest)
        if (
            nd.downloading
            and picker.knows(sid)
            and picker.peer_have(sid, unit)
            and (self.bt or picker.outstanding(sid) < nd.depths.get(sid, self.cfg.pipeline_depth))
        ):
            self._fill(nd, sid)

    def _finish(self, nd: Node) -> None:
        nd.downloading = False
        for peer, units in nd.picker.cancel_all().items():
            for u in units:
                self._frame(nd, peer, self._on_cancel, self.nodes[peer], nd.nid, u)
        nd.complete = True
        nd.done_at = self.now
        self.done_count += 1
        self._heartbeat(nd)  # the daemon announces a completion at once

    # -- connections, tracker, lifetime ----------------------------------------------------------
    def _arrive(self, nd: Node) -> None:
        nd.online = True
        if math.isnan(nd.arrived):
            nd.arrived = self.now
        self.registry.register(nd.name, "10.0.0.1", 7700, {"zone": nd.zone}, "sim", self.now)
        self._heartbeat(nd)
        self.at(self.now + self.sc.tracker.interval, self._heartbeat_loop, nd, nd.epoch)
        if nd.downloading:
            self._lookup_loop(nd, self.cfg.peer_lookup_first, nd.epoch)
            self.at(self.now + self.cfg.defer_retry, self._undefer_loop, nd, nd.epoch)
        if self.bt:
            self.at(self.now + self.rng.uniform(0, BT_RECHOKE_EVERY), self._bt_rechoke, nd, nd.epoch)

    def _heartbeat(self, nd: Node) -> None:
        progress = 1.0 if nd.complete else nd.have.bit_count() / self.units
        self.registry.heartbeat(nd.name, {ARTIFACT: progress}, self.now)

    def _heartbeat_loop(self, nd: Node, epoch: int) -> None:
        if nd.epoch != epoch or not nd.online:
            return
        self._heartbeat(nd)
        if self.done_count < self.peers_total:
            self.at(self.now + self.sc.tracker.interval, self._heartbeat_loop, nd, epoch)

    def _tracker_tick(self) -> None:
        self.registry.expire(self.now)
        if self.done_count < self.peers_total:
            self.at(self.now + self.sc.tracker.interval, self._tracker_tick)

    def _lookup_loop(self, nd: Node, backoff: float, epoch: int) -> None:
        """Swarm._find_peers_loop: look up while short of max_peers, quickly at first, then every few seconds."""
        if nd.epoch != epoch or not nd.online or nd.complete:
            return
        cfg = self.cfg
        if len(nd.queue) + len(nd.connecting) < cfg.max_peers:
            self.lookups_per_second[int(self.now)] += 1
            found = self.registry.peers(ARTIFACT, nd.name, cfg.peers_per_lookup)
            self.rng.shuffle(found)
            for p in found:
                if p["zone"]:
                    nd.zones[p["node_id"]] = p["zone"]
            if found and cfg.zone_stripe and not self.bt:  # as Swarm._find_peers_loop
                nd.picker.set_stripe(*zone_stripe(nd.name, nd.zone, nd.zones))
            for p in found:
                if len(nd.queue) + len(nd.connecting) >= cfg.max_peers:
                    break
                pid = int(p["node_id"][1:])
                if pid == nd.nid or pid in nd.queue or pid in nd.connecting:
                    continue
                nd.connecting.add(pid)
                self.at(self.now + 2 * self.sc.latency, self._connect, nd, self.nodes[pid], epoch)
        wait = backoff
        idle_cap = cfg.peer_lookup_every if nd.queue else cfg.peer_lookup_alone
        self.at(self.now + wait, self._lookup_loop, nd, min(idle_cap, backoff * 2), epoch)

    def _connect(self, a: Node, b: Node, epoch: int) -> None:
        a.connecting.discard(b.nid)
        if a.epoch != epoch or not a.online or not b.online or b.nid in a.queue:
            return
        for x, y in ((a, b), (b, a)):
            x.queue[y.nid] = collections.deque()
            x.remote_have[y.nid] = y.have
        for x, y in ((a, b), (b, a)):  # each side's BITFIELD arrives
            if x.downloading:
                x.picker.add_peer(
                    y.nid,
                    range(self.units) if y.have == x.picker.full else _bits(y.have),
                    rank=1 if x.zone != y.zone and self.sc.swarm.prefer_zone else 0,  # as p2pd/swarm.py ranks it
                    cross_zone=x.zone != y.zone and self.sc.swarm.zone_stripe,
                )
                self._fill(x, y.nid)

    def _close(self, a: Node, b: Node) -> None:
        for x, y in ((a, b), (b, a)):
            x.queue.pop(y.nid, None)
            s = x.sending.pop(y.nid, None)
            if s is not None:
                self._abort_flow(s)
            x.remote_have.pop(y.nid, None)
            x.seeding.forget(y.nid)
            x.unchoked.discard(y.nid)
            x.recv_from.pop(y.nid, None)
            x.rates.pop(y.nid, None)
            x.depths.pop(y.nid, None)
            x.held.pop(y.nid, None)
            x.outbox.pop(y.nid, None)
            if x.optimistic == y.nid:
                x.optimistic = None
        for x, y in ((a, b), (b, a)):
            if x.picker.knows(y.nid):
                x.picker.remove_peer(y.nid)
                if x.online:
                    self._fill_all(x)

    def _leave(self, nd: Node, away: float) -> None:
        if nd.complete or not nd.online:
            return
        nd.online = False
        nd.epoch += 1
        for pid in list(nd.queue):
            self._close(nd, self.nodes[pid])
        nd.connecting.clear()
        nd.held.clear()
        nd.flush_due = False
        nd.held_pieces = 0
        self.registry.leave(nd.name)
        self.at(self.now + away, self._arrive, nd)

    def _churn_at_once(self, count: int, away: float) -> None:
        """The bench's --churn K@T:D: the last `count` nodes still downloading leave together."""
        left = [nd for nd in reversed(self.nodes[self.sc.seeds :]) if nd.online and not nd.complete]
        for nd in left[:count]:
            self._leave(nd, away)

    def _undefer_loop(self, nd: Node, epoch: int) -> None:
        if nd.epoch != epoch or not nd.downloading:
            return
        if nd.picker.undefer_all():
            self._fill_all(nd)
        self.at(self.now + self.cfg.defer_retry, self._undefer_loop, nd, epoch)

    # -- the BitTorrent reference: tit-for-tat unchoking ------------------------------------------
    def _bt_interested(self, up: Node, nd: Node) -> None:
        """A peer wants something from `up`: unchoked at once while a regular slot is free."""
        regular = len(up.unchoked) - (up.optimistic is not None and up.optimistic in up.unchoked)
        if regular < BT_UNCHOKE_SLOTS and nd.nid not in up.unchoked and up.online:
            up.unchoked.add(nd.nid)
            self.at(self.now + self.sc.latency, self._fill, nd, up.nid)

    def _bt_rechoke(self, nd: Node, epoch: int) -> None:
        """Every 10 s: unchoke the 4 interested peers that gave us most (a seed: that took most), +1 optimistic."""
        if nd.epoch != epoch or not nd.online:
            return
        interested = [
            pid
            for pid in nd.queue
            if self.nodes[pid].downloading
            and self.nodes[pid].picker.knows(nd.nid)
            and self.nodes[pid].picker.interesting(nd.nid)
        ]
        if nd.complete:
            score = {pid: float(self._sent_to(nd, pid)) for pid in interested}
        else:
            score = {pid: float(nd.recv_from.get(pid, 0)) for pid in interested}
        self.rng.shuffle(interested)
        best = sorted(interested, key=lambda p: -score[p])[:BT_UNCHOKE_SLOTS]
        nd.rechokes += 1
        if nd.rechokes % BT_OPTIMISTIC_EVERY == 1 or nd.optimistic not in nd.queue:
            rest = [p for p in interested if p not in best]
            nd.optimistic = self.rng.choice(rest) if rest else None
        new = set(best) | ({nd.optimistic} if nd.optimistic is not None else set())
        for pid in nd.unchoked - new:
            self._bt_choke(nd, pid)
        added = new - nd.unchoked
        nd.unchoked = new
        for pid in added:
            self.at(self.now + self.sc.latency, self._fill, self.nodes[pid], nd.nid)
        nd.recv_from.clear()
        self.at(self.now + BT_RECHOKE_EVERY, self._bt_rechoke, nd, epoch)

    def _sent_to(self, nd: Node, pid: int) -> int:
        return self.nodes[pid].recv_from.get(nd.nid, 0)

    def _bt_choke(self, up: Node, pid: int) -> None:
        """Choking drops the peer's queued requests (not the unit being sent); it asks others for them."""
        q = up.queue.get(pid)
        dropped = list(q) if q else []
        if q:
            q.clear()
        self.at(self.now + self.sc.latency, self._bt_choked, self.nodes[pid], up.nid, dropped)

    def _bt_choked(self, nd: Node, pid: int, dropped: list[int]) -> None:
        if not nd.picker.knows(pid):
            return
        pending = nd.picker.pending.get(pid, set())
        for unit in dropped:
            if unit in pending:
                nd.picker.request_failed(pid, unit)
        if dropped:
            self._fill_all(nd)


def nothing_to_request(picker: Picker[int], pid: int) -> bool:
    """True only where `picker.next_request(pid)` would return None and change nothing: before the endgame
    (some missing piece not yet in flight), a peer offering no missing piece that is neither in flight nor
    deferred there has nothing to give (path ranks only remove candidates). Most of a run's `_fill` calls end
    so (after each arrival every connection is asked again), and this is a few big-int operations instead of
    the picker's call; tests/unit/test_sim_fastpath.py checks it against the picker on random states."""
    free = picker.missing & ~picker.inflight_mask
    return bool(free) and not picker.peer_mask[pid] & free & ~picker.deferred.get(pid, 0)


def _bits(mask: int) -> list[int]:
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out
