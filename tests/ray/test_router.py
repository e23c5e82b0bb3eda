"""Properties of the latency-weighted smooth round-robin router (pure: exact, fast)."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from ray_plugin.router import LatencyRouter, SmoothWRR

int_weights = st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=8)
float_weights = st.lists(st.floats(min_value=0.01, max_value=100.0), min_size=1, max_size=8)


@given(int_weights, st.integers(min_value=1, max_value=5))
def test_integer_weights_give_exact_shares_in_every_cycle(weights: list[int], cycles: int) -> None:
    wrr: SmoothWRR[int] = SmoothWRR()
    w = dict(enumerate(weights))
    total = sum(weights)
    for _ in range(cycles):
        counts = Counter(wrr.pick(w) for _ in range(total))
        assert counts == Counter({k: v for k, v in w.items()})


@given(float_weights, st.integers(min_value=1, max_value=300))
def test_share_never_strays_from_proportional(weights: list[float], n: int) -> None:
    """Smoothness: after any n picks, each count is within a constant of n * w_i / W (no bursts)."""
    wrr: SmoothWRR[int] = SmoothWRR()
    w = dict(enumerate(weights))
    total = sum(weights)
    counts: Counter[int] = Counter()
    for _ in range(n):
        picked = wrr.pick(w)
        assert picked is not None
        counts[picked] += 1
    for k, wk in w.items():
        assert abs(counts[k] - n * wk / total) <= len(weights)


@given(st.lists(st.floats(min_value=0.0, max_value=10.0), min_size=1, max_size=8), st.integers(1, 100))
def test_zero_weight_is_never_picked(weights: list[float], n: int) -> None:
    wrr: SmoothWRR[int] = SmoothWRR()
    w = dict(enumerate(weights))
    for _ in range(n):
        k = wrr.pick(w)
        if all(x <= 0 for x in weights):
            assert k is None
        else:
            assert k is not None and w[k] > 0


@settings(deadline=None)
@given(st.lists(st.floats(min_value=0.001, max_value=1.0), min_size=2, max_size=6))
def test_share_follows_inverse_latency(latencies: list[float]) -> None:
    """Weights come from EWMA latency: each worker's share converges to (1/l_i) / sum(1/l_j)."""
    r: LatencyRouter[int] = LatencyRouter(range(len(latencies)))
    now = 0.0
    for k, lat in enumerate(latencies):  # one measurement each (the first sample sets the EWMA)
        r.record_success(k, lat, now)
    n = 2000
    counts: Counter[int] = Counter()
    for _ in range(n):
        picked = r.pick(now)
        assert picked is not None
        counts[picked] += 1
        r.record_success(picked, latencies[picked], now)
    inv = [1 / lat for lat in latencies]
    for k, x in enumerate(inv):
        assert abs(counts[k] - n * x / sum(inv)) <= len(latencies) + 1


@given(
    st.integers(min_value=2, max_value=6),
    st.integers(min_value=0, max_value=5),
    st.floats(min_value=0.1, max_value=5.0),
)
def test_failed_worker_gets_nothing_until_its_probe_then_one_request(n: int, dead: int, retry_after: float) -> None:
    dead %= n
    r: LatencyRouter[int] = LatencyRouter(range(n), retry_after=retry_after)
    r.record_failure(dead, now=0.0)
    t = 0.0
    while t < retry_after:  # before the backoff: never
        assert r.pick(t) != dead
        t += retry_after / 7
    assert r.pick(retry_after) == dead  # the probe
    assert all(r.pick(retry_after) != dead for _ in range(3 * n))  # one probe at a time
    r.record_failure(dead, now=retry_after)  # probe failed: backoff doubles
    assert r.next_probe_at() == retry_after + 2 * retry_after
    assert all(r.pick(retry_after * 2.9) != dead for _ in range(3 * n))
    assert r.pick(retry_after * 3) == dead
    r.record_success(dead, 0.01, retry_after * 3)  # recovered: back in rotation
    assert dead in {r.pick(retry_after * 3) for _ in range(10 * n)}


def test_all_failed_returns_none_and_when_to_look_again() -> None:
    r: LatencyRouter[str] = LatencyRouter(["a", "b"], retry_after=2.0)
    r.record_failure("a", 0.0)
    r.record_failure("b", 1.0)
    assert r.pick(0.5) is None
    assert r.next_probe_at() == 2.0
    assert r.pick(2.0) == "a"


def test_slow_worker_share_drops_as_its_latency_rises() -> None:
    r: LatencyRouter[str] = LatencyRouter(["fast", "slow"], alpha=0.5)
    lat = {"fast": 0.01, "slow": 0.01}
    counts: Counter[str] = Counter()
    for i in range(400):
        if i == 100:
            lat["slow"] = 0.1  # e.g. its GPU got shared, or its node got busy
        k = r.pick(float(i))
        assert k is not None
        if i >= 200:
            counts[k] += 1
        r.record_success(k, lat[k], float(i))
    assert counts["slow"] < 0.15 * counts["fast"]


def test_new_worker_is_measured_soon() -> None:
    r: LatencyRouter[str] = LatencyRouter(["a"])
    r.record_success("a", 0.5, 0.0)
    r.add("b")
    assert "b" in {r.pick(0.0) for _ in range(3)}
