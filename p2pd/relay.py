"""A TCP relay: splices two nodes that cannot reach each other, and the node's side of meeting there.

Run by the tracker (on by default) and by any node started with `p2pd run --relay`. Both nodes of a
pair dial the relay and present the token the tracker gave them (`p2pd.protocol.rendezvous`); the
relay answers each once both are there, then copies bytes both ways until either side closes or the
pair is idle for `idle_timeout`. It never dials anyone, keeps one read buffer per direction (a chunk
in flight, no queue), charges every byte to one token bucket (`rate`, the relay's own cap) and holds
at most `max_pairs` pairs, waiting ones included. Shared by the tracker and the daemon: it imports
only trio and `p2pd.protocol`.
"""

from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import trio

from p2pd.protocol import rendezvous as rv
from p2pd.protocol.ratelimit import TokenBucket
from p2pd.stream_io import LIVE_SOCKETS, TRAFFIC

log = logging.getLogger(__name__)

CHUNK = 256 * 1024  # per read: large enough for ~1 GB/s on one core, and the only buffer per direction


class RelayRefused(Exception):
    """The relay (or the way to it) said no; the message says why."""


@dataclass
class RelayStats:
    pairs_active: int = 0  # slots in use: pairs waiting for their second node, and spliced pairs
    pairs_spliced: int = 0
    refused: int = 0
    bytes_relayed: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "pairs_active": self.pairs_active,
            "pairs_spliced": self.pairs_spliced,
            "refused": self.refused,
            "bytes_relayed": self.bytes_relayed,
        }


@dataclass(eq=False)
class _Waiter:
    stream: trio.SocketStream
    node_id: str
    taken: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)


class Relay:
    """The relay's accept side. `keys()` lists the keys its tokens may be minted with (newest first).

    `is_registered`, when given (the tracker's relay), is asked about each node at the moment it
    presents its token: a node that left or expired since the token was minted is refused.
    """

    def __init__(
        self,
        *,
        keys: Callable[[], Sequence[bytes]],
        rate: float | None = None,
        max_pairs: int = 64,
        pair_timeout: float = 10.0,
        idle_timeout: float = 60.0,
        hello_timeout: float = 5.0,
        is_registered: Callable[[str], Awaitable[bool]] | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if max_pairs < 1:
            raise ValueError("a relay needs max_pairs >= 1")
        self.keys = keys
        self.bucket = TokenBucket(rate or math.inf)  # its clock is trio's; it catches up at the first byte
        self.max_pairs = max_pairs
        self.pair_timeout = pair_timeout
        self.idle_timeout = idle_timeout
        self.hello_timeout = hello_timeout
        self.is_registered = is_registered
        self.wall = wall
        self.ledger = rv.TokenLedger()
        self.waiting: dict[bytes, _Waiter] = {}
        self.stats = RelayStats()
        self.port: int | None = None

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on host:port (0: any free port); started with the port."""
        listeners = await trio.open_tcp_listeners(port, host=host or None)
        self.port = int(listeners[0].socket.getsockname()[1])
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self.handle, listeners)
            task_status.started(self.port)

    async def handle(self, stream: trio.SocketStream) -> None:
        """One connection to the relay: greeting, token check, then wait for the other node or splice."""
        try:
            peer = _fmt(stream.socket.getpeername())
        except OSError:
            peer = "unknown"
        async with stream:
            try:
                with trio.fail_after(self.hello_timeout):
                    fixed = await read_exactly(stream, rv.HELLO_FIXED)
                    token, node_id = rv.parse_hello_rest(await read_exactly(stream, rv.parse_hello_fixed(fixed)))
            except (rv.HelloError, trio.TooSlowError, EOFError, trio.BrokenResourceError, OSError) as e:
                self.stats.refused += 1
                log.warning("relay: refused a connection from %s: %s", peer, _why(e))
                return
            try:
                claims = rv.verify_token(self.keys(), token, node_id, self.wall())
                if self.is_registered is not None and not await self.is_registered(node_id):
                    raise rv.TokenError(f"node {node_id[:8]} is not registered")
                self.ledger.claim(claims, node_id, self.wall())
            except rv.TokenError as e:
                await self._refuse(stream, peer, node_id, str(e))
                return
            waiter = self.waiting.pop(claims.nonce, None)
            if waiter is not None:
                waiter.taken.set()
                await self._splice(waiter, stream, node_id, peer)
                return
            if self.stats.pairs_active >= self.max_pairs:
                await self._refuse(stream, peer, node_id, f"relay busy ({self.max_pairs} pairs)")
                return
            await self._wait_for_partner(stream, claims, node_id, peer)

    async def _wait_for_partner(
        self, stream: trio.SocketStream, claims: rv.TokenClaims, node_id: str, peer: str
    ) -> None:
        w = _Waiter(stream, node_id)
        self.waiting[claims.nonce] = w
        self.stats.pairs_active += 1
        try:
            with trio.move_on_after(self.pair_timeout):
                await w.taken.wait()
        finally:
            if self.waiting.get(claims.nonce) is w:
                del self.waiting[claims.nonce]
            if not w.taken.is_set():
                self.stats.pairs_active -= 1
        if not w.taken.is_set():
            other = claims.b if node_id == claims.a else claims.a
            await self._refuse(stream, peer, node_id, f"node {other[:8]} did not arrive within {self.pair_timeout:g} s")
            return
        await w.done.wait()  # the splice (bounded by the idle timeout) runs in the partner's task

    async def _refuse(self, stream: trio.SocketStream, peer: str, node_id: str, why: str) -> None:
        self.stats.refused += 1
        log.warning("relay: refused node %s from %s: %s", node_id[:8], peer, why)
        with trio.move_on_after(1):
            try:
                await stream.send_all(rv.encode_reply(rv.STATUS_REFUSED, why))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _splice(self, w: _Waiter, stream: trio.SocketStream, node_id: str, peer: str) -> None:
        a, b = w.stream, stream
        self.stats.pairs_spliced += 1
        # relayed bytes cross this node's link because of p2pd: auto-throttling counts them as its own
        # (with what the two sockets' kernel queues hold), not as another service's traffic
        LIVE_SOCKETS.add(a.socket)
        LIVE_SOCKETS.add(b.socket)
        moved = 0
        try:
            with trio.fail_after(5):
                ok = rv.encode_reply(rv.STATUS_PAIRED)
                await a.send_all(ok)
                await b.send_all(ok)
            log.info("relay: spliced %s and %s (%s)", w.node_id[:8], node_id[:8], peer)
            last = trio.current_time()
            open_directions = 2
            async with trio.open_nursery() as nursery:

                async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
                    nonlocal last, moved, open_directions
                    try:
                        while data := await src.receive_some(CHUNK):
                            TRAFFIC.received += len(data)
                            last = now = trio.current_time()
                            delay = self.bucket.reserve(len(data), now)
                            if delay > 0:
                                await trio.sleep(delay)
                            await dst.send_all(data)
                            TRAFFIC.sent += len(data)
                            moved += len(data)
                            self.stats.bytes_relayed += len(data)
                        with trio.move_on_after(1):
                            await dst.send_eof()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        nursery.cancel_scope.cancel()  # one side is gone: so is the pair
                    open_directions -= 1
                    if open_directions == 0:
                        nursery.cancel_scope.cancel()

                nursery.start_soon(pump, a, b)
                nursery.start_soon(pump, b, a)
                while True:
                    await trio.sleep(max(0.05, self.idle_timeout / 4))
                    if trio.current_time() - last > self.idle_timeout:
                        log.info(
                            "relay: pair %s/%s idle for %g s: closed", w.node_id[:8], node_id[:8], self.idle_timeout
                        )
                        nursery.cancel_scope.cancel()
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            log.info("relay: pair %s/%s could not start: %s", w.node_id[:8], node_id[:8], _why(e))
        finally:
            self.stats.pairs_active -= 1
            w.done.set()
            log.debug("relay: pair %s/%s ended after %d bytes", w.node_id[:8], node_id[:8], moved)


async def read_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    """Exactly n bytes and not one more (what follows belongs to whoever reads next); EOFError if cut short."""
    buf = bytearray()
    while len(buf) < n:
        data = await stream.receive_some(n - len(buf))
        if not data:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


async def dial_relay(
    addr: tuple[str, int], token: bytes, node_id: str, *, connect_timeout: float, pair_timeout: float
) -> trio.SocketStream:
    """Connect to a relay and wait until it has paired us; the stream then carries the other node's bytes.

    RelayRefused (with the relay's reason) on refusal or any failure on the way; nothing is left open.
    """
    host, port = addr
    where = _fmt((host, port))
    sock = trio.socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        with trio.fail_after(connect_timeout):
            await sock.connect((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = trio.SocketStream(sock)
        await stream.send_all(rv.encode_hello(token, node_id))
        with trio.fail_after(pair_timeout):
            status, length = await read_exactly(stream, 2)
            message = (await read_exactly(stream, length)).decode(errors="replace") if length else ""
        if status != rv.STATUS_PAIRED:
            raise RelayRefused(f"relay {where} refused: {message or 'no reason given'}")
        return stream
    except (OSError, trio.TooSlowError, EOFError, trio.BrokenResourceError) as e:
        sock.close()
        raise RelayRefused(f"relay {where}: {_why(e)}") from None
    except BaseException:
        sock.close()
        raise


def _why(e: BaseException) -> str:
    if isinstance(e, trio.TooSlowError):
        return "timed out"
    return str(e) or type(e).__name__


def _fmt(addr: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
