"""NatMonitor keeps checking a node that got no mapping (issue #12 item 4): UDP lost for a while comes back."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from p2pd import nat_detect
from p2pd.nat_detect import NatMonitor
from p2pd.protocol.nat import Classification, NatType
from p2pd.rpc import free_port
from tracker.server import TrackerServer
from tracker.store import MemoryStore
from tracker.stun import StunSettings


async def test_a_node_classified_udp_blocked_classifies_again_once_udp_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    srv = TrackerServer(MemoryStore(0.5), stun=StunSettings(alt=("127.0.0.2", free_port())))
    tport = free_port()
    reports: list[dict[str, Any]] = []
    real_classify = nat_detect.classify
    calls = [0]

    async def first_blocked(*args: Any, **kw: Any) -> Classification:
        calls[0] += 1
        if calls[0] == 1:  # as if UDP was lost during the first classification
            return Classification(NatType.UDP_BLOCKED, None, "no answer")
        return await real_classify(*args, **kw)

    monkeypatch.setattr("p2pd.nat_detect.classify", first_blocked)
    async with trio.open_nursery() as n:
        await n.start(srv.serve, "127.0.0.1", tport)
        mon = NatMonitor(("127.0.0.1", 0), check_every=0.05, reclassify_every=3600)

        async def report(st: Any) -> bool:
            reports.append(st.registration())
            return True

        await n.start(mon.run, lambda: ("127.0.0.1", tport), report)
        with trio.fail_after(10):
            while len(reports) < 2:
                await trio.sleep(0.02)
        n.cancel_scope.cancel()
    assert reports[0] == {"type": "udp-blocked", "mapped": None}
    assert reports[1]["type"] == "open" and reports[1]["mapped"] is not None, reports
