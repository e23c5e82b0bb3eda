"""One artifact's swarm on this node: its peer connections, the download loop and seeding.

The swarm owns the picker (what to ask whom, and the record of requests in flight), the seed policy,
the piece store and the journal. Each connection's session reports events (bitfield, have, request,
reject, defer, piece, close) and the swarm answers through the sessions, so every scheduling
decision lives in one place. Connections come from a `Connector` (dialled) or from the daemon's
listener (accepted) as handshaken streams; the swarm never sees a socket.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import resource
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
import zstandard

from p2pd.config import SwarmConfig
from p2pd.connections import ConnectError, Connection, ConnectionPath, Connector
from p2pd.errors import CloseReason, ErrorCode
from p2pd.peer import WATCHDOG_EVERY, PeerConn
from p2pd.protocol import bitfield as bits
from p2pd.protocol import manifest as mf
from p2pd.protocol import session as ps
from p2pd.protocol import tcp_punch
from p2pd.protocol.chain import predecessor
from p2pd.protocol.nat import NatType
from p2pd.protocol.pacing import PeerRate, swarm_depth
from p2pd.protocol.picker import Picker, zone_stripe
from p2pd.protocol.ratelimit import Hierarchy
from p2pd.protocol.seeding import DistinctFirstSeeding
from p2pd.racing import RacingConnector
from p2pd.storage import Catalog, Journal, PieceStore, Record, StorageError

log = logging.getLogger(__name__)
VERIFIERS = 2  # pieces verified at once (in parallel when written from threads: pwrite releases the GIL)
INLINE_VERIFY_MAX_PIECE = 4 << 20  # pieces up to this size are hashed and written on the event loop...
INLINE_VERIFY_SLOW = 0.004  # ...unless that took longer than this (a disk under writeback pressure)
INLINE_VERIFY_BACKOFF = 2.0  # seconds spent verifying in threads after a slow inline write
VERIFY_QUEUE = 8  # received pieces waiting for a verifier, bounding memory to this many pieces
BUFFER_POOL_BYTES = 32 << 20  # idle piece buffers kept for reuse (a verifier queue's worth plus in-flight reads)
# Path ranks for the picker (0 best): a peer is asked only for what no better-ranked peer holds. Punched TCP is
# TCP end to end, as fast as direct; a UDP data channel is CPU-bound at a few MB/s; a relay shares one node's
# capacity among every pair it splices. A path not listed ranks between.
MAX_KNOWN_PEERS = 65536  # peers whose zone or NAT type a swarm remembers (a few MB at most)
FEW_PATHS_NATS = frozenset({NatType.SYMMETRIC.value})  # NAT types whose nodes reach only public nodes over TCP
# NAT types whose nodes are reached only by a punch (or the relay), never by a direct dial
PUNCHED_NATS = tcp_punch.CONES | {NatType.SYMMETRIC.value}  # the cones of the TCP birthday punch, and symmetric
PATH_RANK = {"direct": 0, "tcp-punch": 0, "udp-punch": 1, "relay": 2}


def path_rank(path: object) -> int:
    return PATH_RANK.get(str(path), 1)


def bytes_by_path(totals: dict[tuple[str, str], int]) -> dict[str, dict[str, int]]:
    """`path_totals` as JSON: {path: {"in": bytes, "out": bytes}}, so a run shows which path carried what."""
    out: dict[str, dict[str, int]] = {}
    for (path, direction), n in sorted(totals.items()):
        out.setdefault(path, {"in": 0, "out": 0})[direction] = n
    return out


def voluntary_switches() -> int:
    """Times this thread has blocked in the kernel (slept on I/O or a lock), not counting preemption."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw


class _NoDialling:
    """The connector of a swarm given none: it serves the peers that come to it and dials no one."""

    async def connect(self, remote_id: str, addr: tuple[str, int], artifact_id: str) -> Connection:
        raise ConnectError("this swarm was given no connector: it only serves")


class RateMeter:
    """Bytes per second over a sliding window (for status and progress, not for limiting)."""

    def __init__(self, window: float = 2.0) -> None:
        self.window = window
        self.samples: collections.deque[tuple[float, int]] = collections.deque()
        self.total = 0

    def add(self, n: int) -> None:
        now = time.monotonic()
        self.total += n
        self.samples.append((now, n))
        while self.samples and self.samples[0][0] < now - self.window:
            self.samples.popleft()

    def rate(self) -> float:
        now = time.monotonic()
        while self.samples and self.samples[0][0] < now - self.window:
            self.samples.popleft()
        return sum(n for _, n in self.samples) / self.window


class Swarm:
    def __init__(
        self,
        *,
        node_id: str,
        artifact_id: str,
        name: str,
        manifest: mf.Manifest,
        store: PieceStore,
        have: int,
        catalog: Catalog,
        config: SwarmConfig,
        egress: Hierarchy | None,
        ingress: Hierarchy | None,
        connector: Connector | None = None,
        journal: Journal | None = None,
        find_peers: Callable[[str], Awaitable[list[dict[str, Any]]]] | None = None,
        on_complete: Callable[[Swarm], None] | None = None,
        resumed_pieces: int = 0,
        zone: str = "",
        cross_limits: tuple[Hierarchy, Hierarchy] | None = None,
        on_damaged: Callable[[Swarm, int], None] | None = None,
        upgrader: Connector | None = None,
    ) -> None:
        self.node_id = node_id
        self.artifact_id = artifact_id
        self.name = name
        self.manifest = manifest
        self.store = store
        self.catalog = catalog
        self.config = config
        self._egress = egress
        self._ingress = ingress
        # connections to peers of another zone go through these instead (global cross-zone budget;
        # the last level of each is the cross-zone share: infinite while no such budget is set)
        self.zone = zone
        self.cross_limits = cross_limits
        # every peer's zone from the tracker's lists: a connection a peer opened to us carries no zone
        self.zones: dict[str, str] = {}
        # the peers behind a symmetric NAT, from the tracker's lists: they reach only public nodes fast
        # (`DistinctFirstSeeding.leave_to_few_paths`); a node that never looked peers up (a seed) knows none
        self.few_paths: set[str] = set()
        self.connector: Connector = connector or _NoDialling()  # a swarm that only serves (tests' seeds)
        # the UDP punch alone, to move a peer off the relay (`relay_upgrade_every`); None: no such path here
        self.upgrader = upgrader
        self._upgrade_at: dict[str, float] = {}  # relayed peer -> when to punch again
        self._upgrading = False  # one such punch at a time (each is a birthday punch at a symmetric node)
        self._dialled: dict[str, tuple[str, int]] = {}  # peer -> the address we dialled, while that connection lasts
        self.journal = journal
        self.find_peers = find_peers
        self.on_complete = on_complete
        self.on_damaged = on_damaged  # a piece we held failed verification on disk (the daemon repairs it)
        self.n = manifest.num_pieces
        self.have_mask = have
        self.chain_pred: str | None = None  # --chain: the node we fetch from (its id), from the tracker's lists
        self._held_writers: set[PeerConn] = set()  # --chain: writers holding a request for a piece to come
        self._chain_lookups = 0  # --chain: tracker lookups so far (the first one may list only some of the nodes)
        self._chain_refused = False  # --chain: our predecessor refused a piece; the swarm's rules from then on
        self._full = bits.full(self.n)
        # complete = in the cache; a staged download whose pieces are all verified still has to be finalized
        self.complete = have == self._full and journal is None
        self.downloading = not self.complete  # until finalized or failed
        # The picker stays after completion: it remembers the requests we cancelled, whose pieces may still arrive.
        self.picker: Picker[ps.PeerSession] = Picker(
            self.n,
            bits.indices(have),
            source_cap=config.download_sources,
            source_cap_min_peers=config.upload_slots_min_peers,
        )
        self.seeding: DistinctFirstSeeding[PeerConn] = DistinctFirstSeeding(
            self.n,
            # (not in a chain: a seed is asked by its successor alone, and a piece it sent to a node that asked before
            # the chain formed would be deferred to the successor, holding up every node after it until the end)
            enabled=config.seed_distinct and not config.chain,
            serve_tail=config.serve_tail,
            upload_slots=config.upload_slots,
            slots_min_peers=config.upload_slots_min_peers,
            few_paths_first=config.few_paths_first,
        )
        self.done = trio.Event()
        if self.complete:
            self.done.set()
        self.conns: dict[str, PeerConn] = {}
        self.rates: dict[PeerConn, PeerRate] = {}  # per connection: its delivery rate...
        self.depths: dict[PeerConn, int] = {}  # ...and the pipeline depth that rate asks for
        self.connecting: set[str] = set()
        # the dials under way (peer -> its cancel scope): one is called off once that peer's connection to us is
        # registered on a fast path (`_register`), else both ends of a NATed pair punch each other to the end
        self._dials: dict[str, trio.CancelScope] = {}
        # NATed peers that dial us (`_dial_is_theirs`) -> when we dial them anyway, if they have not by then
        self._theirs_until: dict[str, float] = {}
        self.banned: dict[str, str] = {}  # node id -> why; until ban_until (strikes expire: not for ever)
        self.ban_until: dict[str, float] = {}
        self.strikes: dict[str, list[float]] = {}  # node id -> times it sent a corrupt piece
        self.bad_from: dict[int, set[str]] = {}  # piece -> node ids that sent a corrupt copy of it
        self._no_source_since: dict[int, float] = {}  # piece -> since when only those had it
        self._nursery: trio.Nursery | None = None
        self.retry_after: dict[str, float] = {}
        self.down = RateMeter()
        self.up = RateMeter()
        self.resumed_pieces = resumed_pieces
        self.pieces_verified = 0  # by this process (metrics)
        self.pieces_failed = 0
        self._closed_bytes: collections.Counter[tuple[str, str]] = collections.Counter()  # (path, in|out) of closed
        self.error: str | None = None
        self.error_code = ErrorCode.STORAGE  # what kind of failure `error` is, once set
        self._compressible: dict[int, bool] = {}
        self._buffers: list[bytearray] = []
        self._threaded_verify_until = 0.0
        self._scope = trio.CancelScope()
        self.stopped = trio.Event()  # run() has returned: no task of this swarm touches its files any more
        self._peer_wakeup = trio.Event()
        self._haves_held = trio.Event()  # some connection holds HAVEs for `_have_flush_loop` to send
        self._held_pieces = 0  # pieces whose HAVEs are held since the last flush (`have_batch_pieces`)...
        self._held_since = 0.0  # ...and when the first of them was held (`have_batch`)
        self._verify_in, self._verify_out = trio.open_memory_channel[tuple[PeerConn, int, bytearray | bytes]](
            VERIFY_QUEUE
        )

    # -- queries -------------------------------------------------------------------------------------
    @property
    def egress(self) -> Hierarchy | None:
        """The upload limiter, or None while every level is unlimited (then sendfile runs unchunked)."""
        return None if self._egress is None or self._egress.unlimited else self._egress

    @property
    def ingress(self) -> Hierarchy | None:
        return None if self._ingress is None or self._ingress.unlimited else self._ingress

    def holds_requests(self) -> bool:
        """--chain while fetching: our successor asks ahead of our HAVEs, so a request for a piece we are still
        fetching waits for it (`PeerConn._held`) instead of a REJECT."""
        return self.config.chain and self.downloading

    def wake_on_piece(self, conn: PeerConn) -> None:
        self._held_writers.add(conn)

    def _wake_held(self) -> None:
        """A piece was verified (or we stopped fetching): writers holding requests look again."""
        for c in self._held_writers:
            c.wake_writer()
        self._held_writers.clear()

    def waits_on_chain(self, conn: PeerConn) -> bool:
        """Is `conn` our chain source while it is still fetching? Then its silence is its own wait for a piece,
        not a stall (the watchdog leaves it to `idle_timeout`)."""
        return self.picker.chain_source is conn.session and conn.session.remote_have != self._full

    def has_piece(self, i: int) -> bool:
        return bool(self.have_mask >> i & 1)

    @property
    def pieces_done(self) -> int:
        return self.have_mask.bit_count()

    @property
    def bytes_done(self) -> int:
        n = self.pieces_done * self.manifest.piece_size
        if self.has_piece(self.n - 1):
            n -= self.manifest.piece_size - self.manifest.piece_length(self.n - 1)
        return n

    @property
    def progress(self) -> float:
        """What the tracker is told: below 1.0 once a piece found corrupt on disk was dropped."""
        return self.pieces_done / max(1, self.n)

    def is_banned(self, node_id: str) -> bool:
        """Banned now (a ban ends after `strike_expiry`: the peer may have repaired its copy)."""
        until = self.ban_until.get(node_id)
        if until is None:
            return False
        if trio.current_time() >= until:
            del self.ban_until[node_id]
            self.banned.pop(node_id, None)
            self.strikes.pop(node_id, None)
            return False
        return True

    def should_compress(self, i: int) -> bool:
        """Compress pieces of files that compress (configs, tokenizers, tarballs), not weights."""
        if not self.config.compress:
            return False
        spans = self.store.layout.piece_spans(i)
        if not spans:
            return False
        fi, off, n = spans[0]
        if fi not in self._compressible:
            sample = self.store.pread(fi, min(n, 65536), off)  # a sample, not the whole piece
            packed = zstandard.ZstdCompressor(level=1).compress(sample)
            self._compressible[fi] = len(packed) < self.config.compressible_ratio * len(sample)
        return self._compressible[fi]

    def may_upload(self, conn: PeerConn, i: int) -> bool:
        """The writer's turn has come to send piece `i`: send it, or answer REJECT / DEFER instead."""
        if not self.has_piece(i):
            conn.session.reject(i)
            return False
        if self.seeding.defer_send(i, conn, conn.session.remote_have, complete=self.complete):
            conn.session.defer(i)
            return False
        if conn.limits is not None and not math.isinf(conn.limits[0].buckets[-1].rate):
            # a cross-zone budget is set and this peer (one we dialled: our zone's gateway pulls from
            # its zone) asks us for a piece: its zone has its own holders, so each piece crosses once
            conn.session.defer(i)
            return False
        self.seeding.sent(i)
        return True

    def take_buffer(self, length: int) -> bytearray:
        """A piece buffer, reused when possible: allocating (and zeroing) a fresh MiB-sized buffer per
        piece costs as much CPU as hashing it."""
        if length == self.manifest.piece_size and self._buffers:
            return self._buffers.pop()
        return bytearray(length)

    def give_buffer(self, buf: bytearray | bytes) -> None:
        # only our own bytearrays: a decompressed piece is immutable bytes and must never be refilled
        size = self.manifest.piece_size
        if isinstance(buf, bytearray) and len(buf) == size and (len(self._buffers) + 1) * size <= BUFFER_POOL_BYTES:
            self._buffers.append(buf)

    def note_upload(self, n: int) -> None:
        self.up.add(n)

    def path_totals(self) -> dict[tuple[str, str], int]:
        """Piece bytes on the wire by (connection path, "in" | "out"), closed connections included (metrics)."""
        totals = collections.Counter(self._closed_bytes)
        for c in self.conns.values():
            totals[(str(c.path), "in")] += c.bytes_down
            totals[(str(c.path), "out")] += c.bytes_up
        return dict(totals)

    def record(self) -> Record:
        return Record(self.artifact_id, self.name, self.store.root, False, self.manifest)

    def status(self) -> dict[str, Any]:
        seeding = self.seeding
        return {
            "artifact_id": self.artifact_id,
            "name": self.name,
            "kind": self.manifest.kind,
            "state": "complete" if self.complete else ("failed" if self.error else "downloading"),
            "size": self.manifest.total_size,
            "bytes_done": self.bytes_done,
            "pieces_done": self.pieces_done,
            "pieces_total": self.n,
            "peers": len(self.conns),
            "down_rate": self.down.rate(),
            "up_rate": self.up.rate(),
            "uploaded": self.up.total,
            "downloaded": self.down.total,
            "path": str(self.record().path if self.complete else self.store.root),
            "resumed_pieces": self.resumed_pieces,
            "banned_peers": sum(1 for nid in list(self.ban_until) if self.is_banned(nid)),
            "pieces_sent": seeding.pieces_sent,
            "pieces_sent_again": seeding.pieces_sent_again,
            "pieces_deferred": seeding.pieces_deferred,
            "bytes_by_path": bytes_by_path(self.path_totals()),
            "zone_stripe": list(self.picker.stripe_of),  # (index, count) of the picker's rule 7; count 0: off
            "connections": [
                {
                    "node_id": c.remote_id,
                    "addr": c.addr,
                    "path": str(c.path),
                    "initiator": c.initiator,
                    "bytes_down": c.bytes_down,
                    "bytes_up": c.bytes_up,
                    "cross_zone": c.cross_zone,
                }
                for c in self.conns.values()
            ],
            "error": self.error,
        }

    # -- connections ---------------------------------------------------------------------------------
    async def serve(self, conn: Connection, remote_zone: str = "") -> CloseReason | None:
        """Run a handshaken connection (dialled or accepted) until it ends; returns why it ended.

        The caller obtained the connection and closes its stream afterwards. `remote_zone` (from the
        tracker's peer list, for a connection we dialled): a peer in another zone is shaped by the
        cross-zone limits both ways (an accepted connection's zone is not known: it is not).
        """
        peer = PeerConn(self, conn)
        remote_zone = remote_zone or self.zones.get(conn.remote_id, "")
        peer.cross_zone = bool(remote_zone and self.zone and remote_zone != self.zone)
        if self.cross_limits is not None and peer.cross_zone:
            peer.limits = self.cross_limits
        if not self._register(peer):
            return CloseReason.DUPLICATE
        try:
            await peer.run()
        finally:
            self.on_close(peer)
        return peer.close_reason

    def keeps(self, remote_id: str, path: object, initiator: str) -> bool:
        """Would a connection to `remote_id` over `path`, opened by `initiator`, be adopted now? Of two between
        the same nodes, the better path wins, else the lower id's outgoing one: both ends see the same two
        connections on the same paths, so both keep the same one. (Traversal asks before and while it answers a
        punch, so that it stops one whose connection would be dropped on arrival.)"""
        existing = self.conns.get(remote_id)
        if existing is None:
            return True
        new_rank, old_rank = path_rank(path), path_rank(existing.path)
        winner = min(self.node_id, remote_id)
        return new_rank < old_rank or (new_rank == old_rank and initiator == winner and existing.initiator != winner)

    def _register(self, peer: PeerConn) -> bool:
        """Adopt a connection; of two between the same nodes, the lower id's outgoing one wins."""
        if self.is_banned(peer.remote_id) or self.error is not None or self.stopped.is_set():
            return False  # (a stopped swarm's watchdog timer, which bounds its connections' waits, is gone)
        existing = self.conns.get(peer.remote_id)
        if existing is not None:
            if not self.keeps(peer.remote_id, peer.path, peer.initiator):
                return False
            existing.close(CloseReason.DUPLICATE)
            self.on_close(existing)
        self.conns[peer.remote_id] = peer
        log.debug("%s: connected to %s (%s, %s)", self.name, peer.remote_id[:8], peer.addr, peer.path)
        dial = self._dials.get(peer.remote_id)
        if dial is not None and not self.keeps(peer.remote_id, ConnectionPath.DIRECT, self.node_id):
            # even the best our own dial could bring would lose to this one at both ends: its punches, and their
            # sockets, stop now
            dial.cancel()
        peer.session.send_bitfield(self.have_mask)
        return True

    def on_close(self, conn: PeerConn) -> None:
        """A connection ended (or lost a duplicate race): forget it, give its requests to others."""
        if self.conns.get(conn.remote_id) is conn:
            del self.conns[conn.remote_id]
        if not conn.booked:  # a duplicate that lost comes here twice: from `_register` and when its run ends
            conn.booked = True
            self._closed_bytes[(str(conn.path), "in")] += conn.bytes_down
            self._closed_bytes[(str(conn.path), "out")] += conn.bytes_up
        self.seeding.forget(conn)
        if conn.path == ConnectionPath.RELAY:
            self._upgrade_at.pop(conn.remote_id, None)
        self.rates.pop(conn, None)
        self.depths.pop(conn, None)
        if self.picker.knows(conn.session):
            self.picker.remove_peer(conn.session)
            self.fill_all()
        self._peer_wakeup.set()

    # -- session events ------------------------------------------------------------------------------
    def on_event(self, conn: PeerConn, event: ps.Event) -> None:
        picker, session = self.picker, conn.session
        if isinstance(event, ps.UploadRequested):
            i = event.index
            if (
                (
                    # (the scan only past the gate: it is per request, on the seed's hot path)
                    self.config.upload_slots
                    and len(self.conns) >= self.config.upload_slots_min_peers
                    and self.seeding.slots_busy(
                        conn,
                        [c for c in self.conns.values() if c.uploading or c.session.uploads],
                        peers=len(self.conns),
                    )
                )
                or (
                    self.complete
                    and self.seeding.enabled
                    and self.seeding.defer_request(
                        i,
                        conn,
                        {c: c.session.remote_have for c in self.conns.values()},
                        complete=True,
                        few_paths=conn.remote_id in self.few_paths,
                    )
                )
                or (self.few_paths and self._leave_to_few_paths(conn, i))
            ):
                session.defer(i)
            else:
                session.accept_upload(i)
        elif isinstance(event, ps.HavesReceived | ps.HaveReceived):
            indices = event.indices if isinstance(event, ps.HavesReceived) else (event.index,)
            knows, interesting = picker.knows(session), False
            for i in indices:
                bad = self.bad_from.get(i)
                if bad is not None:
                    bad.discard(conn.remote_id)  # it announces the piece again: it repaired its copy
                if knows and picker.peer_have(session, i):
                    interesting = True
            if interesting:
                self.fill(conn)  # once for a run: one batch of requests, not a refill per HAVE
        elif isinstance(event, ps.BitfieldReceived):
            if self.downloading and not conn.closed:
                mask = event.mask
                picker.add_peer(
                    session,
                    range(self.n) if mask == self._full else bits.indices(mask),
                    rank=self._rank(conn),
                    cross_zone=conn.cross_zone and self.config.zone_stripe,
                    last_resort=self.config.prefer_direct and self.config.slow_paths_last and path_rank(conn.path) > 0,
                )
                if self.chain_pred is not None and conn.remote_id == self.chain_pred:
                    picker.chain_source = session
                self.fill(conn)
        elif isinstance(event, ps.RequestRejected):
            if picker.chain_source is session:
                # it will not have the piece (it stopped fetching, or held our request too long): the swarm's rules
                picker.chain_source = None
                self._chain_refused = True
                log.info(
                    "%s: chain: %s refused piece %d; fetching by the swarm's rules",
                    self.name,
                    conn.remote_id[:8],
                    event.index,
                )
            if picker.knows(session):
                picker.request_failed(session, event.index, peer_lacks=True)
                self.fill_all()
        elif isinstance(event, ps.RequestDeferred) and picker.knows(session):
            picker.defer(session, event.index)
            if picker.rank:  # the piece may now be for a relayed peer, which waits for nothing else
                self.fill_all()
            else:
                self.fill(conn)
                if picker.capping and not picker.outstanding(session):
                    self.fill_all()  # it stopped serving us: a place among our capped sources is free
        elif isinstance(event, ps.BadPieceReported) and self._nursery is not None:
            self._nursery.start_soon(self._reverify, conn, event.index)

    def _rank(self, conn: PeerConn) -> int:
        """The picker's path rank of a peer: slower paths (relays) and other zones are asked last."""
        return (path_rank(conn.path) if self.config.prefer_direct else 0) + (
            1 if conn.cross_zone and self.config.prefer_zone else 0
        )

    def _learn_zones(self) -> None:
        """The tracker's lists told us zones: a connected peer found to be in another zone (it opened its
        connection before our lookups listed it, so `serve` did not know) is ranked as one now, and the
        picker's zone stripe follows the zone mates we know (rule 7)."""
        if not self.zone:
            return
        for c in self.conns.values():
            z = self.zones.get(c.remote_id, "")
            if not c.cross_zone and z and z != self.zone:
                c.cross_zone = True
                self.picker.set_rank(c.session, self._rank(c), cross_zone=self.config.zone_stripe)
        if self.config.zone_stripe:
            self.picker.set_stripe(*zone_stripe(self.node_id, self.zone, self.zones))

    def _leave_to_few_paths(self, conn: PeerConn, i: int) -> bool:
        """DEFER this request so that our uplink goes to a connected peer with few fast paths waiting on it?
        (The scans only while such a peer is connected: this is per request, on every uploader's hot path.)"""
        if conn.remote_id in self.few_paths or not self.seeding.few_paths_first:
            return False
        few = [c for c in self.conns.values() if c.remote_id in self.few_paths]
        if not few:
            return False
        return self.seeding.leave_to_few_paths(
            i,
            conn,
            {c: c.session.remote_have for c in self.conns.values()},
            few,
            waiting=any(c.uploading or c.session.uploads for c in few),
        )

    def fill(self, conn: PeerConn) -> None:
        """Keep the peer's pipeline as deep as its measured rate asks for (pacing.pipeline_depth)."""
        if self.downloading and not conn.closed:
            session = conn.session
            depth = self.depths.get(conn, self.config.pipeline_depth)
            if self.picker.chain_source is session:
                # a request ahead may wait there for a piece still on its way: more of them keep the link busy
                depth = max(depth, self.config.chain_ahead)
            session.request_more(depth)
            rate = self.rates.get(conn)
            if rate is None:
                rate = self.rates[conn] = PeerRate()
            if self.picker.outstanding(session):
                rate.waiting(trio.current_time())
            else:
                rate.idle()
            if self.picker.held_back and session not in self.picker.last_resort:
                # the direct peers may have nothing more to give: then the slow paths held back are asked now
                released = self.picker.release_held_back()
                for c in list(self.conns.values()):
                    if c.session in released:
                        self.fill(c)

    def fill_all(self) -> None:
        for c in list(self.conns.values()):
            self.fill(c)

    async def on_piece(self, conn: PeerConn, i: int, buf: bytearray | bytes, wire_len: int) -> None:
        """Hand a received piece to the verifiers, which refill its request slot once it is verified.

        Receiving the next piece overlaps with hashing and writing this one; the bounded channel
        pushes back on the reader when the disk falls behind. The slot is refilled after the
        verification (a fraction of a piece's transfer time) so that the next REQUEST leaves in the
        same segment as this piece's HAVE: one small send and one wakeup of the sender per piece
        instead of two, which at a thousand pieces a second is CPU that the transfer needs.
        """
        self.down.add(wire_len)
        rate = self.rates.get(conn)
        if rate is not None:
            rate.delivered(wire_len, trio.current_time(), more_waiting=self.picker.outstanding(conn.session) > 0)
            r = rate.rate
            if r is not None:
                self.picker.set_rate(conn.session, r)
                self.depths[conn] = swarm_depth(r, self.manifest.piece_size, self.config)
        conn.bytes_down += wire_len
        if self.has_piece(i) or not self.downloading:
            self.give_buffer(buf)
            self.fill(conn)
        else:
            await self._verify_in.send((conn, i, buf))

    async def _verifier(self) -> None:
        async for conn, i, buf in self._verify_out:
            if self.has_piece(i) or not self.downloading:
                self.give_buffer(buf)
                self.fill(conn)
                continue
            try:
                ok = await self._verify_and_write_soon(i, buf)
            except StorageError as e:  # disk full: this download stops, the daemon and its other work go on
                self.fail(str(e), e.code)
                return
            self.give_buffer(buf)
            if self.has_piece(i) or not self.downloading:
                self.fill(conn)
                continue
            if not ok:
                self.pieces_failed += 1
                self._bad_piece(conn, i)
                continue
            if not self.have_mask:
                log.debug("%s: first piece verified", self.name)
            self.have_mask |= 1 << i
            if self._held_writers:
                self._wake_held()
            self.pieces_verified += 1
            for session in self.picker.piece_verified(i):
                session.cancel(i)
            if self.journal is not None:
                self.journal.record(self.have_mask)
            self._announce(i)
            if self.picker.done:
                await self._finish()
            else:
                self.fill_all()

    def _announce(self, i: int) -> None:
        """HAVE to every peer: at once in a small swarm, else held for `have_batch` (`_have_flush_loop`) or
        until `have_batch_pieces` are held, whichever comes first: the hold saves wakeups, and must not withhold
        many pieces of news where pieces come fast."""
        cfg = self.config
        if cfg.have_batch <= 0 or len(self.conns) < cfg.have_batch_min_peers:
            for c in list(self.conns.values()):
                c.session.send_have(i)
            return
        for c in self.conns.values():
            c.session.hold_have(i)
        if not self._held_pieces:
            self._held_since = trio.current_time()
        self._held_pieces += 1
        if 0 < cfg.have_batch_pieces <= self._held_pieces:
            self._flush_haves()
        else:
            self._haves_held.set()

    def _flush_haves(self) -> None:
        """Every peer's held HAVEs out now, each peer's in one frame run; the next held one starts a new hold."""
        self._held_pieces = 0
        for c in list(self.conns.values()):
            c.session.flush_haves()

    async def _have_flush_loop(self) -> None:
        """Send the HAVEs held since the first of them `have_batch` seconds ago (unless `_announce` already has).

        Waits for the first held HAVE without a deadline, as the writers do: nothing is late while none is held.
        """
        while True:
            await self._haves_held.wait()
            self._haves_held = trio.Event()
            while self._held_pieces:  # a flush by count meanwhile starts a new hold: its own deadline
                due = self._held_since + self.config.have_batch
                if trio.current_time() >= due:
                    self._flush_haves()
                else:
                    await trio.sleep_until(due)

    def _bad_piece(self, conn: PeerConn, i: int) -> None:
        """A piece from `conn` fails verification: tell it (it re-verifies its copy), strike it, ask others.

        One bad piece can be a sender's disk gone bad, which it repairs once told; a peer that sends
        `strikes_to_ban` of them within `strike_expiry` is banned for that long, not for ever.
        """
        nid, cfg = conn.remote_id, self.config
        now = trio.current_time()
        self.picker.request_failed(conn.session, i, peer_lacks=True)
        self.bad_from.setdefault(i, set()).add(nid)
        if not conn.closed:
            conn.session.report_bad(i)
        strikes = [t for t in self.strikes.get(nid, []) if t > now - cfg.strike_expiry] + [now]
        self.strikes[nid] = strikes
        if len(strikes) >= cfg.strikes_to_ban:
            self.banned[nid] = f"sent {len(strikes)} corrupt pieces (last: {i})"
            self.ban_until[nid] = now + cfg.strike_expiry
            log.warning(
                "peer %s (%s) sent piece %d that fails verification: banned for %.0f s (%d strikes)",
                nid[:8],
                conn.addr,
                i,
                cfg.strike_expiry,
                len(strikes),
            )
            conn.close(CloseReason.BANNED, f"corrupt piece {i}")
        else:
            log.warning("peer %s (%s) sent piece %d that fails verification: told it", nid[:8], conn.addr, i)
        self.fill_all()

    def _check_sources(self) -> None:
        """Fail the download (INTEGRITY) when a piece has come only corrupt and nobody else has it.

        Waiting for ever would hang the fetch with every honest copy gone; `integrity_wait` gives
        other holders time to show up (peer lookups) and a struck sender time to repair its copy.
        """
        now = trio.current_time()
        for i, bad in list(self.bad_from.items()):
            if self.has_piece(i):
                del self.bad_from[i]
                self._no_source_since.pop(i, None)
                continue
            if any(
                c.remote_id not in bad and not self.is_banned(c.remote_id) and self.picker.peer_has(c.session, i)
                for c in self.conns.values()
            ):
                self._no_source_since.pop(i, None)
                continue
            since = self._no_source_since.setdefault(i, now)
            if now - since >= self.config.integrity_wait:
                who = ", ".join(sorted(n[:8] for n in bad)) or "peers since gone"
                self.fail(
                    f"piece {i} of {self.name} came only corrupt (from {who}) and no other peer has it: "
                    "republish it from a good copy",
                    ErrorCode.INTEGRITY,
                )
                return

    async def _reverify(self, conn: PeerConn, i: int) -> None:
        """`conn` says piece `i` we sent fails verification: check our copy on disk, drop it if rotten."""
        if not self.has_piece(i):
            return
        try:
            data = await trio.to_thread.run_sync(self.store.read_piece, i)
            ok = self.store.verify(i, data)
        except (OSError, StorageError) as e:
            log.error("%s: cannot re-read piece %d to check it: %s", self.name, i, e)
            ok = False
        if ok:
            log.info("%s: peer %s reported piece %d bad; our copy verifies", self.name, conn.remote_id[:8], i)
            return
        if not self.has_piece(i):
            return
        log.error(
            "%s: piece %d on disk fails verification (reported by %s): no longer serving it",
            self.name,
            i,
            conn.remote_id[:8],
        )
        self.have_mask &= ~(1 << i)
        if self.downloading:
            self.picker.piece_lost(i)
            if self.journal is not None:
                self.journal.record(self.have_mask)
            self.fill_all()
        if self.on_damaged is not None:
            self.on_damaged(self, i)

    def stop(self) -> None:
        """End `run` (its connections go with it); the caller then calls `leave`."""
        self._scope.cancel()

    async def _verify_and_write_soon(self, i: int, buf: bytearray | bytes) -> bool:
        """Hash and write a piece, on the event loop while that is fast, else in a worker thread.

        A worker thread per piece costs more than the work itself at MiB-sized pieces: the hand-offs
        and the GIL ping-pong between the receiving loop and the thread took a quarter of the
        receiver's CPU on loopback. Writes into the page cache take a fraction of a millisecond, so
        they run inline; when one takes longer because it slept in the kernel (dirty-page throttling
        on a slow disk) the next ones go to threads for a while so that uploads and heartbeats are not
        held up. A write that was slow only because other processes had the CPU (involuntary switches)
        is no reason: threads would then add their cost exactly when CPU is short.
        """
        now = time.monotonic()
        if len(buf) > INLINE_VERIFY_MAX_PIECE or now < self._threaded_verify_until:
            return await trio.to_thread.run_sync(self._verify_and_write, i, buf)
        slept_before = voluntary_switches()
        ok = self._verify_and_write(i, buf)
        took = time.monotonic() - now
        if took > INLINE_VERIFY_SLOW and voluntary_switches() > slept_before:
            self._threaded_verify_until = time.monotonic() + INLINE_VERIFY_BACKOFF
            log.debug(
                "%s: writing piece %d took %.1f ms: verifying in threads for %.0f s",
                self.name,
                i,
                took * 1e3,
                INLINE_VERIFY_BACKOFF,
            )
        await trio.lowlevel.checkpoint()
        return ok

    def _verify_and_write(self, i: int, buf: bytearray | bytes) -> bool:
        if not self.store.verify(i, buf):
            return False
        self.store.write_piece(i, buf)
        return True

    async def _finish(self) -> None:
        """Every piece verified: sync, move into the cache, record complete — in that order."""
        self.downloading = False
        self._wake_held()
        for session, pieces in self.picker.cancel_all().items():
            for i in pieces:
                session.cancel(i)

        def finalize() -> None:
            self.store.sync()
            if self.journal is not None:
                self.journal.close()
            self.store.root = self.catalog.finalize(self.artifact_id, self.name)

        try:
            await trio.to_thread.run_sync(finalize)
        except (OSError, StorageError) as e:  # stopped like any failed download, so a retry can start
            self.fail(f"could not finalize download: {e}", e.code if isinstance(e, StorageError) else ErrorCode.STORAGE)
            return
        self.complete = True
        self.journal = None
        self.done.set()
        log.info("%s (%s) complete: %d bytes verified", self.name, self.artifact_id[:12], self.manifest.total_size)
        if self.on_complete is not None:
            self.on_complete(self)

    # -- lifetime --------------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Owns the outgoing connections; while downloading, keeps finding and dialling peers."""
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._watchdog_loop)
                    nursery.start_soon(self._have_flush_loop)
                    task_status.started()
                    if self.downloading and self.picker.done:
                        await self._finish()  # every piece was already there (a crash right before finalizing)
                    if self.downloading:
                        for _ in range(VERIFIERS):
                            nursery.start_soon(self._verifier)
                        nursery.start_soon(self._undefer_loop)
                        await self._find_peers_loop(nursery)
                    await trio.sleep_forever()
        finally:
            self.stopped.set()

    def fail(self, reason: str, code: ErrorCode = ErrorCode.STORAGE) -> None:
        """Stop this download for good (the disk is full, ...): no more peers, the reason is `error`.

        The staging files and the journal stay as they are, so a later fetch resumes from every piece
        verified so far once the cause is fixed.
        """
        if self.error is not None:
            return
        self.error = reason
        self.error_code = code
        log.error("%s: download stopped: %s", self.name, reason)
        self.downloading = False
        self._wake_held()
        for c in list(self.conns.values()):
            c.close(CloseReason.DOWNLOAD_STOPPED, reason)
        self._scope.cancel()

    async def _watchdog_loop(self) -> None:
        """One timer for all connections (PeerConn.watchdog), not a sleeping task per connection."""
        while True:
            await trio.sleep(WATCHDOG_EVERY)
            now = trio.current_time()
            for c in list(self.conns.values()):
                c.watchdog(now)

    async def _undefer_loop(self) -> None:
        while self.downloading:
            await trio.sleep(self.config.defer_retry)
            if self.downloading and self.picker.undefer_all():
                self.fill_all()
            if self.downloading and self.bad_from:
                self._check_sources()

    async def _find_peers_loop(self, nursery: trio.Nursery) -> None:
        """Ask the tracker for peers: quickly at first, then every `peer_lookup_every` seconds.

        Peers released together (a job starting on many nodes) announce themselves at about the
        same time as their first lookup, which therefore finds only the seeds; the quick second
        and third lookups find each other within a fraction of a second, and every second without
        the mesh costs each of them its share of the seed's upload being all they receive.
        """
        cfg = self.config
        backoff = cfg.peer_lookup_first
        failed = False
        while not self.done.is_set():
            if len(self.conns) + len(self.connecting) < cfg.max_peers and self.find_peers is not None:
                try:
                    peers = await self.find_peers(self.artifact_id)
                    log.debug("%s: tracker listed %d peers", self.name, len(peers))
                    failed = False
                except Exception as e:  # tracker trouble must not kill the download: keep current peers
                    log.warning("%s: peer lookup failed: %s", self.name, e)
                    peers = []
                    failed = True
                now = trio.current_time()
                random.shuffle(peers)
                if len(self.zones) > MAX_KNOWN_PEERS:
                    self.zones.clear()  # bounded; the next lookups refill it
                if len(self.few_paths) > MAX_KNOWN_PEERS:
                    self.few_paths.clear()
                racing = self.connector if isinstance(self.connector, RacingConnector) else None
                for p in peers:
                    z = p.get("zone")
                    if isinstance(z, str) and z:
                        self.zones[p["node_id"]] = z
                    if p.get("nat_type") in FEW_PATHS_NATS:
                        self.few_paths.add(p["node_id"])
                    else:
                        self.few_paths.discard(p["node_id"])
                    if racing is not None:  # punch a NATed peer at once
                        racing.behind_nat(p["node_id"], p.get("nat_type") in PUNCHED_NATS)
                if peers:
                    self._learn_zones()
                if cfg.chain and peers and not self._learn_chain(peers):
                    peers = []  # the chain is not known yet: dial no one this round
                for p in peers:
                    nid = p["node_id"]
                    if len(self.conns) + len(self.connecting) >= cfg.max_peers:
                        break
                    if nid == self.node_id or nid in self.conns or nid in self.connecting or self.is_banned(nid):
                        continue
                    if self.retry_after.get(nid, 0) > now:
                        continue
                    if self.chain_pred is not None and not self._chain_refused and nid != self.chain_pred:
                        continue  # --chain: our predecessor is the one node we fetch from
                    if len(peers) < cfg.peers_per_lookup and self._dial_is_theirs(p, now):
                        continue
                    self.connecting.add(nid)
                    zone = p.get("zone")
                    addr = (str(p["addr"][0]), int(p["addr"][1]))
                    nursery.start_soon(self._dial, nid, addr, zone if isinstance(zone, str) else "")
            self._upgrade_relayed(nursery)
            wait = backoff
            idle_cap = cfg.peer_lookup_every if self.conns else cfg.peer_lookup_alone
            backoff = min(cfg.peer_lookup_failing if failed else idle_cap, backoff * 2)
            self._peer_wakeup = trio.Event()
            with trio.move_on_after(wait):
                await self._peer_wakeup.wait()
                await trio.sleep(0.05)  # a burst of closes is one wakeup

    def _learn_chain(self, peers: list[dict[str, Any]]) -> bool:
        """--chain: our predecessor in the order of the nodes this lookup listed (chain.py), and it as the picker's
        source once connected. Not once it has refused a piece: the swarm's rules (and its dials) then stay.

        False (dial no one yet) at the first lookup: nodes released together announce themselves about when they
        first look up, so that list holds the seeds and some of them at most, and by it a node may take a seed for
        its predecessor: every such node then costs the seed, whose upload is the whole chain's, pieces that are
        not the chain's (emulated 1 + 32: 1.04-1.05 F from the seed instead of 1.02). The next lookup,
        `peer_lookup_first` later, lists them; only the chain's first node loses that time."""
        self._chain_lookups += 1
        if self._chain_lookups == 1:
            return False
        if self._chain_refused:
            return True
        progress = {}
        for p in peers:
            v = p.get("progress", 1.0)
            progress[str(p["node_id"])] = float(v) if isinstance(v, int | float) else 0.0
        pred = predecessor(self.node_id, progress)
        if pred == self.chain_pred:
            return True
        self.chain_pred = pred
        log.info("%s: chain: fetching from %s", self.name, pred[:8] if pred else "(none: the swarm's rules)")
        old = self.picker.chain_source
        if old is not None:
            # what we asked of the node we took for our predecessor: its upload is the chain's, not ours
            for i in self.picker.withdraw(old):
                old.cancel(i)
        c = self.conns.get(pred) if pred is not None else None
        if c is not None and self.picker.knows(c.session):
            self.picker.chain_source = c.session
            self.fill(c)
        elif pred is None:
            self.picker.chain_source = None
        return True

    def _dial_is_theirs(self, p: dict[str, Any], now: float) -> bool:
        """Leave the dial to a peer found in a lookup that listed the whole swarm (so its own lookups list us)?

        Peers released together find each other at once and each dials the other. Towards a node behind a NAT
        each dial is a punch through the tracker, and between a cone and a symmetric NAT a birthday punch that
        holds 256 sockets at one end and sprays 2,000 SYNs/s from the other, with a place in each node's gate
        (`max_tcp_birthday_punches`, 4): in the NAT swarm a symmetric node was asked for 8 (4 cones both ways),
        the refused ones after the other end had begun, and every pair punched twice for one connection. So of
        two nodes that both download, the one with the lower id dials a NATed one; the other waits for it, and
        dials after all `nat_dial_wait` later if no connection came (the peer had no room, or its dial failed).
        A public peer is dialled at once (direct, no punch), a complete one too (it looks up no peers)."""
        nid = str(p["node_id"])
        progress = p.get("progress", 1.0)
        if p.get("nat_type") not in PUNCHED_NATS or not isinstance(progress, int | float) or progress >= 1.0:
            return False
        if nid > self.node_id:
            return False  # ours to dial
        if len(self._theirs_until) > MAX_KNOWN_PEERS:
            self._theirs_until.clear()  # bounded; at worst a peer is waited for once more
        return now < self._theirs_until.setdefault(nid, now + self.config.nat_dial_wait)

    def _upgrade_relayed(self, nursery: trio.Nursery) -> None:
        """Punch again to a peer we dialled and reach only through the relay, `relay_upgrade_every` after
        the last try: the punched connection, once handshaken, replaces the relayed one (`_register` keeps
        the better path at both ends; requests in flight on the relay are asked again)."""
        if self.upgrader is None or self._upgrading or not self.config.relay_upgrade_every:
            return
        now = trio.current_time()
        for c in list(self.conns.values()):
            addr = self._dialled.get(c.remote_id)
            if c.path != ConnectionPath.RELAY or c.initiator != self.node_id or addr is None:
                continue
            at = self._upgrade_at.setdefault(c.remote_id, now + self.config.relay_upgrade_every)
            if now >= at:
                self._upgrade_at[c.remote_id] = now + self.config.relay_upgrade_every
                self._upgrading = True
                nursery.start_soon(self._upgrade, self.upgrader, c.remote_id, addr)
                return

    async def _upgrade(self, upgrader: Connector, nid: str, addr: tuple[str, int]) -> None:
        try:
            conn = await upgrader.connect(nid, addr, self.artifact_id)
        except ConnectError as e:
            log.debug("%s: punch to relayed %s failed again (stays on the relay): %s", self.name, nid[:8], e)
            return
        finally:
            self._upgrading = False
        log.info("%s: %s moves from the relay to %s", self.name, nid[:8], conn.path)
        try:
            await self.serve(conn, self.zones.get(nid, ""))
        finally:
            await conn.aclose()

    async def _dial(self, nid: str, addr: tuple[str, int], zone: str = "") -> None:
        try:
            with trio.CancelScope() as scope:
                self._dials[nid] = scope
                conn = await self.connector.connect(nid, addr, self.artifact_id)
            if scope.cancelled_caught:
                log.debug("%s: dial to %s called off: it reached us first", self.name, nid[:8])
                return
        except ConnectError as e:
            log.debug("connect to %s failed: %s", nid[:8], e)
            self.retry_after[nid] = trio.current_time() + self.config.retry_after_failed_connect
            return
        finally:
            self.connecting.discard(nid)
            self._dials.pop(nid, None)
        self._dialled[nid] = addr
        try:
            reason = await self.serve(conn, zone)
        finally:
            self._dialled.pop(nid, None)
            await conn.aclose()
        if reason is CloseReason.STALLED:
            self.retry_after[nid] = trio.current_time() + self.config.retry_after_stall

    async def leave(self, reason: str) -> None:
        s = self.seeding
        if s.pieces_sent:
            log.info(
                "%s: uploaded %d pieces (%d of them again), deferred %d requests",
                self.name,
                s.pieces_sent,
                s.pieces_sent_again,
                s.pieces_deferred,
            )
        async with trio.open_nursery() as nursery:
            for c in list(self.conns.values()):
                nursery.start_soon(c.goodbye, reason)
        if self.journal is not None:
            self.journal.close()
        self.store.close()
