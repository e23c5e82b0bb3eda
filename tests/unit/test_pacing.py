"""Per-peer pipeline depth from the measured rate (p2pd/protocol/pacing.py): a slow path holds one request, an
ordinary one the configured depth, a fast one more; the rate counts only time our requests waited at the peer."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from p2pd.config import SwarmConfig
from p2pd.protocol.pacing import PeerRate, swarm_depth
from tests.unit._util import FAST

KiB, MiB = 1 << 10, 1 << 20
CFG = SwarmConfig()


def depth(rate: float | None, piece: int) -> int:
    return swarm_depth(rate, piece, CFG)


def test_depths_of_the_paths_the_issue_names() -> None:
    assert depth(None, 256 * KiB) == CFG.pipeline_depth  # not measured yet: as before
    assert depth(25e6, 256 * KiB) == CFG.pipeline_depth  # a 200 Mbit/s TCP peer: unchanged
    assert depth(5e6, 16 * MiB) == 1  # a relay at 5 MB/s with 16 MiB pieces: 3.4 s a piece
    assert depth(1e9, 256 * KiB) == CFG.pipeline_max  # a 1 GB/s TCP peer


@FAST
@given(
    st.floats(min_value=1e3, max_value=1e10),
    st.floats(min_value=1e3, max_value=1e10),
    st.sampled_from([256 * KiB, MiB, 4 * MiB, 16 * MiB]),
)
def test_depth_never_falls_as_the_rate_rises_and_stays_in_bounds(r1: float, r2: float, piece: int) -> None:
    lo, hi = sorted((r1, r2))
    assert 1 <= depth(lo, piece) <= depth(hi, piece) <= max(CFG.pipeline_depth, CFG.pipeline_max)


def test_rate_counts_only_time_requests_waited() -> None:
    r = PeerRate(half_life=10.0)
    assert r.rate is None
    r.waiting(0.0)
    r.delivered(1_000_000, 0.1, more_waiting=False)  # 10 MB/s
    r.waiting(50.0)  # idle for 50 s: not counted
    r.delivered(1_000_000, 50.1, more_waiting=True)
    r.delivered(1_000_000, 50.2, more_waiting=False)
    rate = r.rate
    assert rate is not None and abs(rate - 10e6) < 1e5


def test_rate_follows_a_path_that_slows_down() -> None:
    r = PeerRate(half_life=1.0)
    t = 0.0
    r.waiting(t)
    for _ in range(20):  # 100 MB/s
        t += 0.01
        r.delivered(1_000_000, t, more_waiting=True)
    for _ in range(10):  # then 1 MB/s, for 10 s
        t += 1.0
        r.delivered(1_000_000, t, more_waiting=True)
    rate = r.rate
    assert rate is not None and rate < 2e6
