"""A small Redis client for trio (RESP2): pipelined commands over a few connections.

Why not redis-py: its async client is asyncio-only, and the tracker is trio. The tracker needs a
handful of commands (mostly EVALSHA of its own Lua scripts, see `redis_store`), pipelining and
timeouts; RESP2 is a few dozen lines. Each connection is used by one request at a time (a lock), and
the client keeps a small pool so concurrent RPCs do not queue behind a heartbeat batch.
A broken connection is dropped and reopened on the next command; every wait is bounded by `timeout`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

import trio

Arg = bytes | str | int | float


class RedisError(Exception):
    """Redis answered with an error reply (e.g. WRONGTYPE, NOSCRIPT)."""

    @property
    def prefix(self) -> str:
        """The reply's first word: Redis' own error code (NOSCRIPT, WRONGTYPE, ERR...), by its protocol."""
        return str(self).split(" ", 1)[0]


class RedisUnavailable(Exception):
    """Redis could not be reached or the connection broke; the message says where and why."""


def parse_url(url: str) -> tuple[str, int, int, str | None]:
    """redis://[:password@]HOST:PORT/DB -> (host, port, db, password)."""
    u = urlparse(url)
    if u.scheme != "redis" or not u.hostname:
        raise ValueError(f"expected redis://HOST:PORT/DB, got {url!r}")
    path = (u.path or "/0").strip("/") or "0"
    if not path.isdigit():
        raise ValueError(f"database must be a number in {url!r}")
    return u.hostname, u.port or 6379, int(path), u.password


def _encode(args: Sequence[Arg]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, bytes):
            b = a
        elif isinstance(a, str):
            b = a.encode()
        elif isinstance(a, float):
            b = repr(a).encode()
        else:
            b = str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class _Parser:
    """Incremental RESP2 reply parser: feed bytes, pop complete replies."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0

    def feed(self, data: bytes) -> None:
        if self.pos:
            del self.buf[: self.pos]
            self.pos = 0
        self.buf += data

    def _line(self) -> bytes | None:
        i = self.buf.find(b"\r\n", self.pos)
        if i < 0:
            return None
        line = bytes(self.buf[self.pos : i])
        self.pos = i + 2
        return line

    def pop(self) -> tuple[bool, Any]:
        start = self.pos
        ok, v = self._value()
        if not ok:
            self.pos = start
        return ok, v

    def _value(self) -> tuple[bool, Any]:
        line = self._line()
        if line is None:
            return False, None
        t, rest = line[:1], line[1:]
        if t == b"+":
            return True, rest.decode()
        if t == b"-":
            return True, RedisError(rest.decode(errors="replace"))
        if t == b":":
            return True, int(rest)
        if t == b"$":
            n = int(rest)
            if n < 0:
                return True, None
            if len(self.buf) < self.pos + n + 2:
                return False, None
            v = bytes(self.buf[self.pos : self.pos + n])
            self.pos += n + 2
            return True, v
        if t == b"*":
            n = int(rest)
            if n < 0:
                return True, None
            items = []
            for _ in range(n):
                ok, v = self._value()
                if not ok:
                    return False, None
                items.append(v)
            return True, items
        raise RedisUnavailable(f"protocol error: unexpected reply type {t!r}")


class _Conn:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.parser = _Parser()

    async def roundtrip(self, cmds: Sequence[Sequence[Arg]]) -> list[Any]:
        await self.stream.send_all(b"".join(_encode(c) for c in cmds))
        out: list[Any] = []
        while len(out) < len(cmds):
            ok, v = self.parser.pop()
            if ok:
                out.append(v)
                continue
            data = await self.stream.receive_some(1 << 16)
            if not data:
                raise RedisUnavailable("connection closed by Redis")
            self.parser.feed(data)
        return out


class Redis:
    """A pool of `size` connections to one Redis; `pipeline` sends many commands in one round trip."""

    def __init__(self, url: str, *, size: int = 4, timeout: float = 5.0) -> None:
        self.url = url
        self.host, self.port, self.db, self.password = parse_url(url)
        self.timeout = timeout
        self._conns: list[_Conn | None] = [None] * size
        self._locks = [trio.Lock() for _ in range(size)]
        self._next = 0

    @property
    def where(self) -> str:
        return f"redis://{self.host}:{self.port}/{self.db}"

    async def _open(self) -> _Conn:
        try:
            with trio.fail_after(self.timeout):
                stream = await trio.open_tcp_stream(self.host, self.port)
                conn = _Conn(stream)
                setup: list[list[Arg]] = []
                if self.password:
                    setup.append(["AUTH", self.password])
                setup.append(["SELECT", self.db])
                for r in await conn.roundtrip(setup):
                    if isinstance(r, RedisError):
                        await stream.aclose()
                        raise RedisUnavailable(f"{self.where}: {r}")
                return conn
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as e:
            raise RedisUnavailable(f"cannot reach {self.where}: {e or 'timed out'}") from e

    async def pipeline(self, cmds: Sequence[Sequence[Arg]]) -> list[Any]:
        """Replies in order; error replies are returned as `RedisError` values, not raised."""
        i = self._next
        self._next = (i + 1) % len(self._conns)
        async with self._locks[i]:
            conn = self._conns[i]
            if conn is None:
                conn = self._conns[i] = await self._open()
            try:
                with trio.fail_after(self.timeout):
                    return await conn.roundtrip(cmds)
            except (
                OSError,
                trio.TooSlowError,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                RedisUnavailable,
            ) as e:
                self._conns[i] = None  # its reply stream is out of step now: never reuse it
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await conn.stream.aclose()
                raise RedisUnavailable(f"{self.where}: {e or 'timed out'}") from e

    async def execute(self, *args: Arg) -> Any:
        (r,) = await self.pipeline([args])
        if isinstance(r, RedisError):
            raise r
        return r

    async def aclose(self) -> None:
        for i, c in enumerate(self._conns):
            self._conns[i] = None
            if c is not None:
                with trio.move_on_after(1):
                    await c.stream.aclose()
