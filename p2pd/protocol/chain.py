"""The chain schedule's order (sans-IO): which node a node fetches from when pieces travel along chains.

On a fleet released at once over equal links, the schedule that comes nearest the bound puts one flow on every
link and never makes a node wait for a piece: a chain through every node (BENCHMARKS.md, "The network carries the
1 + 32 at 1.01x its bound"). Each node must find its predecessor without talking to the others, so the order is a
function of what the tracker lists: the nodes in a ring by node id, each fetching from the one before it. A
complete node heads the chain that follows it, so n seeds cut the ring into n chains, and a node that completes
keeps its place: the order does not change as nodes finish (where "complete nodes first" did, and a finished head
sent its successor to another node mid-transfer).
"""

from __future__ import annotations

from collections.abc import Mapping


def predecessor(node_id: str, progress: Mapping[str, float]) -> str | None:
    """The node `node_id` fetches from: the one before it in the ring of the listed nodes and itself by id; None
    while no listed node is complete (progress >= 1), when no chain can reach us yet."""
    if not any(v >= 1.0 for n, v in progress.items() if n != node_id):
        return None
    ring = sorted({*progress, node_id})
    return ring[ring.index(node_id) - 1]
