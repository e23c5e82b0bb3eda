"""Batched UDP I/O of the heartbeat port (tracker/udp_batch.py) over real loopback sockets."""

from __future__ import annotations

import socket

import pytest

from tracker.udp_batch import RECV_SLOT, SEND_SLOT, VLEN, BatchSocket, PlainSocket, open_batch


def pair(family: socket.AddressFamily, host: str) -> tuple[socket.socket, list[socket.socket]]:
    server = socket.socket(family, socket.SOCK_DGRAM)
    server.bind((host, 0))
    server.setblocking(False)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    clients = []
    for _ in range(3):
        c = socket.socket(family, socket.SOCK_DGRAM)
        c.bind((host, 0))
        c.connect(server.getsockname()[:2])
        c.settimeout(5)
        clients.append(c)
    return server, clients


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_each_reply_goes_back_to_its_sender_across_chunks(family: socket.AddressFamily, host: str) -> None:
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    try:
        server, clients = pair(family, host)
    except OSError as e:
        pytest.skip(f"cannot bind {host}: {e}")
    io = open_batch(server)
    if io is None:
        pytest.skip("recvmmsg/sendmmsg not available here (not 64-bit Linux): the server uses PlainSocket")
    total = VLEN + 7  # more than one chunk
    for k in range(total):
        clients[k % 3].send(b"beat %d" % k)
    got: list[bytes] = []
    while len(got) < total:
        n = io.recv()
        assert n > 0
        for i in range(n):
            data = bytes(io.datagram(i))
            got.append(data)
            k = int(data.split()[1])
            assert io.addr(i) == clients[k % 3].getsockname()
            if k % 5 != 4:  # some get no reply (refused beats), so reply slots and datagram slots differ
                io.reply(i, b"ack %d" % k)
        io.flush()
    assert io.recv() == 0
    assert sorted(got) == sorted(b"beat %d" % k for k in range(total))
    for j, c in enumerate(clients):
        acks = set()
        for _ in range(sum(1 for k in range(total) if k % 3 == j and k % 5 != 4)):
            acks.add(int(c.recv(100).split()[1]))
        assert acks == {k for k in range(total) if k % 3 == j and k % 5 != 4}
    for s in [server, *clients]:
        s.close()


def test_oversized_datagram_is_empty_and_long_reply_still_sent() -> None:
    server, (c, *_) = pair(socket.AF_INET, "127.0.0.1")
    io = open_batch(server)
    if io is None:
        pytest.skip("recvmmsg/sendmmsg not available here")
    assert isinstance(io, BatchSocket)
    c.send(b"x" * (RECV_SLOT + 1))  # truncated: comes back empty, so the decoder refuses it
    c.send(b"ok")
    assert io.recv() == 2
    assert bytes(io.datagram(0)) == b"" and bytes(io.datagram(1)) == b"ok"
    io.reply(1, b"y" * (SEND_SLOT + 10))  # longer than a send slot: sent on its own
    io.reply(1, b"short")
    io.flush()
    assert c.recv(SEND_SLOT + 100) == b"y" * (SEND_SLOT + 10) and c.recv(100) == b"short"


def test_plain_socket_has_the_same_behaviour() -> None:
    server, (c, *_) = pair(socket.AF_INET, "127.0.0.1")
    io = PlainSocket(server)
    c.send(b"one")
    c.send(b"two")
    assert io.recv() == 2 and io.datagram(1) == b"two" and io.addr(0) == c.getsockname()
    io.reply(0, b"r")
    io.flush()
    assert c.recv(10) == b"r" and io.recv() == 0
