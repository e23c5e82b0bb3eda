"""The node daemon: wires catalog, swarms, peer listener, tracker heartbeats and the control API.

NAT detection (`p2pd/nat_detect.py`) probes the tracker's STUN server from the UDP twin of the peer
port and re-registers with what it finds, so a node behind NAT needs no configuration.

Everything runs under one nursery owned by `Daemon.run`; `request_stop()` (SIGTERM, `p2pd stop`)
leads to a graceful exit: goodbye to the tracker and to every peer, journals already on disk.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import math
import os
import shutil
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from p2pd import __version__, connections, paths, provenance
from p2pd.admission import Admission, incoming_cap, raise_fd_limit
from p2pd.auto_throttle import AutoThrottler, check_interface
from p2pd.cache import MAX_LEASE_TTL, Cache, Item, remove_files, stored_in
from p2pd.caller import Caller
from p2pd.config import DaemonConfig
from p2pd.connections import Connection, ConnectionPath
from p2pd.errors import ErrorCode, P2pdError
from p2pd.identity import NO_SECRET_HINT, node_identity
from p2pd.nat_detect import NatMonitor, NatStatus
from p2pd.protocol import bitfield as bits
from p2pd.protocol import demand, wire
from p2pd.protocol import manifest as mf
from p2pd.protocol.auth import ClusterSecret
from p2pd.protocol.ratelimit import Hierarchy, TokenBucket, unlimited
from p2pd.protocol.session import PeerClosed
from p2pd.rpc import Emit, RpcError, current_caller, serve_listeners
from p2pd.sd_notify import Notifier
from p2pd.snapshot import adopt as adopt_snapshot
from p2pd.snapshot import cleanup_stale as snapshot_cleanup
from p2pd.snapshot import snapshot_source
from p2pd.storage import Catalog, PieceStore, Record, StorageError, build_manifest, materialize
from p2pd.swarm import Swarm
from p2pd.tls import with_tls
from p2pd.tracker_client import TrackerClient
from p2pd.traversal import Traversal
from p2pd.trio_util import collapse_single

if TYPE_CHECKING:
    from p2pd.metrics import DaemonMetrics  # imported with --metrics-listen only (prometheus_client: ~0.1 s CPU)

log = logging.getLogger(__name__)
PROGRESS_EVERY = 0.5
NO_DISK_CHECK = 1 << 62  # "free bytes" that need no eviction for the disk
STATUS_EVERY = 10.0  # seconds between STATUS= lines to systemd (what `systemctl status` shows)


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.catalog = Catalog(config.data_dir)
        if config.join_secret is None and not config.insecure:
            raise P2pdError(ErrorCode.BAD_REQUEST, NO_SECRET_HINT)
        cluster = ClusterSecret(config.join_secret) if config.join_secret is not None else None
        self.identity = node_identity(config.data_dir, cluster)  # the node id is its key's (docs/security.md)
        if config.encrypt:  # every peer stream in TLS, bound to this identity (p2pd/tls.py)
            self.identity = with_tls(self.identity)
        self.node_id = self.identity.node_id
        self.socket_path = paths.socket_path(config.socket_path, config.data_dir)
        self.swarms: dict[str, Swarm] = {}
        self._starting: dict[str, trio.Event] = {}
        self._stop = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.tracker: TrackerClient | None = None
        self.listen_port = 0
        self.nat: NatMonitor | None = None
        self.egress: Hierarchy | None = None
        self.ingress: Hierarchy | None = None
        self._lock_fd = -1
        self.admission = Admission(config.max_incoming, config.max_incoming_per_addr)
        self._repairing: set[str] = set()  # cached artifacts being turned back into downloads
        self.notify = Notifier()  # systemd's Type=notify (a no-op without $NOTIFY_SOCKET)
        self.metrics: DaemonMetrics | None = None  # with --metrics-listen
        self.cache = Cache(self.catalog, config.cache_max, config.cache_low)
        self._room = trio.Lock()  # one download at a time decides what to evict for its room
        self._reserved: dict[str, tuple[str, int]] = {}  # room taken by downloads starting (not yet swarms)
        self.metrics_port = 0
        # direct TCP, raced with a punched TCP connection and a relay for peers behind NATs
        self.traversal = Traversal(
            self.identity,
            config.traversal,
            config.swarm,
            serves=self.swarms.__contains__,
            serve=self._serve_traversed,
            nat=lambda: self.nat.status if self.nat is not None else None,
            on_preheat=self._preheat_nudged,
            wanted=self._wants_connection,
        )
        self.connector = self.traversal.connector

    # -- lifecycle ----------------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._take_lock()
        fd_limit = raise_fd_limit()
        self.admission.max_total = incoming_cap(self.config.max_incoming, fd_limit)
        if self.admission.max_total < self.config.max_incoming:
            log.warning(
                "open-file limit %d: accepting at most %d peer connections (raise `ulimit -Hn` for more)",
                fd_limit,
                self.admission.max_total,
            )
        check_interface(self.config.auto_throttle)
        now = trio.current_time()
        # Two levels per direction: this node's configured cap, and the cap the tracker's cluster
        # policy gives this node (pushed with heartbeat replies, applied at once).
        self.policy_egress = unlimited(now)
        self.policy_ingress = unlimited(now)
        # A third egress level: this node's share of the tracker's global budgets (tracker/budgets.py),
        # pushed with every heartbeat reply while a budget is set.
        self.share_egress = unlimited(now)
        # preheat orders from the tracker already started (tracker/preheat.py): each runs once
        self._preheat_seen: set[str] = set()
        self._taking_preheat = False  # a nudge's preheat RPC in flight (nudges meanwhile add nothing)
        # A fourth, both ways: what automatic throttling leaves this node beside the other traffic on its link.
        self.auto_egress = unlimited(now)
        self.auto_ingress = unlimited(now)
        self.auto_throttle = AutoThrottler(self.config.auto_throttle, self.auto_egress, self.auto_ingress)
        # every source of a limit by the name `p2pd status` shows (limits)
        self.egress_sources = {
            "flag": TokenBucket(self.config.egress_limit or math.inf, now=now),
            "policy": self.policy_egress,
            "global share": self.share_egress,
            "auto": self.auto_egress,
        }
        self.ingress_sources = {
            "flag": TokenBucket(self.config.ingress_limit or math.inf, now=now),
            "policy": self.policy_ingress,
            "auto": self.auto_ingress,
        }
        self.egress = Hierarchy(*self.egress_sources.values())
        self.ingress = Hierarchy(*self.ingress_sources.values())
        # this node's share of the cross-zone budget: bytes to and from peers of other zones (both count,
        # as each leaves a zone) pass it as well as this node's own levels
        self.share_cross = unlimited(now)
        self.cross_egress = Hierarchy(*self.egress_sources.values(), self.share_cross)
        self.cross_ingress = Hierarchy(*self.ingress_sources.values(), self.share_cross)
        self._demand_mark = (now, 0, 0.0)
        self._cross_mark = (0, 0.0)
        peer_listeners = await self._bind_peer_listener()
        self.notify.status(f"listening on port {self.listen_port}; registering with the tracker")
        host = self.config.advertise or self.config.listen[0]
        if host in ("", "0.0.0.0", "::"):
            host = "0.0.0.0"  # the tracker fills in the address it sees us at
        async with TrackerClient(
            self.config.trackers,
            self.node_id,
            (host, self.listen_port),
            self.config.labels,
            __version__,
            identity=self.identity,
        ) as tc:
            self.tracker = tc
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._load_catalog(nursery)
                # trio.serve_listeners backs off on EMFILE and friends instead of failing
                nursery.start_soon(trio.serve_listeners, self._serve_incoming, peer_listeners)
                await nursery.start(self._heartbeats)
                await nursery.start(self.auto_throttle.run, self.config.listen[0], self.config.trackers)
                if self.config.nat_detect:
                    self.nat = NatMonitor(
                        (self.config.listen[0], self.listen_port),
                        check_every=self.config.nat_check_every,
                        reclassify_every=self.config.nat_reclassify_every,
                    )
                    await nursery.start(self.nat.run, lambda: tc.stun_server, self._report_nat)
                await nursery.start(self.traversal.run, tc)
                nursery.start_soon(self._restore_names_after_tracker_restart)
                if self.config.metrics_listen is not None:
                    from p2pd.metrics import DaemonMetrics, serve_metrics

                    self.metrics = DaemonMetrics(self)
                    mhost, mport = self.config.metrics_listen
                    try:
                        self.metrics_port = await nursery.start(serve_metrics, self.metrics, mhost, mport)
                    except OSError as e:
                        raise P2pdError(
                            ErrorCode.CONFLICT,
                            f"cannot serve metrics on {mhost}:{mport}: {e.strerror}; pick another --metrics-listen",
                        ) from e
                api_listener = self._bind_api()
                await nursery.start(serve_listeners, [api_listener], self._handlers())
                log.info(
                    "p2pd %s node %s serving peers on %s:%d, control socket %s%s",
                    __version__,
                    self.node_id[:8],
                    self.config.listen[0],
                    self.listen_port,
                    self.socket_path,
                    f", metrics on port {self.metrics_port}" if self.metrics is not None else "",
                )
                task_status.started()
                self.notify.ready(self._describe())
                nursery.start_soon(self.notify.watchdog)
                if self.notify.enabled:
                    nursery.start_soon(self._status_lines)
                await self._stop.wait()
                self.notify.stopping("stopping: saying goodbye to the tracker and peers")
                log.info("stopping: saying goodbye to tracker and peers")
                self.socket_path.unlink(missing_ok=True)
                with trio.move_on_after(self.config.goodbye_timeout):
                    try:
                        await tc.leave()
                    except RpcError as e:
                        log.warning("could not tell the tracker we leave: %s", e)
                with trio.move_on_after(self.config.goodbye_timeout):
                    async with trio.open_nursery() as n2:
                        for sw in list(self.swarms.values()):
                            n2.start_soon(sw.leave, "node shutting down")
                nursery.cancel_scope.cancel()
        for listener in peer_listeners:
            await listener.aclose()

    def _describe(self) -> str:
        """One line for `systemctl status`."""
        downloading = sum(1 for sw in self.swarms.values() if not sw.complete and sw.error is None)
        peers = sum(len(sw.conns) for sw in self.swarms.values())
        return (
            f"serving peers on port {self.listen_port}: {len(self.swarms)} artifacts "
            f"({downloading} downloading), {peers} peer connections"
        )

    async def _status_lines(self) -> None:
        while True:
            await trio.sleep(STATUS_EVERY)
            self.notify.status(self._describe())

    def _take_lock(self) -> None:
        self._lock_fd = os.open(self.config.data_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise P2pdError(
                ErrorCode.CONFLICT, f"another p2pd is already running with data dir {self.config.data_dir}"
            ) from e

    async def _bind_peer_listener(self) -> list[trio.SocketListener]:
        host, port = self.config.listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            await sock.bind((host, port))
        except OSError as e:
            sock.close()
            raise P2pdError(
                ErrorCode.CONFLICT, f"cannot listen on {host}:{port}: {e.strerror}; pick another --listen"
            ) from e
        sock.listen(self.config.listen_backlog)
        self.listen_port = sock.getsockname()[1]
        return [trio.SocketListener(sock)]

    def _bind_api(self) -> trio.SocketListener:
        path = self.socket_path
        path.unlink(missing_ok=True)  # we hold the data-dir lock, so no live daemon owns it
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Owner and group only: the API can publish any file the daemon can read. The socket is
        # created with that mode (umask around bind), never briefly open to all before a chmod.
        # umask is per process; nothing else creates files while the daemon starts up here.
        old_umask = os.umask(0o117)
        try:
            raw.bind(str(path))
        finally:
            os.umask(old_umask)
        raw.listen(128)
        return trio.SocketListener(trio.socket.from_stdlib_socket(raw))

    async def _heartbeats(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        assert self.tracker is not None
        # A node booting before its tracker (or during a tracker restart) waits for it a while
        # instead of exiting; a wrong address still fails clearly once the wait is over.
        deadline = trio.current_time() + self.config.tracker_wait
        while True:
            try:
                await self.tracker.register()
                break
            except RpcError as e:
                if trio.current_time() >= deadline:
                    raise
                log.warning("%s; retrying for up to %.0f s more", e, deadline - trio.current_time())
                await trio.sleep(1.0)
        await self.tracker.run_heartbeats(
            self.holdings,
            on_policy=self._apply_policy,
            on_share=self._apply_share,
            get_demand=self._demand,
            on_preheat=self._start_preheat,
            share_grace=self.config.share_grace,
            task_status=task_status,
        )

    async def _restore_names_after_tracker_restart(self) -> None:
        """An in-memory tracker that restarted has forgotten names: give back the ones we hold.

        Only names the tracker does not know are published again, so a tag moved meanwhile (on a
        Redis-backed tracker, say) is never moved back.
        """
        assert self.tracker is not None
        seen = self.tracker.registrations
        while True:
            await trio.sleep(0.5)
            if self.tracker.registrations == seen:
                continue
            seen = self.tracker.registrations
            for rec in self.catalog.complete_records():
                if not mf.NAME_RE.match(rec.name):
                    continue
                try:
                    await self.tracker.resolve(rec.name)
                except RpcError as e:
                    if e.code != ErrorCode.NOT_FOUND:
                        break  # tracker unreachable again: retry at the next registration
                    signed = provenance.load(self.config.data_dir, rec.name)
                    if signed is not None and signed.artifact_id != rec.artifact_id:
                        signed = None
                    if signed is None and self.identity.cluster is not None:
                        continue  # a secured tracker takes a name back only with its publisher's signature
                    try:
                        await self.tracker.publish(
                            rec.name, mf.encode(rec.manifest), signed.params() if signed is not None else None
                        )
                        log.info("tracker had forgotten %s: published it again", rec.name)
                    except RpcError as e2:
                        log.warning("could not publish %s again: %s", rec.name, e2)

    async def _report_nat(self, status: NatStatus) -> bool:
        """Tell the tracker this node's NAT type and mapped address (False: retried at the next check)."""
        assert self.tracker is not None
        try:
            await self.tracker.update_nat(status.registration())
        except RpcError as e:
            log.warning("could not report the NAT type to the tracker (will retry): %s", e)
            return False
        return True

    def holdings(self) -> dict[str, float]:
        return {aid: sw.progress for aid, sw in self.swarms.items() if sw.error is None}

    def _apply_policy(self, policy: dict[str, Any]) -> None:
        """Apply the tracker's per-node caps (bytes/s; absent or null = no cluster cap)."""
        now = trio.current_time()
        for key, bucket in (("egress_limit", self.policy_egress), ("ingress_limit", self.policy_ingress)):
            value = policy.get(key)
            rate = float(value) if isinstance(value, int | float) and value > 0 else math.inf
            if rate != bucket.rate:
                bucket.set_rate(rate, now=now)
                log.info("cluster policy: %s %s", key, "none" if math.isinf(rate) else f"{rate / 1e6:.1f} MB/s")

    def _start_preheat(self, orders: list[dict[str, Any]]) -> None:
        """Start each new preheat order in the background, as `p2pd fetch NAME:TAG` would (into the cache)."""
        assert self._nursery is not None
        for order in orders:
            if order["order"] in self._preheat_seen:
                continue
            self._preheat_seen.add(order["order"])
            log.info("preheat %s (order %s): fetching", order["name"], order["order"])
            self._nursery.start_soon(self._preheat, order)

    def _preheat_nudged(self) -> None:
        """The tracker pushed "orders wait" over the signal channel: take them now instead of after the next
        heartbeat (an interval of up to --interval seconds lost before a preheat starts). A nudge that
        fails costs nothing: the heartbeat reply still says the orders wait."""
        if self._nursery is None or self.tracker is None or self._taking_preheat:
            return
        self._taking_preheat = True
        self._nursery.start_soon(self._take_preheat_orders)

    async def _take_preheat_orders(self) -> None:
        assert self.tracker is not None
        try:
            with trio.fail_after(max(5.0, self.tracker.call_timeout)):
                orders = await self.tracker.preheat_orders()
        except (RpcError, trio.TooSlowError) as e:
            log.info("preheat orders not taken after the tracker's nudge (the next heartbeat tries again): %s", e)
            return
        finally:
            self._taking_preheat = False
        self._start_preheat(orders)

    async def _preheat(self, order: dict[str, Any]) -> None:
        """One preheat fetch; a failure is logged and reported to the tracker (`admin preheat status`)."""
        assert self.tracker is not None

        async def quiet(_: dict[str, Any]) -> None:
            return None

        try:
            await self._fetch({"name": order["name"]}, quiet)
            log.info("preheat %s (order %s): complete", order["name"], order["order"])
            return
        except RpcError as e:
            error = f"{e.code.value}: {e.message}"
        except Exception as e:  # a background task: whatever went wrong is logged and reported, never fatal
            log.exception("preheat %s (order %s)", order["name"], order["order"])
            error = f"{type(e).__name__}: {e}"
        log.warning("preheat %s (order %s) failed: %s", order["name"], order["order"], error)
        try:
            with trio.fail_after(max(5.0, self.tracker.call_timeout)):
                await self.tracker.preheat_report(order["order"], error)
        except (RpcError, trio.TooSlowError) as e:
            log.warning("could not report the preheat failure to the tracker: %s", e)

    def _apply_share(self, share: list[float | None] | None) -> None:
        """Apply this node's share of the global budgets at once (None: no budget, own limits only)."""
        cross = share[1] if share is not None and share[1] is not None else math.inf
        if cross != self.share_cross.rate:
            self.share_cross.set_rate(cross, now=trio.current_time())
        rate = share[0] if share is not None and share[0] is not None else math.inf
        if rate != self.share_egress.rate:
            was = self.share_egress.rate
            self.share_egress.set_rate(rate, now=trio.current_time())
            if rate == 0 or was == 0 or math.isinf(rate) or math.isinf(was):
                what = (
                    "paused"
                    if rate == 0
                    else "none (own limits)"
                    if math.isinf(rate)
                    else f"share {rate / 1e6:.2f} MB/s"
                )
                log.info("global budget: %s", what)

    def _demand(self) -> list[float]:
        """What this node reports for the global budgets: [egress, cross, egress_rate, cross_rate] bytes/s.

        A node held back by its limits (it waited on a bucket and used all of it) asks for all its own
        limits allow, so a capped node reveals that it wants more; one that is not asks for a little
        more than it sends, so what it does not use goes to the others (p2pd/protocol/demand.py)."""
        assert self.egress is not None
        now = trio.current_time()
        t0, reserved0, waited0 = self._demand_mark
        c_reserved0, c_waited0 = self._cross_mark
        dt = max(now - t0, 1e-3)
        cross_reserved = self.cross_egress.reserved + self.cross_ingress.reserved
        cross_waited = self.cross_egress.waited + self.cross_ingress.waited
        reserved = self.egress.reserved + self.cross_egress.reserved
        waited = self.egress.waited + self.cross_egress.waited
        rate = max(0.0, (reserved - reserved0) / dt)
        cross_rate = max(0.0, (cross_reserved - c_reserved0) / dt)
        self._demand_mark = (now, reserved, waited)
        self._cross_mark = (cross_reserved, cross_waited)
        own = min(self.egress_sources["flag"].rate, self.policy_egress.rate)
        # what waits on the limits right now: a share too small to send it within the interval is a hold too
        backlog, cross_backlog = self.egress.backlog(now), self.share_cross.backlog(now)
        want = demand.want(rate, waited - waited0, dt, self.egress.rate, own, backlog)
        cross_want = demand.want(
            cross_rate, cross_waited - c_waited0, dt, self.share_cross.rate, math.inf, cross_backlog
        )
        return [want, cross_want, rate, cross_rate]

    def limits(self) -> dict[str, Any]:
        """Per direction: every source's limit (bytes/s, None = none), the effective one (the lowest), which
        source sets it and why, in words (`p2pd status`: `upload limit: 1.5 MB/s (auto: other traffic ...)`)."""
        auto = self.auto_throttle.status()
        why_of = {
            "flag": "--{}-limit",
            "policy": "the tracker's policy for this node",
            "global share": "this node's share of the cluster's global budget",
        }
        out: dict[str, Any] = {}
        for direction, sources in (("egress", self.egress_sources), ("ingress", self.ingress_sources)):
            by, bucket = min(sources.items(), key=lambda kv: kv[1].rate)
            if math.isinf(bucket.rate):
                why = "no limit"
            elif by == "auto":
                why = f"auto: {auto.get(direction, {}).get('why', '')}"
            else:
                why = why_of[by].format(direction)
            out[direction] = {
                "limit": _finite(bucket.rate),
                "by": None if math.isinf(bucket.rate) else by,
                "why": why,
                "sources": {name: _finite(b.rate) for name, b in sources.items()},
            }
        return out

    async def _announce(self) -> None:
        """Tell the tracker about a change at once instead of at the next interval."""
        assert self.tracker is not None
        try:
            await self.tracker.beat(self.holdings())
        except (RpcError, OSError) as e:
            log.warning("could not announce to the tracker now (will at the next heartbeat): %s", e)

    # -- swarms ---------------------------------------------------------------------------------------
    def _new_swarm(self, aid: str, name: str, m: mf.Manifest, store: PieceStore, have: int, **kw: Any) -> Swarm:
        return Swarm(
            node_id=self.node_id,
            artifact_id=aid,
            name=name,
            manifest=m,
            store=store,
            have=have,
            catalog=self.catalog,
            config=self.config.swarm,
            egress=self.egress,
            ingress=self.ingress,
            connector=self.connector,
            find_peers=self._find_peers,
            on_complete=self._on_complete,
            zone=self.config.labels.get("zone", ""),
            cross_limits=(self.cross_egress, self.cross_ingress),
            on_damaged=self._on_damaged,
            upgrader=self.traversal.upgrader,
            **kw,
        )

    async def _find_peers(self, aid: str) -> list[dict[str, Any]]:
        assert self.tracker is not None
        return await self.tracker.peers(aid, max=self.config.swarm.peers_per_lookup)

    def _on_complete(self, sw: Swarm) -> None:
        assert self._nursery is not None
        self.cache.index.touch(sw.artifact_id, time.time())
        self._nursery.start_soon(self._announce)

    def _on_damaged(self, sw: Swarm, index: int) -> None:
        """A piece we held is corrupt on disk: tell the tracker now; a cached copy is fetched again."""
        assert self._nursery is not None
        self._nursery.start_soon(self._announce)
        if sw.complete and sw.store.root.parent == self.catalog.cache and sw.artifact_id not in self._repairing:
            self._repairing.add(sw.artifact_id)
            self._nursery.start_soon(self._repair, sw)
        elif sw.complete:
            log.error(
                "%s: the published files under %s are corrupt: republish from a good copy", sw.name, sw.store.root
            )

    async def _repair(self, sw: Swarm) -> None:
        """Re-fetch the corrupt pieces of a cached artifact: it becomes a download resuming from the rest."""
        aid = sw.artifact_id
        try:
            sw.stop()
            with trio.move_on_after(self.config.failed_swarm_wait):
                await sw.stopped.wait()
            await sw.leave("repairing a corrupt piece")
            if self.swarms.get(aid) is sw:
                del self.swarms[aid]
            good = sw.have_mask
            try:
                moved = await trio.to_thread.run_sync(self.catalog.reopen_for_repair, aid, sw.name, good)
            except OSError as e:
                log.error("%s: cannot reopen the cached copy for repair: %s", sw.name, e)
                return
            if not moved:
                return
            log.info("%s: fetching %d corrupt piece(s) again", sw.name, sw.n - good.bit_count())
            try:
                await self._get_or_start(aid, sw.name, sw.manifest)
            except RpcError as e:
                log.error("%s: repair download could not start: %s", sw.name, e)
        finally:
            self._repairing.discard(aid)

    # -- cache (p2pd/cache.py decides; here it is done) ---------------------------------------------------
    def cache_items(self) -> list[Item]:
        starting = [
            Item(aid, name, size, False, True, True)
            for aid, (name, size) in self._reserved.items()
            if aid not in self.swarms
        ]
        return starting + [
            Item(
                aid,
                sw.name,
                sw.manifest.total_size,
                sw.complete,
                stored_in(self.catalog, sw.store.root),
                self.cache.busy[aid] > 0,
            )
            for aid, sw in self.swarms.items()
        ]

    async def _make_room(self, aid: str, m: mf.Manifest) -> None:
        """Evict what must go before a download of `m` starts (cap, then free disk); DISK_FULL if it cannot fit."""
        if self.catalog.staging_root(aid).exists():
            free = NO_DISK_CHECK  # a resumed download's files are already allocated
        else:
            free = await trio.to_thread.run_sync(lambda: shutil.disk_usage(self.config.data_dir).free)
        try:
            victims = self.cache.plan(self.cache_items(), m.total_size, free, trio.current_time())
        except P2pdError as e:
            raise RpcError(e.code, e.message) from None
        for v in victims:
            log.info("evicting %s (%s, %d bytes) to make room for %s", v.name, v.artifact_id[:12], v.size, aid[:12])
            await self._remove(v.artifact_id, "evicted from the cache", evicted=True)
        if victims:
            await self._announce()  # the tracker stops listing us as a holder now, not at the next heartbeat

    async def _remove(self, aid: str, reason: str, *, evicted: bool = False) -> None:
        """Stop serving an artifact (GOODBYE after the piece in flight), then delete its files from the data dir."""
        sw = self.swarms.pop(aid, None)
        if sw is None:
            return
        stored = stored_in(self.catalog, sw.store.root)
        if not sw.complete:
            sw.fail(reason, ErrorCode.NOT_FOUND)  # a fetch waiting for it ends with this reason
            with trio.move_on_after(self.config.failed_swarm_wait):
                await sw.stopped.wait()  # a write in a worker thread finishes before its files go
            await sw.leave(reason)
        else:
            await sw.leave(reason)
            sw.stop()
            with trio.move_on_after(self.config.failed_swarm_wait):
                await sw.stopped.wait()
        await trio.to_thread.run_sync(functools.partial(remove_files, self.catalog, aid, stored=stored))
        self.cache.index.forget(aid)
        if evicted:
            self.cache.evictions += 1
            self.cache.evicted_bytes += sw.manifest.total_size
            if self.metrics is not None:
                self.metrics.evictions.inc()
                self.metrics.evicted_bytes.inc(sw.manifest.total_size)

    def _local(self, ref: str) -> Swarm:
        """The local artifact a user means by NAME:TAG, an artifact id, or a unique id prefix (6+ characters)."""
        ref = ref.strip()
        if ref in self.swarms:
            return self.swarms[ref]
        found = [sw for sw in self.swarms.values() if sw.name == ref]
        if not found and len(ref) >= 6 and all(c in "0123456789abcdef" for c in ref):
            found = [sw for sw in self.swarms.values() if sw.artifact_id.startswith(ref)]
        if not found:
            raise RpcError(ErrorCode.NOT_FOUND, f"{ref} is not on this node (`p2pd ls` lists what is)")
        if len(found) > 1:
            ids = ", ".join(sw.artifact_id[:12] for sw in found)
            raise RpcError(ErrorCode.CONFLICT, f"{ref} means several artifacts here ({ids}): give the id")
        return found[0]

    async def api_ls(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        now = trio.current_time()
        items = {i.artifact_id: i for i in self.cache_items()}
        out = []
        for aid, sw in self.swarms.items():
            st = "complete" if sw.complete else ("failed" if sw.error else "downloading")
            out.append(
                {
                    "artifact_id": aid,
                    "name": sw.name,
                    "kind": sw.manifest.kind,
                    "size": sw.manifest.total_size,
                    "state": st,
                    "seeding": sw.complete,
                    "path": str(sw.record().path if sw.complete else sw.store.root),
                    **self.cache.describe(items[aid], now),
                }
            )
        out.sort(key=lambda a: -(a["last_used"] or 0))
        return {
            "artifacts": out,
            "cache_bytes": self.cache.used(list(items.values())),
            "cache_max": self.cache.max_bytes,
            "evictions": self.cache.evictions,
        }

    async def api_rm(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        sw = self._local(str(params.get("ref", "")))
        aid, force = sw.artifact_id, bool(params.get("force"))
        holders = self.cache.leases.holders(aid, trio.current_time())
        if not force and (self.cache.index.get(aid).pinned or holders or self.cache.busy[aid]):
            why = (
                "pinned"
                if self.cache.index.get(aid).pinned
                else f"leased by {', '.join(holders)}"
                if holders
                else "in use"
            )
            raise RpcError(ErrorCode.CONFLICT, f"{sw.name} ({aid[:12]}) is {why}: unpin it first, or rm --force")
        stored = stored_in(self.catalog, sw.store.root)
        await self._remove(aid, "removed by p2pd rm")
        await self._announce()
        return {"artifact_id": aid, "name": sw.name, "freed": sw.manifest.total_size if stored else 0}

    async def api_pin(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        sw = self._local(str(params.get("ref", "")))
        pinned = bool(params.get("pinned", True))
        self.cache.index.set_pinned(sw.artifact_id, pinned)
        return {"artifact_id": sw.artifact_id, "name": sw.name, "pinned": pinned}

    async def api_lease(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """A local job uses an artifact: keep it from eviction for `ttl` seconds (renew by asking again)."""
        sw = self._local(str(params.get("ref", "")))
        holder = str(params.get("holder", ""))
        if not holder or len(holder) > 200:
            raise RpcError(ErrorCode.BAD_REQUEST, "lease needs a holder (a name for the job, at most 200 characters)")
        ttl = params.get("ttl", 600)
        if not isinstance(ttl, int | float) or isinstance(ttl, bool):
            raise RpcError(ErrorCode.BAD_REQUEST, f"lease ttl must be a number of seconds, got {ttl!r}")
        if params.get("release"):
            return {"artifact_id": sw.artifact_id, "released": self.cache.leases.release(sw.artifact_id, holder)}
        try:
            self.cache.leases.hold(sw.artifact_id, holder, float(ttl), trio.current_time())
        except P2pdError as e:
            raise RpcError(e.code, e.message) from None
        self.cache.index.touch(sw.artifact_id, time.time())
        return {"artifact_id": sw.artifact_id, "holder": holder, "ttl": ttl}

    async def _load_catalog(self, nursery: trio.Nursery) -> None:
        from p2pd import envpack

        for leftover in await trio.to_thread.run_sync(envpack.cleanup_stale, self.config.data_dir / "envs"):
            log.info("removed an env unpack interrupted by a crash: %s", leftover)
        recorded = {rec.artifact_id for rec in self.catalog.complete_records()}
        for leftover in await trio.to_thread.run_sync(snapshot_cleanup, self.catalog.published, recorded):
            log.info("removed a publish interrupted by a crash: %s", leftover)
        for rec in self.catalog.complete_records():
            if not rec.root.exists():
                log.warning("%s: %s is gone; no longer seeding it", rec.name, rec.root)
                continue
            store = PieceStore(rec.manifest, rec.root, writable=False, max_open=self.config.open_files_per_artifact)
            sw = self._new_swarm(rec.artifact_id, rec.name, rec.manifest, store, bits.full(rec.manifest.num_pieces))
            self.swarms[rec.artifact_id] = sw
            await nursery.start(sw.run)
        for aid in self.catalog.staged_ids():
            if aid in self.swarms:
                continue
            m = self.catalog.load_manifest(aid)
            if m is None:
                continue
            name = self.catalog.staged_name(aid) or aid[:12]
            try:
                await self._start_download(aid, name, m)
            except RpcError as e:
                log.error("cannot resume %s: %s", name or aid[:12], e)

    async def _start_download(self, aid: str, name: str, m: mf.Manifest) -> Swarm:
        assert self._nursery is not None
        self.catalog.save_manifest(aid, m)
        self.catalog.save_staged_name(aid, name)
        root = self.catalog.staging_root(aid)
        store = PieceStore(m, root, writable=True, max_open=self.config.open_files_per_artifact)
        journal = self.catalog.journal(aid, m)

        def prepare() -> int:
            recorded = journal.load()
            store.preallocate()
            have = store.verify_existing(recorded) if recorded else 0
            journal.open(have)
            return have

        try:
            have = await trio.to_thread.run_sync(prepare)
        except StorageError as e:
            store.close()
            journal.close()
            raise RpcError(e.code, e.message) from e
        except OSError as e:  # every path closes the store: a failed fetch must not keep its fds
            store.close()
            journal.close()
            raise RpcError(ErrorCode.STORAGE, f"cannot prepare the download of {name} in {root}: {e}") from e
        except BaseException:
            store.close()
            journal.close()
            raise
        if have:
            log.info("%s: resuming with %d of %d pieces already verified", name, have.bit_count(), m.num_pieces)
        sw = self._new_swarm(aid, name, m, store, have, journal=journal, resumed_pieces=have.bit_count())
        self.swarms[aid] = sw
        self._nursery.start_soon(self._announce)  # others fetching it now find us at their next lookup
        await self._nursery.start(sw.run)
        return sw

    async def _get_or_start(self, aid: str, name: str, m: mf.Manifest) -> Swarm:
        while True:
            sw = self.swarms.get(aid)
            if sw is not None and sw.error is not None and not sw.complete:
                await self._forget_failed(sw)  # start again: resumes from the pieces it verified
                continue
            if sw is not None:
                return sw
            ev = self._starting.get(aid)
            if ev is None:
                break
            await ev.wait()
        ev = self._starting[aid] = trio.Event()
        try:
            async with self._room:
                await self._make_room(aid, m)
                self._reserved[aid] = (name, m.total_size)  # counted by the next download's room check
            try:
                return await self._start_download(aid, name, m)
            finally:
                del self._reserved[aid]
        finally:
            del self._starting[aid]
            ev.set()

    async def _forget_failed(self, sw: Swarm) -> None:
        with trio.move_on_after(self.config.failed_swarm_wait):
            await sw.stopped.wait()  # a write in a worker thread finishes before its files are closed
        if self.swarms.get(sw.artifact_id) is sw:
            del self.swarms[sw.artifact_id]
        await sw.leave("download stopped")
        log.info("%s: retrying the download that stopped (%s)", sw.name, sw.error)

    async def _serve_incoming(self, stream: trio.SocketStream) -> None:
        """One accepted connection: handshake, then the swarm of the artifact it names runs it."""
        try:
            peer = stream.socket.getpeername()
            host, addr = str(peer[0]), f"{peer[0]}:{peer[1]}"
        except OSError:
            host = addr = "unknown"
        refused = self.admission.admit(host)
        if refused is not None:  # closed before reading a byte: refusing must cost less than accepting
            if self.admission.refused % 1000 == 1:
                log.warning(
                    "refusing incoming connections from %s: %s (%d refused so far)",
                    addr,
                    refused,
                    self.admission.refused,
                )
            with trio.CancelScope(shield=True):
                await stream.aclose()
            return
        try:
            await self._serve_admitted(stream, addr)
        finally:
            self.admission.release(host)

    async def _serve_admitted(self, stream: trio.SocketStream, addr: str) -> None:
        async with stream:
            try:
                conn = await connections.accept(
                    stream,
                    addr,
                    self.identity,
                    handshake_timeout=self.config.swarm.handshake_timeout,
                    serves=self.swarms.__contains__,
                )
            except PeerClosed as e:  # it named an artifact we do not serve (it was told so)
                log.debug("incoming connection from %s closed: %s", addr, e)
                return
            except (OSError, trio.TooSlowError, trio.BrokenResourceError, wire.ProtocolError) as e:
                log.info("incoming connection from %s dropped: %s", addr, e)
                return
            sw = self.swarms.get(conn.artifact_id)
            if sw is not None:
                await sw.serve(conn)

    def _wants_connection(self, artifact_id: str, remote_id: str, path: ConnectionPath, initiator: str) -> bool:
        """Would the swarm for `artifact_id` keep that connection to `remote_id` (Traversal's answers stop once
        not)? No swarm: an answer would be turned away on arrival anyway."""
        sw = self.swarms.get(artifact_id)
        return sw is not None and sw.keeps(remote_id, path, initiator)

    async def _serve_traversed(self, conn: Connection) -> None:
        """A connection that arrived by a punch or through a relay: served like an accepted one."""
        try:
            sw = self.swarms.get(conn.artifact_id)
            if sw is not None:
                await sw.serve(conn)
        finally:
            with trio.CancelScope(shield=True):
                await conn.aclose()

    # -- control API ----------------------------------------------------------------------------------
    def _handlers(self) -> dict[str, Any]:
        return {
            "status": self.api_status,
            "publish": self.api_publish,
            "fetch": self.api_fetch,
            "ls": self.api_ls,
            "rm": self.api_rm,
            "pin": self.api_pin,
            "lease": self.api_lease,
            "shutdown": self.api_shutdown,
        }

    async def api_status(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        arts = [sw.status() for sw in self.swarms.values()]
        return {
            "node_id": self.node_id,
            "listen": f"{self.config.listen[0]}:{self.listen_port}",
            "metrics_port": self.metrics_port or None,
            "version": __version__,
            "artifacts": arts,
            "egress_limit": self.config.egress_limit,
            "ingress_limit": self.config.ingress_limit,
            "policy_egress_limit": _finite(self.policy_egress.rate),
            "policy_ingress_limit": _finite(self.policy_ingress.rate),
            "limits": self.limits(),
            "auto_throttle": self.auto_throttle.status(),
            "nat": (self.nat.status if self.nat is not None else NatStatus(state="off")).to_json(trio.current_time()),
            "traversal": self.traversal.status(),
            "incoming": {
                "connections": self.admission.total,
                "max": self.admission.max_total,
                "refused": self.admission.refused,
            },
        }

    async def api_shutdown(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        self.request_stop()
        return {}

    async def api_publish(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        assert self.tracker is not None and self._nursery is not None
        path = Path(str(params["path"]))
        name = str(params["name"])
        kind = str(params.get("kind", "files"))
        meta = {str(k): str(v) for k, v in (params.get("meta") or {}).items()}
        if not path.is_absolute():
            raise RpcError(ErrorCode.BAD_REQUEST, f"path must be absolute, got {path}")
        try:
            mf.validate_name(name)
        except mf.ManifestError as e:
            raise RpcError(ErrorCode.BAD_REQUEST, str(e)) from None
        caller = current_caller()
        snapshot: Path | None = None  # publish only what the caller itself could read, pinned by inode
        source = path
        if caller is not None and not caller.privileged:
            snapshot, source = await trio.to_thread.run_sync(_snapshot_for, caller, path, self.catalog.published)
        done = [0, 0]

        def on_progress(d: int, t: int) -> None:
            done[0], done[1] = d, t

        async def build() -> tuple[mf.Manifest, Path]:
            return await trio.to_thread.run_sync(
                lambda: build_manifest(source, kind=kind, meta=meta, progress=on_progress)
            )

        try:
            try:
                m, root = await _with_progress(
                    build(), lambda: emit({"phase": "hashing", "bytes_done": done[0], "size": done[1]})
                )
            except (StorageError, mf.ManifestError) as e:
                raise RpcError(ErrorCode.BAD_REQUEST, str(e).replace(str(source), str(path))) from None
            except PermissionError as e:
                raise RpcError(ErrorCode.BAD_REQUEST, f"cannot read {e.filename}: permission denied") from None
            aid = mf.artifact_id(m)
            if snapshot is not None and aid not in self.swarms:
                root = await trio.to_thread.run_sync(adopt_snapshot, snapshot, self.catalog.published, aid)
                snapshot = None
        finally:
            if snapshot is not None:  # failed, or this node has these bytes already
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(functools.partial(shutil.rmtree, snapshot, ignore_errors=True))
        signed = provenance.sign(self.identity.key, name, aid, int(time.time()))
        self.catalog.save_manifest(aid, m)
        if aid not in self.swarms:
            self.catalog.mark_complete(aid, name, root, published=True)
            store = PieceStore(m, root, writable=False, max_open=self.config.open_files_per_artifact)
            sw = self._new_swarm(aid, name, m, store, bits.full(m.num_pieces))
            self.swarms[aid] = sw
            await self._nursery.start(sw.run)
        try:
            await self.tracker.publish(name, mf.encode(m), signed.params())
        except RpcError as e:
            raise RpcError(e.code, f"hashed {path} but the tracker refused to publish it: {e.message}") from None
        provenance.save(self.config.data_dir, signed)
        await self._announce()
        return {"artifact_id": aid, "name": name, "size": m.total_size, "pieces": m.num_pieces}

    async def api_fetch(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        t0 = trio.current_time()
        try:
            result = await self._fetch(params, emit)
        except RpcError as e:
            if self.metrics is not None:
                self.metrics.fetch_failures.labels(e.code.name.lower()).inc()
            raise
        if self.metrics is not None:
            self.metrics.fetch_seconds.observe(trio.current_time() - t0)
        return result

    async def _fetch(self, params: dict[str, Any], emit: Emit) -> dict[str, Any]:
        assert self.tracker is not None
        name = str(params["name"])
        dest = params.get("dest")
        caller = current_caller()
        if dest and caller is not None:  # place files only where the caller itself could
            dest_path = Path(str(dest))
            if dest_path.is_absolute():
                await trio.to_thread.run_sync(_check_caller, caller.check_writable_dest, dest_path)
        log.debug("fetch %s: resolving", name)
        lease = _lease_param(params.get("lease"))
        aid, m = await self._resolve(name)
        log.debug("fetch %s: resolved to %s", name, aid[:12])
        self.cache.busy[aid] += 1  # not evicted while this request uses it
        try:
            result = await self._fetch_resolved(aid, m, name, dest, emit)
            if lease is not None:  # the caller's job uses it from now: no eviction gap in between
                self.cache.leases.hold(aid, lease[0], lease[1], trio.current_time())
            return result
        finally:
            self.cache.busy[aid] -= 1
            if not self.cache.busy[aid]:
                del self.cache.busy[aid]

    async def _fetch_resolved(self, aid: str, m: mf.Manifest, name: str, dest: Any, emit: Emit) -> dict[str, Any]:
        sw = await self._get_or_start(aid, name, m)
        log.debug("fetch %s: swarm running", name)

        def progress() -> Any:
            st = sw.status()
            return emit(
                {
                    "phase": "downloading",
                    "bytes_done": st["bytes_done"],
                    "size": st["size"],
                    "peers": st["peers"],
                    "down_rate": st["down_rate"],
                    "pieces_done": st["pieces_done"],
                    "pieces_total": st["pieces_total"],
                    "resumed_pieces": st["resumed_pieces"],
                }
            )

        while not sw.done.is_set():
            if sw.error:
                raise RpcError(sw.error_code, sw.error)
            await progress()
            with trio.move_on_after(PROGRESS_EVERY):
                await sw.done.wait()
        await progress()
        self.cache.index.touch(aid, time.time())
        rec = sw.record()
        result: dict[str, Any] = {
            "artifact_id": aid,
            "name": name,
            "kind": m.kind,
            "path": str(rec.path),
            "meta": dict(m.meta),
            "size": m.total_size,
        }
        if m.kind == "env":
            result["env_dir"] = await self._unpack_env(rec, emit)
        if dest:
            dest_path = Path(str(dest))
            if not dest_path.is_absolute():
                raise RpcError(ErrorCode.BAD_REQUEST, f"dest must be absolute, got {dest_path}")
            try:
                result["path"] = str(await trio.to_thread.run_sync(materialize, rec, dest_path))
            except StorageError as e:
                raise RpcError(e.code, f"cannot place the artifact at {dest_path}: {e}") from None
            except OSError as e:
                raise RpcError(ErrorCode.STORAGE, f"cannot place the artifact at {dest_path}: {e}") from None
        return result

    async def _unpack_env(self, rec: Record, emit: Emit) -> str:
        from p2pd import envpack  # optional dependency (conda-pack) only needed for envs

        done = [0, rec.manifest.total_size]

        def on_progress(d: int, t: int) -> None:
            done[0], done[1] = d, t

        async def unpack() -> Path:
            return await trio.to_thread.run_sync(
                envpack.materialize,
                rec.path,
                self.config.data_dir / "envs",
                rec.artifact_id,
                dict(rec.manifest.meta),
                on_progress,
                self.config.unpack_user,
            )

        try:
            env_dir = await _with_progress(
                unpack(), lambda: emit({"phase": "unpacking", "bytes_done": done[0], "size": done[1]})
            )
        except envpack.EnvPackError as e:
            raise RpcError(ErrorCode.ENV, str(e)) from None
        return str(env_dir)

    async def _resolve(self, name: str) -> tuple[str, mf.Manifest]:
        assert self.tracker is not None
        if mf.ID_RE.match(name):
            local = self.catalog.load_manifest(name)
            if local is not None:
                return name, local
            try:
                data = await self.tracker.manifest(name)
            except RpcError as e:
                raise _explain(e, name) from None
            return name, mf.decode_checked(data, name)
        try:
            mf.validate_name(name)
        except mf.ManifestError as e:
            raise RpcError(ErrorCode.BAD_REQUEST, str(e)) from None
        try:
            aid, data, reply = await self.tracker.resolve_signed(name)
        except RpcError as e:
            if e.code in (ErrorCode.UNREACHABLE, ErrorCode.TIMEOUT):
                for rec in self.catalog.complete_records():
                    if rec.name == name:
                        log.warning("tracker unreachable; using the local copy of %s", name)
                        return rec.artifact_id, rec.manifest
            raise _explain(e, name) from None
        try:
            m = mf.decode_checked(data, aid)
        except mf.ManifestError as e:
            raise RpcError(ErrorCode.INTEGRITY, f"the tracker's manifest for {name} is invalid: {e}") from None
        signed = provenance.from_reply(name, aid, reply)
        trusted = self.config.trusted_publishers or tuple(self.tracker.publishers)
        provenance.check(signed, name, aid, m.kind, provenance.Trust(self.identity.cluster is not None, trusted))
        if signed is not None:
            provenance.save(self.config.data_dir, signed)
        return aid, m


def _lease_param(value: Any) -> tuple[str, float] | None:
    """A fetch's optional {"holder": str, "ttl": seconds}, checked (see `api_lease`)."""
    if value is None:
        return None
    holder = value.get("holder") if isinstance(value, dict) else None
    ttl = value.get("ttl") if isinstance(value, dict) else None
    if (
        not isinstance(holder, str)
        or not 0 < len(holder) <= 200
        or not isinstance(ttl, int | float)
        or isinstance(ttl, bool)
        or not 0 < ttl <= MAX_LEASE_TTL
    ):
        raise RpcError(
            ErrorCode.BAD_REQUEST,
            f"fetch lease must be {{holder: 1-200 characters, ttl: (0, {MAX_LEASE_TTL:.0f}] seconds}}, got {value!r}",
        )
    return holder, float(ttl)


def _check_caller(check: Any, path: Path) -> None:
    """Run a Caller check; a path that does not exist is the caller's mistake, said plainly."""
    try:
        check(path)
    except FileNotFoundError:
        raise RpcError(ErrorCode.BAD_REQUEST, f"{path} does not exist") from None
    except PermissionError as e:
        raise RpcError(ErrorCode.BAD_REQUEST, f"cannot check {path}: {e}") from None


def _snapshot_for(caller: Caller, path: Path, published: Path) -> tuple[Path, Path]:
    """snapshot_source, with a path that does not exist or cannot be opened said plainly."""
    try:
        return snapshot_source(caller, path, published)
    except FileNotFoundError:
        raise RpcError(ErrorCode.BAD_REQUEST, f"{path} does not exist") from None
    except PermissionError as e:
        raise RpcError(ErrorCode.BAD_REQUEST, f"cannot read {e.filename or path}: {e.strerror}") from None


def _finite(x: float) -> float | None:
    return None if math.isinf(x) else x


def _explain(e: RpcError, name: str) -> RpcError:
    if e.code == ErrorCode.NOT_FOUND:
        return RpcError(
            ErrorCode.NOT_FOUND,
            f"{name} is not published on the tracker: check the name "
            "(`p2p-tracker admin artifacts` lists them) or publish it first",
        )
    return e


async def _with_progress(coro: Any, tick: Any) -> Any:
    """Await `coro` while calling async `tick()` every PROGRESS_EVERY seconds."""
    result: list[Any] = []

    async def runner(cancel: trio.CancelScope) -> None:
        result.append(await coro)
        cancel.cancel()

    with collapse_single():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner, nursery.cancel_scope)
            while True:
                await tick()
                await trio.sleep(PROGRESS_EVERY)
    return result[0]
