"""What the live cluster page (`GET /ui` on the admin listener) shows, computed from store views.

No I/O here: the admin route gathers the store's node list, artifacts, swarms and budgets, and this module
shapes them for the page, with every list bounded (MAX_ROWS, MAX_ARTIFACTS, MAX_HOLDERS) so one request's
work and answer stay small at any cluster size: per-zone counts cover every node, rows only the first ones.
"""

from __future__ import annotations

from collections import deque
from typing import Any

# Samples of the cluster throughput kept: one per heartbeat interval, so 300 is 5 minutes at the default 1 s
# interval -- what a person watching a rollout looks back over -- in ~20 KB of JSON.
THROUGHPUT_SAMPLES = 300
MAX_ROWS = 200  # node rows sent by default: a few screens; the per-zone counts cover every node
MAX_ARTIFACTS = 20  # artifacts shown (most holders first): the ones being rolled out
MAX_HOLDERS = 50  # holders listed per artifact (most progress first); counts cover every holder
LATE_AFTER = 1.5  # heartbeat intervals of silence after which a node shows as "late" (it missed one)

# How other nodes reach a node, from its NAT type (p2pd/protocol/udp_punch.py `plan` decides per pair).
REACHED = {
    "open": "direct",
    "full-cone": "hole punch",
    "restricted-cone": "hole punch",
    "port-restricted-cone": "hole punch",
    "udp-firewall": "hole punch",
    "symmetric": "port-spray punch or relay",
    "udp-blocked": "relay",
}


class ThroughputRing:
    """Cluster egress per heartbeat interval: a bounded ring of (unix time, total, cross-zone) bytes/s."""

    def __init__(self, size: int = THROUGHPUT_SAMPLES) -> None:
        self.samples: deque[tuple[float, float, float]] = deque(maxlen=size)

    def add(self, at: float, total: float, cross: float) -> None:
        self.samples.append((round(at, 3), round(total, 1), round(cross, 1)))

    def to_json(self) -> list[list[float]]:
        return [list(s) for s in self.samples]


def health(last_seen_s: float, interval: float) -> str:
    return "ok" if last_seen_s <= LATE_AFTER * interval else "late"


class ZoneTally:
    """One zone's counts over every node in it: health and NAT types."""

    __slots__ = ("zone", "nodes", "ok", "late", "nat")

    def __init__(self, zone: str) -> None:
        self.zone = zone
        self.nodes = self.ok = self.late = 0
        self.nat: dict[str, int] = {}

    def add(self, ok: bool, nat: str, count: int = 1) -> None:
        self.nodes += count
        if ok:
            self.ok += count
        else:
            self.late += count
        self.nat[nat] = self.nat.get(nat, 0) + count

    def to_json(self) -> dict[str, Any]:
        return {"zone": self.zone, "nodes": self.nodes, "ok": self.ok, "late": self.late, "nat": self.nat}


def node_row(
    node_id: str,
    zone: str,
    addr: list[Any],
    last_seen_s: float,
    interval: float,
    nat: str,
    holdings: int,
    complete: int,
    version: str,
) -> dict[str, Any]:
    return {
        "node_id": node_id,
        "zone": zone,
        "addr": f"{addr[0]}:{addr[1]}",
        "health": health(last_seen_s, interval),
        "last_seen_s": round(last_seen_s, 1),
        "nat_type": nat,
        "reached": REACHED.get(nat, "direct or relay (NAT not classified)"),
        "holdings": holdings,
        "complete": complete,
        "version": version,
    }


def nodes_json(total: int, zones: dict[str, ZoneTally], rows: list[dict[str, Any]]) -> dict[str, Any]:
    rows.sort(key=lambda r: (r["zone"], r["node_id"]))
    return {"total": total, "zones": [zones[z].to_json() for z in sorted(zones)], "rows": rows}


def nodes_view(nodes: list[dict[str, Any]], interval: float, rows: int) -> dict[str, Any]:
    """`nodes_json` from a store's node list (the Redis store's path; the memory store reads its nodes directly)."""
    zones: dict[str, ZoneTally] = {}
    out_rows: list[dict[str, Any]] = []
    late_after = LATE_AFTER * interval
    for n in nodes:
        zone = n["labels"].get("zone", "")
        z = zones.get(zone)
        if z is None:
            z = zones[zone] = ZoneTally(zone)
        z.add(n["last_seen_s"] <= late_after, n["nat_type"])
        if len(out_rows) < rows:
            out_rows.append(
                node_row(
                    n["node_id"],
                    zone,
                    n["addr"],
                    n["last_seen_s"],
                    interval,
                    n["nat_type"],
                    n["holdings"],
                    n["complete"],
                    n["version"],
                )
            )
    return nodes_json(len(nodes), zones, out_rows)


def busiest(artifacts: list[dict[str, Any]], limit: int = MAX_ARTIFACTS) -> list[dict[str, Any]]:
    """The artifacts with the most holders (the ones a rollout is moving), at most `limit`."""
    held = [a for a in artifacts if a["complete"] + a["partial"] > 0]
    held.sort(key=lambda a: (-(a["complete"] + a["partial"]), a["artifact_id"]))
    return held[:limit]


def artifact_view(art: dict[str, Any], swarm: dict[str, Any] | None) -> dict[str, Any]:
    holders = (swarm or {}).get("holders", [])
    return {
        "artifact_id": art["artifact_id"],
        "names": art["names"],
        "kind": art["kind"],
        "size": art["size"],
        "complete": art["complete"],
        "partial": art["partial"],
        "holders": [
            {"node_id": h["node_id"], "zone": h["zone"], "progress": round(float(h["progress"]), 4)}
            for h in holders[:MAX_HOLDERS]
        ],
    }


def budgets_view(throttle: dict[str, Any]) -> dict[str, Any]:
    """Budgets against use; the per-node shares are left out (`p2p-tracker admin throttle show` has them)."""
    return {k: throttle[k] for k in ("budgets", "active", "paused", "use")}
