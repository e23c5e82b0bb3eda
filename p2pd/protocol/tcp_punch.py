"""The TCP punch's birthday variant, sans-IO: which side opens many ports and which sprays SYNs at them.

A TCP simultaneous open through two cones works at the first try, because each NAT maps the punch port as
it mapped the connection to the tracker. A symmetric NAT maps every destination to a new random port, so
the address the tracker saw is useless to its peer and the plain punch always timed out: a cone and a
symmetric node met only by the UDP punch (QUIC in pure Python) or the relay. In the NAT swarm (1 public
seed + 4 cones, 2 symmetric, 2 public) the symmetric nodes then fetched from the two public peers alone
(the QUIC paths are asked last, as slow paths) and finished 1.5-2.5 s after everyone else, at 1.6-2.1x the
Kumar-Ross bound, while the same swarm with every peer public is at 1.12x (BENCHMARKS.md).

So the same birthday punch as for UDP (udp_punch.py, Tailscale's "How NAT traversal works"), with SYNs:
- the hard side (behind the symmetric NAT) connects `HARD_SOCKETS` sockets from fresh local ports to the
  easy side's mapped address: its NAT opens that many random ports, each letting in only that address;
  the kernel resends their SYNs (1 s, 3 s later) while they wait;
- the easy side (behind a cone) connects sockets from its punch port, each to a different random port of
  the hard side's IP (`SPRAY_RATE` a second, at most `SPRAY_PROBES`), and holds each `SPRAY_HOLD` seconds:
  its own NAT then lets in the answer from that port. A SYN that lands on an open port of the hard NAT
  meets the hard side's SYN_SENT socket (a simultaneous open), which answers SYN-ACK to the easy socket
  still waiting; the other SYNs are dropped by the hard NAT. With 256 open ports of ~64,500, 2,048
  probes hit with p = 0.9996 (`udp_punch.hit_probability`), the first after ~250 probes (~0.13 s).
Both NAT types come from each side's own classification, passed along by the tracker with the punch:
without them (an older peer or tracker, or an unclassified NAT) the punch stays plain. The roles are
never taken towards a public peer (its listener takes the plain dial; sprayed SYNs at a public host could
reach whatever else it runs) nor between two symmetric NATs (k open ports meeting k guesses: the relay).
"""

from __future__ import annotations

import enum

from p2pd.protocol.udp_punch import HARD_SOCKETS, SYMMETRIC

# NAT types whose TCP mapping is taken to be one per local port (a cone). A network that blocks UDP says
# nothing of its TCP mapping; a cone is by far the common case, and a wrong guess only costs a spray
# that never hits while the other paths race on.
CONES = frozenset({"full-cone", "restricted-cone", "port-restricted-cone", "udp-blocked"})
SPRAY_RATE = 2000.0  # SYNs/s from the easy side (~150 kB/s of headers while it lasts)
SPRAY_PROBES = 2048  # at most this many per punch: p = 0.9996 of a hit with HARD_SOCKETS open ports
# s each sprayed socket waits for the answer: many RTTs, and under the kernel's first SYN resend (`SYN_RTO`), so
# that each probe is one SYN on the wire, as counted (a hit after it closed still reaches the punch port's
# listener: the NAT entry its SYN made outlives the socket)
SPRAY_HOLD = 0.9
SPRAY_AFTER = 0.1  # s of plain dialling first: a peer that is a cone after all connects before any spray
SYN_WIRE = {4: 74, 6: 94}  # bytes of a SYN on the wire (Ethernet, IP, TCP with options): for auto-throttling
# Linux sends an unanswered SYN again after 1 s, then after each doubled timeout (net.ipv4.tcp_syn_retries = 6):
# a punch's SYN_SENT sockets (the plain dial, the hard side's 256) are answered by nobody while the NATs drop
# them, so each puts a SYN on the wire at 0, 1, 3 (7, ...) s. Auto-throttling reads every byte it was not told
# of as another service's traffic: uncounted, a symmetric node's 4 birthday punches at once resend 4 x 256 SYNs
# (76 kB) at 1 s and again at 3 s, besides what it counted.
SYN_RTO = 1.0
SYN_RETRIES = 6


def syns_sent(elapsed: float) -> int:
    """SYNs one connect has put on the wire `elapsed` seconds after its first, while unanswered."""
    n, at, rto = 1, SYN_RTO, SYN_RTO
    while n <= SYN_RETRIES and elapsed >= at:
        n += 1
        rto *= 2
        at += rto
    return n


__all__ = [
    "CONES",
    "HARD_SOCKETS",
    "SPRAY_AFTER",
    "SPRAY_HOLD",
    "SPRAY_PROBES",
    "SPRAY_RATE",
    "SYN_RTO",
    "SYN_WIRE",
    "Role",
    "role",
    "syns_sent",
]


class Role(enum.StrEnum):
    """What this side does in a TCP punch, besides dialling the peer's mapped address from its punch port."""

    PLAIN = "plain"
    HARD = "hard"  # we are behind a symmetric NAT: HARD_SOCKETS more sockets to the easy side's address
    EASY = "easy"  # the peer is behind a symmetric NAT: spray SYNs over its ports


def role(own_nat: str, peer_nat: str) -> Role:
    """This side's role from both NAT types (`p2pd.protocol.nat.NatType` values; "" when not known)."""
    if own_nat == SYMMETRIC and peer_nat in CONES:
        return Role.HARD
    if own_nat in CONES and peer_nat == SYMMETRIC:
        return Role.EASY
    return Role.PLAIN
