"""The `udp-punch` path: a UDP hole punch (a birthday spray when one side is symmetric), then QUIC over it.

Why: TCP simultaneous open (`tcp-punch`) connects two cones, but a symmetric NAT gives every new
destination a new port, so the peer cannot aim at it; over UDP a birthday punch still meets it
(research FINDINGS §3: cone <-> symmetric connected only by the birthday spray, in 84–240 ms, or by a
relay). The punched socket then carries one QUIC connection (`p2pd.quic_stream`), whose stream is a
trio Stream: the p2pd handshake and the peer code run on it unchanged. Not ICE: aiortc's data channel
needs an asyncio thread and is no faster (4–8 MB/s), and ICE's candidate checks do not do the spray
that the symmetric case needs.

Rendezvous (tracker/signals.py, `udp_punch` / `udp_punch_answer` over the signal channel): each side
opens its socket(s), learns the port its NAT maps them to from the tracker's STUN server, and sends
that port with its NAT type; the tracker adds the IP it sees the node's signal connection come from,
so a node can only ever be made to send to another registered node's public IP. Who does what is
`p2pd.protocol.udp_punch.plan`. The node that asked is the QUIC client and sends the p2pd handshake;
the other answers (`answer`) like a relay meeting.

Raced after the TCP paths and before the relay (`TraversalConfig.udp_punch_after`): where TCP works
it has won before this path starts, and QUIC in Python moves ~5–7 MB/s, not ~1 GB/s like TCP.
"""

from __future__ import annotations

import logging
import random
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import trio

from p2pd import connections, quic_stream
from p2pd.connections import ConnectError, Connection, ConnectionPath
from p2pd.nat_detect import NatStatus, binding, plain
from p2pd.protocol import auth, wire
from p2pd.protocol import udp_punch as up
from p2pd.protocol.session import PeerClosed
from p2pd.rpc import RpcError
from p2pd.signal_channel import SignalChannel
from p2pd.stream_io import TRAFFIC

log = logging.getLogger(__name__)

NatGetter = Callable[[], NatStatus | None]
NurseryGetter = Callable[[], trio.Nursery | None]
_FAILURES = (
    OSError,
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    PeerClosed,
    wire.ProtocolError,
    EOFError,
    quic_stream.QuicClosed,
)


class PunchFailed(Exception):
    """No datagram from the peer in time."""


def _fmt(addr: tuple[str, int]) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


def own_nat(get: NatGetter) -> tuple[str, tuple[str, int] | None]:
    """(this node's NAT type, its STUN server) as NAT detection knows them now."""
    st = get()
    if st is None or st.state != "done":
        return "unknown", st.server if st is not None else None
    return st.nat_type.value, st.server


# What a datagram costs on the wire beyond its payload: Ethernet 14 + IPv4 20 + UDP 8 bytes (IPv6: 40, not 20).
# Auto-throttling adds what it learned of full-size TCP segments' headers (at most 6 %,
# `AutoThrottleConfig.header_overhead`); a probe carries 28 bytes, so its
# headers are 60 % of what the interface counts. A spray (2,000 probes/s) then read as
# ~0.7 Mbit/s of another service's traffic, above the "quiet" 3 % of a capacity learned in a swarm's first second,
# and the NAT swarm's cones yielded their upload (limits 17-48 Mbit/s on 200 Mbit/s links) while they sprayed.
DATAGRAM_HEADERS: dict[int, int] = {socket.AF_INET: 42, socket.AF_INET6: 62}


def _wire_size(n: int, family: int) -> int:
    return n + DATAGRAM_HEADERS.get(family, 42)


class BirthdayGate:
    """How many birthday punches (either side) this node runs at once; one more is refused, not queued.

    Why: a hard side opens `HARD_SOCKETS` sockets, runs a listener on each and sends ~1,000 probes/s, an
    easy side sprays 2,000 probes/s. In the NAT swarm (1 + 8, `netsim.bench nat`) each symmetric node was
    asked for 4-8 at once, and retried each failed one 2 s later: over half of its CPU went to punching,
    its event loop answered 2 s late, the punches timed out against the tracker's window (and were tried
    again), and its TCP paths to the public peers moved almost nothing for 6 s. A refused punch is a path
    that failed at once: the race goes on to the relay. Not queued: the tracker's rendezvous window (3 s) is
    shorter than a punch, so a punch waiting its turn would expire anyway.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0

    def try_enter(self) -> bool:
        if self.running >= self.limit:
            return False
        self.running += 1
        return True

    def leave(self) -> None:
        self.running -= 1


class PunchSockets:
    """The socket(s) one side punches from: one, or `HARD_SOCKETS` for a symmetric NAT's side."""

    def __init__(self, family: int, count: int) -> None:
        self.family = family
        self.count = count
        self.socks: list[trio.socket.SocketType] = []
        self._raw: dict[trio.socket.SocketType, socket.socket] = {}  # each one's stdlib socket (non-blocking)

    async def __aenter__(self) -> PunchSockets:
        # Bound synchronously (a wildcard bind to port 0 never blocks): an await per socket is a trip through
        # trio's scheduler each, and on a node busy moving pieces 256 of them took longer than the tracker
        # waits for the answer (3 s; the NAT swarm's symmetric nodes fell back to the relay).
        await self.grow(self.count)
        return self

    async def grow(self, count: int) -> None:
        """Open sockets until there are `count` (a hard side opens its 256 once it knows it punches)."""
        self.count = max(self.count, count)
        wildcard = "::" if self.family == socket.AF_INET6 else "0.0.0.0"
        try:
            for _ in range(count - len(self.socks)):
                raw = socket.socket(self.family, socket.SOCK_DGRAM)
                try:
                    raw.bind((wildcard, 0))
                except BaseException:
                    raw.close()
                    raise
                sock = trio.socket.from_stdlib_socket(raw)
                self.socks.append(sock)
                self._raw[sock] = raw
        except BaseException:
            self.close_all()
            raise
        await trio.lowlevel.checkpoint()

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close_all()

    def take(self, sock: trio.socket.SocketType) -> trio.socket.SocketType:
        """Keep `sock` open (the caller owns it now); the rest close on exit."""
        self.socks.remove(sock)
        self._raw.pop(sock, None)
        return sock

    def close_all(self) -> None:
        for s in self.socks:
            s.close()
        self.socks.clear()
        self._raw.clear()

    def send_now(self, sock: trio.socket.SocketType, data: bytes, addr: tuple[str, int]) -> None:
        """Send without a trip through the scheduler (probes go out in bursts: one await per burst, not per
        probe, which on a busy node stretched a hard side's round of 256 and the spray); a full buffer or an
        ICMP error is a lost probe."""
        try:
            TRAFFIC.sent += _wire_size(self._raw[sock].sendto(data, addr), self.family)
        except OSError as e:
            log.debug("udp punch: send to %s: %s", _fmt(addr), e)

    async def public_port(self, stun_server: tuple[str, int] | None) -> int:
        """The port the first socket maps to (what the peer aims at); its local port without a STUN answer."""
        sock = self.socks[0]
        if stun_server is not None:
            mapped = await binding(sock, stun_server, rto=0.1, tries=3)
            if mapped is not None:
                return mapped[1]
        return int(sock.getsockname()[1])


@dataclass
class Punched:
    sock: trio.socket.SocketType
    peer: tuple[str, int]
    probes: int  # datagrams this side sent
    elapsed: float


async def _send(sock: trio.socket.SocketType, data: bytes, addr: tuple[str, int]) -> None:
    try:
        # probes are p2pd's own traffic (auto-throttling), headers included
        TRAFFIC.sent += _wire_size(await sock.sendto(data, addr), sock.family)
    except OSError as e:  # no route yet, ICMP reported: like a lost datagram
        log.debug("udp punch: send to %s: %s", _fmt(addr), e)


def _wire(addr: tuple[str, int], family: int) -> tuple[str, int]:
    if family == socket.AF_INET6 and ":" not in addr[0]:
        return f"::ffff:{addr[0]}", addr[1]
    return addr


async def punch(
    plan: up.Plan,
    socks: PunchSockets,
    peer: tuple[str, int],
    rendezvous: bytes,
    node_id: str,
    peer_id: str,
    *,
    timeout: float,
    spray: Iterable[int] | None = None,
) -> Punched:
    """Send probes as `plan` says until the path is settled (`up.decides`); PunchFailed after `timeout`.

    `spray`: the ports an easy side tries, in order (default: every port once, `up.spray_ports`)."""
    ports = spray if spray is not None else up.spray_ports(random.Random(), exclude=peer[1])
    start = trio.current_time()
    peer_ip = peer[0]
    sent = [0]
    found: list[tuple[trio.socket.SocketType, tuple[str, int]]] = []
    probe = up.encode(up.Kind.PROBE, rendezvous, node_id)
    ack = up.encode(up.Kind.ACK, rendezvous, node_id)
    chosen = up.encode(up.Kind.CHOSEN, rendezvous, node_id)
    family = socks.family
    acked: set[tuple[int, tuple[str, int]]] = set()
    if len(socks.socks) == 1:
        quic_stream.tune_socket(socks.socks[0])  # a hard side's probes must not overflow it while we are busy

    async def out(sock: trio.socket.SocketType, data: bytes, addr: tuple[str, int]) -> None:
        sent[0] += 1
        await _send(sock, data, _wire(addr, family))

    async def listen(sock: trio.socket.SocketType, cancel: trio.CancelScope) -> None:
        while True:
            try:
                data, raw = await sock.recvfrom(2048)
                TRAFFIC.received += _wire_size(len(data), family)
            except OSError as e:  # an ICMP error queued on the socket
                log.debug("udp punch: receive: %s", e)
                continue
            src = plain(raw)
            if src[0] != peer_ip:
                continue  # only the peer's NAT may answer
            kind: up.Kind | None = None
            if up.is_probe(data):
                try:
                    p = up.decode(data)
                except up.ProbeError:
                    continue
                if p.rendezvous != rendezvous or p.sender != peer_id[: up.NODE_PREFIX]:
                    continue  # another punch's probe, or not our peer
                kind = p.kind
                if kind is up.Kind.PROBE and not found and (sock.fileno(), src) not in acked:
                    acked.add((sock.fileno(), src))  # once per pair: a full cone lets in all 256 of a hard side's
                    await out(sock, ack, src)
            if found or not up.decides(plan, kind):
                continue
            found.append((sock, src))
            log.debug(
                "udp punch %s: settled on %s -> %s by %s",
                plan.value,
                sock.getsockname()[1],
                _fmt(src),
                kind.name if kind is not None else "a QUIC datagram",
            )
            if plan is up.Plan.HARD:
                for _ in range(3):
                    await out(sock, chosen, src)
            cancel.cancel()
            return

    async def send_plain(sock: trio.socket.SocketType) -> None:
        while True:
            await out(sock, probe, peer)
            await trio.sleep(up.PLAIN_RESEND)

    async def send_hard() -> None:
        wire = _wire(peer, family)
        while True:
            for s in list(socks.socks):
                sent[0] += 1
                socks.send_now(s, probe, wire)
            await trio.sleep(up.HARD_RESEND)

    async def send_spray(sock: trio.socket.SocketType) -> None:
        await out(sock, probe, peer)  # its STUN-mapped port first: right if its NAT kept the port
        t0 = trio.current_time()
        for i, port in enumerate(ports):
            sent[0] += 1
            socks.send_now(sock, probe, _wire((peer_ip, port), family))
            # SPRAY_RATE on average, catching up after a busy moment (sleeps of 10 ms at least)
            ahead = (i + 1) / up.SPRAY_RATE - (trio.current_time() - t0)
            if ahead > 0.01:
                await trio.sleep(ahead)
            elif i % 32 == 31:
                await trio.lowlevel.checkpoint()  # behind: a burst, then let the listeners run

    with trio.move_on_after(timeout):
        async with trio.open_nursery() as nursery:
            for s in socks.socks:
                nursery.start_soon(listen, s, nursery.cancel_scope)
            if plan is up.Plan.HARD:
                nursery.start_soon(send_hard)
            elif plan is up.Plan.EASY:
                nursery.start_soon(send_spray, socks.socks[0])
            else:
                nursery.start_soon(send_plain, socks.socks[0])
    if not found:
        raise PunchFailed(f"no answer from {peer_ip} within {timeout:.1f} s ({plan.value} punch, {sent[0]} probes)")
    sock, addr = found[0]
    return Punched(socks.take(sock), addr, sent[0], trio.current_time() - start)


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _addr(value: Any, what: str) -> tuple[str, int]:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not isinstance(value[0], str)
        or not isinstance(value[1], int)
        or not 0 < value[1] < 65536
    ):
        raise ConnectError(f"the tracker's {what} has no valid [host, port]")
    return plain(value)


class UdpPunchConnector:
    """The `udp-punch` path, for the node that wants to reach a peer (it becomes the QUIC client)."""

    def __init__(
        self,
        identity: auth.Identity,
        signal: SignalChannel,
        *,
        nat: NatGetter,
        nursery: NurseryGetter,
        rendezvous_timeout: float,
        timeout: float,
        handshake_timeout: float,
        gate: BirthdayGate | None = None,
    ) -> None:
        self.identity = identity
        self.node_id = identity.node_id
        self.signal = signal
        self.nat = nat
        self.nursery = nursery
        self.rendezvous_timeout = rendezvous_timeout
        self.timeout = timeout
        self.handshake_timeout = handshake_timeout
        self.gate = gate if gate is not None else BirthdayGate(1)

    async def connect(
        self, remote_id: str, addr: tuple[str, int], artifact_id: str, *, reached: Callable[[], None] | None = None
    ) -> Connection:
        """`reached()` is called once the peer has answered the rendezvous and a punch between the two NAT
        types can work (it, QUIC and the p2pd handshake may still fail, within `timeout`): the race then lets
        a later path (the relay) wait for this one's outcome, as for a direct connect whose TCP is up. So a
        busy host whose spray takes a second does not lose a working punch to the relay; two NATs that
        cannot punch (both symmetric, UDP blocked) never call it, and the relay starts at its stagger."""
        nursery = self.nursery()
        if nursery is None or not self.signal.up or self.signal.addr is None:
            raise ConnectError("no signal channel to the tracker")
        kind, stun_server = own_nat(self.nat)
        if kind == up.UDP_BLOCKED:
            raise ConnectError("this node's network blocks UDP")
        held = [False]  # this connect holds a place in the gate (it runs a birthday punch)

        def enter_gate() -> None:
            if not self.gate.try_enter():
                raise ConnectError(f"{self.gate.running} birthday punch(es) under way already (the most at once)")
            held[0] = True

        try:
            return await self._connect(nursery, remote_id, artifact_id, kind, stun_server, enter_gate, reached)
        finally:
            if held[0]:
                self.gate.leave()

    async def _connect(
        self,
        nursery: trio.Nursery,
        remote_id: str,
        artifact_id: str,
        kind: str,
        stun_server: tuple[str, int] | None,
        enter_gate: Callable[[], None],
        reached: Callable[[], None] | None,
    ) -> Connection:
        assert self.signal.addr is not None
        deadline = trio.current_time() + self.timeout
        family = _family(self.signal.addr[0])
        hard = kind == up.SYMMETRIC
        try:
            # a hard side opens its other sockets once the peer's NAT type says it punches (not with another
            # symmetric or a UDP-blocked peer) and the gate has room
            socks = await PunchSockets(family, 1).__aenter__()
        except OSError as e:  # out of file descriptors or ports: this path is not available now
            raise ConnectError(f"cannot open a UDP socket: {e.strerror or e}") from None
        async with socks:
            try:
                port = await socks.public_port(None if hard else stun_server)  # a hard side's port: moot
                r = await self.signal.call(
                    "udp_punch",
                    {"target": remote_id, "artifact_id": artifact_id, "port": port, "nat": kind},
                    timeout=self.rendezvous_timeout,
                )
                peer = _addr(r.get("addr"), "udp_punch answer")
                peer_nat = str(r.get("nat", "unknown"))
                rid = up.rendezvous_bytes(str(r.get("rendezvous")))
            except RpcError as e:
                raise ConnectError(f"tracker: {e.message}") from None
            except (AttributeError, ValueError):
                raise ConnectError("the tracker's udp_punch answer is malformed") from None
            decision = up.plan(kind, peer_nat)
            log.debug(
                "udp punch to %s: %s (we are %s at port %d, it is %s at %s)",
                remote_id[:8],
                decision.plan.value,
                kind,
                port,
                peer_nat,
                _fmt(peer),
            )
            if decision.plan is up.Plan.NONE:
                raise ConnectError(f"no UDP path: {decision.reason}")
            if decision.plan in (up.Plan.EASY, up.Plan.HARD):
                enter_gate()
            if decision.plan is up.Plan.HARD:
                try:
                    await socks.grow(up.HARD_SOCKETS)
                except OSError as e:
                    raise ConnectError(f"cannot open {up.HARD_SOCKETS} UDP sockets: {e.strerror or e}") from None
            if reached is not None:
                reached()
            try:
                punched = await punch(
                    decision.plan,
                    socks,
                    peer,
                    rid,
                    self.node_id,
                    remote_id,
                    timeout=max(0.1, deadline - trio.current_time()),
                )
            except PunchFailed as e:
                raise ConnectError(str(e)) from None
        log.debug(
            "udp punch to %s: %s after %d probes, %.0f ms",
            remote_id[:8],
            _fmt(punched.peer),
            punched.probes,
            1000 * punched.elapsed,
        )
        try:
            stream = await quic_stream.connect(
                nursery, punched.sock, punched.peer, timeout=max(0.5, deadline - trio.current_time())
            )
        except (quic_stream.QuicClosed, OSError) as e:
            punched.sock.close()
            raise ConnectError(f"QUIC to {_fmt(punched.peer)}: {e}") from None
        except BaseException:
            punched.sock.close()
            raise
        try:
            return await connections.open_outgoing(
                stream,
                identity=self.identity,
                remote_id=remote_id,
                artifact_id=artifact_id,
                addr=_fmt(punched.peer),
                path=ConnectionPath.UDP_PUNCH,
                handshake_timeout=self.handshake_timeout,
            )
        except _FAILURES as e:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise ConnectError(f"handshake over QUIC to {_fmt(punched.peer)}: {e or type(e).__name__}") from None
        except BaseException:
            stream.endpoint.stop()
            raise


async def answer(
    identity: auth.Identity,
    signal: SignalChannel,
    event: dict[str, Any],
    *,
    nat: NatGetter,
    nursery: trio.Nursery,
    credentials: quic_stream.Credentials,
    rendezvous_timeout: float,
    timeout: float,
    handshake_timeout: float,
    serves: Callable[[str], bool],
    gate: BirthdayGate | None = None,
) -> Connection | None:
    """Answer a `udp-punch` signal: punch with the node that asked, accept its QUIC connection and handshake.

    A birthday punch (either side) is answered only while `gate` has room: refused, the asker's punch
    times out at the tracker and its race goes on to the relay."""
    gate = gate if gate is not None else BirthdayGate(1)
    remote_id = str(event["from"])
    kind, stun_server = own_nat(nat)
    decision = up.plan(kind, str(event.get("nat", "unknown")))
    birthday = decision.plan in (up.Plan.HARD, up.Plan.EASY)
    if birthday and not gate.try_enter():
        log.info(
            "udp punch asked by %s not answered: %d birthday punch(es) under way already (the most at once)",
            remote_id[:8],
            gate.running,
        )
        return None
    try:
        node_id = identity.node_id
        artifact_id = str(event["artifact_id"])
        rid_text = str(event["rendezvous"])
        rid = up.rendezvous_bytes(rid_text)
        peer = _addr(event.get("addr"), "udp-punch signal")
        deadline = trio.current_time() + timeout
        count = up.HARD_SOCKETS if decision.plan is up.Plan.HARD else 1
        try:
            socks = await PunchSockets(_family(peer[0]), count).__aenter__()
        except OSError as e:
            log.warning(
                "udp punch asked by %s: cannot open %d UDP socket(s): %s", remote_id[:8], count, e.strerror or e
            )
            return None
        async with socks:
            try:
                port = await socks.public_port(stun_server if decision.plan in (up.Plan.PLAIN, up.Plan.EASY) else None)
                await signal.call(
                    "udp_punch_answer", {"rendezvous": rid_text, "port": port, "nat": kind}, timeout=rendezvous_timeout
                )
            except RpcError as e:
                log.info("udp punch asked by %s: the tracker refused the answer: %s", remote_id[:8], e.message)
                return None
            if decision.plan is up.Plan.NONE:
                log.debug("udp punch asked by %s: %s", remote_id[:8], decision.reason)
                return None
            log.debug(
                "udp punch asked by %s: %s (we are %s at port %d, it is at %s)",
                remote_id[:8],
                decision.plan.value,
                kind,
                port,
                _fmt(peer),
            )
            try:
                punched = await punch(
                    decision.plan,
                    socks,
                    peer,
                    rid,
                    node_id,
                    remote_id,
                    timeout=max(0.1, deadline - trio.current_time()),
                )
            except PunchFailed as e:
                log.info("udp punch asked by %s failed: %s", remote_id[:8], e)
                return None
        reply = up.encode(up.Kind.CHOSEN if decision.plan is up.Plan.HARD else up.Kind.ACK, rid, node_id)
        try:
            stream = await quic_stream.accept(
                nursery,
                punched.sock,
                punched.peer,
                credentials,
                timeout=max(0.5, deadline - trio.current_time()),
                probe_reply=reply,
            )
        except (quic_stream.QuicClosed, OSError) as e:
            punched.sock.close()
            log.info("udp punch asked by %s: no QUIC connection: %s", remote_id[:8], e)
            return None
        except BaseException:
            punched.sock.close()
            raise
        try:
            return await connections.accept_from(
                stream,
                _fmt(punched.peer),
                identity,
                remote_id=remote_id,
                artifact_id=artifact_id,
                path=ConnectionPath.UDP_PUNCH,
                handshake_timeout=handshake_timeout,
                serves=lambda aid: aid == artifact_id and serves(aid),
            )
        except _FAILURES as e:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            log.info("udp punch asked by %s failed in the handshake: %s", remote_id[:8], e or type(e).__name__)
            return None
        except BaseException:
            stream.endpoint.stop()
            raise
    finally:
        if birthday:
            gate.leave()
