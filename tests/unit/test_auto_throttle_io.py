"""The I/O half of auto-throttling: counters parsed from /proc/net/dev, interface choice, CLI options, status."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import trio

from p2pd.auto_throttle import AutoThrottler, check_interface, choose_interface, read_counters
from p2pd.cli import _auto_throttle_options, describe_limits
from p2pd.config import AutoThrottleConfig
from p2pd.errors import P2pdError
from p2pd.protocol.ratelimit import unlimited
from p2pd.stream_io import LIVE_SOCKETS, TCP_INFO_LEN, TCPI_BYTES_RETRANS, TRAFFIC, UNSENT_LOWAT, LiveSockets, StreamIO

PROC_NET_DEV = """Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier
    lo: 1000      10    0    0    0     0          0         0     1000      10    0    0    0     0       0          0
  eth0: 123456789 1000 0 0 0 0 0 0 987654321 2000 0 0 0 0 0 0
"""


def test_counters_are_read_per_interface(tmp_path: Path) -> None:
    f = tmp_path / "dev"
    f.write_text(PROC_NET_DEV)
    assert read_counters("eth0", f) == (123456789, 987654321)
    assert read_counters("lo", f) == (1000, 1000)
    with pytest.raises(KeyError):
        read_counters("eth1", f)


def test_a_named_interface_must_exist() -> None:
    with pytest.raises(P2pdError, match="no such network interface"):
        check_interface(AutoThrottleConfig(interface="nosuchif0", enabled=True))
    check_interface(AutoThrottleConfig(interface="nosuchif0", enabled=False))  # off: not looked at
    assert choose_interface(AutoThrottleConfig(interface="lo"), "0.0.0.0", []) == "lo"


def test_the_route_to_a_loopback_tracker_is_loopback() -> None:
    assert choose_interface(AutoThrottleConfig(), "0.0.0.0", [("127.0.0.1", 7070)]) == "lo"
    assert choose_interface(AutoThrottleConfig(), "127.0.0.1", []) == "lo"


def test_options() -> None:
    cfg = _auto_throttle_options("on", "10Gbit/s", "20%", None)
    assert cfg.enabled and cfg.link_capacity == 1.25e9 and cfg.reserve_fraction == 0.2 and cfg.reserve_rate is None
    cfg = _auto_throttle_options("off", None, "5MB/s", "eth0")
    assert not cfg.enabled and cfg.reserve_rate == 5e6 and cfg.interface == "eth0"
    for args, msg in (
        (("maybe", None, "20%", None), "write on or off"),
        (("on", "-1", "20%", None), "--link-capacity"),
        (("on", None, "100%", None), "0% to 99%"),
        (("on", None, "x%", None), "not a percentage"),
        (("on", None, "lots", None), "--reserve"),
        (("on", None, "20%", "a/b"), "not an interface name"),
    ):
        with pytest.raises(ValueError, match=msg):
            _auto_throttle_options(*args)


def test_status_off_and_the_limits_line() -> None:
    t = AutoThrottler(AutoThrottleConfig(enabled=False), unlimited(), unlimited())
    assert t.status() == {"state": "off", "why": "off (--auto-throttle off)", "interface": None}
    res = {
        "limits": {
            "egress": {"limit": 1.5e6, "by": "auto", "why": "auto: other traffic 140 Mbit/s"},
            "ingress": {"limit": None, "by": None, "why": "no limit"},
        },
        "auto_throttle": t.status(),
    }
    text = describe_limits(res)
    assert "upload limit: 1.5 MB/s (auto: other traffic 140 Mbit/s)" in text
    assert "download limit: none" in text and "auto-throttle: off" in text


async def _loopback_pair() -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    """A connected TCP pair on loopback: the dialling socket and the accepted one."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    a = trio.socket.socket()
    await a.connect(listener.getsockname())
    b, _ = await listener.accept()
    listener.close()
    return a, b


async def test_own_bytes_are_counted_when_they_cross_the_wire(tmp_path: Path) -> None:
    """A byte p2pd wrote that still waits in its socket's send queue has not crossed the interface yet; one that
    arrived and waits unread in a receive queue has. Counted at write/read time, a burst of MBs queued for peers
    read as somebody else's traffic, and a seed alone on its link yielded to itself (issue #13)."""
    dev = tmp_path / "dev"
    dev.write_text(PROC_NET_DEV)
    t = AutoThrottler(AutoThrottleConfig(), unlimited(), unlimited(), proc_net_dev=dev)
    a, b = await _loopback_pair()
    with a, b:
        sender, receiver = StreamIO(trio.SocketStream(a)), StreamIO(trio.SocketStream(b))
        before, sent_before, resent_before = t._sample("eth0"), TRAFFIC.sent, LIVE_SOCKETS.retransmitted
        with trio.move_on_after(1.0):  # the receiver reads nothing: the queues fill up, then the write blocks
            await sender.send_all(b"x" * (64 << 20))
        written = TRAFFIC.sent - sent_before
        after = t._sample("eth0")
        crossed_tx, crossed_rx = after.own_tx - before.own_tx, after.own_rx - before.own_rx
        resent = LIVE_SOCKETS.retransmitted - resent_before  # (a full receive window makes TCP probe it)
        assert 0 < crossed_tx - resent < written  # some of it still waits to be sent
        assert crossed_rx == crossed_tx - resent  # on loopback everything sent has arrived (and waits unread)
        await receiver.read_exactly(1000)  # reading moves no byte across the wire
        assert t._sample("eth0").own_rx == after.own_rx


async def test_written_but_unsent_bytes_stay_bounded(tmp_path: Path) -> None:
    """What p2pd wrote into a peer socket keeps leaving at TCP's pace after auto-throttling lowers its limit, and
    competes meanwhile with the service it yields to; without a bound a socket held tcp_wmem's maximum (MBs)."""
    payload = tmp_path / "piece"
    payload.write_bytes(b"x" * (32 << 20))
    a, b = await _loopback_pair()
    with a, b, payload.open("rb") as f:
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)  # the receiver reads nothing: a full window
        sender = StreamIO(trio.SocketStream(a))
        assert a.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == UNSENT_LOWAT
        with trio.move_on_after(1.0):
            await sender.sendfile(f.fileno(), 0, 32 << 20)
        live = LiveSockets()
        live.add(a)
        unsent, _ = live.queued()
        assert 0 < unsent <= UNSENT_LOWAT + (256 << 10)


class _Resending:
    """A real TCP socket whose tcp_info says it retransmitted what the test sets (loss cannot be made on loopback)."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.resent = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def getsockopt(self, level: int, option: int, length: int) -> bytes:
        info = bytearray(self.sock.getsockopt(level, option, length))
        info[TCPI_BYTES_RETRANS : TCPI_BYTES_RETRANS + 8] = self.resent.to_bytes(8, sys.byteorder)
        return bytes(info)


async def test_retransmitted_bytes_count_as_our_own(tmp_path: Path) -> None:
    """A segment lost on the way crosses our interface twice. In the emulated 1 + 32, 2-6 % of a node's segments
    were retransmitted (a receiver's switch port dropping incast bursts), and counted as somebody else's traffic
    they made every node's upload yield to nobody about four times a run."""
    dev = tmp_path / "dev"
    dev.write_text(PROC_NET_DEV)
    live = LiveSockets()
    t = AutoThrottler(AutoThrottleConfig(), unlimited(), unlimited(), proc_net_dev=dev, live=live)
    a, b = await _loopback_pair()
    c, d = await _loopback_pair()
    with a, b, c, d:
        first, second = _Resending(a), _Resending(c)
        live.add(first)  # type: ignore[arg-type]
        live.add(second)  # type: ignore[arg-type]
        before = t._sample("eth0").own_tx
        first.resent, second.resent = 3000, 500
        assert t._sample("eth0").own_tx - before == 3500
        first.resent = 4000  # a socket's count is cumulative: only what is new is added
        assert t._sample("eth0").own_tx - before == 4500
        c.close()  # a closed socket's retransmissions stay counted (they crossed the wire)
        assert t._sample("eth0").own_tx - before == 4500 and live.retransmitted == 4500
        info = b.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)  # this kernel has the field we read
        assert len(info) >= TCPI_BYTES_RETRANS + 8
