"""The node's side of the tracker protocol: register, heartbeat, leave, names, manifests, peer lists.

A node is given a list of tracker addresses (replicas sharing a Redis store, or a single tracker) and
must keep heartbeating through a replica's death or a tracker restart without the daemon noticing:
- One TCP connection (p2pd.rpc) is owned by the client's nursery (`async with TrackerClient(...)`).
  A call that finds it broken reconnects once to the same address (the tracker may have restarted),
  then fails over to the next address; when no address answers it raises
  `RpcError(ErrorCode.UNREACHABLE, ...)` naming every address and why it failed.
- Every tracker call is idempotent, so retrying it on another replica is always safe.
- `heartbeat` re-registers by itself when the tracker answers `known: false` (it restarted or expired
  us), so a restarted in-memory tracker knows every node again within one interval.
- `run_heartbeats` sends heartbeats over UDP when the tracker offers it (see docs/tracker.md: that is
  what lets one tracker serve 100k nodes); an unchanged holdings map is sent as `nil` (delta), and a
  heartbeat without a UDP answer in time is retried over TCP at once, which also detects a dead
  tracker and fails over, and the heartbeats after it go over TCP for a while (`udp_retry_after`,
  doubling while UDP stays silent). Holdings too large for one datagram go over TCP.
- Every wait has a timeout: calls (`call_timeout`), connects (`connect_timeout`) and heartbeats
  (bounded by the interval, so a hung replica is abandoned within about one interval).
- While heartbeats go over UDP, the TCP connection is closed after `idle_close` seconds without a
  call, so a tracker with 100,000 nodes does not hold 100,000 idle sockets.
- In a secured cluster (an `identity` with a join secret, docs/security.md) every new connection
  starts with `challenge` (a nonce of the tracker's); `register` proves the node key and the join
  secret over it and agrees a session key (X25519), checking that the tracker holds the secret too;
  a later connection is bound to the session with `auth`. UDP heartbeats carry a MAC under the
  session key (`p2pd.protocol.heartbeat.seal`).
- NAT detection (`p2pd/nat_detect.py`) reads the tracker's STUN address from here (`stun_server`, from
  the `register`/`heartbeat` replies) and reports its verdict with `update_nat`, which registers again
  carrying `nat` so the tracker (and every peer list) shows the node's NAT type and mapped address.
"""

from __future__ import annotations

import hmac
import logging
import socket
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
import trio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from p2pd.errors import ErrorCode
from p2pd.protocol import auth
from p2pd.protocol.heartbeat import UDP_VERSION, UDP_VERSION_AUTH, UdpReply, UdpRequest, seal
from p2pd.rpc import RpcClient, RpcError, open_client
from p2pd.trio_util import collapse_single

log = logging.getLogger(__name__)

# Worth trying another replica: this one (or its Redis store) did not answer, or not in time.
TRANSIENT = frozenset({ErrorCode.UNREACHABLE, ErrorCode.TIMEOUT})
UDP_MAX_PAYLOAD = 1200  # stay under a typical path MTU: fragments are lost together
# an unanswered UDP heartbeat sends the next ones over TCP for this long, doubling up to UDP_RETRY_MAX while UDP
# stays silent: a lost datagram costs a few TCP heartbeats, a network that drops UDP one probe per 5 minutes
UDP_RETRY_AFTER = 10.0
UDP_RETRY_MAX = 300.0


_udp_enc = msgspec.msgpack.Encoder()
_udp_dec = msgspec.msgpack.Decoder(UdpReply)


def _share(v: Any) -> list[float | None] | None:
    """A share from a tracker reply, checked: [egress, cross], each bytes/s >= 0 or None."""
    if not isinstance(v, list | tuple) or len(v) != 2:
        return None
    out: list[float | None] = []
    for x in v:
        if x is None:
            out.append(None)
        elif isinstance(x, int | float) and not isinstance(x, bool) and x >= 0 and x == x:
            out.append(float(x))
        else:
            return None
    return out


def _fmt(addr: tuple[str, int]) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


class TrackerClient:
    """Talks to a list of tracker replicas for one node. Use as `async with TrackerClient(...) as tc:`.

    `addr` is where this node serves peers ([host, port]; host "0.0.0.0" lets the tracker fill in the
    address it sees). `labels` such as {"zone": "eu-1a"} steer peer selection.
    """

    def __init__(
        self,
        addresses: list[tuple[str, int]],
        node_id: str,
        addr: tuple[str, int],
        labels: dict[str, str] | None = None,
        version: str = "",
        *,
        call_timeout: float = 5.0,
        connect_timeout: float = 2.0,
        udp: bool = True,
        idle_close: float = 30.0,
        udp_retry_after: float = UDP_RETRY_AFTER,
        identity: auth.Identity | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("TrackerClient needs at least one tracker address")
        self.addresses = [(str(h), int(p)) for h, p in addresses]
        self.node_id = node_id
        self.addr = (str(addr[0]), int(addr[1]))
        self.labels = dict(labels or {})
        self.version = version
        self.call_timeout = call_timeout
        self.connect_timeout = connect_timeout
        self.use_udp = udp
        self.idle_close = idle_close
        self._last_tcp = 0.0
        self.interval: float = 1.0  # updated from every tracker reply
        self.policy: dict[str, Any] = {}
        # this node's share of the tracker's global budgets, [egress, cross] bytes/s (tracker/budgets.py);
        # None: no budget set. Demand is reported while a budget is set, and otherwise only when this node's
        # measured rates changed (the cluster page's throughput), so an idle node's heartbeats stay minimal.
        self.share: list[float | None] | None = None
        self._rates_reported: tuple[float, float] | None = None  # (egress_rate, cross_rate) last reported
        # the last heartbeat reply said the tracker holds preheat orders for this node (tracker/preheat.py)
        self.preheat_pending = False
        self.demand: list[float] | None = None  # what the next heartbeat reports (set by the daemon)
        self.session: int | None = None
        self.registered = False
        self.left = False  # said goodbye (the daemon stops): no heartbeat or registration may follow
        self.heartbeats_sent = 0
        self.registrations = 0
        self.udp_heartbeats = 0
        self._idx = 0
        self._client: RpcClient | None = None
        self._client_scope: trio.CancelScope | None = None
        self._conn_lock = trio.Lock()
        self._beat_lock = trio.Lock()  # the periodic beat and an immediate announce share one UDP socket
        self._nursery: trio.Nursery | None = None
        self._nursery_cm: Any = None
        self._udp_ports: dict[tuple[str, int], int | None] = {}
        self._udp_sock: trio.socket.SocketType | None = None
        self._udp_target: tuple[str, int] | None = None
        # per tracker address: after an unanswered UDP heartbeat, heartbeats to it go over TCP until then, and
        # how long the next such pause lasts (doubling while its UDP stays silent); a failover starts afresh
        self.udp_retry_after = udp_retry_after
        self._udp_quiet_until: dict[tuple[str, int], float] = {}
        self._udp_backoff: dict[tuple[str, int], float] = {}
        self._acked: dict[str, float] | None = None  # holdings the tracker acknowledged last
        self._seq = 0
        self.nat: dict[str, Any] | None = None  # {"type", "mapped"} sent with every registration once known
        self._stun: dict[tuple[str, int], Any] = {}  # tracker address -> its STUN advert [host, port] | None
        # trust: with a join secret every connection is challenged, and registration agrees a session key
        self.identity = identity
        self.secured = identity is not None and identity.cluster is not None
        self._nonce: tuple[RpcClient, bytes] | None = None  # the current connection's challenge
        self._session_key: bytes | None = None
        self._must_register = False  # the current connection could not be bound to our session
        self.publishers: list[str] = []  # node ids the tracker's publishers file lists (secured)

    # ---- lifecycle ---------------------------------------------------------------------------------

    async def __aenter__(self) -> TrackerClient:
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        return self

    async def __aexit__(self, etype: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool | None:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        self._close_udp()
        self._client = None
        nursery_cm, self._nursery, self._nursery_cm = self._nursery_cm, None, None
        context = exc.__context__ if exc is not None else None
        try:
            return await nursery_cm.__aexit__(etype, exc, tb)  # type: ignore[no-any-return]
        except BaseExceptionGroup as eg:
            # The nursery only holds the connection's reader, which never fails; an exception from the
            # body of `async with` comes back wrapped in a group: give the caller the exception itself.
            if exc is None or len(eg.exceptions) != 1 or eg.exceptions[0] is not exc:
                raise
            saved = (exc.__cause__, context, exc.__suppress_context__)
            try:
                raise exc  # noqa: B904 (the group is only a wrapper of exc)
            finally:
                exc.__cause__, exc.__context__, exc.__suppress_context__ = saved

    @property
    def current(self) -> tuple[str, int]:
        """The tracker address in use (or to be tried next)."""
        return self.addresses[self._idx]

    @property
    def stun_server(self) -> tuple[str, int] | None:
        """The STUN server the current tracker offers (None: none, or not registered yet)."""
        advert = self._stun.get(self.current)
        if not isinstance(advert, (list, tuple)) or len(advert) != 2:
            return None
        host, port = advert
        if not isinstance(port, int) or not 0 < port < 65536:
            return None
        return (str(host) or self.current[0]), port

    # ---- connection and failover -------------------------------------------------------------------

    async def _hold(
        self,
        addr: tuple[str, int],
        timeout: float,
        *,
        task_status: trio.TaskStatus[tuple[RpcClient, trio.CancelScope]],
    ) -> None:
        with trio.CancelScope() as scope:
            with trio.fail_after(timeout):
                stream = await trio.open_tcp_stream(*addr)
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with collapse_single():  # a refused proof reads as its RpcError, not as the client's nursery group
                async with open_client(stream) as client:
                    if self.secured:
                        with trio.fail_after(timeout):
                            await self._prove(client)
                    task_status.started((client, scope))
                    await trio.sleep_forever()

    async def _prove(self, client: RpcClient) -> None:
        """Take this new connection's challenge and bind it to our session (if the tracker still knows it)."""
        r = await client.call("challenge", {}, timeout=self.call_timeout)
        nonce = r.get("nonce") if isinstance(r, Mapping) else None
        if not isinstance(nonce, bytes) or len(nonce) != auth.NONCE_SIZE:
            raise RpcError(
                ErrorCode.UNAUTHORIZED,
                f"the tracker at {_fmt(self.current)} runs without a join secret (--insecure) "
                "but this node has one: it is not this cluster's tracker",
            )
        self._nonce = (client, nonce)
        self._must_register = True
        if self.session is not None and self._session_key is not None:
            mac = auth.session_mac(self._session_key, auth.conn_auth_transcript(nonce, self.node_id, self.session))
            a = await client.call(
                "auth", {"node_id": self.node_id, "session": self.session, "mac": mac}, timeout=self.call_timeout
            )
            self._must_register = not (isinstance(a, Mapping) and a.get("ok") is True)

    async def _connection(self, timeout: float) -> tuple[RpcClient, bool]:
        """The current connection, opened if needed; the bool says whether it is new."""
        if self._nursery is None:
            raise RuntimeError("use TrackerClient as `async with TrackerClient(...) as tc:`")
        async with self._conn_lock:
            if self._client is not None:
                return self._client, False
            client, scope = await self._nursery.start(self._hold, self.current, timeout)
            self._client, self._client_scope = client, scope
            log.debug("connected to tracker %s", _fmt(self.current))
            return client, True

    def _drop(self, client: RpcClient | None) -> None:
        if client is not None and client is self._client:
            if self._client_scope is not None:
                self._client_scope.cancel()
            self._client = None
            self._client_scope = None

    def _advance(self, failed_idx: int) -> None:
        if self._idx == failed_idx:
            self._idx = (failed_idx + 1) % len(self.addresses)
            self._close_udp()

    async def _call(
        self,
        method: str,
        params: dict[str, Any] | Callable[[bytes | None], dict[str, Any]],
        timeout: float | None = None,
    ) -> Any:
        """Call on the current tracker; on a transport failure reconnect once, then fail over.

        `params` may be a function of the connection's challenge (a registration signs it)."""
        t = timeout if timeout is not None else self.call_timeout
        errors: list[str] = []
        for _ in range(len(self.addresses)):
            idx = self._idx
            addr = self.addresses[idx]
            for _attempt in range(2):
                client: RpcClient | None = None
                try:
                    client, fresh = await self._connection(min(t, self.connect_timeout))
                    self._last_tcp = trio.current_time()
                    if callable(params):
                        nonce = self._nonce[1] if self._nonce is not None and self._nonce[0] is client else None
                        return await client.call(method, params(nonce), timeout=t)
                    if self.secured and self._must_register and method != "register" and not self.left:
                        await self.register()  # this connection speaks for no node yet (the tracker forgot us)
                    return await client.call(method, params, timeout=t)
                except (OSError, trio.TooSlowError) as e:
                    errors.append(f"{_fmt(addr)}: {'connect timed out' if isinstance(e, trio.TooSlowError) else e}")
                    break
                except RpcError as e:
                    if e.code not in TRANSIENT:
                        raise
                    self._drop(client)
                    if fresh or e.code == ErrorCode.TIMEOUT:
                        errors.append(f"{_fmt(addr)}: {e.message}")
                        break
                    log.debug("tracker connection to %s was stale (%s); reconnecting", _fmt(addr), e.message)
            self._drop(self._client if self._idx == idx else None)
            self._advance(idx)
        names = ", ".join(_fmt(a) for a in self.addresses)
        raise RpcError(ErrorCode.UNREACHABLE, f"no tracker answered at {names} ({'; '.join(errors)})")

    # ---- the RPCs ----------------------------------------------------------------------------------

    async def register(self) -> dict[str, Any]:
        """Announce this node; returns the tracker's reply ({"interval", "session", "udp_port", ...})."""
        base: dict[str, Any] = {
            "node_id": self.node_id,
            "addr": list(self.addr),
            "labels": self.labels,
            "version": self.version,
        }
        if self.nat is not None:
            base["nat"] = self.nat
        proof: list[tuple[X25519PrivateKey, bytes, bytes]] = []  # (ephemeral key, transcript, nonce) sent

        def params(nonce: bytes | None) -> dict[str, Any]:
            if not self.secured:
                return base
            assert self.identity is not None and self.identity.cluster is not None
            if nonce is None:
                raise RpcError(ErrorCode.UNAUTHORIZED, "no challenge from the tracker on this connection")
            eph = X25519PrivateKey.generate()
            eph_pub = auth.x25519_public(eph)
            key = self.identity.key
            t = auth.register_transcript(nonce, self.node_id, key.public, eph_pub, self.addr[0], self.addr[1])
            proof.append((eph, t, nonce))
            return {
                **base,
                "key": key.public,
                "eph": eph_pub,
                "proof": key.sign(t),
                "member": self.identity.cluster.mac(t),
            }

        r = await self._call("register", params)
        if self.secured:
            self._session_key = self._check_registration(r, *proof[-1])
            self._must_register = False
            self.publishers = [str(x) for x in r.get("publishers") or []]
        self.interval = float(r["interval"])
        self.session = r.get("session")
        self._udp_ports[self.current] = r.get("udp_port")
        self._stun[self.current] = r.get("stun")
        self.registered = True
        self.registrations += 1
        self._acked = None
        log.info("registered with tracker %s (interval %gs)", _fmt(self.current), self.interval)
        return dict(r)

    def _check_registration(self, r: Any, eph: X25519PrivateKey, transcript: bytes, nonce: bytes) -> bytes:
        """The tracker proved it holds the join secret; returns the session key both ends derive."""
        assert self.identity is not None and self.identity.cluster is not None
        tracker_eph, member, session = r.get("eph"), r.get("member"), r.get("session")
        if not isinstance(tracker_eph, bytes) or not isinstance(member, bytes) or not isinstance(session, int):
            raise RpcError(
                ErrorCode.UNAUTHORIZED, f"the tracker at {_fmt(self.current)} did not prove it holds the join secret"
            )
        want = self.identity.cluster.mac(auth.register_reply_transcript(transcript, tracker_eph, session))
        if not hmac.compare_digest(want, member):
            raise RpcError(
                ErrorCode.UNAUTHORIZED,
                f"the tracker at {_fmt(self.current)} holds a different join secret: it is not this cluster's tracker",
            )
        try:
            return auth.session_key(eph, tracker_eph, nonce, self.node_id)
        except auth.AuthError as e:
            raise RpcError(ErrorCode.UNAUTHORIZED, f"the tracker's registration answer: {e}") from None

    async def heartbeat(self, holdings: dict[str, float]) -> dict[str, Any]:
        """Heartbeat over TCP with the full holdings; re-registers when the tracker forgot this node."""
        r = await self._tcp_heartbeat(holdings)
        if not r.get("known"):
            log.info("tracker %s does not know this node (restart or expiry): registering again", _fmt(self.current))
            await self.register()
            r = await self._tcp_heartbeat(holdings)
        return r

    async def _tcp_heartbeat(self, holdings: dict[str, float]) -> dict[str, Any]:
        params: dict[str, Any] = {"node_id": self.node_id, "holdings": holdings}
        demand = self._report()
        if demand is not None:
            params["demand"] = demand
        r = await self._call("heartbeat", params, timeout=self._beat_timeout())
        self.heartbeats_sent += 1
        self.interval = float(r["interval"])
        self.policy = dict(r.get("policy") or {})
        self.share = _share(r.get("share"))
        self.preheat_pending = r.get("preheat") is True
        self._acked = dict(holdings) if r.get("known") else None
        if "udp_port" in r:  # after a failover, this is how we learn the new replica's UDP port
            self._udp_ports[self.current] = r["udp_port"]
        if "stun" in r:
            self._stun[self.current] = r["stun"]
        return dict(r)

    async def update_nat(self, nat: dict[str, Any]) -> None:
        """Report this node's NAT type and mapped address ({"type", "mapped": [ip, port] | None}).

        Sent by registering again (registration is idempotent and keeps holdings); kept for every later
        registration too, so a tracker that restarts learns it back. Heartbeats wait meanwhile, so none
        goes out with the session this replaces."""
        self.nat = dict(nat)
        async with self._beat_lock:
            if not self.left:
                await self.register()

    async def leave(self) -> None:
        """Say goodbye: the tracker drops this node from every peer list at once.

        For good: a heartbeat after the goodbye would find the tracker not knowing this node and register
        it again, and peers would be given (and would dial) a node that is gone, until its expiry. So
        heartbeats stop here, and the goodbye waits for the one in flight."""
        self.left = True
        async with self._beat_lock:
            await self._call("leave", {"node_id": self.node_id}, timeout=min(self.call_timeout, 2.0))
        self.registered = False
        self._acked = None

    async def publish(self, name: str, manifest_bytes: bytes, signed: dict[str, Any] | None = None) -> str:
        """Point NAME:TAG at this manifest; returns the artifact id the tracker computed.

        `signed`: the publisher's signature fields (p2pd/provenance.py), required by a secured tracker."""
        r = await self._call("publish", {"name": name, "manifest": manifest_bytes, **(signed or {})})
        return str(r["artifact_id"])

    async def resolve(self, name: str) -> tuple[str, bytes]:
        """NAME:TAG -> (artifact id, manifest bytes); RpcError `not_found` for an unknown name."""
        aid, data, _ = await self.resolve_signed(name)
        return aid, data

    async def resolve_signed(self, name: str) -> tuple[str, bytes, dict[str, Any]]:
        """`resolve`, with the whole reply (a secured tracker adds the publisher's signature)."""
        r = await self._call("resolve", {"name": name})
        return str(r["artifact_id"]), bytes(r["manifest"]), dict(r)

    async def manifest(self, artifact_id: str) -> bytes:
        r = await self._call("manifest", {"artifact_id": artifact_id})
        return bytes(r["manifest"])

    async def peers(self, artifact_id: str, max: int = 50) -> list[dict[str, Any]]:  # noqa: A002 (protocol name)
        """Peers holding the artifact: [{"node_id", "addr": [host, port], "progress"}], complete first."""
        r = await self._call("peers", {"artifact_id": artifact_id, "node_id": self.node_id, "max": max})
        return list(r["peers"])

    async def preheat_orders(self) -> list[dict[str, Any]]:
        """Take this node's pending preheat orders: [{"order", "name", "artifact_id"}] (delivered once)."""
        r = await self._call("preheat", {"node_id": self.node_id})
        self.preheat_pending = False
        orders = r.get("orders")
        if not isinstance(orders, list):
            raise RpcError(ErrorCode.INTERNAL, "the tracker's preheat answer has no order list")
        return [
            {"order": o["order"], "name": o["name"], "artifact_id": o["artifact_id"]}
            for o in orders
            if isinstance(o, dict) and all(isinstance(o.get(k), str) for k in ("order", "name", "artifact_id"))
        ]

    async def preheat_report(self, order: str, error: str) -> None:
        """Tell the tracker a preheat order failed here (shown by `admin preheat status`)."""
        await self._call("preheat_report", {"node_id": self.node_id, "order": order, "error": error})

    # ---- heartbeat loop ----------------------------------------------------------------------------

    def _beat_timeout(self) -> float:
        return max(0.5, min(self.call_timeout, self.interval))

    async def run_heartbeats(
        self,
        get_holdings: Callable[[], dict[str, float]],
        *,
        on_policy: Callable[[dict[str, Any]], None] | None = None,
        on_share: Callable[[list[float | None] | None], None] | None = None,
        get_demand: Callable[[], list[float]] | None = None,
        on_preheat: Callable[[list[dict[str, Any]]], None] | None = None,
        share_grace: float = 30.0,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Register, signal started, then heartbeat every interval until cancelled.

        The first registration raises `RpcError(ErrorCode.UNREACHABLE)` when no tracker answers, so a
        misconfigured node fails at start. After that a tracker outage is logged and retried every
        interval (the node keeps serving its peers meanwhile); it never ends this loop.

        `on_share` gets this node's share of the global budgets after every answered heartbeat; while
        no tracker answers the last share stays in force for `share_grace` seconds (a tracker restart
        must not unleash the cluster), then `on_share(None)`: the node's own limits only.
        `on_preheat` gets the preheat orders taken over TCP when a heartbeat reply said some wait.
        """
        await self.register()
        task_status.started()
        warned = False
        policy_seen: dict[str, Any] | None = None
        last_answer = trio.current_time()
        while True:
            started = trio.current_time()
            if get_demand is not None:
                self.demand = get_demand()
            try:
                await self.beat(get_holdings())
                last_answer = trio.current_time()
                if on_share is not None:
                    on_share(self.share)
                if on_preheat is not None and self.preheat_pending:
                    on_preheat(await self.preheat_orders())
                if warned:
                    log.info("tracker %s answers again", _fmt(self.current))
                    warned = False
            except RpcError as e:
                if e.code in TRANSIENT or e.code == ErrorCode.INTERNAL:
                    if not warned:
                        log.warning("heartbeat failed: %s; retrying every %gs", e.message, self.interval)
                        warned = True
                else:
                    raise
                if self.share is not None and trio.current_time() - last_answer > share_grace:
                    log.warning("no tracker for %.0f s: leaving the global budget, back to own limits", share_grace)
                    self.share = None
                    if on_share is not None:
                        on_share(None)
            if on_policy is not None and self.policy != policy_seen:
                policy_seen = dict(self.policy)
                on_policy(policy_seen)
            await trio.sleep_until(started + self.interval)

    async def beat(self, holdings: dict[str, float]) -> None:
        """One heartbeat: UDP when offered and the datagram fits, else (or if unanswered) TCP."""
        async with self._beat_lock:
            if self.left:
                return
            await self._beat(holdings)
            if self.demand is not None:  # answered: the tracker has these rates
                self._rates_reported = (self.demand[2], self.demand[3])

    def _report(self) -> list[float] | None:
        """The demand this heartbeat carries: always under a budget, else only when the measured rates moved."""
        d = self.demand
        if d is None or (self.share is None and (d[2], d[3]) == self._rates_reported):
            return None
        return d

    async def _beat(self, holdings: dict[str, float]) -> None:
        udp_port = self._udp_ports.get(self.current) if self.use_udp else None
        if (
            udp_port
            and self.session is not None
            and (self._session_key is not None or not self.secured)
            and trio.current_time() >= self._udp_quiet_until.get(self.current, 0.0)
        ):
            delta = None if holdings == self._acked else holdings
            self._seq += 1
            demand = self._report()
            if self._session_key is not None:
                body = _udp_enc.encode(
                    UdpRequest(UDP_VERSION_AUTH, self.node_id, self.session, self._seq, delta, demand)
                )
                payload = seal(body, self._session_key)
            else:
                payload = _udp_enc.encode(UdpRequest(UDP_VERSION, self.node_id, self.session, self._seq, delta, demand))
            if len(payload) <= UDP_MAX_PAYLOAD:
                reply = await self._udp_exchange((self.current[0], udp_port), payload, self._seq)
                if reply is None:
                    self._udp_unanswered()
                else:
                    self._udp_backoff.pop(self.current, None)
                    self.heartbeats_sent += 1
                    self.udp_heartbeats += 1
                    self.interval = reply.interval
                    self.policy = reply.policy
                    self.share = _share(reply.share)
                    self.preheat_pending = reply.preheat is True
                    if reply.known:
                        self._acked = dict(holdings)
                        if self._client is not None and trio.current_time() - self._last_tcp > self.idle_close:
                            # heartbeats go over UDP: do not hold one of the tracker's sockets for nothing
                            log.debug("closing idle tracker connection to %s", _fmt(self.current))
                            self._drop(self._client)
                        return
                    log.info("tracker %s does not know this node: registering again", _fmt(self.current))
                    await self.register()
        await self.heartbeat(holdings)

    def _udp_unanswered(self) -> None:
        """No UDP answer: the next heartbeats go straight over TCP for a while, and longer each time UDP stays
        silent. A node whose network drops UDP (the NAT matrix's UDP-blocked kind) otherwise waited out the
        UDP timeout (1 s) in every heartbeat and every announce, under the one lock they share: five artifacts
        published at once took 1 s each to answer, one after the other."""
        pause = self._udp_backoff.get(self.current, self.udp_retry_after)
        if pause <= 0:
            return
        self._udp_quiet_until[self.current] = trio.current_time() + pause
        self._udp_backoff[self.current] = min(UDP_RETRY_MAX, 2 * pause)
        log.info(
            "tracker %s: no answer to a UDP heartbeat; heartbeats go over TCP, UDP tried again in %.0f s",
            _fmt(self.current),
            pause,
        )

    async def _udp_exchange(self, target: tuple[str, int], payload: bytes, seq: int) -> UdpReply | None:
        """Send one datagram and wait (bounded, name lookup included) for its reply; None if none came."""
        with trio.move_on_after(min(self._beat_timeout(), 1.0) + self.connect_timeout):
            return await self._udp_exchange_unbounded(target, payload, seq)
        log.debug("udp heartbeat to %s: name lookup or send timed out", _fmt(target))
        self._close_udp()
        return None

    async def _udp_exchange_unbounded(self, target: tuple[str, int], payload: bytes, seq: int) -> UdpReply | None:
        try:
            if self._udp_sock is None or self._udp_target != target:
                self._close_udp()
                infos = await trio.socket.getaddrinfo(target[0], target[1], type=socket.SOCK_DGRAM)
                family, _, _, _, sockaddr = infos[0]
                sock = trio.socket.socket(family, socket.SOCK_DGRAM)
                await sock.connect(sockaddr)
                self._udp_sock, self._udp_target = sock, target
            sock = self._udp_sock
            await sock.send(payload)
            with trio.move_on_after(min(self._beat_timeout(), 1.0)):
                while True:
                    data = await sock.recv(65536)
                    try:
                        reply = _udp_dec.decode(data)
                    except msgspec.DecodeError:
                        log.debug("undecodable udp reply from tracker %s", _fmt(target))
                        continue
                    if reply.seq == seq:
                        return reply
        except OSError as e:  # e.g. ECONNREFUSED from an ICMP port unreachable: the TCP path decides
            log.debug("udp heartbeat to %s failed: %s", _fmt(target), e)
            self._close_udp()
        return None

    def _close_udp(self) -> None:
        if self._udp_sock is not None:
            self._udp_sock.close()
        self._udp_sock = None
        self._udp_target = None
