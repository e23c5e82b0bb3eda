"""The relay on loopback: it splices two nodes that present the same token, both ways, byte for byte;
it refuses (with a logged reason) unknown tokens, tokens of other nodes, unregistered nodes and a
second use of a token; its pair cap, rate cap and idle timeout hold."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from p2pd.protocol import rendezvous as rv
from p2pd.relay import Relay, RelayRefused, dial_relay
from p2pd.stream_io import TRAFFIC

A, B, C, D = "a" * 32, "b" * 32, "c" * 32, "d" * 32
KEY = b"k" * 32
MiB = 1 << 20


@asynccontextmanager
async def running_relay(**kw: Any) -> AsyncIterator[Relay]:
    relay = Relay(keys=lambda: [KEY], **kw)
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.serve, "127.0.0.1", 0)
        yield relay
        nursery.cancel_scope.cancel()


def token(a: str = A, b: str = B, key: bytes = KEY) -> bytes:
    return rv.mint_token(key, a, b, time.time())


async def dial(relay: Relay, tok: bytes, node: str, pair_timeout: float = 5) -> trio.SocketStream:
    assert relay.port is not None
    return await dial_relay(("127.0.0.1", relay.port), tok, node, connect_timeout=2, pair_timeout=pair_timeout)


async def both(relay: Relay, tok: bytes, x: str = A, y: str = B) -> tuple[trio.SocketStream, trio.SocketStream]:
    got: dict[str, trio.SocketStream] = {}

    async def one(node: str) -> None:
        got[node] = await dial(relay, tok, node)

    async with trio.open_nursery() as n:
        n.start_soon(one, x)
        n.start_soon(one, y)
    return got[x], got[y]


async def read_all(s: trio.SocketStream) -> bytes:
    buf = bytearray()
    while data := await s.receive_some(1 << 16):
        buf += data
    return bytes(buf)


async def until(pred: Callable[[], bool], timeout: float = 5) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.01)


async def test_two_nodes_with_one_token_are_spliced_both_ways() -> None:
    sent0, received0 = TRAFFIC.sent, TRAFFIC.received
    async with running_relay() as relay:
        a, b = await both(relay, token())
        ab, ba = os.urandom(3 * MiB + 17), os.urandom(MiB)
        got: dict[str, bytes] = {}

        async def send(s: trio.SocketStream, data: bytes) -> None:
            await s.send_all(data)
            await s.send_eof()

        async def recv(name: str, s: trio.SocketStream) -> None:
            got[name] = await read_all(s)

        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                n.start_soon(send, a, ab)
                n.start_soon(send, b, ba)
                n.start_soon(recv, "at b", b)
                n.start_soon(recv, "at a", a)
        assert got["at b"] == ab and got["at a"] == ba
        assert relay.stats.bytes_relayed == len(ab) + len(ba)
        # a relaying node's auto-throttle counts what it splices as p2pd's own traffic
        assert TRAFFIC.sent - sent0 >= len(ab) + len(ba) and TRAFFIC.received - received0 >= len(ab) + len(ba)
        await a.aclose()
        await b.aclose()
        await until(lambda: relay.stats.pairs_active == 0)
        assert relay.stats.pairs_spliced == 1


@pytest.mark.parametrize(
    ("make", "node", "why"),
    [
        (lambda: token(key=b"x" * 32), A, "unknown token"),
        (lambda: token(), C, "not issued to node cccccccc"),
        (lambda: rv.mint_token(KEY, A, B, time.time() - 60), A, "expired"),
    ],
)
async def test_bad_tokens_are_refused_with_a_logged_reason(
    make: Callable[[], bytes], node: str, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="p2pd.relay")
    async with running_relay() as relay:
        with pytest.raises(RelayRefused, match=why):
            await dial(relay, make(), node)
        assert relay.stats.refused == 1 and relay.stats.pairs_active == 0
    assert any("relay: refused node" in r.message and why in r.message for r in caplog.records), caplog.text


async def test_a_token_is_good_once_per_node() -> None:
    async with running_relay() as relay:
        tok = token()
        async with trio.open_nursery() as n:
            first: list[trio.SocketStream] = []

            async def a_waits() -> None:
                first.append(await dial(relay, tok, A))

            n.start_soon(a_waits)
            await until(lambda: len(relay.waiting) == 1)
            with pytest.raises(RelayRefused, match="already used by node aaaaaaaa"):
                await dial(relay, tok, A)  # a replay, while the first is still waiting
            b = await dial(relay, tok, B)
        await first[0].send_all(b"hello")
        assert await b.receive_some(5) == b"hello"
        with pytest.raises(RelayRefused, match="already used by node bbbbbbbb"):
            await dial(relay, tok, B)  # and after the pair was spliced
        await first[0].aclose()
        await b.aclose()


async def test_unregistered_nodes_are_refused() -> None:
    async def is_registered(node: str) -> bool:
        return node != B

    async with running_relay(is_registered=is_registered) as relay:
        with pytest.raises(RelayRefused, match="node bbbbbbbb is not registered"):
            await dial(relay, token(), B)


async def test_pair_cap_counts_waiting_pairs_and_frees_slots() -> None:
    async with running_relay(max_pairs=1, pair_timeout=0.5) as relay:
        async with trio.open_nursery() as n:
            n.start_soon(_expect_refusal, dial(relay, token(A, B), A), "did not arrive within 0.5 s")
            await until(lambda: relay.stats.pairs_active == 1)
            with pytest.raises(RelayRefused, match=r"relay busy \(1 pairs\)"):
                await dial(relay, token(C, D), C)
        assert relay.stats.pairs_active == 0  # the waiting pair timed out: its slot is free again
        a, b = await both(relay, token(C, D), C, D)
        await a.aclose()
        await b.aclose()


async def _expect_refusal(dialling: Awaitable[trio.SocketStream], why: str) -> None:
    with pytest.raises(RelayRefused, match=why):
        await dialling


async def test_rate_cap_holds() -> None:
    rate = 4 * MiB
    async with running_relay(rate=rate) as relay:
        a, b = await both(relay, token())
        data = os.urandom(2 * MiB)
        t0 = trio.current_time()

        async def send() -> None:
            await a.send_all(data)
            await a.send_eof()

        async with trio.open_nursery() as n:
            n.start_soon(send)
            got = await read_all(b)
        elapsed = trio.current_time() - t0
        assert got == data
        # one burst (64 KiB or 50 ms of the rate) may pass at once; the rest waits for tokens
        assert elapsed >= (len(data) - 256 * 1024) / rate * 0.9, f"{len(data) / elapsed / MiB:.1f} MiB/s"
        await a.aclose()
        await b.aclose()


async def test_an_idle_pair_is_closed() -> None:
    async with running_relay(idle_timeout=0.3) as relay:
        a, b = await both(relay, token())
        await a.send_all(b"x")
        assert await b.receive_some(1) == b"x"
        with trio.fail_after(3):
            assert await read_all(a) == b""  # the relay closed the pair: EOF
        await until(lambda: relay.stats.pairs_active == 0)
        await a.aclose()
        await b.aclose()


async def test_garbage_is_dropped_and_the_relay_keeps_serving(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="p2pd.relay")
    async with running_relay(hello_timeout=0.5) as relay:
        assert relay.port is not None
        for junk in (b"GET / HTTP/1.0\r\n\r\n", b"P2PR\x01", b""):
            s = await trio.open_tcp_stream("127.0.0.1", relay.port)
            await s.send_all(junk)
            with trio.fail_after(3):
                try:
                    assert await read_all(s) == b""
                except trio.BrokenResourceError:
                    pass  # closed with our bytes unread: a reset
            await s.aclose()
        assert relay.stats.refused == 3
        a, b = await both(relay, token())
        await a.aclose()
        await b.aclose()
    assert "not a relay greeting" in caplog.text and "timed out" in caplog.text
