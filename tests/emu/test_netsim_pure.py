"""The parts of netsim that need no root: the bound, bencode/torrents, the BitTorrent tracker (loopback).

netsim's SIZE and RATE strings are p2pd.units, tested in tests/unit/test_units.py.
"""

from __future__ import annotations

import hashlib
import socket
import struct
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote_from_bytes

import pytest

from netsim.bench.bt import bencode, make_torrent, tracker_server
from netsim.bench.model import kumar_ross, summarize
from netsim.bench.preheat import log_time, preheat_times


def test_kumar_ross() -> None:
    # research FINDINGS §4: 512 MiB, 1+4 peers, 200 Mbit/s everywhere -> 21.47 s (the seed's F/u_s dominates)
    assert kumar_ross(512 << 20, 200e6, [200e6] * 4, [200e6] * 4) == pytest.approx(21.47, abs=0.01)
    # a fast seed: then the swarm's total upload N·F/(u_s+Σu) binds
    assert kumar_ross(8, 1e9, [1.0] * 4, [1e9] * 4) == pytest.approx(4 * 64 / (1e9 + 4))
    # a slow downloader binds
    assert kumar_ross(1, 100.0, [100.0, 100.0], [100.0, 2.0]) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        kumar_ross(1, 1.0, [], [])
    assert summarize([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}


def test_bencode_and_torrent(tmp_path: Path) -> None:
    assert bencode({"b": 1, "a": [b"x", "yz"]}) == b"d1:al1:x2:yze1:bi1ee"
    payload = tmp_path / "f.bin"
    payload.write_bytes(bytes(range(256)) * 5000)  # 1,280,000 bytes: 2 full 512 KiB pieces + a short one
    ih = make_torrent(str(payload), str(tmp_path / "f.torrent"), "http://127.0.0.1:1/announce", 512 * 1024)
    data = (tmp_path / "f.torrent").read_bytes()
    info = data[data.index(b"4:infod") + 6 : -1]  # the info dict is the last key of the top-level dict
    assert hashlib.sha1(info).hexdigest() == ih
    lt = pytest.importorskip("libtorrent", reason="pip install libtorrent (cross-check with the reference)")
    assert str(lt.torrent_info(str(tmp_path / "f.torrent")).info_hashes().v1) == ih


@pytest.fixture
def tracker() -> Iterator[str]:
    srv = tracker_server("127.0.0.1", 0)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, whatever the env says


def _announce(base: str, pid: bytes, port: int, event: str = "") -> dict[str, bytes]:
    q = f"info_hash={quote_from_bytes(b'i' * 20)}&peer_id={quote_from_bytes(pid)}&port={port}&compact=1"
    with NO_PROXY.open(f"{base}/announce?{q}&event={event}", timeout=5) as r:
        body = r.read()
    assert body.startswith(b"d") and b"8:intervali5e" in body
    raw = body[body.index(b"5:peers") + 7 :]
    n = int(raw[: raw.index(b":")])
    peers = raw[raw.index(b":") + 1 :][:n]
    return {
        f"{socket.inet_ntoa(peers[i : i + 4])}:{struct.unpack('>H', peers[i + 4 : i + 6])[0]}": b""
        for i in range(0, n, 6)
    }


def test_tracker_lists_other_peers(tracker: str) -> None:
    assert _announce(tracker, b"A" * 20, 7001) == {}
    assert list(_announce(tracker, b"B" * 20, 7002)) == ["127.0.0.1:7001"]
    assert list(_announce(tracker, b"A" * 20, 7001)) == ["127.0.0.1:7002"]
    with NO_PROXY.open(f"{tracker}/stats", timeout=5) as r:
        assert r.read() == b"2"
    _announce(tracker, b"B" * 20, 7002, event="stopped")
    assert _announce(tracker, b"A" * 20, 7001) == {}


def test_preheat_times_are_read_from_the_daemon_log() -> None:
    """The preheat bench times each node by its own log lines (ms stamps), not by polling."""
    text = (
        "2026-11-26 19:10:00,100 INFO p2pd.daemon: preheat a:b (order o1): fetching\n"
        "2026-11-26 19:10:00,200 INFO p2pd.daemon: preheat a:b (order o2): fetching\n"
        "2026-11-26 19:10:03,350 INFO p2pd.daemon: preheat a:b (order o1): complete\n"
    )
    s, c = preheat_times(text, "o1")
    assert s == log_time("2026-11-26 19:10:00,100") and c is not None and round(c - s, 3) == 3.25
    assert preheat_times(text, "o2") == (log_time("2026-11-26 19:10:00,200"), None)
    assert preheat_times(text, "o3") == (None, None)
