"""Protocol-level tests of the asyncio control-API client against an in-test fake daemon."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
from ray_testutil import Emit, FakeDaemon, FakeDaemonError

from p2pd.errors import ErrorCode
from ray_plugin import daemon_client
from ray_plugin.daemon_client import DaemonClient, DaemonError, DaemonProtocolError, DaemonUnavailable


def test_socket_path_follows_the_cli_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"P2PD_SOCKET": "/a/s.sock", "P2PD_DATA_DIR": "/b"}
    assert daemon_client.socket_path(env) == Path("/a/s.sock")
    assert daemon_client.socket_path({"P2PD_DATA_DIR": "/b"}) == Path("/b/p2pd.sock")
    monkeypatch.setattr(daemon_client.os, "geteuid", lambda: 0)
    assert daemon_client.socket_path({}) == Path("/var/lib/p2pd/p2pd.sock")
    monkeypatch.setattr(daemon_client.os, "geteuid", lambda: 1000)
    assert daemon_client.socket_path({}) == Path.home() / ".local/share/p2pd/p2pd.sock"
    monkeypatch.setenv("P2PD_SOCKET", "/x/y.sock")  # read at call time, not import time
    assert daemon_client.socket_path() == Path("/x/y.sock")


def test_fetch_delivers_events_in_order_then_result(daemon_env: Path) -> None:
    async def handler(method: str, params: dict[str, Any], emit: Emit) -> Any:
        assert method == "fetch"
        for done in (0, 50, 100):
            await emit({"phase": "downloading", "bytes_done": done, "size": 100})
        return {"artifact_id": "a" * 64, "name": params["name"], "kind": "files", "path": "/cache/x", "meta": {}}

    events: list[int] = []

    async def main() -> dict[str, Any]:
        async with FakeDaemon(daemon_env, handler):
            return await daemon_client.fetch("m:v1", on_event=lambda e: events.append(e["bytes_done"]))

    result = asyncio.run(main())
    assert result["path"] == "/cache/x" and result["name"] == "m:v1"
    assert events == [0, 50, 100]


def test_concurrent_requests_on_one_connection_are_matched_by_id(daemon_env: Path) -> None:
    async def handler(method: str, params: dict[str, Any], emit: Emit) -> Any:
        await asyncio.sleep(params["delay"])  # replies come back in the reverse order
        return params["n"]

    async def main() -> list[Any]:
        async with FakeDaemon(daemon_env, handler) as fake, DaemonClient() as c:
            out = await asyncio.gather(*(c.call("status", {"n": n, "delay": 0.05 * (3 - n)}) for n in range(3)))
            assert fake.opened == 1
            return out

    assert asyncio.run(main()) == [0, 1, 2]


def test_error_reply_carries_code_and_message(daemon_env: Path) -> None:
    async def handler(method: str, params: dict[str, Any], emit: Emit) -> Any:
        raise FakeDaemonError(ErrorCode.NOT_FOUND, "no artifact named m:v9")

    async def main() -> None:
        async with FakeDaemon(daemon_env, handler):
            await daemon_client.fetch("m:v9")

    with pytest.raises(DaemonError) as ei:
        asyncio.run(main())
    assert ei.value.code is ErrorCode.NOT_FOUND and "m:v9" in str(ei.value)


def test_missing_socket_says_how_to_start_the_daemon(daemon_env: Path) -> None:
    with pytest.raises(DaemonUnavailable) as ei:
        asyncio.run(daemon_client.fetch("m:v1"))
    msg = str(ei.value)
    assert str(daemon_env) in msg and "does not exist" in msg and "p2pd run" in msg and "P2PD_SOCKET" in msg


def test_stale_socket_is_reported_as_daemon_down(daemon_env: Path) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(daemon_env))  # bound, never listening: what a crashed daemon leaves behind
    try:
        with pytest.raises(DaemonUnavailable) as ei:
            asyncio.run(daemon_client.fetch("m:v1"))
    finally:
        s.close()
    assert "refused" in str(ei.value) and "p2pd run" in str(ei.value)


def test_daemon_dying_mid_request_fails_the_waiter(daemon_env: Path) -> None:
    async def main() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(100)
            writer.close()  # crash before answering

        server = await asyncio.start_unix_server(serve, path=str(daemon_env))
        try:
            await daemon_client.fetch("m:v1")
        finally:
            server.close()
            await server.wait_closed()

    with pytest.raises(DaemonUnavailable, match="closed the connection"):
        asyncio.run(main())


def test_garbage_from_daemon_is_a_protocol_error(daemon_env: Path) -> None:
    async def main() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(100)
            writer.write(b"\x00\x00\x00\x02\xc1\xc1")  # 0xc1 is never valid msgpack
            await writer.drain()
            await asyncio.sleep(1)

        server = await asyncio.start_unix_server(serve, path=str(daemon_env))
        try:
            await daemon_client.fetch("m:v1")
        finally:
            server.close()

    with pytest.raises(DaemonProtocolError):
        asyncio.run(main())


def test_cancelled_call_leaves_the_connection_usable(daemon_env: Path) -> None:
    release = asyncio.Event

    async def main() -> Any:
        gate = release()

        async def handler(method: str, params: dict[str, Any], emit: Emit) -> Any:
            if method == "slow":
                await gate.wait()
            return method

        async with FakeDaemon(daemon_env, handler), DaemonClient() as c:
            slow = asyncio.create_task(c.call("slow"))
            await asyncio.sleep(0.05)
            slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow
            gate.set()  # the late reply to the cancelled call is dropped
            return await c.call("status")

    assert asyncio.run(main()) == "status"


def test_a_code_this_version_does_not_know_reads_as_internal_with_its_message(daemon_env: Path) -> None:
    async def handler(method: str, params: dict[str, Any], emit: Emit) -> Any:
        raise FakeDaemonError("quota_exceeded", "over quota: ask your admin")

    async def main() -> None:
        async with FakeDaemon(daemon_env, handler):
            await daemon_client.fetch("m:v9")

    with pytest.raises(DaemonError) as ei:
        asyncio.run(main())
    assert ei.value.code is ErrorCode.INTERNAL and ei.value.message == "over quota: ask your admin"
