"""What a node asks of the global budgets (tracker/budgets.py) each interval, from what its limits saw.

The tracker splits a budget max-min fair by the demands nodes report, so a demand that is too high
takes bandwidth from a node that could use it, and one too low keeps a node from growing. Two kinds
of node, told apart by their token buckets over the last interval:

- held back ("hungry"): it waited on its limits AND sent close to all the limit allowed. A sender
  held by a token bucket sends at the bucket's rate, so its use is ~1; a node that sends less has
  run out of things to send (in a swarm: pieces its peers want) and a larger share would go unused.
  Waiting alone is no evidence either: bursts of requests wait on a bucket whose average they do not
  fill. A hungry node asks for all its own limits allow, so it takes what the others leave.
- the others ask for what they sent plus a little room to grow (MARGIN, HEADROOM). What they do not
  ask for goes to the hungry ones: in a swarm under a budget that is the seed, the one node whose
  upload never runs out of wanted pieces, and on whose upload the leechers' own upload depends (each
  piece the seed sends can be passed on N-1 times). With an equal split the seed gets budget/(N+1)
  and the leechers can use at most (N-1) times that: ~0.8 of the budget for N = 4.

A node whose share is so small that what it already reserved waits longer than half an interval
(STALL_BACKLOG; its limiter's debt at the report, `backlog`) is held back too, whatever it sent. Its
senders reserve in chunks of at least 16 KiB and count each whole wait when they reserve: at a share of a
few chunks per interval the count per interval is 2 or 3 chunks, so the rate it measures falls below
HUNGRY_USE of the share in most intervals while every sender waits (a 1 s wait per chunk with three
requesters at 0.3 Mbit/s). It then asked for what it sent plus HEADROOM, the split gave it that, and a
node that the split starves this way (a fetcher past the start, a lone seed) rose out of it only by chance;
its requesters meanwhile see a peer silent for more than a second (ratelimit.Hierarchy.chunk).

The room to grow is the margin's cost: a leecher given MARGIN x its rate leaves (MARGIN - 1) of it
unused, so the margin is small; a node that needs more than the margin grows by filling its share
and waiting on it (then it is hungry). USE sits between 1/MARGIN (the most a node not held back uses
of a share sized by its demand) and 1 (a bucket-limited sender), so the two kinds do not flip.

Pure (no clock): the daemon passes what its buckets counted (p2pd/daemon.py `_demand`).
"""

from __future__ import annotations

MARGIN = 1.05  # a node not held back asks for this factor over what it sent...
HEADROOM = 32 * 1024  # ...plus these bytes/s (room for a node that sent nothing to start)
HUNGRY_WAIT = 0.02  # held back: waited on its limits more than this fraction of the interval...
HUNGRY_USE = 0.96  # ...and sent at least this fraction of the limit in force (a bucket-bound sender: ~1)
STALL_BACKLOG = 0.5  # ...or what it reserved waits on its limits longer than this fraction of the interval
MAX_DEMAND = 2.0**60  # bytes/s reported for "no limit of its own" (tracker/budgets.py MAX_BUDGET)


def hungry(rate: float, waited: float, dt: float, limit: float, backlog: float = 0.0) -> bool:
    """Held back over the last interval: waited on its limits and sent close to the limit in force, or
    it has more waiting to be sent than the limit lets out in STALL_BACKLOG of an interval (`backlog`:
    seconds until all it reserved may be sent, p2pd/protocol/ratelimit.py Hierarchy.backlog)."""
    return (waited > HUNGRY_WAIT * dt and rate >= HUNGRY_USE * limit) or backlog >= STALL_BACKLOG * dt


def want(rate: float, waited: float, dt: float, limit: float, own: float, backlog: float = 0.0) -> float:
    """Bytes/s to ask for: all its own limits allow when held back, else what it sent plus room to grow;
    never more than its own limits (`own`, math.inf for none) nor MAX_DEMAND."""
    wanted = own if hungry(rate, waited, dt, limit, backlog) else rate * MARGIN + HEADROOM
    return min(wanted, own, MAX_DEMAND)
