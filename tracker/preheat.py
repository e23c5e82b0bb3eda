"""Preheat orders (pure bookkeeping): which nodes an admin told to fetch which NAME:TAG, and what came of it.

An order names its nodes once, when it is placed (`select`): a node that joins later is not preheated
by an old order, so an order's outcome is a fixed list that `status` can report as done or not.
Delivery is by pull: a heartbeat reply only says "orders pending" (one boolean on the UDP hot path,
present only while some node has any), and the node takes them over TCP (`take`), which marks them
delivered. Progress is not stored here: holdings already carry it (the caller passes `progress_of`);
only failures, which holdings cannot say, are recorded (`fail`).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Order:
    order_id: str
    name: str
    artifact_id: str
    nodes: list[str]
    selector: str  # how the nodes were chosen, as the admin said it ("all", "zone=a", "gpu=h100")
    created: float  # wall clock, seconds


def select(
    nodes: list[dict[str, Any]],
    *,
    zone: str | None = None,
    label: tuple[str, str] | None = None,
    all_nodes: bool = False,
) -> tuple[list[str], str]:
    """(node ids, selector) of the registered nodes an order goes to; ValueError says why none can.

    `nodes` are node_list() rows ({"node_id", "labels"}). Exactly one of zone, label, all_nodes."""
    if sum((zone is not None, label is not None, all_nodes)) != 1:
        raise ValueError("give exactly one of --zone Z, --label K=V or --all")
    if not nodes:
        raise ValueError("no node is registered with the tracker: nothing to preheat")
    if all_nodes:
        return sorted(n["node_id"] for n in nodes), "all"
    key, value = ("zone", zone) if zone is not None else label  # type: ignore[misc]
    if not key:
        raise ValueError("a label selector needs a key: --label KEY=VALUE")
    chosen = sorted(n["node_id"] for n in nodes if (n.get("labels") or {}).get(key) == value)
    if not chosen:
        seen = sorted({str(v) for n in nodes if (v := (n.get("labels") or {}).get(key)) is not None})
        what = "zone" if zone is not None else f"label {key}"
        raise ValueError(
            f"unknown {what} {value!r}: no registered node has {key}={value} (known: {', '.join(seen) or 'none'})"
        )
    return chosen, f"{key}={value}"


@dataclass
class PreheatBook:
    orders: dict[str, Order] = field(default_factory=dict)
    undelivered: dict[str, list[str]] = field(default_factory=dict)  # node id -> order ids not yet taken
    failures: dict[str, dict[str, str]] = field(default_factory=dict)  # order id -> node id -> message

    def add(self, name: str, artifact_id: str, nodes: list[str], selector: str, now: float) -> Order:
        order_id = secrets.token_hex(6)
        order = Order(order_id, name, artifact_id, list(nodes), selector, now)
        self.orders[order_id] = order
        for nid in order.nodes:
            self.undelivered.setdefault(nid, []).append(order_id)
        return order

    def pending(self, node_id: str) -> bool:
        return node_id in self.undelivered

    def take(self, node_id: str) -> list[dict[str, Any]]:
        """The orders for this node not yet delivered, as sent on the wire; they count as delivered now."""
        ids = self.undelivered.pop(node_id, [])
        return [
            {"order": o.order_id, "name": o.name, "artifact_id": o.artifact_id}
            for i in ids
            if (o := self.orders.get(i)) is not None
        ]

    def fail(self, node_id: str, order_id: str, message: str) -> bool:
        """Record a node's failure; False when the order is unknown or was not for this node."""
        order = self.orders.get(order_id)
        if order is None or node_id not in order.nodes:
            return False
        self.failures.setdefault(order_id, {})[node_id] = message[:500]
        return True

    def status(self, progress_of: Callable[[str, str], float | None], name: str | None = None) -> list[dict[str, Any]]:
        """Every order (of `name` if given), newest first, with each node's state:
        waiting (not yet delivered), fetching, complete or failed."""
        out = []
        for o in sorted(self.orders.values(), key=lambda o: o.created, reverse=True):
            if name is not None and o.name != name:
                continue
            fails = self.failures.get(o.order_id, {})
            rows = []
            for nid in o.nodes:
                progress = progress_of(o.artifact_id, nid) or 0.0
                if nid in fails:
                    state = "failed"
                elif progress >= 1.0:
                    state = "complete"
                elif o.order_id in self.undelivered.get(nid, ()):
                    state = "waiting"
                else:
                    state = "fetching"
                rows.append({"node_id": nid, "state": state, "progress": progress, "error": fails.get(nid)})
            counts = {s: sum(1 for r in rows if r["state"] == s) for s in ("waiting", "fetching", "complete", "failed")}
            out.append(
                {
                    "order": o.order_id,
                    "name": o.name,
                    "artifact_id": o.artifact_id,
                    "selector": o.selector,
                    "created": o.created,
                    **counts,
                    "nodes": rows,
                }
            )
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "orders": [vars(o) for o in self.orders.values()],
            "undelivered": self.undelivered,
            "failures": self.failures,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PreheatBook:
        book = cls()
        for o in data.get("orders") or []:
            book.orders[o["order_id"]] = Order(**o)
        book.undelivered = {str(k): list(v) for k, v in (data.get("undelivered") or {}).items()}
        book.failures = {str(k): dict(v) for k, v in (data.get("failures") or {}).items()}
        return book
