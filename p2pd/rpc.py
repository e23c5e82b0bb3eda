"""Request/reply RPC over length-prefixed msgpack frames (trio), for the local API and the tracker.

One connection carries many concurrent requests; a long request may send progress events before its
final reply. Handlers raise `RpcError` (or any `P2pdError`) for failures the caller should see, with
a code of `p2pd.errors.ErrorCode`; any other exception is logged and reported as `internal` so a bad
request never takes the server down.
"""

from __future__ import annotations

import contextvars
import logging
import math
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from p2pd.caller import Caller
from p2pd.errors import ErrorCode, P2pdError
from p2pd.protocol.framing import FrameError, FrameReader, RpcError, encode_frame

log = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[dict[str, Any], Emit], Awaitable[Any]]
READ_SIZE = 65536
# The client of the request being handled (SO_PEERCRED on a Unix socket; None over TCP): handlers
# read it with `current_caller()` to act with the caller's rights, without a change to their signature.
_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("p2pd_rpc_caller", default=None)


def current_caller() -> Caller | None:
    return _CALLER.get()


def _caller_of(stream: trio.abc.Stream) -> Caller | None:
    if not isinstance(stream, trio.SocketStream) or stream.socket.family != socket.AF_UNIX:
        return None
    fd = stream.socket.fileno()
    sock = socket.socket(fileno=os.dup(fd))
    try:
        return Caller.of_socket(sock)
    finally:
        sock.close()


async def serve_connection(
    stream: trio.abc.Stream,
    handlers: dict[str, Handler],
    peer: str = "",
    *,
    idle_timeout: float | None = None,
    frame_timeout: float | None = None,
) -> None:
    """Serve one client connection until it closes; each request runs in its own task.

    `idle_timeout`: close a connection with no request running and no byte received for this long
    (a long request such as a signal channel keeps it open). `frame_timeout`: close one whose frame,
    once begun, is not complete within this long (a partial frame must not be held for ever).
    """
    send_lock = trio.Lock()
    running = [0]
    last_byte = [trio.current_time()]
    frame_since: list[float | None] = [None]
    _CALLER.set(_caller_of(stream))  # copied into every request task started below

    async def send(obj: dict[str, Any]) -> None:
        async with send_lock:
            await stream.send_all(encode_frame(obj))

    async def run_one(req_id: Any, method: str, params: dict[str, Any]) -> None:
        async def emit(event: dict[str, Any]) -> None:
            await send({"id": req_id, "event": event})

        handler = handlers.get(method)
        running[0] += 1
        try:
            if handler is None:
                raise RpcError(ErrorCode.BAD_REQUEST, f"unknown method {method!r}")
            if not isinstance(params, dict):
                raise RpcError(ErrorCode.BAD_REQUEST, "params must be a map")
            result = await handler(params, emit)
            reply: dict[str, Any] = {"id": req_id, "result": result}
        except P2pdError as e:
            reply = {"id": req_id, "error": RpcError(e.code, e.message).to_wire()}
        except (KeyError, TypeError, ValueError) as e:
            err = RpcError(ErrorCode.BAD_REQUEST, f"bad request for {method}: {e!r}")
            reply = {"id": req_id, "error": err.to_wire()}
        except Exception:  # a handler bug must not kill the server: report it, log the traceback
            log.exception("handler %s failed", method)
            err = RpcError(ErrorCode.INTERNAL, f"internal error in {method}; see the server log")
            reply = {"id": req_id, "error": err.to_wire()}
        finally:
            running[0] -= 1
        try:
            await send(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("client %s went away before reply to %s", peer, method)

    async def watchdog(cancel: trio.CancelScope) -> None:
        check_every = min(t for t in (idle_timeout, frame_timeout, 1.0) if t is not None) / 2
        while True:
            await trio.sleep(check_every)
            now = trio.current_time()
            began = frame_since[0]
            if frame_timeout is not None and began is not None and now - began > frame_timeout:
                log.info("closing RPC connection %s: a frame begun %.0f s ago is still incomplete", peer, now - began)
                cancel.cancel()
            if idle_timeout is not None and not running[0] and now - last_byte[0] > idle_timeout:
                log.debug("closing idle RPC connection %s", peer)
                cancel.cancel()

    reader = FrameReader()
    try:
        async with trio.open_nursery() as nursery:
            if idle_timeout is not None or frame_timeout is not None:
                nursery.start_soon(watchdog, nursery.cancel_scope)
            while True:
                try:
                    data = await stream.receive_some(READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                if not data:
                    break
                last_byte[0] = trio.current_time()
                try:
                    frames = reader.feed(data)
                except FrameError as e:
                    log.warning("closing RPC connection %s: %s", peer, e)
                    break
                frame_since[0] = (frame_since[0] or last_byte[0]) if reader.pending else None
                for f in frames:
                    if not isinstance(f, dict) or "method" not in f or "id" not in f:
                        log.warning("closing RPC connection %s: frame is not a request", peer)
                        nursery.cancel_scope.cancel()
                        return
                    nursery.start_soon(run_one, f["id"], str(f["method"]), f.get("params", {}))
            # Client closed its side: let in-flight requests finish only if it still reads replies.
            nursery.cancel_scope.cancel()
    finally:
        with trio.move_on_after(1) as cs:
            cs.shield = True
            await stream.aclose()


async def serve_listeners(
    listeners: list[Any], handlers: dict[str, Handler], *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    async def on_conn(stream: trio.abc.Stream) -> None:
        await serve_connection(stream, handlers)

    await trio.serve_listeners(on_conn, listeners, task_status=task_status)


class RpcClient:
    """Concurrent calls over one connection. Use `open_client` to get one."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._next_id = 1
        self._waiters: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._send_lock = trio.Lock()
        self._closed: str | None = None

    async def _reader(self) -> None:
        reader = FrameReader()
        try:
            while True:
                data = await self._stream.receive_some(READ_SIZE)
                if not data:
                    self._closed = "connection closed by the server"
                    break
                for f in reader.feed(data):
                    ch = self._waiters.get(f["id"]) if isinstance(f, dict) and "id" in f else None
                    if ch is not None:
                        ch.send_nowait(f)
        except (trio.BrokenResourceError, trio.ClosedResourceError, FrameError) as e:
            self._closed = f"connection lost: {e}"
        finally:
            for ch in list(self._waiters.values()):
                ch.close()

    async def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        timeout: float = 30.0,
        on_event: Callable[[dict[str, Any]], Awaitable[None] | None] | None = None,
    ) -> Any:
        """Call `method`; `timeout` bounds the time between messages (events reset it)."""
        if self._closed:
            raise RpcError(ErrorCode.UNREACHABLE, self._closed)
        req_id = self._next_id
        self._next_id += 1
        send_ch, recv_ch = trio.open_memory_channel[dict[str, Any]](math.inf)
        self._waiters[req_id] = send_ch
        try:
            async with self._send_lock:
                await self._stream.send_all(encode_frame({"id": req_id, "method": method, "params": params or {}}))
            while True:
                with trio.move_on_after(timeout) as cs:
                    try:
                        msg = await recv_ch.receive()
                    except trio.EndOfChannel:
                        raise RpcError(ErrorCode.UNREACHABLE, self._closed or "connection lost") from None
                if cs.cancelled_caught:
                    raise RpcError(ErrorCode.TIMEOUT, f"{method}: no answer within {timeout:g} s")
                if "event" in msg:
                    if on_event is not None:
                        r = on_event(msg["event"])
                        if r is not None:
                            await r
                    continue
                if "error" in msg:
                    raise RpcError.from_wire(msg["error"])
                return msg.get("result")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise RpcError(ErrorCode.UNREACHABLE, f"connection lost: {e}") from e
        finally:
            del self._waiters[req_id]


@asynccontextmanager
async def open_client(stream: trio.abc.Stream) -> AsyncIterator[RpcClient]:
    client = RpcClient(stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client._reader)
        try:
            yield client
        finally:
            nursery.cancel_scope.cancel()
            with trio.move_on_after(1) as cs:
                cs.shield = True
                await stream.aclose()


@asynccontextmanager
async def connect_tcp(host: str, port: int, timeout: float = 5.0) -> AsyncIterator[RpcClient]:
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(host, port)
    async with open_client(stream) as c:
        yield c


@asynccontextmanager
async def connect_unix(path: str, timeout: float = 5.0) -> AsyncIterator[RpcClient]:
    with trio.fail_after(timeout):
        stream = await trio.open_unix_socket(path)
    async with open_client(stream) as c:
        yield c


def call_blocking(sock: socket.socket, method: str, params: dict[str, Any] | None = None, *, req_id: int = 1) -> Any:
    """One request on a connected blocking socket, for code that runs outside trio: a readiness probe,
    a helper in another network namespace. The socket's timeout bounds each read; progress events are
    skipped. One request at a time per socket (the reader sees only this request's frames). Failures are
    RpcError with the codes `RpcClient.call` uses (`timeout`, `unreachable`, or the server's)."""
    reader = FrameReader()
    try:
        sock.sendall(encode_frame({"id": req_id, "method": method, "params": params or {}}))
    except TimeoutError:
        raise RpcError(ErrorCode.TIMEOUT, f"{method}: could not send within {sock.gettimeout() or 0:g} s") from None
    except OSError as e:
        raise RpcError(ErrorCode.UNREACHABLE, f"connection lost: {e}") from e
    while True:
        try:
            data = sock.recv(READ_SIZE)
        except TimeoutError:
            raise RpcError(ErrorCode.TIMEOUT, f"{method}: no answer within {sock.gettimeout() or 0:g} s") from None
        except OSError as e:
            raise RpcError(ErrorCode.UNREACHABLE, f"connection lost: {e}") from e
        if not data:
            raise RpcError(ErrorCode.UNREACHABLE, "connection closed by the server")
        try:
            frames = reader.feed(data)
        except FrameError as e:
            raise RpcError(ErrorCode.UNREACHABLE, f"connection lost: {e}") from e
        for msg in frames:
            if not isinstance(msg, dict) or msg.get("id") != req_id or "event" in msg:
                continue
            if "error" in msg:
                raise RpcError.from_wire(msg["error"])
            return msg.get("result")


def parse_hostport(s: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """Parse `HOST:PORT`, `[v6]:PORT` or `:PORT`; raise ValueError with a usable message."""
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {s!r}")
    host = host.strip("[]") or default_host
    return host, int(port)


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (a tracker binds both on one port)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port = int(t.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port on 127.0.0.1")
