"""How many requests each peer holds, from the rate it delivers at (sans-IO: time is passed in).

A fixed pipeline gives every path the same number of pieces: a relayed or data-channel peer
(FINDINGS §3: 4–8 MB/s) then sits on pieces that a TCP peer (~1 GB/s) would have delivered many
times over, and the last of them hold the whole download back. So each peer's depth follows its
measured rate: an ordinary peer holds `base` requests (enough to hide the turnaround between a
piece arriving and the next request reaching the peer), a fast one enough to cover `turnaround`
at its rate (up to `most`), and a slow one, which needs longer than `slow_piece_time` for a single
piece, holds one. What it still holds at the end is fetched again from a fast peer (the picker's
endgame duplicates pieces whose best source is the slowest first).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from p2pd.config import SwarmConfig


class PeerRate:
    """A peer's delivery rate, measured only over the time our requests were waiting at it.

    Time while nothing was asked of the peer is not counted, so a peer we had no work for does not
    look slow. Older samples fade with `half_life` seconds of busy time, so a path that speeds up
    or slows down is followed within a few seconds.
    """

    def __init__(self, half_life: float = 2.0) -> None:
        self.half_life = half_life
        self._bytes = 0.0
        self._secs = 0.0
        self._since: float | None = None  # busy since (a request has been waiting since then)

    def waiting(self, now: float) -> None:
        """Requests are waiting at the peer (from `now`, if none were)."""
        if self._since is None:
            self._since = now

    def delivered(self, nbytes: int, now: float, *, more_waiting: bool) -> None:
        """A piece of `nbytes` arrived; `more_waiting`: other requests are still waiting at the peer."""
        dt = 0.0 if self._since is None else max(0.0, now - self._since)
        decay = 0.5 ** (dt / self.half_life) if self.half_life > 0 else 0.0
        self._bytes = self._bytes * decay + nbytes
        self._secs = self._secs * decay + dt
        self._since = now if more_waiting else None

    def idle(self) -> None:
        """Nothing is waiting at the peer any more (requests cancelled or failed)."""
        self._since = None

    @property
    def rate(self) -> float | None:
        """Bytes per second, or None until a piece took measurable time."""
        return self._bytes / self._secs if self._secs > 0 else None


def pipeline_depth(
    rate: float | None, piece_len: int, *, base: int, most: int, turnaround: float, slow_piece_time: float
) -> int:
    """Requests to keep waiting at a peer that delivers `rate` bytes/s (None: not measured yet)."""
    if rate is None:
        return base
    if rate * slow_piece_time < piece_len:
        return 1
    return max(base, min(most, math.ceil(rate * turnaround / piece_len)))


def swarm_depth(rate: float | None, piece_len: int, cfg: SwarmConfig) -> int:
    """`pipeline_depth` under a swarm's settings, so the daemon and the simulator pace a peer alike."""
    return pipeline_depth(
        rate,
        piece_len,
        base=cfg.pipeline_depth,
        most=cfg.pipeline_max,
        turnaround=cfg.request_turnaround,
        slow_piece_time=cfg.slow_piece_time,
    )
