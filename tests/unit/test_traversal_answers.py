"""Answered punches and relay meetings stop once the swarm holds a connection that would win over theirs.

The asker of a punch races its paths and cancels the losers, but the tracker does not tell the answering side:
in the NAT swarm (issue #12) an answered UDP punch (256 sockets, or ~8,000 sprayed probes) went on for its
whole 4 s beside the TCP connection the asker's race had chosen, in every run, on the 2 cores the downloads need.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from p2pd import traversal, udp_punch
from p2pd.config import SwarmConfig, TraversalConfig
from p2pd.connections import Connection, ConnectionPath
from p2pd.protocol.auth import Identity, NodeKey

ME = Identity(NodeKey.from_seed(b"\x0a" * 32), None)
AID = "b" * 64


def _traversal(wanted: Any) -> traversal.Traversal:
    async def serve(conn: Connection) -> None:
        raise AssertionError("no answer here brings a connection")

    return traversal.Traversal(
        ME, TraversalConfig(), SwarmConfig(), serves=lambda aid: aid == AID, serve=serve, wanted=wanted
    )


def _udp_event(remote: str) -> dict[str, Any]:
    return {"kind": "udp-punch", "from": remote, "artifact_id": AID, "rendezvous": "0123456789abcdef"}


async def test_an_answered_udp_punch_stops_once_a_better_connection_is_held(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    remote = "f" * 32
    held: list[tuple[str, str, ConnectionPath, str]] = []
    asked: list[tuple[str, str, ConnectionPath, str]] = []
    started, stopped = trio.Event(), trio.Event()

    def wanted(aid: str, remote_id: str, path: ConnectionPath, initiator: str) -> bool:
        asked.append((aid, remote_id, path, initiator))
        return not held

    async def answer(*args: Any, **kw: Any) -> Connection | None:
        started.set()
        try:
            await trio.sleep(4.0)  # the punch's whole timeout: what it did before
        finally:
            stopped.set()
        raise AssertionError("the answer ran to its end")

    monkeypatch.setattr(udp_punch, "answer", answer)
    tr = _traversal(wanted)
    async with trio.open_nursery() as n:
        tr._nursery = n
        tr.on_signal(_udp_event(remote))
        await started.wait()
        await trio.sleep(1.0)
        assert tr.answering == 1 and not stopped.is_set()  # still wanted: it goes on
        t = trio.current_time()
        held.append(asked[-1])  # the asker's TCP punch won its race: our swarm holds that connection now
        await stopped.wait()
        assert trio.current_time() - t <= 2 * traversal.ANSWER_POLL
        await trio.testing.wait_all_tasks_blocked()
        assert tr.answering == 0
    # the asker opens the UDP punch's connection (QUIC's client), so it is the initiator on both ends
    assert asked[0] == (AID, remote, ConnectionPath.UDP_PUNCH, remote)


async def test_a_punch_not_wanted_is_not_answered_and_names_the_lower_id_as_initiator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A punch asked when the swarm already holds a connection that would win is not started at all; a punched
    TCP connection's initiator is the lower id at both ends, whoever asked."""
    remote = "0" * 32  # lower than ours
    asked: list[tuple[str, str, ConnectionPath, str]] = []

    def wanted(aid: str, remote_id: str, path: ConnectionPath, initiator: str) -> bool:
        asked.append((aid, remote_id, path, initiator))
        return False

    async def never(*args: Any, **kw: Any) -> Connection | None:
        raise AssertionError("answered a punch nobody wants")

    tr = _traversal(wanted)
    monkeypatch.setattr(tr, "_answer_punch", never)
    monkeypatch.setattr(udp_punch, "answer", never)
    async with trio.open_nursery() as n:
        tr._nursery = n
        tr.on_signal({"kind": "punch", "from": remote, "artifact_id": AID, "rendezvous": "r1", "nat": "symmetric"})
        tr.on_signal(_udp_event(remote))
        assert tr.answering == 0
    assert asked == [
        (AID, remote, ConnectionPath.TCP_PUNCH, remote),
        (AID, remote, ConnectionPath.UDP_PUNCH, remote),
    ]
    mine_higher = "f" * 32
    asked.clear()
    async with trio.open_nursery() as n:
        tr._nursery = n
        tr.on_signal({"kind": "punch", "from": mine_higher, "artifact_id": AID, "rendezvous": "r2"})
    assert asked == [(AID, mine_higher, ConnectionPath.TCP_PUNCH, min(ME.node_id, mine_higher))]
