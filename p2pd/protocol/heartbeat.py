"""The tracker's UDP heartbeat datagrams (sans-IO), shared by the node, the tracker and its load generator.

A steady-state heartbeat is one small datagram each way: `holdings` is None when nothing changed
since the last acknowledged beat (delta-only), and `session` (from `register` over TCP) lets the
tracker drop a stale node without a lookup. Arrays, not maps, keep a datagram near 60 bytes.

In a secured cluster (docs/security.md) a heartbeat is version 2 and carries a MAC: the msgpack body,
then `HEARTBEAT_TAG_SIZE` bytes of keyed BLAKE2s of that body under the session key agreed at
registration (`seal`). `seq` must grow within a session, so a replayed datagram is refused too.
"""

from __future__ import annotations

from typing import Any

import msgspec

from p2pd.protocol.auth import HEARTBEAT_TAG_SIZE, heartbeat_tag

UDP_VERSION = 1
UDP_VERSION_AUTH = 2  # body + MAC (secured clusters)


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
    # True: the tracker holds preheat orders for this node, to take over TCP (`preheat`); absent otherwise
    preheat: bool | None = None


def seal(body: bytes, session_key: bytes) -> bytes:
    """An authenticated heartbeat datagram: the encoded UdpRequest (version 2), then its MAC."""
    return body + heartbeat_tag(session_key, body)


def unseal(datagram: bytes) -> tuple[bytes, bytes]:
    """(body, tag) of an authenticated datagram; the body still has to be decoded and the tag checked."""
    if len(datagram) <= HEARTBEAT_TAG_SIZE:
        raise ValueError("datagram too short for an authenticated heartbeat")
    return datagram[:-HEARTBEAT_TAG_SIZE], datagram[-HEARTBEAT_TAG_SIZE:]
