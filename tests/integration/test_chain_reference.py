"""The chain reference's node program (netsim/bench/clients/chain_node.py) on loopback: every node of a seed + 3
chain ends with the seed's bytes, including a node whose next node connects late; a node whose previous node
goes away early, or that cannot reach one, exits 1 saying so, never hangs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from netsim.bench.harness import wait_until
from p2pd.rpc import free_port

NODE = [sys.executable, "-m", "netsim.bench.clients.chain_node"]


def free_addr() -> str:
    return f"127.0.0.1:{free_port()}"


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([*NODE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)
        for f in (p.stdout, p.stderr):
            if f is not None:
                f.close()


def accepts(addr: str) -> bool:
    host, port = addr.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False
    return True


def test_every_node_of_the_chain_gets_the_seeds_bytes(tmp_path: Path) -> None:
    payload = tmp_path / "payload"
    payload.write_bytes(os.urandom(5 << 20) + b"tail")
    size = payload.stat().st_size
    procs: list[subprocess.Popen] = []
    try:
        seed = free_addr()
        procs.append(start(["--listen", seed, "--file", str(payload), "--seed"]))
        wait_until(lambda: accepts(seed), 10, "the seed listening")  # (a probe like the harness's: it must survive it)
        addrs = [free_addr() for _ in range(3)]
        outs = [tmp_path / f"p{k}" for k in range(3)]

        def leecher(k: int) -> subprocess.Popen:
            up = seed if k == 0 else addrs[k - 1]
            fwd = ["--forward"] if k < 2 else []
            args = ["--listen", addrs[k], "--upstream", up, "--file", str(outs[k]), "--size", str(size), *fwd]
            return start([*args, "--timeout", "20"])

        procs += [leecher(0), leecher(1)]
        # p1 holds everything before its next node exists: it waits, then sends it all from its file
        end = time.monotonic() + 30
        while not (outs[1].exists() and outs[1].stat().st_size == size):
            assert time.monotonic() < end, "p1 did not receive the payload"
            time.sleep(0.02)
        assert procs[2].poll() is None, "p1 exited before its next node connected"
        procs.append(leecher(2))
        for p in procs[1:]:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
        for out in outs:
            assert out.read_bytes() == payload.read_bytes()
    finally:
        stop(procs)


def test_a_previous_node_that_leaves_early_is_an_error(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as fake:
        up = f"127.0.0.1:{fake.getsockname()[1]}"
        p = start(["--listen", free_addr(), "--upstream", up, "--file", str(tmp_path / "out"), "--size", "1000"])
        try:
            conn, _ = fake.accept()
            conn.sendall(b"x" * 10)
            conn.close()
            _, err = p.communicate(timeout=30)
        finally:
            stop([p])
    assert p.returncode == 1
    assert "closed the connection after 10 of 1000 bytes" in err


def test_an_unreachable_previous_node_is_an_error(tmp_path: Path) -> None:
    p = start(
        [
            "--listen",
            free_addr(),
            "--upstream",
            free_addr(),
            "--file",
            str(tmp_path / "out"),
            "--size",
            "10",
            "--timeout",
            "2",
        ]
    )
    try:
        _, err = p.communicate(timeout=30)
    finally:
        stop([p])
    assert p.returncode == 1
    assert "could not connect to the previous node" in err
