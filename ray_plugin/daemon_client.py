"""A small asyncio client for the node daemon's local control API (docs/interfaces.md).

Why asyncio and not the daemon's trio RPC module: the Ray plugin runs inside Ray's runtime_env agent,
which is one asyncio event loop shared by every environment set up on the node. Anything that blocks
that loop (a synchronous socket read, a trio.run) stalls every other worker start on the node, so the
client here only ever awaits. The frame codec is shared with the daemon (`p2pd.protocol.framing`), so
the two cannot drift apart.

The socket is found by the same rule as the CLI: `$P2PD_SOCKET`, else `$P2PD_DATA_DIR/p2pd.sock`, else
the default data dir (`/var/lib/p2pd` as root, `~/.local/share/p2pd` otherwise). The environment is
read at call time, not import time, so one process can talk to different daemons (tests do).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from p2pd import paths
from p2pd.errors import ErrorCode
from p2pd.protocol.framing import FrameError, FrameReader, RpcError, encode_frame

READ_SIZE = 65536

EventCallback = Callable[[dict[str, Any]], None]

START_HINT = (
    "start the p2pd daemon on this node (`p2pd run --tracker HOST:PORT --listen HOST:PORT --data-dir DIR`) "
    "or point P2PD_SOCKET (or P2PD_DATA_DIR) at its socket in the environment of `ray start`"
)


def socket_path(environ: Mapping[str, str] | None = None) -> Path:
    """Where this node's daemon listens, by the CLI's rule (p2pd.paths)."""
    return paths.socket_path(environ=environ)


class DaemonError(RpcError):
    """The daemon answered a request with an error; `code` is a `p2pd.errors.ErrorCode`."""


class DaemonUnavailable(DaemonError):
    """No daemon could be reached at the socket, or it went away mid-request."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UNREACHABLE, message)


class DaemonProtocolError(DaemonError):
    """The daemon sent something that is not a valid API frame; the connection is unusable."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.PROTOCOL, message)


class _Pending:
    """One request in flight: its reply future and where its progress events go."""

    __slots__ = ("future", "on_event")

    def __init__(self, future: asyncio.Future[Any], on_event: EventCallback | None) -> None:
        self.future = future
        self.on_event = on_event


class DaemonClient:
    """One connection to the daemon; many requests may be in flight on it at once.

    Use as `async with DaemonClient(path) as c: result = await c.call("fetch", {...}, on_event=cb)`.
    Cancelling a `call` only stops waiting: the daemon keeps going with the request (a fetch goes on
    downloading), and its late reply is dropped. Closing the connection likewise leaves the daemon's
    downloads running (the API guarantees it), which is what a Ray setup timeout needs.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else socket_path()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._read_task: asyncio.Task[None] | None = None
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._send_lock = asyncio.Lock()
        self._closed_error: DaemonError | None = None

    async def __aenter__(self) -> DaemonClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the socket; a missing or refusing socket becomes a DaemonUnavailable saying what to do."""
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(str(self.path))
        except FileNotFoundError as e:
            raise DaemonUnavailable(
                f"p2pd daemon socket {self.path} does not exist (is the daemon running on this node?): {START_HINT}"
            ) from e
        except ConnectionRefusedError as e:
            raise DaemonUnavailable(
                f"p2pd daemon at {self.path} refused the connection (stale socket: the daemon is down): {START_HINT}"
            ) from e
        except PermissionError as e:
            raise DaemonUnavailable(
                f"no permission to open the p2pd daemon socket {self.path}: run Ray as a user that may, "
                "or give the daemon's data dir group access"
            ) from e
        except OSError as e:
            raise DaemonUnavailable(f"cannot connect to the p2pd daemon at {self.path}: {e}: {START_HINT}") from e
        self._read_task = asyncio.get_running_loop().create_task(self._read_loop(), name=f"p2pd-client:{self.path}")

    async def close(self) -> None:
        """Close the connection; requests still waiting fail with DaemonUnavailable."""
        if self._read_task is not None:
            self._read_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._read_task
            self._read_task = None
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._writer = None
        self._fail_all(DaemonUnavailable(f"connection to the p2pd daemon at {self.path} was closed"))

    async def call(
        self, method: str, params: dict[str, Any] | None = None, on_event: EventCallback | None = None
    ) -> Any:
        """Send one request and wait for its final reply; progress events go to `on_event` as they come."""
        if self._writer is None:
            raise DaemonUnavailable(f"not connected to the p2pd daemon at {self.path}")
        if self._closed_error is not None:
            raise self._closed_error
        req_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = _Pending(future, on_event)
        try:
            frame = encode_frame({"id": req_id, "method": method, "params": params or {}})
            async with self._send_lock:
                self._writer.write(frame)
                try:
                    await self._writer.drain()
                except (ConnectionError, OSError) as e:
                    raise DaemonUnavailable(f"lost the connection to the p2pd daemon at {self.path}: {e}") from e
            return await future
        finally:
            self._pending.pop(req_id, None)

    async def _read_loop(self) -> None:
        """Route every incoming frame to the request it answers, until the connection ends."""
        assert self._reader is not None
        frames = FrameReader()
        error: DaemonError
        try:
            while True:
                data = await self._reader.read(READ_SIZE)
                if not data:
                    error = DaemonUnavailable(
                        f"the p2pd daemon at {self.path} closed the connection (did it stop or crash?): {START_HINT}"
                    )
                    break
                for msg in frames.feed(data):
                    self._dispatch(msg)
        except FrameError as e:
            error = DaemonProtocolError(f"the p2pd daemon at {self.path} sent an invalid frame: {e}")
        except (ConnectionError, OSError) as e:
            error = DaemonUnavailable(f"lost the connection to the p2pd daemon at {self.path}: {e}")
        self._closed_error = error
        self._fail_all(error)

    def _dispatch(self, msg: Any) -> None:
        if not isinstance(msg, dict) or "id" not in msg:
            return  # nothing to route it to; the API never sends such frames
        pending = self._pending.get(msg["id"])
        if pending is None or pending.future.done():
            return  # a reply to a request whose caller stopped waiting
        if "event" in msg:
            if pending.on_event is not None:
                try:
                    pending.on_event(msg["event"])
                except Exception as e:  # a broken progress callback must fail its own request, not all
                    pending.future.set_exception(e)
            return
        if "error" in msg:
            pending.future.set_exception(DaemonError.from_wire(msg["error"]))
        elif "result" in msg:
            pending.future.set_result(msg["result"])

    def _fail_all(self, error: DaemonError) -> None:
        for pending in list(self._pending.values()):
            if not pending.future.done():
                pending.future.set_exception(error)


async def call(
    method: str,
    params: dict[str, Any] | None = None,
    *,
    path: str | os.PathLike[str] | None = None,
    on_event: EventCallback | None = None,
) -> Any:
    """One request on its own connection: what the plugin uses, so a cancelled wait just hangs up."""
    async with DaemonClient(path) as client:
        return await client.call(method, params, on_event=on_event)


async def fetch(
    name: str,
    *,
    path: str | os.PathLike[str] | None = None,
    dest: str | None = None,
    on_event: EventCallback | None = None,
    lease: tuple[str, float] | None = None,
) -> dict[str, Any]:
    """Ask the daemon for an artifact and wait until every byte is verified (and an env unpacked).

    `lease` = (holder, ttl seconds): the daemon keeps the artifact from cache eviction that long after
    handing it over (a daemon older than cache management ignores it).
    """
    params: dict[str, Any] = {"name": name, "dest": dest}
    if lease is not None:
        params["lease"] = {"holder": lease[0], "ttl": lease[1]}
    result = await call("fetch", params, path=path, on_event=on_event)
    if not isinstance(result, dict) or "path" not in result:
        raise DaemonProtocolError(f"the p2pd daemon's fetch reply for {name} has no path: {result!r}")
    return result
