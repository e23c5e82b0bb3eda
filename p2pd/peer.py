"""One peer connection at work: runs a PeerSession over a Connection's stream.

Three tasks per connection: the reader feeds the session frame by frame (piece data goes straight
into a piece buffer), the writer sends the session's queued frames and the pieces the peer asked for
(one task for every outgoing byte, so frames never interleave and a HAVE never overtakes the
BITFIELD), and the watchdog drops a peer that stalls or goes silent. The rules are the session's;
what to do about them is the host's (the swarm, through the narrow `PeerHost` interface). Any
protocol violation or error closes this connection only; the stream is closed by its owner.
"""

from __future__ import annotations

import logging
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


class UploadSource(Protocol):
    """Where the bytes of a piece we upload come from (the piece store)."""

    def spans(self, index: int) -> list[tuple[int, int, int]]: ...  # (fd, offset, length) per file span

    def read_piece(self, index: int) -> bytes | bytearray: ...


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
            host.manifest, host.picker, max_queued_requests=self.cfg.max_queued_requests, on_output=self._wake_writer
        )
        self.close_reason: CloseReason | None = None
        self.close_detail = ""
        self.cancel_scope = trio.CancelScope()
        self.bytes_up = 0
        self.bytes_down = 0  # piece bytes received (on the wire), counted by the swarm: for metrics by path
        self.last_send = trio.current_time()
        self._wake = trio.Event()
        self._zc = zstandard.ZstdCompressor(level=1)
        self._zd = zstandard.ZstdDecompressor()

    def _wake_writer(self) -> None:
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
            if s.has_output:
                await self.io.send_all(s.take_output())
                self.last_send = trio.current_time()
                continue
            i = s.next_upload()
            if i is not None:
                if self.host.may_upload(self, i):
                    await self._send_piece(i)
                continue
            self._wake = trio.Event()
            with trio.move_on_after(self.cfg.keepalive_every):
                await self._wake.wait()
            if not s.has_output and not s.uploads and trio.current_time() - self.last_send >= self.cfg.keepalive_every:
                s.keepalive()

    async def _send_piece(self, index: int) -> None:
        host = self.host
        length = host.manifest.piece_length(index)
        payload: bytes | None = None
        if host.should_compress(index):
            raw = await trio.to_thread.run_sync(host.store.read_piece, index)
            packed = await trio.to_thread.run_sync(self._zc.compress, raw)
            if len(packed) < length * self.cfg.compress_min_saving:
                payload = packed
        limiter = host.egress
        if payload is not None:
            await throttle(limiter, len(payload))
            await self.io.send_all(wire.encode_piece_header(index, wire.CODEC_ZSTD, len(payload)) + payload)
            host.note_upload(len(payload))
            sent = len(payload)
        else:
            await self.io.send_all(wire.encode_piece_header(index, wire.CODEC_RAW, length), more=True)
            sent = 0
            for fd, off, n in host.store.spans(index):
                while n:
                    chunk = n if limiter is None else min(n, limiter.chunk(SEND_CHUNK))
                    await throttle(limiter, chunk)
                    await self.io.sendfile(fd, off, chunk)
                    off += chunk
                    n -= chunk
                    sent += chunk
                    host.note_upload(chunk)
        self.bytes_up += sent
        self.last_send = trio.current_time()

    # -- incoming ----------------------------------------------------------------------------------
    async def _reader(self) -> None:
        s, io, host = self.session, self.io, self.host
        while True:
            t, n = s.on_header(await io.read_exactly(wire.HEADER_SIZE))
            if t is wire.MsgType.PIECE:
                ph = s.on_piece_header(await io.read_exactly(wire.PIECE_SUB_SIZE), n)
                buf = await self._read_piece(ph)
                if s.on_piece_received(ph.index):
                    await host.on_piece(self, ph.index, buf, ph.length)
                else:
                    host.give_buffer(buf)  # we cancelled it (an endgame duplicate): read and dropped
                continue
            event = s.on_control(t, await io.read_exactly(n))
            if event is not None:
                host.on_event(self, event)

    async def _read_piece(self, ph: wire.PieceHeader) -> bytearray | bytes:
        host = self.host
        if ph.codec == wire.CODEC_RAW:
            buf = host.take_buffer(ph.length)
            await self.io.read_into(memoryview(buf), host.ingress)
            return buf
        packed = bytearray(ph.length)
        await self.io.read_into(memoryview(packed), host.ingress)
        expected = host.manifest.piece_length(ph.index)
        try:
            data = await trio.to_thread.run_sync(self._decompress, packed, expected)
        except zstandard.ZstdError as e:
            raise wire.ProtocolError(f"piece {ph.index} does not decompress: {e}") from None
        self.session.check_decompressed(ph.index, len(data))
        return data

    def _decompress(self, packed: bytearray, expected: int) -> bytes:
        return self._zd.decompress(bytes(packed), max_output_size=expected)

    async def _watchdog(self) -> None:
        """Drop a peer that stops sending while we wait on it (about a second), or goes silent."""
        picker, cfg = self.host.picker, self.cfg
        while True:
            await trio.sleep(WATCHDOG_EVERY)
            idle = trio.current_time() - self.io.last_recv
            if idle > cfg.stall_timeout and self.io.queued_grew():
                continue
            pending = picker.outstanding(self.session)
            if pending and idle > cfg.stall_timeout:
                raise PeerClosed(CloseReason.STALLED, f"no data for {idle:.1f} s with {pending} requests pending")
            if idle > cfg.idle_timeout:
                raise PeerClosed(CloseReason.SILENT, f"nothing for {idle:.0f} s")

    async def run(self) -> None:
        """Serve until closed. Never raises for anything the peer or the network does."""
        try:
            with self.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._reader)
                    nursery.start_soon(self._writer)
                    nursery.start_soon(self._watchdog)
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
        """Tell the peer we are leaving (bounded: after the piece being sent, if any), then close."""
        self.session.goodbye(reason)
        with trio.move_on_after(self.cfg.goodbye_grace):
            while self.session.has_output and self.close_reason is None:
                await trio.sleep(0.01)
        self.close(CloseReason.WE_LEFT, reason)
