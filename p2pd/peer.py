"""One peer connection at work: runs a PeerSession over a Connection's stream.

Two tasks per connection: the reader feeds the session frame by frame (piece data goes straight
into a piece buffer), the writer sends the session's queued frames and the pieces the peer asked for
(one task for every outgoing byte, so frames never interleave and a HAVE never overtakes the
BITFIELD); the swarm's one watchdog task calls `watchdog` to drop a peer that stalls or goes silent.
The rules are the session's; what to do about them is the host's (the swarm, through the narrow
`PeerHost` interface). Any protocol violation or error closes this connection only; the stream is closed by its owner.

Leaving (`goodbye`) is a graceful close: GOODBYE goes out behind the piece being sent, the writer
half-closes the stream, and the reader reads on until the peer closes its side. Closing at once
loses data: the peer keeps sending (HAVEs, REQUESTs written before our GOODBYE reached it), and a
kernel that receives data for a socket its owner closed answers with a reset and drops what it
still held of our send buffer, the tail of the last pieces we sent. A first copy a leaving seed
sent that way exists nowhere afterwards, and every peer waits for it for ever (issue #12).
"""

from __future__ import annotations

import logging
import socket
from contextlib import AbstractContextManager
from typing import Protocol

import trio
import zstandard

from p2pd.config import SwarmConfig
from p2pd.connections import Connection
from p2pd.errors import CloseReason
from p2pd.protocol import wire
from p2pd.protocol.manifest import Manifest
from p2pd.protocol.picker import Picker
from p2pd.protocol.ratelimit import Hierarchy
from p2pd.protocol.session import Event, PeerClosed, PeerSession
from p2pd.stream_io import SEND_CHUNK, throttle

log = logging.getLogger(__name__)
WATCHDOG_EVERY = 0.2  # seconds between the watchdog's looks (a fifth of the default stall timeout)


def _active(limiter: Hierarchy) -> Hierarchy | None:
    """None while every level is unlimited (then transfers run unchunked), as `PeerHost.egress` does."""
    return None if limiter.unlimited else limiter


class UploadSource(Protocol):
    """Where the bytes of a piece we upload come from (the piece store)."""

    def pinned_spans(
        self, index: int
    ) -> AbstractContextManager[list[tuple[int, int, int]]]: ...  # (fd, offset, length) per file span, valid inside

    def read_piece(self, index: int) -> bytes | bytearray: ...

    def sendfile_fits(self, index: int) -> bool: ...  # False: the piece spans too many files to pin their fds


class PeerHost(Protocol):
    """What a connection needs from the swarm it serves, and all it may touch."""

    manifest: Manifest
    config: SwarmConfig
    picker: Picker[PeerSession]

    @property
    def store(self) -> UploadSource: ...

    @property
    def egress(self) -> Hierarchy | None: ...

    @property
    def ingress(self) -> Hierarchy | None: ...

    def on_event(self, conn: PeerConn, event: Event) -> None: ...

    async def on_piece(self, conn: PeerConn, index: int, buf: bytearray | bytes, wire_len: int) -> None: ...

    def may_upload(self, conn: PeerConn, index: int) -> bool: ...  # False: answered with REJECT or DEFER

    def holds_requests(self) -> bool: ...  # --chain while fetching: a request for a piece still to come waits

    def wake_on_piece(self, conn: PeerConn) -> None: ...  # wake `conn`'s writer when a piece is verified

    def waits_on_chain(self, conn: PeerConn) -> bool: ...  # --chain: its silence is its own wait for a piece

    def has_piece(self, index: int) -> bool: ...

    def should_compress(self, index: int) -> bool: ...

    def take_buffer(self, length: int) -> bytearray: ...

    def give_buffer(self, buf: bytearray | bytes) -> None: ...

    def note_upload(self, n: int) -> None: ...


class PeerConn:
    """One connection to one remote node for one artifact."""

    def __init__(self, host: PeerHost, conn: Connection) -> None:
        self.host = host
        self.conn = conn
        self.io = conn.io
        self.remote_id = conn.remote_id
        self.addr = conn.addr
        self.path = conn.path
        self.initiator = conn.initiator
        self.cfg = host.config
        self.session = PeerSession(
            host.manifest, host.picker, max_queued_requests=self.cfg.max_queued_requests, on_output=self.wake_writer
        )
        self.close_reason: CloseReason | None = None
        self.close_detail = ""
        self.cancel_scope = trio.CancelScope()
        self.bytes_up = 0
        self.uploading = False  # the writer is sending a piece now
        self.bytes_down = 0  # piece bytes received (on the wire), counted by the swarm: for metrics by path
        self.booked = False  # its bytes are in the swarm's totals of closed connections (counted once)
        self.last_send = trio.current_time()
        self.leaving = False  # we said GOODBYE: no more uploads, the writer half-closes once it is out
        self._sent_all = trio.Event()  # half-closed after GOODBYE, or the connection ended
        self._ended = trio.Event()
        # (egress, ingress) for a peer in another zone (the swarm sets it): the cross-zone budget
        self.limits: tuple[Hierarchy, Hierarchy] | None = None
        self.cross_zone = False  # the peer is in another zone than ours (the tracker's lists say)
        self._wake = trio.Event()
        self._held_since: float | None = None  # --chain: since when the first queued request waits for its piece
        self._resumed = 0.0  # when a pause of the cluster's uploads ended (the watchdog's clocks restart)
        self._zc = zstandard.ZstdCompressor(level=1)
        self._zd = zstandard.ZstdDecompressor()

    def wake_writer(self) -> None:
        self._wake.set()

    def close(self, reason: CloseReason, detail: str = "") -> None:
        """End this connection (from any task); the first reason given is the one kept."""
        if self.close_reason is None:
            self.close_reason, self.close_detail = reason, detail
        self.cancel_scope.cancel()

    @property
    def closed(self) -> bool:
        return self.close_reason is not None

    # -- outgoing ----------------------------------------------------------------------------------
    async def _writer(self) -> None:
        s = self.session
        while True:
            s.release_haves()  # awake anyway: held HAVEs go out now, at no wakeup of their own
            if s.has_output:
                await self.io.send_all(s.take_output())
                self.last_send = trio.current_time()
                continue
            if self.leaving:  # GOODBYE is out, and it is the last frame
                await self._half_close()
                return
            i = s.next_upload()
            if i is not None:
                if not self.host.has_piece(i) and self.host.holds_requests():
                    i = await self._held(i)
                    if i is None:
                        continue
                self._held_since = None
                if self.host.may_upload(self, i):
                    self.uploading = True  # holds one of the node's upload slots meanwhile
                    try:
                        await self._send_piece(i)
                    finally:
                        self.uploading = False
                continue
            # No deadline of its own: a cancel scope armed and disarmed at every wakeup nearly doubled the
            # CPU of one (BENCHMARKS.md, "The per-daemon fixed cost"). The wait is bounded by the swarm's
            # watchdog, which calls `watchdog` every WATCHDOG_EVERY: it queues a KEEPALIVE (which wakes us)
            # once nothing was sent for `keepalive_every`, and cancels this connection when the peer is gone.
            self._wake = trio.Event()
            await self._wake.wait()

    async def _held(self, i: int) -> int | None:
        """--chain: our successor asks ahead of our HAVEs. Serve the first queued piece that is here; while none
        is, wait for the next verified piece (or other output), and after `chain_hold` give up on the first one
        (returned: the writer answers REJECT). None: go round the loop again."""
        s, host = self.session, self.host
        ready = next((k for k in s.uploads if host.has_piece(k)), None)
        if ready is not None:
            s.uploads.remove(ready)
            s.uploads.appendleft(i)
            return ready
        now = trio.current_time()
        if self._held_since is None:
            self._held_since = now
        left = self._held_since + self.cfg.chain_hold - now
        if left <= 0:
            return i
        s.uploads.appendleft(i)
        self._wake = trio.Event()
        host.wake_on_piece(self)
        with trio.move_on_after(left):
            await self._wake.wait()
        return None

    async def _half_close(self) -> None:
        """Send EOF after everything we sent, keep receiving (a relay passes the EOF on)."""
        try:
            if self.io.sock is not None:
                self.io.sock.shutdown(socket.SHUT_WR)
            elif isinstance(self.io.stream, trio.abc.HalfCloseableStream):
                await self.io.stream.send_eof()
        finally:
            self._sent_all.set()

    async def _send_piece(self, index: int) -> None:
        host = self.host
        length = host.manifest.piece_length(index)
        payload: bytes | None = None
        if host.should_compress(index):
            raw = await trio.to_thread.run_sync(host.store.read_piece, index)
            packed = await trio.to_thread.run_sync(self._zc.compress, raw)
            if len(packed) < length * self.cfg.compress_min_saving:
                payload = packed
        limiter = host.egress if self.limits is None else _active(self.limits[0])
        raw_payload: bytes | bytearray | None = None
        if payload is None and not host.store.sendfile_fits(index):  # thousands of tiny files: from memory
            raw_payload = await trio.to_thread.run_sync(host.store.read_piece, index)
        if payload is not None:
            await throttle(limiter, len(payload))
            await self.io.send_all(wire.encode_piece_header(index, wire.CODEC_ZSTD, len(payload)) + payload)
            host.note_upload(len(payload))
            sent = len(payload)
        elif raw_payload is not None:
            await throttle(limiter, len(raw_payload))
            await self.io.send_all(wire.encode_piece_header(index, wire.CODEC_RAW, length) + raw_payload)
            host.note_upload(len(raw_payload))
            sent = len(raw_payload)
        else:
            await self.io.send_all(wire.encode_piece_header(index, wire.CODEC_RAW, length), more=True)
            sent = 0
            with host.store.pinned_spans(index) as spans:  # the fds stay open and ours across the awaits
                for fd, off, n in spans:
                    while n:
                        chunk = n if limiter is None else min(n, limiter.chunk(SEND_CHUNK))
                        await throttle(limiter, chunk)
                        await self.io.sendfile(fd, off, chunk)
                        off += chunk
                        n -= chunk
                        sent += chunk
                        host.note_upload(chunk)
        self.session.piece_sent(index)
        self.bytes_up += sent
        self.last_send = trio.current_time()

    # -- incoming ----------------------------------------------------------------------------------
    async def _reader(self) -> None:
        s, io, host = self.session, self.io, self.host
        while True:
            await io.fill(wire.HEADER_SIZE)
            if io.rbuf.startswith(wire.HAVE_PREFIX):  # HAVEs come in runs (held and sent together): one pass
                haves, end = wire.have_run(io.rbuf)
                if haves:
                    del io.rbuf[:end]
                    host.on_event(self, s.on_haves(haves))
                    continue
            t, n = s.on_header(await io.read_exactly(wire.HEADER_SIZE))
            if t is wire.MsgType.PIECE:
                ph = s.on_piece_header(await io.read_exactly(wire.PIECE_SUB_SIZE), n)
                buf = await self._read_piece(ph)
                if s.on_piece_received(ph.index) and not self.leaving:
                    await host.on_piece(self, ph.index, buf, ph.length)
                else:
                    host.give_buffer(buf)  # we cancelled it (an endgame duplicate): read and dropped
                continue
            event = s.on_control(t, await io.read_exactly(n))
            if event is not None:
                host.on_event(self, event)

    async def _read_piece(self, ph: wire.PieceHeader) -> bytearray | bytes:
        host = self.host
        ingress = host.ingress if self.limits is None else _active(self.limits[1])
        if ph.codec == wire.CODEC_RAW:
            buf = host.take_buffer(ph.length)
            await self.io.read_into(memoryview(buf), ingress)
            return buf
        packed = bytearray(ph.length)
        await self.io.read_into(memoryview(packed), ingress)
        expected = host.manifest.piece_length(ph.index)
        try:
            data = await trio.to_thread.run_sync(self._decompress, packed, expected)
        except zstandard.ZstdError as e:
            raise wire.ProtocolError(f"piece {ph.index} does not decompress: {e}") from None
        self.session.check_decompressed(ph.index, len(data))
        return data

    def _decompress(self, packed: bytearray, expected: int) -> bytes:
        return self._zd.decompress(bytes(packed), max_output_size=expected)

    def watchdog(self, now: float) -> None:
        """Send a KEEPALIVE when nothing went out for `keepalive_every`; close this connection if the peer stops
        sending while we wait on it (about a second) or goes silent.

        The swarm calls this for all its connections every WATCHDOG_EVERY from one task. A sleeping task per
        connection woke 5 times a second each (each wakeup a Cancelled raised and caught), and the writer
        armed a keepalive deadline at every wakeup: an idle swarm with 32 peers took 100-155 task steps and
        11-24 ms of CPU a second, 5 and about 2.3 ms now; a 1 + 32 on one machine pays that 33 times.
        """
        if self.closed:
            return
        try:
            self._watch(now)
        except OSError as e:  # the socket went (an ioctl on a closed one): this connection ends, as a send's would
            self.close(CloseReason.SOCKET_ERROR, str(e))
        except Exception as e:  # a bug must cost one connection, not the swarm whose timer calls this
            log.error("peer %s: internal error in the watchdog, closing", self.remote_id[:8], exc_info=e)
            self.close(CloseReason.INTERNAL, repr(e))

    def _watch(self, now: float) -> None:
        s, cfg = self.session, self.cfg
        quiet = not (s.has_output or s.uploads or self.uploading or self.leaving)  # (GOODBYE is the last frame)
        if quiet and now - self.last_send >= cfg.keepalive_every:
            s.keepalive()  # (wakes the writer)
        egress = self.host.egress
        if egress is not None and egress.paused:
            # the tracker paused the cluster (a global budget of 0): every sender holds its pieces,
            # so silence is expected; the clocks start again when the pause ends
            self._resumed = now
            return
        idle = now - max(self.io.last_recv, self._resumed)
        if idle <= min(cfg.stall_timeout, cfg.idle_timeout):
            return
        pending = self.host.picker.outstanding(self.session)
        # (the ioctl only where it can matter: 32 idle peers 5 times a second are 160 system calls)
        if (pending or idle > cfg.idle_timeout) and self.io.queued_grew():
            return
        if pending and idle > cfg.stall_timeout and not self.host.waits_on_chain(self):
            self.close(CloseReason.STALLED, f"no data for {idle:.1f} s with {pending} requests pending")
        elif idle > cfg.idle_timeout:
            self.close(CloseReason.SILENT, f"nothing for {idle:.0f} s")

    async def run(self) -> None:
        """Serve until closed. Never raises for anything the peer or the network does."""
        try:
            with self.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._reader)
                    nursery.start_soon(self._writer)
        except* PeerClosed as eg:
            first = eg.exceptions[0]
            assert isinstance(first, PeerClosed)
            self._closed_by(first.reason, first.detail)
        except* wire.ProtocolError as eg:
            self._closed_by(CloseReason.PROTOCOL, str(eg.exceptions[0]))
        except* OSError as eg:
            self._closed_by(CloseReason.SOCKET_ERROR, str(eg.exceptions[0]))
        except* trio.BrokenResourceError as eg:
            self._closed_by(CloseReason.SOCKET_ERROR, str(eg.exceptions[0]) or "stream broken")
        except* Exception as eg:  # a bug must cost one connection, not the daemon
            log.error("peer %s: internal error, closing", self.remote_id[:8], exc_info=eg.exceptions[0])
            self._closed_by(CloseReason.INTERNAL, repr(eg.exceptions[0]))
        finally:
            self._sent_all.set()
            self._ended.set()
        reason = self.close_reason
        level = logging.DEBUG if reason is None or reason.expected else logging.INFO
        log.log(
            level,
            "peer %s (%s, %s) closed: %s%s",
            self.remote_id[:8],
            self.addr,
            self.path,
            reason or "shutdown",
            f" ({self.close_detail})" if self.close_detail else "",
        )

    def _closed_by(self, reason: CloseReason, detail: str) -> None:
        if self.close_reason is None:
            self.close_reason, self.close_detail = reason, detail

    async def goodbye(self, reason: str) -> None:
        """Tell the peer we are leaving, then close once it has everything we sent (both bounded).

        GOODBYE waits behind the piece being sent (`goodbye_grace`); then the writer half-closes
        and the reader drains until the peer, having read GOODBYE, closes its side
        (`goodbye_drain`). Only then is the socket closed, so no reset can drop what we sent.
        """
        if self.close_reason is None:
            self.close_reason, self.close_detail = CloseReason.WE_LEFT, reason
        self.leaving = True
        self.session.goodbye(reason)
        with trio.move_on_after(self.cfg.goodbye_grace):
            await self._sent_all.wait()
        if self._sent_all.is_set():
            with trio.move_on_after(self.cfg.goodbye_drain):
                await self._ended.wait()
        self.close(CloseReason.WE_LEFT, reason)
