"""The daemon's end of the tracker's signal channel: how it hears that another node wants to reach it.

One long RPC call (`signal`, see tracker/signals.py) on its own TCP connection to the tracker the
node is registered with; its events are pushed messages ("node A wants to punch with you", "meet A
at this relay") handed to `on_event`, and a ping every ~15 s. The same connection carries this
node's own rendezvous requests (`call`), so they reach the tracker process that holds the channels.

- The connection is separate from the tracker client's: that one closes when idle (heartbeats go
  over UDP), this one must stay open.
- Every wait is bounded: the connect, and the call itself (no message, not even a ping, for
  `silence_timeout` seconds means the tracker or the path to it is gone).
- When the channel ends for any reason it is opened again after a backoff (1 s doubling to 30 s,
  jittered), on whichever tracker address the tracker client uses by then.
"""

from __future__ import annotations

import logging
import random
import socket
from collections.abc import Callable
from typing import Any

import trio

from p2pd.errors import ErrorCode
from p2pd.rpc import RpcClient, RpcError, open_client
from p2pd.tracker_client import TrackerClient
from p2pd.trio_util import collapse_single

log = logging.getLogger(__name__)

SILENCE_TIMEOUT = 40.0  # the tracker pings every 15 s: two missed pings and some slack
MAX_BACKOFF = 30.0


class SignalChannel:
    """Holds the signal call open; `up` while the tracker has confirmed it."""

    def __init__(
        self,
        node_id: str,
        on_event: Callable[[dict[str, Any]], None],
        *,
        relay_port: int | None = None,
        connect_timeout: float = 2.0,
        silence_timeout: float = SILENCE_TIMEOUT,
        max_backoff: float = MAX_BACKOFF,
    ) -> None:
        self.node_id = node_id
        self.on_event = on_event
        self.relay_port = relay_port
        self.connect_timeout = connect_timeout
        self.silence_timeout = silence_timeout
        self.max_backoff = max_backoff
        self.tracker: TrackerClient | None = None
        self.addr: tuple[str, int] | None = None  # the tracker this channel is open on
        self.opened = 0  # how many times the tracker confirmed a channel (tests, status)
        self._client: RpcClient | None = None
        self._ready = False
        self._up_event = trio.Event()

    @property
    def up(self) -> bool:
        return self._ready and self._client is not None

    async def wait_up(self, timeout: float) -> bool:
        with trio.move_on_after(timeout):
            await self._up_event.wait()
        return self.up

    async def run(
        self, tracker: TrackerClient, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep the channel open until cancelled (started at once: the first open may take a while)."""
        self.tracker = tracker
        task_status.started()
        backoff = 1.0
        reported = False
        while True:
            opened_at = trio.current_time()
            try:
                await self._open_once(tracker)
                why = "closed by the tracker"
            except RpcError as e:
                why = e.message
            except (OSError, trio.TooSlowError) as e:
                why = "connect timed out" if isinstance(e, trio.TooSlowError) else str(e)
            was_up = self._ready
            self._client, self._ready, self.addr = None, False, None
            self._up_event = trio.Event()
            if trio.current_time() - opened_at > 60:
                backoff = 1.0
            if was_up or not reported:
                log.warning("signal channel to the tracker down (%s); reopening (NAT traversal waits meanwhile)", why)
                reported = True
            else:
                log.debug("signal channel still down: %s", why)
            await trio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(self.max_backoff, backoff * 2)

    async def _open_once(self, tracker: TrackerClient) -> None:
        if not tracker.registered or tracker.session is None:
            raise RpcError(ErrorCode.UNREACHABLE, "not registered with a tracker yet")
        addr = tracker.current
        with trio.fail_after(self.connect_timeout):
            stream = await trio.open_tcp_stream(*addr)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with collapse_single():
            async with open_client(stream) as client:
                self._client, self.addr = client, addr
                params: dict[str, Any] = {"node_id": self.node_id, "session": tracker.session}
                if self.relay_port is not None:
                    params["relay_port"] = self.relay_port
                await client.call("signal", params, timeout=self.silence_timeout, on_event=self._event)

    def _event(self, event: dict[str, Any]) -> None:
        if not isinstance(event, dict):
            return
        kind = event.get("kind")
        if kind == "ping":
            return
        if kind == "ready":
            self._ready = True
            self.opened += 1
            self._up_event.set()
            log.info("signal channel open on tracker %s:%d", *(self.addr or ("?", 0)))
            return
        try:
            self.on_event(event)
        except (KeyError, TypeError, ValueError) as e:  # a malformed signal must not end the channel
            log.warning("ignored a malformed signal %r: %r", kind, e)

    def identity(self) -> dict[str, Any]:
        """What every rendezvous request carries: the tracker checks it against its registry."""
        return {"node_id": self.node_id, "session": self.tracker.session if self.tracker is not None else None}

    async def call(self, method: str, params: dict[str, Any], *, timeout: float) -> Any:
        """A rendezvous request over the channel's connection (to the tracker that holds the channels)."""
        client = self._client
        if client is None or not self._ready:
            raise RpcError(ErrorCode.UNREACHABLE, "no signal channel to the tracker")
        return await client.call(method, {**self.identity(), **params}, timeout=timeout)
