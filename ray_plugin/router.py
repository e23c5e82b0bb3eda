"""Request routing across inference workers: smooth weighted round-robin driven by measured latency.

This is AstraRay's dynamic weighted SWRR: each worker's weight is proportional to 1 / its EWMA
latency, so a worker twice as slow gets half the requests, and the smooth variant (nginx's) spreads
a worker's share evenly instead of in bursts. A worker whose request failed (dead actor, lost node)
gets weight 0 and is tried again after a backoff that doubles with every further failure, one probe
request at a time, so a dead worker costs one retried request per backoff period and a recovered one
gets its share back.

Pure: no Ray, no clock, no I/O; callers pass `now`. That is what lets the hypothesis tests check the
scheduling properties exactly.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class SmoothWRR(Generic[K]):
    """nginx's smooth weighted round-robin over weights that may change between picks.

    Each pick adds every eligible key's weight to its running credit, takes the key with the most
    credit (the earliest added on a tie) and charges it the total. For constant integer weights w_i this
    yields, in every window of sum(w) picks, exactly w_i picks of key i, interleaved as evenly as possible.
    """

    def __init__(self) -> None:
        self._credit: dict[K, float] = {}
        self._order: dict[K, int] = {}
        self._seq = 0
        self._eligible: frozenset[K] = frozenset()

    def pick(self, weights: Mapping[K, float]) -> K | None:
        """The next key; keys with weight <= 0 are never picked; None when no key has a positive weight."""
        eligible = frozenset(k for k, w in weights.items() if w > 0)
        if not eligible:
            self._eligible = eligible
            return None
        if eligible != self._eligible:
            # The set changed (a worker joined, failed or came back): restart the credits so that a
            # returning worker gets no burst and a leaving one leaves no debt behind.
            self._credit = {k: 0.0 for k in eligible}
            self._eligible = eligible
        for k in eligible:
            if k not in self._order:
                self._order[k] = self._seq
                self._seq += 1
        total = 0.0
        best: K | None = None
        for k in sorted(eligible, key=self._order.__getitem__):
            w = weights[k]
            total += w
            self._credit[k] += w
            if best is None or self._credit[k] > self._credit[best]:
                best = k
        assert best is not None
        self._credit[best] -= total
        return best

    def forget(self, key: K) -> None:
        self._credit.pop(key, None)
        self._order.pop(key, None)
        self._eligible = self._eligible - {key}


@dataclass
class WorkerState:
    """What the router knows about one worker."""

    ewma: float | None = None  # seconds; None until the first success
    failures: int = 0  # consecutive
    retry_at: float = 0.0  # when failed: the earliest time a probe may be sent
    probing: bool = False  # a probe request is in flight
    picks: int = 0
    successes: int = 0


class LatencyRouter(Generic[K]):
    """Dynamic weighted SWRR over workers (weight = 1 / EWMA latency; failed = 0 until its probe)."""

    def __init__(
        self,
        keys: Iterable[K] = (),
        *,
        alpha: float = 0.3,
        retry_after: float = 1.0,
        max_retry_after: float = 30.0,
        min_latency: float = 1e-4,
    ) -> None:
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        self.alpha = alpha
        self.retry_after = retry_after
        self.max_retry_after = max_retry_after
        self.min_latency = min_latency  # floors the weight of a worker that answers absurdly fast
        self.workers: dict[K, WorkerState] = {}
        self._wrr: SmoothWRR[K] = SmoothWRR()
        for k in keys:
            self.add(k)

    def add(self, key: K) -> None:
        """A worker became ready; it starts with the best known weight so that it is measured soon."""
        self.workers.setdefault(key, WorkerState())

    def remove(self, key: K) -> None:
        self.workers.pop(key, None)
        self._wrr.forget(key)

    def weights(self) -> dict[K, float]:
        """Current weight of every worker: 1/EWMA, optimistic for unmeasured ones, 0 when failed."""
        measured = [1.0 / max(s.ewma, self.min_latency) for s in self.workers.values() if s.ewma is not None]
        fresh = max(measured) if measured else 1.0
        out: dict[K, float] = {}
        for k, s in self.workers.items():
            if s.failures:
                out[k] = 0.0
            elif s.ewma is None:
                out[k] = fresh
            else:
                out[k] = 1.0 / max(s.ewma, self.min_latency)
        return out

    def pick(self, now: float) -> K | None:
        """The worker for the next request, or None when every worker is failed and not yet due a probe.

        A failed worker whose backoff has expired is returned first (a probe: one request at a time);
        otherwise SWRR over the healthy ones.
        """
        for k, s in self.workers.items():
            if s.failures and not s.probing and now >= s.retry_at:
                s.probing = True
                s.picks += 1
                return k
        key = self._wrr.pick(self.weights())
        if key is not None:
            self.workers[key].picks += 1
        return key

    def next_probe_at(self) -> float | None:
        """When a failed worker is next due a probe (None if none is failed): a caller with nothing to pick waits."""
        due = [s.retry_at for s in self.workers.values() if s.failures and not s.probing]
        return min(due) if due else None

    def healthy(self) -> list[K]:
        return [k for k, s in self.workers.items() if not s.failures]

    def record_success(self, key: K, latency: float, now: float) -> None:
        """Fold a request's latency into the worker's EWMA; a success also ends a failure streak."""
        s = self.workers.get(key)
        if s is None:
            return
        latency = max(latency, 0.0)
        s.ewma = latency if s.ewma is None else (1 - self.alpha) * s.ewma + self.alpha * latency
        s.failures = 0
        s.probing = False
        s.successes += 1

    def record_failure(self, key: K, now: float) -> None:
        """The worker failed a request: weight 0 and a probe after a backoff that doubles each time."""
        s = self.workers.get(key)
        if s is None:
            return
        s.failures += 1
        s.probing = False
        s.retry_at = now + min(self.retry_after * 2 ** (s.failures - 1), self.max_retry_after)
