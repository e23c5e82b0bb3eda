"""systemd's notification protocol (p2pd/sd_notify.py) against real datagram sockets."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest
import trio

from p2pd.sd_notify import Notifier, socket_address, watchdog_interval


def receive(sock: socket.socket) -> dict[str, str]:
    sock.settimeout(5)
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines() if line)


def test_ready_status_stopping_reach_a_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        n = Notifier({"NOTIFY_SOCKET": str(path)})
        assert n.enabled
        n.ready("serving\nstill one line")
        assert receive(sock) == {"READY": "1", "STATUS": "serving still one line", "MAINPID": str(os.getpid())}
        n.status("3 artifacts")
        assert receive(sock) == {"STATUS": "3 artifacts"}
        n.stopping()
        assert receive(sock)["STOPPING"] == "1"
        n.close()


def test_abstract_namespace_socket() -> None:
    name = f"p2pd-test-{uuid.uuid4().hex}"
    assert socket_address("@" + name) == b"\0" + name.encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        n.send(READY=1)
        assert receive(sock) == {"READY": "1"}


def test_nothing_without_a_socket_and_a_dead_socket_is_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert not Notifier({}).enabled and Notifier({}).send(READY=1) is False
    assert not Notifier({"NOTIFY_SOCKET": "relative/path"}).enabled
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert n.send(READY=1) is False and n.send(READY=1) is False
    assert len([r for r in caplog.records if "cannot notify systemd" in r.message]) == 1  # said once


def test_watchdog_interval_is_half_of_watchdog_sec_for_this_process_only() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "x"}) is None
    assert watchdog_interval({}) is None


async def test_watchdog_pings_while_the_loop_runs(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)
        n = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "100000"})
        assert n.watchdog_every == 0.05
        with trio.move_on_after(0.5):
            await n.watchdog()
        pings = 0
        while True:
            try:
                pings += sock.recv(100) == b"WATCHDOG=1\n"
            except BlockingIOError:
                break
        assert 4 <= pings <= 12
