"""Token buckets for bandwidth limits (sans-IO: the caller passes `now` and does the sleeping).

A transfer reserves its bytes up front and may drive a bucket into debt; the returned delay is how
long to wait before sending. Reserving first (instead of polling until tokens exist) keeps many
concurrent senders fair and the long-run rate exact, with bursts bounded by `burst` bytes.

`Hierarchy` chains buckets (cluster policy > node > peer): a transfer waits for the slowest level, so
per-peer shares and a global cap pushed by the tracker compose without special cases.

A rate of 0 means paused (the tracker's global budget of 0, tracker/budgets.py): nothing may be sent
and no debt builds up; the caller waits while `Hierarchy.paused` holds and reserves once it clears,
so a resume takes effect at once instead of after a wait computed under the old rate.
"""

from __future__ import annotations

import math

PACE_SECONDS = 0.02  # a limited transfer reserves at most this much of its rate at once...
MIN_CHUNK = 16 * 1024  # ...but never less than this (per-chunk overhead)


class TokenBucket:
    def __init__(self, rate: float, burst: float | None = None, now: float = 0.0) -> None:
        self._rate = 0.0
        self.burst = 0.0
        self.tokens = 0.0
        self.stamp = now
        self.set_rate(rate, burst, now)

    @property
    def rate(self) -> float:
        return self._rate

    def set_rate(self, rate: float, burst: float | None = None, now: float | None = None) -> None:
        """Change the rate (math.inf = unlimited, 0 = paused); takes effect for the next reservation."""
        if not rate >= 0:
            raise ValueError(f"rate must be positive or 0 (paused), got {rate}")
        if now is not None:
            self._refill(now)
        self._rate = rate
        # Default burst: 50 ms of traffic, at least 64 KiB, so short-run rate stays close to the limit.
        self.burst = burst if burst is not None else (math.inf if math.isinf(rate) else max(65536.0, rate * 0.05))
        self.tokens = min(self.tokens, self.burst) if not math.isinf(self.burst) else 0.0

    def _refill(self, now: float) -> None:
        if math.isinf(self._rate):
            self.tokens = 0.0
        elif now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self._rate)
        self.stamp = max(self.stamp, now)

    def reserve(self, n: int, now: float) -> float:
        """Take `n` bytes' worth of tokens; return seconds to wait before using them."""
        if math.isinf(self._rate):
            return 0.0
        if self._rate == 0:
            return math.inf  # paused: the caller waits for `Hierarchy.paused` to clear (nothing is taken)
        self._refill(now)
        self.tokens -= n
        if self.tokens >= 0:
            return 0.0
        return -self.tokens / self._rate

    def refund(self, n: int) -> None:
        """Give back tokens for bytes reserved but not transferred (connection died mid-send)."""
        if not math.isinf(self._rate):
            self.tokens = min(self.burst, self.tokens + n)

    def backlog(self, now: float) -> float:
        """Seconds from `now` until what was reserved so far may all be sent (the debt at this rate; 0 when
        nothing waits, unlimited or paused). Read only: a sender's wait is counted when it reserves, so a
        wait that spans a demand report shows here and not in `Hierarchy.waited` (p2pd/protocol/demand.py)."""
        if math.isinf(self._rate) or self._rate == 0:
            return 0.0
        tokens = self.tokens + max(0.0, now - self.stamp) * self._rate
        return max(0.0, -tokens) / self._rate


class Hierarchy:
    """A chain of buckets charged together; the wait is the longest of them."""

    def __init__(self, *buckets: TokenBucket) -> None:
        self.buckets = list(buckets)
        # what the node reports as demand for global budgets (p2pd/daemon.py): bytes reserved, and
        # seconds of waiting the limits imposed (a node that waits would send more if allowed)
        self.reserved = 0
        self.waited = 0.0

    @property
    def paused(self) -> bool:
        return any(b.rate == 0 for b in self.buckets)

    @property
    def unlimited(self) -> bool:
        return all(math.isinf(b.rate) for b in self.buckets)

    @property
    def rate(self) -> float:
        """The slowest level's rate (math.inf when unlimited)."""
        return min((b.rate for b in self.buckets), default=math.inf)

    def chunk(self, largest: int) -> int:
        """How many bytes to reserve and move at once: at most PACE_SECONDS of the slowest rate.

        A transfer under a limit moves in bursts of one reservation with a wait in between, and the
        other side takes a silence of more than a second for a stalled peer. Reserving a
        large chunk under a slow limit (256 KiB at 200 kB/s: 1.3 s) would open such silences on
        every connection; a few tens of milliseconds of the rate keep each connection's gaps short
        even when a few dozen of them share one node limit.
        """
        return int(min(largest, max(MIN_CHUNK, self.rate * PACE_SECONDS)))

    def reserve(self, n: int, now: float) -> float:
        """Seconds to wait before sending `n` bytes (math.inf while paused: wait for `paused` to clear)."""
        if self.paused:
            return math.inf
        delay = max((b.reserve(n, now) for b in self.buckets), default=0.0)
        self.reserved += n
        self.waited += delay
        return delay

    def backlog(self, now: float) -> float:
        """Seconds until every reservation so far may be sent: the slowest level's debt (TokenBucket.backlog)."""
        return max((b.backlog(now) for b in self.buckets), default=0.0)

    def refund(self, n: int) -> None:
        self.reserved -= n
        for b in self.buckets:
            b.refund(n)


def unlimited(now: float = 0.0) -> TokenBucket:
    return TokenBucket(math.inf, now=now)
