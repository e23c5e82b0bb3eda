"""The RFC 3489 classifier (p2pd/protocol/nat.py): every outcome from a table of scripted answers, then
against a simulated NAT of each behaviour (mapping x filtering) with random addresses, and never a crash
or a loop whatever the answers."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pd.protocol.nat import Addr, Answer, Classification, Classifier, NatType, Probe, StunTest
from tests.unit._util import FAST

SERVER: Addr = ("198.51.100.10", 3478)
ALT: Addr = ("198.51.100.11", 3479)
LOCAL: Addr = ("10.0.0.2", 7700)
PUBLIC: Addr = ("203.0.113.5", 7700)

T = None  # a timeout in the scripts below


def run(script: list[Answer | None], local: Addr = LOCAL) -> tuple[Classification, list[Probe]]:
    """Feed the scripted answers (None = no answer) and return the verdict and the probes sent."""
    clf = Classifier(SERVER, local)
    step: Probe | Classification = clf.start()
    probes: list[Probe] = []
    for event in script:
        assert isinstance(step, Probe), f"verdict {step} before the script ended"
        probes.append(step)
        step = clf.timed_out() if event is None else clf.answered(event)
    assert isinstance(step, Classification), f"still probing ({step}) after the script"
    return step, probes


def a(
    mapped: Addr | None, source: Addr = SERVER, other: Addr | None = ALT, error: tuple[int, str] | None = None
) -> Answer:
    return Answer(source=source, mapped=mapped, other=other, error=error)


TABLE = [
    # (name, script, expected type, expected tests sent)
    ("blocked", [T], NatType.UDP_BLOCKED, ["I"]),
    ("open", [a(LOCAL), a(LOCAL, source=ALT)], NatType.OPEN, ["I", "II"]),
    ("udp firewall", [a(LOCAL), T], NatType.UDP_FIREWALL, ["I", "II"]),
    ("full cone", [a(PUBLIC), a(PUBLIC, source=ALT)], NatType.FULL_CONE, ["I", "II"]),
    ("symmetric", [a(PUBLIC), T, a(("203.0.113.5", 40001), source=ALT)], NatType.SYMMETRIC, ["I", "II", "I'"]),
    (
        "restricted cone",
        [a(PUBLIC), T, a(PUBLIC, source=ALT), a(PUBLIC, source=(SERVER[0], ALT[1]))],
        NatType.RESTRICTED_CONE,
        ["I", "II", "I'", "III"],
    ),
    (
        "port-restricted cone",
        [a(PUBLIC), T, a(PUBLIC, source=ALT), T],
        NatType.PORT_RESTRICTED_CONE,
        ["I", "II", "I'", "III"],
    ),
    ("server without alternate address", [a(PUBLIC, other=None)], NatType.UNKNOWN, ["I"]),
    ("alternate address shares the IP", [a(PUBLIC, other=(SERVER[0], 3479))], NatType.UNKNOWN, ["I"]),
    ("alternate address shares the port", [a(PUBLIC, other=(ALT[0], SERVER[1]))], NatType.UNKNOWN, ["I"]),
    ("server refuses CHANGE-REQUEST (420)", [a(PUBLIC), a(None, error=(420, "no"))], NatType.UNKNOWN, ["I", "II"]),
    ("server ignores CHANGE-REQUEST", [a(PUBLIC), a(PUBLIC, source=SERVER)], NatType.UNKNOWN, ["I", "II"]),
    (
        "test III answered from the primary port",
        [a(PUBLIC), T, a(PUBLIC, source=ALT), a(PUBLIC, source=SERVER)],
        NatType.UNKNOWN,
        ["I", "II", "I'", "III"],
    ),
    ("alternate address silent", [a(PUBLIC), T, T], NatType.UNKNOWN, ["I", "II", "I'"]),
    ("error to test I", [a(None, error=(500, "busy"))], NatType.UNKNOWN, ["I"]),
    ("success without mapped address", [a(None)], NatType.UNKNOWN, ["I"]),
]


@pytest.mark.parametrize(("name", "script", "expected", "tests"), TABLE, ids=[row[0] for row in TABLE])
def test_every_outcome(name: str, script: list[Answer | None], expected: NatType, tests: list[str]) -> None:
    verdict, probes = run(script)
    assert verdict.nat_type is expected, verdict.reason
    assert [p.test.value for p in probes] == tests
    assert verdict.reason  # a person can read why


def test_probes_go_where_rfc3489_says() -> None:
    _, probes = run([a(PUBLIC), T, a(PUBLIC, source=ALT), T])
    assert probes == [
        Probe(StunTest.I, SERVER),
        Probe(StunTest.II, SERVER, change_ip=True, change_port=True),
        Probe(StunTest.I_ALT, ALT),
        Probe(StunTest.III, SERVER, change_port=True),
    ]


def test_mapped_address_is_test_one_s() -> None:
    verdict, _ = run([a(PUBLIC), T, a(("203.0.113.5", 40001), source=ALT)])
    assert verdict.mapped == PUBLIC
    assert run([T])[0].mapped is None


def test_every_type_is_reachable_from_the_table() -> None:
    assert {row[2] for row in TABLE} == set(NatType)


def test_runs_once_and_refuses_events_out_of_order() -> None:
    clf = Classifier(SERVER, LOCAL)
    with pytest.raises(RuntimeError):
        clf.timed_out()
    clf.start()
    assert isinstance(clf.timed_out(), Classification)
    with pytest.raises(RuntimeError):
        clf.timed_out()
    with pytest.raises(RuntimeError):
        clf.answered(a(PUBLIC))
    with pytest.raises(RuntimeError):
        clf.start()


# ---- against a simulated NAT -------------------------------------------------------------------------


@dataclass
class SimNat:
    """A NAT (or none) in front of LOCAL, and an honest two-address STUN server behind the internet.

    mapping: "none" (no translation), "independent" (one public port per local port), "dependent" (a new
    public port per destination: symmetric). filtering: "none", "address", "address-port", or "all"
    (nothing unsolicited, nothing at all when `udp` is False)."""

    mapping: str
    filtering: str
    public_ip: str
    ports: list[int]  # the public ports the NAT hands out, in order
    udp: bool = True
    sent_to: set[Addr] = field(default_factory=set)
    maps: dict[Addr, Addr] = field(default_factory=dict)

    def public_for(self, dest: Addr) -> Addr:
        if self.mapping == "none":
            return LOCAL
        key = dest if self.mapping == "dependent" else ("*", 0)
        if key not in self.maps:
            self.maps[key] = (self.public_ip, self.ports[len(self.maps) % len(self.ports)])
        return self.maps[key]

    def passes(self, source: Addr) -> bool:
        if self.filtering == "none":
            return True
        if self.filtering == "address":
            return any(source[0] == d[0] for d in self.sent_to)
        return source in self.sent_to  # address-port

    def exchange(self, probe: Probe) -> Answer | None:
        if not self.udp:
            return None
        mapped = self.public_for(probe.dest)
        self.sent_to.add(probe.dest)
        ip, port = probe.dest
        if probe.change_ip:
            ip = ALT[0] if ip == SERVER[0] else SERVER[0]
        if probe.change_port:
            port = ALT[1] if port == SERVER[1] else SERVER[1]
        source = (ip, port)
        other = (
            ALT[0] if probe.dest[0] == SERVER[0] else SERVER[0],
            ALT[1] if probe.dest[1] == SERVER[1] else SERVER[1],
        )
        if not self.passes(source):
            return None
        return Answer(source=source, mapped=mapped, other=other)


def classify(nat: SimNat) -> Classification:
    clf = Classifier(SERVER, LOCAL)
    step: Probe | Classification = clf.start()
    for _ in range(10):
        if isinstance(step, Classification):
            return step
        answer = nat.exchange(step)
        step = clf.timed_out() if answer is None else clf.answered(answer)
    raise AssertionError("classifier did not finish within 10 probes")


EXPECTED = {
    ("none", "none"): NatType.OPEN,
    ("none", "address-port"): NatType.UDP_FIREWALL,
    ("none", "address"): NatType.UDP_FIREWALL,
    ("independent", "none"): NatType.FULL_CONE,
    ("independent", "address"): NatType.RESTRICTED_CONE,
    ("independent", "address-port"): NatType.PORT_RESTRICTED_CONE,
    ("dependent", "address"): NatType.SYMMETRIC,
    ("dependent", "address-port"): NatType.SYMMETRIC,
}


@FAST
@given(
    behaviour=st.sampled_from(sorted(EXPECTED)),
    public_ip=st.ip_addresses(v=4).map(str).filter(lambda ip: ip not in (SERVER[0], ALT[0], LOCAL[0])),
    ports=st.lists(st.integers(1, 65535), min_size=3, max_size=3, unique=True),
)
def test_simulated_nat_of_each_behaviour(behaviour: tuple[str, str], public_ip: str, ports: list[int]) -> None:
    mapping, filtering = behaviour
    verdict = classify(SimNat(mapping, filtering, public_ip, ports))
    assert verdict.nat_type is EXPECTED[behaviour], verdict.reason
    if mapping != "none":
        assert verdict.mapped == (public_ip, ports[0])


def test_simulated_udp_blocked() -> None:
    assert (
        classify(SimNat("independent", "address-port", "203.0.113.9", [1, 2], udp=False)).nat_type
        is NatType.UDP_BLOCKED
    )


def test_a_symmetric_nat_that_reuses_the_port_number_is_still_symmetric_if_the_ip_differs() -> None:
    """Mapped addresses are compared whole: same port, other IP (a NAT pool) is a new mapping."""
    verdict, _ = run([a(PUBLIC), T, a(("203.0.113.6", PUBLIC[1]), source=ALT)])
    assert verdict.nat_type is NatType.SYMMETRIC


addrs = st.tuples(
    st.sampled_from([SERVER[0], ALT[0], "203.0.113.5", LOCAL[0]]), st.sampled_from([SERVER[1], ALT[1], LOCAL[1], 1])
)
answers = st.one_of(
    st.none(),
    st.builds(
        Answer,
        source=addrs,
        mapped=st.one_of(st.none(), addrs),
        other=st.one_of(st.none(), addrs),
        error=st.one_of(st.none(), st.tuples(st.integers(300, 699), st.text(max_size=10))),
    ),
)


@FAST
@given(st.lists(answers, min_size=4, max_size=4))
def test_any_answers_end_in_a_verdict_within_four_probes(events: list[Answer | None]) -> None:
    clf = Classifier(SERVER, LOCAL)
    step: Probe | Classification = clf.start()
    for event in itertools.chain(events, [None]):
        if isinstance(step, Classification):
            break
        step = clf.timed_out() if event is None else clf.answered(event)
    assert isinstance(step, Classification)
    assert step.nat_type in set(NatType)
    assert len(clf.trace) <= 4
