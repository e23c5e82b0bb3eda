"""Token buckets (p2pd/protocol/ratelimit.py); RATE strings are tested in test_units.py."""

from __future__ import annotations

import math
import random

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from p2pd.protocol import ratelimit
from p2pd.protocol.ratelimit import Hierarchy, TokenBucket, unlimited
from p2pd.stream_io import SEND_CHUNK, throttle
from tests.unit._util import FAST

MB = 1e6


def drive(limiter: TokenBucket | Hierarchy, sizes: list[int], start: float = 0.0) -> float:
    """One sender: reserve, wait the returned delay, send; return the time the last byte may go."""
    now = start
    for n in sizes:
        now += limiter.reserve(n, now)
    return now


# ------------------------------------------------------------------------------------------ accuracy
@pytest.mark.parametrize("rate", [1e3, 50 * MB, 1.25e9])
@pytest.mark.parametrize("chunk", [1, 1500, 65536, 1 << 20])
def test_long_run_rate_single_sender(rate: float, chunk: int) -> None:
    b = TokenBucket(rate)
    n = 2000
    elapsed = drive(b, [chunk] * n)
    assert n * chunk / elapsed == pytest.approx(rate, rel=0.01)


@FAST
@given(
    st.floats(min_value=1e3, max_value=1e10),
    st.integers(min_value=0, max_value=1 << 32),
    st.sampled_from([1, 1500, 65536, 4 << 20]),
)
def test_long_run_rate_random_sizes(rate: float, seed: int, max_size: int) -> None:
    rng = random.Random(seed)
    sizes = [rng.randint(1, max_size) for _ in range(rng.randint(50, 300))]
    b = TokenBucket(rate)
    elapsed = drive(b, sizes)
    assert sum(sizes) / elapsed == pytest.approx(rate, rel=0.01)


@FAST
@given(
    st.floats(min_value=1e4, max_value=1e9),
    st.integers(min_value=0, max_value=1 << 32),
    st.sampled_from([0.0001, 0.001, 0.01]),
)
def test_overlapping_reservations_bounded_and_work_conserving(rate: float, seed: int, max_gap: float) -> None:
    """Reservations at arbitrary times, many overlapping: bytes sent in any window <= burst + rate x window,
    and nothing waits longer than draining the backlog at `rate` requires."""
    rng = random.Random(seed)
    arrivals = [(rng.uniform(0, max_gap), rng.randint(1, 1 << 18)) for _ in range(rng.randint(20, 80))]
    b = TokenBucket(rate, burst=max(65536.0, rate * 0.05))
    t = 0.0
    sends: list[tuple[float, int]] = []
    reqs: list[tuple[float, int]] = []
    for gap, n in arrivals:
        t += gap
        n = min(n, int(b.burst))
        reqs.append((t, n))
        sends.append((t + b.reserve(n, t), n))
    sends.sort()
    times = [s for s, _ in sends]
    sizes = [n for _, n in sends]
    for i in range(len(sends)):
        total = 0
        for j in range(i, len(sends)):
            total += sizes[j]
            assert total <= b.burst + rate * (times[j] - times[i]) + 1e-6 * total + 1
    drain = max(a + sum(n for _, n in reqs[i:]) / rate for i, (a, _) in enumerate(reqs))
    assert times[-1] <= drain * (1 + 1e-9) + 1e-9


def test_starts_empty_then_steady() -> None:
    b = TokenBucket(1000.0, burst=100.0, now=5.0)
    assert b.reserve(100, 5.0) == pytest.approx(0.1)
    assert b.reserve(100, 5.0) == pytest.approx(0.2)  # queued behind the first


# ------------------------------------------------------------------------------------------ burst
def test_burst_after_idle_is_bounded() -> None:
    b = TokenBucket(1000.0, burst=500.0)
    b.reserve(0, 0.0)
    assert b.reserve(500, 1000.0) == 0.0  # a long idle accrues at most `burst` tokens
    assert b.reserve(1, 1000.0) == pytest.approx(0.001)


def test_partial_refill() -> None:
    b = TokenBucket(1000.0, burst=500.0)
    assert b.reserve(200, 0.2) == 0.0  # 0.2 s x 1000 B/s = 200 tokens accrued since t=0
    assert b.reserve(100, 0.2) == pytest.approx(0.1)


@pytest.mark.parametrize(("rate", "burst"), [(1e3, 65536.0), (1e6, 65536.0), (50 * MB, 2.5 * MB), (1e9, 50 * MB)])
def test_default_burst(rate: float, burst: float) -> None:
    assert TokenBucket(rate).burst == pytest.approx(burst)


def test_reservation_larger_than_burst_waits_proportionally() -> None:
    b = TokenBucket(1000.0, burst=100.0)
    b.reserve(0, 0.0)
    assert b.reserve(1100, 10.0) == pytest.approx(1.0)  # 100 from the bucket, 1000 more at the rate


def test_time_going_backwards_does_not_mint_tokens() -> None:
    b = TokenBucket(1000.0, burst=1000.0)
    assert b.reserve(1000, 10.0) == 0.0  # a full bucket after 10 s
    assert b.reserve(1000, 5.0) == pytest.approx(1.0)  # an earlier `now` adds nothing
    assert b.reserve(1000, 10.0) == pytest.approx(2.0)  # nor does returning to the stamp


def test_refund() -> None:
    b = TokenBucket(1000.0, burst=500.0)
    assert b.reserve(1000, 0.0) == pytest.approx(1.0)
    b.refund(1000)  # the send never happened
    assert b.reserve(0, 0.0) == 0.0
    assert b.tokens == 0.0
    b.refund(10_000)
    assert b.tokens == 500.0  # capped at burst


# ------------------------------------------------------------------------------------------ hierarchy
def test_hierarchy_waits_for_the_slowest() -> None:
    node = TokenBucket(10 * MB)
    peer = TokenBucket(1 * MB)
    h = Hierarchy(node, peer)
    elapsed = drive(h, [65536] * 500)
    assert 500 * 65536 / elapsed == pytest.approx(1 * MB, rel=0.01)
    h2 = Hierarchy(TokenBucket(1 * MB), TokenBucket(10 * MB))
    assert 500 * 65536 / drive(h2, [65536] * 500) == pytest.approx(1 * MB, rel=0.01)


def test_hierarchy_shared_parent_caps_the_sum() -> None:
    node = TokenBucket(4 * MB)
    peers = [Hierarchy(node, TokenBucket(3 * MB)) for _ in range(3)]
    nows = [0.0] * 3
    sent = 0
    for _ in range(1000):
        i = min(range(3), key=lambda k: nows[k])  # the sender that is ready first goes next
        nows[i] += peers[i].reserve(65536, nows[i])
        sent += 65536
    assert sent / max(nows) == pytest.approx(4 * MB, rel=0.02)


def test_hierarchy_unlimited() -> None:
    assert Hierarchy().unlimited
    assert Hierarchy(unlimited(), unlimited()).unlimited
    cap = TokenBucket(1000.0)
    h = Hierarchy(unlimited(), cap)
    assert not h.unlimited
    cap.set_rate(math.inf)
    assert h.unlimited


@given(st.floats(min_value=1e3, max_value=1e11), st.floats(min_value=1e3, max_value=1e11))
def test_chunk_is_a_short_slice_of_the_slowest_rate(a: float, b: float) -> None:
    """Under a limit a connection moves at most PACE_SECONDS of the rate at once: short, steady gaps
    instead of silences the other side would take for a stall (256 KiB at 200 kB/s: 1.3 s)."""
    h = Hierarchy(TokenBucket(a), TokenBucket(b), unlimited())
    c = h.chunk(SEND_CHUNK)
    assert h.rate == min(a, b)
    assert ratelimit.MIN_CHUNK <= c <= SEND_CHUNK
    assert c == SEND_CHUNK or c == ratelimit.MIN_CHUNK or abs(c - min(a, b) * ratelimit.PACE_SECONDS) < 1
    assert Hierarchy(TokenBucket(200e3)).chunk(SEND_CHUNK) / 200e3 <= 0.1


def test_chunk_unlimited_is_the_largest() -> None:
    assert Hierarchy(unlimited()).chunk(SEND_CHUNK) == SEND_CHUNK
    assert Hierarchy().chunk(SEND_CHUNK) == SEND_CHUNK


def test_hierarchy_empty_and_refund() -> None:
    assert Hierarchy().reserve(10**9, 0.0) == 0.0
    a, b = TokenBucket(1000.0, burst=100.0), TokenBucket(1000.0, burst=100.0)
    h = Hierarchy(a, b)
    h.reserve(50, 0.0)
    h.refund(50)
    assert a.tokens == b.tokens == 0.0


# ------------------------------------------------------------------------------------------ set_rate
def test_set_rate_takes_effect() -> None:
    b = TokenBucket(1 * MB)
    t = drive(b, [65536] * 200)
    b.set_rate(10 * MB, now=t)
    t2 = drive(b, [65536] * 2000, start=t)
    assert 2000 * 65536 / (t2 - t) == pytest.approx(10 * MB, rel=0.01)
    b.set_rate(2 * MB, now=t2)
    t3 = drive(b, [65536] * 500, start=t2)
    assert 500 * 65536 / (t3 - t2) == pytest.approx(2 * MB, rel=0.01)
    assert b.rate == 2 * MB and b.burst == pytest.approx(max(65536, 0.05 * 2 * MB))


def test_set_rate_to_and_from_unlimited() -> None:
    b = TokenBucket(1000.0)
    b.set_rate(math.inf, now=1.0)
    assert b.rate == math.inf
    assert all(b.reserve(10**9, 1.0) == 0.0 for _ in range(10))
    b.refund(10)
    b.set_rate(1000.0, burst=100.0, now=2.0)
    assert b.reserve(100, 2.0) == pytest.approx(0.1)  # no hoarded tokens from the unlimited period
    t = drive(b, [100] * 1000, start=2.0)
    assert 1000 * 100 / (t - 2.0) == pytest.approx(1000.0, rel=0.01)


def test_set_rate_shrinks_tokens_to_new_burst() -> None:
    b = TokenBucket(1e6, burst=1e6)
    b.reserve(0, 100.0)
    assert b.tokens == 1e6
    b.set_rate(1e3, burst=10.0)
    assert b.tokens == 10.0


@pytest.mark.parametrize("rate", [-1, -math.inf, math.nan])
def test_rate_must_be_positive(rate: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(rate)
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(1.0).set_rate(rate)


def test_unlimited() -> None:
    u = unlimited(3.0)
    assert u.rate == math.inf
    assert u.reserve(1 << 40, 0.0) == 0.0


# ------------------------------------------------------------------------------------------ with trio's mock clock
# pytest-trio's `autojump_clock` fixture is trio.testing.MockClock(autojump_threshold=0): sleeps take no real time.
async def test_throttled_senders_under_mock_clock(autojump_clock: trio.testing.MockClock) -> None:
    """The daemon's pattern (throttle: reserve, then sleep) measured on simulated time."""
    node = TokenBucket(50 * MB, now=trio.current_time())
    slow_peer = TokenBucket(5 * MB, now=trio.current_time())
    sent = {"fast": 0, "slow": 0}
    duration = 10.0

    async def sender(name: str, limiter: Hierarchy) -> None:
        while trio.current_time() < duration:
            await throttle(limiter, SEND_CHUNK)
            await trio.sleep(0)  # the send itself takes no simulated time
            sent[name] += SEND_CHUNK

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(sender, "fast", Hierarchy(node))
        nursery.start_soon(sender, "slow", Hierarchy(node, slow_peer))
    elapsed = trio.current_time() - start
    total = sent["fast"] + sent["slow"]
    assert total / elapsed == pytest.approx(50 * MB, rel=0.01)
    assert sent["slow"] / elapsed == pytest.approx(5 * MB, rel=0.05)


async def test_rate_change_under_mock_clock(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(10 * MB, now=trio.current_time())
    limiter = Hierarchy(bucket)
    marks: list[tuple[float, int]] = []
    sent = 0

    async def sender() -> None:
        nonlocal sent
        while trio.current_time() < 20.0:
            await throttle(limiter, SEND_CHUNK)
            sent += SEND_CHUNK
            marks.append((trio.current_time(), sent))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await trio.sleep(10.0)
        bucket.set_rate(40 * MB, now=trio.current_time())

    def rate_between(a: float, b: float) -> float:
        inside = [(t, s) for t, s in marks if a <= t <= b]
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])

    assert rate_between(1.0, 9.9) == pytest.approx(10 * MB, rel=0.01)
    assert rate_between(10.5, 19.9) == pytest.approx(40 * MB, rel=0.01)


async def test_throttle_without_limiter_does_not_sleep(autojump_clock: trio.testing.MockClock) -> None:
    t = trio.current_time()
    await throttle(None, 1 << 30)
    await throttle(Hierarchy(unlimited(t)), 1 << 30)
    assert trio.current_time() == t


async def test_pause_holds_senders_without_debt_and_resume_is_immediate(autojump_clock: trio.testing.MockClock) -> None:
    """A rate of 0 (a global budget of 0): senders wait, nothing is charged, and a resume applies at once."""
    share = TokenBucket(10 * MB, now=trio.current_time())
    limiter = Hierarchy(TokenBucket(math.inf), share)
    sent: list[tuple[float, int]] = []

    async def sender() -> None:
        while trio.current_time() < 30.0:
            await throttle(limiter, SEND_CHUNK)
            sent.append((trio.current_time(), SEND_CHUNK))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await trio.sleep(5.0)
        share.set_rate(0, now=trio.current_time())
        assert limiter.paused and limiter.reserve(1, trio.current_time()) == math.inf
        await trio.sleep(10.0)
        resumed = trio.current_time()
        share.set_rate(10 * MB, now=resumed)
        assert not limiter.paused
    during = [t for t, _ in sent if 5.1 < t < resumed]
    assert during == []  # nothing went out while paused
    after = [t for t, _ in sent if t >= resumed]
    assert after and after[0] - resumed < 0.1  # no debt from the pause: sending starts at once
    in_window = sum(n for t, n in sent if resumed + 1 <= t <= resumed + 11)
    assert in_window / 10 == pytest.approx(10 * MB, rel=0.02)
    assert limiter.waited > 9.0  # the pause counts as waiting: a paused node reports it wants more


@FAST
@given(rates=st.lists(st.floats(1e5, 1e8), min_size=2, max_size=6), chunk=st.integers(1024, 65536))
def test_a_changed_share_applies_at_once_without_a_burst(rates: list[float], chunk: int) -> None:
    """A share from the tracker (issue #13's ledger gives decreases at once, increases later): a node
    applies it on receipt (`set_rate(now=...)`), and over each second that follows it sends at most
    the new rate plus the bucket's burst plus the one chunk reserved under the old rate."""
    b = TokenBucket(rates[0], now=0.0)
    sends: list[tuple[float, int]] = []
    now = 0.0
    for k, r in enumerate(rates):
        start = float(k)
        b.set_rate(r, now=start)
        now = max(now, start)
        while now < start + 1.0:
            now += b.reserve(chunk, now)
            sends.append((now, chunk))
    for k, r in enumerate(rates):
        sent = sum(n for t, n in sends if k <= t < k + 1)
        assert sent <= r * 1.0 + max(65536.0, 0.05 * r) + chunk


def test_backlog_is_the_debt_left_at_now() -> None:
    """What was reserved and not yet allowed out, in seconds at the bucket's rate: it falls as time passes
    and is 0 once every reservation may be sent (and for an unlimited or paused bucket)."""
    b = TokenBucket(1000.0, burst=100.0, now=0.0)
    assert b.backlog(0.0) == 0.0
    assert b.reserve(600, now=0.0) == pytest.approx(0.6)
    assert b.backlog(0.0) == pytest.approx(0.6)
    assert b.backlog(0.25) == pytest.approx(0.35)
    assert b.backlog(0.6) == 0.0 and b.backlog(2.0) == 0.0
    assert b.backlog(0.25) == pytest.approx(0.35)  # read only: a later look does not refill the bucket
    assert unlimited().backlog(0.0) == 0.0 and TokenBucket(0.0).backlog(0.0) == 0.0
    slow, fast = TokenBucket(100.0, burst=100.0), TokenBucket(1000.0, burst=100.0)
    h = Hierarchy(fast, slow)
    h.reserve(300, now=0.0)
    assert h.backlog(0.0) == pytest.approx(3.0)  # the slowest level's
    assert Hierarchy().backlog(0.0) == 0.0
