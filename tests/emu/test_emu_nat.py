"""NAT detection against real Linux NAT routers (iptables in network namespaces, research FINDINGS §3).

One public "internet" segment holds the tracker with two addresses (`--stun-alt` for RFC 3489
CHANGE-REQUEST) and a public node; four more nodes each sit behind a router of one kind — full cone,
port-restricted cone, symmetric, UDP blocked. A real `p2pd run` on each must classify itself
correctly, learn the mapping its router made for its peer port, show both in `p2pd status`, and the
tracker's `p2p-tracker admin nodes` must show each node's type, advertised and mapped address.

The namespaces come from `netsim.emu.Topology` (per-run prefix, deleted on exit even on failure; the
`emu` fixture checks that none is left); the routers of each kind from `netsim.emu.nat.add_nat_site`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from netsim.emu import Host, Topology
from netsim.emu.nat import NAT_KINDS, add_nat_site

pytestmark = pytest.mark.emu

REPO = Path(__file__).resolve().parents[2]
P2PD = [sys.executable, "-m", "p2pd.cli"]
TRACKER = [sys.executable, "-m", "tracker.cli"]
TOKEN = "emu-nat-token"
NODE_PORT = 7700
TPORT, ALT_PORT, ADMIN_PORT = 7070, 3479, 7071
DEADLINE_S = 40.0

# node name -> (router kind, the type its daemon must report)
SITES = {
    name: (kind, NAT_KINDS[kind])
    for name, kind in (
        ("pub", "public"),
        ("full", "full-cone"),
        ("prc", "port-restricted-cone"),
        ("sym", "symmetric"),
        ("blk", "udp-blocked"),
    )
}


def status(data: Path) -> dict[str, Any] | None:
    cp = subprocess.run(
        [*P2PD, "status", "--json", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
        check=False,
    )
    return json.loads(cp.stdout) if cp.returncode == 0 else None


def log_tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError as e:
        return f"(no log: {e})"


def test_each_daemon_classifies_its_nat_and_the_tracker_shows_it(emu: None, tmp_path: Path) -> None:
    with Topology() as topo:
        wan = topo.add_switch("wan")
        trk = topo.add_host("trk", wan)
        assert trk.ip is not None
        ip2 = str(wan.take_ip())
        trk.run(["ip", "addr", "add", f"{ip2}/{wan.subnet.prefixlen}", "dev", trk.links[0].host_if])
        routers: dict[str, Host | None] = {}
        hosts: dict[str, Host] = {}
        for name, (kind, _) in SITES.items():
            routers[name], hosts[name] = add_nat_site(topo, name, wan, kind)

        tlog = tmp_path / "tracker.log"
        topo.popen(
            trk,
            [
                *TRACKER,
                "serve",
                "--listen",
                f"{trk.ip}:{TPORT}",
                "--stun-alt",
                f"{ip2}:{ALT_PORT}",
                "--admin-listen",
                f"{trk.ip}:{ADMIN_PORT}",
                "--admin-token",
                TOKEN,
                "--interval",
                "1",
            ],
            log=str(tlog),
            cwd=REPO,
        )
        data = {name: tmp_path / name for name in SITES}
        for name, host in hosts.items():
            data[name].mkdir()
            topo.popen(
                host,
                [
                    *P2PD,
                    "run",
                    "--tracker",
                    f"{trk.ip}:{TPORT}",
                    "--listen",
                    f"0.0.0.0:{NODE_PORT}",
                    "--data-dir",
                    str(data[name]),
                ],
                log=str(tmp_path / f"{name}.log"),
                cwd=REPO,
            )

        seen: dict[str, dict[str, Any]] = {}
        t0 = time.monotonic()
        while time.monotonic() - t0 < DEADLINE_S and len(seen) < len(SITES):
            for name in SITES:
                if name not in seen and (st := status(data[name])) is not None and st["nat"]["state"] == "done":
                    seen[name] = st
            time.sleep(0.3)
        detect_s = time.monotonic() - t0
        logs = "\n".join(f"--- {n}\n{log_tail(tmp_path / f'{n}.log')}" for n in [*SITES, "tracker"])
        assert set(seen) == set(SITES), f"not classified within {DEADLINE_S:.0f} s: {set(SITES) - set(seen)}\n{logs}"

        admin = [*TRACKER, "admin", "nodes", "--tracker", f"http://{trk.ip}:{ADMIN_PORT}", "--token", TOKEN]
        nodes: dict[str, dict[str, Any]] = {}
        by_id = {st["node_id"]: name for name, st in seen.items()}
        while time.monotonic() - t0 < DEADLINE_S + 10:
            out = trk.run([*admin, "--json"], cwd=REPO).stdout
            nodes = {by_id[n["node_id"]]: n for n in json.loads(out)["nodes"] if n["node_id"] in by_id}
            if len(nodes) == len(SITES) and all(nodes[n]["nat_type"] == seen[n]["nat"]["type"] for n in SITES):
                break
            time.sleep(0.3)
        table = trk.run(admin, cwd=REPO).stdout

        rows = [("node", "router", "expected", "p2pd status", "tracker", "advertised", "mapped")]
        for name, (kind, _) in SITES.items():
            n = nodes.get(name, {})
            rows.append(
                (
                    name,
                    kind,
                    SITES[name][1],
                    seen[name]["nat"]["type"],
                    n.get("nat_type", "-"),
                    ":".join(map(str, n.get("addr") or ["-"])),
                    ":".join(map(str, n.get("mapped") or ["-"])),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        print(f"\nNAT classification in network namespaces (all classified after {detect_s:.1f} s):")
        for r in rows:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        print(table)

        for name, (kind, expected) in SITES.items():
            nat, router, host = seen[name]["nat"], routers[name], hosts[name]
            assert nat["type"] == expected, f"{name} behind {kind}: {nat}\n{logs}"
            node = nodes[name]
            assert node["nat_type"] == expected, f"tracker shows {node} for {name}"
            public_ip = router.ip if router is not None else host.ip
            assert node["addr"] == [public_ip, NODE_PORT]  # advertised: the source the tracker saw on TCP
            if expected == "udp-blocked":
                assert nat["mapped"] is None and node["mapped"] is None
                continue
            assert nat["mapped"] == node["mapped"] and node["mapped"][0] == public_ip, (name, nat, node)
            if expected != "symmetric":  # Linux MASQUERADE keeps the source port when it is free
                assert node["mapped"][1] == NODE_PORT, (name, node)
            assert f"{node['mapped'][0]}:{node['mapped'][1]}" in table
            assert expected in table
