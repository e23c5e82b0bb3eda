"""What one simulation is asked to do: node classes, the artifact and its grain, arrivals, churn, policy.

Rates are bytes per second and sizes bytes (parse them with p2pd.units at the edge). The *grain* is the
simulator's unit of transfer: `grain` consecutive pieces travel as one flow and are one "piece" to the
picker and the seed policy. grain 1 is the daemon's own piece level; a coarser grain trades the order
pieces spread in for speed (see docs/simulator.md, "Grain", for how far the two agree).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from netsim.bench.model import kumar_ross, zone_bound
from p2pd.config import SwarmConfig
from tracker.config import TrackerConfig

POLICIES = ("p2pd", "bittorrent")
AUTO_UNITS = 64  # a coarse grain aims at about this many units per artifact...
AUTO_BUDGET = 4_000_000  # ...or piece level, when nodes x pieces stays under this many transfers


@dataclass(frozen=True)
class NodeClass:
    """`count` downloading nodes with the same link (bytes/s each way) in one zone."""

    count: int
    up: float
    down: float
    zone: str = "z0"

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"a node class needs a count >= 0, got {self.count}")
        if not (self.up > 0 and self.down > 0):
            raise ValueError("a node class needs positive up and down rates")


@dataclass(frozen=True)
class Scenario:
    classes: tuple[NodeClass, ...]
    size: int  # artifact bytes
    piece: int  # the daemon's piece size (bytes)
    seed_up: float  # each seed's upload (bytes/s)
    seeds: int = 1
    seed_down: float = math.inf
    seed_zone: str | None = None  # default: the first class's zone
    grain: int = 1  # pieces per simulated unit
    arrival_rate: float | None = None  # nodes per second (Poisson); None = every node at t = 0
    churn: float = 0.0  # fraction of downloading nodes that leave once mid-download...
    churn_away: float = 5.0  # ...and come back after this many seconds
    # None: each node leaves with probability `churn` at a random time; a time: exactly round(churn x peers) of
    # the nodes still downloading leave at once then, the last ones first (what the bench's --churn K@T:D does)
    churn_at: float | None = None
    zone_link: float = math.inf  # bytes/s in each direction between two zones (shared by all their flows)
    latency: float = 1e-4  # one-way seconds for control messages (requests, HAVE, DEFER, connects)
    quantum: float | None = None  # events this close in time are handled together (default: 1% of a unit at peer rate)
    egress_limit: float | None = None  # a node's --egress-limit (bytes/s), as the daemon's token bucket rate
    ingress_limit: float | None = None
    policy: str = "p2pd"
    rng_seed: int = 0
    horizon: float | None = None  # stop after this many simulated seconds (default: 100 x the bound + arrivals)
    swarm: SwarmConfig = field(default_factory=SwarmConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)

    def __post_init__(self) -> None:
        if self.size <= 0 or self.piece <= 0:
            raise ValueError("size and piece size must be positive")
        if self.grain < 1:
            raise ValueError(f"grain must be at least 1 piece, got {self.grain}")
        if self.seeds < 1 or not self.seed_up > 0:
            raise ValueError("need at least one seed with a positive upload rate")
        if self.peers < 1:
            raise ValueError("need at least one downloading node")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose from {', '.join(POLICIES)}")
        if not 0.0 <= self.churn <= 1.0:
            raise ValueError(f"churn is a fraction of nodes (0..1), got {self.churn}")
        if self.churn_at is not None and not self.churn_at >= 0:
            raise ValueError(f"churn time must be seconds from the start, got {self.churn_at}")
        if self.arrival_rate is not None and not self.arrival_rate > 0:
            raise ValueError("arrival rate must be positive (nodes per second)")

    @property
    def peers(self) -> int:
        return sum(c.count for c in self.classes)

    @property
    def pieces(self) -> int:
        return -(-self.size // self.piece)

    @property
    def unit_bytes(self) -> int:
        return self.grain * self.piece

    @property
    def units(self) -> int:
        return -(-self.size // self.unit_bytes)

    def unit_length(self, u: int) -> int:
        return min(self.unit_bytes, self.size - u * self.unit_bytes)

    @property
    def zones(self) -> list[str]:
        out: list[str] = []
        for z in [self.seed_zone or self.classes[0].zone, *(c.zone for c in self.classes)]:
            if z not in out:
                out.append(z)
        return out

    def bound(self) -> float:
        """Kumar–Ross: max(F/u_s, F/d_min, N·F/(u_s + Σu_i)), u_s the seeds' total upload (seconds); with two
        zones and a zone link, also the zones' cuts (netsim.bench.model.zone_bound)."""
        ups = [_cap(c.up, self.egress_limit) * 8 for c in self.classes for _ in range(c.count)]
        downs = [_cap(c.down, self.ingress_limit) * 8 for c in self.classes for _ in range(c.count)]
        if math.isfinite(self.zone_link) and len(self.zones) == 2:  # and the two zones' cuts
            in_b = [c.zone != self.zones[0] for c in self.classes for _ in range(c.count)]
            return zone_bound(self.size, self.seeds * self.seed_up * 8, ups, downs, in_b, self.zone_link * 8)
        return kumar_ross(self.size, self.seeds * self.seed_up * 8, ups, downs)

    def default_quantum(self) -> float:
        rates = sorted(min(c.up, c.down) for c in self.classes for _ in range(min(c.count, 1)))
        return 0.01 * self.unit_bytes / rates[len(rates) // 2]


def _cap(rate: float, limit: float | None) -> float:
    return rate if limit is None else min(rate, limit)


def auto_grain(peers: int, pieces: int) -> int:
    """Piece level when nodes x pieces fits the budget, else about AUTO_UNITS units (a power of two in pieces)."""
    if peers * pieces <= AUTO_BUDGET:
        return 1
    g = 1
    while -(-pieces // g) > AUTO_UNITS:
        g *= 2
    return g
