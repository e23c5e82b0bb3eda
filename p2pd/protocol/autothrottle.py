"""Automatic node throttling: p2pd yields its link to the other traffic it shares it with (sans-IO).

A GPU node's NIC also carries inference requests, checkpoint uploads and metrics. p2pd may fill the
link while nobody else wants it, but must shrink to what is left (minus a reserve) when another
service does, and take the link back within seconds when that service stops. The inputs are four
cumulative byte counters, read by the I/O layer every tick (p2pd/auto_throttle.py): the interface's
received and sent bytes, and p2pd's own. Other traffic = interface - p2pd (less the headers and ACKs
p2pd's own bytes cause: learned as the interface counts them, see `Overheads`); link capacity =
`--link-capacity`, else the highest rate the interface has carried (learned: whoever filled the link, p2pd
alone or the service alone, showed what it holds).

Why a reserve, and why it works: while p2pd fills the link, a TCP service beside it cannot show how
much it wants, only the share TCP's fairness gives it. So p2pd leaves `headroom` unused (the reserve,
20 % of capacity by default). A service that wants more grows into it within a few round trips, and
the link is full again: p2pd sees the larger other traffic and yields again (and multiplicatively
while the link stays full), so a greedy service takes all but p2pd's floor within about a second. The floor
is what p2pd's open connections need to keep moving (a chunk each every half second), not a share of the
link: every byte of it is taken from a greedy service for its whole run.
A service that wants a fixed rate leaves the headroom unused; after `settle` seconds the headroom
shrinks to `min_headroom_fraction`, so p2pd uses nearly all of what the service leaves free. Under that
thin headroom the link at its top is p2pd's own doing (and a paced sender's bursts fill it), so there only
other traffic that grew brings the full reserve back.

A learned capacity can be too low (the link was never full while p2pd watched), and then the link looks
full at it. So while p2pd's limit binds, it tries `probe_fraction` more for one tick every `probe_every`
seconds; a rise of the interface's rate above the learned maximum means room (and the next tick tries
again), none means the link is full (the limit goes back).

Why the decisions look at the link's total against its capacity ("full") and not at the service's
rate: a squeezed service and a satisfied one can run at the same rate; only a full link tells them
apart. The floor keeps p2pd's transfers moving (a peer silent for a second is dropped as stalled).

No delay signal (LEDBAT's queueing delay, TCP_INFO RTT): the counters see exactly the bottleneck a
node most often shares, its own NIC, without a base-delay estimate; a bottleneck beyond the NIC
(a ToR uplink) would need one, and p2pd's bulk TCP would then need a less-than-best-effort
congestion control in the kernel to act on it; docs/throttling.md says more.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

from p2pd.config import AutoThrottleConfig

INF = math.inf


@dataclass(frozen=True)
class Sample:
    """Cumulative byte counters read at one instant (they only grow; a reset is detected and skipped)."""

    iface_rx: int
    iface_tx: int
    own_rx: int
    own_tx: int
    connections: int = 0  # p2pd's open peer connections: the floor keeps each of them moving


@dataclass(frozen=True)
class Decision:
    """One direction's limit for p2pd after a tick, and why (shown by `p2pd status`)."""

    limit: float  # bytes/s; math.inf = no limit from auto-throttling
    capacity: float  # bytes/s the link carries (0 = not known yet)
    other: float  # bytes/s of other traffic (smoothed)
    own: float  # bytes/s p2pd moved (smoothed)
    state: str  # "learning" (capacity unknown), "idle" (no other traffic to yield to), "yielding"
    why: str
    headers: float = 0.0  # the header overhead subtracted with p2pd's bytes (learned + margin, at most the default)

    def to_json(self) -> dict[str, object]:
        return {
            "limit": None if math.isinf(self.limit) else self.limit,
            "capacity": self.capacity or None,
            "other": self.other,
            "own": self.own,
            "state": self.state,
            "why": self.why,
            "headers": self.headers,
        }


def mbit(rate: float) -> str:
    """Bytes/s as people read link rates: `140 Mbit/s`."""
    bits = rate * 8
    for unit, mult in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= mult:
            return f"{bits / mult:.3g} {unit}"
    return f"{bits:.3g} bit/s"


class _Ewma:
    """An exponentially weighted average of a rate with a time constant (ticks may be uneven)."""

    def __init__(self, tau: float) -> None:
        self.tau = tau
        self.value: float | None = None

    def add(self, x: float, dt: float) -> float:
        if self.value is None:
            self.value = x
        else:
            self.value += (1.0 - math.exp(-dt / self.tau)) * (x - self.value)
        return self.value


class Overheads:
    """What the interface counts, in one direction, beyond p2pd's payload: headers per byte p2pd moves this way, ACKs
    per byte it moves the other way.

    Why learned: a fixed 6 % (full-size segments) is right for a NIC that counts frames, but with GSO/TSO/GRO the
    counters see one header per 64 KB super-packet, ~0.5 %, and the other 5.5 % of p2pd's rate were subtracted from
    the other traffic: at 200 Mbit/s a newcomer under ~2 MB/s beside p2pd was invisible (BENCHMARKS.md 2026-11-27).
    A window teaches only while p2pd's bytes dominate the direction and the controller suspects nothing else (idle):
    then (interface - explained) / p2pd's bytes is the overhead, plus whatever noise traffic runs. Other traffic
    only adds and a counter skew (bytes between p2pd's count and the wire's) comes and goes, so the median of recent
    windows holds against both; the margin covers the skew that remains (the 6 % used to be that margin, much too
    wide), and the defaults bound it from above (noise cannot teach a larger overhead than full-size frames have).
    """

    def __init__(self, cfg: AutoThrottleConfig) -> None:
        self.cfg = cfg
        self._headers: deque[float] = deque(maxlen=cfg.overhead_windows)
        self._acks: deque[float] = deque(maxlen=cfg.overhead_windows)
        self._window = (0.0, 0.0, 0.0, 0.0)  # seconds, interface, own and reverse bytes while idle

    @staticmethod
    def _learned(windows: deque[float], default: float) -> float:
        if len(windows) < 3:  # (one window may be a skewed one: the default until a median means something)
            return default
        return min(max(statistics.median(windows), 0.0), default)

    @property
    def headers(self) -> float:
        """Per byte of p2pd's payload this way, as subtracted (the learned overhead and the margin)."""
        learned = self._learned(self._headers, self.cfg.header_overhead)
        return min(learned + self.cfg.overhead_margin, self.cfg.header_overhead)

    @property
    def acks(self) -> float:
        """Per byte of p2pd's payload the other way, as subtracted."""
        learned = self._learned(self._acks, self.cfg.ack_overhead)
        return min(learned + self.cfg.overhead_margin, self.cfg.ack_overhead)

    def add(self, teach: bool, capacity: float, dt: float, iface: int, own: int, reverse: int) -> None:
        """One tick's bytes; `teach`: nothing but p2pd is suspected on the link (a window with any other tick is
        dropped)."""
        if not teach:
            self._window = (0.0, 0.0, 0.0, 0.0)
            return
        w = self._window
        t, i, o, r = w[0] + dt, w[1] + iface, w[2] + own, w[3] + reverse
        if t < self.cfg.overhead_window:
            self._window = (t, i, o, r)
            return
        self._window = (0.0, 0.0, 0.0, 0.0)
        least = self.cfg.overhead_min_share * capacity * t
        h = self._learned(self._headers, self.cfg.header_overhead)
        a = self._learned(self._acks, self.cfg.ack_overhead)
        if o >= least and o >= 4 * r:  # p2pd's payload dominates this way: what is left over is its headers
            self._headers.append((i - r * a) / o - 1.0)
        elif r >= least and r >= 4 * o:  # p2pd's payload the other way dominates: the ACKs for it
            self._acks.append((i - o * (1.0 + h)) / r)


class DirectionController:
    """The limit for one direction (egress: the interface's tx; ingress: its rx)."""

    def __init__(self, cfg: AutoThrottleConfig, now: float) -> None:
        self.cfg = cfg
        self._iface = _Ewma(cfg.smoothing)
        self._iface_slow = _Ewma(cfg.full_smoothing)  # "is the link full": a paced service's bursts are not demand
        self._own = _Ewma(cfg.smoothing)
        self._other_slow = _Ewma(cfg.full_smoothing)  # the other traffic as slowly as "full" is judged
        self._other_settled = 0.0  # the other traffic when the link was last full (the headroom then shrinks)
        self._reverse = _Ewma(cfg.smoothing)
        self.overheads = Overheads(cfg)
        self.learned = 0.0  # the highest smoothed rate the interface carried
        self.yielding = False
        self.connections = 0  # p2pd's open peer connections at the last tick (the floor follows them)
        self.limit = INF
        self.headroom = 0.0
        self._full_at = now  # last tick the link was full (headroom back to the whole reserve)
        self._loud_at = now  # last tick other traffic was above half the quiet level
        self._quiet_at = now  # last tick (while not yielding) other traffic was under the quiet level
        self._probe_at = now  # last tick p2pd tried more than the learned capacity leaves it (or began yielding)
        self._tried_at = -INF  # last tick p2pd actually tried more (the slow average holds the try a while)
        self._probing = False  # the last tick was such a try
        self._learned_at_probe = 0.0
        self._before_probe = INF  # the limit before the current try
        self.decision = Decision(INF, cfg.link_capacity or 0.0, 0.0, 0.0, "learning", "learning the link capacity")

    @property
    def capacity(self) -> float:
        return self.cfg.link_capacity or self.learned

    def reserve(self, capacity: float) -> float:
        r = self.cfg.reserve_rate if self.cfg.reserve_rate is not None else self.cfg.reserve_fraction * capacity
        return min(r, capacity)

    def floor(self, capacity: float) -> float:
        """What keeps every connection moving (AutoThrottleConfig.floor_per_connection says why per connection)."""
        cfg = self.cfg
        need = max(self.connections * cfg.floor_per_connection, cfg.floor_min)
        return min(max(cfg.floor_fraction * capacity, need), capacity)

    def update(self, now: float, dt: float, iface_bytes: int, own_bytes: int, reverse_own_bytes: int) -> Decision:
        """One tick: bytes the interface and p2pd moved in this direction (and p2pd the other way) in `dt` s."""
        d = self._update(now, dt, iface_bytes, own_bytes, reverse_own_bytes)
        teach = d.state == "idle" and d.other <= max(self.cfg.quiet_fraction * d.capacity, self.cfg.quiet_min)
        self.overheads.add(teach, d.capacity, dt, iface_bytes, own_bytes, reverse_own_bytes)
        return d

    def _update(self, now: float, dt: float, iface_bytes: int, own_bytes: int, reverse_own_bytes: int) -> Decision:
        cfg = self.cfg
        headers, acks = self.overheads.headers, self.overheads.acks
        iface = self._iface.add(iface_bytes / dt, dt)
        iface_slow = self._iface_slow.add(iface_bytes / dt, dt)
        own = self._own.add(own_bytes / dt, dt)
        reverse = self._reverse.add(reverse_own_bytes / dt, dt)
        self.learned = max(self.learned, iface)
        cap = self.capacity
        other = max(0.0, iface - own * (1.0 + headers) - reverse * acks)
        if cap <= 0 or (cfg.link_capacity is None and cap < cfg.min_learned_capacity):
            self._quiet_at = now
            self.decision = Decision(INF, 0.0, other, own, "learning", "learning the link capacity", headers)
            return self.decision
        quiet = max(cfg.quiet_fraction * cap, cfg.quiet_min)
        reserve = self.reserve(cap)
        # "stopped" is judged on this tick's rate, not the average: the average lags the end of a transfer by
        # several time constants, and p2pd would wait that long to take the link back
        raw_other = iface_bytes / dt - own_bytes / dt * (1.0 + headers) - reverse_own_bytes / dt * acks
        other_slow = self._other_slow.add(max(0.0, raw_other), dt)
        if min(other, raw_other) >= quiet / 2:
            self._loud_at = now
        starting = False
        if not self.yielding:
            if other <= quiet:
                self._quiet_at = now
            # p2pd's counters and the interface's never agree tick by tick (a byte in a qdisc, a socket closed with
            # bytes queued): such skew comes and goes within a tick or two; a service's traffic stays
            if now - self._quiet_at < cfg.onset:
                self.limit = INF
                why = f"under {mbit(quiet)}" if other <= quiet else f"above {mbit(quiet)} for under {cfg.onset:g} s"
                self.decision = Decision(INF, cap, other, own, "idle", f"other traffic {mbit(other)} ({why})", headers)
                return self.decision
            self.yielding = True
            starting = True
            self.headroom = reserve
            self._other_settled = other_slow
            self._full_at = now
            # the link just showed it is full: a try above the capacity now would only take the service's room
            self._probe_at = now
        elif now - self._loud_at >= cfg.release_after:
            self.yielding = False
            self.limit = INF
            self.decision = Decision(INF, cap, other, own, "idle", "other traffic stopped", headers)
            return self.decision
        floor = self.floor(cap)
        # A learned capacity is only the most the link has carried so far, and an underestimate looks exactly
        # like a full link (the total is at the "capacity"). So while p2pd's limit binds, it tries a little more
        # now and then: if the link has room, the interface's rate rises above the learned maximum (learned at
        # once) and p2pd tries more at the next tick; if not, the link is full and the next tick yields again.
        grew = self.learned > self._learned_at_probe * 1.02
        binds = own >= 0.9 * self.limit  # (the average lags a raised limit: a try that worked goes on regardless)
        # other traffic growing under a thin headroom wants the room a try would take (its growth is about to show)
        growing = self.headroom < self.reserve(cap) and other_slow >= self._other_settled + quiet / 2
        if (
            cfg.link_capacity is None
            and not math.isinf(self.limit)
            and ((self._probing and grew) or (binds and not growing and now - self._probe_at >= cfg.probe_every))
        ):
            if not self._probing:
                self._before_probe = self.limit
            self._probing = True
            self._probe_at, self._tried_at, self._learned_at_probe = now, now, self.learned
            self.limit = max(floor, self.limit + cfg.probe_fraction * cap)
            self.decision = Decision(
                self.limit, cap, other, own, "yielding", f"other traffic {mbit(other)} (probing)", headers
            )
            return self.decision
        failed_probe = self._probing and not grew
        self._probing = False
        if failed_probe:  # the link was full: back to where p2pd was (the service did not ask for more)
            self.limit = self._before_probe
            why = f"other traffic {mbit(other)}" + (" (at the floor)" if self.limit <= floor else "")
            self.decision = Decision(self.limit, cap, other, own, "yielding", why, headers)
            return self.decision
        # (the average still holds the try for a while after a failed one: that is not a service's demand)
        if self.headroom >= reserve:  # the level the service settled at, before the headroom shrinks
            self._other_settled = other_slow
        else:
            # the headroom has shrunk: the link at its top is then p2pd's own doing (its limit leaves only a thin
            # margin), and only other traffic that grew shows a demand; a paced sender's bursts fill the margin
            # without wanting more. A growing service takes the margin every tick, so the link stays at its top.
            # The settled level is an average over seconds, not the lowest level seen: a paced sender's rate as
            # the counters see it swings by a few % of the link from tick to tick, and its troughs as the level
            # made its next crest read as growth (a halving of p2pd's limit beside a steady 10 Mbit/s service;
            # BENCHMARKS.md 2026-11-27). A service that grows outruns the average within a tick or two.
            if now - self._tried_at > 2 * cfg.settle:  # (a try squeezed it, and it regrows over a second or two)
                self._other_settled += (1.0 - math.exp(-dt / cfg.settled_smoothing)) * (
                    other_slow - self._other_settled
                )
            grew = other_slow >= self._other_settled + reserve * cfg.growth_fraction
            full = grew and iface_slow >= cap - reserve / 2
        if self.headroom >= reserve:
            full = iface_slow >= cap - self.headroom / 2
        full = full and now - self._tried_at > cfg.full_smoothing
        if full:
            self.headroom = reserve
            self._full_at = now
            self._other_settled = other_slow
            self._probe_at = now  # (the link showed it is full: a try above the capacity would only take room)
        elif now - self._full_at >= cfg.settle:
            h_min = min(cfg.min_headroom_fraction * cap, reserve)
            self.headroom = max(h_min, self.headroom * 0.5 ** (dt / cfg.headroom_halving))
        target = (cap - other - self.headroom) / (1.0 + headers)  # the limit counts payload, not headers
        if full and starting:
            # a newcomer on a full link: p2pd's socket and qdisc queues still drain at the old rate for a tick or
            # two, and the newcomer gets only its TCP share of them; give way deeply at once (a paced service
            # leaves room that the ramp takes back; a greedy one gets the link a second sooner)
            target = min(target, max(min(own, self.limit), floor) * cfg.first_backoff)
        elif full:  # someone's demand is not met: give way at least multiplicatively
            target = min(target, max(min(own, self.limit), floor) * cfg.backoff)
        elif not math.isinf(self.limit) and now - self._full_at < cfg.ramp_hold:
            # the link was full a moment ago: a newcomer that p2pd just gave way to has not grown into the room yet
            # (the link looks less full for a tick or two); jumping back up would take that room again
            target = min(target, max(self.limit, floor))
        elif not math.isinf(self.limit):
            # room again: take it back fast but not in one jump (a TCP dip is not an exit)
            ramp_from = max(self.limit, floor, cfg.ramp_from_fraction * cap)
            target = min(target, ramp_from * 2.0 ** (dt / cfg.ramp_doubling))
        self.limit = max(floor, target)
        why = f"other traffic {mbit(other)}" + (" (at the floor)" if self.limit <= floor else "")
        self.decision = Decision(self.limit, cap, other, own, "yielding", why, headers)
        return self.decision


class AutoThrottle:
    """Both directions of one interface; `tick` returns (egress, ingress) decisions."""

    def __init__(self, cfg: AutoThrottleConfig, now: float) -> None:
        self.cfg = cfg
        self.egress = DirectionController(cfg, now)
        self.ingress = DirectionController(cfg, now)
        self._last: Sample | None = None
        self._last_at = now

    def tick(self, now: float, sample: Sample) -> tuple[Decision, Decision]:
        self.egress.connections = self.ingress.connections = sample.connections
        last, dt = self._last, now - self._last_at
        if last is None or dt <= 0 or _went_back(last, sample):
            # first reading, or the interface was re-created / counters reset: start measuring again
            self._last, self._last_at = sample, now
            return self.egress.decision, self.ingress.decision
        self._last, self._last_at = sample, now
        d_tx, d_rx = sample.iface_tx - last.iface_tx, sample.iface_rx - last.iface_rx
        d_own_tx, d_own_rx = sample.own_tx - last.own_tx, sample.own_rx - last.own_rx
        return (
            self.egress.update(now, dt, d_tx, d_own_tx, d_own_rx),
            self.ingress.update(now, dt, d_rx, d_own_rx, d_own_tx),
        )


def _went_back(a: Sample, b: Sample) -> bool:
    return b.iface_rx < a.iface_rx or b.iface_tx < a.iface_tx or b.own_rx < a.own_rx or b.own_tx < a.own_tx
