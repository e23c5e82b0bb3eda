"""The throttle benchmark's arithmetic (no root needed): 1-s windows, steady windows, reaction, pause."""

from __future__ import annotations

import pytest

from netsim.bench.throttle import ThrottleOptions, rate_at, report


def samples_at(rate_bps: list[tuple[float, float, float]], step: float = 0.1) -> list[tuple[float, int]]:
    """Cumulative byte samples for piecewise constant rates [(from, to, bit/s)]."""
    out, total, t = [(0.0, 0)], 0.0, 0.0
    end = rate_bps[-1][1]
    while t < end - 1e-9:
        r = next(r for a, b, r in rate_bps if a <= t < b)
        total += r / 8 * step
        t = round(t + step, 6)
        out.append((t, int(total)))
    return out


def test_rate_interpolates_between_samples() -> None:
    s = samples_at([(0, 10, 8e6)])
    assert rate_at(s, 2.0, 3.0) == pytest.approx(8e6, rel=1e-3)
    assert rate_at(s, 2.05, 3.05) == pytest.approx(8e6, rel=1e-3)
    assert rate_at(s, 9.5, 10.5) is None  # not covered


def test_report_windows_reaction_and_pause() -> None:
    o = ThrottleOptions(peers=4, size=10_000_000, budget_bps=40_000_000, change_bps=64_000_000)
    s = samples_at([(0, 8, 40e6), (8, 9, 40e6), (9, 14, 64e6), (14, 18, 0.0), (18, 20, 300e6)])
    events = [(0.0, 40e6), (8.0, 64e6), (14.0, 0.0), (18.0, None)]
    r = report(o, s, events, {"p1": 20.0, "p2": 20.0, "p3": 20.0, "p4": 20.0}, None)
    steady = [w["t"] for w in r["windows"] if w["steady"]]
    # 2 s after the start and after the change; the pause and the cleared phase have no budget to hold
    assert steady == [2, 3, 4, 5, 6, 7, 10, 11, 12, 13]
    assert r["budget_ratio_mean"] == pytest.approx(1.0, abs=0.01)
    # nodes follow 1 s late: the 1-s window ending 1.47 s after the change is the first at 0.8x
    assert r["reaction_s"] == pytest.approx(1.5, abs=0.11)
    assert r["pause_rate_max_bps"] == 0
    assert r["t_budget_s"] == pytest.approx(4 * 10_000_000 * 8 / 40e6)


def test_judged_windows_end_with_the_last_byte_and_keep_real_errors() -> None:
    """Windows are judged from one interval + 1 s after the start until the last byte: the window holding
    the end of the transfer (the rate falls as the copies complete) is reported raw but not judged, and an
    under-used window before it still counts."""
    o = ThrottleOptions(peers=4, size=10_000_000, budget_bps=40_000_000)
    s = samples_at([(0, 5, 40e6), (5, 6, 30e6), (6, 9.5, 40e6), (9.5, 12, 1e6)])
    done = {"p1": 11.0, "p2": 11.5, "p3": 11.8, "p4": 12.0}  # the fetches exit after the daemons finish
    last = {"p1": 8.2, "p2": 9.0, "p3": 9.4, "p4": 9.5}
    r = report(o, s, [(0.0, 40e6)], done, None, last)
    assert [w["t"] for w in r["windows"] if w["judged"]] == [2, 3, 4, 5, 6, 7, 8]
    assert r["windows_judged"] == 7
    assert r["max_error_judged"] == pytest.approx(0.25, abs=0.01)  # the 30 Mbit/s window, not hidden
    assert r["windows"][9]["rate_bps"] < 0.7 * 40e6  # the end of the transfer: kept in the raw windows
    assert r["t_last_byte_s"] == 9.5


def test_windows_while_every_leecher_fetches_end_with_the_first_copy() -> None:
    """`max_error_all_fetching` leaves out the judged windows after the first copy completed (the end game:
    fewer receivers than senders) and keeps every earlier error."""
    o = ThrottleOptions(peers=4, size=10_000_000, budget_bps=40_000_000)
    s = samples_at([(0, 5, 40e6), (5, 6, 38e6), (6, 8, 40e6), (8, 9, 30e6), (9, 9.5, 40e6), (9.5, 12, 1e6)])
    done = {"p1": 11.0, "p2": 11.5, "p3": 11.8, "p4": 12.0}
    last = {"p1": 8.2, "p2": 9.0, "p3": 9.4, "p4": 9.5}
    r = report(o, s, [(0.0, 40e6)], done, None, last)
    assert [w["t"] for w in r["windows"] if w["all_fetching"]] == [2, 3, 4, 5, 6, 7]
    assert r["windows_all_fetching"] == 6
    assert r["max_error_all_fetching"] == pytest.approx(0.05, abs=0.01)  # window 5, before any copy completed
    assert r["max_error_judged"] == pytest.approx(0.25, abs=0.01)  # window 8 holds p1's completion
