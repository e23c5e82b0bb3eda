"""The --churn driver probes a restarted daemon with `p2pd status` (a Python process, ~0.3 s of CPU) only once the
daemon created its control socket: probes started in a loop while it started took the 2 cores from that start."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

from netsim.bench.clients.p2pd import _Churn
from netsim.bench.model import ChurnEvent


class FakeProc:
    def __init__(self) -> None:
        self.returncode: int | None = None
        self.signals: list[int] = []

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)


def test_status_probe_waits_for_the_control_socket(tmp_path: Any) -> None:
    node = SimpleNamespace(name="p1")
    lc = SimpleNamespace(node=node, done_at=None, away=False, proc=FakeProc(), fetch_args=[])
    old = FakeProc()
    started: list[FakeProc] = []

    def stop(p: FakeProc, timeout: float) -> int:
        p.returncode = 0
        return 0

    def start_daemon(n: Any) -> FakeProc:
        p = FakeProc()
        churn.daemons[n.name] = p  # type: ignore[assignment]
        started.append(p)
        return p

    ctx = SimpleNamespace(say=lambda msg: None, net=SimpleNamespace(topo=SimpleNamespace(stop=stop)))
    churn = _Churn(
        ctx,  # type: ignore[arg-type]
        [ChurnEvent(1, 0.0, 0.0)],  # leaves at once, due back at once
        [lc],  # type: ignore[list-item]
        {"p1": old},  # type: ignore[dict-item]
        start_daemon,  # type: ignore[arg-type]
        [],
        str(tmp_path),
        {},
    )
    probes: list[str] = []

    def probe(x: Any) -> Any:
        probes.append(x.node.name)
        return FakeProc()

    churn._status_probe = probe  # type: ignore[method-assign, assignment]
    os.makedirs(tmp_path / "data-p1")
    for _ in range(3):
        assert churn.step() is None
    assert len(started) == 1 and "p1" in churn.away  # restarted, not answering yet
    assert probes == []  # no socket yet: no `p2pd status` process competing with the start
    (tmp_path / "data-p1" / "p2pd.sock").touch()
    churn.step()
    assert probes == ["p1"]
    assert churn.log[0]["socket_s"] is not None
