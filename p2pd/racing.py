"""Racing the paths to a peer, Happy-Eyeballs style (RFC 8305), behind the one `Connector` interface.

A connect starts the first path (direct TCP) at once and each further one a stagger after the one
before it (a punched TCP connection after ~150 ms, a relay at ~1 s), or at once when every path
before it has failed. The first connection to complete the p2pd handshake wins; the others are cancelled, and one
that completes anyway is closed by the attempt that opened it. Staggering instead of starting all at
once keeps the common case free: on a cluster network the direct path is done before the second
path starts, so nothing is asked of the tracker or a relay. As in RFC 8305 the stagger races the
transport: while an earlier path that reports it (`Path.reports_transport`, the direct TCP connect)
is connected and only its p2pd handshake is pending (a busy peer), later paths wait for its outcome.

A peer reached directly is remembered (`remember_direct` seconds): it is dialled directly only, with
no race, until a direct connect to it fails. A peer the tracker lists behind a NAT (`behind_nat`) is punched
at once, beside the direct dial: its NAT drops an unsolicited SYN, so the stagger only delayed it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from p2pd.connections import ConnectError, Connection, ConnectionPath, Connector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Path:
    """One way to a peer: its name, its connector, and when the race starts it.

    `reports_transport`: the connector is a `ReportingConnector` (it says when its transport is up).
    """

    name: str
    connector: Connector
    start_after: float
    reports_transport: bool = False


class ReportingConnector(Protocol):
    async def connect(
        self, remote_id: str, addr: tuple[str, int], artifact_id: str, *, reached: Callable[[], None] | None = None
    ) -> Connection: ...


class RacingConnector:
    """A `Connector` that races `paths` (the first one should be the direct path)."""

    def __init__(self, paths: Sequence[Path], *, remember_direct: float = 300.0) -> None:
        if not paths:
            raise ValueError("a race needs at least one path")
        self.paths = list(paths)
        self.remember_direct = remember_direct
        self._direct_until: dict[str, float] = {}
        self._behind_nat: set[str] = set()
        self.wins: dict[str, int] = {p.name: 0 for p in self.paths}

    def behind_nat(self, remote_id: str, nated: bool) -> None:
        """The tracker lists `remote_id` behind a NAT that drops unsolicited SYNs (or no longer does).

        Then its race starts the TCP punch with the direct dial, not `punch_after` later: in the NAT swarm every
        punched connection (7 of 8 at a cone) waited 150 ms for a direct dial that could not connect, and a
        peer's finish is set by how far behind it falls in its first second, when its download link is its
        bound (issue #12). Later paths keep their times from the start of the race."""
        if nated:
            if len(self._behind_nat) > 100_000:  # bounded: the next lookups tell again
                self._behind_nat.clear()
            self._behind_nat.add(remote_id)
        else:
            self._behind_nat.discard(remote_id)

    async def connect(self, remote_id: str, addr: tuple[str, int], artifact_id: str) -> Connection:
        first = self.paths[0]
        now = trio.current_time()
        if self._direct_until.get(remote_id, -1.0) > now and first.name == ConnectionPath.DIRECT:
            try:
                conn = await first.connector.connect(remote_id, addr, artifact_id)
            except ConnectError:
                del self._direct_until[remote_id]  # moved or gone: race all paths next time
                raise
            self._note(remote_id, conn)
            return conn
        conn = await self._race(remote_id, addr, artifact_id)
        self._note(remote_id, conn)
        return conn

    def _note(self, remote_id: str, conn: Connection) -> None:
        self.wins[str(conn.path)] = self.wins.get(str(conn.path), 0) + 1
        if conn.path is ConnectionPath.DIRECT:
            self._direct_until[remote_id] = trio.current_time() + self.remember_direct
            if len(self._direct_until) > 100_000:  # bounded: forget the expired ones
                now = trio.current_time()
                self._direct_until = {k: t for k, t in self._direct_until.items() if t > now}

    async def _race(self, remote_id: str, addr: tuple[str, int], artifact_id: str) -> Connection:
        start = trio.current_time()
        failed: set[int] = set()
        reached: set[int] = set()
        errors: list[str] = []
        winner: list[Connection] = []
        changed = [trio.Event()]

        def note(done: set[int], i: int) -> None:
            done.add(i)
            changed[0].set()
            changed[0] = trio.Event()

        started: dict[int, float] = {}
        after = [p.start_after for p in self.paths]
        if remote_id in self._behind_nat:
            after = [0.0 if p.name == ConnectionPath.TCP_PUNCH else a for p, a in zip(self.paths, after, strict=True)]

        def due(i: int) -> float | None:
            """When attempt i may start: its stagger after the previous one started (None: not started yet)."""
            if i == 0:
                return start
            prev = started.get(i - 1)
            gap = max(0.0, after[i] - after[i - 1])
            return None if prev is None else prev + gap

        def may_start(i: int) -> bool:
            if failed.issuperset(range(i)):
                return True  # every earlier path failed: no reason to wait
            if any(j in reached and j not in failed for j in range(i)):
                return False  # an earlier path is connected and handshaking: wait for its outcome
            at = due(i)
            return at is not None and trio.current_time() >= at

        async def attempt(i: int, path: Path, cancel: trio.CancelScope) -> None:
            while not may_start(i):
                at = due(i)
                if at is not None and trio.current_time() < at:
                    with trio.move_on_at(at):
                        await changed[0].wait()
                else:
                    await changed[0].wait()
            started[i] = trio.current_time()
            changed[0].set()
            changed[0] = trio.Event()
            try:
                if path.reports_transport:
                    reporting: ReportingConnector = path.connector  # type: ignore[assignment]
                    conn = await reporting.connect(remote_id, addr, artifact_id, reached=lambda: note(reached, i))
                else:
                    conn = await path.connector.connect(remote_id, addr, artifact_id)
            except ConnectError as e:
                errors.append(f"{path.name}: {e}")
                note(failed, i)
                return
            if winner:  # another path won meanwhile: ours is not needed
                with trio.CancelScope(shield=True):
                    await conn.aclose()
                return
            winner.append(conn)
            cancel.cancel()

        try:
            async with trio.open_nursery() as nursery:
                for i, path in enumerate(self.paths):
                    nursery.start_soon(attempt, i, path, nursery.cancel_scope)
        except BaseException:  # cancelled from outside (the swarm leaves) while a winner was in hand
            for conn in winner:
                with trio.CancelScope(shield=True):
                    await conn.aclose()
            raise
        if not winner:
            raise ConnectError("; ".join(errors) or "no path")
        conn = winner[0]
        log.debug("reached %s by %s in %.0f ms", remote_id[:8], conn.path, 1000 * (trio.current_time() - start))
        return conn
