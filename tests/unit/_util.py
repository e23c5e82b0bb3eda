"""Shared helpers of the unit suite: hypothesis settings and byte-stream splitting."""

from __future__ import annotations

from collections.abc import Iterator

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# No example database: the suite must not leave a .hypothesis/ directory in the checkout. Example counts are
# modest: the whole unit suite must stay well under a minute on a loaded 2-core machine.
FAST = settings(max_examples=75, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
QUICK = settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def split(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    """Cut `data` at the given positions (taken modulo len+1, sorted); may yield empty chunks."""
    pos = sorted(c % (len(data) + 1) for c in cuts)
    prev = 0
    for p in pos:
        yield data[prev:p]
        prev = p
    yield data[prev:]


cut_lists = st.lists(st.integers(min_value=0, max_value=1 << 30), max_size=12)
