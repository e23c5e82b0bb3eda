"""NAT sites: one host alone behind a Linux NAT router of a given kind (research FINDINGS §3, research/nat/topo.sh).

Shared by every emulation that needs NATed nodes (detection, traversal paths, the NAT matrix and swarm, the
`nat` benchmark), so that "port-restricted cone" means the same iptables rules everywhere.

`Topology.add_router` gives the two kinds Linux MASQUERADE makes by itself: port-restricted cone (unsolicited
input dropped) and symmetric (`--random-fully`: a new port per destination). Full cone and UDP-blocked are built
here on top of them with a few rules:
- full cone: every inbound UDP datagram on the WAN side is forwarded to the host (endpoint-independent mapping
  and filtering, for UDP; TCP stays port-restricted, since unsolicited SYNs are still dropped);
- UDP blocked: a port-restricted cone router that forwards no UDP either way (TCP still works, so the node
  registers with the tracker and can be punched to).
"public" is no router at all: the host sits on the WAN segment with a routable address.
"""

from __future__ import annotations

from netsim.emu.topology import Host, Switch, Topology

# the kinds a site can be, and what a daemon there must classify itself as (`p2pd status` nat.type)
NAT_KINDS: dict[str, str] = {
    "public": "open",
    "full-cone": "full-cone",
    "port-restricted-cone": "port-restricted-cone",
    "symmetric": "symmetric",
    "udp-blocked": "udp-blocked",
}
_BASE = {"full-cone": "none", "port-restricted-cone": "cone", "symmetric": "symmetric", "udp-blocked": "cone"}


def _iptables(router: Host, *rule: str) -> None:
    router.run(["iptables", "-w", "5", *rule])


def add_nat_site(
    topo: Topology, name: str, wan: Switch, kind: str, *, rate: int | None = None
) -> tuple[Host | None, Host]:
    """Host `name` behind a router `r<name>` of `kind` (one of NAT_KINDS) on its own LAN `l<name>`; returns
    (router, host), router None for "public" (then the host is on `wan` itself).

    `rate` (bit/s) shapes the host's own link both ways; the router's links stay unshaped, so the host's link is
    the only bottleneck, as with a public host."""
    if kind not in NAT_KINDS:
        raise ValueError(f"NAT kind must be one of {', '.join(NAT_KINDS)}, not {kind!r}")
    if kind == "public":
        return None, topo.add_host(name, wan, rate=rate)
    lan = topo.add_switch(f"l{name}")
    router = topo.add_router(f"r{name}", wan, lan, nat=_BASE[kind])
    host = topo.add_host(name, lan, rate=rate, gateway=router)
    wan_if = router.links[0].host_if
    if kind == "full-cone":
        assert host.ip is not None
        _iptables(router, "-t", "nat", "-A", "POSTROUTING", "-o", wan_if, "-j", "MASQUERADE")
        dnat = ["-j", "DNAT", "--to-destination", host.ip]
        _iptables(router, "-t", "nat", "-A", "PREROUTING", "-i", wan_if, "-p", "udp", *dnat)
        established = ["-m", "conntrack", "--ctstate"]
        _iptables(router, "-A", "INPUT", "-i", wan_if, *established, "ESTABLISHED,RELATED", "-j", "ACCEPT")
        _iptables(router, "-A", "INPUT", "-i", wan_if, "-j", "DROP")
        _iptables(router, "-A", "FORWARD", "-i", wan_if, *established, "ESTABLISHED,RELATED,DNAT", "-j", "ACCEPT")
        _iptables(router, "-A", "FORWARD", "-i", wan_if, "-j", "DROP")
    elif kind == "udp-blocked":
        _iptables(router, "-I", "FORWARD", "1", "-p", "udp", "-j", "DROP")
    return router, host
