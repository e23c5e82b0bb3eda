"""The tracker's STUN server: how nodes learn their public address and classify their NAT.

Binding requests (RFC 5389) are answered with the source address they came from (XOR-MAPPED-ADDRESS
and MAPPED-ADDRESS). With a second address and port (`--stun-alt`), RFC 3489 CHANGE-REQUEST is
honoured: the answer leaves from the other IP and/or port, and every answer names that alternate
address (CHANGED-ADDRESS, OTHER-ADDRESS) — that is what lets a node tell a full cone from a
port-restricted one from a symmetric NAT (`p2pd/protocol/nat.py`). Without one, a CHANGE-REQUEST is
answered with error 420 (RFC 5780 §6.1) and nodes learn their mapped address only.

Where it listens (docs/tracker.md, "NAT detection"): by default on the tracker's own UDP port, shared
with heartbeats — a STUN message starts with two zero bits and a heartbeat (a msgpack array) does not,
so the heartbeat loop hands STUN datagrams here from the path it only takes for undecodable ones, and
the heartbeat fast path costs nothing more. No new port means nothing more to open in firewalls and
no clash between trackers or test runs on one host. `--stun HOST:PORT` moves it to a port of its own.

Hostile input: a datagram that is not a Binding request is dropped (counted; one log line per
`LOG_EVERY` seconds at most, with the count, so a flood cannot fill the log); nothing raises out of
`handle`. An answer only ever goes to the source address of the request: addresses named inside a
request (RFC 3489's RESPONSE-ADDRESS, RFC 5780's RESPONSE-PORT) are ignored, so the server cannot be
aimed at a third party beyond what any UDP service reflects.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from p2pd.protocol import stun

log = logging.getLogger("tracker.stun")

Addr = tuple[str, int]
LOG_EVERY = 10.0  # seconds between two log lines about dropped datagrams
MAX_BATCH = 256  # datagrams handled per wake-up of a socket reader
BAD_CHANGE = (420, "CHANGE-REQUEST not supported: this tracker has no second address (--stun-alt)")


@dataclass(frozen=True)
class StunSettings:
    """Where STUN listens: `listen` None = the tracker's own UDP port (shared with heartbeats);
    `alt` = the second address and port for CHANGE-REQUEST (None: no classification beyond the mapping)."""

    listen: Addr | None = None
    alt: Addr | None = None


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_unspecified(host: str) -> bool:
    try:
        return host == "" or ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def check_settings(primary: Addr, alt: Addr | None) -> None:
    """Refuse what cannot work, with the reason (ValueError): the CLI prints it as one line."""
    if alt is None:
        return
    for what, (host, _) in (("the STUN address", primary), ("--stun-alt", alt)):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{what} {host!r} must be an IP address: CHANGE-REQUEST answers leave from it") from None
    if is_unspecified(primary[0]) or is_unspecified(alt[0]):
        raise ValueError(
            "--stun-alt needs a specific primary STUN address (--stun IP:PORT, or --listen IP:PORT) "
            "and a specific alternate one, not 0.0.0.0/::: CHANGE-REQUEST answers must leave from "
            "a known address"
        )
    if primary[1] == 0 or alt[1] == 0:
        raise ValueError(
            "--stun-alt needs fixed ports (not 0) for the primary and the alternate STUN address: nodes are told them"
        )
    if primary[0] == alt[0] or primary[1] == alt[1]:
        raise ValueError(
            f"--stun-alt {alt[0]}:{alt[1]} must differ from the primary STUN address "
            f"{primary[0]}:{primary[1]} in both IP and port"
        )


@dataclass(frozen=True, slots=True)
class Reply:
    send_from: Addr  # key of the socket the answer leaves from
    payload: bytes
    to: Addr  # always the request's source


class StunResponder:
    """Sans-IO: one datagram in (on the socket `arrived_on`, from `source`), at most one `Reply` out."""

    def __init__(self, primary: Addr, alt: Addr | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.primary = primary
        self.alt = alt
        self.clock = clock
        self.answered = 0
        self.dropped = 0
        self._dropped_since_log = 0
        self._last_log = -LOG_EVERY

    def addresses(self) -> list[Addr]:
        """The addresses to listen on: the primary, and with an alternate every IP x port combination."""
        if self.alt is None:
            return [self.primary]
        (ip1, p1), (ip2, p2) = self.primary, self.alt
        return [(ip1, p1), (ip1, p2), (ip2, p1), (ip2, p2)]

    def _flip(self, key: Addr, change_ip: bool, change_port: bool) -> Addr:
        assert self.alt is not None
        (ip1, p1), (ip2, p2) = self.primary, self.alt
        ip, port = key
        if change_ip:
            ip = ip2 if ip == ip1 else ip1
        if change_port:
            port = p2 if port == p1 else p1
        return ip, port

    def handle(self, arrived_on: Addr, data: bytes, source: Any) -> Reply | None:
        src: Addr = (str(source[0]), int(source[1]))
        try:
            req = stun.parse_request(data)
        except stun.StunError as e:
            self._drop(src, str(e))
            return None
        if src[1] == 0:
            self._drop(src, "source port 0")
            return None
        if req.change_ip or req.change_port:
            if self.alt is None:
                self.answered += 1
                return Reply(arrived_on, stun.error_response(req, *BAD_CHANGE), src)
            send_from = self._flip(arrived_on, req.change_ip, req.change_port)
        else:
            send_from = arrived_on
        other = self._flip(arrived_on, True, True) if self.alt is not None else None
        origin = send_from if is_ip(send_from[0]) and not is_unspecified(send_from[0]) else None
        try:
            payload = stun.success_response(req, src, other=other, origin=origin)
        except ValueError as e:  # a source address the codec cannot write (never from a real socket)
            self._drop(src, f"cannot answer: {e}")
            return None
        self.answered += 1
        return Reply(send_from, payload, src)

    def _drop(self, src: Addr, why: str) -> None:
        self.dropped += 1
        self._dropped_since_log += 1
        now = self.clock()
        if now - self._last_log >= LOG_EVERY:
            more = self._dropped_since_log - 1
            log.info(
                "dropped a STUN datagram from %s: %s%s",
                _fmt(src),
                why,
                f" (and {more} more in the last {LOG_EVERY:g} s)" if more > 0 else "",
            )
            self._last_log = now
            self._dropped_since_log = 0


class StunServer:
    """The responder's sockets and readers. Sockets in `shared` belong to someone else (the heartbeat
    socket): that owner passes their STUN datagrams to `handle`; the others are read here."""

    def __init__(self, responder: StunResponder, sockets: dict[Addr, socket.socket], shared: set[Addr]) -> None:
        self.responder = responder
        self.sockets = sockets
        self.shared = shared

    @classmethod
    def open(
        cls, settings: StunSettings, listen_host: str, listen_port: int, heartbeat_sock: socket.socket | None
    ) -> StunServer:
        """Bind every STUN socket (OSError if one cannot be bound); the heartbeat socket is reused as the
        primary when STUN shares the tracker's port."""
        primary = settings.listen or (listen_host or "0.0.0.0", listen_port)
        check_settings(primary, settings.alt)
        responder = StunResponder(primary, settings.alt)
        sockets: dict[Addr, socket.socket] = {}
        shared: set[Addr] = set()
        try:
            for key in responder.addresses():
                if key == primary and settings.listen is None and heartbeat_sock is not None:
                    sockets[key] = heartbeat_sock
                    shared.add(key)
                else:
                    try:
                        sockets[key] = open_udp(key)
                    except OSError as e:
                        raise OSError(e.errno, f"{e.strerror} (STUN on {_fmt(key)})") from e
        except OSError:
            for key, s in sockets.items():
                if key not in shared:
                    s.close()
            raise
        if primary[1] == 0:  # port 0: report the port the kernel picked
            bound = sockets[primary].getsockname()[1]
            responder.primary = (primary[0], bound)
            sockets[responder.primary] = sockets.pop(primary)
        return cls(responder, sockets, shared)

    @property
    def primary(self) -> Addr:
        return self.responder.primary

    def handle(self, arrived_on: Addr, data: bytes, source: Any) -> None:
        reply = self.responder.handle(arrived_on, data, source)
        if reply is None:
            return
        try:
            self.sockets[reply.send_from].sendto(reply.payload, reply.to)
        except (BlockingIOError, InterruptedError):
            pass  # send buffer full: the node retransmits
        except OSError as e:
            if e.errno not in (
                errno.ECONNREFUSED,
                errno.EHOSTUNREACH,
                errno.ENETUNREACH,
                errno.EINVAL,
                errno.EAFNOSUPPORT,
            ):
                raise
            log.debug("stun answer to %s not sent: %s", _fmt(reply.to), e)

    def on_heartbeat_port(self, data: bytes, source: Any) -> bool:
        """For the heartbeat loop: handle `data` if it is STUN (True), else leave it to the caller."""
        if not stun.looks_like_stun(data):
            return False
        self.handle(self.primary, data, source)
        return True

    async def serve(self) -> None:
        # the codec's import (p2pd.protocol.stun loads it on first use), beside the loop rather than in it
        await trio.to_thread.run_sync(stun.load_codec)
        async with trio.open_nursery() as nursery:
            for key, sock in self.sockets.items():
                if key not in self.shared:
                    nursery.start_soon(self._read, key, sock)

    async def _read(self, key: Addr, sock: socket.socket) -> None:
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(MAX_BATCH):
                try:
                    data, source = sock.recvfrom(stun.MAX_MESSAGE + 1)
                except BlockingIOError:
                    break
                except OSError as e:  # e.g. ECONNREFUSED for an earlier answer: not fatal
                    log.debug("stun recv on %s: %s", _fmt(key), e)
                    continue
                self.handle(key, data, source)

    def close(self) -> None:
        for key, s in self.sockets.items():
            if key not in self.shared:
                s.close()


def open_udp(addr: Addr, *, buffer_bytes: int | None = None) -> socket.socket:
    """A non-blocking UDP socket bound to `addr`; `buffer_bytes`: receive and send buffers to ask for."""
    infos = socket.getaddrinfo(addr[0] or None, addr[1], type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if buffer_bytes is not None:
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                s.setsockopt(socket.SOL_SOCKET, opt, buffer_bytes)
        s.bind(sockaddr)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


def _fmt(addr: Addr) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
