"""The NAT bench's per-path accounting and `--keep-logs` (pure functions; no namespaces needed)."""

from __future__ import annotations

import io
from pathlib import Path

from netsim.bench.nat import keep_lab_logs, received_by_path
from p2pd.swarm import bytes_by_path


def test_path_totals_become_json_per_path_with_both_directions() -> None:
    totals = {("direct", "in"): 10, ("udp-punch", "out"): 3, ("direct", "out"): 4}
    assert bytes_by_path(totals) == {"direct": {"in": 10, "out": 4}, "udp-punch": {"in": 0, "out": 3}}
    assert bytes_by_path({}) == {}


def test_received_by_path_sums_what_every_peer_received() -> None:
    by_path = {
        "p0c": {"direct": {"in": 5, "out": 1}, "relay": {"in": 2, "out": 0}},
        "p4s": {"direct": {"in": 7, "out": 9}, "udp-punch": {"in": 1, "out": 2}},
        "p6p": {},
    }
    assert received_by_path(by_path) == {"direct": 12, "relay": 2, "udp-punch": 1}


def test_keep_logs_copies_every_log_of_the_lab(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "tracker.log").write_text("tracker\n")
    (work / "p0c.log").write_text("peer\n")
    (work / "swarm.bin").write_bytes(b"not a log")
    out = io.StringIO()
    keep_lab_logs(work, tmp_path / "kept" / "run1", out)
    kept = tmp_path / "kept" / "run1"
    assert sorted(p.name for p in kept.iterdir()) == ["p0c.log", "tracker.log"]
    assert (kept / "p0c.log").read_text() == "peer\n"
    assert str(kept) in out.getvalue()
