"""One peer connection: handshake, the reader (requests/pieces in), the writer (control + pieces out).

Piece data never passes through a Python-level copy on the hot path: the reader receives straight into
the piece buffer (recv_into) and the writer sends from the page cache with sendfile. All outgoing
frames go through one writer task, so frame order is the order of `queue()` calls and a HAVE can
never overtake the handshake. Any protocol violation closes this connection only.
"""

from __future__ import annotations

import array
import collections
import fcntl
import logging
import os
import socket
import termios
from typing import TYPE_CHECKING

import trio
import zstandard

from p2pd.protocol import wire
from p2pd.protocol.ratelimit import Hierarchy

if TYPE_CHECKING:
    from p2pd.swarm import Swarm

log = logging.getLogger(__name__)
RECV_CHUNK = 256 * 1024
SMALL_READ = 16 * 1024  # frame headers and control messages: never pull much piece payload through rbuf
SEND_CHUNK = 256 * 1024
PAYLOAD_LOWAT = 256 * 1024  # wake the reader of a piece once this much of it is queued (SO_RCVLOWAT)
HANDSHAKE_TIMEOUT = 5.0
KEEPALIVE_EVERY = 10.0
IDLE_TIMEOUT = 45.0


async def throttle(limiter: Hierarchy | None, n: int) -> None:
    """Reserve `n` bytes of the limit, then wait out the debt (both directions, every limited transfer)."""
    if limiter is not None:
        delay = limiter.reserve(n, trio.current_time())
        if delay > 0:
            await trio.sleep(delay)


class PeerClosed(Exception):
    """The connection ended (remote closed, stalled, protocol error, banned): the reason is the text."""


class SockIO:
    """Buffered reads and whole writes over a non-blocking trio socket."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.rbuf = bytearray()
        self.last_recv = trio.current_time()
        self.bytes_in = 0
        self._queued = 0  # bytes the kernel held unread at the watchdog's last look

    async def _fill(self, n: int) -> None:
        while len(self.rbuf) < n:
            data = await self.sock.recv(max(SMALL_READ, n - len(self.rbuf)))
            if not data:
                raise PeerClosed("connection closed by peer")
            self.last_recv = trio.current_time()
            self.bytes_in += len(data)
            self.rbuf += data

    async def read_exactly(self, n: int) -> bytes:
        await self._fill(n)
        out = bytes(self.rbuf[:n])
        del self.rbuf[:n]
        return out

    async def read_into(self, view: memoryview, limiter: Hierarchy | None) -> None:
        """Fill `view` completely: buffered bytes first, then recv_into directly.

        Without a receive low-water mark the kernel wakes the reader for every few packets of a
        piece, and each wakeup (epoll, scheduler, a short recv) costs the CPU that a node serving
        many peers on few cores runs out of. With SO_RCVLOWAT at the rest of the piece (at most
        PAYLOAD_LOWAT) the reader wakes once per PAYLOAD_LOWAT bytes instead. The mark is lowered
        as the piece completes (the kernel must never wait for bytes that are not coming) and reset
        to 1 for the frame headers that follow; `queued_grew` keeps the stall watchdog from
        mistaking a slow piece that is queueing up below the mark for a stalled peer.
        """
        pos = min(len(self.rbuf), len(view))
        if pos:
            view[:pos] = self.rbuf[:pos]
            del self.rbuf[:pos]
        lowat = 1
        try:
            while pos < len(view):
                want = len(view) - pos
                if limiter is not None:
                    want = min(limiter.chunk(RECV_CHUNK), want)
                    await throttle(limiter, want)
                mark = min(want, PAYLOAD_LOWAT)
                if mark != lowat:
                    self.set_lowat(mark)
                    lowat = mark
                await trio.lowlevel.wait_readable(self.sock)  # not recv_into first: it would take a few packets
                n = await self.sock.recv_into(view[pos : pos + want])
                if not n:
                    raise PeerClosed("connection closed by peer mid-piece")
                self.last_recv = trio.current_time()
                self.bytes_in += n
                pos += n
        finally:
            if lowat != 1:
                self.set_lowat(1)

    def set_lowat(self, n: int) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
        self._queued = 0

    def queued_grew(self) -> bool:
        """True (and the receive clock reset) if bytes not yet read have arrived since the last call."""
        buf = array.array("i", [0])
        fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, buf)
        if buf[0] > self._queued:
            self._queued = buf[0]
            self.last_recv = trio.current_time()
            return True
        return False

    async def send_all(self, data: bytes | bytearray | memoryview, *, more: bool = False) -> None:
        """Send everything; `more`: the caller sends the rest of this message next (MSG_MORE), so a
        small header leaves in the same segment as the data behind it instead of costing the
        receiver a wakeup of its own (TCP_NODELAY is on for the small control messages)."""
        view = memoryview(data)
        flags = socket.MSG_MORE if more else 0
        while view:
            n = await self.sock.send(view, flags)
            view = view[n:]

    async def sendfile(self, fd: int, offset: int, count: int) -> None:
        out = self.sock.fileno()
        while count:
            try:
                n = os.sendfile(out, fd, offset, count)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
                continue
            if n == 0:
                raise PeerClosed("file shorter than the manifest says")
            offset += n
            count -= n
            await trio.lowlevel.checkpoint_if_cancelled()


class PeerConn:
    """Connection to one remote node for one artifact."""

    def __init__(self, swarm: Swarm, io: SockIO, remote_id: str, addr: str, initiator: str) -> None:
        self.swarm = swarm
        self.io = io
        self.remote_id = remote_id
        self.addr = addr
        self.initiator = initiator  # node id of the side that connected
        self.outstanding: set[int] = set()  # our requests to them
        self.cancelled: collections.deque[int] = collections.deque(maxlen=64)
        self.uploads: collections.deque[int] = collections.deque()  # their requests to us
        self.control = bytearray()
        self.wake = trio.Event()
        self.closed_reason: str | None = None
        self.cancel_scope = trio.CancelScope()
        self.bytes_up = 0
        self.last_send = trio.current_time()
        self.have_mask = 0  # pieces the remote has announced (bit i = piece i)
        self.deferred: set[int] = set()  # pieces we told the remote to get elsewhere (once each)
        self._zc = zstandard.ZstdCompressor(level=1)
        self._zd = zstandard.ZstdDecompressor()

    # -- outgoing ----------------------------------------------------------------------------------
    def queue(self, msg: wire.Message) -> None:
        self.control += wire.encode(msg)
        self.wake.set()

    def request(self, index: int) -> None:
        self.outstanding.add(index)
        self.queue(wire.Request(index))

    def cancel(self, index: int) -> None:
        if index in self.outstanding:
            self.outstanding.discard(index)
            self.cancelled.append(index)
            self.queue(wire.Cancel(index))

    def close(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
        self.cancel_scope.cancel()

    async def _writer(self) -> None:
        while True:
            if self.control:
                data = bytes(self.control)
                self.control.clear()
                await self.io.send_all(data)
                self.last_send = trio.current_time()
                continue
            if self.uploads:
                await self._send_piece(self.uploads.popleft())
                continue
            self.wake = trio.Event()
            with trio.move_on_after(KEEPALIVE_EVERY):
                await self.wake.wait()
            if not self.control and not self.uploads and trio.current_time() - self.last_send >= KEEPALIVE_EVERY:
                self.queue(wire.KeepAlive())

    async def _send_piece(self, index: int) -> None:
        sw = self.swarm
        if not sw.has_piece(index):
            self.queue(wire.Reject(index))
            return
        if sw.sent_while_unsent_remain(index):
            self.queue(wire.Defer(index))
            return
        sw.note_piece_sent(index)
        length = sw.manifest.piece_length(index)
        payload: bytes | None = None
        if sw.should_compress(index):
            raw = await trio.to_thread.run_sync(sw.store.read_piece, index)
            packed = await trio.to_thread.run_sync(self._zc.compress, raw)
            if len(packed) < length * 0.9:
                payload = packed
        limiter = sw.egress
        if payload is not None:
            await throttle(limiter, len(payload))
            await self.io.send_all(wire.encode_piece_header(index, wire.CODEC_ZSTD, len(payload)) + payload)
            sent = len(payload)
        else:
            await self.io.send_all(wire.encode_piece_header(index, wire.CODEC_RAW, length), more=True)
            sent = 0
            for fd, off, n in sw.store.spans(index):
                while n:
                    chunk = n if limiter is None else min(n, limiter.chunk(SEND_CHUNK))
                    await throttle(limiter, chunk)
                    await self.io.sendfile(fd, off, chunk)
                    off += chunk
                    n -= chunk
                    sent += chunk
                    sw.note_upload(chunk)
        if payload is not None:
            sw.note_upload(sent)
        self.bytes_up += sent
        self.last_send = trio.current_time()

    # -- incoming ----------------------------------------------------------------------------------
    async def _reader(self) -> None:
        sw = self.swarm
        max_piece = sw.manifest.piece_size
        hdr = await self.io.read_exactly(wire.HEADER_SIZE)
        t, n = wire.parse_header(hdr, max_piece)
        if t is not wire.MsgType.BITFIELD:
            raise wire.ProtocolError(f"expected BITFIELD after handshake, got {t.name}")
        bf = wire.decode_body(t, await self.io.read_exactly(n))
        assert isinstance(bf, wire.Bitfield)
        wire.check_bitfield(bf.bits, sw.manifest.num_pieces)
        sw.on_bitfield(self, bf.bits)
        while True:
            hdr = await self.io.read_exactly(wire.HEADER_SIZE)
            t, n = wire.parse_header(hdr, max_piece)
            if t is wire.MsgType.PIECE:
                ph = wire.parse_piece_sub(await self.io.read_exactly(wire.PIECE_SUB_SIZE), n)
                await self._on_piece(ph)
                continue
            msg = wire.decode_body(t, await self.io.read_exactly(n))
            if isinstance(msg, wire.Have):
                sw.on_have(self, msg.index)
            elif isinstance(msg, wire.Request):
                if not 0 <= msg.index < sw.manifest.num_pieces:
                    raise wire.ProtocolError(f"request for piece {msg.index} out of range")
                if len(self.uploads) >= 64:
                    raise wire.ProtocolError("more than 64 requests queued")
                if sw.should_defer(self, msg.index):
                    self.queue(wire.Defer(msg.index))
                else:
                    self.uploads.append(msg.index)
                    self.wake.set()
            elif isinstance(msg, wire.Cancel):
                try:
                    self.uploads.remove(msg.index)
                except ValueError:
                    pass  # already sent or never asked: cancel is advisory
            elif isinstance(msg, wire.Reject):
                if msg.index in self.outstanding:
                    self.outstanding.discard(msg.index)
                    sw.on_reject(self, msg.index)
            elif isinstance(msg, wire.Defer):
                if msg.index in self.outstanding:
                    self.outstanding.discard(msg.index)
                    sw.on_defer(self, msg.index)
            elif isinstance(msg, wire.Goodbye):
                raise PeerClosed(f"peer said goodbye ({msg.reason or 'no reason'})")
            elif isinstance(msg, wire.KeepAlive):
                pass
            elif isinstance(msg, wire.Bitfield):
                raise wire.ProtocolError("second BITFIELD")
            else:
                raise wire.ProtocolError(f"unexpected {type(msg).__name__} after handshake")

    async def _on_piece(self, ph: wire.PieceHeader) -> None:
        sw = self.swarm
        m = sw.manifest
        if not 0 <= ph.index < m.num_pieces:
            raise wire.ProtocolError(f"piece {ph.index} out of range")
        expected = m.piece_length(ph.index)
        if ph.index not in self.outstanding and ph.index not in self.cancelled:
            raise wire.ProtocolError(f"unrequested piece {ph.index}")
        if ph.codec == wire.CODEC_RAW:
            if ph.length != expected:
                raise wire.ProtocolError(f"piece {ph.index} has {ph.length} bytes, expected {expected}")
            buf = sw.take_buffer(expected)
            await self.io.read_into(memoryview(buf), sw.ingress)
        else:
            if ph.length > expected + 1024:
                raise wire.ProtocolError(f"compressed piece {ph.index} larger than the piece")
            packed = bytearray(ph.length)
            await self.io.read_into(memoryview(packed), sw.ingress)
            try:
                buf = await trio.to_thread.run_sync(self._decompress, packed, expected)
            except zstandard.ZstdError as e:
                raise wire.ProtocolError(f"piece {ph.index} does not decompress: {e}") from None
            if len(buf) != expected:
                raise wire.ProtocolError(f"piece {ph.index} decompressed to {len(buf)} bytes, expected {expected}")
        if ph.index not in self.outstanding:
            sw.give_buffer(buf)
            return  # we cancelled it (endgame duplicate); bytes read and dropped
        self.outstanding.discard(ph.index)
        await sw.on_piece(self, ph.index, buf, ph.length)

    def _decompress(self, packed: bytearray, expected: int) -> bytes:
        return self._zd.decompress(bytes(packed), max_output_size=expected)

    async def _watchdog(self) -> None:
        """Drop a peer that stops sending while we wait on it (about a second), or goes silent."""
        sw = self.swarm
        while True:
            await trio.sleep(0.2)
            idle = trio.current_time() - self.io.last_recv
            if idle > sw.stall_timeout and self.io.queued_grew():
                continue
            if self.outstanding and idle > sw.stall_timeout:
                raise PeerClosed(f"stalled: no data for {idle:.1f} s with {len(self.outstanding)} requests pending")
            if idle > IDLE_TIMEOUT:
                raise PeerClosed(f"silent for {idle:.0f} s")

    async def run(self) -> None:
        """Serve until closed; always leaves the swarm cleanly and closes the socket."""
        try:
            with self.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._reader)
                    nursery.start_soon(self._writer)
                    nursery.start_soon(self._watchdog)
        except* (PeerClosed, wire.ProtocolError) as eg:
            self.closed_reason = self.closed_reason or str(eg.exceptions[0])
        except* OSError as eg:
            self.closed_reason = self.closed_reason or f"socket error: {eg.exceptions[0]}"
        except* Exception as eg:  # a bug must cost one connection, not the daemon
            log.error("peer %s: internal error, closing", self.remote_id[:8], exc_info=eg.exceptions[0])
            self.closed_reason = self.closed_reason or f"internal error: {eg.exceptions[0]!r}"
        finally:
            self.swarm.on_close(self)
            self.io.sock.close()
        level = logging.INFO if self.closed_reason and "goodbye" not in self.closed_reason else logging.DEBUG
        log.log(level, "peer %s (%s) closed: %s", self.remote_id[:8], self.addr, self.closed_reason or "shutdown")

    async def goodbye(self, reason: str) -> None:
        """Tell the peer we are leaving (bounded: after the piece being sent, if any), then close."""
        self.uploads.clear()
        self.queue(wire.Goodbye(reason))
        with trio.move_on_after(0.5):
            while self.control and self.closed_reason is None:
                await trio.sleep(0.01)
        self.close(f"we left: {reason}")


def tune_socket(sock: trio.socket.SocketType) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def read_handshake(io: SockIO, timeout: float = HANDSHAKE_TIMEOUT) -> wire.Handshake:
    with trio.fail_after(timeout):
        hdr = await io.read_exactly(wire.HEADER_SIZE)
        t, n = wire.parse_header(hdr, 0)
        if t is not wire.MsgType.HANDSHAKE:
            raise wire.ProtocolError(f"expected HANDSHAKE, got {t.name}")
        hs = wire.decode_body(t, await io.read_exactly(n))
    assert isinstance(hs, wire.Handshake)
    if hs.version != wire.PROTOCOL_VERSION:
        raise wire.ProtocolError(f"peer speaks protocol {hs.version}, we speak {wire.PROTOCOL_VERSION}")
    return hs
