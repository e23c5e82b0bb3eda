"""Reads and writes of peer frames over any trio Stream, with a fast path for TCP sockets.

However a connection was obtained (dialled, accepted, and later punched or relayed), the peer layer
gets a trio `Stream`. Over a plain TCP socket (`trio.SocketStream`) piece data never passes through
a Python-level copy: it is received straight into the piece buffer (recv_into, waking once per
PAYLOAD_LOWAT bytes) and sent from the page cache with sendfile. Over any other stream the same
calls work through `receive_some` / `send_all`, a copy slower and with the same results.
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import sys
import termios
import weakref

import trio

from p2pd.errors import CloseReason
from p2pd.protocol.ratelimit import Hierarchy
from p2pd.protocol.session import PeerClosed

RECV_CHUNK = 256 * 1024
SMALL_READ = 16 * 1024  # frame headers and control messages: never pull much piece payload through rbuf
SEND_CHUNK = 256 * 1024
PAUSE_POLL = 0.05  # while a limit is paused (a global budget of 0), how often a sender looks again
PAYLOAD_LOWAT = 256 * 1024  # wake the reader of a piece once this much of it is queued (SO_RCVLOWAT)
# bytes a peer socket may hold written but not yet sent (TCP_NOTSENT_LOWAT): what p2pd has queued keeps leaving at
# TCP's pace after its limit drops (auto-throttling yielding to a service: 4 MB of tcp_wmem is 300 ms of a half
# 200 Mbit/s link); 1 MiB still keeps 40 ms of a 200 Mbit/s link ready for the kernel, and sendfile wakes up
# once per ~512 KiB sent (the socket turns writable when under half of it)
UNSENT_LOWAT = 1024 * 1024
# socket calls in a row served without a trip through trio's scheduler (the bytes were there, or the buffer had room):
# trio's own recv and send yield once per call even then, and at hundreds of pieces a second those round trips were a
# large share of a CPU-bound node's Python time; after this many the next call yields, so other tasks still run
FAST_CALLS = 16


class TrafficCounters:
    """Every payload byte this process moved over peer connections (what auto-throttling subtracts from the
    interface's counters). One per process: a production node runs one daemon per process."""

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0


TRAFFIC = TrafficCounters()
SIOCOUTQNSD = 0x894B  # linux/sockios.h: bytes in a TCP socket's send queue not yet handed to IP
# struct tcp_info (linux/tcp.h): tcpi_bytes_retrans, a u64 at this offset (Linux >= 4.19; older kernels fill less)
TCPI_BYTES_RETRANS = 208
TCP_INFO_LEN = 232


class LiveSockets:
    """The peer connections' TCP sockets, for what their kernel queues hold and what TCP sent twice
    (auto-throttling's skew correction).

    TRAFFIC counts a byte when p2pd writes it into a socket or reads it out of one; the interface counts
    it when it crosses the wire. Between the two sit the socket queues: a send queue of up to tcp_wmem's
    maximum (MBs) per connection, filled in bursts as peers ask for pieces, and a receive queue that holds
    up to SO_RCVLOWAT (or more, while a read is throttled). Auto-throttling subtracts p2pd's bytes from the
    interface's, so without this correction each burst reads as somebody else's traffic.

    And a segment lost downstream (a receiver's switch port dropping an incast burst) crosses the interface
    again when TCP retransmits it: in the emulated 1 + 32, 2-6 % of each node's segments, 2-5 Mbit/s of a
    50 Mbit/s uplink that read as other traffic, and every node's upload yielded to it ~4 times a run
    (BENCHMARKS.md, "Auto-throttle yielded to its own retransmissions")."""

    def __init__(self) -> None:
        # socket -> its tcpi_bytes_retrans at the last look (what it retransmitted since is added to the total)
        self._socks: weakref.WeakKeyDictionary[trio.socket.SocketType, int] = weakref.WeakKeyDictionary()
        self.retransmitted = 0  # payload bytes TCP sent again, over every socket ever added, as of the last look

    def add(self, sock: trio.socket.SocketType) -> None:
        self._socks.setdefault(sock, 0)

    def __len__(self) -> int:
        return len(self._socks)

    def queued(self) -> tuple[int, int]:
        """(bytes written but not yet sent, bytes received but not yet read), summed over the open sockets;
        brings `retransmitted` up to date on the way (the same look at each socket)."""
        unsent = unread = 0
        buf = array.array("i", [0])
        for sock, seen in list(self._socks.items()):
            fd = sock.fileno()
            if fd < 0:  # closed: its queues are gone with it
                continue
            try:
                fcntl.ioctl(fd, SIOCOUTQNSD, buf)
                unsent += buf[0]
                fcntl.ioctl(fd, termios.FIONREAD, buf)
                unread += buf[0]
                info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
            except OSError:  # closed between fileno() and the ioctl, or not a TCP socket after all
                continue
            if len(info) >= TCPI_BYTES_RETRANS + 8:
                total = int.from_bytes(info[TCPI_BYTES_RETRANS : TCPI_BYTES_RETRANS + 8], sys.byteorder)
                if total > seen:
                    self.retransmitted += total - seen
                    self._socks[sock] = total
        return unsent, unread


LIVE_SOCKETS = LiveSockets()


async def throttle(limiter: Hierarchy | None, n: int) -> None:
    """Reserve `n` bytes of the limit, then wait out the debt (both directions, every limited transfer).

    While the limit is paused (rate 0) nothing is reserved: the sender waits, and its connection stays
    open (the receivers know the cluster is paused and do not take the silence for a stall)."""
    if limiter is not None:
        while limiter.paused:
            limiter.waited += PAUSE_POLL
            await trio.sleep(PAUSE_POLL)
        delay = limiter.reserve(n, trio.current_time())
        if delay > 0:
            await trio.sleep(delay)


class StreamIO:
    """Buffered reads and whole writes over one connection's stream (which its owner closes)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        # the socket fast path: only a plain TCP stream has a socket whose bytes are the peer's
        self.sock: trio.socket.SocketType | None = stream.socket if isinstance(stream, trio.SocketStream) else None
        if self.sock is not None and hasattr(socket, "TCP_NOTSENT_LOWAT"):
            # trio.SocketStream caps unsent bytes at 16 KiB (good for its send_all); sendfile of a
            # piece would then wake up every 16 KiB. The system default (no cap) lets up to tcp_wmem's
            # maximum wait unsent, and that keeps competing with a service p2pd yields to: UNSENT_LOWAT.
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, UNSENT_LOWAT)
        if self.sock is not None:
            LIVE_SOCKETS.add(self.sock)
        self.rbuf = bytearray()
        self.last_recv = trio.current_time()
        self.bytes_in = 0
        self._queued = 0  # bytes the kernel held unread at the watchdog's last look
        self._fast_reads = 0  # reads in a row that did not yield (FAST_CALLS)
        self._fast_sends = 0

    async def _receive(self, max_bytes: int) -> bytes:
        data: bytes | bytearray | None = None
        if self.sock is not None:
            if self._fast_reads < FAST_CALLS:
                await trio.lowlevel.checkpoint_if_cancelled()
                try:
                    data = os.read(self.sock.fileno(), max_bytes)  # read(2) on a TCP socket is recv without flags
                    self._fast_reads += 1
                except BlockingIOError:
                    data = None
            if data is None:
                self._fast_reads = 0
                data = await self.sock.recv(max_bytes)
        else:
            data = await self.stream.receive_some(max_bytes)
        if not data:
            raise PeerClosed(CloseReason.REMOTE_CLOSED, "connection closed by peer")
        self.last_recv = trio.current_time()
        self.bytes_in += len(data)
        TRAFFIC.received += len(data)
        return bytes(data)

    async def fill(self, n: int) -> None:
        """Receive until `rbuf` holds at least `n` bytes (it may hold more: whatever one receive brought)."""
        while len(self.rbuf) < n:
            self.rbuf += await self._receive(max(SMALL_READ, n - len(self.rbuf)))

    async def read_exactly(self, n: int) -> bytes:
        await self.fill(n)
        out = bytes(self.rbuf[:n])
        del self.rbuf[:n]
        return out

    async def read_into(self, view: memoryview, limiter: Hierarchy | None) -> None:
        """Fill `view` completely: buffered bytes first, then straight from the stream.

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
        if self.sock is None:
            while pos < len(view):
                want = len(view) - pos
                if limiter is not None:
                    want = min(limiter.chunk(RECV_CHUNK), want)
                    await throttle(limiter, want)
                data = await self._receive(want)
                view[pos : pos + len(data)] = data
                pos += len(data)
            return
        sock = self.sock
        fd = sock.fileno()
        lowat = 1
        try:
            while pos < len(view):
                want = len(view) - pos
                if limiter is not None:
                    want = min(limiter.chunk(RECV_CHUNK), want)
                    await throttle(limiter, want)
                if self._fast_reads < FAST_CALLS and self.unread() >= want:
                    # all of it is queued already (a node short of CPU reads behind the wire): take it now,
                    # without the low-water mark's two setsockopts and a trip through epoll and the scheduler
                    await trio.lowlevel.checkpoint_if_cancelled()
                    self._fast_reads += 1
                else:
                    mark = min(want, PAYLOAD_LOWAT)
                    if mark != lowat:
                        self.set_lowat(mark)
                        lowat = mark
                    await trio.lowlevel.wait_readable(sock)  # not recv_into first: it would take a few packets
                    self._fast_reads = 0
                try:
                    n = os.readv(fd, [view[pos : pos + want]])  # readable now: trio's recv_into would yield again
                except BlockingIOError:  # a spurious wakeup: wait again
                    continue
                if not n:
                    raise PeerClosed(CloseReason.REMOTE_CLOSED, "connection closed by peer mid-piece")
                self.last_recv = trio.current_time()
                self.bytes_in += n
                TRAFFIC.received += n
                pos += n
        finally:
            if lowat != 1:
                self.set_lowat(1)

    def set_lowat(self, n: int) -> None:
        if self.sock is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
        self._queued = 0

    def unread(self) -> int:
        """Bytes the kernel holds received but not yet read (FIONREAD)."""
        if self.sock is None:
            return 0
        buf = array.array("i", [0])
        fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, buf)
        return buf[0]

    def queued_grew(self) -> bool:
        """True (and the receive clock reset) if bytes not yet read have arrived since the last call."""
        if self.sock is None:
            return False  # a stream without a socket hands over what arrived at once: nothing waits below a mark
        queued = self.unread()
        if queued > self._queued:
            self._queued = queued
            self.last_recv = trio.current_time()
            return True
        return False

    async def send_all(self, data: bytes | bytearray | memoryview, *, more: bool = False) -> None:
        """Send everything; `more`: the caller sends the rest of this message next (MSG_MORE), so a
        small header leaves in the same segment as the data behind it instead of costing the
        receiver a wakeup of its own (TCP_NODELAY is on for the small control messages)."""
        if self.sock is None:
            await self.stream.send_all(data)
            TRAFFIC.sent += len(data)
            return
        view = memoryview(data)
        flags = socket.MSG_MORE if more else 0
        while view:
            n = 0
            if not more and self._fast_sends < FAST_CALLS:
                await trio.lowlevel.checkpoint_if_cancelled()
                try:
                    n = os.write(self.sock.fileno(), view)  # write(2) is send without flags
                    self._fast_sends += 1
                except BlockingIOError:
                    n = 0
            if not n:
                self._fast_sends = 0
                n = await self.sock.send(view, flags)
            TRAFFIC.sent += n
            view = view[n:]

    async def sendfile(self, fd: int, offset: int, count: int) -> None:
        if self.sock is None:
            while count:
                data = os.pread(fd, min(count, SEND_CHUNK), offset)
                if not data:
                    raise PeerClosed(CloseReason.INTERNAL, "file shorter than the manifest says")
                await self.stream.send_all(data)
                TRAFFIC.sent += len(data)
                offset += len(data)
                count -= len(data)
            return
        out = self.sock.fileno()
        while count:
            try:
                n = os.sendfile(out, fd, offset, count)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
                continue
            if n == 0:
                raise PeerClosed(CloseReason.INTERNAL, "file shorter than the manifest says")
            TRAFFIC.sent += n
            offset += n
            count -= n
            await trio.lowlevel.checkpoint_if_cancelled()
