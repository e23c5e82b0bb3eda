"""The tracker's UDP heartbeat datagrams (sans-IO), shared by the node, the tracker and its load generator.

A steady-state heartbeat is one small datagram each way: `holdings` is None when nothing changed
since the last acknowledged beat (delta-only), and `session` (from `register` over TCP) lets the
tracker drop a stale node without a lookup. Arrays, not maps, keep a datagram near 60 bytes.
"""

from __future__ import annotations

from typing import Any

import msgspec

UDP_VERSION = 1


class UdpRequest(msgspec.Struct, array_like=True):
    version: int
    node_id: str
    session: int
    seq: int
    holdings: dict[str, float] | None = None
    # [egress, cross, egress_rate, cross_rate] bytes/s for the tracker's global budgets; None: not sent
    demand: list[float] | None = None


class UdpReply(msgspec.Struct, array_like=True):
    version: int
    seq: int
    known: bool
    interval: float
    policy: dict[str, Any]
    # this node's share of the global budgets, [egress, cross] bytes/s (None inside: no such budget);
    # absent (None) when no budget is set
    share: list[float | None] | None = None
