"""Every setting of a tracker process, in one place: `p2p-tracker serve` builds one from its flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from p2pd.protocol.auth import ClusterSecret
    from tracker.publishers import Publishers
    from tracker.stun import StunSettings


@dataclass(frozen=True)
class RelayOptions:
    """The tracker's own relay (p2pd/relay.py) for nodes that cannot reach each other."""

    host: str
    port: int
    advertise: str | None  # the address nodes dial when the listen address is not it
    rate: float | None  # bytes/s over all relayed pairs; None: no cap
    max_pairs: int
    idle_timeout: float


@dataclass(frozen=True)
class TrackerConfig:
    listen: tuple[str, int] = ("0.0.0.0", 7070)  # TCP RPC, and UDP heartbeats on the same port
    interval: float = 1.0  # heartbeat interval told to nodes; 3 missed = dropped
    store: str = "memory"  # 'memory', or redis://HOST:PORT/DB shared by replicas
    store_prefix: str = "p2p:"  # key prefix in Redis: one per tracker group sharing a Redis
    admin_listen: tuple[str, int] | None = None  # HTTP admin API (off unless given; never without a token)
    admin_token: str | None = None
    udp: bool = True  # accept UDP heartbeats
    ready_file: Path | None = None  # {tcp_port, udp_port, admin_port, pid} as JSON once listening
    stun: StunSettings | None = None  # STUN for NAT detection (the CLI's default: on the heartbeat port); None: off
    relay: RelayOptions | None = None  # None: this tracker relays nothing (the CLI's default: on)
    join: ClusterSecret | None = None  # the cluster's join secret; None only with --insecure (docs/security.md)
    publishers: Publishers | None = None  # who publishes which names; None: every member (tracker/publishers.py)
    limits: TrackerLimits = field(default_factory=lambda: TrackerLimits())


@dataclass(frozen=True)
class TrackerLimits:
    """Resource bounds of the TCP RPC port (issue #14 row 6): anyone who reaches it is hostile until proven not."""

    max_connections: int = 4096  # at once: a signal channel per node plus short RPCs; also at most half the fds
    max_per_addr: int = 256  # per source address: nodes behind one NAT share it, one host alone needs a few
    idle_timeout: float = 120.0  # a connection with no request running and no byte for this long is closed
    frame_timeout: float = 30.0  # a frame begun must be complete within this (a 16 MiB publish takes < 1 s)
    max_manifest_bytes: int = 8 << 20  # one manifest: ~100,000 files or 500,000 pieces; more is refused
    # all the manifests one publisher (signing node, secured clusters) has published: 128 of the largest, or
    # thousands of usual ones (tens of KiB); a member's leaked key cannot fill the tracker's memory or Redis
    max_publisher_bytes: int = 1 << 30
