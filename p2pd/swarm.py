"""One artifact's swarm on this node: its peer connections, the download loop and seeding.

The swarm owns the picker (what to ask whom), the piece store and the journal. Connections report
events (bitfield, have, piece, reject, close) and the swarm answers by queueing requests, so all
scheduling decisions live in one place and connections stay dumb pipes.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import resource
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
import zstandard

from p2pd.peer import PeerClosed, PeerConn, SockIO, read_handshake, tune_socket
from p2pd.protocol import bitfield as bits
from p2pd.protocol import manifest as mf
from p2pd.protocol import wire
from p2pd.protocol.picker import Picker
from p2pd.protocol.ratelimit import Hierarchy
from p2pd.storage import Catalog, Journal, PieceStore, Record, StorageError

log = logging.getLogger(__name__)
VERIFIERS = 2  # pieces verified at once (in parallel when written from threads: pwrite releases the GIL)
INLINE_VERIFY_MAX_PIECE = 4 << 20  # pieces up to this size are hashed and written on the event loop...
INLINE_VERIFY_SLOW = 0.004  # ...unless that took longer than this (a disk under writeback pressure)
INLINE_VERIFY_BACKOFF = 2.0  # seconds spent verifying in threads after a slow inline write
SERVE_TAIL = 16  # a complete node always serves a peer missing at most this many pieces
PEER_LOOKUP_FIRST = 0.25  # seconds between the first two tracker lookups of a download (then doubling)...
PEER_LOOKUP_EVERY = 2.0  # ...up to this while connected to someone
PEER_LOOKUP_ALONE = 0.5  # ...or this while connected to no one
DEFER_RETRY = 0.5  # seconds before asking a peer again for pieces it deferred
VERIFY_QUEUE = 8  # received pieces waiting for a verifier, bounding memory to this many pieces
BUFFER_POOL_BYTES = 32 << 20  # idle piece buffers kept for reuse (a verifier queue's worth plus in-flight reads)


def voluntary_switches() -> int:
    """Times this thread has blocked in the kernel (slept on I/O or a lock), not counting preemption."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw


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


class SwarmConfig:
    def __init__(self, *, max_peers: int = 24, pipeline_depth: int = 2, stall_timeout: float = 1.0,
                 compress: bool = True, seed_distinct: bool = True) -> None:
        self.max_peers = max_peers
        self.pipeline_depth = pipeline_depth
        self.stall_timeout = stall_timeout
        self.compress = compress
        self.seed_distinct = seed_distinct


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
        journal: Journal | None = None,
        find_peers: Callable[[str], Awaitable[list[dict[str, Any]]]] | None = None,
        on_complete: Callable[[Swarm], None] | None = None,
        resumed_pieces: int = 0,
    ) -> None:
        self.node_id = node_id
        self.artifact_id = artifact_id
        self.name = name
        self.manifest = manifest
        self.store = store
        self.catalog = catalog
        self.config = config
        self.stall_timeout = config.stall_timeout
        self._egress = egress
        self._ingress = ingress
        self.journal = journal
        self.find_peers = find_peers
        self.on_complete = on_complete
        self.n = manifest.num_pieces
        self.have_mask = have
        self._full = bits.full(self.n)
        self.complete = have == self._full
        self.picker: Picker | None = None if self.complete else Picker(self.n, bits.indices(have))
        self.done = trio.Event()
        if self.complete:
            self.done.set()
        self.conns: dict[str, PeerConn] = {}
        self.connecting: set[str] = set()
        self.banned: dict[str, str] = {}
        self.retry_after: dict[str, float] = {}
        self.down = RateMeter()
        self.up = RateMeter()
        self.resumed_pieces = resumed_pieces
        self.error: str | None = None
        self._compressible: dict[int, bool] = {}
        self._sent = bytearray(self.n)  # uploads per piece (saturating), for the seed's distinct-first policy
        self._unsent = self.n
        self.pieces_sent = 0  # uploads of pieces, counting repeats
        self.pieces_deferred = 0  # requests answered with DEFER (seed policy)
        self._buffers: list[bytearray] = []
        self._threaded_verify_until = 0.0
        self._nursery: trio.Nursery | None = None
        self._scope = trio.CancelScope()
        self.stopped = trio.Event()  # run() has returned: no task of this swarm touches its files any more
        self._peer_wakeup = trio.Event()
        self._verify_in, self._verify_out = trio.open_memory_channel[tuple[PeerConn, int, bytearray]](VERIFY_QUEUE)

    # -- queries -------------------------------------------------------------------------------------
    @property
    def egress(self) -> Hierarchy | None:
        """The upload limiter, or None while every level is unlimited (then sendfile runs unchunked)."""
        return None if self._egress is None or self._egress.unlimited else self._egress

    @property
    def ingress(self) -> Hierarchy | None:
        return None if self._ingress is None or self._ingress.unlimited else self._ingress

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
        return 1.0 if self.complete else self.pieces_done / max(1, self.n)

    @property
    def pieces_sent_again(self) -> int:
        """Uploads of pieces this node had uploaded before (a seed's copies cost the whole swarm)."""
        return self.pieces_sent - (self.n - self._unsent)

    def should_compress(self, i: int) -> bool:
        """Compress pieces of files that compress (configs, tokenizers, tarballs), not weights."""
        if not self.config.compress:
            return False
        spans = self.store.layout.piece_spans(i)
        if not spans:
            return False
        fi, off, n = spans[0]
        if fi not in self._compressible:
            sample = os.pread(self.store.fd(fi), min(n, 65536), off)  # a sample, not the whole piece
            self._compressible[fi] = len(zstandard.ZstdCompressor(level=1).compress(sample)) < 0.8 * len(sample)
        return self._compressible[fi]

    def should_defer(self, requester: PeerConn, i: int) -> bool:
        """Seed policy: upload what nobody else can, send everything else to the peers that have it.

        Duplicate uploads from the seed are what keeps BitTorrent above the Kumar–Ross bound: while
        some piece was never sent, the seed's upload is the swarm's bottleneck, and every copy it
        sends of a piece already out costs the whole swarm that much time. So a complete node
        defers (DEFER: "ask someone else") any piece it already sent while some piece was never
        sent; the requester is not left idle, because it still needs every unsent piece, which
        only we can give. Once everything was sent, it defers a piece that another connected,
        incomplete peer has announced, but only once per requester and piece, and never to a
        requester missing only a few pieces, so that deferral cannot stretch the tail; and never
        to another complete node, or two seeds would send everyone back and forth.
        """
        if not (self.config.seed_distinct and self.complete) or len(self.conns) < 2:
            return False
        if self.sent_while_unsent_remain(i):
            return True
        if self.n - requester.have_mask.bit_count() <= SERVE_TAIL or i in requester.deferred:
            return False  # the tail, or asked again after a deferral: the requester found no one else
        bit = 1 << i
        if any(c is not requester and c.have_mask & bit and c.have_mask != self._full for c in self.conns.values()):
            requester.deferred.add(i)
            self.pieces_deferred += 1
            return True
        return False

    def sent_while_unsent_remain(self, i: int) -> bool:
        """Distinct-first, checked when a request arrives and again when its turn to be sent comes
        (two peers may have asked for the same piece before either copy went out)."""
        if self.config.seed_distinct and self.complete and self._unsent > 0 and self._sent[i] > 0:
            self.pieces_deferred += 1
            return True
        return False

    def note_piece_sent(self, i: int) -> None:
        self.pieces_sent += 1
        if self._sent[i] == 0:
            self._unsent -= 1
            if self._unsent == 0 and self.complete:
                log.debug("%s: every piece uploaded at least once", self.name)
        if self._sent[i] < 255:
            self._sent[i] += 1

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

    def record(self) -> Record:
        return Record(self.artifact_id, self.name, self.store.root, False, self.manifest)

    def status(self) -> dict[str, Any]:
        return {
            "artifact_id": self.artifact_id, "name": self.name, "kind": self.manifest.kind,
            "state": "complete" if self.complete else ("failed" if self.error else "downloading"),
            "size": self.manifest.total_size, "bytes_done": self.bytes_done, "pieces_done": self.pieces_done,
            "pieces_total": self.n, "peers": len(self.conns), "down_rate": self.down.rate(), "up_rate": self.up.rate(),
            "uploaded": self.up.total, "downloaded": self.down.total,
            "path": str(self.record().path if self.complete else self.store.root),
            "resumed_pieces": self.resumed_pieces, "banned_peers": len(self.banned),
            "pieces_sent": self.pieces_sent, "pieces_sent_again": self.pieces_sent_again,
            "pieces_deferred": self.pieces_deferred,
            "error": self.error,
        }

    # -- connection events ---------------------------------------------------------------------------
    def register(self, conn: PeerConn) -> bool:
        """Adopt a handshaken connection; of two between the same nodes, the lower id's outgoing one wins."""
        if conn.remote_id in self.banned or self.error is not None:
            return False
        existing = self.conns.get(conn.remote_id)
        if existing is not None:
            winner = min(self.node_id, conn.remote_id)
            if conn.initiator != winner or existing.initiator == winner:
                return False
            existing.close("duplicate connection")
            self.on_close(existing)
        self.conns[conn.remote_id] = conn
        log.debug("%s: connected to %s (%s)", self.name, conn.remote_id[:8], conn.addr)
        conn.queue(wire.Bitfield(bits.to_bytes(self.have_mask, self.n)))
        return True

    def on_bitfield(self, conn: PeerConn, raw: bytes) -> None:
        mask = bits.from_bytes(raw, self.n)
        conn.have_mask = mask
        if self.picker is not None and conn.closed_reason is None:
            self.picker.add_peer(conn, range(self.n) if mask == self._full else bits.indices(mask))
            self.fill(conn)

    def on_have(self, conn: PeerConn, i: int) -> None:
        if not 0 <= i < self.n:
            raise wire.ProtocolError(f"HAVE for piece {i} out of range")
        conn.have_mask |= 1 << i
        if self.picker is not None and conn in self.picker.peer_mask and self.picker.peer_have(conn, i):
            self.fill(conn)

    def on_reject(self, conn: PeerConn, i: int) -> None:
        if self.picker is not None and conn in self.picker.peer_mask:
            self.picker.request_failed(conn, i, peer_lacks=True)
            self.fill_all()

    def on_defer(self, conn: PeerConn, i: int) -> None:
        if self.picker is not None and conn in self.picker.peer_mask:
            self.picker.defer(conn, i)
            self.fill(conn)

    def on_close(self, conn: PeerConn) -> None:
        if self.conns.get(conn.remote_id) is conn:
            del self.conns[conn.remote_id]
        if self.picker is not None and conn in self.picker.peer_mask:
            self.picker.remove_peer(conn)
            conn.outstanding.clear()
            self.fill_all()
        self._peer_wakeup.set()

    def fill(self, conn: PeerConn) -> None:
        picker = self.picker
        if picker is None or conn.closed_reason is not None or conn not in picker.peer_mask:
            return
        depth = self.config.pipeline_depth
        while len(conn.outstanding) < depth:
            i = picker.next_request(conn)
            if i is None or i in conn.outstanding:
                break
            conn.request(i)

    def fill_all(self) -> None:
        for c in list(self.conns.values()):
            self.fill(c)

    async def on_piece(self, conn: PeerConn, i: int, buf: bytearray, wire_len: int) -> None:
        """Hand a received piece to the verifiers, which refill its request slot once it is verified.

        Receiving the next piece overlaps with hashing and writing this one; the bounded channel
        pushes back on the reader when the disk falls behind. The slot is refilled after the
        verification (a fraction of a piece's transfer time) so that the next REQUEST leaves in the
        same segment as this piece's HAVE: one small send and one wakeup of the sender per piece
        instead of two, which at a thousand pieces a second is CPU that the transfer needs.
        """
        self.down.add(wire_len)
        if self.has_piece(i) or self.picker is None:
            self.give_buffer(buf)
            self.fill(conn)
        else:
            await self._verify_in.send((conn, i, buf))

    async def _verifier(self) -> None:
        async for conn, i, buf in self._verify_out:
            if self.has_piece(i) or self.picker is None:
                self.give_buffer(buf)
                self.fill(conn)
                continue
            try:
                ok = await self._verify_and_write_soon(i, buf)
            except StorageError as e:  # disk full: this download stops, the daemon and its other work go on
                self.fail(str(e))
                return
            self.give_buffer(buf)
            if self.has_piece(i) or self.picker is None:
                self.fill(conn)
                continue
            if not ok:
                self.picker.request_failed(conn, i)
                self.banned[conn.remote_id] = f"sent corrupt piece {i}"
                log.warning("peer %s (%s) sent piece %d that fails verification: banned",
                            conn.remote_id[:8], conn.addr, i)
                conn.close(f"banned: corrupt piece {i}")
                self.fill_all()
                continue
            if not self.have_mask:
                log.debug("%s: first piece verified", self.name)
            self.have_mask |= 1 << i
            for other in self.picker.piece_verified(i):
                if other is not conn:
                    other.cancel(i)
            if self.journal is not None:
                self.journal.record(self.have_mask)
            have = wire.Have(i)
            for c in list(self.conns.values()):
                c.queue(have)
            if self.picker.done:
                await self._finish()
            else:
                self.fill_all()

    async def _verify_and_write_soon(self, i: int, buf: bytearray) -> bool:
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
            log.debug("%s: writing piece %d took %.1f ms: verifying in threads for %.0f s",
                      self.name, i, took * 1e3, INLINE_VERIFY_BACKOFF)
        await trio.lowlevel.checkpoint()
        return ok

    def _verify_and_write(self, i: int, buf: bytearray) -> bool:
        if not self.store.verify(i, buf):
            return False
        self.store.write_piece(i, buf)
        return True

    async def _finish(self) -> None:
        """Every piece verified: sync, move into the cache, record complete — in that order."""
        self.picker = None
        for c in self.conns.values():
            c.outstanding.clear()

        def finalize() -> None:
            self.store.sync()
            if self.journal is not None:
                self.journal.close()
            self.store.root = self.catalog.finalize(self.artifact_id, self.name)

        try:
            await trio.to_thread.run_sync(finalize)
        except (OSError, StorageError) as e:
            self.fail(f"could not finalize download: {e}")  # stopped like any failed download, so a retry can start
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
                    task_status.started()
                    if not self.complete:
                        for _ in range(VERIFIERS):
                            nursery.start_soon(self._verifier)
                        nursery.start_soon(self._undefer_loop)
                        await self._find_peers_loop(nursery)
                    await trio.sleep_forever()
        finally:
            self.stopped.set()

    def fail(self, reason: str) -> None:
        """Stop this download for good (the disk is full, ...): no more peers, the reason is `error`.

        The staging files and the journal stay as they are, so a later fetch resumes from every piece
        verified so far once the cause is fixed.
        """
        if self.error is not None:
            return
        self.error = reason
        log.error("%s: download stopped: %s", self.name, reason)
        self.picker = None
        for c in list(self.conns.values()):
            c.close(f"download stopped: {reason}")
        self._scope.cancel()

    async def _undefer_loop(self) -> None:
        while self.picker is not None:
            await trio.sleep(DEFER_RETRY)
            if self.picker is not None and self.picker.undefer_all():
                self.fill_all()

    async def _find_peers_loop(self, nursery: trio.Nursery) -> None:
        """Ask the tracker for peers: quickly at first, then every PEER_LOOKUP_EVERY seconds.

        Peers released together (a job starting on many nodes) announce themselves at about the
        same time as their first lookup, which therefore finds only the seeds; the quick second
        and third lookups find each other within a fraction of a second, and every second without
        the mesh costs each of them its share of the seed's upload being all they receive.
        """
        backoff = PEER_LOOKUP_FIRST
        failed = False
        while not self.done.is_set():
            if len(self.conns) + len(self.connecting) < self.config.max_peers and self.find_peers is not None:
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
                for p in peers:
                    nid = p["node_id"]
                    if len(self.conns) + len(self.connecting) >= self.config.max_peers:
                        break
                    if nid == self.node_id or nid in self.conns or nid in self.connecting or nid in self.banned:
                        continue
                    if self.retry_after.get(nid, 0) > now:
                        continue
                    self.connecting.add(nid)
                    nursery.start_soon(self.connect, nid, str(p["addr"][0]), int(p["addr"][1]))
            wait = backoff
            idle_cap = PEER_LOOKUP_EVERY if self.conns else PEER_LOOKUP_ALONE
            backoff = min(5.0 if failed else idle_cap, backoff * 2)
            self._peer_wakeup = trio.Event()
            with trio.move_on_after(wait):
                await self._peer_wakeup.wait()
                await trio.sleep(0.05)  # a burst of closes is one wakeup

    async def connect(self, nid: str, host: str, port: int) -> None:
        addr = f"{host}:{port}"
        try:
            sock = trio.socket.socket(trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET)
            try:
                tune_socket(sock)
                with trio.fail_after(3):
                    await sock.connect((host, port))
                io = SockIO(sock)
                await io.send_all(wire.encode(wire.Handshake(wire.PROTOCOL_VERSION, self.node_id, self.artifact_id)))
                hs = await read_handshake(io)
                if hs.artifact_id != self.artifact_id or hs.node_id != nid:
                    raise wire.ProtocolError(f"{addr} answered as {hs.node_id[:8]} for {hs.artifact_id[:12]}")
            except BaseException:
                sock.close()
                raise
        except (OSError, trio.TooSlowError, PeerClosed, wire.ProtocolError) as e:
            log.debug("connect to %s failed: %s", addr, e)
            self.retry_after[nid] = trio.current_time() + 2.0
            self.connecting.discard(nid)
            return
        self.connecting.discard(nid)
        conn = PeerConn(self, io, nid, addr, initiator=self.node_id)
        if not self.register(conn):
            sock.close()
            return
        await conn.run()
        if conn.closed_reason and "stalled" in conn.closed_reason:
            self.retry_after[nid] = trio.current_time() + 5.0

    async def accept(self, io: SockIO, hs: wire.Handshake, addr: str) -> None:
        """Serve an incoming connection whose handshake named this artifact."""
        await io.send_all(wire.encode(wire.Handshake(wire.PROTOCOL_VERSION, self.node_id, self.artifact_id)))
        conn = PeerConn(self, io, hs.node_id, addr, initiator=hs.node_id)
        if not self.register(conn):
            io.sock.close()
            return
        await conn.run()

    async def leave(self, reason: str) -> None:
        if self.pieces_sent:
            log.info("%s: uploaded %d pieces (%d of them again), deferred %d requests", self.name,
                     self.pieces_sent, self.pieces_sent_again, self.pieces_deferred)
        async with trio.open_nursery() as nursery:
            for c in list(self.conns.values()):
                nursery.start_soon(c.goodbye, reason)
        if self.journal is not None:
            self.journal.close()
        self.store.close()
