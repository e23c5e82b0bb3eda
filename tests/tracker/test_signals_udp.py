"""The UDP punch's rendezvous through the tracker: each side gets the other's IP as the tracker saw it (never
an IP from the request), the port and NAT type the other reported, and the same rendezvous id; forged or
malformed requests are refused with a logged reason, and a TCP punch's answer cannot answer a UDP one."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio

from p2pd.errors import ErrorCode
from p2pd.rpc import RpcError
from tests.tracker.test_signals import AID, A, B, C, call, listening, register, tracker


async def test_udp_punch_exchanges_ports_and_nat_types_with_the_ips_the_tracker_saw() -> None:
    async with tracker() as server:
        sa, sb = await register(server, A), await register(server, B)
        async with listening(server, B, sb) as b:
            answer: dict[str, Any] = {}
            ask = {"node_id": A, "session": sa, "target": B, "artifact_id": AID, "port": 40001, "nat": "symmetric"}

            async def a_asks() -> None:
                # an address smuggled into the request is ignored: the IP is the one the tracker sees
                answer.update(await call(server, "udp_punch", {**ask, "addr": ["10.9.9.9", 53]}))

            async with trio.open_nursery() as n:
                n.start_soon(a_asks)
                ev = await b.next_event("udp-punch")
                assert ev["from"] == A and ev["artifact_id"] == AID and ev["nat"] == "symmetric"
                assert ev["addr"] == ["127.0.0.1", 40001]
                got = await call(
                    server,
                    "udp_punch_answer",
                    {"node_id": B, "session": sb, "rendezvous": ev["rendezvous"], "port": 40002, "nat": "full-cone"},
                )
            assert got["addr"] == ["127.0.0.1", 40001]
            assert answer == {"addr": ["127.0.0.1", 40002], "nat": "full-cone", "rendezvous": ev["rendezvous"]}
            assert server.signals.pending == {} and server.signals.stats()["udp_punches"] == 1


async def test_forged_and_malformed_udp_punches_are_refused(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tracker.signals")
    async with tracker(answer_timeout=0.3) as server:
        sa, sb, sc = await register(server, A), await register(server, B), await register(server, C)
        ask = {"node_id": A, "session": sa, "target": B, "artifact_id": AID, "port": 4000, "nat": "open"}
        cases: list[tuple[dict[str, Any], ErrorCode, str]] = [
            ({**ask, "port": 0}, ErrorCode.BAD_REQUEST, "port must be in 1..65535"),
            ({**ask, "port": 70000}, ErrorCode.BAD_REQUEST, "port must be in 1..65535"),
            ({**ask, "port": True}, ErrorCode.BAD_REQUEST, "port must be in 1..65535"),
            ({**ask, "nat": "x" * 100}, ErrorCode.BAD_REQUEST, "nat must be a NAT type name"),
            ({**ask, "nat": "a;rm -rf"}, ErrorCode.BAD_REQUEST, "nat must be a NAT type name"),
            ({**ask, "session": sa + 1}, ErrorCode.NOT_FOUND, "not registered with that session"),
            ({**ask, "target": A}, ErrorCode.BAD_REQUEST, "cannot rendezvous with itself"),
            (ask, ErrorCode.UNREACHABLE, "has no signal channel"),
        ]
        for params, code, why in cases:
            with pytest.raises(RpcError, match=why) as e:
                await call(server, "udp_punch", params)
            assert e.value.code == code, params
        async with listening(server, B, sb) as b:

            async def a_asks() -> None:
                with pytest.raises(RpcError, match="did not answer within 0.3 s"):
                    await call(server, "udp_punch", ask)

            async with trio.open_nursery() as n:
                n.start_soon(a_asks)
                ev = await b.next_event("udp-punch")
                answer = {"rendezvous": ev["rendezvous"], "port": 5000, "nat": "open"}
                # another node cannot answer in B's place, and a TCP punch answer does not fit a UDP punch
                with pytest.raises(RpcError, match="no UDP punch waits"):
                    await call(server, "udp_punch_answer", {"node_id": C, "session": sc, **answer})
                with pytest.raises(RpcError, match="no punch waits"):
                    await call(server, "punch_answer", {"node_id": B, "session": sb, "rendezvous": ev["rendezvous"]})
    refusals = [r.message for r in caplog.records if r.message.startswith("signal: refused")]
    assert len(refusals) == len(cases) + 3, refusals
