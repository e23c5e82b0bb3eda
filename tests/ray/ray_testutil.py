"""Helpers of the Ray suite (imported by name: pytest puts this directory on sys.path).

`FakeDaemon` speaks the daemon's local control API (docs/interfaces.md) on a Unix socket with asyncio.
It exists only for protocol-level unit tests of the client and the plugin (ordering, cancellation,
error mapping) that a real daemon cannot be made to exhibit on cue; everything end to end runs
against the real `p2pd` and `p2p-tracker` (test_ray_cluster.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from p2pd.protocol.framing import FrameReader, encode_frame

Emit = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[str, dict[str, Any], Emit], Awaitable[Any]]


class FakeDaemonError(Exception):
    """Answered as an error reply; `code` is sent as given (an `ErrorCode`, or any string to test decoding)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class FakeDaemon:
    """An asyncio server for the control API whose behaviour is one handler coroutine."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.opened = 0
        self.closed = 0
        self.closed_event = asyncio.Event()
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> FakeDaemon:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await t
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.opened += 1
        frames = FrameReader()
        lock = asyncio.Lock()

        async def send(obj: dict[str, Any]) -> None:
            async with lock:
                writer.write(encode_frame(obj))
                await writer.drain()

        async def run(req: dict[str, Any]) -> None:
            async def emit(event: dict[str, Any]) -> None:
                await send({"id": req["id"], "event": event})

            try:
                result = await self.handler(req["method"], req["params"], emit)
            except FakeDaemonError as e:
                await send({"id": req["id"], "error": {"code": e.code, "message": e.message}})
            else:
                await send({"id": req["id"], "result": result})

        try:
            while data := await reader.read(65536):
                for req in frames.feed(data):
                    self.requests.append((req["method"], req["params"]))
                    task = asyncio.get_running_loop().create_task(run(req))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        finally:
            self.closed += 1
            self.closed_event.set()
            writer.close()


def write_fake_python(path: Path, body: str) -> None:
    """A stand-in interpreter (shell script) for env checks that must not depend on a real env."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    os.chmod(path, 0o755)


def tree_digests(root: str | os.PathLike[str]) -> dict[str, str]:
    """{relative path: sha256} of every file under root (or of root itself when it is a file)."""
    base = Path(root)
    files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
    return {
        (p.name if p == base else str(p.relative_to(base))): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
    }
