"""The auto-throttle bench's derived numbers (netsim/bench/autothrottle.py), without namespaces."""

from __future__ import annotations

import argparse
from typing import Any

from netsim.bench import autothrottle
from p2pd.units import parse_size, rate_bits


def test_yield_after_is_the_first_limit_at_or_after_the_service_start() -> None:
    trace: list[list[Any]] = [[9.5, 1e6, 0, 0, 0], [10.0, None, 0, 0, 0], [10.25, None, 0, 0, 0], [10.75, 5e6, 0, 0, 0]]
    assert autothrottle._yield_after(trace, 10.0) == 0.75  # (a limit before the service is not a yield to it)
    assert autothrottle._yield_after(trace[:3], 10.0) is None


def test_small_service_and_its_rate_parse() -> None:
    ap = argparse.ArgumentParser()
    autothrottle.add_arguments(ap, parse_size, rate_bits)
    a = ap.parse_args(["--services", "half,small", "--small-rate", "20Mbit/s"])
    assert a.services == ["half", "small"] and a.small_rate == 20_000_000
