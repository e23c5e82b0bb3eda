"""Global bandwidth budgets and their split among nodes, sans-IO (issue #13, item 1).

An operator sets budgets on the tracker (`p2p-tracker admin throttle set`): the cluster's total
egress, per-zone totals (zone = the node label `zone`), and a cross-zone budget (bytes a node sends
to a peer of another zone). Every heartbeat a node reports its demand: what it would send in the next
interval if nothing held it back (p2pd/protocol/demand.py). Every interval the tracker
splits each budget max-min fair by those demands (Google BwE's shape, without its bandwidth
functions): a node that needs little gets what it needs, the others share the rest equally (or by
weight, for artifacts given a priority). What no node asked for is handed out as well, equally, so
a node that was capped can grow at once and the sum stays exactly at the budget.

Budgets nest: a node's zone budget caps the demand it brings to the total, so the total is not
handed to nodes whose zone cannot use it; its share is the smallest of the budgets it falls under.
Cross-zone shares are split the same way from the cross-zone demands, each at most the node's
egress share. The sums never exceed any budget, so cluster-wide egress is bounded whatever the
nodes' demands are; a budget of 0 pauses every node under it (they hold their transfers, none fails).

Nothing here reads a clock or a socket: the registry (memory) and the Redis store call `allocate`
with what they hold, so every replica that sees the same demands hands out the same shares.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from p2pd.errors import ErrorCode
from p2pd.protocol.demand import HEADROOM
from tracker.validate import TrackerError

MAX_BUDGET = 2.0**60  # bytes/s: 1 EiB/s, the units module's ceiling for a rate; more is a typo
MAX_ZONES = 1000
MAX_PRIORITIES = 1000
MAX_WEIGHT = 1000.0


def _bad(message: str) -> TrackerError:
    return TrackerError(ErrorCode.BAD_REQUEST, message)


def _rate(what: str, v: Any) -> float:
    """A budget in bytes/s: a finite number >= 0 (0 pauses), at most MAX_BUDGET."""
    if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
        raise _bad(f"{what} must be a number of bytes/s, got {v!r}")
    if v < 0:
        raise _bad(f"{what} must not be negative, got {v!r} (0 pauses, clear removes the budget)")
    if v > MAX_BUDGET:
        raise _bad(f"{what} is absurd ({v!r} bytes/s is over 1 EiB/s): check the unit")
    return float(v)


@dataclass(frozen=True)
class Budgets:
    """What the operator set; None / empty = no such budget. Rates in bytes/s."""

    total: float | None = None
    zones: dict[str, float] = field(default_factory=dict)
    cross_zone: float | None = None
    priority: dict[str, float] = field(default_factory=dict)  # artifact id -> weight (default 1)

    @property
    def active(self) -> bool:
        return self.total is not None or bool(self.zones) or self.cross_zone is not None

    @property
    def paused(self) -> bool:
        """The emergency stop: a total of 0 holds every transfer in the cluster."""
        return self.total == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "zones": dict(self.zones),
            "cross_zone": self.cross_zone,
            "priority": dict(self.priority),
        }

    @classmethod
    def from_json(cls, v: Any) -> Budgets:
        """Validate budgets from outside (admin API, the store): one clear error per mistake."""
        if v is None:
            return cls()
        if not isinstance(v, dict):
            raise _bad("budgets must be a map {total, zones, cross_zone, priority}")
        unknown = set(v) - {"total", "zones", "cross_zone", "priority"}
        if unknown:
            raise _bad(f"unknown budget key {sorted(unknown)[0][:40]!r}; known: total, zones, cross_zone, priority")
        total = None if v.get("total") is None else _rate("total", v["total"])
        cross = None if v.get("cross_zone") is None else _rate("cross_zone", v["cross_zone"])
        zones_in = v.get("zones") or {}
        if not isinstance(zones_in, dict) or len(zones_in) > MAX_ZONES:
            raise _bad(f"zones must be a map of at most {MAX_ZONES} zone names to bytes/s")
        zones: dict[str, float] = {}
        for z, r in zones_in.items():
            if not isinstance(z, str) or not z or len(z) > 128:
                raise _bad(f"a zone name must be a non-empty string of at most 128 chars, got {str(z)[:40]!r}")
            zones[z] = _rate(f"zone {z}", r)
        prio_in = v.get("priority") or {}
        if not isinstance(prio_in, dict) or len(prio_in) > MAX_PRIORITIES:
            raise _bad(f"priority must be a map of at most {MAX_PRIORITIES} artifact ids to weights")
        prio: dict[str, float] = {}
        for aid, w in prio_in.items():
            if not isinstance(aid, str) or len(aid) != 64 or any(c not in "0123456789abcdef" for c in aid):
                raise _bad(f"priority keys must be artifact ids (64 hex chars), got {str(aid)[:40]!r}")
            if isinstance(w, bool) or not isinstance(w, int | float) or not 0 < w <= MAX_WEIGHT:
                raise _bad(f"priority of {aid[:12]} must be a weight in (0, {MAX_WEIGHT:g}], got {w!r}")
            prio[aid] = float(w)
        return cls(total, zones, cross, prio)


@dataclass(frozen=True, slots=True)
class Demand:
    """One node's report: bytes/s it would send (all peers / peers in other zones) and what it sent."""

    zone: str = ""
    egress: float = 0.0
    cross: float = 0.0
    egress_rate: float = 0.0  # measured over the last interval: what `throttle show` sums as current use
    cross_rate: float = 0.0
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class Share:
    """A node's allowance in bytes/s; None: no budget applies to it (its own limits only)."""

    egress: float | None
    cross: float | None

    def to_wire(self) -> list[float | None]:
        return [self.egress, self.cross]


NO_SHARE = Share(None, None)


def max_min(
    capacity: float, demands: Mapping[str, float], weights: Mapping[str, float] | None = None
) -> dict[str, float]:
    """Split `capacity` among `demands`, weighted max-min fair, then hand out what is left.

    Water-filling: a node whose demand is below its weighted fair level gets its demand, the others
    get weight x level, where level is what makes the sum equal the capacity. If every demand is met,
    the remainder goes to all nodes in proportion to their weights (work conserving: a capped node
    that reported too little can grow by next interval). Sum of the result <= capacity.
    """
    if not demands:
        return {}
    w = {n: (weights.get(n, 1.0) if weights else 1.0) for n in demands}
    d = {n: max(0.0, float(x)) if math.isfinite(x) else capacity for n, x in demands.items()}
    out: dict[str, float] = {}
    left = capacity
    # nodes sorted by demand per weight: each either fits under the current fair level or is capped at it
    order = sorted(d, key=lambda n: d[n] / w[n])
    wsum = sum(w.values())
    for i, n in enumerate(order):
        level = left / wsum if wsum > 0 else 0.0
        if d[n] <= level * w[n]:
            out[n] = d[n]
            left -= d[n]
            wsum -= w[n]
        else:
            for m in order[i:]:
                out[m] = level * w[m]
            return _clip(out, capacity)
    # everyone satisfied: share the surplus by weight
    total_w = sum(w.values())
    if left > 0 and total_w > 0:
        for n in out:
            out[n] += left * w[n] / total_w
    return _clip(out, capacity)


def _clip(out: dict[str, float], capacity: float) -> dict[str, float]:
    """Rounding may overshoot by a few ulps: scale down so the sum never exceeds the budget."""
    s = sum(out.values())
    if s > capacity and s > 0:
        f = capacity / s * (1 - 1e-12)
        for n in out:
            out[n] *= f
    return out


def allocate(budgets: Budgets, demands: Mapping[str, Demand]) -> dict[str, Share]:
    """Every node's share under `budgets` given what each demands (see the module docstring)."""
    if not budgets.active:
        return {n: NO_SHARE for n in demands}
    weights = {n: d.weight for n, d in demands.items()}
    egress: dict[str, float | None] = {n: None for n in demands}
    wanted = {n: d.egress for n, d in demands.items()}
    by_zone: dict[str, list[str]] = {}
    for n, d in demands.items():
        if d.zone in budgets.zones:
            by_zone.setdefault(d.zone, []).append(n)
    for zone, members in by_zone.items():
        got = max_min(budgets.zones[zone], {n: wanted[n] for n in members}, weights)
        for n, s in got.items():
            egress[n] = s
            wanted[n] = min(wanted[n], s)
    if budgets.total is not None:
        got = max_min(budgets.total, wanted, weights)
        for n, s in got.items():
            cur = egress[n]
            egress[n] = s if cur is None else min(cur, s)
    cross: dict[str, float | None] = {n: None for n in demands}
    if budgets.cross_zone is not None:
        cap = {n: math.inf if (e := egress[n]) is None else e for n in demands}
        got = max_min(budgets.cross_zone, {n: min(d.cross, cap[n]) for n, d in demands.items()}, weights)
        for n, s in got.items():
            cross[n] = min(s, cap[n])
    return {n: Share(egress[n], cross[n]) for n in demands}


# While a split converges, the held shares may add up to this much over a budget: the small shuffles of
# every interval (a node flipping between capped and not) then pass at once instead of waiting a heartbeat
# for the decreases that make room (which left 10-15 % of the budget unused in the throttle bench), and
# only the large moves (the seed shrinking while every leecher grows) wait. Within the 5 % per-window error
# the budgets are judged by, and an upper bound: nodes rarely use all they hold.
OVERCOMMIT = 0.05


class ShareLedger:
    """The shares nodes hold right now, so that the sum of them never exceeds a budget.

    A split changes every node's share at once, but each node learns its new share only with its next
    heartbeat reply, and heartbeats are out of phase. Handing out the new shares as they are would let
    one node's increase take effect before another node's decrease (the seed shrinking while leechers
    grow at the start of a transfer): the held shares then add up to more than the budget for up to an
    interval (measured: 1.16–1.23x in the first windows). So the ledger remembers what each node was last
    sent; a decrease is given at once, an increase only up to what the budget (plus OVERCOMMIT) leaves after
    what the others still hold. The rest of an increase follows at the node's next heartbeat, once the
    others' decreases have been sent: a split is in force within two intervals, and the sum of held shares
    stays within every budget (plus OVERCOMMIT) all along.

    A node not sent a share since the budgets were set counts at its new share (it gets it at its next
    heartbeat; before that it was unlimited, which no ledger can help). What one tracker sent is all it
    knows: with several replicas (Redis) each keeps the ledger of the nodes that beat at it, and counts
    the others at their split share. A lost UDP reply leaves the ledger believing a node got its share;
    the node's next heartbeat (and its reply) puts that right within an interval.
    """

    def __init__(self) -> None:
        self.budgets = Budgets()
        self.split: Mapping[str, Share] = {}
        self.zones: Mapping[str, str] = {}
        self.held: dict[str, Share] = {}
        self._egress_sum = 0.0  # of held egress shares (those under a budget)
        self._zone_sums: dict[str, float] = {}
        self._cross_sum = 0.0

    def resplit(self, budgets: Budgets, split: Mapping[str, Share], zones: Mapping[str, str]) -> None:
        """A new split of `budgets` (every interval, and when budgets change); nodes gone are forgotten."""
        if not budgets.active:
            self.held = {}
        else:
            old = self.held
            self.held = {n: _held(old.get(n), s) for n, s in split.items()}
        self.budgets, self.split, self.zones = budgets, split, zones
        self._egress_sum = sum(h.egress or 0.0 for h in self.held.values())
        self._zone_sums = {}
        for n, h in self.held.items():
            z = zones.get(n, "")
            self._zone_sums[z] = self._zone_sums.get(z, 0.0) + (h.egress or 0.0)
        self._cross_sum = sum(h.cross or 0.0 for h in self.held.values())

    def grant(self, node: str) -> Share | None:
        """The share to send `node` in this heartbeat reply (and now held by it); None: not in the split."""
        new = self.split.get(node)
        old = self.held.get(node)
        if new is None or old is None:
            return new
        b = self.budgets
        zone = self.zones.get(node, "")
        egress = new.egress
        if egress is not None and old.egress is not None and egress > old.egress:
            if b.total is not None:
                egress = _fit(egress, old.egress, b.total, self._egress_sum - old.egress)
            if zone in b.zones:
                egress = _fit(egress, old.egress, b.zones[zone], self._zone_sums.get(zone, 0.0) - old.egress)
        cross = new.cross
        if cross is not None and old.cross is not None and cross > old.cross and b.cross_zone is not None:
            cross = _fit(cross, old.cross, b.cross_zone, self._cross_sum - old.cross)
        if cross is not None and egress is not None:
            cross = min(cross, egress)
        given = Share(egress, cross)
        self._egress_sum += (egress or 0.0) - (old.egress or 0.0)
        self._zone_sums[zone] = self._zone_sums.get(zone, 0.0) + (egress or 0.0) - (old.egress or 0.0)
        self._cross_sum += (cross or 0.0) - (old.cross or 0.0)
        self.held[node] = given
        return given


def _fit(want: float, held: float, budget: float, others: float) -> float:
    """An increase from `held` towards `want`, within what `others` leave of `budget` plus the overcommit
    (never below `held`). The running sums drift by ulps: a share within a billionth of the room fits."""
    room = budget * (1.0 + OVERCOMMIT) - others
    return want if want <= room + budget * 1e-9 else max(held, room)


def _held(old: Share | None, new: Share) -> Share:
    """What a node holds after a resplit: its last share where it had one under a budget, else the new one."""
    if old is None:
        return new
    return Share(
        new.egress if old.egress is None or new.egress is None else old.egress,
        new.cross if old.cross is None or new.cross is None else old.cross,
    )


def wire_share(budgets: Budgets, share: Share | None) -> list[float | None] | None:
    """What a heartbeat reply carries: [egress, cross] bytes/s (None inside: no such budget), or None
    when no budget is set. A node registered since the last split (share None) gets 0 until the next
    one, at most an interval: the sums must hold, and a share of 0 only holds its transfers."""
    if not budgets.active:
        return None
    if share is None:
        return [
            0.0 if budgets.total is not None or budgets.zones else None,
            0.0 if budgets.cross_zone is not None else None,
        ]
    return share.to_wire()


def weight_of(holdings: Mapping[str, float] | None, priority: Mapping[str, float]) -> float:
    """A node's weight: the highest priority among the artifacts it holds (1 when none has one)."""
    if not priority or not holdings:
        return 1.0
    return max((priority[a] for a in holdings if a in priority), default=1.0)


# The complete holders' part of a swarm's split, over the least the fetchers need to pass on their shares in
# full (budget/partial): the fetchers then get more wanted pieces than their shares let out (seed_weight)
SEED_MARGIN = 1.1


def seed_weight(complete: int, partial: int) -> float:
    """The weight of a node that holds an artifact complete, among `complete` such nodes and `partial`
    nodes still fetching it.

    A node fetching can pass each piece it gets on to at most partial-1 others, so the fetching nodes'
    upload is bounded by partial-1 times what the complete ones send, and the split that the swarm can use
    in full gives the complete nodes budget/partial together. An equal split among nodes that all wait on
    their shares gives them complete/(complete+partial) instead (1 seed, 4 leechers: 8 of 40, where the
    leechers can then pass on 24 of their 32): the leechers drain what they hold, run dry, and the
    budget goes 20 % unused every 7-8 s (BENCHMARKS.md, "where the under-use dips come from"). This
    weight makes the complete nodes' max-min part SEED_MARGIN x budget/partial while everyone is held back
    (1 + 4 under 40: seed 11, fetchers 7.25 each, which they could pass on 33); never below 1.

    Exactly budget/partial is the edge: the fetchers can pass on just what their shares let out, so one that
    gets a little less from the seed for a second, or whose pieces the others happen to hold already, runs
    dry for a window (measured: a fetcher at 5.1-5.2 of its 7.5 for one window, 0.94-0.95 of the budget, in
    one of two runs, BENCHMARKS.md "every window within 5 %"). With the margin the fetchers hold more wanted
    pieces than they may send, and the complete holders, who can serve any piece, hold the rest."""
    if complete < 1 or partial < 2:
        return 1.0
    return max(1.0, SEED_MARGIN * partial / (complete * (partial - SEED_MARGIN)))


# A fetcher in a swarm counts as wanting all it can get until it holds this much of the artifact (passes_on)
RAMP_PROGRESS = 0.05


def passes_on(complete: int, partial: int) -> bool:
    """Whether the members of a swarm (`complete` nodes holding an artifact, `partial` fetching it) count as
    wanting all they can get in the split (demand raised to MAX_BUDGET): its complete holders always, its
    fetchers while they hold less than RAMP_PROGRESS.

    A fetcher passes every piece it gets on to the other fetchers, so at the start of a transfer what it
    can send grows with what it receives, not with what it sent: it reports the second in which it had
    nothing yet (0.3 Mbit/s), the split of the next interval cuts it to that and hands the rest to the seed,
    and by then it has pieces the others want; its share follows a second later, and the ledger holds that
    increase until the seed's decrease is sent. The seed's first report is as stale (the second before it
    was held back). The first judged windows of the throttle bench ran at 0.90 and 0.71 of the budget
    (BENCHMARKS.md, "the ramp after the start"). Asking for all from the first split on gives the split the
    swarm settles to (seed_weight: seeds SEED_MARGIN x budget/partial together, fetchers the rest equally) at once. Past
    the start a fetcher's own report counts again, so one that runs dry hands its share back. It needs a
    complete holder to feed the fetchers and at least two fetchers to pass pieces between."""
    return complete >= 1 and partial >= 2


# What a node none of whose pieces anyone can want asks for (passes_nothing): the daemon's room to start
# (p2pd/protocol/demand.py HEADROOM), whatever it reported
IDLE_DEMAND = float(HEADROOM)


def passes_nothing(holdings: Mapping[str, float] | None, fetchers: Mapping[str, int]) -> bool:
    """Whether no node can want any piece a node holds: it holds only partial copies, and for each it is the
    only node fetching it (`fetchers`: artifact id -> nodes holding it partially), so every other holder is
    complete. Its demand is then IDLE_DEMAND, not its report.

    The end game of a swarm: the first fetchers complete, and the last one, which was held back while it
    passed pieces on to them (it reports all it can get, or what it sent a second ago), keeps a full share
    for one or two intervals after its pieces stopped being wanted, while the complete holders that send
    it its last pieces are capped at theirs (measured: the laggard sent 0.18 of its 8 Mbit/s, the window
    0.80 of the budget, BENCHMARKS.md "every window within 5 %"). With its demand at the floor the split
    hands its share to those that still send, at the split after the others' copies complete."""
    if not holdings:
        return False
    return all(p < 1.0 and fetchers.get(a, 0) <= 1 for a, p in holdings.items())


def usage(demands: Mapping[str, Demand]) -> dict[str, Any]:
    """Current use, as nodes measured it: total and cross-zone egress, and per zone."""
    zones: dict[str, float] = {}
    for d in demands.values():
        zones[d.zone] = zones.get(d.zone, 0.0) + d.egress_rate
    return {
        "total": sum(d.egress_rate for d in demands.values()),
        "cross_zone": sum(d.cross_rate for d in demands.values()),
        "zones": zones,
    }


def parse_report(v: Any) -> tuple[float, float, float, float] | None:
    """A heartbeat's demand field [egress, cross, egress_rate, cross_rate] (bytes/s); None if absent.

    Hostile input never raises here: a malformed report is treated as no report (the node keeps its
    previous demand), because a heartbeat must not fail over an optional field."""
    if not isinstance(v, list | tuple) or len(v) != 4:
        return None
    out = []
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x) or x < 0:
            return None
        out.append(min(float(x), MAX_BUDGET))
    return out[0], out[1], out[2], out[3]
