"""One QUIC connection over a punched UDP socket, carrying one bidirectional stream as a trio Stream.

Why QUIC: a punched UDP path needs congestion control, retransmission and flow control before it can
carry a p2pd session; QUIC is that, standard and tested. aioquic's `QuicConnection` is sans-IO (research
FINDINGS §3: driven from trio directly, 5–7 MB/s between two NATed hosts, against 4–8 MB/s for an aiortc
data channel that needs its own asyncio thread), so no asyncio is involved: `QuicEndpoint.run` feeds it
the socket's datagrams and its timers, and sends what it wants sent.

The client (the node that asked for the punch) opens stream 0 and speaks first (the p2pd handshake),
so `p2pd.connections.open_outgoing` / `accept` and the peer code run on `QuicStream` unchanged.

- TLS: QUIC requires it, so each daemon makes a self-signed certificate at start (`Credentials`) and
  the client does not verify it. This encrypts the path but does not authenticate the peer: the p2pd
  handshake names the node, as on every other path. Authenticating nodes is issue #14.
- Keepalive: NATs forget an idle UDP mapping after ~30 s (FINDINGS §3), so an idle connection sends a
  QUIC PING every `keepalive` seconds (< 25 s); a peer that stops answering for `idle_timeout` seconds
  ends the connection (the swarm then reaches the peer again, by whichever path works).
- Memory is bounded both ways: `send_all` waits while more than `SEND_BUFFER` bytes are unacknowledged,
  and the socket is not read while more than `RECV_BUFFER` bytes wait for `receive_some` (the kernel
  drops what does not fit and QUIC slows down and resends; aioquic opens its flow-control window as
  data arrives, not as the application reads it).
"""

from __future__ import annotations

import datetime
import errno
import logging
import socket
import ssl
from typing import TYPE_CHECKING, Any

import trio

from p2pd.protocol import udp_punch
from p2pd.stream_io import TRAFFIC

if TYPE_CHECKING:
    # aioquic is imported where a QUIC connection is made (`configuration`), not with this module: every
    # daemon imports this module, few ever punch UDP, and importing aioquic costs ~0.25 s of CPU per process
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

log = logging.getLogger(__name__)

ALPN = "p2pd/1"
STREAM_ID = 0  # the client's first bidirectional stream
MAX_DATAGRAM = 1400  # fits a 1500-byte MTU with IPv6 and a tunnel header or two to spare
WINDOW = 16 << 20  # QUIC flow-control windows (connection and stream): ~0.1 s at 1 Gbit/s
SEND_BUFFER = 4 << 20  # unacknowledged bytes a writer may queue before send_all waits
RECV_BUFFER = 16 << 20  # received bytes waiting for the reader before the socket is left unread
SEND_CHUNK = 64 << 10
RECV_BATCH = 64  # datagrams fed to QUIC before it may answer
KEEPALIVE = 15.0  # s without sending before a PING (NAT mappings expire after ~30 s idle)
IDLE_TIMEOUT = 45.0  # s without hearing from the peer: the path is dead
ANNOUNCE_EVERY = 0.1  # s between a QUIC server's reminders to a punched peer that has not sent QUIC yet
SOCKET_BUFFER = 4 << 20  # kernel buffers: a Python peer busy for a few ms must not lose a window's worth
_TRANSIENT = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EPERM, errno.ENOBUFS)


class Credentials:
    """This daemon's self-signed certificate for the QUIC handshakes it answers (see the module docstring)."""

    def __init__(self, node_id: str) -> None:
        # imported here: cryptography's X.509 layer is ~0.1 s of CPU, paid at a daemon's first UDP punch only
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"p2pd-{node_id[:16]}")])
        now = datetime.datetime.now(datetime.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .sign(self.key, hashes.SHA256())
        )


def configuration(is_client: bool, credentials: Credentials | None = None) -> QuicConfiguration:
    from aioquic.quic.configuration import QuicConfiguration

    config = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[ALPN],
        max_data=WINDOW,
        max_stream_data=WINDOW,
        max_datagram_size=MAX_DATAGRAM,
        idle_timeout=IDLE_TIMEOUT,
    )
    if is_client:
        config.verify_mode = ssl.CERT_NONE  # no PKI between nodes; who is who is the p2pd handshake's (#14)
    else:
        if credentials is None:
            raise ValueError("a QUIC server needs credentials")
        config.certificate = credentials.certificate
        config.private_key = credentials.key
    return config


def tune_socket(sock: trio.socket.SocketType | socket.socket) -> None:
    """Large kernel buffers: past net.core.[rw]mem_max where allowed (CAP_NET_ADMIN), else up to it."""
    forced = (getattr(socket, "SO_RCVBUFFORCE", None), getattr(socket, "SO_SNDBUFFORCE", None))
    for force, opt in zip(forced, (socket.SO_RCVBUF, socket.SO_SNDBUF), strict=True):
        try:
            if force is None:
                raise OSError("no SO_*BUFFORCE here")
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            except OSError as e:  # smaller buffers only cost throughput
                log.debug("quic: cannot set socket buffer: %s", e)


class QuicClosed(Exception):
    """The QUIC connection ended (closed by either side, timed out, or failed its handshake)."""


class QuicEndpoint:
    """Drives one `QuicConnection` over `sock`, talking only to `peer`; `run` until it ends or is cancelled.

    The socket is a non-blocking stdlib socket waited on with `trio.lowlevel.wait_readable`, so that all
    datagrams already queued are fed to QUIC before it answers once (one ACK for a burst, not one each:
    per-datagram work is what limits QUIC in Python)."""

    def __init__(self, sock: socket.socket, conn: QuicConnection, peer: tuple[str, int]) -> None:
        self.sock = sock
        self.conn = conn
        self.peer = _plain(peer)  # compared with each datagram's source
        self.peer_wire = _wire(self.peer, sock)  # as this socket sends to it
        self.handshake_done = trio.Event()
        self.closed = trio.Event()
        self.close_reason = ""
        self.recv_buffer = bytearray()
        self.recv_eof = False
        self._changed = trio.Event()  # something a reader or writer waits for happened
        self._wake_timer = trio.Event()
        self._drained = trio.Event()
        self._last_send = 0.0
        self._ping_uid = 0
        self._cancel: trio.CancelScope | None = None
        self.bytes_in = 0
        self.bytes_out = 0

    # -- driving -------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with trio.CancelScope() as cancel:
                self._cancel = cancel
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._recv_loop)
                    nursery.start_soon(self._timer_loop)
                    task_status.started()
                    await self.transmit()
                    await self.closed.wait()
                    nursery.cancel_scope.cancel()
        finally:
            self._mark_closed(self.close_reason or "stopped")
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()

    def stop(self) -> None:
        if self._cancel is not None:
            self._cancel.cancel()

    async def transmit(self) -> None:
        now = trio.current_time()
        for data, addr in self.conn.datagrams_to_send(now=now):
            while True:
                try:
                    self.sock.sendto(data, addr)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self.sock)
                    continue
                except OSError as e:  # like a lost datagram: QUIC resends
                    if e.errno not in _TRANSIENT:
                        raise
                break
            self.bytes_out += len(data)
            TRAFFIC.sent += len(data)  # p2pd's own bytes: auto-throttling must not read them as another service's
            self._last_send = now
        self._wake_timer.set()
        await trio.lowlevel.checkpoint()

    async def _recv_loop(self) -> None:
        while True:
            while len(self.recv_buffer) > RECV_BUFFER and not self.closed.is_set():
                self._drained = trio.Event()
                await self._drained.wait()
            await trio.lowlevel.wait_readable(self.sock)
            fed = 0
            for _ in range(RECV_BATCH):
                try:
                    data, addr = self.sock.recvfrom(65536)
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno in _TRANSIENT:
                        continue
                    raise
                TRAFFIC.received += len(data)  # whatever it is, it crossed this node's link because of p2pd
                if _plain(addr) != self.peer or udp_punch.is_probe(data):
                    continue  # a late punch probe, or someone who is not our peer
                self.bytes_in += len(data)
                self.conn.receive_datagram(data, self.peer_wire, now=trio.current_time())
                fed += 1
            if fed:
                self._dispatch()
                await self.transmit()
            else:
                await trio.lowlevel.checkpoint()

    async def _timer_loop(self) -> None:
        while True:
            self._wake_timer = trio.Event()
            deadline = self.conn.get_timer()
            keepalive_at = self._last_send + KEEPALIVE if self.handshake_done.is_set() else None
            at = min(t for t in (deadline, keepalive_at, trio.current_time() + KEEPALIVE) if t is not None)
            with trio.move_on_at(at):
                await self._wake_timer.wait()
                continue
            now = trio.current_time()
            if deadline is not None and now >= deadline:
                self.conn.handle_timer(now=now)
                self._dispatch()
            if keepalive_at is not None and now >= keepalive_at:
                self._ping_uid += 1
                self.conn.send_ping(self._ping_uid)
            await self.transmit()

    def _dispatch(self) -> None:
        from aioquic.quic import events

        while (ev := self.conn.next_event()) is not None:
            if isinstance(ev, events.HandshakeCompleted):
                self.handshake_done.set()
            elif isinstance(ev, events.StreamDataReceived) and ev.stream_id == STREAM_ID:
                self.recv_buffer += ev.data
                if ev.end_stream:
                    self.recv_eof = True
            elif isinstance(ev, events.StreamReset) and ev.stream_id == STREAM_ID:
                self._mark_closed(f"the peer reset the stream (code {ev.error_code})")
            elif isinstance(ev, events.ConnectionTerminated):
                why = ev.reason_phrase or f"code {ev.error_code}"
                self._mark_closed(f"connection closed: {why}")
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _mark_closed(self, reason: str) -> None:
        if not self.closed.is_set():
            self.close_reason = reason
            self.closed.set()
        self._drained.set()
        self._notify()

    # -- what the stream uses ------------------------------------------------------------------------

    def unacked(self) -> int:
        """Bytes written to the stream and not acknowledged yet (aioquic keeps no public count of it)."""
        stream = self.conn._streams.get(STREAM_ID)  # noqa: SLF001 -- see the docstring
        if stream is None:
            return 0
        sender = stream.sender
        return int(sender._buffer_stop - sender._buffer_start)  # noqa: SLF001

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def take(self, max_bytes: int) -> bytes:
        data = bytes(self.recv_buffer[:max_bytes])
        del self.recv_buffer[:max_bytes]
        if len(self.recv_buffer) <= RECV_BUFFER:
            self._drained.set()
        return data


def _plain(addr: Any) -> tuple[str, int]:
    host = str(addr[0])
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:") :]
    return host, int(addr[1])


class QuicStream(trio.abc.Stream):
    """Stream 0 of an endpoint's connection as a trio Stream (closing it closes the connection)."""

    def __init__(self, endpoint: QuicEndpoint) -> None:
        self.endpoint = endpoint
        self._send_lock = trio.StrictFIFOLock()
        self._closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        ep = self.endpoint
        if self._closed:
            raise trio.ClosedResourceError("the QUIC stream is closed")
        async with self._send_lock:
            view = memoryview(data)
            for start in range(0, len(view), SEND_CHUNK):
                while ep.unacked() > SEND_BUFFER and not ep.closed.is_set():
                    await ep.wait_changed()
                if ep.closed.is_set():
                    raise trio.BrokenResourceError(ep.close_reason)
                ep.conn.send_stream_data(STREAM_ID, bytes(view[start : start + SEND_CHUNK]))
                await ep.transmit()

    async def wait_send_all_might_not_block(self) -> None:
        ep = self.endpoint
        while ep.unacked() > SEND_BUFFER and not ep.closed.is_set():
            await ep.wait_changed()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        ep = self.endpoint
        if self._closed:
            raise trio.ClosedResourceError("the QUIC stream is closed")
        while not ep.recv_buffer:
            if ep.recv_eof:
                return b""
            if ep.closed.is_set():
                raise trio.BrokenResourceError(ep.close_reason)
            await ep.wait_changed()
        return ep.take(max_bytes or 65536)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        ep = self.endpoint
        if not ep.closed.is_set():
            ep.conn.close(reason_phrase="closed")
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                try:
                    await ep.transmit()
                except OSError as e:
                    log.debug("quic: close not sent: %s", e)
            ep._mark_closed("closed by us")  # noqa: SLF001 -- the stream owns its endpoint
        ep.stop()
        await trio.lowlevel.checkpoint()


async def connect(
    nursery: trio.Nursery, sock: trio.socket.SocketType, peer: tuple[str, int], *, timeout: float
) -> QuicStream:
    """Open a QUIC connection to `peer` from `sock` (which it takes over) and return its stream.

    The endpoint's tasks run in `nursery` until the stream is closed or the connection ends."""
    from aioquic.quic.connection import QuicConnection

    conn = QuicConnection(configuration=configuration(True))
    conn.connect(_wire(peer, sock), now=trio.current_time())
    return await _start(nursery, sock, conn, peer, timeout)


async def accept(
    nursery: trio.Nursery,
    sock: trio.socket.SocketType,
    peer: tuple[str, int],
    credentials: Credentials,
    *,
    timeout: float,
    probe_reply: bytes | None = None,
) -> QuicStream:
    """Answer the QUIC connection `peer` opens to `sock` (which it takes over) and return its stream.

    `probe_reply`: sent to `peer` every `ANNOUNCE_EVERY` seconds meanwhile, and for each punch probe from
    it: the punch's last word may have been lost, and the peer sends QUIC only once it has heard it."""
    from aioquic.buffer import Buffer, BufferReadError
    from aioquic.quic.connection import QuicConnection
    from aioquic.quic.packet import pull_quic_header

    tune_socket(sock)
    first: tuple[bytes, Any] | None = None

    async def announce() -> None:
        assert probe_reply is not None
        while True:
            await _send_quietly(sock, probe_reply, _wire(peer, sock))
            await trio.sleep(ANNOUNCE_EVERY)

    async def wait_first(cancel: trio.CancelScope) -> None:
        nonlocal first
        while first is None:
            try:
                data, addr = await sock.recvfrom(65536)
            except OSError as e:
                if e.errno in _TRANSIENT:
                    continue
                raise
            if _plain(addr) != peer:
                continue
            if udp_punch.is_probe(data):
                if probe_reply is not None:
                    await _send_quietly(sock, probe_reply, _wire(peer, sock))
                continue
            try:
                header = pull_quic_header(Buffer(data=data), host_cid_length=8)
            except (BufferReadError, ValueError):
                continue
            if header.packet_type is None or not header.destination_cid:
                continue
            first = data, header.destination_cid
        cancel.cancel()

    with trio.move_on_after(timeout):
        async with trio.open_nursery() as waiting:
            if probe_reply is not None:
                waiting.start_soon(announce)
            waiting.start_soon(wait_first, waiting.cancel_scope)
    if first is None:
        sock.close()
        raise QuicClosed(f"no QUIC connection from {peer[0]}:{peer[1]} within {timeout:.1f} s")
    data, dcid = first
    conn = QuicConnection(configuration=configuration(False, credentials), original_destination_connection_id=dcid)
    conn.receive_datagram(data, _wire(peer, sock), now=trio.current_time())
    return await _start(nursery, sock, conn, peer, timeout)


async def _start(
    nursery: trio.Nursery, sock: trio.socket.SocketType, conn: QuicConnection, peer: tuple[str, int], timeout: float
) -> QuicStream:
    raw = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    raw.setblocking(False)
    tune_socket(raw)
    ep = QuicEndpoint(raw, conn, peer)
    ep._dispatch()  # noqa: SLF001 -- the server's first datagram was fed before the endpoint existed
    await nursery.start(ep.run)
    with trio.move_on_after(timeout):
        while not ep.handshake_done.is_set() and not ep.closed.is_set():
            await ep.wait_changed()
    if not ep.handshake_done.is_set():
        why = ep.close_reason or f"no QUIC handshake within {timeout:.1f} s"
        ep.stop()
        raise QuicClosed(why)
    return QuicStream(ep)


async def _send_quietly(sock: trio.socket.SocketType, data: bytes, addr: tuple[str, int]) -> None:
    try:
        await sock.sendto(data, addr)
    except OSError as e:  # like a lost datagram
        if e.errno not in _TRANSIENT:
            raise


def _wire(peer: tuple[str, int], sock: trio.socket.SocketType | socket.socket) -> tuple[str, int]:
    if sock.family == socket.AF_INET6 and ":" not in peer[0]:
        return f"::ffff:{peer[0]}", peer[1]
    return peer
