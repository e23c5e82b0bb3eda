"""Batched UDP I/O for the heartbeat port: recvmmsg/sendmmsg through ctypes, Linux only.

Why: per heartbeat the tracker's kernel work is what opentracker's is (~8 µs on loopback), but
CPython's `recvfrom`/`sendto` wrappers add several µs of their own per datagram (an 8 KiB bytes
allocation and shrink, the address formatted into a tuple with sprintf and parsed back, argument
parsing, the GIL dropped and taken around each call). One `recvmmsg` fills up to `VLEN` preallocated
slots and one `sendmmsg` sends every reply of the chunk; in between Python only reads lengths and
writes replies through memoryviews, and a reply goes back to the raw sockaddr the request came
from (no tuple at all). Every pointer in the header arrays is written once, here, into buffers this
object owns; per call only lengths and name pointers change (so a bug cannot point the kernel at
freed memory). Where ctypes or the calls are missing, `open_batch` returns None and the server
keeps its per-datagram loop.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import socket
import struct
import sys
from typing import Any

VLEN = 64  # datagrams per recvmmsg/sendmmsg call
RECV_SLOT = 8192  # = the server's UDP_MAX_DATAGRAM: a longer datagram is truncated (MSG_TRUNC) and refused
SEND_SLOT = 2048  # a longer reply is sent on its own with sendto
NAME_SLOT = 128  # sizeof(struct sockaddr_storage)
MSG_DONTWAIT = 0x40
MSG_TRUNC = 0x20
_MSGHDR = 64  # sizeof(struct mmsghdr) on 64-bit Linux: msghdr (56) + msg_len + padding
_IOVEC = 16
log = logging.getLogger("tracker")
# errors of one reply that are not the tracker's problem: the node retries (the next beat, or TCP)
SEND_SKIP = (errno.EAGAIN, errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EINTR)


class BatchSocket:
    """recvmmsg/sendmmsg over one UDP socket, with buffers preallocated for `VLEN` datagrams each way."""

    def __init__(self, sock: socket.socket, libc: Any) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self._recvmmsg = libc.recvmmsg
        self._sendmmsg = libc.sendmmsg
        self.rbuf = (ctypes.c_char * (VLEN * RECV_SLOT))()
        self.sbuf = (ctypes.c_char * (VLEN * SEND_SLOT))()
        self.names = (ctypes.c_char * (VLEN * NAME_SLOT))()
        self.riov = (ctypes.c_char * (VLEN * _IOVEC))()
        self.siov = (ctypes.c_char * (VLEN * _IOVEC))()
        self.rhdr = (ctypes.c_char * (VLEN * _MSGHDR))()
        self.shdr = (ctypes.c_char * (VLEN * _MSGHDR))()
        a = ctypes.addressof
        self.names_addr = a(self.names)
        for i in range(VLEN):
            struct.pack_into("PN", self.riov, i * _IOVEC, a(self.rbuf) + i * RECV_SLOT, RECV_SLOT)
            struct.pack_into("PN", self.siov, i * _IOVEC, a(self.sbuf) + i * SEND_SLOT, 0)
            # msghdr: name, namelen, iov, iovlen, control, controllen, flags; then mmsghdr.msg_len
            struct.pack_into(
                "PI4xPNPNi4xI4x", self.rhdr, i * _MSGHDR, self.names_addr + i * NAME_SLOT, NAME_SLOT,
                a(self.riov) + i * _IOVEC, 1, 0, 0, 0, 0,
            )  # fmt: skip
            struct.pack_into(
                "PI4xPNPNi4xI4x", self.shdr, i * _MSGHDR, self.names_addr, 0, a(self.siov) + i * _IOVEC, 1, 0, 0, 0, 0
            )
        self._rtemplate = bytes(self.rhdr)  # restored before each recvmmsg: msg_namelen is value-result
        self.rhdr_addr = a(self.rhdr)
        self.shdr_addr = a(self.shdr)
        self.data = memoryview(self.rbuf).cast("B")
        self.out = memoryview(self.sbuf).cast("B")
        self.rhdr_b = memoryview(self.rhdr).cast("B")
        self.rhdr_u32 = self.rhdr_b.cast("I")
        self.shdr_u32 = memoryview(self.shdr).cast("B").cast("I")
        self.shdr_u64 = memoryview(self.shdr).cast("B").cast("Q")
        self.siov_u64 = memoryview(self.siov).cast("B").cast("Q")
        self.pending = 0  # replies written since the last flush

    def recv(self) -> int:
        """Read up to VLEN ready datagrams without blocking; their count (0: none ready)."""
        self.rhdr_b[:] = self._rtemplate
        n: int = self._recvmmsg(self.fd, self.rhdr_addr, VLEN, MSG_DONTWAIT, None)
        if n >= 0:
            return n
        e = ctypes.get_errno()
        if e not in (errno.EAGAIN, errno.EINTR):  # e.g. an ICMP error reported for an earlier reply: not fatal
            log.debug("udp recvmmsg: %s", errno.errorcode.get(e, e))
        return 0

    def datagram(self, i: int) -> memoryview:
        """Datagram i (valid until the next `recv`); a truncated one (longer than a slot) comes back empty,
        so it is refused like any other malformed datagram."""
        u = self.rhdr_u32
        if u[i * 16 + 12] & MSG_TRUNC:
            return self.data[0:0]
        off = i * RECV_SLOT
        return self.data[off : off + u[i * 16 + 14]]

    def addr(self, i: int) -> Any:
        """Datagram i's source as the tuple `recvfrom` gives (for logs and STUN: the rare paths)."""
        base = i * NAME_SLOT
        name = ctypes.string_at(self.names_addr + base, NAME_SLOT)
        family = int.from_bytes(name[:2], sys.byteorder)
        port = int.from_bytes(name[2:4], "big")
        if family == socket.AF_INET6:
            flow = int.from_bytes(name[4:8], "big")
            scope = int.from_bytes(name[24:28], sys.byteorder)
            return (socket.inet_ntop(socket.AF_INET6, name[8:24]), port, flow, scope)
        return (socket.inet_ntop(socket.AF_INET, name[4:8]), port)

    def reply(self, i: int, payload: bytes) -> None:
        """Queue `payload` to datagram i's sender; sent by `flush`."""
        size = len(payload)
        if size > SEND_SLOT:
            self._sendto(payload, self.addr(i))
            return
        j = self.pending
        off = j * SEND_SLOT
        self.out[off : off + size] = payload
        self.shdr_u64[j * 8] = self.names_addr + i * NAME_SLOT
        self.shdr_u32[j * 16 + 2] = self.rhdr_u32[i * 16 + 2]
        self.siov_u64[j * 2 + 1] = size
        self.pending = j + 1

    def flush(self) -> None:
        """Send every queued reply. A reply the kernel refuses for a reason of the network (buffer full,
        unreachable) is dropped, as a lost datagram would be; any other error is raised."""
        n, j = self.pending, 0
        self.pending = 0
        while j < n:
            sent: int = self._sendmmsg(self.fd, self.shdr_addr + j * _MSGHDR, n - j, 0)
            if sent > 0:
                j += sent
                continue
            e = ctypes.get_errno()
            if e not in SEND_SKIP:
                raise OSError(e, f"sendmmsg: {errno.errorcode.get(e, e)}")
            j += 1

    def _sendto(self, payload: bytes, addr: Any) -> None:
        try:
            self.sock.sendto(payload, addr)
        except OSError as e:
            if e.errno not in SEND_SKIP:
                raise


def open_batch(sock: socket.socket) -> BatchSocket | None:
    """Batched I/O over `sock`, or None where recvmmsg/sendmmsg are not available (not Linux x86_64/arm64)."""
    if not sys.platform.startswith("linux") or struct.calcsize("P") != 8:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        for name, args in (
            ("recvmmsg", [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]),
            ("sendmmsg", [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]),
        ):
            fn = getattr(libc, name)
            fn.argtypes = args
            fn.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return BatchSocket(sock, libc)


class PlainSocket:
    """The same interface over recvfrom/sendto, one datagram per call (where open_batch gives None)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.datagrams: list[tuple[bytes, Any]] = []

    def recv(self) -> int:
        got = self.datagrams = []
        recvfrom = self.sock.recvfrom
        for _ in range(VLEN):
            try:
                got.append(recvfrom(RECV_SLOT))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:  # e.g. ECONNREFUSED reported for an earlier reply: not fatal
                log.debug("udp recv: %s", e)
        return len(got)

    def datagram(self, i: int) -> bytes:
        return self.datagrams[i][0]

    def addr(self, i: int) -> Any:
        return self.datagrams[i][1]

    def reply(self, i: int, payload: bytes) -> None:
        try:
            self.sock.sendto(payload, self.datagrams[i][1])
        except OSError as e:
            if e.errno not in SEND_SKIP:
                raise

    def flush(self) -> None:
        pass
