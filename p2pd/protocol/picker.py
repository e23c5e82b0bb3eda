"""Which piece to ask which peer for (sans-IO).

Policy, in order:
1. Never ask a peer for a piece it has not announced, and never for one we have.
2. Rarest first: among the pieces this peer can give us, those held by the fewest connected peers.
   Pieces another peer already has are left for that peer to serve, which keeps the seed's upload
   close to one copy of the artifact (duplicate seed uploads are what keep BitTorrent from the bound).
3. Ties are broken by this node's own random permutation of the pieces, so different nodes start on
   different pieces and the first wave of requests spreads across the seed.
4. Endgame: once every missing piece is requested somewhere, an idle peer may duplicate an in-flight
   request (at most `max_dup` copies); the first copy to arrive wins and the others are cancelled.
   It duplicates first the piece whose best source so far is the slowest (`set_rate`), so a piece
   outstanding at a slow path is fetched again from a fast one and never holds the end back.
5. Paths by their speed: each peer has a path rank (0: direct TCP or punched TCP, higher: slower
   paths such as a relay). A peer is asked only for pieces that no peer of a better rank has
   announced, so a relay moves only what no direct peer holds: the relay's capacity is shared and
   far below a TCP path's (FINDINGS §3: 4–8 MB/s against ~1 GB/s), and a direct peer that has the
   piece will ask for it. The same holds for endgame duplicates. A better peer's DEFER does not hand
   the piece to a slower path: the deferring node knows who else announced it, not that they are
   reachable from here only slowly, and the NAT swarm showed what that costs (a symmetric node sent
   by complete public peers to cones behind udp-punch took 3x longer than the rest). The piece
   waits for `undefer_all` (`defer_retry`, 0.5 s), and the better peer, which defers once per
   requester and piece, serves it when asked again.
   A peer added as `last_resort` (the daemon: a UDP punch or a relay) is asked only while no other
   peer offers a piece we could ask it for now (announced there, missing here, not in flight, not
   deferred there). Rank alone still let a symmetric node fetch over the relay every piece that, when
   the seed left, only cones held, although its public peers held hundreds of others it still
   needed and would fetch those pieces from the cones within a second: relay 0.03–0.13 F per run of
   the NAT swarm, by chance (BENCHMARKS.md). Such a peer that was refused is `held_back`;
   `release_held_back` says when the others have run dry, so the caller asks it then.
6. Sources at once (`source_cap`, with at least `source_cap_min_peers` peers): while that many peers
   have requests of ours outstanding (`serving`), a peer not among them is not asked. Upload slots
   (seeding.py) keep a holder as long as it wants anything, so without this the first requesters of a
   large swarm hold many slots each and the late ones live on one (BENCHMARKS.md, the 1 + 32: p99
   1.40x the bound; with a cap equal to the upload slots 1.14x). Never a stall: the cap holds only
   while some serving peer still offers a piece we miss that is neither in flight nor deferred there,
   and not in the endgame; a serving peer that DEFERs or runs dry stops counting once its requests
   are answered.
7. Zone stripes (`set_stripe`, `add_peer(cross_zone=True)`): with zones, node i of the m nodes its zone
   knows (`zone_stripe`) asks peers of another zone first for the pieces p with p mod m = i, its
   stripe, so each piece crosses the thin link between zones about once and then spreads inside the
   zone from its stripe's owner (rule 5 already keeps a piece a zone mate holds off the other-zone
   peers). While a piece of its stripe is still to fetch across (missing, not in flight, held by no
   zone mate, announced by an other-zone peer), an other-zone peer is asked for nothing outside the
   stripe; once the stripe is all held or in flight, anything (a zone mate gone or slow leaves its
   stripe to the others; the endgame is unchanged). A DEFERred stripe piece waits for `undefer_all`,
   as in rule 5: a seed defers what it sent once, and falling back then crossed for the mates'
   stripes. Two zone mates may briefly disagree on m (different lookups): a gap or an overlap, never
   a stall.
8. Chain (`chain_source`, the daemon's `--chain`): while a chain source is set, only it is asked, for
   the lowest missing piece not in flight nor deferred there, whether or not it has announced it:
   every node of the chain fetches in the same order, so its predecessor is about to have the piece
   and holds the request until it does, and the piece leaves each node as soon as it is verified
   there. Rules 1-7 stand aside; they take over as soon as the source is unset (the caller unsets it
   when the source refuses a piece) or removed.

The picker also owns the block state, the one record of requests in flight: `inflight` (piece ->
peers asked, until the piece is verified or the request fails) and, per peer, `pending` (asked and
not yet arrived: what fills the pipeline and what the stall watchdog waits for) and `cancelled`
(asked, then cancelled: a copy may still be on the wire, and it is dropped rather than taken as a
protocol violation). Sessions ask it whether an arriving piece was requested; nobody else keeps a copy.

Sets are ints in *permuted* bit space (bit k = the k-th piece of this node's permutation), so "lowest
set bit" is "first in my random order" and each decision is a handful of C-speed big-int operations.
"""

from __future__ import annotations

import collections
import enum
import random
from collections.abc import Hashable, Iterable, Mapping
from typing import Generic, TypeVar

from p2pd.protocol.bitfield import indices

Peer = TypeVar("Peer", bound=Hashable)  # whatever identifies a peer to the caller (the daemon: its PeerSession)
CANCELLED_MEMORY = 64  # cancelled requests remembered per peer (a cancel crosses at most a pipeline's worth)


def zone_stripe(node_id: str, zone: str, zones: Mapping[str, str]) -> tuple[int, int]:
    """Rule 7's stripe of this node: (its index among its zone's nodes, their count), or (0, 0) when
    the rule has nothing to do (no zone of ours, or no other zone known: one zone, no thin link).

    `zones`: node id -> zone, from the tracker's peer lists. The index is the node's place among its
    zone's ids in sorted order, so nodes that know the same mates agree without talking."""
    if not zone or not any(z != zone for z in zones.values()):
        return (0, 0)
    below = count = 0
    for nid, z in zones.items():
        if z == zone and nid != node_id:
            count += 1
            below += nid < node_id
    return (below, count + 1)


class Arrival(enum.Enum):
    """What an arriving piece is to us."""

    EXPECTED = "expected"  # we asked this peer for it and still want it
    LATE = "late"  # we asked, then cancelled (another copy won): read it and drop it
    UNREQUESTED = "unrequested"  # never asked: the peer breaks the protocol


class Picker(Generic[Peer]):
    def __init__(
        self,
        num_pieces: int,
        have: Iterable[int] = (),
        *,
        seed: int | None = None,
        max_dup: int = 2,
        source_cap: int = 0,
        source_cap_min_peers: int = 0,
    ) -> None:
        self.n = num_pieces
        rng = random.Random(seed)
        self.perm = list(range(num_pieces))  # position -> piece
        rng.shuffle(self.perm)
        self.pos = [0] * num_pieces  # piece -> position
        for k, p in enumerate(self.perm):
            self.pos[p] = k
        self.full = (1 << num_pieces) - 1
        self.missing = self.full
        for p in have:
            self.missing &= ~(1 << self.pos[p])
        self.avail = [0] * num_pieces
        self.levels: list[int] = [self.full]  # levels[a] = positions held by exactly a peers
        self.peer_mask: dict[Peer, int] = {}
        self.inflight: dict[int, set[Peer]] = {}  # piece -> peers asked
        self.inflight_mask = 0
        self.max_dup = max_dup
        self.deferred: dict[Peer, int] = {}  # per peer: positions it asked us to fetch elsewhere for now
        self.pending: dict[Peer, set[int]] = {}  # per peer: pieces asked and not yet arrived
        self.cancelled: dict[Peer, collections.deque[int]] = {}  # per peer: pieces asked, then cancelled
        self.rank: dict[Peer, int] = {}  # per peer: its path's rank (0 best); only peers ranked above 0
        self.rate: dict[Peer, float] = {}  # per peer: measured delivery rate, bytes/s (endgame order)
        self.source_cap = source_cap  # peers asked at once (rule 6; 0: no cap)...
        self.source_cap_min_peers = source_cap_min_peers  # ...with at least this many peers known
        self.serving: set[Peer] = set()  # peers with requests of ours pending (rule 6's count)
        self.cross: set[Peer] = set()  # peers of another zone (rule 7)
        self.stripe = 0  # positions of this node's zone stripe (rule 7; 0: the rule is off)
        self.stripe_of = (0, 0)  # (index, count) the stripe was made from
        self.last_resort: set[Peer] = set()  # peers asked only when no other offers anything (rule 5)
        self.held_back: set[Peer] = set()  # last-resort peers refused while another peer offered something
        self.chain_source: Peer | None = None  # rule 8: the one peer asked while set
        self._chain_next = 0  # rule 8: every piece below this one is ours

    # -- knowledge about peers -------------------------------------------------------------------
    def to_mask(self, pieces: Iterable[int]) -> int:
        m = 0
        for p in pieces:
            m |= 1 << self.pos[p]
        return m

    def add_peer(
        self, peer: Peer, pieces: Iterable[int], *, rank: int = 0, cross_zone: bool = False, last_resort: bool = False
    ) -> None:
        """A peer's bitfield; `rank`: its path (0: direct or punched TCP, higher: slower, a relay);
        `cross_zone`: it is in another zone (rule 7: asked first for our stripe); `last_resort`: ask it only while no
        other peer offers anything (rule 5)."""
        if peer in self.peer_mask:
            raise ValueError(f"peer {peer!r} already known")
        mask = self.to_mask(pieces)
        self.peer_mask[peer] = 0
        if rank:
            self.rank[peer] = rank
        if cross_zone:
            self.cross.add(peer)
        if last_resort:
            self.last_resort.add(peer)
        if mask == self.full:
            self.peer_mask[peer] = mask
            self.levels.insert(0, 0)
            self.avail = [a + 1 for a in self.avail]
            return
        for k in indices(mask):
            self._inc(peer, k)

    def peer_have(self, peer: Peer, piece: int) -> bool:
        """Record a HAVE; return True when it makes this peer newly interesting to us."""
        k = self.pos[piece]
        bit = 1 << k
        if self.peer_mask[peer] & bit:
            return False
        self._inc(peer, k)
        return bool(self.missing & bit)

    def remove_peer(self, peer: Peer) -> list[int]:
        """Forget a peer; return the pieces whose requests to it are now void."""
        mask = self.peer_mask.pop(peer)
        self.deferred.pop(peer, None)
        self.pending.pop(peer, None)
        self.serving.discard(peer)
        self.cancelled.pop(peer, None)
        self.rank.pop(peer, None)
        self.rate.pop(peer, None)
        self.cross.discard(peer)
        self.last_resort.discard(peer)
        self.held_back.discard(peer)
        if peer == self.chain_source:
            self.chain_source = None
        if mask == self.full and self.levels[0] == 0:
            self.levels.pop(0)
            self.avail = [a - 1 for a in self.avail]
        else:
            for k in indices(mask):
                p = self.perm[k]
                a = self.avail[p]
                bit = 1 << k
                self.levels[a] &= ~bit
                self.levels[a - 1] |= bit
                self.avail[p] = a - 1
        released = [p for p, peers in self.inflight.items() if peer in peers]
        for p in released:
            self._release(peer, p)
        return released

    def _inc(self, peer: Peer, k: int) -> None:
        bit = 1 << k
        self.peer_mask[peer] |= bit
        p = self.perm[k]
        a = self.avail[p]
        if a + 1 == len(self.levels):
            self.levels.append(0)
        self.levels[a] &= ~bit
        self.levels[a + 1] |= bit
        self.avail[p] = a + 1

    def set_rank(self, peer: Peer, rank: int, *, cross_zone: bool = False) -> None:
        """A known peer's path rank and zone, learned after its bitfield (a connection it opened to us
        before the tracker's lists told us its zone)."""
        if peer not in self.peer_mask:
            return
        if rank:
            self.rank[peer] = rank
        else:
            self.rank.pop(peer, None)
        if cross_zone:
            self.cross.add(peer)
        else:
            self.cross.discard(peer)

    def set_rate(self, peer: Peer, rate: float) -> None:
        """The peer's measured delivery rate (bytes/s): which endgame duplicates help most."""
        if peer in self.peer_mask:
            self.rate[peer] = rate

    def _held_by_better(self, rank: int) -> int:
        """Positions that some peer of a better path rank than `rank` holds (deferred there or not)."""
        m = 0
        for q, mask in self.peer_mask.items():
            if self.rank.get(q, 0) < rank:
                m |= mask
        return m

    def set_stripe(self, index: int, count: int) -> None:
        """Rule 7: this node's zone stripe, from `zone_stripe` (count below 2: the rule is off)."""
        if (index, count) == self.stripe_of:
            return
        self.stripe_of = (index, count)
        self.stripe = 0 if count < 2 or not 0 <= index < count else self.to_mask(range(index, self.n, count))

    def _stripe_first(self, cand: int, better: int) -> int:
        """Rule 7 for an other-zone peer: of the candidates, our stripe's; none while our stripe still has a
        piece to fetch across that some other-zone peer offers (that peer is asked for it); else all."""
        mine = cand & self.stripe
        if mine:
            return mine
        todo = self.stripe & self.missing & ~self.inflight_mask & ~better
        if todo:
            for q in self.cross:
                if self.peer_mask[q] & todo:  # deferred there or not: a DEFER lasts until `undefer_all`
                    return 0
        return cand

    def _askable(self, peers: Iterable[Peer]) -> int:
        """Positions these peers could be asked for now: announced there and not deferred there, missing here and
        not in flight (0 in the endgame, when everything missing is in flight)."""
        free = self.missing & ~self.inflight_mask
        if not free:
            return 0
        m = 0
        for q in peers:
            m |= self.peer_mask[q] & ~self.deferred.get(q, 0)
        return m & free

    def _offered_by_others(self) -> int:
        """Positions a peer that is not a last resort could be asked for now (rule 5's last resorts wait for none)."""
        return self._askable(q for q in self.peer_mask if q not in self.last_resort)

    def release_held_back(self) -> list[Peer]:
        """The held-back last-resort peers, once no other peer offers anything: the caller asks them now."""
        if not self.held_back or self._offered_by_others():
            return []
        out = list(self.held_back)
        self.held_back.clear()
        return out

    def knows(self, peer: Peer) -> bool:
        """Has this peer's bitfield been added (are we downloading from it)?"""
        return peer in self.peer_mask

    # -- decisions ---------------------------------------------------------------------------------
    def interesting(self, peer: Peer) -> bool:
        return bool(self.peer_mask.get(peer, 0) & self.missing)

    @property
    def capping(self) -> bool:
        """Is rule 6 in force (a cap, and enough peers)? Then a peer that stops serving frees a place,
        and the caller asks its other peers again (not only the one that answered)."""
        return bool(self.source_cap) and len(self.peer_mask) >= self.source_cap_min_peers

    def capped(self, peer: Peer) -> bool:
        """Rule 6: is `peer` not to be asked now because enough other peers serve us?"""
        if peer in self.serving or len(self.serving) < self.source_cap or not self.capping:
            return False
        offered = self._askable(self.serving)  # what the serving peers can still give us
        if not offered:
            return False  # they have nothing more we miss (or the endgame): ask others, never stall
        mine = self._askable((peer,))
        for level in self.levels[1:]:
            if offered & level:
                return True
            if mine & level:
                return False  # it has a piece rarer than any they offer (rarest first, rule 2, comes first)
        return True

    def next_request(self, peer: Peer) -> int | None:
        """Pick a piece to request from `peer` and mark it in flight, or None if nothing fits."""
        if self.chain_source is not None:
            return self._next_in_chain(peer)
        if self.source_cap and self.capped(peer):
            return None
        has = self.peer_mask[peer] & ~self.deferred.get(peer, 0)
        if peer in self.last_resort and has & self.missing and self._offered_by_others():
            self.held_back.add(peer)
            return None
        rank = self.rank.get(peer, 0)
        better = self._held_by_better(rank) if rank else 0
        has &= ~better
        cand = has & self.missing & ~self.inflight_mask
        if cand and self.stripe and peer in self.cross:
            cand = self._stripe_first(cand, better)
        if cand:
            for level in self.levels[1:]:
                c = cand & level
                if c:
                    return self._take(peer, (c & -c).bit_length() - 1)
        if self.missing & ~self.inflight_mask:
            return None  # not endgame yet: other peers will supply the rest
        dup = has & self.missing & self.inflight_mask
        best_k, best_src = -1, 0.0
        while dup:
            low = dup & -dup
            dup ^= low
            k = low.bit_length() - 1
            asked = self.inflight[self.perm[k]]
            if peer in asked or len(asked) >= self.max_dup:
                continue
            src = max((self.rate.get(q, 0.0) for q in asked), default=0.0)  # its best source so far
            if best_k < 0 or src < best_src:
                best_k, best_src = k, src
        return None if best_k < 0 else self._take(peer, best_k)

    def _next_in_chain(self, peer: Peer) -> int | None:
        """Rule 8: the lowest missing piece not in flight nor deferred there, from the chain source only."""
        if peer != self.chain_source:
            return None
        pos, missing = self.pos, self.missing
        while self._chain_next < self.n and not missing >> pos[self._chain_next] & 1:
            self._chain_next += 1
        skip = self.inflight_mask | self.deferred.get(peer, 0)  # (a busy seed's upload slots may defer one)
        for p in range(self._chain_next, self.n):
            k = pos[p]
            if missing >> k & 1 and not skip >> k & 1:
                return self._take(peer, k)
        return None

    def _take(self, peer: Peer, k: int) -> int:
        p = self.perm[k]
        self.inflight.setdefault(p, set()).add(peer)
        self.inflight_mask |= 1 << k
        self.pending.setdefault(peer, set()).add(p)
        self.serving.add(peer)
        return p

    def _unpend(self, peer: Peer, pending: set[int], piece: int) -> None:
        pending.discard(piece)
        if not pending:
            self.serving.discard(peer)

    def _release(self, peer: Peer, piece: int) -> None:
        pending = self.pending.get(peer)
        if pending is not None:
            self._unpend(peer, pending, piece)
        asked = self.inflight.get(piece)
        if asked is None:
            return
        asked.discard(peer)
        if not asked:
            del self.inflight[piece]
            self.inflight_mask &= ~(1 << self.pos[piece])

    def request_failed(self, peer: Peer, piece: int, *, peer_lacks: bool = False) -> None:
        """A request was rejected or timed out; the piece becomes available to ask elsewhere."""
        self._release(peer, piece)
        if peer_lacks and peer in self.peer_mask:
            k = self.pos[piece]
            bit = 1 << k
            if self.peer_mask[peer] & bit:
                self.peer_mask[peer] &= ~bit
                a = self.avail[piece]
                self.levels[a] &= ~bit
                self.levels[a - 1] |= bit
                self.avail[piece] = a - 1

    def defer(self, peer: Peer, piece: int) -> None:
        """The peer has `piece` but asked us to get it elsewhere: release it, skip it there until `undefer`."""
        self._release(peer, piece)
        self.deferred[peer] = self.deferred.get(peer, 0) | 1 << self.pos[piece]

    def undefer_all(self) -> bool:
        """Forget all deferrals (called periodically); return True if there were any."""
        had = any(self.deferred.values())
        self.deferred.clear()
        return had

    def piece_verified(self, piece: int) -> set[Peer]:
        """Mark a piece as ours; return the peers whose copy has not arrived yet (to send CANCEL)."""
        self.missing &= ~(1 << self.pos[piece])
        asked = self.inflight.pop(piece, set())
        self.inflight_mask &= ~(1 << self.pos[piece])
        return {peer for peer in asked if self._cancel(peer, piece)}

    def peer_has(self, peer: Peer, piece: int) -> bool:
        """Has `peer` announced `piece` (and not rejected a request for it)?"""
        return bool(self.peer_mask.get(peer, 0) >> self.pos[piece] & 1)

    def piece_lost(self, piece: int) -> None:
        """A piece we had turned out corrupt on disk: it is missing again, to be fetched anew."""
        self.missing |= 1 << self.pos[piece]
        self._chain_next = min(self._chain_next, piece)  # (rule 8 looks from there)

    def _cancel(self, peer: Peer, piece: int) -> bool:
        pending = self.pending.get(peer)
        if pending is None or piece not in pending:
            return False
        self._unpend(peer, pending, piece)
        if peer not in self.cancelled:
            self.cancelled[peer] = collections.deque(maxlen=CANCELLED_MEMORY)
        self.cancelled[peer].append(piece)
        return True

    def withdraw(self, peer: Peer) -> list[int]:
        """Cancel every request pending at `peer` and free its pieces to be asked elsewhere; returns them (the
        caller sends CANCEL). A copy already on its way is dropped when it arrives (`Arrival.LATE`)."""
        pieces = sorted(self.pending.get(peer, ()))
        for p in pieces:
            self._cancel(peer, p)
            self._release(peer, p)
        return pieces

    def cancel_all(self) -> dict[Peer, list[int]]:
        """Stop downloading (complete, or stopped): every pending request becomes cancelled; returns them."""
        out = {peer: sorted(pieces) for peer, pieces in self.pending.items() if pieces}
        for peer, pieces in out.items():
            for piece in pieces:
                self._cancel(peer, piece)
        self.inflight.clear()
        self.inflight_mask = 0
        self.deferred.clear()
        return out

    def arrival(self, peer: Peer, piece: int) -> Arrival:
        """Is a piece that `peer` starts sending one we asked it for (without changing anything)?"""
        if piece in self.pending.get(peer, ()):
            return Arrival.EXPECTED
        if piece in self.cancelled.get(peer, ()):
            return Arrival.LATE
        return Arrival.UNREQUESTED

    def arrived(self, peer: Peer, piece: int) -> Arrival:
        """A piece from `peer` has arrived whole: it stops counting as pending (it stays in flight
        until verified, so nobody else is asked for it meanwhile)."""
        pending = self.pending.get(peer)
        if pending is not None and piece in pending:
            self._unpend(peer, pending, piece)
            return Arrival.EXPECTED
        cancelled = self.cancelled.get(peer)
        if cancelled is not None and piece in cancelled:
            cancelled.remove(piece)
            return Arrival.LATE
        return Arrival.UNREQUESTED

    def outstanding(self, peer: Peer) -> int:
        """Requests to `peer` whose piece has not arrived (the pipeline's fill, the watchdog's concern)."""
        pending = self.pending.get(peer)
        return len(pending) if pending else 0

    def in_flight_to(self, peer: Peer) -> list[int]:
        return [p for p, peers in self.inflight.items() if peer in peers]

    @property
    def done(self) -> bool:
        return self.missing == 0

    @property
    def missing_count(self) -> int:
        return self.missing.bit_count()

    def have_pieces(self) -> list[int]:
        return [self.perm[k] for k in indices(self.full & ~self.missing)]
