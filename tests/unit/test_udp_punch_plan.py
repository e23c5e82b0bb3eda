"""The UDP punch's sans-IO part: who does what, the probe datagrams, where a birthday spray aims."""

from __future__ import annotations

import random

import pytest

from p2pd.protocol import udp_punch as up


@pytest.mark.parametrize(
    ("own", "peer", "plan"),
    [
        ("port-restricted-cone", "port-restricted-cone", up.Plan.PLAIN),
        ("full-cone", "unknown", up.Plan.PLAIN),
        ("open", "port-restricted-cone", up.Plan.PLAIN),
        ("port-restricted-cone", "symmetric", up.Plan.EASY),
        ("symmetric", "full-cone", up.Plan.HARD),
        ("symmetric", "unknown", up.Plan.HARD),
        ("symmetric", "symmetric", up.Plan.NONE),
        ("udp-blocked", "open", up.Plan.NONE),
        ("open", "udp-blocked", up.Plan.NONE),
    ],
)
def test_plan_from_both_nat_types(own: str, peer: str, plan: up.Plan) -> None:
    assert up.plan(own, peer).plan is plan
    if plan is up.Plan.NONE:
        assert up.plan(own, peer).reason


def test_the_two_sides_of_a_punch_agree() -> None:
    kinds = ["open", "full-cone", "port-restricted-cone", "symmetric", "udp-blocked", "unknown"]
    partner = {up.Plan.PLAIN: up.Plan.PLAIN, up.Plan.EASY: up.Plan.HARD, up.Plan.HARD: up.Plan.EASY}
    for a in kinds:
        for b in kinds:
            pa, pb = up.plan(a, b).plan, up.plan(b, a).plan
            if pa is up.Plan.NONE:
                assert pb is up.Plan.NONE
            else:
                assert partner[pa] is pb, (a, b)


def test_probe_round_trip_and_refusals() -> None:
    rid = up.rendezvous_bytes("0123456789abcdef")
    data = up.encode(up.Kind.CHOSEN, rid, "a" * 32)
    assert len(data) == up.PROBE_SIZE and up.is_probe(data)
    p = up.decode(data)
    assert (p.kind, p.rendezvous, p.sender) == (up.Kind.CHOSEN, rid, "a" * up.NODE_PREFIX)
    wrong_version, wrong_kind = data[:4] + b"\x09" + data[5:], data[:5] + b"\x07" + data[6:]
    for bad in (data[:-1], data + b"x", b"QUIC" + data[4:], wrong_version, wrong_kind):
        with pytest.raises(up.ProbeError):
            up.decode(bad)
    for rid_text in ("0123", "zz23456789abcdef", "0123456789abcdef00"):
        with pytest.raises(ValueError):
            up.rendezvous_bytes(rid_text)


def test_easy_side_settles_only_on_the_hard_sides_choice() -> None:
    assert not up.decides(up.Plan.EASY, up.Kind.PROBE)
    assert not up.decides(up.Plan.EASY, up.Kind.ACK)
    assert up.decides(up.Plan.EASY, up.Kind.CHOSEN)
    assert up.decides(up.Plan.EASY, None)  # QUIC: only the chosen socket sends it
    assert all(up.decides(p, k) for p in (up.Plan.HARD, up.Plan.PLAIN) for k in (*up.Kind, None))


def test_spray_covers_every_unprivileged_port_once_in_random_order() -> None:
    ports = list(up.spray_ports(random.Random(1), exclude=40000))
    assert len(ports) == len(set(ports)) == up.PORT_MAX - up.PORT_MIN  # all but the excluded one
    assert min(ports) == up.PORT_MIN and max(ports) == up.PORT_MAX and 40000 not in ports
    assert ports[:50] != sorted(ports[:50])
    assert list(up.spray_ports(random.Random(2)))[:20] != list(up.spray_ports(random.Random(3)))[:20]


def test_hit_probability_matches_tailscales_numbers() -> None:
    # 256 open ports: ~98 % after 1,024 probes, ~99.9 % after 2,048 (Tailscale, FINDINGS §6)
    assert 0.97 < up.hit_probability(256, 1024) < 0.99
    assert up.hit_probability(256, 2048) > 0.999
    assert up.hit_probability(256, int(up.SPRAY_RATE * 1.0)) > 0.99  # one second of spraying
    assert up.hit_probability(0, 1000) == 0.0 and up.hit_probability(10, 0) == 0.0
    assert up.hit_probability(10, 64_600) == 1.0
    # against a direct simulation of the same sampling
    rng = random.Random(7)
    space, k, n, trials = 2000, 8, 100, 4000
    hits = sum(bool(set(rng.sample(range(space), n)) & set(range(k))) for _ in range(trials))
    assert abs(hits / trials - up.hit_probability(k, n, space)) < 0.03
