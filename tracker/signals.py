"""Signalling between registered nodes: how two nodes that cannot dial each other meet.

Each daemon holds one long call open on the tracker, `signal`; its events are messages for that node
("node A wants to reach you: punch with it" / "meet it at relay R with token T"), the key of the node's
own relay if it offers one, and a ping every `ping_every` seconds (under the ~30 s after which NATs
forget an idle mapping, and how a node notices a dead tracker).

- `punch` (TCP simultaneous open; with both sides' optional `nat`, passed to the other for the birthday roles
  of p2pd/protocol/tcp_punch.py): A calls it over a fresh connection from the port it will punch
  from; the tracker tells B, B answers (`punch_answer`) over a fresh connection from its own punch
  port, and each learns the address the tracker saw the other's connection come from. A NAT that
  maps a port the same way whoever it talks to (a cone) maps the punch the same way too.
- `udp_punch` (the UDP hole punch, p2pd/udp_punch.py): A calls it over its signal channel with the
  port its UDP socket maps to (its STUN answer) and its NAT type; the tracker tells B (with A's IP as
  seen on A's signal connection), B answers (`udp_punch_answer`) with its own port and type, and A
  gets B's IP (as seen on B's signal connection), port and type. Only ports come from the nodes.
- `relay`: the tracker picks a relay (its own, or a node that offers one), mints a one-time token for
  A and B with that relay's key (`p2pd.protocol.rendezvous`) and tells B where to meet A.

Safe by construction: a request names node ids, never addresses. Every address in an answer or an
event is filled in here: one the tracker saw a registered node's own connection come from, or the
registered address of a relay (a UDP punch takes the port from the node, never the IP: a node can
make another send punch probes only to the public IP of the node that asked). So no node can make
another dial an address of its choosing, and a relay only splices two registered nodes that hold
the same token. Requests are checked against the registry (node id and session), rate-limited per
node, and every refusal is logged with its reason.

Channels live in this process: with replicas sharing a Redis store, two nodes meet only through the
replica that holds both their channels (nodes use the first tracker address that answers, so
normally the same one); otherwise the request is refused and the nodes use what else they have.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from p2pd.errors import ErrorCode
from p2pd.protocol import rendezvous as rv
from p2pd.relay import Relay
from p2pd.rpc import Emit, Handler
from tracker import validate as V
from tracker.store import Store
from tracker.validate import TrackerError

log = logging.getLogger("tracker.signals")

PING_EVERY = 15.0  # well under the ~30 s NATs keep an idle mapping
EVENT_QUEUE = 64  # signals waiting for one node; a node this far behind is refused as busy
EMIT_TIMEOUT = 10.0  # a node that does not read its signals for this long loses its channel
MAX_PENDING = 10_000  # punches waiting for their answer, all nodes together
REQUEST_RATE = 5.0  # rendezvous requests per second per node, after a burst of...
REQUEST_BURST = 20.0


@dataclass(eq=False)
class Channel:
    """One node's open `signal` call: where to push its events."""

    node_id: str
    peer: tuple[str, int]  # where its connection comes from
    local: tuple[str, int]  # the tracker address it reached us at
    relay_port: int | None  # the node offers a relay on this port (at its registered host)
    key: bytes | None  # that relay's token key
    send: trio.MemorySendChannel[dict[str, Any]]
    recv: trio.MemoryReceiveChannel[dict[str, Any]]

    def push(self, event: dict[str, Any]) -> bool:
        try:
            self.send.send_nowait(event)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True


@dataclass(eq=False)
class Rendezvous:
    a: str
    b: str
    a_addr: tuple[str, int]
    answered: trio.Event = field(default_factory=trio.Event)
    b_addr: tuple[str, int] | None = None
    udp: bool = False  # a UDP punch (answered by udp_punch_answer), not a TCP one
    b_nat: str = ""


@dataclass
class SignalCounters:
    signals_sent: int = 0
    punches: int = 0
    punches_answered: int = 0
    udp_punches: int = 0
    relays: int = 0
    refused: int = 0


class SignalHub:
    """Channels, pending punches and relay choice for one tracker process."""

    def __init__(
        self,
        store: Store,
        *,
        ping_every: float = PING_EVERY,
        answer_timeout: float = 3.0,
        request_rate: float = REQUEST_RATE,
        request_burst: float = REQUEST_BURST,
    ) -> None:
        self.store = store
        self.ping_every = ping_every
        self.answer_timeout = answer_timeout
        self.request_rate = request_rate
        self.request_burst = request_burst
        self.channels: dict[str, Channel] = {}
        self.relay_nodes: dict[str, Channel] = {}  # channels of nodes that offer a relay
        self.pending: dict[str, Rendezvous] = {}
        self.counters = SignalCounters()
        self._allowance: dict[str, tuple[float, float]] = {}
        # the tracker's own relay (None: it runs none); its address is the one each node reached us at
        self.relay: Relay | None = None
        self.relay_key = rv.new_key()
        self.relay_advertise: str | None = None
        self.rng = random.Random()

    def own_relay(self, *, rate: float | None, max_pairs: int, idle_timeout: float, advertise: str | None) -> Relay:
        """Create the tracker's relay (the caller serves it); its tokens are checked against the registry."""
        self.relay_advertise = advertise
        self.relay = Relay(
            keys=lambda: [self.relay_key],
            rate=rate,
            max_pairs=max_pairs,
            idle_timeout=idle_timeout,
            is_registered=self._is_registered,
        )
        return self.relay

    async def _is_registered(self, node_id: str) -> bool:
        try:
            return await self.store.node_info(node_id) is not None
        except TrackerError as e:
            log.warning("relay: cannot check node %s against the registry: %s", node_id[:8], e.message)
            return False

    # ---- RPC handlers ------------------------------------------------------------------------------

    def handlers(self, peer: tuple[str, int], local: tuple[str, int]) -> dict[str, Handler]:
        """Handlers for one connection: `peer` is where it comes from, `local` where it reached us."""

        async def signal(p: dict[str, Any], emit: Emit) -> Any:
            return await self._signal(p, emit, peer, local)

        async def punch(p: dict[str, Any], emit: Emit) -> Any:
            return await self._punch(p, peer)

        async def punch_answer(p: dict[str, Any], emit: Emit) -> Any:
            return await self._punch_answer(p, peer)

        async def relay(p: dict[str, Any], emit: Emit) -> Any:
            return await self._relay(p, peer, local)

        async def udp_punch(p: dict[str, Any], emit: Emit) -> Any:
            return await self._udp_punch(p, peer)

        async def udp_punch_answer(p: dict[str, Any], emit: Emit) -> Any:
            return await self._udp_punch_answer(p, peer)

        return {
            "signal": signal,
            "punch": punch,
            "punch_answer": punch_answer,
            "relay": relay,
            "udp_punch": udp_punch,
            "udp_punch_answer": udp_punch_answer,
        }

    def _refuse(self, method: str, who: str, peer: tuple[str, int], code: ErrorCode, why: str) -> TrackerError:
        self.counters.refused += 1
        log.warning("signal: refused %s from node %s at %s: %s", method, who[:8] or "?", peer[0], why)
        return TrackerError(code, why)

    async def _verified(self, method: str, p: dict[str, Any], peer: tuple[str, int]) -> str:
        """The requesting node's id, if it is registered with the session it names."""
        raw = p.get("node_id")
        try:
            nid = V.node_id(raw)
        except TrackerError as e:
            raise self._refuse(method, str(raw)[:8], peer, ErrorCode.BAD_REQUEST, e.message) from None
        info = await self.store.node_info(nid)
        if info is None or info[2] != p.get("session"):
            raise self._refuse(
                method,
                nid,
                peer,
                ErrorCode.NOT_FOUND,
                f"node {nid[:8]} is not registered with that session: register first",
            )
        return nid

    def _target(self, method: str, requester: str, p: dict[str, Any], peer: tuple[str, int]) -> tuple[str, str]:
        try:
            target = V.node_id(p.get("target"))
            aid = V.artifact_id(p.get("artifact_id"))
        except TrackerError as e:
            raise self._refuse(method, requester, peer, ErrorCode.BAD_REQUEST, e.message) from None
        if target == requester:
            raise self._refuse(method, requester, peer, ErrorCode.BAD_REQUEST, "a node cannot rendezvous with itself")
        self._charge(method, requester, peer)
        return target, aid

    async def _channel_of(self, method: str, requester: str, target: str, peer: tuple[str, int]) -> Channel:
        if await self.store.node_info(target) is None:
            raise self._refuse(method, requester, peer, ErrorCode.NOT_FOUND, f"node {target[:8]} is not registered")
        ch = self.channels.get(target)
        if ch is None:
            raise self._refuse(
                method,
                requester,
                peer,
                ErrorCode.UNREACHABLE,
                f"node {target[:8]} has no signal channel open on this tracker",
            )
        return ch

    def nudge(self, nodes: list[str], event: dict[str, Any]) -> int:
        """Push a data-less event to those of `nodes` with a channel open here (how many took it). A node
        without one (other replica, full queue, direct-only paths) learns the same from its heartbeats."""
        sent = 0
        for nid in nodes:
            ch = self.channels.get(nid)
            if ch is not None and ch.push(event):
                sent += 1
        return sent

    def _charge(self, method: str, nid: str, peer: tuple[str, int]) -> None:
        """A token bucket per node: signalling must not become a way to flood a node with work."""
        now = time.monotonic()
        tokens, stamp = self._allowance.get(nid, (self.request_burst, now))
        tokens = min(self.request_burst, tokens + (now - stamp) * self.request_rate)
        if tokens < 1.0:
            raise self._refuse(
                method,
                nid,
                peer,
                ErrorCode.TIMEOUT,
                f"too many rendezvous requests (more than {self.request_rate:g}/s): retry later",
            )
        if len(self._allowance) > 100_000:
            self._allowance.clear()
        self._allowance[nid] = (tokens - 1.0, now)

    def _push(self, method: str, requester: str, ch: Channel, event: dict[str, Any], peer: tuple[str, int]) -> None:
        if not ch.push(event):
            raise self._refuse(
                method,
                requester,
                peer,
                ErrorCode.UNREACHABLE,
                f"node {ch.node_id[:8]} is not taking signals now (busy or gone)",
            )

    async def _signal(self, p: dict[str, Any], emit: Emit, peer: tuple[str, int], local: tuple[str, int]) -> Any:
        nid = await self._verified("signal", p, peer)
        relay_port = p.get("relay_port")
        if relay_port is not None and (
            not isinstance(relay_port, int) or isinstance(relay_port, bool) or not 0 < relay_port < 65536
        ):
            raise self._refuse("signal", nid, peer, ErrorCode.BAD_REQUEST, "relay_port must be in 1..65535")
        send, recv = trio.open_memory_channel[dict[str, Any]](EVENT_QUEUE)
        ch = Channel(nid, peer, local, relay_port, rv.new_key() if relay_port else None, send, recv)
        old = self.channels.get(nid)
        if old is not None:
            old.send.close()  # its call returns: one channel per node
        self.channels[nid] = ch
        self.relay_nodes.pop(nid, None)
        if ch.key is not None:
            self.relay_nodes[nid] = ch
        log.debug(
            "signal channel open for %s from %s%s",
            nid[:8],
            peer[0],
            f" (offers a relay on port {relay_port})" if relay_port else "",
        )
        try:
            if ch.key is not None:
                await self._emit(emit, {"kind": "relay-key", "key": ch.key})
            await self._emit(emit, {"kind": "ready", "ping_every": self.ping_every})
            while True:
                event: dict[str, Any] | None = None
                with trio.move_on_after(self.ping_every):
                    try:
                        event = await recv.receive()
                    except trio.EndOfChannel:
                        return {"closed": "replaced by a newer signal call of this node"}
                await self._emit(emit, event or {"kind": "ping"})
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            log.info(
                "signal channel of %s closed: %s",
                nid[:8],
                "not reading" if isinstance(e, trio.TooSlowError) else "connection lost",
            )
            return {"closed": "not reading"}
        finally:
            if self.channels.get(nid) is ch:
                del self.channels[nid]
            if self.relay_nodes.get(nid) is ch:
                del self.relay_nodes[nid]

    async def _emit(self, emit: Emit, event: dict[str, Any]) -> None:
        with trio.fail_after(EMIT_TIMEOUT):
            await emit(event)
        if event.get("kind") != "ping":
            self.counters.signals_sent += 1

    async def _punch(self, p: dict[str, Any], peer: tuple[str, int]) -> Any:
        a = await self._verified("punch", p, peer)
        nat = self._punch_nat("punch", a, p, peer)
        b, aid = self._target("punch", a, p, peer)
        ch = await self._channel_of("punch", a, b, peer)
        if len(self.pending) >= MAX_PENDING:
            raise self._refuse("punch", a, peer, ErrorCode.TIMEOUT, "too many punches in progress: retry later")
        rid = secrets.token_hex(8)
        r = Rendezvous(a, b, peer)
        self.pending[rid] = r
        self.counters.punches += 1
        event = {"kind": "punch", "rendezvous": rid, "from": a, "artifact_id": aid}
        if nat:
            event["nat"] = nat
        try:
            self._push("punch", a, ch, event, peer)
            with trio.move_on_after(self.answer_timeout):
                await r.answered.wait()
            if r.b_addr is None:
                raise self._refuse(
                    "punch", a, peer, ErrorCode.TIMEOUT, f"node {b[:8]} did not answer within {self.answer_timeout:g} s"
                )
            return {"addr": list(r.b_addr), "nat": r.b_nat} if r.b_nat else {"addr": list(r.b_addr)}
        finally:
            self.pending.pop(rid, None)

    def _punch_nat(self, method: str, nid: str, p: dict[str, Any], peer: tuple[str, int]) -> str:
        """A TCP punch's optional `nat`: the caller's NAT type, for the birthday roles (p2pd/protocol/tcp_punch.py)."""
        nat = p.get("nat", "")
        if not isinstance(nat, str) or len(nat) > 32 or (nat and not nat.replace("-", "").isalpha()):
            raise self._refuse(method, nid, peer, ErrorCode.BAD_REQUEST, "nat must be a NAT type name")
        return nat

    async def _punch_answer(self, p: dict[str, Any], peer: tuple[str, int]) -> Any:
        b = await self._verified("punch_answer", p, peer)
        rid = p.get("rendezvous")
        r = self.pending.get(rid) if isinstance(rid, str) else None
        if r is None or r.b != b or r.b_addr is not None or r.udp:
            raise self._refuse(
                "punch_answer",
                b,
                peer,
                ErrorCode.BAD_REQUEST,
                "no punch waits for this node's answer under that id (expired, answered or never asked)",
            )
        r.b_nat = self._punch_nat("punch_answer", b, p, peer)
        r.b_addr = peer
        r.answered.set()
        self.counters.punches_answered += 1
        return {"addr": list(r.a_addr)}

    def _udp_fields(self, method: str, nid: str, p: dict[str, Any], peer: tuple[str, int]) -> tuple[int, str]:
        port, nat = p.get("port"), p.get("nat")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise self._refuse(method, nid, peer, ErrorCode.BAD_REQUEST, "port must be in 1..65535")
        if not isinstance(nat, str) or not 0 < len(nat) <= 32 or not nat.replace("-", "").isalpha():
            raise self._refuse(method, nid, peer, ErrorCode.BAD_REQUEST, "nat must be a NAT type name")
        return port, nat

    async def _udp_punch(self, p: dict[str, Any], peer: tuple[str, int]) -> Any:
        a = await self._verified("udp_punch", p, peer)
        port, nat = self._udp_fields("udp_punch", a, p, peer)
        b, aid = self._target("udp_punch", a, p, peer)
        ch = await self._channel_of("udp_punch", a, b, peer)
        if len(self.pending) >= MAX_PENDING:
            raise self._refuse("udp_punch", a, peer, ErrorCode.TIMEOUT, "too many punches in progress: retry later")
        rid = secrets.token_hex(8)
        r = Rendezvous(a, b, (peer[0], port), udp=True)
        self.pending[rid] = r
        self.counters.udp_punches += 1
        event = {
            "kind": "udp-punch",
            "rendezvous": rid,
            "from": a,
            "artifact_id": aid,
            "addr": [peer[0], port],
            "nat": nat,
        }
        try:
            self._push("udp_punch", a, ch, event, peer)
            with trio.move_on_after(self.answer_timeout):
                await r.answered.wait()
            if r.b_addr is None:
                raise self._refuse(
                    "udp_punch",
                    a,
                    peer,
                    ErrorCode.TIMEOUT,
                    f"node {b[:8]} did not answer within {self.answer_timeout:g} s",
                )
            return {"addr": list(r.b_addr), "nat": r.b_nat, "rendezvous": rid}
        finally:
            self.pending.pop(rid, None)

    async def _udp_punch_answer(self, p: dict[str, Any], peer: tuple[str, int]) -> Any:
        b = await self._verified("udp_punch_answer", p, peer)
        port, nat = self._udp_fields("udp_punch_answer", b, p, peer)
        rid = p.get("rendezvous")
        r = self.pending.get(rid) if isinstance(rid, str) else None
        if r is None or r.b != b or r.b_addr is not None or not r.udp:
            raise self._refuse(
                "udp_punch_answer",
                b,
                peer,
                ErrorCode.BAD_REQUEST,
                "no UDP punch waits for this node's answer under that id (expired, answered or never asked)",
            )
        r.b_addr, r.b_nat = (peer[0], port), nat
        r.answered.set()
        self.counters.punches_answered += 1
        return {"addr": list(r.a_addr)}

    async def _relay(self, p: dict[str, Any], peer: tuple[str, int], local: tuple[str, int]) -> Any:
        a = await self._verified("relay", p, peer)
        b, aid = self._target("relay", a, p, peer)
        ch = await self._channel_of("relay", a, b, peer)
        choice = await self._pick_relay({a, b})
        if choice is None:
            raise self._refuse("relay", a, peer, ErrorCode.UNREACHABLE, "no relay is available")
        key, host, port = choice
        token = rv.mint_token(key, a, b, time.time())
        host_a = host or self.relay_advertise or local[0]
        host_b = host or self.relay_advertise or ch.local[0]
        self._push(
            "relay",
            a,
            ch,
            {"kind": "relay", "from": a, "artifact_id": aid, "token": token, "relay": [host_b, port]},
            peer,
        )
        self.counters.relays += 1
        log.debug("relay for %s -> %s at %s:%d", a[:8], b[:8], host_a, port)
        return {"token": token, "relay": [host_a, port]}

    async def _pick_relay(self, exclude: set[str]) -> tuple[bytes, str | None, int] | None:
        """A relay for a pair: (its key, its host or None for "the address the node reached us at", port)."""
        offers: list[tuple[bytes, str | None, int]] = []
        if self.relay is not None and self.relay.port is not None:
            offers.append((self.relay_key, None, self.relay.port))
        for nid, ch in list(self.relay_nodes.items()):
            if ch.relay_port is None or ch.key is None or nid in exclude:
                continue
            info = await self.store.node_info(nid)
            if info is not None and info[0] not in ("", "0.0.0.0", "::"):
                offers.append((ch.key, info[0], ch.relay_port))
        return self.rng.choice(offers) if offers else None

    def stats(self) -> dict[str, Any]:
        """Flat counters for `p2p-tracker admin stats` (this process's channels and relay)."""
        c = self.counters
        out: dict[str, Any] = {
            "signal_channels": len(self.channels),
            "relay_nodes": len(self.relay_nodes),
            "punches": c.punches,
            "punches_answered": c.punches_answered,
            "udp_punches": c.udp_punches,
            "relay_requests": c.relays,
            "signal_refusals": c.refused,
        }
        if self.relay is not None:
            out.update({f"relay_{k}": v for k, v in self.relay.stats.as_dict().items()})
        return out
