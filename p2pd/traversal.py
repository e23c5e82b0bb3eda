"""Reaching a peer that cannot be dialled: TCP simultaneous open and relays, arranged over the tracker.

Outgoing (we want pieces from B): `PunchConnector` and `RelayConnector`, raced with the direct path
by `p2pd.racing.RacingConnector`. Incoming (the tracker tells us A wants to reach us): `Traversal`
answers each signal in a task of its own, and a connection that completes the p2pd handshake goes
to the swarm of its artifact exactly like one accepted on the listener.

TCP simultaneous open (research FINDINGS §3: connects cone <-> cone at the first try). Each side
takes a fresh local port P: a listener on it, and every outgoing socket bound to it (SO_REUSEADDR +
SO_REUSEPORT). It asks the tracker over a connection from P (`punch`, answered by `punch_answer`),
so the tracker sees the address P maps to on the node's NAT and hands it to the other side; both
then dial each other's mapped address from P at once, retrying quickly, while the listener waits
too. A NAT that maps a port the same way whatever it talks to (a cone) maps the punch as it mapped
the tracker connection; a symmetric NAT does not: with a cone on the other side the punch becomes a birthday
punch (p2pd/protocol/tcp_punch.py: many ports on the symmetric side, a spray of SYNs from the cone's),
between two symmetric NATs it runs out of time and the relay wins.
- A fresh port per punch, not the listen port: there is one TCP connection per address pair, so a
  second artifact between the same two nodes, or a new connection within TIME_WAIT of the last,
  would find the listen-port pair taken; and the listen socket keeps its plain bind rules.
- The connection may form by a simultaneous open (both SYNs cross in the NATs) or by one side's SYN
  reaching the other's listener (no NAT in the way): both sides send their p2pd handshake first,
  which works either way, and both record the lower node id as the dialler so that duplicate
  resolution in the swarm agrees on both ends.

A relay (the tracker's, or a node's run with `--relay`): the tracker hands both nodes a one-time
token and the relay's address (`relay` request, `relay` signal); both dial the relay, which splices
them once both are there. The requester sends the p2pd handshake, the other side accepts it.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import random
import re
import socket
from collections.abc import Awaitable, Callable, Iterator
from types import TracebackType
from typing import Any

import trio

from p2pd import connections, quic_stream, udp_punch
from p2pd.config import SwarmConfig, TraversalConfig
from p2pd.connections import ConnectError, Connection, ConnectionPath, Connector, TcpConnector
from p2pd.errors import ErrorCode, P2pdError
from p2pd.nat_detect import NatStatus
from p2pd.protocol import auth, tcp_punch, wire
from p2pd.protocol.framing import FrameError, FrameReader, RpcError, encode_frame
from p2pd.protocol.session import PeerClosed
from p2pd.protocol.udp_punch import spray_ports
from p2pd.racing import Path, RacingConnector
from p2pd.relay import Relay, RelayRefused, dial_relay
from p2pd.signal_channel import SignalChannel
from p2pd.stream_io import TRAFFIC
from p2pd.tracker_client import TrackerClient
from p2pd.udp_punch import own_nat

log = logging.getLogger(__name__)

DIAL_RETRY = 0.05  # after a refused SYN (the other side's NAT or host said no yet): dial again soon
RESEND_POLL = 0.25  # how often a punch counts the SYNs the kernel sent again (auto-throttling's tick)
# how often an answered punch or relay meeting asks whether the swarm still wants what it would bring
ANSWER_POLL = 0.1
_NODE_ID_RE = re.compile(r"[0-9a-f]{32}\Z")
_HANDSHAKE_FAILURES = (
    OSError,
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    PeerClosed,
    wire.ProtocolError,
    EOFError,
)


class PunchFailed(Exception):
    """No connection formed through the NATs in time."""


def _reuse_socket(family: int) -> trio.socket.SocketType:
    s = trio.socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return s


def _fmt(addr: tuple[str, int]) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


def _errname(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, type(e).__name__)


class PunchPort:
    """A fresh local port for one punch: a listener on it, and every outgoing socket bound to it."""

    def __init__(self, family: int) -> None:
        self.family = family
        self.wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
        self.port = 0
        self._listener: trio.socket.SocketType | None = None
        self._probes: list[trio.socket.SocketType] = []

    async def __aenter__(self) -> PunchPort:
        sock = _reuse_socket(self.family)
        try:
            await sock.bind((self.wildcard, 0))
            sock.listen(8)
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        self.port = int(sock.getsockname()[1])
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        for s in (self._listener, *self._probes):
            if s is not None:
                s.close()

    async def ask_tracker(self, tracker: Any, method: str, params: dict[str, Any], timeout: float) -> dict[str, Any]:
        """One RPC over a connection from this port, so the tracker sees where the port maps to.

        The connection stays open until the port is closed: a NAT keeps the mapping while it lives.
        """
        sock = _reuse_socket(self.family)
        self._probes.append(sock)
        with trio.fail_after(timeout):
            await sock.bind((self.wildcard, self.port))
            await sock.connect(tracker)
            stream = trio.SocketStream(sock)
            await stream.send_all(encode_frame({"id": 1, "method": method, "params": params}))
            reader = FrameReader()
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    raise RpcError(ErrorCode.UNREACHABLE, "the tracker closed the connection")
                for frame in reader.feed(data):
                    if not isinstance(frame, dict) or frame.get("id") != 1:
                        continue
                    if "error" in frame:
                        raise RpcError.from_wire(frame["error"])
                    result = frame.get("result")
                    if not isinstance(result, dict):
                        raise RpcError(ErrorCode.PROTOCOL, f"{method}: the tracker's answer is not a map")
                    return result

    async def connect_to(
        self, remote: tuple[str, int], timeout: float, role: tcp_punch.Role = tcp_punch.Role.PLAIN
    ) -> trio.SocketStream:
        """Dial `remote` from this port until a connection forms either way (dialled or accepted); as the hard
        or easy side of a birthday punch (`role`, p2pd/protocol/tcp_punch.py) from many sockets besides."""
        assert self._listener is not None
        listener = self._listener
        got: list[trio.SocketStream] = []
        errors: list[str] = []

        def take(sock: trio.socket.SocketType, cancel: trio.CancelScope) -> None:
            if got:
                sock.close()
                return
            got.append(trio.SocketStream(sock))
            cancel.cancel()

        async def accept_loop(cancel: trio.CancelScope) -> None:
            while True:
                sock, addr = await listener.accept()
                if addr[0] != remote[0]:  # not our peer's NAT: never let a third party in
                    log.debug("punch port %d: ignored a connection from %s", self.port, addr[0])
                    sock.close()
                    continue
                take(sock, cancel)
                return

        syn = tcp_punch.SYN_WIRE[6 if self.family == socket.AF_INET6 else 4]
        # our dials' connects still unanswered: (when the first SYN left, SYNs counted so far); the kernel sends
        # each SYN again while the NATs drop it (tcp_punch.syns_sent), and auto-throttling must be told of those
        unanswered: dict[int, tuple[float, int]] = {}

        def count_syns(key: int, done: bool = False) -> None:
            first, counted = unanswered[key]
            sent = tcp_punch.syns_sent(trio.current_time() - first)
            TRAFFIC.sent += syn * (sent - counted)
            if done:
                del unanswered[key]
            else:
                unanswered[key] = (first, sent)

        async def resend_loop() -> None:
            while True:
                await trio.sleep(RESEND_POLL)
                for key in list(unanswered):
                    count_syns(key)

        async def dial_loop(cancel: trio.CancelScope, fresh_port: bool = False) -> None:
            # from the punch port; or (a hard side's birthday socket) from a fresh one, which our symmetric NAT
            # maps to a new random port, open to `remote` alone
            while True:
                sock = trio.socket.socket(self.family, socket.SOCK_STREAM) if fresh_port else _reuse_socket(self.family)
                key = id(sock)
                try:
                    if not fresh_port:
                        await sock.bind((self.wildcard, self.port))
                    unanswered[key] = (trio.current_time(), 0)
                    count_syns(key)
                    try:
                        await sock.connect(remote)
                    finally:
                        count_syns(key, done=True)
                except OSError as e:
                    sock.close()
                    errors.append(_errname(e))
                    await trio.sleep(DIAL_RETRY)
                    continue
                except BaseException:
                    sock.close()
                    raise
                take(sock, cancel)
                return

        async def hard_loop(cancel: trio.CancelScope) -> None:
            async with trio.open_nursery() as nursery:
                for _ in range(tcp_punch.HARD_SOCKETS):
                    nursery.start_soon(dial_loop, cancel, True)

        async def spray_probe(port: int, cancel: trio.CancelScope) -> None:
            # from the punch port, so that our cone's one mapping lets that port's answer in
            sock = _reuse_socket(self.family)
            try:
                await sock.bind((self.wildcard, self.port))
                TRAFFIC.sent += syn
                first = trio.current_time()
                try:
                    with trio.move_on_after(tcp_punch.SPRAY_HOLD):
                        await sock.connect((remote[0], port))
                        take(sock, cancel)
                        return
                finally:  # a resend too if a busy loop closes it only past SYN_RTO
                    TRAFFIC.sent += syn * (tcp_punch.syns_sent(trio.current_time() - first) - 1)
            except OSError:
                pass  # refused or unreachable: not one of the ports the hard side opened
            except BaseException:
                sock.close()
                raise
            sock.close()

        async def spray_loop(cancel: trio.CancelScope) -> None:
            await trio.sleep(tcp_punch.SPRAY_AFTER)
            ports = itertools.islice(spray_ports(random.Random(), exclude=remote[1]), tcp_punch.SPRAY_PROBES)
            batch = 20  # probes per wakeup: SPRAY_RATE without a timer per SYN
            async with trio.open_nursery() as nursery:
                while chunk := list(itertools.islice(ports, batch)):
                    for port in chunk:
                        nursery.start_soon(spray_probe, port, cancel)
                    await trio.sleep(batch / tcp_punch.SPRAY_RATE)

        try:
            with trio.move_on_after(timeout):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(accept_loop, nursery.cancel_scope)
                    nursery.start_soon(resend_loop)
                    nursery.start_soon(dial_loop, nursery.cancel_scope)
                    if role is tcp_punch.Role.HARD:
                        nursery.start_soon(hard_loop, nursery.cancel_scope)
                    elif role is tcp_punch.Role.EASY:
                        nursery.start_soon(spray_loop, nursery.cancel_scope)
        except BaseException:
            for stream in got:
                stream.socket.close()
            raise
        if not got:
            seen = ", ".join(dict.fromkeys(errors)) or "no answer"
            raise PunchFailed(f"no connection to {_fmt(remote)} within {timeout:.1f} s ({seen})")
        return got[0]


async def _resolve(addr: tuple[str, int], timeout: float) -> tuple[int, Any]:
    """(family, sockaddr) of a tracker address."""
    with trio.fail_after(timeout):
        infos = await trio.socket.getaddrinfo(addr[0], addr[1], type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"cannot resolve {addr[0]}")
    family, _, _, _, sockaddr = infos[0]
    return int(family), sockaddr


def _mapped(reply: dict[str, Any]) -> tuple[str, int]:
    addr = reply.get("addr")
    if not isinstance(addr, list) or len(addr) != 2 or not isinstance(addr[0], str) or not isinstance(addr[1], int):
        raise RpcError(ErrorCode.PROTOCOL, "the tracker's punch answer has no [host, port]")
    return addr[0], addr[1]


@contextlib.contextmanager
def birthday_place(role: tcp_punch.Role, gate: udp_punch.BirthdayGate | None) -> Iterator[None]:
    """A place in `gate` for a birthday punch's role (a plain punch needs none); ConnectError when it is full."""
    if role is tcp_punch.Role.PLAIN or gate is None:
        yield
        return
    if not gate.try_enter():
        raise ConnectError(f"{gate.running} birthday punch(es) under way already (the most at once)")
    try:
        yield
    finally:
        gate.leave()


async def _punch(
    signal: SignalChannel,
    method: str,
    params: dict[str, Any],
    timeout: float,
    nat: str,
    peer_nat: str | None = None,
    gate: udp_punch.BirthdayGate | None = None,
    reached: Callable[[], None] | None = None,
) -> tuple[trio.SocketStream, tuple[str, int]]:
    """Ask the tracker from a fresh port, then open a connection to the address it names; ConnectError if not.

    `nat`: this node's NAT type, passed to the peer; `peer_nat`: the peer's (None: the tracker's answer has it):
    together they give the birthday roles (p2pd/protocol/tcp_punch.py). A birthday punch takes a place in
    `gate` (`max_tcp_birthday_punches`): each holds hundreds to thousands of sockets for a second and the
    CPU to drive them, so a node runs few at once, whoever asked; with the gate full it fails at once.
    `reached()` is called once a birthday punch has its place and starts (see `PunchConnector.connect`)."""
    deadline = trio.current_time() + timeout
    tracker = signal.addr
    if not signal.up or tracker is None:
        raise ConnectError("no signal channel to the tracker")
    try:
        family, sockaddr = await _resolve(tracker, timeout)
        async with PunchPort(family) as port:
            reply = await port.ask_tracker(
                sockaddr, method, {**signal.identity(), **params, "nat": nat}, max(0.1, deadline - trio.current_time())
            )
            remote = _mapped(reply)
            if peer_nat is None:
                peer_nat = str(reply.get("nat", ""))
            role = tcp_punch.role(nat, peer_nat)
            if role is not tcp_punch.Role.PLAIN:
                log.debug("tcp punch to %s: %s side (%s <-> %s)", _fmt(remote), role, nat, peer_nat)
            with birthday_place(role, gate):
                if reached is not None and role is not tcp_punch.Role.PLAIN:
                    reached()
                stream = await port.connect_to(remote, max(0.1, deadline - trio.current_time()), role)
    except RpcError as e:
        raise ConnectError(f"tracker: {e.message}") from None
    except trio.TooSlowError:
        raise ConnectError("the tracker did not answer in time") from None
    except (OSError, FrameError, PunchFailed) as e:
        raise ConnectError(str(e) or type(e).__name__) from None
    return stream, remote


class PunchConnector:
    """The `tcp-punch` path: TCP simultaneous open through both NATs, arranged over the signal channel."""

    def __init__(
        self,
        identity: auth.Identity,
        signal: SignalChannel,
        *,
        timeout: float,
        handshake_timeout: float,
        nat: Callable[[], NatStatus | None] = lambda: None,
        gate: udp_punch.BirthdayGate | None = None,
    ) -> None:
        """`nat()`: this node's NAT detection status now (its type picks the birthday role); `gate`: the
        node's TCP birthday punches at once."""
        self.identity = identity
        self.node_id = identity.node_id
        self.signal = signal
        self.timeout = timeout
        self.handshake_timeout = handshake_timeout
        self.nat = nat
        self.gate = gate

    async def connect(
        self, remote_id: str, addr: tuple[str, int], artifact_id: str, *, reached: Callable[[], None] | None = None
    ) -> Connection:
        """`reached()` is called once the peer has answered the rendezvous and a birthday punch (a cone and a
        symmetric NAT) starts: the race then lets the later paths (the UDP punch, the relay) wait for this one's
        outcome, as for a direct connect whose TCP is up. A birthday punch takes 0.4-1.4 s, longer on a busy host,
        and a relay that wins meanwhile (`relay_after`, 2.5 s) carries the pair for good when one side blocks UDP:
        the relay upgrade punches UDP only. A plain punch (cones, or two symmetric NATs that cannot punch) never
        calls it: it is done in milliseconds or not at all, and the relay starts at its stagger."""
        stream, remote = await _punch(
            self.signal,
            "punch",
            {"target": remote_id, "artifact_id": artifact_id},
            self.timeout,
            own_nat(self.nat)[0],
            gate=self.gate,
            reached=reached,
        )
        return await _handshake_punched(stream, remote, self.identity, remote_id, artifact_id, self.handshake_timeout)


async def _handshake_punched(
    stream: trio.SocketStream,
    remote: tuple[str, int],
    identity: auth.Identity,
    remote_id: str,
    artifact_id: str,
    handshake_timeout: float,
) -> Connection:
    node_id = identity.node_id
    try:
        return await connections.open_outgoing(
            stream,
            identity=identity,
            remote_id=remote_id,
            artifact_id=artifact_id,
            addr=_fmt(remote),
            path=ConnectionPath.TCP_PUNCH,
            handshake_timeout=handshake_timeout,
            initiator=min(node_id, remote_id),
        )
    except _HANDSHAKE_FAILURES as e:
        with trio.CancelScope(shield=True):
            await stream.aclose()
        raise ConnectError(f"handshake over the punched connection: {e or type(e).__name__}") from None
    except BaseException:
        stream.socket.close()
        raise


class RelayConnector:
    """The `relay` path: the tracker names a relay and gives both nodes a token; both dial the relay."""

    def __init__(
        self,
        identity: auth.Identity,
        signal: SignalChannel,
        *,
        rendezvous_timeout: float,
        connect_timeout: float,
        pair_timeout: float,
        handshake_timeout: float,
    ) -> None:
        self.identity = identity
        self.node_id = identity.node_id
        self.signal = signal
        self.rendezvous_timeout = rendezvous_timeout
        self.connect_timeout = connect_timeout
        self.pair_timeout = pair_timeout
        self.handshake_timeout = handshake_timeout

    async def connect(self, remote_id: str, addr: tuple[str, int], artifact_id: str) -> Connection:
        try:
            r = await self.signal.call(
                "relay", {"target": remote_id, "artifact_id": artifact_id}, timeout=self.rendezvous_timeout
            )
            relay = (str(r["relay"][0]), int(r["relay"][1]))
            token = bytes(r["token"])
        except RpcError as e:
            raise ConnectError(f"tracker: {e.message}") from None
        except (KeyError, TypeError, ValueError, IndexError):
            raise ConnectError("the tracker's relay answer is malformed") from None
        try:
            stream = await dial_relay(
                relay, token, self.node_id, connect_timeout=self.connect_timeout, pair_timeout=self.pair_timeout
            )
        except RelayRefused as e:
            raise ConnectError(str(e)) from None
        try:
            return await connections.open_outgoing(
                stream,
                identity=self.identity,
                remote_id=remote_id,
                artifact_id=artifact_id,
                addr=_fmt(relay),
                path=ConnectionPath.RELAY,
                handshake_timeout=self.handshake_timeout,
            )
        except _HANDSHAKE_FAILURES as e:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise ConnectError(f"handshake through relay {_fmt(relay)}: {e or type(e).__name__}") from None
        except BaseException:
            stream.socket.close()
            raise


class Traversal:
    """A daemon's NAT traversal: the signal channel, the raced connector, answers to signals, its relay.

    `serves(artifact_id)`: do we run a swarm for it; `serve(conn)`: hand a handshaken incoming
    connection to that swarm (the callee closes it when done, as the listener's handler does).
    """

    def __init__(
        self,
        identity: auth.Identity,
        config: TraversalConfig,
        swarm: SwarmConfig,
        *,
        serves: Callable[[str], bool],
        serve: Callable[[Connection], Awaitable[None]],
        nat: Callable[[], NatStatus | None] = lambda: None,
        on_preheat: Callable[[], None] = lambda: None,
        wanted: Callable[[str, str, ConnectionPath, str], bool] = lambda aid, remote_id, path, initiator: True,
    ) -> None:
        """`nat()`: this node's NAT detection status now (the UDP punch needs its type and STUN server);
        `on_preheat()`: the tracker says preheat orders wait for this node (take them now, not at the next
        heartbeat); `wanted(artifact_id, remote_id, path, initiator)`: would that artifact's swarm still keep such
        a connection to that peer (False once it holds one that would win over it: `_answer`)."""
        unknown = set(config.paths) - {str(p) for p in ConnectionPath}
        if unknown or not config.paths:
            raise P2pdError(
                ErrorCode.BAD_REQUEST,
                f"unknown path(s) {sorted(unknown)} in --paths: "
                f"use some of {', '.join(str(p) for p in ConnectionPath)}",
            )
        node_id = identity.node_id
        self.identity = identity
        self.node_id = node_id
        self.config = config
        self.swarm_config = swarm
        self.serves = serves
        self.serve = serve
        self.nat = nat
        self.on_preheat = on_preheat
        self.wanted = wanted
        self.signal = SignalChannel(node_id, self.on_signal)
        # QUIC (the udp-punch path) needs a certificate: a self-signed one per daemon run; it encrypts
        # but does not authenticate (node authentication is issue #14). Made at the first UDP punch, not
        # here: building it imports cryptography's X.509 layer (~0.1 s of CPU), which a restarting daemon
        # must not pay before it serves its peers again.
        self._credentials: quic_stream.Credentials | None = None
        self.birthday_gate = udp_punch.BirthdayGate(config.max_birthday_punches)  # ours and answered ones
        self.tcp_birthday_gate = udp_punch.BirthdayGate(config.max_tcp_birthday_punches)  # likewise, over TCP
        self.relay: Relay | None = None
        self._relay_keys: list[bytes] = []
        if config.offer_relay:
            self.relay = Relay(
                keys=lambda: self._relay_keys,
                rate=config.relay_rate,
                max_pairs=config.relay_max_pairs,
                pair_timeout=config.relay_pair_timeout * 2,
                idle_timeout=config.relay_idle_timeout,
            )
        offered: dict[str, Connector] = {
            "direct": TcpConnector(
                identity, connect_timeout=swarm.connect_timeout, handshake_timeout=swarm.handshake_timeout
            ),
            "tcp-punch": PunchConnector(
                identity,
                self.signal,
                timeout=config.punch_timeout,
                handshake_timeout=swarm.handshake_timeout,
                nat=lambda: self.nat(),
                gate=self.tcp_birthday_gate,
            ),
            "udp-punch": udp_punch.UdpPunchConnector(
                identity,
                self.signal,
                nat=lambda: self.nat(),
                nursery=lambda: self._nursery,
                rendezvous_timeout=config.rendezvous_timeout,
                timeout=config.udp_punch_timeout,
                handshake_timeout=swarm.handshake_timeout,
                gate=self.birthday_gate,
            ),
            "relay": RelayConnector(
                identity,
                self.signal,
                rendezvous_timeout=config.rendezvous_timeout,
                connect_timeout=swarm.connect_timeout,
                pair_timeout=config.relay_pair_timeout,
                handshake_timeout=swarm.handshake_timeout,
            ),
        }
        stagger = {
            "direct": 0.0,
            "tcp-punch": config.punch_after,
            "udp-punch": config.udp_punch_after,
            "relay": config.relay_after,
        }
        paths = [
            Path(name, offered[name], stagger[name], reports_transport=name in ("direct", "tcp-punch", "udp-punch"))
            for name in offered
            if name in config.paths
        ]
        paths[0] = Path(paths[0].name, paths[0].connector, 0.0, paths[0].reports_transport)
        self.connector = RacingConnector(paths, remember_direct=config.remember_direct)
        # the UDP punch alone, for a swarm to move a relayed peer onto a punched path (`relay_upgrade_every`)
        self.upgrader: Connector | None = (
            offered["udp-punch"] if "udp-punch" in config.paths and "relay" in config.paths else None
        )
        self.answering = 0
        self._nursery: trio.Nursery | None = None

    async def run(
        self, tracker: TrackerClient, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve the relay (if offered) and keep the signal channel open, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.relay is not None:
                host, port = self.config.relay_listen
                try:
                    self.signal.relay_port = await nursery.start(self.relay.serve, host, port)
                except OSError as e:
                    raise P2pdError(
                        ErrorCode.CONFLICT,
                        f"cannot listen for relaying on {host}:{port}: {e.strerror or e}; pick another --relay-listen",
                    ) from None
                log.info("relaying for other nodes on %s:%d", host, self.signal.relay_port)
            if self.config.paths != ("direct",):
                await nursery.start(self.signal.run, tracker)
            task_status.started()

    def on_signal(self, event: dict[str, Any]) -> None:
        """A message from the tracker (called by the signal channel; must not block)."""
        kind = event.get("kind")
        if kind == "relay-key":
            key = bytes(event["key"])
            self._relay_keys = [key, *self._relay_keys[:1]]  # tokens minted just before a reconnect stay valid
            return
        if kind == "preheat":  # a nudge without data: the orders themselves are taken with the preheat RPC
            self.on_preheat()
            return
        if kind not in ("punch", "relay", "udp-punch"):
            log.debug("ignored a signal of kind %r", kind)
            return
        remote = str(event["from"])
        if not _NODE_ID_RE.match(remote):
            raise ValueError(f"bad node id {remote[:40]!r}")
        aid = str(event["artifact_id"])
        if not self.serves(aid):
            log.info(
                "%s from %s for %s not answered: this node does not serve that artifact", kind, remote[:8], aid[:12]
            )
            return
        if self.answering >= self.config.max_answering or self._nursery is None:
            log.warning("%s from %s not answered: already answering %d", kind, remote[:8], self.answering)
            return
        if kind == "punch":
            nat = str(event.get("nat", ""))  # the asking node's NAT type (a tracker that relays it)
            path = ConnectionPath.TCP_PUNCH
            args: tuple[Any, ...] = (self._answer_punch, remote, str(event["rendezvous"]), aid, nat)
        elif kind == "udp-punch":
            if "udp-punch" not in self.config.paths:
                log.info("udp-punch from %s not answered: udp-punch is not among --paths", remote[:8])
                return
            udp_punch.up.rendezvous_bytes(str(event["rendezvous"]))  # malformed: ValueError, logged by the channel
            path = ConnectionPath.UDP_PUNCH
            args = (self._answer_udp, dict(event))
        else:
            relay = (str(event["relay"][0]), int(event["relay"][1]))
            path = ConnectionPath.RELAY
            args = (self._answer_relay, remote, aid, bytes(event["token"]), relay)
        # who both ends will record as the dialler: a punched TCP connection's is the lower id, whoever asked
        initiator = min(self.node_id, remote) if path is ConnectionPath.TCP_PUNCH else remote
        if not self.wanted(aid, remote, path, initiator):
            log.debug("%s from %s not answered: we hold a better connection to it", kind, remote[:8])
            return
        self.answering += 1
        self._nursery.start_soon(self._answer, (aid, remote, path, initiator), *args)

    async def _answer(
        self, what: tuple[str, str, ConnectionPath, str], fn: Callable[..., Awaitable[Connection | None]], *args: Any
    ) -> None:
        """Answer a punch or relay meeting, called off once the swarm holds a connection to that peer that the
        one answered would lose to (`wanted`): the asker's race moves on when another of its paths wins, but
        the tracker tells us nothing of it, so an answered UDP punch went on for its whole 4 s (256 sockets
        or ~8,000 sprayed probes) beside the TCP connection the race had chosen, in the NAT swarm's every
        run, taking the CPU its downloads needed (issue #12)."""
        aid, remote, path, initiator = what
        conn: Connection | None = None
        try:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    while self.wanted(aid, remote, path, initiator):
                        await trio.sleep(ANSWER_POLL)
                    log.debug("%s answer to %s called off: we hold a better connection to it", path, remote[:8])
                    nursery.cancel_scope.cancel()

                async def answer() -> None:
                    nonlocal conn
                    conn = await fn(*args)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                nursery.start_soon(answer)
        finally:
            self.answering -= 1
        if conn is not None:
            await self.serve(conn)

    async def _answer_punch(
        self, remote_id: str, rendezvous: str, artifact_id: str, peer_nat: str = ""
    ) -> Connection | None:
        try:
            stream, remote = await _punch(
                self.signal,
                "punch_answer",
                {"rendezvous": rendezvous},
                self.config.punch_timeout,
                own_nat(self.nat)[0],
                peer_nat,
                self.tcp_birthday_gate,
            )
            return await _handshake_punched(
                stream, remote, self.identity, remote_id, artifact_id, self.swarm_config.handshake_timeout
            )
        except ConnectError as e:
            log.debug("punch asked by %s failed: %s", remote_id[:8], e)
            return None

    def credentials(self) -> quic_stream.Credentials:
        """This run's QUIC certificate, made on first use (udp-punch only: the path that needs it)."""
        if self._credentials is None:
            self._credentials = quic_stream.Credentials(self.node_id)
        return self._credentials

    async def _answer_udp(self, event: dict[str, Any]) -> Connection | None:
        assert self._nursery is not None
        try:
            return await udp_punch.answer(
                self.identity,
                self.signal,
                event,
                nat=self.nat,
                nursery=self._nursery,
                credentials=self.credentials(),
                rendezvous_timeout=self.config.rendezvous_timeout,
                timeout=self.config.udp_punch_timeout,
                handshake_timeout=self.swarm_config.handshake_timeout,
                serves=self.serves,
                gate=self.birthday_gate,
            )
        except ConnectError as e:
            log.info("udp punch asked by %s not answered: %s", str(event.get("from"))[:8], e)
            return None

    async def _answer_relay(
        self, remote_id: str, artifact_id: str, token: bytes, relay: tuple[str, int]
    ) -> Connection | None:
        try:
            stream = await dial_relay(
                relay,
                token,
                self.node_id,
                connect_timeout=self.swarm_config.connect_timeout,
                pair_timeout=self.config.relay_pair_timeout,
            )
        except RelayRefused as e:
            log.info("relay meeting asked by %s failed: %s", remote_id[:8], e)
            return None
        try:
            return await connections.accept_from(
                stream,
                _fmt(relay),
                self.identity,
                remote_id=remote_id,
                artifact_id=artifact_id,
                path=ConnectionPath.RELAY,
                handshake_timeout=self.swarm_config.handshake_timeout,
            )
        except _HANDSHAKE_FAILURES as e:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            log.info("relay meeting asked by %s failed in the handshake: %s", remote_id[:8], e or type(e).__name__)
            return None
        except BaseException:
            stream.socket.close()
            raise

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "paths": list(self.config.paths),
            "signal_channel": self.signal.up,
            "wins": dict(self.connector.wins),
        }
        if self.relay is not None:
            out["relay"] = {"port": self.relay.port, **self.relay.stats.as_dict()}
        return out
