"""NAT detection for a node: which NAT it sits behind and its public (mapped) address, kept current.

The node probes from the UDP twin of its peer listening port (same port number, UDP), so the mapped
address it learns is the NAT's mapping for that port: what a peer behind another NAT would aim at.
The STUN server is the tracker (docs/tracker.md, "NAT detection"): its address comes with the
`register` reply, so a node behind NAT needs no configuration.

`classify()` drives the sans-IO `p2pd.protocol.nat.Classifier` (RFC 3489 tests; why not pynat is in
that module's docstring) over a trio socket; `NatMonitor` runs it at start, sends one cheap Binding
request every `check_every` seconds (which also keeps the NAT's mapping of the twin port alive: UDP
mappings expire after ~30 s idle, research FINDINGS §3), classifies again when the mapped address
changes or every `reclassify_every` seconds, and reports each new verdict (the daemon re-registers
with it). Every wait is bounded: a probe is retransmitted `tries` times at doubling intervals from
`rto`, then counts as unanswered (which is itself an answer in RFC 3489).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from p2pd.protocol import stun
from p2pd.protocol.nat import Addr, Answer, Classification, Classifier, NatType, Probe, StunTest

log = logging.getLogger(__name__)

RECV_MAX = 2048


def plain(addr: Any) -> Addr:
    """(host, port) from any socket address, an IPv4-mapped IPv6 host written as the IPv4 it is."""
    host = str(addr[0]).split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host, int(addr[1])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped), int(addr[1])
    return str(ip), int(addr[1])


def _wire(addr: Addr, family: int) -> Addr:
    """`addr` as a socket of `family` must be given it (an IPv4 peer of an IPv6 socket is v4-mapped)."""
    if family == socket.AF_INET6 and ":" not in addr[0]:
        return f"::ffff:{addr[0]}", addr[1]
    return addr


async def exchange(
    sock: trio.socket.SocketType, probe: Probe, accept_from: set[str], *, rto: float = 0.2, tries: int = 3
) -> Answer | None:
    """Send `probe` (retransmitted at rto, 2·rto, ...) and return the first matching answer, or None.

    An answer counts only if it comes from one of the server's IPs and carries our transaction id;
    anything else arriving on the socket is ignored."""
    txid = stun.new_transaction_id()
    payload = stun.binding_request(txid, change_ip=probe.change_ip, change_port=probe.change_port)
    dest = _wire(probe.dest, sock.family)
    wait = rto
    for _ in range(tries):
        try:
            await sock.sendto(payload, dest)
        except OSError as e:  # no route, interface down: like a lost datagram (retried, then unanswered)
            log.debug("stun probe %s to %s: %s", probe.test.value, probe.dest, e)
        with trio.move_on_after(wait):
            while True:
                try:
                    data, src = await sock.recvfrom(RECV_MAX)
                except OSError as e:  # an ICMP error reported on the socket: keep waiting for the answer
                    if e.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                        raise
                    continue
                source = plain(src)
                if source[0] not in accept_from:
                    continue
                try:
                    resp = stun.parse_response(data)
                except stun.StunError as e:
                    log.debug("ignored a datagram from %s: %s", source, e)
                    continue
                if resp.transaction_id != txid:
                    continue
                return Answer(
                    source=source,
                    mapped=resp.mapped and plain(resp.mapped),
                    other=resp.other and plain(resp.other),
                    error=resp.error,
                )
        wait *= 2
    return None


def local_address(sock: trio.socket.SocketType, server: Addr) -> Addr:
    """The IP and port our probes to `server` leave from (the route's source IP when bound to any)."""
    bound = plain(sock.getsockname())
    if not ipaddress.ip_address(bound[0]).is_unspecified:
        return bound
    probe = socket.socket(sock.family, socket.SOCK_DGRAM)
    try:
        probe.connect(_wire(server, sock.family))  # UDP connect sends nothing: it only picks the route
        return plain(probe.getsockname())[0], bound[1]
    finally:
        probe.close()


async def classify(sock: trio.socket.SocketType, server: Addr, *, rto: float = 0.2, tries: int = 3) -> Classification:
    """Run the RFC 3489 tests from `sock` against the STUN server at `server` (an IP literal)."""
    try:
        local = local_address(sock, server)
    except OSError as e:
        return Classification(NatType.UDP_BLOCKED, None, f"no route to the STUN server {server}: {e}")
    clf = Classifier(server, local)
    step: Probe | Classification = clf.start()
    while isinstance(step, Probe):
        accept = {server[0]} | ({clf.other[0]} if clf.other else set())
        answer = await exchange(sock, step, accept, rto=rto, tries=tries)
        step = clf.timed_out() if answer is None else clf.answered(answer)
    return step


async def binding(sock: trio.socket.SocketType, server: Addr, *, rto: float = 0.2, tries: int = 3) -> Addr | None:
    """One Binding request: our mapped address as the server sees it now, or None without an answer."""
    answer = await exchange(sock, Probe(StunTest.I, server), {server[0]}, rto=rto, tries=tries)
    if answer is None or answer.error is not None:
        return None
    return answer.mapped


@dataclass
class NatStatus:
    """What `p2pd status` shows and the tracker is told (`registration()`)."""

    state: str = "detecting"  # "detecting" (first run), "done", "off" (the tracker offers no STUN)
    nat_type: NatType = NatType.UNKNOWN
    mapped: Addr | None = None
    local: Addr | None = None
    server: Addr | None = None
    reason: str = ""
    checked_at: float | None = None  # trio clock of the last classification

    def registration(self) -> dict[str, Any]:
        return {"type": self.nat_type.value, "mapped": list(self.mapped) if self.mapped else None}

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "state": self.state,
            "type": self.nat_type.value,
            "mapped": list(self.mapped) if self.mapped else None,
            "local": list(self.local) if self.local else None,
            "stun_server": list(self.server) if self.server else None,
            "reason": self.reason,
            "checked_s_ago": None if self.checked_at is None else round(now - self.checked_at, 1),
        }


ServerGetter = Callable[[], tuple[str, int] | None]
Reporter = Callable[[NatStatus], Awaitable[bool]]


class NatMonitor:
    """Keeps `status` current for one node (see the module docstring). Run with `nursery.start(mon.run, ...)`."""

    def __init__(
        self,
        bind: Addr,
        *,
        check_every: float = 20.0,
        reclassify_every: float = 300.0,
        rto: float = 0.2,
        tries: int = 3,
        resolve_timeout: float = 2.0,
    ) -> None:
        self.bind = bind
        self.check_every = check_every
        self.reclassify_every = reclassify_every
        self.rto = rto
        self.tries = tries
        self.resolve_timeout = resolve_timeout
        self.status = NatStatus()
        self.classifications = 0
        self._sock: trio.socket.SocketType | None = None

    async def _open(self) -> trio.socket.SocketType:
        host, port = self.bind
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_DGRAM)
        try:
            await sock.bind((host, port))
        except OSError as e:
            # the twin port is taken (another program's UDP socket): probe from any port instead; the type
            # is still right, only the mapped port is not the listening port's
            log.info("nat detection: UDP port %d is in use (%s); probing from an ephemeral port", port, e.strerror)
            try:
                await sock.bind((host, 0))
            except OSError:
                sock.close()
                raise
        return sock

    async def _resolve(self, target: tuple[str, int], family: int) -> Addr | None:
        flags = socket.AI_V4MAPPED if family == socket.AF_INET6 else 0
        with trio.move_on_after(self.resolve_timeout):
            try:
                infos = await trio.socket.getaddrinfo(
                    target[0], target[1], family=family, type=socket.SOCK_DGRAM, flags=flags
                )
            except OSError as e:  # socket.gaierror included
                log.warning("nat detection: cannot resolve the STUN server %s: %s", target[0], e)
                return None
            return plain(infos[0][4]) if infos else None
        log.warning("nat detection: resolving the STUN server %s timed out", target[0])
        return None

    async def run(
        self,
        get_server: ServerGetter,
        report: Reporter,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Classify, report, check, forever. `get_server()` is the STUN address the tracker offers now
        (None: none); `report(status)` tells the tracker and says whether that worked (else retried)."""
        sock = self._sock = await self._open()
        st = self.status
        try:
            task_status.started()
            # the STUN codec's import (~0.2 s of CPU) waits until the daemon serves, and runs beside its loop
            await trio.to_thread.run_sync(stun.load_codec)
            reclassify_at = -1.0  # now
            reported: dict[str, Any] | None = None
            while True:
                target = get_server()
                server = await self._resolve(target, sock.family) if target else None
                if server is None:
                    if st.state != "off":
                        log.info("nat detection off: the tracker offers no STUN server")
                    st.state, st.server = "off", None
                elif server != st.server or trio.current_time() >= reclassify_at:
                    await self._classify(sock, server)
                    reclassify_at = trio.current_time() + self.reclassify_every
                elif st.state == "done":  # also with no mapping: UDP that was lost for a while may be back
                    mapped = await binding(sock, server, rto=self.rto, tries=self.tries)
                    if mapped != st.mapped:
                        log.info(
                            "nat detection: mapped address %s is now %s; classifying again",
                            _fmt(st.mapped),
                            _fmt(mapped) if mapped else "unanswered",
                        )
                        reclassify_at = -1.0
                        continue
                if st.state == "done" and st.registration() != reported and await report(st):
                    reported = st.registration()
                await trio.sleep(self.check_every)
        finally:
            self._sock = None
            sock.close()

    async def _classify(self, sock: trio.socket.SocketType, server: Addr) -> None:
        st = self.status
        result = await classify(sock, server, rto=self.rto, tries=self.tries)
        self.classifications += 1
        changed = (result.nat_type, result.mapped) != (st.nat_type, st.mapped) or st.state != "done"
        st.state, st.nat_type, st.mapped, st.reason = "done", result.nat_type, result.mapped, result.reason
        st.server, st.checked_at = server, trio.current_time()
        try:
            st.local = local_address(sock, server)
        except OSError:
            st.local = None
        if changed:
            log.info("nat: %s, public address %s (%s)", result.nat_type.value, _fmt(result.mapped), result.reason)
        else:
            log.debug("nat: still %s at %s", result.nat_type.value, _fmt(result.mapped))


def _fmt(addr: Addr | None) -> str:
    if addr is None:
        return "none"
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
