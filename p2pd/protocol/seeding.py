"""What a complete node uploads, and what it tells requesters to fetch elsewhere (sans-IO).

Duplicate uploads from the seed are what keeps BitTorrent above the Kumar–Ross bound: while some
piece was never sent, the seed's upload is the swarm's bottleneck, and every copy it sends of a piece
already out costs the whole swarm that much time. So a complete node answers DEFER ("ask someone
else") for any piece it already sent while some piece was never sent; the requester is not left
idle, because it still needs every unsent piece, which only the seed can give. It does so every time
the requester asks, as long as the requester lacks one of those pieces: deferred once only, the
requester came back after `defer_retry`, before the holder of the first copy had announced it, and
was served (the emulated 1 + 32: 100 of the seed's first 612 uploads were such copies, its last new
piece left at 27.9 s; deferred every time, the 512th upload was the last new piece, at 24.7 s, and
the swarm ended in 28.0-28.7 s against 29.0-29.5 s in alternating runs, BENCHMARKS.md). A requester
that holds every piece we never sent (another seed sent them) is deferred once, like every other
deferral below: it may have no one else to ask. Once everything was
sent, it defers a piece that another connected, incomplete peer has announced, but only once per
requester and piece, and never to a requester missing only a few pieces (`serve_tail`), so that
deferral cannot stretch the tail; and never in favour of another complete node, or two seeds would
send everyone back and forth.

The check runs when a request arrives and again when its turn to be sent comes: two peers may have
asked for the same unsent piece before either copy went out.

A piece sent but not yet announced by any connected peer is on its way to someone (or its holder
left): a request for it is deferred too, once, also in the tail; the requester asks the holder when its
HAVE arrives, instead of the seed sending the piece twice while the first copy is still in flight.

Upload slots (`slots_busy`), for every node, complete or not, once it has `slots_min_peers` connections:
a node serves at most `upload_slots` peers at once and DEFERs the others. Sharing one uplink among every
requester (one writer per connection, each with a piece queued) delays every copy to (requesters x piece)
/ uplink, and a piece spreads only once a copy is complete: with many peers per node the whole swarm then
waits on completions instead of uploading. The simulator at 100 nodes, 64 pieces: 2.14x the bound and the
seed 1.91 F without slots, 1.14x and 1.11 F with 4 slots at every node (BENCHMARKS.md). Gated on the
number of connections: a small swarm (the 1 + 8) has few requesters per node and no such wait. The
caller decides who is served: the daemon counts a peer while its writer is on a piece (not while the kernel
still sends it), the simulator while the piece is on the wire.

Peers with few fast paths first (`leave_to_few_paths`), for every node, complete or not: a peer behind a
symmetric NAT reaches only the public nodes over TCP (to a cone it has a UDP punch or the relay, which
move little), so the seed's and the public peers' uplinks are all it can download from fast, and every
other peer shares them too: in the NAT swarm (1 public seed + 8 peers, 2 behind symmetric NATs) it got
13-15 MiB/s of a 23 MiB/s link while the cones got 18-21 and finished 2-3 s after them (BENCHMARKS.md).
So while such a peer has an upload waiting or under way here, a request from any other peer is DEFERred,
once per requester and piece, when this node already served that piece to another such requester, or
another connected, incomplete peer that is not one of them has announced it: the requester reaches
those peers over punched TCP and fetches it there (the cones of the NAT swarm took most pieces twice or
more from the public peers, each fetching it for itself), and this uplink goes to the peer that has no
such choice. Never in the tail (`serve_tail`), never for a
piece only we (or a complete node, or a peer with few paths) hold: the requester needs us for those. A
swarm without such peers (the 1 + 8 without NAT) is unchanged. For the same reason a complete node does
not send such a requester to the other holders of a piece (`defer_request(few_paths=True)`): they are
mostly cones it reaches only slowly, its picker does not ask a slow path for what a fast peer holds, so
each deferral cost it `defer_retry` (0.5 s) per piece; in the NAT swarm the symmetric nodes received
1-10 MiB/s from the complete public peers until the last cone completed. An earlier rule (capping the others at
one upload slot while such a peer was served, whatever they asked) starved the cones and was reverted.

Every deferral is made once per requester and piece: a requester that asks again found no one else
(its picker skips a deferred piece at this node for a while and asks the peers that announced it).
Without that, a straggler whose connected peers have all become complete by downloading, and have
each uploaded its missing piece once already, would be sent away by every one of them for ever.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping
from typing import Generic, TypeVar

Peer = TypeVar("Peer", bound=Hashable)


class DistinctFirstSeeding(Generic[Peer]):
    """The seed policy of one artifact on one node; counts what it sent and what it deferred."""

    def __init__(
        self,
        num_pieces: int,
        *,
        enabled: bool = True,
        serve_tail: int = 16,
        upload_slots: int = 0,
        slots_min_peers: int = 0,
        few_paths_first: bool = False,
    ) -> None:
        self.n = num_pieces
        self.upload_slots = upload_slots
        self.slots_min_peers = slots_min_peers
        self.few_paths_first = few_paths_first
        self.full = (1 << num_pieces) - 1
        self.enabled = enabled
        self.serve_tail = serve_tail
        self._sent = bytearray(num_pieces)  # uploads per piece (saturating at 255)
        self._unsent = self.full  # pieces never uploaded (a bitmask: does a requester lack one of them?)
        self.pieces_sent = 0  # uploads of pieces, counting repeats
        self.pieces_deferred = 0  # requests answered with DEFER
        self.slot_deferrals = 0  # of which: because every upload slot was busy
        self.few_paths_deferrals = 0  # of which: to leave the uplink to peers with few fast paths
        self._deferred_to: dict[Peer, set[int]] = {}  # pieces deferred once to each requester
        self._to_many_paths: dict[int, Peer] = {}  # piece -> the first peer with many fast paths it was served to

    @property
    def pieces_sent_again(self) -> int:
        """Uploads of pieces this node had uploaded before (a seed's copies cost the whole swarm)."""
        return self.pieces_sent - (self.n - self._unsent.bit_count())

    def defer_request(
        self,
        piece: int,
        requester: Peer,
        have: Mapping[Peer, int],
        *,
        complete: bool,
        few_paths: bool = False,
    ) -> bool:
        """Answer DEFER to `requester` asking for `piece`? `have`: every connected peer's announced pieces;
        `few_paths`: the requester reaches only public nodes fast (behind a symmetric NAT): it is not sent to
        the other holders, who are mostly behind NATs it reaches only by a UDP punch or the relay."""
        if not (self.enabled and complete) or len(have) < 2:
            return False
        once = self._deferred_to.setdefault(requester, set())
        second_copy = self._second_copy_while_unsent(piece)
        if second_copy and self._lacks_unsent(have.get(requester, 0)):
            return self._defer(once, piece)
        if piece in once:
            return False  # asked again after a deferral: the requester found no one else
        if second_copy or self._in_flight(piece, have):
            return self._defer(once, piece)
        if self.n - have.get(requester, 0).bit_count() <= self.serve_tail:
            return False  # the tail is always served, so that deferral cannot stretch it
        if few_paths and self.few_paths_first:
            return False
        bit = 1 << piece
        if any(p != requester and mask & bit and mask != self.full for p, mask in have.items()):
            return self._defer(once, piece)
        return False

    def slots_busy(self, requester: Peer, serving: Collection[Peer], *, peers: int) -> bool:
        """Answer DEFER to `requester` because every upload slot is taken? Asked of every node, complete or
        not, before `defer_request`; `serving`: the peers with an upload accepted and not yet finished;
        `peers`: how many peers are connected. Not once-only: the slots stay capped."""
        if not self.upload_slots or peers < self.slots_min_peers:
            return False
        if requester in serving or len(serving) < self.upload_slots:
            return False
        self.pieces_deferred += 1
        self.slot_deferrals += 1
        return True

    def leave_to_few_paths(
        self,
        piece: int,
        requester: Peer,
        have: Mapping[Peer, int],
        few_paths: Collection[Peer],
        *,
        waiting: bool,
    ) -> bool:
        """Answer DEFER to `requester` so that this uplink goes to peers with few fast paths?

        `few_paths`: the connected peers that reach only public nodes fast (behind a symmetric NAT);
        `waiting`: one of them has an upload queued or under way here; `have`: as for `defer_request`.
        """
        if not self.few_paths_first or requester in few_paths:
            return False
        if (
            waiting
            and self.n - have.get(requester, 0).bit_count() > self.serve_tail  # the tail is always served
            and piece not in (once := self._deferred_to.setdefault(requester, set()))  # else: nobody else gave it
            and (
                self._to_many_paths.get(piece, requester) != requester
                or self._held_elsewhere(piece, requester, have, few_paths)
            )
        ):
            self.few_paths_deferrals += 1
            return self._defer(once, piece)
        self._to_many_paths.setdefault(piece, requester)  # served: it passes the piece on over its punched paths
        return False

    def _held_elsewhere(
        self, piece: int, requester: Peer, have: Mapping[Peer, int], few_paths: Collection[Peer]
    ) -> bool:
        """Announced by another connected, incomplete peer that is not one of those with few fast paths."""
        bit = 1 << piece
        return any(
            mask & bit and p != requester and mask != self.full and p not in few_paths for p, mask in have.items()
        )

    def defer_send(self, piece: int, requester: Peer, requester_has: int, *, complete: bool) -> bool:
        """At send time: is this a second copy while some piece was never sent? `requester_has`: the pieces
        the requester announced."""
        if not (self.enabled and complete) or not self._second_copy_while_unsent(piece):
            return False
        once = self._deferred_to.setdefault(requester, set())
        if piece in once and not self._lacks_unsent(requester_has):
            return False  # asked again after a deferral, holding every piece never sent: it found no one else
        return self._defer(once, piece)

    def _second_copy_while_unsent(self, piece: int) -> bool:
        return self._unsent != 0 and self._sent[piece] > 0

    def _lacks_unsent(self, requester_has: int) -> bool:
        """The requester lacks a piece we never sent: a second copy is then deferred every time, not once.

        Only we can give it those pieces, so it has something better to ask us for, and whoever got our copy
        of the piece it asked for will announce it. A requester holding every piece we never sent (another seed
        sent them) falls back to the once rule: it may have no one else to ask."""
        return self._unsent & ~requester_has != 0

    def _in_flight(self, piece: int, have: Mapping[Peer, int]) -> bool:
        """Sent, and no connected peer announced it yet: the copy is on its way to someone, who will."""
        if self._sent[piece] == 0:
            return False
        bit = 1 << piece
        return not any(mask & bit for mask in have.values())

    def _defer(self, once: set[int], piece: int) -> bool:
        once.add(piece)
        self.pieces_deferred += 1
        return True

    def sent(self, piece: int) -> None:
        self.pieces_sent += 1
        if self._sent[piece] == 0:  # a repeat upload leaves the mask alone (no two n-bit ints per copy)
            self._unsent &= ~(1 << piece)
        if self._sent[piece] < 255:
            self._sent[piece] += 1

    def forget(self, peer: Peer) -> None:
        """The peer left: its once-only deferrals go with it."""
        self._deferred_to.pop(peer, None)
