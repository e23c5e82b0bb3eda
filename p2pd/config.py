"""Every tunable default of a node daemon, in one place.

The CLI builds a `DaemonConfig` from its flags (whose defaults are read from here), the daemon hands
`config.swarm` to every swarm, and the swarm hands its parts to the connections it runs, so a number
that decides behaviour is written down once, with the reason it has the value it has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class SwarmConfig:
    """How one artifact's swarm talks to its peers (the same for every artifact of a node)."""

    # -- peers
    max_peers: int = 24  # connections per artifact: enough to fan pieces out fast, few enough for high per-peer rates
    peers_per_lookup: int = 50  # peers asked of the tracker per lookup (a random sample of the swarm)
    pipeline_depth: int = 2  # piece requests in flight per peer: hides one round trip; more only lengthens the tail
    # per peer, by its measured rate (p2pd/protocol/pacing.py): a slow path holds one request, a fast one more
    pipeline_max: int = 4  # a fast peer's depth at most (1 GB/s and 256 KiB pieces: 4 cover a 1 ms turnaround)
    request_turnaround: float = 0.001  # piece arrives -> verified -> next request at the peer, on a fast path
    slow_piece_time: float = 1.0  # a peer that needs longer than this for one piece holds one request
    # a relayed peer is asked only for pieces no direct peer holds: relay capacity is shared and slow (FINDINGS §3);
    # in a swarm whose direct peers are few and busy, a relayed node then finishes later (BENCHMARKS, NAT swarm)
    prefer_direct: bool = True
    max_queued_requests: int = 64  # a peer's requests we queue; more is a protocol error (bounds what it makes us hold)
    # -- timing (seconds)
    connect_timeout: float = 3.0  # a TCP connect on a cluster network completes in milliseconds or not at all
    handshake_timeout: float = 5.0  # from connect (or accept) to the peer's HANDSHAKE
    stall_timeout: float = 1.0  # no byte for this long while requests are pending: drop the peer, ask others
    idle_timeout: float = 45.0  # nothing at all (not even KEEPALIVE) for this long: the peer is gone
    keepalive_every: float = 10.0  # well inside idle_timeout, so a quiet but live peer is never dropped
    retry_after_failed_connect: float = 2.0  # before dialling a peer again whose connect or handshake failed
    retry_after_stall: float = 5.0  # before dialling again a peer we dropped for stalling
    peer_lookup_first: float = 0.25  # between the first two tracker lookups of a download (then doubling)...
    peer_lookup_every: float = 2.0  # ...up to this while connected to someone,
    peer_lookup_alone: float = 0.5  # ...or this while connected to no one,
    peer_lookup_failing: float = 5.0  # ...or this while the tracker does not answer
    defer_retry: float = 0.5  # before asking a peer again for pieces it told us to fetch elsewhere
    goodbye_grace: float = 0.5  # how long a GOODBYE may wait behind the piece being sent
    goodbye_drain: float = 1.0  # after GOODBYE, for the peer to read all we sent and close (no reset drops it)
    # -- what we send
    compress: bool = True  # zstd for pieces of files that compress (configs, tokenizers, tarballs)
    compressible_ratio: float = 0.8  # a file compresses if a 64 KiB sample shrinks below this fraction
    compress_min_saving: float = 0.9  # send a compressed piece only if it is below this fraction of the raw one
    seed_distinct: bool = True  # a complete node sends every piece once before it sends any piece twice
    serve_tail: int = 16  # a complete node always serves a peer missing at most this many pieces


PATHS = ("direct", "tcp-punch", "relay")  # every path a node may race to reach a peer, in the order tried


@dataclass(frozen=True)
class TraversalConfig:
    """How a node reaches peers it cannot dial (NAT traversal), and the relay it may offer others."""

    paths: tuple[str, ...] = PATHS  # which paths the race may use (`--paths`)
    # -- the race (seconds from the start of a connect; a failed path starts the next at once)
    punch_after: float = 0.15  # a direct connect that works on a cluster network is done well within this
    relay_after: float = 1.0  # a punch between two cones takes a few round trips to the tracker; relays are slow
    punch_timeout: float = 3.0  # rendezvous plus simultaneous open, the dial retried for the rest of it
    relay_pair_timeout: float = 5.0  # waiting at the relay for the other node
    rendezvous_timeout: float = 5.0  # a rendezvous request to the tracker
    remember_direct: float = 300.0  # a peer reached directly is dialled directly only, for this long
    max_answering: int = 32  # punches and relay meetings asked of us at once; more are refused (logged)
    # -- the relay this node offers (`p2pd run --relay`)
    offer_relay: bool = False
    relay_listen: tuple[str, int] = ("0.0.0.0", 7701)
    relay_rate: float | None = None  # bytes/s over all relayed pairs; None = no cap
    relay_max_pairs: int = 64
    relay_idle_timeout: float = 60.0  # longer than the peers' keepalive interval, so only dead pairs go


@dataclass(frozen=True)
class DaemonConfig:
    """One node daemon: where it listens, which trackers it uses, its own limits and its swarms' config."""

    trackers: list[tuple[str, int]]
    listen: tuple[str, int] = ("0.0.0.0", 7700)
    data_dir: Path = Path("/var/lib/p2pd")
    egress_limit: float | None = None  # bytes/s; None = no cap of this node's own
    ingress_limit: float | None = None
    advertise: str | None = None  # address peers dial, when it is not the listen address (the tracker fills in 0.0.0.0)
    labels: dict[str, str] = field(default_factory=dict)
    swarm: SwarmConfig = field(default_factory=SwarmConfig)
    socket_path: Path | None = None
    tracker_wait: float = 30.0  # a node booting before its tracker waits this long for it instead of exiting
    listen_backlog: int = 512  # pending peer connections the kernel queues while we accept
    goodbye_timeout: float = 2.0  # on stop: for the tracker's LEAVE, then again for every peer's GOODBYE
    failed_swarm_wait: float = 10.0  # a failed download's worker-thread write finishes before a retry reopens its files
    # NAT detection (p2pd/nat_detect.py), against the tracker's STUN server
    nat_detect: bool = True
    nat_check_every: float = 20.0  # one Binding request: notices a new mapping, and keeps it alive (expiry ~30 s)
    nat_reclassify_every: float = 300.0  # the full RFC 3489 tests again, in case the NAT's behaviour changed
    traversal: TraversalConfig = field(default_factory=TraversalConfig)
