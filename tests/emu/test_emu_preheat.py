"""Preheat from the tracker on emulated links (issue #16): `p2p-tracker admin preheat NAME:TAG --all` makes
every node fetch a published artifact into its cache with nothing else asking for it; `admin preheat status`
shows the progress until every node is complete, and every cached copy is byte-identical (the bench
materialises each with `p2pd fetch` from the node's own cache and compares it with cmp)."""

from __future__ import annotations

import io

import pytest

from netsim.bench.preheat import PreheatOptions, run_preheat
from p2pd.units import parse_size, rate_bits

pytestmark = pytest.mark.emu


def test_preheat_reaches_every_node_with_visible_progress(emu: None) -> None:
    log = io.StringIO()
    o = PreheatOptions(peers=3, size=parse_size("24MiB"), rate_bps=rate_bits("100Mbit/s"), iperf=False, timeout_s=120)
    r = run_preheat(o, log)
    why = f"{r['headline']}\nsamples {r['samples']}\n{log.getvalue()[-3000:]}"
    # every peer logged its preheat complete, after the order was placed
    assert sorted(r["per_peer_s"]) == ["p1", "p2", "p3"], why
    assert all(0 < t <= r["t_s"] for t in r["per_peer_s"].values()), why
    # the status went from not-complete to every node (the seed too) complete, through progress in between
    first, last = r["samples"][0], r["samples"][-1]
    assert first[3] < 4 and last[3] == 4 and last[4] == 0, why
    assert last[5] == 1.0, why
    progress = [s[5] for s in r["samples"]]
    assert progress == sorted(progress), why
    assert any(0.25 < p < 1.0 for p in progress) or len(progress) <= 2, why
    # what `admin preheat status` prints says so too
    assert "4 complete" in r["status_text"] and "0 failed" in r["status_text"], why
    # the order reached the nodes with their heartbeats: within a few intervals of the command
    assert r["t_first_fetch_s"] is not None and r["t_first_fetch_s"] <= r["t_ordered_s"] + 3 * o.interval, why
