"""The tracker's state, sans-IO: nodes, their holdings, names, and peer selection.

Nothing here opens a socket or reads a clock: every method that depends on time takes `now` (a
monotonic number of seconds) so the expiry rules are unit-tested with a fake clock, and the same
object runs inside the trio server (`tracker.server`) or a simulator.

Built for a million nodes in one process, which is what shapes the data structures:
- Nodes live in an `OrderedDict` kept in last-heartbeat order (a heartbeat is `move_to_end`, O(1)), so
  expiry pops stale nodes off the front and never scans live ones.
- Holders of an artifact are kept in bags per (complete?, zone) that support O(1) add/remove and O(k)
  uniform sampling, so a peer list for a swarm of 100,000 holders costs the same as one for 10.
- Nodes are `__slots__` objects; identical label maps and version strings are shared (interned), so
  a registered node costs a few hundred bytes (the goal is at most 1 KiB).

Expiry rule: a node that has sent no heartbeat for `misses * interval` seconds (3 missed heartbeats)
is dropped; a graceful `leave` drops it at once. Dropping removes it from every peer list.

Peer lists: complete holders first, then partial ones; inside each group, holders in the requester's
zone (label `zone`) first; every sub-group is a uniform random sample, so load spreads over holders;
the requester is never in its own list; at most `max` entries; each entry carries the holder's zone.
While a cross-zone budget is set (tracker/budgets.py), only one node per zone (its gateway) is given
holders of other zones (`_may_cross`).
"""

from __future__ import annotations

import hashlib
import random
import sys
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from p2pd.errors import ErrorCode
from p2pd.protocol import manifest as mf
from p2pd.protocol.auth import heartbeat_mac
from tracker import cluster_view as CV
from tracker.budgets import (
    IDLE_DEMAND,
    MAX_BUDGET,
    RAMP_PROGRESS,
    Budgets,
    Demand,
    Share,
    ShareLedger,
    allocate,
    passes_nothing,
    passes_on,
    seed_weight,
    weight_of,
    wire_share,
)
from tracker.validate import NatInfo, TrackerError

ZONE_LABEL = "zone"
NAT_UNKNOWN = "unknown"  # what a node that reported no NAT type (an older one, or not yet classified) shows
TAG_HISTORY = 100
_LABEL_CACHE_MAX = 100_000


class Node:
    """One registered node. Slots keep it small: there may be a million of them."""

    __slots__ = (
        "node_id",
        "host",
        "port",
        "labels",
        "zone",
        "version",
        "registered",
        "last_seen",
        "holdings",
        "session",
        "heartbeats",
        "nat_type",
        "mapped",
        "demand",
        "key",
        "skey",
        "seq",
    )

    def __init__(
        self,
        node_id: str,
        host: str,
        port: int,
        labels: dict[str, str],
        version: str,
        now: float,
        session: int,
    ) -> None:
        self.node_id = node_id
        self.host = host
        self.port = port
        self.labels = labels
        self.zone: str = labels.get(ZONE_LABEL, "")
        self.version = version
        self.registered = now
        self.last_seen = now
        self.holdings: dict[str, float] | None = None  # None while empty: saves a dict per idle node
        self.session = session
        self.heartbeats = 0
        self.nat_type: str | None = None  # None: not reported (a node older than NAT detection)
        self.mapped: tuple[str, int] | None = None  # public address the node's NAT maps its port to
        # (egress, cross, egress_rate, cross_rate) bytes/s from its last heartbeat (tracker/budgets.py)
        self.demand: tuple[float, float, float, float] | None = None
        self.key: bytes | None = None  # Ed25519 public key (a secured cluster; None: --insecure)
        self.skey: Any = None  # auth.heartbeat_mac of the session key agreed at registration (None: not secured)
        self.seq = 0  # highest authenticated heartbeat sequence number of this session (replays are older)

    def set_nat(self, nat: NatInfo | None) -> None:
        self.nat_type, self.mapped = (sys.intern(nat[0]), nat[1]) if nat is not None else (None, None)

    def nat_fields(self) -> dict[str, Any]:
        """What peer lists add about this node: nothing when it reported nothing (fields are optional)."""
        if self.nat_type is None:
            return {}
        return {"nat_type": self.nat_type, "mapped": list(self.mapped) if self.mapped else None}

    def info(self, now: float) -> dict[str, Any]:
        h = self.holdings or {}
        return {
            "node_id": self.node_id,
            "addr": [self.host, self.port],
            "labels": dict(self.labels),
            "version": self.version,
            "age_s": round(now - self.registered, 3),
            "last_seen_s": round(now - self.last_seen, 3),
            "heartbeats": self.heartbeats,
            "holdings": len(h),
            "complete": sum(1 for p in h.values() if p >= 1.0),
            "nat_type": self.nat_type or NAT_UNKNOWN,
            "mapped": list(self.mapped) if self.mapped else None,
        }


class Bag:
    """A set with O(1) add/discard and O(k) uniform random sampling (list + index map)."""

    __slots__ = ("items", "index")

    def __init__(self) -> None:
        self.items: list[str] = []
        self.index: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, x: str) -> bool:
        return x in self.index

    def add(self, x: str) -> None:
        if x not in self.index:
            self.index[x] = len(self.items)
            self.items.append(x)

    def discard(self, x: str) -> None:
        i = self.index.pop(x, None)
        if i is None:
            return
        last = self.items.pop()
        if i < len(self.items):
            self.items[i] = last
            self.index[last] = i


def sample_union(bags: list[Bag], k: int, exclude: str, rng: random.Random) -> list[str]:
    """Up to k distinct items drawn uniformly from the union of disjoint bags, `exclude` left out."""
    total = sum(len(b) for b in bags)
    if k <= 0 or total == 0:
        return []
    if total <= 2 * k + 1:  # small: take everything and shuffle
        out = [x for b in bags for x in b.items if x != exclude]
        rng.shuffle(out)
        return out[:k]
    seen: set[str] = set()
    out = []
    while len(out) < k:  # total > 2k+1, so each draw succeeds with probability > 1/2
        r = rng.randrange(total)
        for b in bags:
            if r < len(b):
                x = b.items[r]
                break
            r -= len(b)
        if x != exclude and x not in seen:
            seen.add(x)
            out.append(x)
    return out


@dataclass(slots=True)
class TagEvent:
    artifact_id: str
    at: float  # wall-clock seconds (for people reading the history)


@dataclass(slots=True)
class Counters:
    registrations: int = 0
    heartbeats: int = 0
    unknown_heartbeats: int = 0
    leaves: int = 0
    expirations: int = 0
    evictions: int = 0
    publishes: int = 0
    peer_queries: int = 0


@dataclass(slots=True)
class Artifact:
    manifest: bytes | None = None
    size: int = 0
    pieces: int = 0
    kind: str = ""
    # (complete?, zone) -> holders
    holders: dict[tuple[bool, str], Bag] = field(default_factory=dict)

    def holder_count(self) -> tuple[int, int]:
        c = p = 0
        for (complete, _), bag in self.holders.items():
            if complete:
                c += len(bag)
            else:
                p += len(bag)
        return c, p


class Registry:
    """All tracker state. `interval` is what nodes are told; `misses` heartbeats missed = expired."""

    def __init__(self, interval: float = 1.0, misses: int = 3, rng: random.Random | None = None) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.interval = interval
        self.misses = misses
        self.rng = rng or random.Random()
        self.nodes: OrderedDict[str, Node] = OrderedDict()
        self.artifacts: dict[str, Artifact] = {}
        self.tags: dict[str, list[TagEvent]] = {}
        self.signed: dict[str, bytes] = {}  # name -> its signed publish (tracker/publishers.py), secured clusters
        self.charged: dict[str, dict[str, int]] = {}  # publisher node id -> artifact id -> its manifest's bytes
        self.policy: dict[str, Any] = {}
        self.budgets = Budgets()
        self.shares: dict[str, Share] = {}  # from the last `reallocate`, sent with heartbeat replies
        self.ledger = ShareLedger()  # what each node holds of its share (sent with its last reply)
        self.counters = Counters()
        # sums of every live node's last reported egress_rate and cross_rate (bytes/s), kept as heartbeats
        # come and nodes go, so the cluster throughput is O(1) to sample at any number of nodes
        self.rate_total = 0.0
        self.cross_rate_total = 0.0
        self._labels: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}

    @property
    def ttl(self) -> float:
        return self.misses * self.interval

    # ---- nodes -------------------------------------------------------------------------------------

    def _intern_labels(self, labels: dict[str, str]) -> dict[str, str]:
        key = tuple(sorted(labels.items()))
        got = self._labels.get(key)
        if got is not None:
            return got
        d = {sys.intern(k): sys.intern(v) for k, v in key}
        if len(self._labels) < _LABEL_CACHE_MAX:
            self._labels[key] = d
        return d

    def register(
        self,
        node_id: str,
        host: str,
        port: int,
        labels: dict[str, str],
        version: str,
        now: float,
        session: int | None = None,
        nat: NatInfo | None = None,
        key: bytes | None = None,
        session_key: bytes | None = None,
    ) -> Node:
        """Add or refresh a node. Holdings of a node already known are kept until its next heartbeat.

        `nat` (type, mapped address) is what the node's own NAT detection found; None: not reported.
        `key` and `session_key` come from a verified registration (tracker/membership.py)."""
        self.counters.registrations += 1
        labels = self._intern_labels(labels)
        version = sys.intern(version)
        if session is None:
            session = self.rng.getrandbits(31)
        node = self.nodes.get(node_id)
        if node is None:
            node = Node(node_id, host, port, labels, version, now, session)
            node.set_nat(nat)
            node.key, node.skey = key, heartbeat_mac(session_key) if session_key is not None else None
            self.nodes[node_id] = node
            return node
        old_holdings = node.holdings
        if old_holdings and labels.get(ZONE_LABEL, "") != node.zone:
            self._set_holdings(node, {})
        node.host, node.port, node.labels, node.version = host, port, labels, version
        node.zone = labels.get(ZONE_LABEL, "")
        node.session = session
        node.set_nat(nat)
        node.key, node.seq = key, 0
        node.skey = heartbeat_mac(session_key) if session_key is not None else None
        node.last_seen = now
        self.nodes.move_to_end(node_id)
        if old_holdings and node.holdings is None:
            self._set_holdings(node, old_holdings)
        return node

    def heartbeat(
        self,
        node_id: str,
        holdings: dict[str, float] | None,
        now: float,
        session: int | None = None,
        demand: tuple[float, float, float, float] | None = None,
    ) -> bool:
        """Record a heartbeat; False means the node is unknown (it must register again).

        `holdings` None means "unchanged" (the delta path of UDP heartbeats); a map replaces the node's
        holdings. `session`, when given, must match the one handed out at registration.
        """
        node = self.nodes.get(node_id)
        if node is None or (session is not None and session != node.session):
            self.counters.unknown_heartbeats += 1
            return False
        self.counters.heartbeats += 1
        node.heartbeats += 1
        node.last_seen = now
        self.nodes.move_to_end(node_id)
        if demand is not None:
            self._set_demand(node, demand)
        if holdings is not None and holdings != (node.holdings or {}):
            self._set_holdings(node, holdings)
        return True

    def leave(self, node_id: str) -> bool:
        node = self.nodes.pop(node_id, None)
        if node is None:
            return False
        self.counters.leaves += 1
        self._drop_holdings(node)
        self._set_demand(node, None)
        return True

    def evict(self, node_id: str) -> bool:
        node = self.nodes.pop(node_id, None)
        if node is None:
            return False
        self.counters.evictions += 1
        self._drop_holdings(node)
        self._set_demand(node, None)
        return True

    def expire(self, now: float, limit: int | None = None) -> list[str]:
        """Drop nodes silent for longer than the TTL; returns their ids (oldest first)."""
        cutoff = now - self.ttl
        out: list[str] = []
        nodes = self.nodes
        while nodes and (limit is None or len(out) < limit):
            node_id, node = next(iter(nodes.items()))
            if node.last_seen >= cutoff:
                break
            nodes.popitem(last=False)
            self._drop_holdings(node)
            self._set_demand(node, None)
            out.append(node_id)
        self.counters.expirations += len(out)
        return out

    def _set_demand(self, node: Node, demand: tuple[float, float, float, float] | None) -> None:
        """Replace a node's demand report (None: the node is gone), keeping the cluster's rate totals."""
        if node.demand is not None:
            self.rate_total -= node.demand[2]
            self.cross_rate_total -= node.demand[3]
        node.demand = demand
        if demand is not None:
            self.rate_total += demand[2]
            self.cross_rate_total += demand[3]
        if not self.nodes:  # no float drift survives an empty cluster
            self.rate_total = self.cross_rate_total = 0.0

    def use_totals(self) -> tuple[float, float]:
        """Cluster egress and cross-zone egress right now (bytes/s), as the nodes measured them."""
        return max(0.0, self.rate_total), max(0.0, self.cross_rate_total)

    def next_expiry(self) -> float | None:
        """When the oldest node will expire if it stays silent (None when no node is registered)."""
        if not self.nodes:
            return None
        return next(iter(self.nodes.values())).last_seen + self.ttl

    # ---- holdings ----------------------------------------------------------------------------------

    def _bag(self, aid: str, complete: bool, zone: str) -> Bag:
        art = self.artifacts.get(aid)
        if art is None:
            art = self.artifacts[aid] = Artifact()
        bag = art.holders.get((complete, zone))
        if bag is None:
            bag = art.holders[(complete, zone)] = Bag()
        return bag

    def _unbag(self, aid: str, complete: bool, zone: str, node_id: str) -> None:
        art = self.artifacts.get(aid)
        if art is None:
            return
        bag = art.holders.get((complete, zone))
        if bag is None:
            return
        bag.discard(node_id)
        if not bag:
            del art.holders[(complete, zone)]
            if not art.holders and art.manifest is None:
                del self.artifacts[aid]

    def _set_holdings(self, node: Node, new: dict[str, float]) -> None:
        old = node.holdings or {}
        for aid, p in old.items():
            if aid not in new:
                self._unbag(aid, p >= 1.0, node.zone, node.node_id)
        for aid, p in new.items():
            was = old.get(aid)
            done = p >= 1.0
            if was is None:
                self._bag(aid, done, node.zone).add(node.node_id)
            elif (was >= 1.0) != done:
                self._unbag(aid, was >= 1.0, node.zone, node.node_id)
                self._bag(aid, done, node.zone).add(node.node_id)
        # artifact ids are shared by many nodes: one string object each (saves ~110 bytes per holding)
        node.holdings = {sys.intern(k): v for k, v in new.items()} if new else None

    def _drop_holdings(self, node: Node) -> None:
        if node.holdings:
            for aid, p in node.holdings.items():
                self._unbag(aid, p >= 1.0, node.zone, node.node_id)
        node.holdings = None

    # ---- peer lists --------------------------------------------------------------------------------

    def peers(self, aid: str, requester: str | None, max_peers: int = 50) -> list[dict[str, Any]]:
        self.counters.peer_queries += 1
        art = self.artifacts.get(aid)
        if art is None or max_peers <= 0:
            return []
        req = self.nodes.get(requester) if requester else None
        zone = req.zone if req is not None else None
        exclude = requester or ""
        cross = self._may_cross(art, zone, exclude)
        chosen: list[str] = []
        for complete in (True, False):
            same = [b for (c, z), b in art.holders.items() if c == complete and z == zone]
            other = [b for (c, z), b in art.holders.items() if c == complete and z != zone] if cross else []
            for bags in (same, other):
                need = max_peers - len(chosen)
                if need <= 0:
                    break
                chosen.extend(sample_union(bags, need, exclude, self.rng))
        out = []
        for nid in chosen:
            n = self.nodes[nid]
            out.append(
                {
                    "node_id": nid,
                    "addr": [n.host, n.port],
                    "progress": (n.holdings or {}).get(aid, 0.0),
                    "zone": n.zone,
                    **n.nat_fields(),
                    **({"key": n.key} if n.key is not None else {}),
                }
            )
        return out

    def _may_cross(self, art: Artifact, zone: str | None, requester: str) -> bool:
        """Zone-aware piece flow while a cross-zone budget is set: each piece should cross a zone
        boundary about once, then spread inside the zone. So a zone with a complete holder gets no
        peers from other zones, and otherwise only its gateway does: the zone's first partial holder
        (the oldest entry of its bag, stable while it stays), or a requester alone in its zone."""
        if self.budgets.cross_zone is None or zone is None:
            return True
        for (complete, z), bag in art.holders.items():
            if complete and z == zone and any(x != requester for x in bag.items[:2]):
                return False
        partial = art.holders.get((False, zone))
        if partial is None or not any(x != requester for x in partial.items[:2]):
            return True
        return partial.items[0] == requester

    # ---- global budgets (tracker/budgets.py) ---------------------------------------------------------

    def set_budgets(self, budgets: Budgets) -> None:
        """Replace the budgets and split them at once, so a change reaches nodes with their next heartbeat."""
        self.budgets = budgets
        self.reallocate()

    def demands(self) -> dict[str, Demand]:
        """Every live node's last demand report (a node that sent none demands nothing)."""
        prio = self.budgets.priority
        seeds: dict[str, float] = {}  # artifact id -> the weight of a node holding it complete (seed_weight)
        swarms: set[str] = set()  # artifact ids whose fetchers ask for all they can get (passes_on)
        fetchers: dict[str, int] = {}  # artifact id -> nodes holding it partially (passes_nothing)
        for aid, art in self.artifacts.items():
            complete = sum(len(bag) for (done, _), bag in art.holders.items() if done)
            partial = sum(len(bag) for (done, _), bag in art.holders.items() if not done)
            fetchers[aid] = partial
            if (w := seed_weight(complete, partial)) > 1.0:
                seeds[aid] = w
            if passes_on(complete, partial):
                swarms.add(aid)
        out = {}
        for nid, n in self.nodes.items():
            e, c, er, cr = n.demand or (0.0, 0.0, 0.0, 0.0)
            weight = weight_of(n.holdings, prio)
            if seeds and n.holdings:
                weight *= max((seeds.get(a, 1.0) for a, p in n.holdings.items() if p >= 1.0), default=1.0)
            if (
                swarms
                and n.holdings
                and any(a in swarms and not RAMP_PROGRESS <= p < 1.0 for a, p in n.holdings.items())
            ):
                e = MAX_BUDGET
            elif passes_nothing(n.holdings, fetchers):
                e = min(e, IDLE_DEMAND)
            out[nid] = Demand(n.zone, e, c, er, cr, weight)
        return out

    def reallocate(self) -> None:
        """Split every budget among the live nodes by their demands (every interval, and on a change)."""
        self.shares = allocate(self.budgets, self.demands()) if self.budgets.active else {}
        self.ledger.resplit(self.budgets, self.shares, {nid: n.zone for nid, n in self.nodes.items()})

    def share_of(self, node_id: str) -> list[float | None] | None:
        """This node's share for its heartbeat reply, as far as the others' held shares leave room for it
        (tracker/budgets.py ShareLedger): only call it for a reply that is sent."""
        if not self.budgets.active:
            return None
        return wire_share(self.budgets, self.ledger.grant(node_id))

    def known_zones(self) -> set[str]:
        return {n.zone for n in self.nodes.values()}

    # ---- names and manifests -----------------------------------------------------------------------

    def publish(self, name: str, manifest_bytes: bytes, wall: float) -> str:
        """Store a manifest (validated, id computed here) and point NAME:TAG at it."""
        try:
            m = mf.decode(manifest_bytes)
        except mf.ManifestError as e:
            raise TrackerError(ErrorCode.BAD_REQUEST, f"invalid manifest: {e}") from e
        aid = hashlib.sha256(manifest_bytes).hexdigest()
        art = self.artifacts.get(aid)
        if art is None:
            art = self.artifacts[aid] = Artifact()
        if art.manifest is None:
            art.manifest = bytes(manifest_bytes)
            art.size, art.pieces, art.kind = m.total_size, m.num_pieces, m.kind
        self.counters.publishes += 1
        self.tag(name, aid, wall)
        return aid

    def tag(self, name: str, aid: str, wall: float) -> bool:
        """Point NAME:TAG at a known artifact; the previous target stays in the history. True if moved."""
        art = self.artifacts.get(aid)
        if art is None or art.manifest is None:
            raise TrackerError(ErrorCode.NOT_FOUND, f"no manifest for artifact {aid}: publish it first")
        hist = self.tags.setdefault(name, [])
        if hist and hist[-1].artifact_id == aid:
            return False
        hist.append(TagEvent(aid, wall))
        del hist[:-TAG_HISTORY]
        return True

    def resolve(self, name: str) -> tuple[str, bytes]:
        hist = self.tags.get(name)
        if not hist:
            raise TrackerError(ErrorCode.NOT_FOUND, f"unknown name {name!r}")
        aid = hist[-1].artifact_id
        return aid, self.manifest(aid)

    def manifest(self, aid: str) -> bytes:
        art = self.artifacts.get(aid)
        if art is None or art.manifest is None:
            raise TrackerError(ErrorCode.NOT_FOUND, f"unknown artifact {aid}")
        return art.manifest

    def history(self, name: str) -> list[dict[str, Any]]:
        return [{"artifact_id": e.artifact_id, "at": e.at} for e in self.tags.get(name, [])]

    # ---- admin views -------------------------------------------------------------------------------

    def names_by_artifact(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, hist in self.tags.items():
            if hist:
                out.setdefault(hist[-1].artifact_id, []).append(name)
        return out

    def node_list(self, now: float, limit: int | None = None) -> list[dict[str, Any]]:
        it: Iterable[Node] = self.nodes.values()
        out: list[dict[str, Any]] = []
        for n in it:
            if limit is not None and len(out) >= limit:
                break
            out.append(n.info(now))
        return out

    def artifact_list(self) -> list[dict[str, Any]]:
        names = self.names_by_artifact()
        out = []
        for aid, art in self.artifacts.items():
            c, p = art.holder_count()
            out.append(
                {
                    "artifact_id": aid,
                    "names": sorted(names.get(aid, [])),
                    "kind": art.kind,
                    "size": art.size,
                    "pieces": art.pieces,
                    "complete": c,
                    "partial": p,
                    "has_manifest": art.manifest is not None,
                }
            )
        return out

    def swarm(self, aid: str, limit: int = 1000) -> dict[str, Any]:
        art = self.artifacts.get(aid)
        if art is None:
            raise TrackerError(ErrorCode.NOT_FOUND, f"unknown artifact {aid}")
        holders: list[dict[str, Any]] = []
        for (_, zone), bag in art.holders.items():
            for nid in bag.items:
                if len(holders) >= limit:
                    break
                n = self.nodes[nid]
                holders.append(
                    {
                        "node_id": nid,
                        "addr": [n.host, n.port],
                        "zone": zone,
                        "progress": (n.holdings or {}).get(aid, 0.0),
                    }
                )
        holders.sort(key=lambda h: (-h["progress"], h["node_id"]))
        c, p = art.holder_count()
        return {
            "artifact_id": aid,
            "kind": art.kind,
            "size": art.size,
            "pieces": art.pieces,
            "complete": c,
            "partial": p,
            "holders": holders,
        }

    def cluster_view(self, now: float, rows: int) -> dict[str, Any]:
        """The cluster page's data (tracker/cluster_view.py) in one pass over the nodes, without a dict per
        node: every node counted per zone, `rows` of them listed, the busiest artifacts' first holders."""
        interval = self.interval
        cutoff = now - CV.LATE_AFTER * interval  # seen at or after it: "ok"
        tally: dict[tuple[str, str | None, bool], int] = {}  # (zone, NAT type, ok) -> nodes: one dict op a node
        rates: dict[str, float] = {}
        for n in self.nodes.values():
            key = (n.zone, n.nat_type, n.last_seen >= cutoff)
            tally[key] = tally.get(key, 0) + 1
            d = n.demand
            if d is not None and d[2]:
                rates[n.zone] = rates.get(n.zone, 0.0) + d[2]
        zones: dict[str, CV.ZoneTally] = {}
        for (zone, nat, ok), count in tally.items():
            z = zones.get(zone)
            if z is None:
                z = zones[zone] = CV.ZoneTally(zone)
            z.add(ok, nat or NAT_UNKNOWN, count)
        out_rows: list[dict[str, Any]] = []
        for n in islice(self.nodes.values(), rows):
            h = n.holdings or {}
            out_rows.append(
                CV.node_row(
                    n.node_id,
                    n.zone,
                    [n.host, n.port],
                    now - n.last_seen,
                    interval,
                    n.nat_type or NAT_UNKNOWN,
                    len(h),
                    sum(1 for p in h.values() if p >= 1.0),
                    n.version,
                )
            )
        counts = {aid: art.holder_count() for aid, art in self.artifacts.items()}
        busiest = sorted((aid for aid, (c, p) in counts.items() if c + p), key=lambda a: (-sum(counts[a]), a))
        names = self.names_by_artifact() if busiest else {}
        artifacts = []
        for aid in busiest[: CV.MAX_ARTIFACTS]:
            art = self.artifacts[aid]
            c, p = counts[aid]
            listed = {"artifact_id": aid, "names": sorted(names.get(aid, [])), "kind": art.kind, "size": art.size}
            artifacts.append(CV.artifact_view({**listed, "complete": c, "partial": p}, self.swarm(aid, CV.MAX_HOLDERS)))
        rate, cross = self.use_totals()
        return {
            "nodes": CV.nodes_json(len(self.nodes), zones, out_rows),
            "artifacts": artifacts,
            "budgets": {
                "budgets": self.budgets.to_json(),
                "active": self.budgets.active,
                "paused": self.budgets.paused,
                "use": {"total": rate, "cross_zone": cross, "zones": {z: rates.get(z, 0.0) for z in zones}},
            },
        }

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {
            "nodes": len(self.nodes),
            "artifacts": len(self.artifacts),
            "names": len(self.tags),
            "interval": self.interval,
            "ttl": self.ttl,
            "registrations": c.registrations,
            "heartbeats": c.heartbeats,
            "unknown_heartbeats": c.unknown_heartbeats,
            "leaves": c.leaves,
            "expirations": c.expirations,
            "evictions": c.evictions,
            "publishes": c.publishes,
            "peer_queries": c.peer_queries,
        }
