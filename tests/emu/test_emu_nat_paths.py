"""NAT traversal through real Linux NAT routers (iptables in network namespaces, research FINDINGS §3).

A public tracker and four daemons, each alone behind its own router: two port-restricted cone NATs
(MASQUERADE, unsolicited input dropped) and two symmetric ones (MASQUERADE --random-fully). No daemon
can dial another: the tracker lists each at its router's address, where nothing is forwarded. Each
pair transfers an artifact in both directions, byte-identically; cone <-> cone must connect by a TCP
simultaneous open (never the relay), symmetric <-> symmetric can only meet at the tracker's relay.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from netsim.bench.nat import Fetched, NatLab, fetch_timed, make_artifact
from netsim.emu import Host, Topology
from netsim.emu.nat import add_nat_site
from p2pd.cluster import Node, Process
from p2pd.rpc import RpcError
from tests.integration.helpers import sha256_tree, wait_until

pytestmark = pytest.mark.emu

MiB = 1 << 20
PAIRS = (("a", "b", "port-restricted-cone", "tcp-punch"), ("c", "d", "symmetric", "relay"))


async def cli(node: Node, *args: str, timeout: float = 60) -> str:
    with trio.fail_after(timeout):
        r = await trio.run_process(
            [sys.executable, "-m", "p2pd.cli", *args, "--data-dir", str(node.data_dir)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert r.returncode == 0, f"{node.name}: p2pd {args[0]} failed: {r.stderr.decode()}\n{node.log_text()[-3000:]}"
    return r.stdout.decode().strip().splitlines()[-1]


async def start_daemon(host: Host, tracker: str, base: Path) -> Node:
    d = base / host.name
    d.mkdir()
    args = [
        sys.executable,
        "-m",
        "p2pd.cli",
        "run",
        "--tracker",
        tracker,
        "--listen",
        "0.0.0.0:7700",
        "--data-dir",
        str(d),
        "--log-level",
        "debug",
    ]
    log = base / f"{host.name}.log"
    node = Node(host.name, d, 7700, args, Process(host.name, args, log, host.popen(args, log=str(log)), 0))

    async def signalling() -> bool:
        if node.process.returncode is not None:
            raise AssertionError(f"{node.name} exited:\n{node.log_text()[-3000:]}")
        if not node.socket.exists():
            return False
        try:
            return bool((await node.call("status", timeout=2))["traversal"]["signal_channel"])
        except (OSError, RpcError):
            return False

    await wait_until(signalling, 30, interval=0.1, what=f"{host.name}'s signal channel")
    return node


async def transfer(seed: Node, leech: Node, base: Path, tag: str) -> list[dict[str, Any]]:
    """seed publishes a fresh artifact, leech fetches it; returns the leech's connections for it."""
    src = base / f"src-{tag}"
    src.mkdir()
    (src / "weights.bin").write_bytes(os.urandom(3 * MiB + 321))
    (src / "config.json").write_text(json.dumps({"tag": tag}) * 50)
    aid = await cli(seed, "publish", str(src), "--name", f"model-{tag}:v1")
    got = Path(await cli(leech, "fetch", f"model-{tag}:v1"))
    assert sha256_tree(got) == sha256_tree(src), f"{tag}: bytes differ"
    art = await leech.artifact(aid)
    assert art is not None
    return list(art["connections"])


def test_cone_pairs_punch_and_symmetric_pairs_relay(emu: None, tmp_path: Path) -> None:
    t0 = time.monotonic()
    with Topology() as topo:
        wan = topo.add_switch("wan")
        pub = topo.add_host("tracker", wan)
        hosts: dict[str, Host] = {}
        for a, b, nat, _ in PAIRS:
            for name in (a, b):
                hosts[name] = add_nat_site(topo, name, wan, nat)[1]
        ready = tmp_path / "tracker.json"
        tracker_log = tmp_path / "tracker.log"
        pub.popen(
            [
                sys.executable,
                "-m",
                "tracker.cli",
                "serve",
                "--listen",
                f"{pub.ip}:7070",
                "--ready-file",
                str(ready),
                "--log-level",
                "debug",
            ],
            log=str(tracker_log),
        )
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert time.monotonic() < deadline, f"tracker did not start:\n{tracker_log.read_text()}"
            time.sleep(0.05)

        async def main() -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
            nodes: dict[str, Node] = {}

            async def boot(name: str) -> None:
                nodes[name] = await start_daemon(hosts[name], f"{pub.ip}:7070", tmp_path)

            async with trio.open_nursery() as n:
                for name in hosts:
                    n.start_soon(boot, name)
            ids = {name: (await node.call("status"))["node_id"] for name, node in nodes.items()}
            seen: dict[str, list[dict[str, Any]]] = {}

            async def pair(a: str, b: str) -> None:  # both directions, one after the other
                seen[f"{a}->{b}"] = await transfer(nodes[a], nodes[b], tmp_path, f"{a}{b}")
                seen[f"{b}->{a}"] = await transfer(nodes[b], nodes[a], tmp_path, f"{b}{a}")

            async with trio.open_nursery() as n:
                for a, b, _, _ in PAIRS:
                    n.start_soon(pair, a, b)
            return seen, ids

        seen, ids = trio.run(main)
        log = tracker_log.read_text()
    for a, b, nat, path in PAIRS:
        for seed, leech in ((a, b), (b, a)):
            conns = seen[f"{seed}->{leech}"]
            paths = {c["path"] for c in conns if c["node_id"] == ids[seed]}
            assert paths == {path}, f"{nat}: {leech} fetched from {seed} over {paths}, not {path}: {conns}"
    spliced = [line for line in log.splitlines() if "relay: spliced" in line]
    for name in ("a", "b"):
        assert not any(ids[name][:8] in line for line in spliced), f"cone node {name} used the relay:\n{spliced}"
    assert any(ids["c"][:8] in line for line in spliced), f"no relayed pair in the tracker log:\n{log[-3000:]}"
    elapsed = time.monotonic() - t0
    assert elapsed < 90, f"took {elapsed:.0f} s"


def test_a_path_that_dies_mid_transfer_is_replaced_and_the_download_completes(
    emu: None, iptables: None, tmp_path: Path
) -> None:
    """A port-restricted cone seeds to a node behind a symmetric NAT, both without the TCP punch (which would
    connect them by its birthday variant): they meet by the UDP punch (QUIC). Mid
    transfer the leech's router starts dropping every UDP datagram (the punched path is dead, as when a NAT
    reboots or forgets the mapping). The leech drops the stalled peer, races the paths again, the UDP punch
    now fails and the relay takes over: the download completes byte-identically, without a retry."""
    os.chmod(tmp_path, 0o755)
    with Topology() as topo:
        lab = NatLab(topo, tmp_path)
        seed_host = add_nat_site(topo, "pa", lab.wan, "port-restricted-cone")[1]
        router, leech_host = add_nat_site(topo, "sb", lab.wan, "symmetric")
        assert router is not None
        lab.start_tracker()
        size = 24 * MiB

        async def main() -> tuple[list[str], list[str], int, dict[str, int]]:
            no_tcp_punch = ("--paths", "direct,udp-punch,relay")
            seed = await lab.start_daemon(seed_host, extra=no_tcp_punch)
            leech = await lab.start_daemon(leech_host, extra=no_tcp_punch)
            seed_id = (await seed.call("status"))["node_id"]
            src = await trio.to_thread.run_sync(make_artifact, tmp_path, size, "death")
            name = "nat-death:v1"
            pub = await seed.call("publish", {"path": str(src), "name": name}, timeout=60)
            aid = pub["artifact_id"]
            before: list[str] = []
            after: list[str] = []
            done_at_kill = [0]

            async def kill_the_path() -> None:
                while True:  # the UDP path carries the download, a few pieces are in
                    art = await leech.artifact(aid)
                    paths = [c["path"] for c in (art or {}).get("connections", []) if c["node_id"] == seed_id]
                    if art is not None and paths == ["udp-punch"] and art["pieces_done"] >= 2:
                        before.extend(paths)
                        done_at_kill[0] = art["pieces_done"]
                        break
                    assert art is None or art["pieces_done"] < art["pieces_total"], "done before the path was cut"
                    await trio.sleep(0.05)
                router.run(["iptables", "-w", "5", "-I", "FORWARD", "1", "-p", "udp", "-j", "DROP"])
                while True:  # the dead connection is dropped and another path replaces it
                    art = await leech.artifact(aid)
                    paths = [c["path"] for c in (art or {}).get("connections", []) if c["node_id"] == seed_id]
                    if paths and "udp-punch" not in paths:
                        after.extend(paths)
                        return
                    assert art is None or art["pieces_done"] < art["pieces_total"], "done over the dead path?"
                    await trio.sleep(0.05)

            got = Fetched()

            async def fetch() -> None:
                nonlocal got
                got = await fetch_timed(leech, name, aid, timeout=240)

            with trio.fail_after(300):
                async with trio.open_nursery() as n:
                    n.start_soon(fetch)
                    n.start_soon(kill_the_path)
            assert got.path is not None, got.error
            same = await trio.to_thread.run_sync(sha256_tree, got.path) == await trio.to_thread.run_sync(
                sha256_tree, src
            )
            assert same, "bytes differ"
            wins = (await leech.call("status"))["traversal"]["wins"]
            return before, after, done_at_kill[0], wins

        before, after, at_kill, wins = trio.run(main)
    assert before == ["udp-punch"]
    assert after == ["relay"], after
    assert at_kill >= 2, at_kill
    assert wins["udp-punch"] >= 1 and wins["relay"] >= 1, wins
