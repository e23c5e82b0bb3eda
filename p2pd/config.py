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
    # and only while no direct peer offers anything we could ask it for now: the pieces only cones held when the NAT
    # swarm's seed left reach the public peers within a second, so a symmetric node that fetched them over the relay
    # meanwhile put 0.03-0.13 F through it, by chance (BENCHMARKS, "The NAT swarm: slow paths last")
    slow_paths_last: bool = True
    # a peer in another zone (`--zone`, from the tracker's peer list) is asked only for pieces no peer of our own zone
    # holds: the link between zones is the thin one (a cross-AZ or inter-rack uplink), so each piece should cross it
    # about once and then spread inside the zone (BENCHMARKS, "Two zones")
    prefer_zone: bool = True
    # ...and node i of the m nodes of its zone asks other-zone peers first for the pieces p with p mod m = i (the
    # picker's rule 7): without it each zone-b node pulls whatever it lacks across the trunk, so a freshly announced
    # piece crossed 2-4 times (emulated 1.18-1.30 F over a thin trunk, simulated 1.33 F; striped 1.13-1.17 F emulated,
    # 1.13 F simulated, and 21.4 s against 23.3 s: BENCHMARKS, "Zone stripes")
    zone_stripe: bool = True
    max_queued_requests: int = 64  # a peer's requests we queue; more is a protocol error (bounds what it makes us hold)
    # the chain schedule (p2pd/protocol/chain.py): each node fetches everything from one predecessor (complete nodes
    # first, then the rest by node id), asking ahead of its announcements, and dials no one else. For a fleet
    # released at once over equal links, where one flow per link and no wait for a piece come nearest the bound
    # (the emulated 1 + 32: 1.09x against the swarm's 1.26-1.34x, BENCHMARKS.md); the swarm's rules take over
    # when the predecessor refuses a piece or goes away. Off by default: one slow node slows every node after it
    chain: bool = False
    chain_hold: float = 30.0  # a request for a piece we are still fetching waits this long for it, then REJECT
    chain_ahead: int = 8  # requests at our predecessor: 4 pieces it is still fetching, 4 sent or on their way
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
    # of two downloading nodes that need a punch to meet (the peer is behind a NAT), the lower id dials and the other
    # waits this long for it before it dials too (swarm._dial_is_theirs): both punching at once cost the NAT swarm's
    # symmetric nodes twice the birthday punches their gate holds, and its cones' auto-throttle yielded their upload
    # meanwhile (1.64-1.80x the bound; 1.21-1.31x with one punch per pair, BENCHMARKS.md). Longer than a punch
    # takes to come up (0.1-2 s)
    nat_dial_wait: float = 3.0
    # a peer we reach only through the relay is punched again (UDP) this often while we download, and moved to the
    # punched path once it is up: its first punch may have been refused (a node runs at most `max_birthday_punches`
    # at once) and the relay is a shared fallback far slower than a punch (issue #12: relay <= 0.1 F)
    relay_upgrade_every: float = 3.0
    defer_retry: float = 0.5  # before asking a peer again for pieces it told us to fetch elsewhere
    goodbye_grace: float = 0.5  # how long a GOODBYE may wait behind the piece being sent
    goodbye_drain: float = 1.0  # after GOODBYE, for the peer to read all we sent and close (no reset drops it)
    # -- what we send
    compress: bool = True  # zstd for pieces of files that compress (configs, tokenizers, tarballs)
    compressible_ratio: float = 0.8  # a file compresses if a 64 KiB sample shrinks below this fraction
    compress_min_saving: float = 0.9  # send a compressed piece only if it is below this fraction of the raw one
    seed_distinct: bool = True  # a complete node sends every piece once before it sends any piece twice
    serve_tail: int = 16  # a complete node always serves a peer missing at most this many pieces
    # a node (complete or not) uploads to at most this many peers at once and DEFERs the others (0: no cap):
    # sharing its uplink among every requester delays every copy, so pieces do not spread meanwhile (the
    # simulator, 100 nodes, 64 pieces: 2.14x the bound without, 1.14x with 4, 1.30x with 8; BENCHMARKS.md)
    # A peer holds a slot while its connection's writer is on a piece or requests wait for it; a piece the socket's
    # buffer takes at once (up to tcp_wmem, several 256 KiB pieces) frees the slot while its bytes still leave, so
    # with small pieces on a slow link the slots seldom bind: the 1 + 32 at 50 Mbit/s had unsent bytes for a median
    # of 11-16 peers per leecher at once. Slots that counted those bytes were slower there (33.2 s with 4, 36.2 s
    # with 8, against 28.4-34.3 s; BENCHMARKS.md, "Where the 1 + 32's upload slots bind")
    upload_slots: int = 4
    # ...but only with at least this many connections: with few requesters per node (the 1 + 8) sharing
    # costs nothing, and a DEFERred requester waits `defer_retry` before asking that peer again
    upload_slots_min_peers: int = 16
    # while a peer behind a symmetric NAT (fast paths only to public nodes) waits on our uplink, other requesters
    # are sent once per piece to another incomplete holder they reach over punched TCP (seeding.leave_to_few_paths;
    # the NAT swarm's symmetric nodes got 13-15 MiB/s of 23 without it); no such peer connected, no effect
    few_paths_first: bool = True
    # a node asks at most this many peers at once, past the same gate (0: no cap; the picker's rule 6): with
    # upload slots, a holder keeps its slot while it wants anything, so the first requesters held 4-10 slots
    # each and the late ones one (the simulated 1 + 32: p99 1.40x the bound); as many sources as a peer
    # gives slots leaves slots to the late ones (simulated p99 1.13x with 4). Off by default: the emulated 1 + 32
    # ran 7-17% slower with 4 and 7% with 6 (BENCHMARKS.md, the requester-side cap in the daemon; not for want of
    # CPU: that swarm takes as long on 16 cores as on 2)
    download_sources: int = 0
    # HAVEs of pieces completed within this many seconds leave together (and with any other frame to that peer),
    # once we have `have_batch_min_peers` connections: each HAVE alone cost our writer and the peer's reader a
    # wakeup, n of them per piece, and made the 1 + 32's daemons CPU-bound (BENCHMARKS.md, "HAVE batching").
    # Not in a small swarm: few HAVEs per piece, and a late HAVE there is a peer idle or a seed's DEFER
    have_batch: float = 0.1
    have_batch_min_peers: int = 16
    # ...or once this many pieces' HAVEs are held, whichever comes first (0: time only): the hold is there to
    # save wakeups, and a few pieces per frame run already saves most of them, while a fixed 0.1 s where pieces
    # come fast withholds many pieces of news (simulated 200 nodes at 250 MB/s, 2 MiB pieces: ~12 pieces per hold,
    # p50 1.13x -> 1.89x the bound; with 3: 1.15-1.17x over rng seeds 0-2, where 2 and 4 each had one run at
    # 1.5-1.6x). Slow swarms (the 1 + 32 at 12.5 Mbit/s: < 1 piece per 0.1 s a node) never reach it
    have_batch_pieces: int = 3
    # -- bad pieces (strikes with expiry, not bans for ever: a seeder with one rotten piece on disk repairs it)
    strikes_to_ban: int = 2  # bad pieces from one peer before we stop using it (one can be a disk's fault)
    strike_expiry: float = 120.0  # seconds a strike (and a ban) lasts: long enough for the peer to repair its copy
    integrity_wait: float = 10.0  # a piece that came only corrupt, with no other holder this long: fail (integrity)


PATHS = ("direct", "tcp-punch", "udp-punch", "relay")  # every path a node may race to reach a peer, in the order tried


@dataclass(frozen=True)
class TraversalConfig:
    """How a node reaches peers it cannot dial (NAT traversal), and the relay it may offer others."""

    paths: tuple[str, ...] = PATHS  # which paths the race may use (`--paths`)
    # -- the race (seconds from the start of a connect; a failed path starts the next at once)
    punch_after: float = 0.15  # a direct connect that works on a cluster network is done well within this
    # after tcp-punch has had its chance: with the TCP birthday punch (0.4-1.4 s to a symmetric node in the NAT swarm)
    # a cone <-> symmetric pair meets over TCP, and a UDP punch begun at 0.5 s won some such races for QUIC, a path
    # asked last (then one dial per pair kept it: swarm._dial_is_theirs); a punch that fails starts it at once, and
    # a TCP birthday punch under way holds it back until its outcome (traversal.PunchConnector.connect)
    udp_punch_after: float = 1.0
    relay_after: float = 2.5  # after the UDP punch's rendezvous (a punch under way, TCP or UDP, holds it back)
    udp_punch_timeout: float = 4.0  # rendezvous, spray and QUIC handshake (a spray this long hits with p > 0.9999)
    punch_timeout: float = 3.0  # rendezvous plus simultaneous open, the dial retried for the rest of it
    relay_pair_timeout: float = 5.0  # waiting at the relay for the other node
    rendezvous_timeout: float = 5.0  # a rendezvous request to the tracker
    remember_direct: float = 300.0  # a peer reached directly is dialled directly only, for this long
    max_answering: int = 32  # punches and relay meetings asked of us at once; more are refused (logged)
    # birthday punches (cone <-> symmetric, either side) at once: each costs a symmetric side 256 sockets and
    # ~1,000 probes/s; 4-8 at once starved a symmetric node's TCP paths in the NAT swarm (BENCHMARKS.md); 2 lets
    # a node punch with a full cone and a port-restricted one at the same time (the NAT matrix)
    max_birthday_punches: int = 2
    # TCP birthday punches at once (p2pd/protocol/tcp_punch.py), a gate of their own: the kernel resends the
    # hard side's SYNs, so one costs less CPU than a UDP one but holds up to 256 (hard) or ~2,000 (easy) sockets
    # for a second; 4 lets a symmetric node meet the NAT swarm's 4 cones at once, while its UDP punches race
    # in their own gate
    max_tcp_birthday_punches: int = 4
    # -- the relay this node offers (`p2pd run --relay`)
    offer_relay: bool = False
    relay_listen: tuple[str, int] = ("0.0.0.0", 7701)
    relay_rate: float | None = None  # bytes/s over all relayed pairs; None = no cap
    relay_max_pairs: int = 64
    relay_idle_timeout: float = 60.0  # longer than the peers' keepalive interval, so only dead pairs go


@dataclass(frozen=True)
class AutoThrottleConfig:
    """How a node yields its link to the other traffic it shares it with (p2pd/protocol/autothrottle.py)."""

    # on: p2pd's own bytes are counted as the wire sees them (socket queues included, p2pd/auto_throttle.py), so a
    # node alone on its link never yields to itself; loopback interfaces stay off (nothing to share)
    enabled: bool = True
    interface: str | None = None  # None: the interface of the route to the tracker (or of the listen address)
    link_capacity: float | None = None  # bytes/s per direction; None: learned (the highest rate the interface carried)
    reserve_fraction: float = 0.20  # headroom left to other traffic while it grows: it shows its demand by using it
    reserve_rate: float | None = None  # the same as an absolute bytes/s (`--reserve 5MB/s`); overrides the fraction
    tick: float = 0.25  # counters read this often: a TCP flow on a LAN grows into new room within a few ticks
    smoothing: float = 0.2  # seconds; time constant of the rate averages (a few ticks: damps TCP's sawtooth)
    full_smoothing: float = 0.5  # seconds; the slower average that decides "the link is full" (paced senders burst)
    quiet_fraction: float = 0.03  # other traffic under this share of capacity is noise (ssh, monitoring, heartbeats)
    quiet_min: float = 64_000.0  # bytes/s; ...and under this absolute rate (slow links)
    # the headroom shrinks to this once other traffic stopped growing: a paced service's bursts no longer read as
    # demand (only other traffic that grows does), so a thin margin suffices and p2pd uses what is left
    min_headroom_fraction: float = 0.015
    settle: float = 1.0  # seconds other traffic must stay below the link's top before the headroom shrinks...
    headroom_halving: float = 0.25  # ...then it halves this often (reserve to the minimum in about a second)
    growth_fraction: float = 0.10  # other traffic that grew by this share of the reserve (above its settled level)
    # is a demand: the whole reserve comes back (noise and a paced sender's bursts stay under it)
    settled_smoothing: float = 2.0  # seconds; the settled level is this slow an average (a trough is not a level)
    # The floor: p2pd never drops below it, so transfers slow down but never stall (a peer that hears nothing for the
    # 1 s `stall_timeout` while it waits on requests drops us). What that needs is per connection, not a share of the
    # link: each connection a 16 KiB chunk (ratelimit.MIN_CHUNK) every half second, twice inside the stall timeout.
    # Whatever the floor holds beyond that is taken from a greedy service for its whole run (3 % of the link held it
    # at 0.87-0.91 of its idle rate, goal >= 0.9; BENCHMARKS.md 2026-11-27 wt-auto5)
    floor_per_connection: float = 32 * 1024.0  # bytes/s per open peer connection (Sample.connections)
    floor_min: float = 64 * 1024.0  # bytes/s; with few connections: two more may open before the next tick
    floor_fraction: float = 0.0  # a share of capacity on top (none: the floor is for moving, not for p2pd's progress)
    backoff: float = 0.5  # while the link stays full, p2pd's limit shrinks by this factor per tick at least
    first_backoff: float = 0.25  # the first yield on a full link: straight to a quarter (queues drain meanwhile)
    ramp_doubling: float = 0.25  # seconds; when room appears the limit may double this often (floor to link: ~1 s),
    ramp_hold: float = 0.5  # ...after the link was last full (a service growing into the room shows up by then)
    # ...starting from at least this share of capacity: from the floor (a few connections' 32 KiB/s) the doublings
    # would take 0.75 s longer to reach a paced service's free half (the floor was 3 % when the ramp was tuned)
    ramp_from_fraction: float = 0.03
    probe_every: float = 3.0  # seconds between tries above a learned capacity (it may be an underestimate)...
    probe_fraction: float = 0.05  # ...each one tick of this share more (on a full link: ~0.5 % of a service's rate)
    # seconds other traffic must stay above quiet before p2pd yields (counter skew is a blip). Two ticks: at 0.25 s
    # (one tick) the 1 + 8 emulated swarm's nodes yielded to themselves 29 times in one run (1.54x against 1.16-1.20x;
    # BENCHMARKS.md 2026-11-27), although a greedy newcomer then waits at its TCP share for the half second
    onset: float = 0.5
    min_learned_capacity: float = 1e6  # bytes/s; a learned rate under 8 Mbit/s is a link not yet used, not its size
    release_after: float = 0.75  # seconds other traffic must stay quiet before p2pd drops its limit
    # TCP/IP + Ethernet headers on p2pd's payload (1448 of 1514 bytes, plus options): the most it can be, and what is
    # assumed until the interface shows less (with GSO/TSO its counters see one header per 64 KB: ~0.5 %, and the 6 %
    # hid a newcomer under ~2 MB/s beside p2pd at 200 Mbit/s; BENCHMARKS.md 2026-11-27)
    header_overhead: float = 0.06
    ack_overhead: float = 0.04  # ACKs on the reverse direction, per byte of payload p2pd moves the other way (the most)
    # the overheads as the interface counts them are learned while p2pd moves most of a direction's bytes and nothing
    # else is suspected: the median of the last `overhead_windows` windows of `overhead_window` s (other traffic only
    # adds, a counter skew comes and goes; a median holds against both), plus a margin for the skew that remains
    overhead_window: float = 1.0
    overhead_windows: int = 15
    overhead_margin: float = 0.01  # 0.25 MB/s at 200 Mbit/s: a newcomer above quiet + this is seen
    overhead_min_share: float = 0.25  # a window teaches only while p2pd's bytes are at least this share of capacity


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
    # -- resource bounds (issue #14): whoever can reach the peer port must not exhaust fds or memory
    max_incoming: int = 512  # accepted peer connections at once; also at most half the fds (RLIMIT_NOFILE)
    max_incoming_per_addr: int = 32  # per source address: above a node's artifacts at once, far below the total
    open_files_per_artifact: int = 64  # open fds per artifact's files (an LRU): a 100,000-file model fits 1,024 fds
    goodbye_timeout: float = 2.0  # on stop: for the tracker's LEAVE, then again for every peer's GOODBYE
    failed_swarm_wait: float = 10.0  # a failed download's worker-thread write finishes before a retry reopens its files
    # NAT detection (p2pd/nat_detect.py), against the tracker's STUN server
    nat_detect: bool = True
    nat_check_every: float = 20.0  # one Binding request: notices a new mapping, and keeps it alive (expiry ~30 s)
    nat_reclassify_every: float = 300.0  # the full RFC 3489 tests again, in case the NAT's behaviour changed
    traversal: TraversalConfig = field(default_factory=TraversalConfig)
    # global budgets (tracker/budgets.py): a tracker that stops answering leaves the node on its last
    # share this long (a restart or failover must not unleash the cluster), then on its own limits
    share_grace: float = 30.0
    auto_throttle: AutoThrottleConfig = field(default_factory=AutoThrottleConfig)
    # the cache (p2pd/cache.py): None = no cap; evicting down to `cache_low` of the cap frees room for a few
    # more fetches at once, so a node fetching one model after another evicts in batches, not every time
    cache_max: int | None = None
    cache_low: float = 0.9
    metrics_listen: tuple[str, int] | None = None  # Prometheus /metrics over HTTP (off unless given: no open port)
    # Trust (docs/security.md): the cluster's join secret (bytes, from a file or the environment, never argv);
    # None is allowed only with `insecure`: an open cluster, chosen explicitly, never the default
    join_secret: bytes | None = field(default=None, repr=False)
    insecure: bool = False
    # TLS 1.3 around every peer stream (p2pd/tls.py), for clusters whose artifacts are secret; off by default:
    # it costs CPU per byte and the zero-copy paths (docs/security.md "Confidentiality" has the measured cost)
    encrypt: bool = False
    trusted_publishers: tuple[str, ...] = ()  # node ids whose env artifacts this node unpacks; () = the tracker's list
    # who runs an env archive's code (conda-unpack, its python) when the daemon is root (p2pd/runas.py): never
    # root; None = the `p2pd` service user if it exists, else envs are refused with an error naming the option
    unpack_user: str | None = None
