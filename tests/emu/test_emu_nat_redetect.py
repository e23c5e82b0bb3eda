"""A node whose public address changes re-registers (issue #12 item 4), against a real Linux NAT router.

A node sits behind a port-restricted cone router (MASQUERADE) with a second public address. Once the tracker
lists the node at the router's first address, the router's rule is replaced by SNAT to the second address and
the router's UDP conntrack timeouts are cut to 1 s (there is no `conntrack -F` here), so the node's UDP mapping
lapses between two of its Binding checks and the next one sees the new address. Within a few check intervals
(`--nat-check-every 1.5`) the tracker's `admin nodes` must list the node's new mapped address, and a public peer
must then fetch an artifact from it byte-identically.
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

from netsim.bench.nat import ADMIN_PORT, NODE_PORT, TOKEN, NatLab, make_artifact, sha256_tree
from netsim.emu import Host
from netsim.emu.nat import add_nat_site
from netsim.emu.topology import Topology
from p2pd.cluster import Node, Process
from p2pd.rpc import RpcError

pytestmark = pytest.mark.emu

MiB = 1 << 20
CHECK_EVERY_S = 1.5  # above the 1 s UDP conntrack timeout set below, so the mapping lapses between checks


async def start_daemon(lab: NatLab, host: Host) -> Node:
    d = lab.work / host.name
    d.mkdir()
    args = [
        sys.executable,
        "-m",
        "p2pd.cli",
        "run",
        "--tracker",
        lab.tracker,
        "--listen",
        f"0.0.0.0:{NODE_PORT}",
        "--data-dir",
        str(d),
        "--nat-check-every",
        str(CHECK_EVERY_S),
    ]
    log = lab.work / f"{host.name}.log"
    node = Node(host.name, d, NODE_PORT, args, Process(host.name, args, log, host.popen(args, log=str(log)), 0))
    with trio.fail_after(40):
        while True:
            assert node.process.returncode is None, f"{host.name}: p2pd exited:\n{node.log_text()[-3000:]}"
            if node.socket.exists():
                try:
                    st = await node.call("status", timeout=2)
                    if st["traversal"]["signal_channel"] and st["nat"]["state"] == "done":
                        return node
                except (OSError, RpcError):
                    pass  # not serving yet
            await trio.sleep(0.1)


def admin_node(lab: NatLab, node_id: str) -> dict[str, Any] | None:
    cp = lab.tracker_host.run(
        [
            sys.executable,
            "-m",
            "tracker.cli",
            "admin",
            "nodes",
            "--tracker",
            f"http://{lab.tracker_host.ip}:{ADMIN_PORT}",
            "--token",
            TOKEN,
            "--json",
        ],
        timeout=30,
    )
    return next((n for n in json.loads(cp.stdout)["nodes"] if n["node_id"] == node_id), None)


def test_a_node_whose_mapping_changes_reregisters_and_is_still_fetched_from(
    emu: None, iptables: None, tmp_path: Path
) -> None:
    os.chmod(tmp_path, 0o755)
    t0 = time.monotonic()
    with Topology() as topo:
        lab = NatLab(topo, tmp_path)
        router, moving = add_nat_site(topo, "mv", lab.wan, "port-restricted-cone")
        peer_host = add_nat_site(topo, "pb", lab.wan, "public")[1]
        assert router is not None and router.ip is not None
        wan_if = router.links[0].host_if
        ip2 = str(lab.wan.take_ip())
        router.run(["ip", "addr", "add", f"{ip2}/{lab.wan.subnet.prefixlen}", "dev", wan_if])
        lab.start_tracker()

        async def main() -> tuple[dict[str, Any], dict[str, Any], float, list[str]]:
            seed = await start_daemon(lab, moving)
            peer = await start_daemon(lab, peer_host)
            seed_id = (await seed.call("status"))["node_id"]
            before = await trio.to_thread.run_sync(admin_node, lab, seed_id)
            assert before is not None and before["mapped"] == [router.ip, NODE_PORT], before

            # the router's public address changes: new flows leave from ip2; the UDP mapping lapses in 1 s
            ipt = ["iptables", "-w", "5", "-t", "nat"]
            router.run([*ipt, "-I", "POSTROUTING", "1", "-o", wan_if, "-j", "SNAT", "--to-source", ip2])
            router.run([*ipt, "-D", "POSTROUTING", "-o", wan_if, "-j", "MASQUERADE"])
            for key in ("nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream"):
                router.run(["sysctl", "-qw", f"net.netfilter.{key}=1"])
            changed_at = trio.current_time()
            after: dict[str, Any] | None = None
            with trio.move_on_after(20):
                while after is None or after["mapped"] != [ip2, NODE_PORT]:
                    await trio.sleep(0.2)
                    after = await trio.to_thread.run_sync(admin_node, lab, seed_id)
            took = trio.current_time() - changed_at
            assert after is not None and after["mapped"] == [ip2, NODE_PORT], (
                f"tracker still lists {after} {took:.1f} s after the change\n{seed.log_text()[-3000:]}"
            )
            status = await seed.call("status")
            assert status["nat"]["mapped"] == [ip2, NODE_PORT], status["nat"]

            src = await trio.to_thread.run_sync(make_artifact, tmp_path, 3 * MiB + 321, "redetect")
            pub = await seed.call("publish", {"path": str(src), "name": "redetect:v1"}, timeout=60)
            res = await peer.call("fetch", {"name": "redetect:v1"}, timeout=60)
            got = await trio.to_thread.run_sync(sha256_tree, Path(res["path"]))
            assert got == await trio.to_thread.run_sync(sha256_tree, src), "bytes differ"
            art = await peer.artifact(pub["artifact_id"])
            paths = sorted({c["path"] for c in (art or {}).get("connections", []) if c["node_id"] == seed_id})
            return before, after, took, paths

        before, after, took, paths = trio.run(main)
    print(
        f"\nmapped {before['mapped']} -> {after['mapped']} (advertised {before['addr']} -> {after['addr']}) on the "
        f"tracker {took:.1f} s after the change; fetched over {paths}; {time.monotonic() - t0:.0f} s in all"
    )
    # the mapping lapses within ~1 s, the next check (every 1.5 s) sees it, the RFC 3489 tests take a few s
    assert took < 10, took
