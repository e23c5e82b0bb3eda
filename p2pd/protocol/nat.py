"""RFC 3489 NAT classification as a sans-IO state machine: fed STUN answers and timeouts, it says which
request to send next and, at the end, what kind of NAT (or firewall) this node sits behind.

Why our own and not pynat: the issue asked for pynat, whose algorithm this is (RFC 3489 §10.1, tests
I, II, I at the alternate address, III), but pynat 0.7 ships no wheel and its sdist does not build in
a fresh virtualenv (its setup.py imports `six` before installing it; research FINDINGS §3 needed
`pip install six` then `pip install --no-build-isolation pynat`), so `pip install -e .` would break for
every user. It is also blocking (a worker thread per check) and owns its socket, while we must probe
from the UDP twin of the node's listening port, with trio timeouts, and unit-test every branch.
The algorithm is a page; here it is a table of transitions (tested for every outcome, and against a
simulated NAT of each behaviour in tests/unit/test_nat_classifier.py).

    test I    Binding to the server            no answer: udp-blocked
              mapped == our own address?       (no alternate address in the answer: unknown)
    test II   change IP and port               answer: open (mapped == ours) / full-cone
                                               none: udp-firewall (mapped == ours) / go on
    test I'   Binding to the alternate address mapped differs from test I: symmetric
    test III  change port only                 answer: restricted-cone, none: port-restricted-cone

Every request has a fresh transaction id (the driver's business), so a late answer to an earlier test
is never taken for the current one. Answers to tests II and III must come from the address the change
asked for: a server that ignores CHANGE-REQUEST would otherwise make every NAT look like a full cone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

Addr = tuple[str, int]


class NatType(enum.StrEnum):
    """What a node's path to the public side does to UDP (the names other nodes and the tracker see)."""

    UNKNOWN = "unknown"  # not classified: no STUN server, or one without a second address, or it misbehaved
    UDP_BLOCKED = "udp-blocked"  # no STUN answer at all
    OPEN = "open"  # no NAT, no filtering: the mapped address is our own
    UDP_FIREWALL = "udp-firewall"  # no NAT, but unsolicited datagrams are dropped (symmetric UDP firewall)
    FULL_CONE = "full-cone"  # one mapping per local port; anyone may send to it
    RESTRICTED_CONE = "restricted-cone"  # one mapping; only IPs we sent to may send to it
    PORT_RESTRICTED_CONE = "port-restricted-cone"  # one mapping; only IP:port pairs we sent to
    SYMMETRIC = "symmetric"  # a new mapping per destination: hole punching needs prediction or a relay


class StunTest(enum.Enum):
    I = "I"  # noqa: E741 (the RFC's name)
    II = "II"
    I_ALT = "I'"
    III = "III"


@dataclass(frozen=True, slots=True)
class Probe:
    """A Binding request to send (to `dest`, with CHANGE-REQUEST flags) and wait an answer for."""

    test: StunTest
    dest: Addr
    change_ip: bool = False
    change_port: bool = False


@dataclass(frozen=True, slots=True)
class Answer:
    """One STUN answer to the current probe: where it came from and what it said."""

    source: Addr
    mapped: Addr | None
    other: Addr | None = None
    error: tuple[int, str] | None = None


@dataclass(frozen=True, slots=True)
class Classification:
    nat_type: NatType
    mapped: Addr | None  # our public address as test I saw it (None when UDP is blocked)
    reason: str  # one line for logs and `p2pd status`: how the verdict was reached


class Classifier:
    """One classification run. `start()` gives the first probe; `answered()` / `timed_out()` give the next
    probe or the `Classification`. `local` is the address the probes leave from (IP and port), `server`
    the STUN server's primary address (both as IP literals)."""

    def __init__(self, server: Addr, local: Addr) -> None:
        self.server = server
        self.local = local
        self.probe: Probe | None = None
        self.result: Classification | None = None
        self._mapped: Addr | None = None
        self.other: Addr | None = None  # the server's alternate address, once test I told it
        self.trace: list[str] = []  # one entry per finished test, for the reason line

    def start(self) -> Probe:
        if self.probe is not None or self.result is not None:
            raise RuntimeError("a Classifier runs once")
        return self._send(Probe(StunTest.I, self.server))

    # ---- events ------------------------------------------------------------------------------------

    def answered(self, answer: Answer) -> Probe | Classification:
        probe = self._current()
        if answer.error is not None:
            code, text = answer.error
            self.trace.append(f"{probe.test.value}: error {code}")
            return self._done(NatType.UNKNOWN, f"the STUN server refused test {probe.test.value}: {code} {text}")
        if answer.mapped is None:
            self.trace.append(f"{probe.test.value}: no mapped address")
            return self._done(NatType.UNKNOWN, f"the STUN answer to test {probe.test.value} had no mapped address")
        self.trace.append(f"{probe.test.value}: {_fmt(answer.mapped)} from {_fmt(answer.source)}")
        if probe.test is StunTest.I:
            return self._after_test_i(answer)
        if probe.test is StunTest.II:
            if (bad := self._unexpected_source(answer, self._other_addr())) is not None:
                return bad
            if self._not_translated():
                return self._done(NatType.OPEN, "no NAT, and unsolicited datagrams arrive")
            return self._done(NatType.FULL_CONE, "mapped address differs from ours, and anyone may send to it")
        if probe.test is StunTest.I_ALT:
            if answer.mapped != self._mapped:
                return self._done(
                    NatType.SYMMETRIC,
                    f"the mapping changes with the destination ({_fmt(self._mapped)} vs {_fmt(answer.mapped)})",
                )
            return self._send(Probe(StunTest.III, self.server, change_port=True))
        # test III: an answer from the server's IP but another port passed the filter
        if (bad := self._unexpected_source(answer, (self.server[0], self._other_addr()[1]))) is not None:
            return bad
        return self._done(NatType.RESTRICTED_CONE, "one mapping; any port of an IP we sent to may answer")

    def timed_out(self) -> Probe | Classification:
        probe = self._current()
        self.trace.append(f"{probe.test.value}: no answer")
        if probe.test is StunTest.I:
            return self._done(NatType.UDP_BLOCKED, "the STUN server did not answer over UDP")
        if probe.test is StunTest.II:
            if self._not_translated():
                return self._done(NatType.UDP_FIREWALL, "no NAT, but unsolicited datagrams are dropped")
            return self._send(Probe(StunTest.I_ALT, self._other_addr()))
        if probe.test is StunTest.I_ALT:
            return self._done(
                NatType.UNKNOWN, f"the server's alternate address {_fmt(self._other_addr())} did not answer"
            )
        return self._done(NatType.PORT_RESTRICTED_CONE, "one mapping; only the exact IP:port we sent to may answer")

    # ---- steps -------------------------------------------------------------------------------------

    def _after_test_i(self, answer: Answer) -> Probe | Classification:
        self._mapped = answer.mapped
        other = answer.other
        if other is None:
            return self._done(
                NatType.UNKNOWN,
                "the STUN server has no second address (tracker without --stun-alt): mapped address only",
            )
        if other[0] == self.server[0] or other[1] == self.server[1]:
            return self._done(
                NatType.UNKNOWN,
                f"the STUN server's alternate address {_fmt(other)} does not differ "
                f"from {_fmt(self.server)} in both IP and port",
            )
        self.other = other
        return self._send(Probe(StunTest.II, self.server, change_ip=True, change_port=True))

    def _unexpected_source(self, answer: Answer, expected: Addr) -> Classification | None:
        if answer.source == expected:
            return None
        return self._done(
            NatType.UNKNOWN,
            f"the STUN server answered a CHANGE-REQUEST from {_fmt(answer.source)} instead of {_fmt(expected)}",
        )

    def _not_translated(self) -> bool:
        return self._mapped == self.local

    def _other_addr(self) -> Addr:
        assert self.other is not None
        return self.other

    def _current(self) -> Probe:
        if self.probe is None:
            raise RuntimeError("no probe in flight: call start() first, and nothing after the result")
        return self.probe

    def _send(self, probe: Probe) -> Probe:
        self.probe = probe
        return probe

    def _done(self, nat_type: NatType, why: str) -> Classification:
        self.probe = None
        self.result = Classification(nat_type, self._mapped, f"{why} [{'; '.join(self.trace)}]")
        return self.result


def _fmt(addr: Addr | None) -> str:
    if addr is None:
        return "-"
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
