"""Signalling through the tracker (in-process, loopback): a punch hands each side the address the tracker
saw the other's own connection come from, a relay request mints a token for the tracker's relay (or a
node's), and every forged or malformed request is refused with a logged reason. No request can make the
tracker name an address it did not observe or register itself."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from p2pd.errors import ErrorCode
from p2pd.protocol import rendezvous as rv
from p2pd.relay import RelayRefused, dial_relay
from p2pd.rpc import RpcError, open_client
from p2pd.trio_util import collapse_single
from tests.tracker.tracker_testutil import nid
from tracker.server import TrackerServer
from tracker.store import MemoryStore

A, B, C, X = nid(0xA), nid(0xB), nid(0xC), nid(0xEE)
AID = "f" * 64


@asynccontextmanager
async def tracker(*, relay: bool = False, **hub: Any) -> AsyncIterator[TrackerServer]:
    server = TrackerServer(MemoryStore(interval=30.0))
    for k, v in hub.items():
        setattr(server.signals, k, v)
    async with trio.open_nursery() as n:
        await n.start(server.serve, "127.0.0.1", 0, False)
        if relay:
            own = server.signals.own_relay(rate=None, max_pairs=4, idle_timeout=5, advertise=None)
            await n.start(own.serve, "127.0.0.1", 0)
        yield server
        n.cancel_scope.cancel()


async def call(
    server: TrackerServer,
    method: str,
    params: dict[str, Any],
    *,
    local: list[Any] | None = None,
    timeout: float = 5,
    on_event: Any = None,
) -> Any:
    """One RPC on a fresh connection; `local` gets the connection's own address (what the tracker sees)."""
    assert server.tcp_port is not None
    stream = await trio.open_tcp_stream("127.0.0.1", server.tcp_port)
    if local is not None:
        local.extend(stream.socket.getsockname()[:2])
    with collapse_single():
        async with open_client(stream) as client:
            return await client.call(method, params, timeout=timeout, on_event=on_event)


async def register(server: TrackerServer, node: str, port: int = 7700) -> int:
    r = await call(server, "register", {"node_id": node, "addr": ["127.0.0.1", port], "labels": {}, "version": "t"})
    return int(r["session"])


class SignalListener:
    """A node's open `signal` call; collects its events."""

    def __init__(self, server: TrackerServer, node: str, session: int, **extra: Any) -> None:
        self.server, self.node, self.session, self.extra = server, node, session, extra
        self.events: list[dict[str, Any]] = []
        self.result: Any = None
        self.ready = trio.Event()

    def _on(self, ev: dict[str, Any]) -> None:
        if ev["kind"] == "ready":
            self.ready.set()
        elif ev["kind"] != "ping":
            self.events.append(ev)

    async def run(self) -> None:
        self.result = await call(
            self.server,
            "signal",
            {"node_id": self.node, "session": self.session, **self.extra},
            timeout=30,
            on_event=lambda ev: self._on(ev),
        )

    async def next_event(self, kind: str, timeout: float = 5) -> dict[str, Any]:
        with trio.fail_after(timeout):
            while True:
                for ev in self.events:
                    if ev["kind"] == kind:
                        self.events.remove(ev)
                        return ev
                await trio.sleep(0.01)


@asynccontextmanager
async def listening(server: TrackerServer, node: str, session: int, **extra: Any) -> AsyncIterator[SignalListener]:
    sl = SignalListener(server, node, session, **extra)
    async with trio.open_nursery() as n:
        n.start_soon(sl.run)
        with trio.fail_after(5):
            await sl.ready.wait()
        yield sl
        n.cancel_scope.cancel()


async def test_punch_hands_each_side_the_address_seen_by_the_tracker() -> None:
    async with tracker() as server:
        sa, sb = await register(server, A), await register(server, B)
        async with listening(server, B, sb) as b:
            a_local: list[Any] = []
            answer: dict[str, Any] = {}

            async def a_asks() -> None:
                # an address smuggled into the request is ignored: the tracker fills in every address
                answer.update(
                    await call(
                        server,
                        "punch",
                        {"node_id": A, "session": sa, "target": B, "artifact_id": AID, "addr": ["10.9.9.9", 80]},
                        local=a_local,
                    )
                )

            async with trio.open_nursery() as n:
                n.start_soon(a_asks)
                ev = await b.next_event("punch")
                assert ev["from"] == A and ev["artifact_id"] == AID and "addr" not in ev
                b_local: list[Any] = []
                got = await call(
                    server, "punch_answer", {"node_id": B, "session": sb, "rendezvous": ev["rendezvous"]}, local=b_local
                )
            assert got["addr"] == a_local and answer["addr"] == b_local
            assert server.signals.pending == {}


async def test_punch_passes_each_side_the_others_nat_type() -> None:
    """The TCP birthday punch's roles (p2pd/protocol/tcp_punch.py) need both NAT types: the asker's goes with
    the signal, the answerer's with the answer to the asker; a side that sends none is not named either."""
    async with tracker() as server:
        sa, sb = await register(server, A), await register(server, B)
        async with listening(server, B, sb) as b:
            ask = {"node_id": A, "session": sa, "target": B, "artifact_id": AID}
            for a_nat, b_nat in (("port-restricted-cone", "symmetric"), ("", "")):
                answer: dict[str, Any] = {}

                async def a_asks(a_nat: str = a_nat, answer: dict[str, Any] = answer) -> None:
                    answer.update(await call(server, "punch", {**ask, **({"nat": a_nat} if a_nat else {})}))

                async with trio.open_nursery() as n:
                    n.start_soon(a_asks)
                    ev = await b.next_event("punch")
                    assert ev.get("nat", "") == a_nat
                    reply = {"node_id": B, "session": sb, "rendezvous": ev["rendezvous"]}
                    await call(server, "punch_answer", {**reply, **({"nat": b_nat} if b_nat else {})})
                assert answer.get("nat", "") == b_nat


async def test_forged_and_malformed_requests_are_refused_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tracker.signals")
    async with tracker(answer_timeout=0.3) as server:
        sa, sb, sc = await register(server, A), await register(server, B), await register(server, C)
        ask = {"node_id": A, "session": sa, "target": B, "artifact_id": AID}
        cases: list[tuple[str, dict[str, Any], ErrorCode, str]] = [
            ("punch", {**ask, "session": sa + 1}, ErrorCode.NOT_FOUND, "not registered with that session"),
            ("relay", {**ask, "node_id": X}, ErrorCode.NOT_FOUND, "not registered with that session"),
            ("punch", {**ask, "node_id": "../etc"}, ErrorCode.BAD_REQUEST, "node_id must be"),
            ("punch", {**ask, "target": X}, ErrorCode.NOT_FOUND, f"node {X[:8]} is not registered"),
            ("punch", {**ask, "target": "10.0.0.1:22"}, ErrorCode.BAD_REQUEST, "node_id must be"),
            ("punch", {**ask, "nat": "cone; rm -rf /"}, ErrorCode.BAD_REQUEST, "nat must be a NAT type name"),
            ("punch", {**ask, "target": A}, ErrorCode.BAD_REQUEST, "cannot rendezvous with itself"),
            ("punch", ask, ErrorCode.UNREACHABLE, "has no signal channel"),
            (
                "punch_answer",
                {"node_id": B, "session": sb, "rendezvous": "nope"},
                ErrorCode.BAD_REQUEST,
                "no punch waits",
            ),
            ("signal", {"node_id": C, "session": sc, "relay_port": "80"}, ErrorCode.BAD_REQUEST, "relay_port"),
        ]
        for method, params, code, why in cases:
            with pytest.raises(RpcError, match=why) as e:
                await call(server, method, params)
            assert e.value.code == code, (method, params)
        async with listening(server, B, sb) as b:
            results: list[Any] = []

            async def a_asks() -> None:
                with pytest.raises(RpcError, match="did not answer within 0.3 s"):
                    await call(server, "punch", ask)
                results.append("timed out")

            async with trio.open_nursery() as n:
                n.start_soon(a_asks)
                ev = await b.next_event("punch")
                # another registered node cannot answer in B's place (and so learn A's address)
                with pytest.raises(RpcError, match="no punch waits"):
                    await call(server, "punch_answer", {"node_id": C, "session": sc, "rendezvous": ev["rendezvous"]})
            assert results == ["timed out"]
            with pytest.raises(RpcError, match="no punch waits"):  # too late: the rendezvous is gone
                await call(server, "punch_answer", {"node_id": B, "session": sb, "rendezvous": ev["rendezvous"]})
    refusals = [r.message for r in caplog.records if r.message.startswith("signal: refused")]
    assert len(refusals) == len(cases) + 3, refusals
    assert any(f"refused punch from node {A[:8]} at 127.0.0.1: node {X[:8]} is not registered" in m for m in refusals)


async def test_rendezvous_requests_are_rate_limited_per_node() -> None:
    async with tracker(request_burst=3.0, request_rate=0.01) as server:
        sa, sb = await register(server, A), await register(server, B)
        ask = {"node_id": A, "session": sa, "target": B, "artifact_id": AID}
        for _ in range(3):
            with pytest.raises(RpcError, match="no signal channel"):
                await call(server, "relay", ask)
        with pytest.raises(RpcError, match="too many rendezvous requests") as e:
            await call(server, "relay", ask)
        assert e.value.code == ErrorCode.TIMEOUT
        with pytest.raises(RpcError, match="no signal channel"):  # another node has its own allowance
            await call(server, "relay", {**ask, "node_id": B, "session": sb, "target": A})


async def test_relay_through_the_trackers_relay_and_only_for_registered_nodes() -> None:
    async with tracker(relay=True) as server:
        sa, sb = await register(server, A), await register(server, B)
        async with listening(server, B, sb) as b:
            r = await call(server, "relay", {"node_id": A, "session": sa, "target": B, "artifact_id": AID})
            ev = await b.next_event("relay")
            assert ev["from"] == A and ev["token"] == r["token"]
            assert server.signals.relay is not None
            assert r["relay"] == ev["relay"] == ["127.0.0.1", server.signals.relay.port]
            addr = ("127.0.0.1", int(r["relay"][1]))
            streams: dict[str, trio.SocketStream] = {}

            async def meet(node: str) -> None:
                streams[node] = await dial_relay(addr, bytes(r["token"]), node, connect_timeout=2, pair_timeout=5)

            async with trio.open_nursery() as n:
                n.start_soon(meet, A)
                n.start_soon(meet, B)
            await streams[A].send_all(b"piece")
            assert await streams[B].receive_some(5) == b"piece"
            for s in streams.values():
                await s.aclose()
            # a token whose node has left since it was minted is refused at the relay
            r2 = await call(server, "relay", {"node_id": A, "session": sa, "target": B, "artifact_id": AID})
            await call(server, "leave", {"node_id": B})
            with pytest.raises(RelayRefused, match=f"node {B[:8]} is not registered"):
                await dial_relay(addr, bytes(r2["token"]), B, connect_timeout=2, pair_timeout=5)


async def test_a_nodes_relay_gets_a_key_and_the_pairs_tokens() -> None:
    async with tracker() as server:  # the tracker runs no relay of its own
        sa, sb, sc = await register(server, A), await register(server, B), await register(server, C, port=7711)
        async with listening(server, B, sb):
            with pytest.raises(RpcError, match="no relay is available"):
                await call(server, "relay", {"node_id": A, "session": sa, "target": B, "artifact_id": AID})
        async with listening(server, C, sc, relay_port=7701) as c, listening(server, B, sb) as b:
            key = bytes((await c.next_event("relay-key"))["key"])
            r = await call(server, "relay", {"node_id": A, "session": sa, "target": B, "artifact_id": AID})
            ev = await b.next_event("relay")
            assert r["relay"] == ev["relay"] == ["127.0.0.1", 7701]  # C's registered host, its relay port
            claims = rv.verify_token([key], bytes(r["token"]), B, time.time())
            assert (claims.a, claims.b) == (A, B)
            stats = server.signals.stats()
            assert stats["signal_channels"] == 2 and stats["relay_nodes"] == 1 and stats["relay_requests"] == 1


async def test_a_second_signal_call_replaces_the_first() -> None:
    async with tracker() as server:
        sb = await register(server, B)
        first = SignalListener(server, B, sb)
        async with trio.open_nursery() as n:
            n.start_soon(first.run)
            await first.ready.wait()
            async with listening(server, B, sb):
                with trio.fail_after(5):
                    while first.result is None:
                        await trio.sleep(0.01)
                assert first.result == {"closed": "replaced by a newer signal call of this node"}
                assert len(server.signals.channels) == 1


async def test_pings_keep_the_channel_alive() -> None:
    async with tracker(ping_every=0.05) as server:
        sb = await register(server, B)
        pings: list[float] = []
        sl = SignalListener(server, B, sb)
        orig = sl._on

        def on(ev: dict[str, Any]) -> None:
            if ev["kind"] == "ping":
                pings.append(trio.current_time())
            orig(ev)

        sl._on = on  # type: ignore[method-assign]
        async with trio.open_nursery() as n:
            n.start_soon(sl.run)
            with trio.fail_after(5):
                while len(pings) < 3:
                    await trio.sleep(0.01)
            n.cancel_scope.cancel()
