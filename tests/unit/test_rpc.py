"""Control RPC over length-prefixed frames (p2pd/rpc.py), in process over in-memory streams and a socketpair."""

from __future__ import annotations

import logging
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pd.errors import ErrorCode
from p2pd.protocol.framing import MAX_FRAME, FrameReader, encode_frame
from p2pd.rpc import (
    Emit,
    Handler,
    RpcClient,
    RpcError,
    call_blocking,
    open_client,
    parse_hostport,
    serve_connection,
)


async def echo(params: dict[str, Any], emit: Emit) -> Any:
    return params


async def fail(params: dict[str, Any], emit: Emit) -> Any:
    raise RpcError(ErrorCode(params.get("code", "not_found")), params.get("message", "no such artifact"))


async def key_error(params: dict[str, Any], emit: Emit) -> Any:
    return params["missing"]


async def crash(params: dict[str, Any], emit: Emit) -> Any:
    raise RuntimeError("handler bug")


async def progress(params: dict[str, Any], emit: Emit) -> Any:
    for i in range(params["n"]):
        await emit({"done": i})
        await trio.sleep(0.01)
    return "finished"


async def sleepy(params: dict[str, Any], emit: Emit) -> Any:
    await trio.sleep(params["delay"])
    return params["tag"]


HANDLERS: dict[str, Handler] = {
    "echo": echo,
    "fail": fail,
    "key_error": key_error,
    "crash": crash,
    "progress": progress,
    "sleepy": sleepy,
}


@asynccontextmanager
async def rpc_pair(handlers: dict[str, Handler] = HANDLERS) -> AsyncIterator[tuple[RpcClient, trio.Event]]:
    """A client connected to serve_connection; the event is set when the server returns (without raising)."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    server_done = trio.Event()

    async def server() -> None:
        await serve_connection(server_stream, handlers, peer="test")
        server_done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        async with open_client(client_stream) as client:
            yield client, server_done
        with trio.fail_after(5):
            await server_done.wait()


async def test_result() -> None:
    async with rpc_pair() as (client, _):
        assert await client.call("echo", {"a": 1, "b": [1, 2], "c": b"\0"}) == {"a": 1, "b": [1, 2], "c": b"\0"}
        assert await client.call("echo") == {}


async def test_rpc_error_propagates_with_code() -> None:
    async with rpc_pair() as (client, _):
        with pytest.raises(RpcError) as ei:
            await client.call("fail", {"code": "disk_full", "message": "not enough disk space"})
        assert ei.value.code is ErrorCode.DISK_FULL
        assert ei.value.message == str(ei.value) == "not enough disk space"
        assert await client.call("echo", {"still": "alive"}) == {"still": "alive"}


async def test_unknown_method_is_bad_request() -> None:
    async with rpc_pair() as (client, _):
        with pytest.raises(RpcError, match="unknown method 'nope'") as ei:
            await client.call("nope")
        assert ei.value.code is ErrorCode.BAD_REQUEST


async def test_handler_lookup_errors_are_bad_request() -> None:
    async with rpc_pair() as (client, _):
        with pytest.raises(RpcError, match="bad request for key_error") as ei:
            await client.call("key_error")
        assert ei.value.code is ErrorCode.BAD_REQUEST


async def test_handler_bug_is_internal_and_server_survives(caplog: pytest.LogCaptureFixture) -> None:
    async with rpc_pair() as (client, _):
        with caplog.at_level(logging.ERROR, logger="p2pd.rpc"):
            with pytest.raises(RpcError, match="internal error in crash") as ei:
                await client.call("crash")
        assert ei.value.code is ErrorCode.INTERNAL
        assert "handler bug" not in ei.value.message  # details go to the log, not the client
        assert any("handler crash failed" in r.getMessage() for r in caplog.records)
        assert await client.call("echo", {"x": 1}) == {"x": 1}


async def test_params_must_be_a_map() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, server_stream, HANDLERS)
        await client_stream.send_all(encode_frame({"id": 1, "method": "echo", "params": [1, 2]}))
        reply = await _read_frames(client_stream, 1)
        assert reply == [{"id": 1, "error": {"code": "bad_request", "message": "params must be a map"}}]
        await client_stream.aclose()


async def test_events_arrive_before_the_result(autojump_clock: trio.testing.MockClock) -> None:
    async with rpc_pair() as (client, _):
        seen: list[Any] = []
        result = await client.call("progress", {"n": 5}, on_event=seen.append)
        assert result == "finished"
        assert seen == [{"done": i} for i in range(5)]

        async def async_handler(ev: dict[str, Any]) -> None:
            await trio.sleep(0)
            seen.append(ev)

        seen.clear()
        assert await client.call("progress", {"n": 3}, on_event=async_handler) == "finished"
        assert seen == [{"done": i} for i in range(3)]
        assert await client.call("progress", {"n": 3}) == "finished"  # events without a listener are dropped


async def test_concurrent_calls_on_one_connection(autojump_clock: trio.testing.MockClock) -> None:
    async with rpc_pair() as (client, _):
        results: dict[int, Any] = {}
        finished: list[int] = []

        async def one(i: int) -> None:
            results[i] = await client.call("sleepy", {"delay": (10 - i) * 0.1, "tag": f"t{i}"})
            finished.append(i)

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(one, i)
        assert results == {i: f"t{i}" for i in range(10)}
        assert finished == list(range(9, -1, -1))  # replies come back as handlers finish, not in call order
        assert trio.current_time() - start == pytest.approx(1.0)  # ran concurrently


async def test_call_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async with rpc_pair() as (client, _):
        with pytest.raises(RpcError, match="no answer within 2 s") as ei:
            await client.call("sleepy", {"delay": 100, "tag": "x"}, timeout=2)
        assert ei.value.code is ErrorCode.TIMEOUT
        # Events reset the timeout: 20 events 0.01 s apart with a 0.05 s timeout succeed.
        assert await client.call("progress", {"n": 20}, timeout=0.05) == "finished"


async def _read_frames(stream: trio.abc.ReceiveStream, n: int) -> list[Any]:
    reader = FrameReader()
    out: list[Any] = []
    with trio.fail_after(5):
        while len(out) < n:
            data = await stream.receive_some(65536)
            assert data, "connection closed early"
            out += reader.feed(data)
    return out


async def _expect_eof(stream: trio.abc.ReceiveStream) -> None:
    with trio.fail_after(5):
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return


@pytest.mark.parametrize(
    "garbage",
    [
        struct.pack(">I", MAX_FRAME + 1),  # oversized length
        struct.pack(">I", 2) + b"\xc1\xc1",  # undecodable body
        encode_frame([1, 2, 3]),  # a frame that is not a request
        encode_frame({"method": "echo"}),  # a request without an id
        struct.pack(">I", 2) + b"\xa1\x80",  # a str that is not UTF-8
        struct.pack(">I", 200_001) + b"\x91" * 200_000 + b"\xc0",  # nested past the recursion limit
    ],
)
async def test_garbage_closes_the_connection_without_crashing(garbage: bytes) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    returned = trio.Event()

    async def server() -> None:
        await serve_connection(server_stream, HANDLERS, peer="garbage")  # must return, not raise
        returned.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        # A valid request first: it is answered, then the garbage ends the connection.
        await client_stream.send_all(encode_frame({"id": 1, "method": "echo", "params": {"x": 1}}))
        assert await _read_frames(client_stream, 1) == [{"id": 1, "result": {"x": 1}}]
        await client_stream.send_all(garbage)
        await _expect_eof(client_stream)
        with trio.fail_after(5):
            await returned.wait()


async def test_pending_call_fails_when_server_drops_the_connection() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()

    async def hangup_server() -> None:
        reader = FrameReader()
        while not reader.feed(await server_stream.receive_some(65536)):
            pass
        await server_stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hangup_server)
        async with open_client(client_stream) as client:
            with pytest.raises(RpcError) as ei:
                await client.call("echo", timeout=5)
            assert ei.value.code is ErrorCode.UNREACHABLE
            with pytest.raises(RpcError, match="closed by the server") as ei2:
                await client.call("echo")
            assert ei2.value.code is ErrorCode.UNREACHABLE


async def test_client_closing_cancels_in_flight_handlers() -> None:
    cancelled = trio.Event()

    async def forever(params: dict[str, Any], emit: Emit) -> Any:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    client_stream, server_stream = trio.testing.memory_stream_pair()
    handlers: dict[str, Handler] = {"forever": forever}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, server_stream, handlers)
        await client_stream.send_all(encode_frame({"id": 1, "method": "forever"}))
        await trio.testing.wait_all_tasks_blocked()
        await client_stream.aclose()
        with trio.fail_after(5):
            await cancelled.wait()


async def test_over_a_real_socketpair() -> None:
    a, b = trio.socket.socketpair()
    server_stream, client_stream = trio.SocketStream(a), trio.SocketStream(b)
    big = {"blob": b"\x5a" * (3 << 20)}  # larger than one read: frames reassembled across receives
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, server_stream, HANDLERS)
        async with open_client(client_stream) as client:
            assert await client.call("echo", big) == big
            with pytest.raises(RpcError) as ei:
                await client.call("fail")
            assert ei.value.code is ErrorCode.NOT_FOUND


async def test_call_blocking_against_the_trio_server() -> None:
    """The blocking client (probes, helpers outside trio) against the real server, over a socketpair."""
    a, b = trio.socket.socketpair()
    server_stream = trio.SocketStream(a)
    client_sock = b.detach()
    big = {"blob": b"\x5a" * (3 << 20)}

    def client() -> None:
        import socket

        with socket.socket(fileno=client_sock) as s:
            s.settimeout(5)
            assert call_blocking(s, "echo", big, req_id=7) == big
            assert call_blocking(s, "progress", {"n": 3}, req_id=8) == "finished"  # events skipped
            with pytest.raises(RpcError) as ei:
                call_blocking(s, "fail", {"code": "disk_full", "message": "full"}, req_id=9)
            assert (ei.value.code, ei.value.message) == ("disk_full", "full")
            s.settimeout(0.2)
            with pytest.raises(RpcError, match="sleepy: no answer within 0.2 s") as ei:
                call_blocking(s, "sleepy", {"delay": 2, "tag": "late"}, req_id=10)
            assert ei.value.code == "timeout"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, server_stream, HANDLERS)
        await trio.to_thread.run_sync(client)
        nursery.cancel_scope.cancel()


def test_call_blocking_on_a_closed_connection_is_unreachable() -> None:
    import socket

    a, b = socket.socketpair()
    with a, b:
        b.close()
        with pytest.raises(RpcError) as ei:
            call_blocking(a, "echo")
        assert ei.value.code == "unreachable"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        (":9000", ("127.0.0.1", 9000)),
        ("[::1]:443", ("::1", 443)),
        ("example.org:0", ("example.org", 0)),
        ("h:65535", ("h", 65535)),
    ],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["", "host", "host:", "host:http", "host:65536", "host:-1"])
def test_parse_hostport_errors(text: str) -> None:
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        parse_hostport(text)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400), st.booleans())
def test_any_bytes_to_the_rpc_server_end_the_connection_cleanly(data: bytes, with_timeouts: bool) -> None:
    """Fuzz: whatever a client sends, serve_connection answers or closes; it never raises or hangs."""
    from p2pd.rpc import serve_connection

    async def echo(params: dict[str, Any], emit: Any) -> Any:
        return params

    async def main() -> None:
        client, server = trio.testing.memory_stream_pair()
        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                limit = 0.2 if with_timeouts else None
                n.start_soon(lambda: serve_connection(server, {"echo": echo}, idle_timeout=limit, frame_timeout=limit))
                await client.send_all(data)
                await client.send_eof()
                with trio.move_on_after(2):
                    while await client.receive_some(65536):
                        pass
                n.cancel_scope.cancel()

    trio.run(main)
