"""One node of the `chain` reference: `python -m netsim.bench.clients.chain_node ...` (see chain.py).

    seed:    chain_node --listen IP:PORT --file PAYLOAD --seed
    leecher: chain_node --listen IP:PORT --upstream IP:PORT --file OUT --size BYTES [--forward]

A leecher listens for the next node, connects to the previous one, and passes every byte on as it arrives (to its
file and, with `--forward`, to the next node), so a byte is a few milliseconds behind at each hop instead of a
piece. It exits 0 once it holds all `size` bytes and has handed them to the next node's socket; any error or a
silence longer than `--timeout` ends it with a message and status 1. The seed sends the whole file to each
connection it accepts (the harness's readiness probe is one that closes at once: that send fails and the seed waits
for the next).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

CHUNK = 1 << 20


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected IP:PORT, got {text!r}")
    return host, int(port)


def serve_seed(srv: socket.socket, path: str) -> None:
    """Send the file to every connection, one after another, until killed (the harness stops it by PID)."""
    size = os.path.getsize(path)
    srv.settimeout(None)
    while True:
        conn, _ = srv.accept()
        with conn, open(path, "rb") as f:
            try:
                off = 0
                while off < size:
                    off += os.sendfile(conn.fileno(), f.fileno(), off, size - off)
                conn.shutdown(socket.SHUT_WR)
            except OSError as e:
                print(f"seed: a connection ended early ({e}); waiting for the next", file=sys.stderr)


def connect_upstream(addr: tuple[str, int], timeout: float) -> socket.socket:
    """The previous node starts listening when it is released too: retry until it does."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(addr, timeout=timeout)
        except OSError as e:
            if time.monotonic() > deadline:
                where = f"{addr[0]}:{addr[1]}"
                raise SystemExit(
                    f"could not connect to the previous node {where} within {timeout:.0f} s: {e}"
                ) from None
            time.sleep(0.01)


def catch_up(srv: socket.socket, out: str, got: int, timeout: float) -> socket.socket:
    """The next node, accepted on `srv`, sent the `got` bytes that arrived before it connected."""
    down, _ = srv.accept()
    down.settimeout(timeout)
    if got:
        with open(out, "rb") as f:
            down.sendfile(f, 0, got)  # (socket.sendfile: the timeout holds, where os.sendfile would say EAGAIN)
    return down


def relay(srv: socket.socket, up: socket.socket, out: str, size: int, timeout: float, forward: bool) -> None:
    """Receive `size` bytes from `up` into `out`, passing them on to the next node (`forward`) once it connects to
    `srv`; if it has not connected when all is here, wait up to `timeout` for it."""
    srv.setblocking(False)
    down: socket.socket | None = None
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    got = 0
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while got < size:
            if forward and down is None:
                try:
                    down = catch_up(srv, out, got, timeout)
                except BlockingIOError:
                    pass  # not yet connected
            n = up.recv_into(view, min(CHUNK, size - got))
            if n == 0:
                raise SystemExit(f"the previous node closed the connection after {got} of {size} bytes")
            written = 0
            while written < n:
                written += os.write(fd, view[written:n])
            if down is not None:
                down.sendall(view[:n])
            got += n
    finally:
        os.close(fd)
    if forward and down is None:
        srv.settimeout(timeout)
        try:
            down = catch_up(srv, out, got, timeout)
        except TimeoutError:
            raise SystemExit(f"the next node did not connect within {timeout:.0f} s") from None
    if down is not None:
        down.shutdown(socket.SHUT_WR)
        down.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="chain_node", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--listen", type=_addr, required=True)
    ap.add_argument("--upstream", type=_addr)
    ap.add_argument("--file", required=True, help="the payload (seed) or where the copy goes (leecher)")
    ap.add_argument("--size", type=int, help="bytes to receive (leecher)")
    ap.add_argument("--seed", action="store_true")
    ap.add_argument("--forward", action="store_true", help="a next node will connect (every leecher but the last)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds of silence before giving up")
    a = ap.parse_args(argv)
    if not a.seed and (a.upstream is None or a.size is None or a.size <= 0):
        ap.error("a leecher needs --upstream and a positive --size")
    srv = socket.create_server(a.listen)
    if a.seed:
        serve_seed(srv, a.file)
        return 0
    up = connect_upstream(a.upstream, a.timeout)
    up.settimeout(a.timeout)
    try:
        relay(srv, up, a.file, a.size, a.timeout, a.forward)
    except (TimeoutError, OSError) as e:
        raise SystemExit(f"relay failed: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
