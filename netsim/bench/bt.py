"""BitTorrent plumbing for the baselines: bencode, v1 .torrent creation, and a minimal HTTP tracker.

Why our own: the torrent is made in pure Python (hashlib SHA-1), so the aria2 baseline does not depend on the
libtorrent wheel; the tracker is ~60 lines instead of Debian's opentracker, which only serves whitelisted infohashes
from a whitelist inside its chroot (research FINDINGS §4). The tracker returns every other peer of the swarm on
each announce, which is all either client needs to build a full mesh of 1 + N peers.

Run the tracker: `python -m netsim.bench.bt tracker --listen IP:PORT` (prints READY once listening).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import struct
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote_to_bytes

Bencodable = int | bytes | str | list | dict


def bencode(x: Bencodable) -> bytes:
    """Canonical bencoding (dict keys sorted as raw bytes)."""
    if isinstance(x, bool):
        raise TypeError("bool is not bencodable")
    if isinstance(x, int):
        return b"i%de" % x
    if isinstance(x, str):
        x = x.encode()
    if isinstance(x, bytes):
        return b"%d:%s" % (len(x), x)
    if isinstance(x, list):
        return b"l" + b"".join(bencode(i) for i in x) + b"e"
    if isinstance(x, dict):
        items = sorted(((k.encode() if isinstance(k, str) else k), v) for k, v in x.items())
        return b"d" + b"".join(bencode(k) + bencode(v) for k, v in items) + b"e"
    raise TypeError(f"cannot bencode {type(x).__name__}")


def make_torrent(path: str, out: str, announce: str, piece_size: int) -> str:
    """Write a single-file v1 .torrent for `path` (v1 so aria2 reads it); returns the hex infohash."""
    pieces = bytearray()
    with open(path, "rb") as f:
        while chunk := f.read(piece_size):
            pieces += hashlib.sha1(chunk).digest()
    info = {
        "name": os.path.basename(path),
        "length": os.path.getsize(path),
        "piece length": piece_size,
        "pieces": bytes(pieces),
    }
    data = bencode({"announce": announce, "created by": "netsim", "info": info})
    with open(out, "wb") as f:
        f.write(data)
    return hashlib.sha1(bencode(info)).hexdigest()


class _Swarms:
    """infohash -> peer_id -> (ip, port, last announce time); entries older than `ttl` are forgotten."""

    def __init__(self, ttl: float = 120.0) -> None:
        self.ttl = ttl
        self.lock = threading.Lock()
        self.peers: dict[bytes, dict[bytes, tuple[str, int, float]]] = {}

    def count(self) -> int:
        """Peers known over all swarms (for the runners' "seed has announced" check)."""
        with self.lock:
            return sum(len(s) for s in self.peers.values())

    def announce(self, ih: bytes, pid: bytes, ip: str, port: int, event: str) -> list[tuple[str, int]]:
        now = time.monotonic()
        with self.lock:
            swarm = self.peers.setdefault(ih, {})
            if event == "stopped":
                swarm.pop(pid, None)
            else:
                swarm[pid] = (ip, port, now)
            for k in [k for k, v in swarm.items() if now - v[2] > self.ttl]:
                del swarm[k]
            return [(v[0], v[1]) for k, v in swarm.items() if k != pid]


class _Handler(BaseHTTPRequestHandler):
    swarms: _Swarms

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature fixed by the base class
        """Quiet: one line per announce would dominate the logs."""

    def do_GET(self) -> None:  # noqa: N802 - name fixed by the base class
        path, _, query = self.path.partition("?")
        if path == "/stats":
            body = str(self.swarms.count()).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if path != "/announce":
            self.send_error(404)
            return
        q: dict[str, bytes] = {}
        for part in query.split("&"):
            k, _, v = part.partition("=")
            q[k] = unquote_to_bytes(v)
        try:
            ih, pid, port = q["info_hash"], q["peer_id"], int(q["port"])
        except (KeyError, ValueError):
            self._reply({"failure reason": "missing info_hash, peer_id or port"})
            return
        peers = self.swarms.announce(ih, pid, self.client_address[0], port, q.get("event", b"").decode())
        if q.get("compact", b"1") == b"0":
            plist: bytes | list = [{"ip": ip, "port": p} for ip, p in peers]
        else:
            plist = b"".join(socket.inet_aton(ip) + struct.pack(">H", p) for ip, p in peers)
        self._reply({"interval": 5, "min interval": 1, "complete": 0, "incomplete": len(peers), "peers": plist})

    def _reply(self, d: dict) -> None:
        body = bencode(d)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def tracker_server(host: str, port: int) -> ThreadingHTTPServer:
    """A bound (not yet serving) tracker; port 0 picks a free one (see `server_address`)."""
    handler = type("Handler", (_Handler,), {"swarms": _Swarms()})
    srv = ThreadingHTTPServer((host, port), handler)
    srv.daemon_threads = True
    return srv


def serve_tracker(listen: str) -> None:
    """Serve announces on `listen` (IP:PORT) until killed; prints READY when the socket is bound."""
    host, port = listen.rsplit(":", 1)
    srv = tracker_server(host, int(port))
    print("READY", flush=True)
    srv.serve_forever()


def wait_peers(url: str, n: int, timeout: float) -> bool:
    """Poll the tracker's /stats until it knows at least `n` peers (run inside the tracker's namespace)."""
    end = time.monotonic() + timeout
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    while time.monotonic() < end:
        try:
            with opener.open(url, timeout=2) as r:
                if int(r.read()) >= n:
                    return True
        except OSError:
            pass  # not listening yet: retry until the deadline
        time.sleep(0.05)
    return False


def main(argv: list[str] | None = None) -> int:
    """CLI: `tracker --listen IP:PORT`, `wait-peers URL N`, `torrent FILE OUT --announce URL --piece BYTES`."""
    ap = argparse.ArgumentParser(prog="python -m netsim.bench.bt")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tracker")
    t.add_argument("--listen", required=True)
    w = sub.add_parser("wait-peers")
    w.add_argument("url")
    w.add_argument("n", type=int)
    w.add_argument("--timeout", type=float, default=30)
    m = sub.add_parser("torrent")
    m.add_argument("file")
    m.add_argument("out")
    m.add_argument("--announce", required=True)
    m.add_argument("--piece", type=int, default=4 << 20)
    a = ap.parse_args(argv)
    if a.cmd == "tracker":
        serve_tracker(a.listen)
    elif a.cmd == "wait-peers":
        return 0 if wait_peers(a.url, a.n, a.timeout) else 1
    else:
        print(make_torrent(a.file, a.out, a.announce, a.piece))
    return 0


if __name__ == "__main__":
    sys.exit(main())
