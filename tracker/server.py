"""Trio front ends of the tracker: the TCP RPC of docs/interfaces.md and the UDP heartbeat fast path.

TCP RPC (`p2pd.rpc` framing) carries everything: register, heartbeat, leave, publish, resolve,
manifest, peers. It is the contract every node speaks and is all a small cluster needs.

UDP heartbeats exist for the rate: a heartbeat is the one message every node sends every interval,
so at 100,000 nodes and a 1 s interval it is 100,000 messages/s. Over TCP RPC each one costs a trio
task, a frame parse and a send: about 10-20k/s per core in Python. Over UDP the server drains every
datagram that is ready without a task switch, hands the batch to the store at once (one Redis round
trip for the whole batch) and answers each; an unchanged heartbeat is ~40 bytes because holdings are
sent only when they changed (delta: `nil` means "same as last acknowledged"). Lost datagrams are
harmless: the next one, an interval later, carries the same information, and the TTL tolerates
three misses. The wire format is in docs/interfaces.md ("Tracker UDP heartbeats").

A UDP heartbeat must carry the `session` number handed out by `register`: a stray datagram, or a
node that the tracker forgot (restart, expiry, eviction), gets `known: false` and re-registers over
TCP, which is where identity, address and labels are checked.

STUN (`tracker/stun.py`) answers on the same UDP port by default: a STUN datagram fails to decode as
a heartbeat, and only on that path is it recognised and handed over, so heartbeats pay nothing for it.

Expiry runs in a sweeper task every interval/10, so a silent node is gone at most 10% of an interval
after its TTL; a graceful leave is applied when it arrives.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio

from p2pd.admission import Admission, incoming_cap, raise_fd_limit
from p2pd.errors import ErrorCode
from p2pd.protocol import auth
from p2pd.protocol import manifest as mf
from p2pd.protocol.heartbeat import UDP_VERSION, UDP_VERSION_AUTH, UdpReply, UdpRequest, unseal
from p2pd.rpc import Emit, Handler, RpcError, serve_connection
from tracker import validate as V
from tracker.budgets import parse_report
from tracker.cluster_view import ThroughputRing
from tracker.config import TrackerLimits
from tracker.membership import ConnState, Membership
from tracker.metrics import Metrics
from tracker.publishers import Publishers, SignedTag, check_publish, decode_signed
from tracker.signals import SignalHub
from tracker.store import Heartbeat, MemoryStore, Store
from tracker.stun import StunServer, StunSettings, is_unspecified, open_udp
from tracker.udp_batch import VLEN, BatchSocket, PlainSocket, open_batch
from tracker.validate import TrackerError

log = logging.getLogger("tracker")

UDP_MAX_DATAGRAM = 8192
UDP_MAX_BATCH = 512
MAX_SEQ_ENTRIES = 2_000_000  # replay-check entries a replica on a remote store keeps (~200 MB at most)
UNSPECIFIED_HOSTS = ("", "0.0.0.0", "::")


_udp_req_decoder = msgspec.msgpack.Decoder(UdpRequest)
_udp_encoder = msgspec.msgpack.Encoder()


def encode_udp_request(
    node_id: str, session: int, seq: int, holdings: dict[str, float] | None, demand: list[float] | None = None
) -> bytes:
    return _udp_encoder.encode(UdpRequest(UDP_VERSION, node_id, session, seq, holdings, demand))


_udp_reply_decoder = msgspec.msgpack.Decoder(UdpReply)


def decode_udp_reply(data: bytes) -> UdpReply:
    return _udp_reply_decoder.decode(data)


class TrackerServer:
    def __init__(
        self,
        store: Store,
        metrics: Metrics | None = None,
        *,
        stun: StunSettings | None = StunSettings(),
        membership: Membership | None = None,
        publishers: Publishers | None = None,
        limits: TrackerLimits | None = None,
    ) -> None:
        self.store = store
        self.membership = membership  # None: an --insecure tracker (every call accepted, docs/security.md)
        self.publishers = publishers or Publishers()  # who may publish which names (secured trackers)
        self.limits = limits or TrackerLimits()
        self.admission = Admission(self.limits.max_connections, self.limits.max_per_addr)
        self.metrics = metrics or Metrics()
        self.udp_port: int | None = None
        self.tcp_port: int | None = None
        self._policy: dict[str, Any] = {}
        self.stun_settings = stun  # None: no STUN server
        self.throughput = ThroughputRing()  # cluster egress per interval, for the cluster page (GET /ui)
        self.signals = SignalHub(store)  # signalling between nodes (NAT traversal); its relay is set up by the CLI
        self.stun: StunServer | None = None
        self._sealed: list[tuple[bytes, bytes]] = []  # (body, MAC) of the beats of the last _drain (secured)
        self._seqs: dict[str, tuple[int, int]] = {}  # node -> (session, last seq): replay check, remote stores

    def stun_advert(self) -> list[Any] | None:
        """What nodes are told about STUN: [host, port], host "" = the tracker address they use."""
        if self.stun is None:
            return None
        host, port = self.stun.primary
        return ["" if is_unspecified(host) else host, port]

    # ---- TCP RPC -----------------------------------------------------------------------------------

    def handlers(self, peer_ip: str) -> dict[str, Handler]:
        """Handlers for one connection (the peer's IP fills in an unspecified listen host)."""
        store = self.store
        ms = self.membership
        conn = ConnState(peer_ip)

        async def registered(nid: str) -> bool:
            return await store.node_info(nid) is not None

        async def challenge(p: dict[str, Any], emit: Emit) -> Any:
            return {"nonce": ms.challenge(conn) if ms is not None else b"", "secured": ms is not None}

        async def authenticate(p: dict[str, Any], emit: Emit) -> Any:
            if ms is None:
                return {"ok": True}
            nid = V.node_id(p.get("node_id"))
            session = p.get("session")
            (skey,) = await store.session_keys([(nid, session if isinstance(session, int) else -1)])
            return {"ok": ms.check_auth(conn, p, nid, skey)}

        async def register(p: dict[str, Any], emit: Emit) -> Any:
            nid = V.node_id(p.get("node_id"))
            host, port = V.addr(p.get("addr"))
            proof = ms.check_register(conn, p, nid, host, port) if ms is not None else None
            if host in UNSPECIFIED_HOSTS:
                host = peer_ip
            reg = await store.register(
                nid,
                host,
                port,
                V.labels(p.get("labels")),
                V.version(p.get("version")),
                nat=V.nat(p.get("nat")),
                key=proof.key if proof is not None else None,
                session_key=proof.session_key if proof is not None else None,
            )
            out: dict[str, Any] = {
                "interval": reg.interval,
                "session": reg.session,
                "udp_port": self.udp_port,
                "observed_ip": peer_ip,
                "stun": self.stun_advert(),
            }
            if ms is not None and proof is not None:
                conn.bind(nid)
                out.update(proof.reply, member=ms.reply_mac(proof, reg.session), publishers=self.publishers.node_ids)
            return out

        async def heartbeat(p: dict[str, Any], emit: Emit) -> Any:
            nid = V.node_id(p.get("node_id"))
            holdings = V.holdings(p.get("holdings"))
            if ms is not None and nid not in conn.nodes:
                if await registered(nid):
                    ms.require_bound(conn, nid, "heartbeat", True)  # raises, logged: a spoof
                return {
                    "interval": store.interval,
                    "known": False,
                    "policy": {},
                    "udp_port": self.udp_port,
                    "stun": self.stun_advert(),
                }
            (known,) = await store.heartbeat_many([Heartbeat(nid, holdings, demand=parse_report(p.get("demand")))])
            return {
                "interval": store.interval,
                "known": known,
                "policy": await store.policy(),
                "share": store.share_of(nid),
                "preheat": store.preheat_pending(nid),
                "udp_port": self.udp_port,
                "stun": self.stun_advert(),
            }

        async def leave(p: dict[str, Any], emit: Emit) -> Any:
            nid = V.node_id(p.get("node_id"))
            if ms is not None:
                ms.require_bound(conn, nid, "leave", await registered(nid))
            if await store.leave(nid):
                log.info("node %s left", nid)
            return {}

        async def publish(p: dict[str, Any], emit: Emit) -> Any:
            if ms is not None:
                ms.require_member(conn, "publish")
            name = V.name(p.get("name"))
            data = p.get("manifest")
            if not isinstance(data, bytes):
                raise V.bad("manifest must be bytes")
            if len(data) > self.limits.max_manifest_bytes:  # refused, never stored (issue #14 row 6)
                raise V.bad(
                    f"manifest of {len(data)} bytes exceeds this tracker's limit of {self.limits.max_manifest_bytes}: "
                    "split the artifact"
                )
            signed: SignedTag | None = None
            if ms is not None:
                blob = await store.signed_tag(name)
                current = decode_signed(blob) if blob is not None else None
                try:
                    signed = check_publish(p, name, hashlib.sha256(data).hexdigest(), self.publishers, current)
                except ValueError as e:
                    raise ms.refuse("publish", f"from {peer_ip}: {e}") from None
                if signed is None and current is not None:  # a second seed of what the name points at
                    return {"artifact_id": current.artifact_id}
                if signed is not None:
                    await self._charge(signed.owner, data)
            aid = await store.publish(name, data)
            if signed is not None:
                await store.set_signed_tag(name, signed.encode())
            log.info("published %s -> %s", name, aid)
            return {"artifact_id": aid}

        async def resolve(p: dict[str, Any], emit: Emit) -> Any:
            if ms is not None:
                ms.require_member(conn, "resolve")
            name = V.name(p.get("name"))
            aid, data = await store.resolve(name)
            out: dict[str, Any] = {"artifact_id": aid, "manifest": data}
            blob = await store.signed_tag(name) if ms is not None else None
            if blob is not None:
                signed = decode_signed(blob)
                if signed.artifact_id == aid:  # not when an admin moved the tag since
                    out.update(signed.reply())
            return out

        async def manifest(p: dict[str, Any], emit: Emit) -> Any:
            if ms is not None:
                ms.require_member(conn, "manifest")
            return {"manifest": await store.manifest(V.artifact_id(p.get("artifact_id")))}

        async def peers(p: dict[str, Any], emit: Emit) -> Any:
            if ms is not None:
                ms.require_member(conn, "peers")
            aid = V.artifact_id(p.get("artifact_id"))
            req = p.get("node_id")
            requester = V.node_id(req) if req is not None else None
            return {"peers": await store.peers(aid, requester, V.max_peers(p.get("max")))}

        async def preheat(p: dict[str, Any], emit: Emit) -> Any:
            """The node takes its preheat orders (tracker/preheat.py) after a reply said some are pending."""
            nid = V.node_id(p.get("node_id"))
            if ms is not None:
                ms.require_bound(conn, nid, "preheat", await registered(nid))
            return {"orders": await store.preheat_take(nid)}

        async def preheat_report(p: dict[str, Any], emit: Emit) -> Any:
            """A node could not carry out a preheat order: recorded for `admin preheat status`."""
            nid = V.node_id(p.get("node_id"))
            if ms is not None:
                ms.require_bound(conn, nid, "preheat_report", await registered(nid))
            order, error = p.get("order"), p.get("error")
            if not isinstance(order, str) or not isinstance(error, str):
                raise V.bad("preheat_report needs order (string) and error (string)")
            return {"recorded": await store.preheat_fail(nid, order, error)}

        raw: dict[str, Callable[[dict[str, Any], Emit], Awaitable[Any]]] = {
            "challenge": challenge,
            "auth": authenticate,
            "register": register,
            "heartbeat": heartbeat,
            "leave": leave,
            "publish": publish,
            "resolve": resolve,
            "manifest": manifest,
            "peers": peers,
            "preheat": preheat,
            "preheat_report": preheat_report,
        }
        return {name: self._instrument(name, fn) for name, fn in raw.items()}

    async def _charge(self, publisher: str, data: bytes) -> None:
        """Count a manifest against its publisher's total (tracker/config.py max_publisher_bytes), or refuse it."""
        try:
            mf.decode(data)  # nothing is counted for a manifest the store would refuse
        except mf.ManifestError as e:
            raise TrackerError(ErrorCode.BAD_REQUEST, f"invalid manifest: {e}") from e
        limit = self.limits.max_publisher_bytes
        held = await self.store.charge_publisher(publisher, hashlib.sha256(data).hexdigest(), len(data), limit)
        if held is not None:
            raise TrackerError(
                ErrorCode.BAD_REQUEST,
                f"node {publisher[:8]} already has {held} bytes of manifests at this tracker; this one ({len(data)} "
                f"bytes) would exceed the limit of {limit} bytes per publisher: ask the tracker's admin to raise "
                "it (p2p-tracker serve --max-publisher-bytes)",
            )

    def _instrument(self, method: str, fn: Handler) -> Handler:
        m = self.metrics

        async def wrapped(params: dict[str, Any], emit: Emit) -> Any:
            t0 = time.perf_counter()
            outcome = "ok"
            try:
                return await fn(params, emit)
            except TrackerError as e:
                outcome = e.code.value
                raise RpcError(e.code, e.message) from None
            except Exception:
                outcome = "error"
                raise
            finally:
                m.rpc_requests[(method, outcome)] += 1
                m.rpc_seconds[method].observe(time.perf_counter() - t0)

        return wrapped

    async def _on_connection(self, stream: trio.SocketStream) -> None:
        try:
            peer = stream.socket.getpeername()
            local = stream.socket.getsockname()
            peer_ip = str(peer[0])
        except OSError:
            peer, local, peer_ip = ("", 0), ("", 0), ""
        refused = self.admission.admit(peer_ip)
        if refused is not None:  # closed before a byte is read (issue #14 row 6)
            if self.admission.refused % 1000 == 1:
                log.warning("refusing RPC connections from %s: %s", peer_ip, refused)
            with trio.CancelScope(shield=True):
                await stream.aclose()
            return
        try:
            handlers = self.handlers(peer_ip)
            for name, fn in self.signals.handlers((peer_ip, int(peer[1])), (str(local[0]), int(local[1]))).items():
                handlers[name] = self._instrument(name, fn)
            await serve_connection(
                stream,
                handlers,
                peer=peer_ip,
                idle_timeout=self.limits.idle_timeout,
                frame_timeout=self.limits.frame_timeout,
            )
        finally:
            self.admission.release(peer_ip)

    # ---- UDP heartbeats ----------------------------------------------------------------------------

    def _drain(self, sock: socket.socket) -> tuple[list[Heartbeat], list[tuple[Any, int, str]]]:
        """Read every datagram that is ready (up to a batch), without blocking or switching tasks.

        Secured: each beat's (body, tag) is kept in `self._sealed` (same order) for `_verify`."""
        m = self.metrics
        secured = self.membership is not None
        sealed: list[tuple[bytes, bytes]] = []
        decode = _udp_req_decoder.decode
        recvfrom = sock.recvfrom
        stun = self.stun.on_heartbeat_port if self.stun is not None and sock in self.stun.sockets.values() else None
        beats: list[Heartbeat] = []
        meta: list[tuple[Any, int, str]] = []
        for _ in range(UDP_MAX_BATCH):
            try:
                data, addr = recvfrom(UDP_MAX_DATAGRAM)
            except BlockingIOError:
                break
            except OSError as e:  # e.g. ECONNREFUSED reported for an earlier reply: not fatal
                log.debug("udp recv: %s", e)
                continue
            m.udp_datagrams += 1
            try:
                if secured:
                    body, tag = unseal(data)
                    req = decode(body)
                    want = UDP_VERSION_AUTH
                else:
                    req, want = decode(data), UDP_VERSION
                if req.version != want:
                    raise V.bad(f"unsupported udp heartbeat version {req.version} (this tracker takes {want})")
                if len(req.node_id) > 64:
                    raise V.bad("node_id too long")
                holdings = V.holdings(req.holdings) if req.holdings is not None else None
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, TrackerError, ValueError) as e:
                if stun is not None and stun(data, addr):
                    continue
                m.udp_rejected += 1
                log.debug("udp datagram from %s rejected: %s", addr, e)
                continue
            beats.append(Heartbeat(req.node_id, holdings, req.session, parse_report(req.demand)))
            meta.append((addr, req.seq, req.node_id))
            if secured:
                sealed.append((body, tag))
        self._sealed = sealed
        return beats, meta

    async def _verify(
        self, beats: list[Heartbeat], meta: list[tuple[Any, int, str]], sealed: list[tuple[bytes, bytes]]
    ) -> tuple[list[Heartbeat], list[tuple[Any, int, str]]]:
        """Secured, remote store: keep the beats whose MAC checks under their session's key, newer than the last."""
        keys = await self.store.session_keys([(b.node_id, b.session or 0) for b in beats])
        ok_beats: list[Heartbeat] = []
        ok_meta: list[tuple[Any, int, str]] = []
        seqs = self._seqs
        for b, (addr, seq, nid), (body, tag), key in zip(beats, meta, sealed, keys, strict=True):
            if key is None:  # unknown or stale session: answered `known: false`, applies nothing
                ok_beats.append(Heartbeat(b.node_id, None, -1))
                ok_meta.append((addr, seq, nid))
                continue
            last = seqs.get(b.node_id)
            if not hmac.compare_digest(auth.mac_with(key, body), tag):
                self._refuse_udp(b.node_id, addr, "bad MAC")
                continue
            if last is not None and last[0] == b.session and seq <= last[1]:
                self._refuse_udp(b.node_id, addr, "replayed sequence number")
                continue
            if len(seqs) >= MAX_SEQ_ENTRIES:
                seqs.clear()  # bounded memory; a replay window opens only for datagrams already seen
            seqs[b.node_id] = (b.session or 0, seq)
            ok_beats.append(b)
            ok_meta.append((addr, seq, nid))
        return ok_beats, ok_meta

    def _refuse_udp(self, node_id: str, addr: Any, why: str) -> None:
        self.metrics.udp_forged += 1
        if self.membership is not None:
            self.membership.refuse("udp heartbeat", f"for node {node_id[:8]} from {addr}: {why}")

    def _memory_batch(
        self, sock: socket.socket, store: MemoryStore, io: BatchSocket | PlainSocket | None = None
    ) -> int:
        """The memory store's hot loop: datagram -> (MAC check) -> registry -> reply, no intermediate objects.

        `io` reads and answers datagrams a chunk at a time (tracker/udp_batch.py: recvmmsg/sendmmsg where
        the platform has them; recvfrom/sendto over `sock` otherwise).
        A node id is not validated here: an id that is not registered (malformed or not) is simply
        unknown, and registration (TCP) is where ids are checked. Holdings are validated when present.
        A datagram for an unknown node or session is answered `known: false` and applies nothing (the
        sender registers again). On a secured tracker every datagram also carries a MAC under its
        session's key: a wrong MAC or an old sequence number is dropped unanswered, counted
        (`udp_forged`) and logged — somebody tried to speak for that node — and the rest of the batch
        goes on.
        """
        if io is None:
            io = PlainSocket(sock)
        m = self.metrics
        reg = store.reg
        secured = self.membership is not None
        want = UDP_VERSION_AUTH if secured else UDP_VERSION
        tag_size = auth.HEARTBEAT_TAG_SIZE
        compare = hmac.compare_digest
        decode = _udp_req_decoder.decode
        encode_int = _udp_encoder.encode
        datagram = io.datagram
        reply_to = io.reply
        heartbeat = reg.heartbeat
        get_node = reg.nodes.get
        move_to_end = reg.nodes.move_to_end
        counters = reg.counters
        now = store.clock()
        stun = self.stun.on_heartbeat_port if self.stun is not None and sock in self.stun.sockets.values() else None
        # reply = msgpack [1, seq, known, interval, policy]: everything but seq is the same for the batch;
        # with global budgets set, a 6th element carries each node's own share (tracker/budgets.py)
        tail = _udp_encoder.encode(store.interval) + _udp_encoder.encode(reg.policy)
        known_tail, unknown_tail = b"\xc3" + tail, b"\xc2" + tail
        budgets = reg.budgets.active
        head = b"\x96\x01" if budgets else b"\x95\x01"
        share_of = reg.share_of
        # while some node has undelivered preheat orders, a 7th element: True for those nodes (else nil)
        undelivered = store.preheat.undelivered
        if undelivered:
            head = b"\x97\x01"
        n = fast = 0
        for _ in range(UDP_MAX_BATCH // VLEN):
            count = io.recv()
            n += count
            for i in range(count):
                data = datagram(i)
                body = data[:-tag_size] if secured else data
                try:
                    req = decode(body)
                    if req.version != want:
                        raise V.bad(f"unsupported udp heartbeat version {req.version} (this tracker takes {want})")
                    holdings = V.holdings(req.holdings) if req.holdings is not None else None
                except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, TrackerError) as e:
                    if stun is not None and stun(bytes(data), io.addr(i)):
                        continue
                    m.udp_rejected += 1
                    log.debug("udp datagram from %s rejected: %s", io.addr(i), e)
                    continue
                nid = req.node_id
                node = get_node(nid)
                if node is None or node.session != req.session or (secured and node.skey is None):
                    counters.unknown_heartbeats += 1
                    reply = head + encode_int(req.seq) + unknown_tail
                else:
                    if secured:  # the MAC step: the key schedule is done once per session (auth.heartbeat_mac)
                        mac = node.skey.copy()
                        mac.update(body)
                        if not compare(mac.digest(), data[-tag_size:]):
                            self._refuse_udp(nid, io.addr(i), "bad MAC")
                            continue
                        if req.seq <= node.seq:
                            self._refuse_udp(nid, io.addr(i), "replayed sequence number")
                            continue
                        node.seq = req.seq
                    demand = parse_report(req.demand) if req.demand is not None else None
                    if holdings is None and demand is None:  # the steady state, inlined: what Registry.heartbeat does
                        node.last_seen = now
                        node.heartbeats += 1
                        move_to_end(nid)
                        fast += 1
                    else:
                        heartbeat(nid, holdings, now, req.session, demand)
                    reply = head + encode_int(req.seq) + known_tail
                if budgets:
                    reply += encode_int(share_of(nid))
                if undelivered:
                    reply += (b"" if budgets else b"\xc0") + (b"\xc3" if nid in undelivered else b"\xc0")
                reply_to(i, reply)  # best effort: a reply the kernel refuses is a lost datagram (the node retries)
            io.flush()
            if count < VLEN:
                break
        counters.heartbeats += fast
        m.udp_datagrams += n
        return n

    def _reply(
        self, sock: socket.socket, meta: list[tuple[Any, int, str]], known: list[bool], policy: dict[str, Any]
    ) -> None:
        encode = _udp_encoder.encode
        interval = self.store.interval
        for (addr, seq, nid), k in zip(meta, known, strict=True):
            try:
                reply = UdpReply(UDP_VERSION, seq, k, interval, policy, self.store.share_of(nid))
                if self.store.preheat_pending(nid):
                    reply.preheat = True
                sock.sendto(encode(reply), addr)
            except (BlockingIOError, InterruptedError):
                pass  # send buffer full: the node retries over TCP; UDP replies are best effort by design
            except OSError as e:
                if e.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    raise

    async def serve_udp(self, sock: socket.socket, workers: int = 4) -> None:
        """Drain ready datagrams, apply them as one batch, answer each; never blocks on a send.

        With the memory store a batch is applied synchronously (no task switch at all). With a remote
        store, `workers` batches are in flight at once (one store round trip each) while the next
        batch accumulates in the socket buffer.
        """
        m = self.metrics
        store = self.store
        if isinstance(store, MemoryStore):
            io = open_batch(sock) or PlainSocket(sock)
            while True:
                await trio.lowlevel.wait_readable(sock)
                t0 = time.perf_counter()
                if self._memory_batch(sock, store, io):
                    m.udp_batches += 1
                    m.udp_batch_seconds.observe(time.perf_counter() - t0)
        send, recv = trio.open_memory_channel[
            tuple[float, list[Heartbeat], list[tuple[Any, int, str]], list[tuple[bytes, bytes]] | None]
        ](0)

        async def worker() -> None:
            warned = 0.0
            async for t0, beats, meta, sealed in recv:
                try:
                    if sealed is not None:
                        beats, meta = await self._verify(beats, meta, sealed)
                    known = await store.heartbeat_many(beats)
                    policy = await store.policy()
                except TrackerError as e:  # store down: no reply, nodes fall back to TCP and see the error
                    if time.monotonic() - warned > 10:
                        log.warning("udp heartbeats not applied: %s", e)
                        warned = time.monotonic()
                    continue
                self._reply(sock, meta, known, policy)
                m.udp_batches += 1
                m.udp_batch_seconds.observe(time.perf_counter() - t0)

        async with trio.open_nursery() as nursery:
            for _ in range(workers):
                nursery.start_soon(worker)
            while True:
                await trio.lowlevel.wait_readable(sock)
                t0 = time.perf_counter()
                beats, meta = self._drain(sock)
                if beats:
                    await send.send((t0, beats, meta, self._sealed if self.membership is not None else None))

    # ---- expiry ------------------------------------------------------------------------------------

    async def sweep(self) -> None:
        """Expire silent nodes every interval/10; refresh shared state (policy) every interval."""
        period = min(1.0, max(0.01, self.store.interval / 10))
        next_refresh = trio.current_time() + self.store.interval
        while True:
            await trio.sleep(period)
            if trio.current_time() >= next_refresh:
                next_refresh = trio.current_time() + self.store.interval
                try:
                    await self.store.refresh()
                    self.throughput.add(time.time(), *await self.store.use_totals())
                except TrackerError as e:
                    log.warning("store refresh failed: %s", e)
            try:
                gone = await self.store.expire()
            except TrackerError as e:
                log.warning("expiry sweep failed: %s", e)
                continue
            if gone:
                self.metrics.expired += len(gone)
                if len(gone) <= 5:
                    log.info("expired %d node(s): %s", len(gone), " ".join(gone))
                else:
                    log.info("expired %d nodes", len(gone))

    # ---- wiring ------------------------------------------------------------------------------------

    async def serve(
        self,
        host: str,
        port: int,
        udp: bool = True,
        *,
        task_status: trio.TaskStatus[tuple[int, int | None]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on TCP host:port (and UDP on the same port, and STUN); started with (tcp_port, udp_port)."""
        self.admission.max_total = incoming_cap(self.limits.max_connections, raise_fd_limit())
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.tcp_port = listeners[0].socket.getsockname()[1]
        udp_sock: socket.socket | None = None
        try:
            if udp:
                udp_sock = open_udp_socket(host, self.tcp_port)
                self.udp_port = udp_sock.getsockname()[1]
            if self.stun_settings is not None:
                self.stun = StunServer.open(self.stun_settings, host, self.tcp_port, udp_sock)
                self.metrics.stun = self.stun.responder
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._on_connection, listeners)
                nursery.start_soon(self.sweep)
                if udp_sock is not None:
                    nursery.start_soon(self.serve_udp, udp_sock)
                if self.stun is not None:
                    nursery.start_soon(self.stun.serve)
                task_status.started((self.tcp_port, self.udp_port))
        finally:
            if self.stun is not None:
                self.stun.close()
            if udp_sock is not None:
                udp_sock.close()
            for lst in listeners:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await lst.aclose()


def open_udp_socket(host: str, port: int) -> socket.socket:
    """The heartbeat socket: large buffers, so that bursts of heartbeats are not dropped."""
    return open_udp((host, port), buffer_bytes=8 << 20)


def fmt_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


__all__ = ["TrackerServer", "encode_udp_request", "decode_udp_reply", "UdpReply", "UdpRequest"]
