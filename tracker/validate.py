"""Validation of everything a node or an admin sends to the tracker.

The tracker is shared by every node of a cluster, so one buggy or hostile node must not be able to
crash it or make it hold unbounded memory: every field is type-checked and bounded here, once, and
the front ends (TCP RPC, UDP heartbeats, HTTP admin) all go through these functions. Errors carry a
code of `p2pd.errors.ErrorCode` (`BAD_REQUEST`, `NOT_FOUND`, ...) that the front ends report as they are.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Any

from p2pd.errors import ErrorCode
from p2pd.protocol import manifest
from p2pd.rpc import RpcError

NODE_ID_RE = re.compile(r"^[0-9a-f]{32}$")
ARTIFACT_ID_RE = re.compile(r"^[0-9a-f]{64}$")
NAME_RE = manifest.NAME_RE

MAX_LABELS = 32
MAX_LABEL_LEN = 128
MAX_VERSION_LEN = 64
MAX_HOST_LEN = 255
MAX_HOLDINGS = 4096
MAX_PEERS = 1000
NAT_TYPE_RE = re.compile(r"^[a-z][a-z-]{0,31}$")

# (nat type, mapped address or None), as a node reports it with `register`
NatInfo = tuple[str, tuple[str, int] | None]


class TrackerError(RpcError):
    """A request the tracker refuses, with its `ErrorCode` (docs/interfaces.md lists them)."""


def bad(message: str) -> TrackerError:
    return TrackerError(ErrorCode.BAD_REQUEST, message)


def node_id(v: Any) -> str:
    if not isinstance(v, str) or not NODE_ID_RE.match(v):
        raise bad(f"node_id must be 32 lowercase hex chars, got {str(v)[:40]!r}")
    return v


def artifact_id(v: Any) -> str:
    if not isinstance(v, str) or not ARTIFACT_ID_RE.match(v):
        raise bad(f"artifact_id must be 64 lowercase hex chars, got {str(v)[:70]!r}")
    return v


def name(v: Any) -> str:
    if not isinstance(v, str) or not NAME_RE.match(v):
        raise bad(f"invalid name {str(v)[:80]!r}: expected NAME:TAG, e.g. llama-3-8b:v2")
    return v


def addr(v: Any) -> tuple[str, int]:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise bad("addr must be [host, port]")
    host, port = v
    if not isinstance(host, str) or len(host) > MAX_HOST_LEN:
        raise bad("addr host must be a string of at most 255 chars")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise bad(f"addr port must be an integer in 1..65535, got {port!r}")
    return host, port


def labels(v: Any) -> dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, dict) or len(v) > MAX_LABELS:
        raise bad(f"labels must be a map of at most {MAX_LABELS} entries")
    for k, x in v.items():
        if not isinstance(k, str) or not isinstance(x, str) or len(k) > MAX_LABEL_LEN or len(x) > MAX_LABEL_LEN:
            raise bad(f"labels must map strings to strings of at most {MAX_LABEL_LEN} chars")
    return v


def version(v: Any) -> str:
    if v is None:
        return ""
    if not isinstance(v, str) or len(v) > MAX_VERSION_LEN:
        raise bad(f"version must be a string of at most {MAX_VERSION_LEN} chars")
    return v


def nat(v: Any) -> NatInfo | None:
    """`{"type": str, "mapped": [ip, port] | null}` from `register` (absent: an older node).

    The type is any short lowercase name (`p2pd.protocol.nat.NatType` lists today's), so a newer node
    with a name this tracker does not know still registers; the mapped host must be an IP literal."""
    if v is None:
        return None
    if not isinstance(v, dict):
        raise bad("nat must be a map {type, mapped}")
    t = v.get("type")
    if not isinstance(t, str) or not NAT_TYPE_RE.match(t):
        raise bad(f"nat type must be a short lowercase name such as port-restricted-cone, got {str(t)[:40]!r}")
    m = v.get("mapped")
    if m is None:
        return t, None
    host, port = addr(m)
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise bad(f"nat mapped host must be an IP address, got {host[:60]!r}") from None
    return t, (host, port)


def holdings(v: Any) -> dict[str, float]:
    """{artifact_id: progress in [0, 1]}; ints are accepted (msgpack may send 1 for 1.0)."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise bad("holdings must be a map of artifact_id to progress")
    if len(v) > MAX_HOLDINGS:
        raise bad(f"holdings has {len(v)} entries; at most {MAX_HOLDINGS} allowed")
    out: dict[str, float] = {}
    for k, p in v.items():
        artifact_id(k)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p <= 1.0) or math.isnan(p):
            raise bad(f"progress of {k[:12]} must be a number in 0..1, got {p!r}")
        out[k] = float(p)
    return out


POLICY_KEYS = ("egress_limit", "ingress_limit")


def policy(v: Any) -> dict[str, Any]:
    """Cluster policy pushed with heartbeat replies: per-node caps in bytes/s (null = no cap)."""
    if not isinstance(v, dict):
        raise bad("policy must be a map")
    out: dict[str, Any] = {}
    for k, x in v.items():
        if k not in POLICY_KEYS:
            raise bad(f"unknown policy key {str(k)[:40]!r}; known: {', '.join(POLICY_KEYS)}")
        if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0 or math.isinf(x)):
            raise bad(f"policy {k} must be a positive number of bytes/s or null, got {x!r}")
        if x is not None:
            out[k] = float(x)
    return out


def max_peers(v: Any) -> int:
    if v is None:
        return 50
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise bad(f"max must be a non-negative integer, got {v!r}")
    return min(v, MAX_PEERS)
