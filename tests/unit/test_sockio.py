"""StreamIO's piece reads with a receive low-water mark, over real TCP on loopback.

The mark (SO_RCVLOWAT) makes the kernel hold back readiness until enough of a piece is queued; the
ways that goes wrong are hangs: a mark left above the bytes still coming, or a slow piece taken
for a stalled peer. Each test bounds its waits so such a bug fails instead of hanging.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator

import pytest
import trio

from p2pd.stream_io import FAST_CALLS, PAYLOAD_LOWAT, StreamIO


@pytest.fixture
async def tcp_pair() -> AsyncIterator[tuple[StreamIO, trio.socket.SocketType]]:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = trio.socket.socket()
    await client.connect(listener.getsockname())
    server, _ = await listener.accept()
    listener.close()
    try:
        yield StreamIO(trio.SocketStream(server)), client
    finally:
        server.close()
        client.close()


async def send_slowly(sock: trio.socket.SocketType, data: bytes, chunk: int, pause: float) -> None:
    for off in range(0, len(data), chunk):
        await sock.send(data[off : off + chunk])
        await trio.sleep(pause)


async def test_a_piece_trickling_in_below_the_mark_is_read_whole(
    tcp_pair: tuple[StreamIO, trio.socket.SocketType],
) -> None:
    io, peer = tcp_pair
    piece = os.urandom(PAYLOAD_LOWAT + 100_000)  # the last part is smaller than the mark
    buf = bytearray(len(piece))
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(send_slowly, peer, piece, 30_000, 0.01)
            await io.read_into(memoryview(buf), None)
    assert buf == piece
    assert io.bytes_in == len(piece)


async def test_after_a_piece_small_frames_are_read_at_once(tcp_pair: tuple[StreamIO, trio.socket.SocketType]) -> None:
    """The mark is back at 1 byte: a 5-byte frame header must not wait for more data behind it."""
    io, peer = tcp_pair
    piece = os.urandom(3 * PAYLOAD_LOWAT)
    await peer.send(piece)
    buf = bytearray(len(piece))
    with trio.fail_after(5):
        await io.read_into(memoryview(buf), None)
    assert io.sock is not None
    assert io.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
    await peer.send(b"hello")
    with trio.fail_after(2):
        assert await io.read_exactly(5) == b"hello"


async def test_bytes_queued_below_the_mark_count_as_progress(tcp_pair: tuple[StreamIO, trio.socket.SocketType]) -> None:
    io, peer = tcp_pair
    io.set_lowat(PAYLOAD_LOWAT)
    assert not io.queued_grew()
    await peer.send(b"x" * 1000)
    with trio.fail_after(2):
        while not io.queued_grew():
            await trio.sleep(0.01)
    assert not io.queued_grew()  # nothing new since
    await peer.send(b"y" * 1000)
    with trio.fail_after(2):
        while not io.queued_grew():
            await trio.sleep(0.01)
    io.set_lowat(1)


class Yields(trio.abc.Instrument):
    """Counts the scheduler's turns of one task: each time it yields, its next step is a new one."""

    def __init__(self) -> None:
        self.task = trio.lowlevel.current_task()
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


async def send_whole(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view) :]


async def queued(io: StreamIO, n: int) -> None:
    with trio.fail_after(5):
        while io.unread() < n:
            await trio.sleep(0.005)


async def test_bytes_already_queued_are_read_without_a_turn_of_the_scheduler(
    tcp_pair: tuple[StreamIO, trio.socket.SocketType],
) -> None:
    """A node short of CPU reads behind the wire: whatever is queued is taken at once (trio's own recv and
    recv_into yield once per call, and the mark costs two setsockopts and a trip through epoll per piece)."""
    io, peer = tcp_pair
    piece = os.urandom(64 << 10)  # within the first receive window
    frames = b"".join(bytes([0, 0, 0, 1, i]) for i in range(4))
    await send_whole(peer, frames + piece)
    await queued(io, len(frames) + len(piece))
    buf = bytearray(len(piece))
    yields = Yields()
    trio.lowlevel.add_instrument(yields)
    try:
        for i in range(4):
            assert await io.read_exactly(5) == bytes([0, 0, 0, 1, i])
        await io.read_into(memoryview(buf), None)
    finally:
        trio.lowlevel.remove_instrument(yields)
    assert buf == piece
    assert yields.steps == 0
    assert io.bytes_in == len(frames) + len(piece)


async def test_reads_and_sends_that_never_block_still_let_other_tasks_run(
    tcp_pair: tuple[StreamIO, trio.socket.SocketType],
) -> None:
    io, peer = tcp_pair
    calls = 3 * FAST_CALLS
    yields = Yields()
    read_yields = 0
    for i in range(calls):
        frame = bytes([i]) * 100
        await send_whole(peer, frame)
        await queued(io, len(frame))
        trio.lowlevel.add_instrument(yields)
        before = yields.steps
        assert await io.read_exactly(len(frame)) == frame
        read_yields += yields.steps - before
        trio.lowlevel.remove_instrument(yields)
    trio.lowlevel.add_instrument(yields)
    before = yields.steps
    for _ in range(calls):
        await io.send_all(b"0123456789")
    send_yields = yields.steps - before
    trio.lowlevel.remove_instrument(yields)
    assert read_yields == send_yields == calls // (FAST_CALLS + 1)  # one turn after every FAST_CALLS calls
    with trio.fail_after(5):
        got = b""
        while len(got) < 10 * calls:
            got += await peer.recv(1 << 16)
    assert got == b"0123456789" * calls
