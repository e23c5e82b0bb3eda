"""Where tracker state lives: the interface every front end uses, and the in-memory store.

The front ends (TCP RPC, UDP heartbeats, HTTP admin) only talk to a `Store`, so the same server runs
embedded with `MemoryStore` (one process, the default: state is rebuilt from heartbeats within two
intervals of a restart) or with `tracker.redis_store.RedisStore` (several replicas share one Redis, so
killing a replica loses nothing). Methods are async because the Redis store does network I/O; the
memory store never awaits, so its calls are as cheap as the registry's.

Heartbeats arrive in batches (`heartbeat_many`): the UDP front end drains every datagram that is
ready before it answers, and a batch costs one Redis round trip instead of one per node.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tracker import cluster_view as CV
from tracker.budgets import Budgets, usage
from tracker.preheat import Order, PreheatBook
from tracker.registry import Registry
from tracker.validate import NatInfo, TrackerError

# What every store counts (its `stats()`), in the order metrics show them.
STORE_COUNTERS = (
    "registrations",
    "heartbeats",
    "unknown_heartbeats",
    "leaves",
    "expirations",
    "evictions",
    "publishes",
    "peer_queries",
)


@dataclass(slots=True)
class Heartbeat:
    node_id: str
    holdings: dict[str, float] | None  # None: unchanged since the last acknowledged heartbeat
    session: int | None = None
    demand: tuple[float, float, float, float] | None = None  # tracker/budgets.py parse_report; None: none sent


@dataclass(slots=True)
class Registration:
    interval: float
    session: int


class Store(Protocol):
    interval: float
    kind: str

    async def register(
        self,
        node_id: str,
        host: str,
        port: int,
        labels: dict[str, str],
        version: str,
        *,
        nat: NatInfo | None = None,
        key: bytes | None = None,
        session_key: bytes | None = None,
    ) -> Registration: ...
    async def session_keys(self, nodes: list[tuple[str, int]]) -> list[Any]: ...
    async def signed_tag(self, name: str) -> bytes | None: ...
    async def set_signed_tag(self, name: str, blob: bytes) -> None: ...
    async def charge_publisher(self, publisher: str, artifact_id: str, size: int, limit: int) -> int | None: ...
    async def heartbeat_many(self, beats: list[Heartbeat]) -> list[bool]: ...
    async def leave(self, node_id: str) -> bool: ...
    async def node_info(self, node_id: str) -> tuple[str, int, int] | None: ...
    async def evict(self, node_id: str) -> bool: ...
    async def expire(self) -> list[str]: ...
    async def publish(self, name: str, manifest_bytes: bytes) -> str: ...
    async def tag(self, name: str, artifact_id: str) -> bool: ...
    async def resolve(self, name: str) -> tuple[str, bytes]: ...
    async def manifest(self, artifact_id: str) -> bytes: ...
    async def history(self, name: str) -> list[dict[str, Any]]: ...
    async def peers(self, artifact_id: str, requester: str | None, max_peers: int) -> list[dict[str, Any]]: ...
    async def policy(self) -> dict[str, Any]: ...
    async def set_policy(self, policy: dict[str, Any]) -> None: ...
    async def refresh(self) -> None: ...
    async def budgets(self) -> Budgets: ...
    async def set_budgets(self, budgets: Budgets) -> None: ...
    async def known_zones(self) -> set[str]: ...
    def share_of(self, node_id: str) -> list[float | None] | None: ...
    async def throttle_view(self) -> dict[str, Any]: ...
    async def use_totals(self) -> tuple[float, float]: ...
    async def cluster_view(self, rows: int) -> dict[str, Any]: ...
    async def node_list(self, limit: int) -> list[dict[str, Any]]: ...
    # preheat orders (tracker/preheat.py); `preheat_pending` is read on the UDP path, so it is sync
    def preheat_pending(self, node_id: str) -> bool: ...
    async def preheat_add(self, name: str, artifact_id: str, nodes: list[str], selector: str) -> Order: ...
    async def preheat_take(self, node_id: str) -> list[dict[str, Any]]: ...
    async def preheat_fail(self, node_id: str, order_id: str, message: str) -> bool: ...
    async def preheat_book(self) -> PreheatBook: ...
    async def artifact_list(self) -> list[dict[str, Any]]: ...
    async def swarm(self, artifact_id: str) -> dict[str, Any]: ...
    async def stats(self) -> dict[str, Any]: ...
    async def aclose(self) -> None: ...


class MemoryStore:
    """The registry of this process, read with a monotonic clock (injectable for tests)."""

    kind = "memory"

    def __init__(
        self,
        interval: float = 1.0,
        misses: int = 3,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        registry: Registry | None = None,
    ) -> None:
        self.reg = registry or Registry(interval, misses)
        self.preheat = PreheatBook()
        self.interval = self.reg.interval
        self.clock = clock
        self.wall = wall

    async def register(
        self,
        node_id: str,
        host: str,
        port: int,
        labels: dict[str, str],
        version: str,
        *,
        nat: NatInfo | None = None,
        key: bytes | None = None,
        session_key: bytes | None = None,
    ) -> Registration:
        node = self.reg.register(
            node_id, host, port, labels, version, self.clock(), nat=nat, key=key, session_key=session_key
        )
        return Registration(self.reg.interval, node.session)

    async def session_keys(self, nodes: list[tuple[str, int]]) -> list[Any]:
        """The session MAC (`auth.heartbeat_mac`) of each (node id, session) registered now; None if unknown."""
        get = self.reg.nodes.get
        out: list[Any] = []
        for nid, session in nodes:
            n = get(nid)
            out.append(n.skey if n is not None and n.session == session else None)
        return out

    def heartbeat_now(self, beats: list[Heartbeat]) -> list[bool]:
        """Synchronous batch heartbeat: the UDP fast path calls this without a task switch."""
        now = self.clock()
        hb = self.reg.heartbeat
        return [hb(b.node_id, b.holdings, now, b.session, b.demand) for b in beats]

    async def heartbeat_many(self, beats: list[Heartbeat]) -> list[bool]:
        return self.heartbeat_now(beats)

    async def signed_tag(self, name: str) -> bytes | None:
        """The signed publish `name` points at (tracker/publishers.py SignedTag, encoded); None if unsigned."""
        return self.reg.signed.get(name)

    async def set_signed_tag(self, name: str, blob: bytes) -> None:
        self.reg.signed[name] = blob

    async def charge_publisher(self, publisher: str, artifact_id: str, size: int, limit: int) -> int | None:
        """Count `size` bytes of manifest against `publisher` (once per artifact); None: within `limit`, else
        the bytes it already holds (nothing is counted)."""
        held = self.reg.charged.setdefault(publisher, {})
        if artifact_id in held:
            return None
        total = sum(held.values())
        if total + size > limit:
            return total
        held[artifact_id] = size
        return None

    async def leave(self, node_id: str) -> bool:
        return self.reg.leave(node_id)

    async def node_info(self, node_id: str) -> tuple[str, int, int] | None:
        """(host, port, session) of a registered node, None if unknown: how signalling checks who asks."""
        node = self.reg.nodes.get(node_id)
        return None if node is None else (node.host, node.port, node.session)

    async def evict(self, node_id: str) -> bool:
        return self.reg.evict(node_id)

    async def expire(self) -> list[str]:
        return self.reg.expire(self.clock())

    async def publish(self, name: str, manifest_bytes: bytes) -> str:
        return self.reg.publish(name, manifest_bytes, self.wall())

    async def tag(self, name: str, artifact_id: str) -> bool:
        return self.reg.tag(name, artifact_id, self.wall())

    async def resolve(self, name: str) -> tuple[str, bytes]:
        return self.reg.resolve(name)

    async def manifest(self, artifact_id: str) -> bytes:
        return self.reg.manifest(artifact_id)

    async def history(self, name: str) -> list[dict[str, Any]]:
        return self.reg.history(name)

    async def peers(self, artifact_id: str, requester: str | None, max_peers: int) -> list[dict[str, Any]]:
        return self.reg.peers(artifact_id, requester, max_peers)

    async def policy(self) -> dict[str, Any]:
        return self.reg.policy

    async def set_policy(self, policy: dict[str, Any]) -> None:
        self.reg.policy = dict(policy)

    async def refresh(self) -> None:
        self.reg.reallocate()

    async def budgets(self) -> Budgets:
        return self.reg.budgets

    async def set_budgets(self, budgets: Budgets) -> None:
        self.reg.set_budgets(budgets)

    async def known_zones(self) -> set[str]:
        return self.reg.known_zones()

    def share_of(self, node_id: str) -> list[float | None] | None:
        return self.reg.share_of(node_id)

    async def throttle_view(self) -> dict[str, Any]:
        return throttle_view(self.reg.budgets, self.reg.demands(), self.reg.shares)

    async def use_totals(self) -> tuple[float, float]:
        return self.reg.use_totals()

    async def cluster_view(self, rows: int) -> dict[str, Any]:
        return self.reg.cluster_view(self.clock(), rows)

    async def node_list(self, limit: int) -> list[dict[str, Any]]:
        return self.reg.node_list(self.clock(), limit)

    def preheat_pending(self, node_id: str) -> bool:
        return node_id in self.preheat.undelivered

    async def preheat_add(self, name: str, artifact_id: str, nodes: list[str], selector: str) -> Order:
        return self.preheat.add(name, artifact_id, nodes, selector, self.wall())

    async def preheat_take(self, node_id: str) -> list[dict[str, Any]]:
        return self.preheat.take(node_id)

    async def preheat_fail(self, node_id: str, order_id: str, message: str) -> bool:
        return self.preheat.fail(node_id, order_id, message)

    async def preheat_book(self) -> PreheatBook:
        return self.preheat

    async def artifact_list(self) -> list[dict[str, Any]]:
        return self.reg.artifact_list()

    async def swarm(self, artifact_id: str) -> dict[str, Any]:
        return self.reg.swarm(artifact_id)

    async def stats(self) -> dict[str, Any]:
        return {"store": self.kind, **self.reg.stats()}

    async def aclose(self) -> None:
        return None


def throttle_view(budgets: Budgets, demands: dict[str, Any], shares: dict[str, Any]) -> dict[str, Any]:
    """What `throttle show` prints: the budgets, current use (as nodes measured it), every node's share."""
    nodes = []
    for nid, d in sorted(demands.items()):
        sh = shares.get(nid)
        nodes.append(
            {
                "node_id": nid,
                "zone": d.zone,
                "demand": d.egress,
                "rate": d.egress_rate,
                "cross_rate": d.cross_rate,
                "share": None if sh is None else sh.egress,
                "cross_share": None if sh is None else sh.cross,
            }
        )
    return {
        "budgets": budgets.to_json(),
        "active": budgets.active,
        "paused": budgets.paused,
        "use": usage(demands),
        "nodes": nodes,
    }


async def cluster_view(store: Store, rows: int, max_nodes: int) -> dict[str, Any]:
    """The cluster page's data from a store's general views (what `Registry.cluster_view` computes directly)."""
    arts = []
    for a in CV.busiest(await store.artifact_list()):
        try:
            sw: dict[str, Any] | None = await store.swarm(a["artifact_id"])
        except TrackerError:  # its last holder left between the two calls
            sw = None
        arts.append(CV.artifact_view(a, sw))
    nodes = CV.nodes_view(await store.node_list(max_nodes), store.interval, rows)
    return {"nodes": nodes, "artifacts": arts, "budgets": CV.budgets_view(await store.throttle_view())}
