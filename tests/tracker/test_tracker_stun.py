"""The tracker's STUN server (tracker/stun.py) and NAT reporting end to end on loopback.

Hostile input first: arbitrary bytes, truncated and mutated requests, a wrong magic cookie, messages
that are not Binding requests, a CHANGE-REQUEST without a second address, a request naming another
address to answer to — none raises, and an answer only ever goes to the request's source. Then the
real sockets: STUN sharing the heartbeat port, CHANGE-REQUEST from 127.0.0.2 (every 127/8 address is
local on Linux, so a node on loopback classifies itself `open`), the NAT report reaching the registry,
peer lists and `p2p-tracker admin nodes`, and a real `p2pd run` daemon showing it in `p2pd status`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from aioice import stun as aioice_stun
from hypothesis import given
from hypothesis import strategies as st

from p2pd.cluster import LocalCluster
from p2pd.errors import ErrorCode
from p2pd.nat_detect import NatMonitor, binding, classify
from p2pd.protocol import stun
from p2pd.protocol.nat import NatType
from p2pd.rpc import RpcError, free_port
from p2pd.tracker_client import TrackerClient
from tests.tracker.tracker_testutil import make_manifest, nid, start_redis
from tests.unit._util import FAST
from tracker.server import TrackerServer
from tracker.store import Heartbeat, MemoryStore, Store
from tracker.stun import LOG_EVERY, StunResponder, StunSettings, check_settings

P: tuple[str, int] = ("192.0.2.1", 3478)
ALT: tuple[str, int] = ("192.0.2.2", 3479)
SRC: tuple[str, int] = ("203.0.113.7", 40000)
REPO = Path(__file__).resolve().parents[2]


def request(change_ip: bool = False, change_port: bool = False) -> bytes:
    return stun.binding_request(stun.new_transaction_id(), change_ip=change_ip, change_port=change_port)


def parsed(payload: bytes) -> aioice_stun.Message:
    return aioice_stun.parse_message(payload)


# ---- the responder, sans-IO --------------------------------------------------------------------------


def test_binding_answered_with_the_source_address() -> None:
    r = StunResponder(P)
    req = request()
    reply = r.handle(P, req, SRC)
    assert reply is not None and reply.to == SRC and reply.send_from == P
    msg = parsed(reply.payload)
    assert msg.message_class == aioice_stun.Class.RESPONSE and msg.transaction_id == req[8:20]
    assert msg.attributes["XOR-MAPPED-ADDRESS"] == SRC and msg.attributes["MAPPED-ADDRESS"] == SRC
    assert "OTHER-ADDRESS" not in msg.attributes and "CHANGED-ADDRESS" not in msg.attributes
    assert msg.attributes["RESPONSE-ORIGIN"] == P
    assert (r.answered, r.dropped) == (1, 0)


@pytest.mark.parametrize("arrived_on", [P, (P[0], ALT[1]), (ALT[0], P[1]), ALT])
@pytest.mark.parametrize(("change_ip", "change_port"), [(False, False), (True, False), (False, True), (True, True)])
def test_change_request_answers_from_the_other_address(
    arrived_on: tuple[str, int], change_ip: bool, change_port: bool
) -> None:
    r = StunResponder(P, ALT)
    assert sorted(r.addresses()) == sorted([P, (P[0], ALT[1]), (ALT[0], P[1]), ALT])
    reply = r.handle(arrived_on, request(change_ip, change_port), SRC)
    assert reply is not None and reply.to == SRC
    ip = ({P[0], ALT[0]} - {arrived_on[0]}).pop() if change_ip else arrived_on[0]
    port = ({P[1], ALT[1]} - {arrived_on[1]}).pop() if change_port else arrived_on[1]
    assert reply.send_from == (ip, port)
    a = parsed(reply.payload).attributes
    other = (({P[0], ALT[0]} - {arrived_on[0]}).pop(), ({P[1], ALT[1]} - {arrived_on[1]}).pop())
    assert a["OTHER-ADDRESS"] == a["CHANGED-ADDRESS"] == other
    assert a["RESPONSE-ORIGIN"] == a["SOURCE-ADDRESS"] == (ip, port)
    assert a["XOR-MAPPED-ADDRESS"] == SRC


def test_change_request_without_a_second_address_is_error_420_to_the_source() -> None:
    r = StunResponder(P)
    for ci, cp in ((True, False), (False, True), (True, True)):
        reply = r.handle(P, request(ci, cp), SRC)
        assert reply is not None and reply.to == SRC and reply.send_from == P
        resp = stun.parse_response(reply.payload)
        assert resp.error is not None and resp.error[0] == 420 and "--stun-alt" in resp.error[1]
        assert resp.mapped is None


def test_classic_rfc3489_request_gets_its_128_bit_id_back_and_mapped_address_only() -> None:
    req = bytearray(request(change_port=True))
    req[4:8] = b"\x01\x02\x03\x04"  # no magic cookie: an RFC 3489 client (pynat, pystun)
    reply = StunResponder(P, ALT).handle(P, bytes(req), SRC)
    assert reply is not None and reply.send_from == (P[0], ALT[1])
    assert reply.payload[4:20] == bytes(req[4:20])
    a = parsed(reply.payload).attributes
    assert a["MAPPED-ADDRESS"] == SRC and "XOR-MAPPED-ADDRESS" not in a and a["CHANGED-ADDRESS"] == ALT


def _with_attr(msg: bytes, attr_type: int, value: bytes) -> bytes:
    attr = struct.pack("!HH", attr_type, len(value)) + value
    return msg[:2] + struct.pack("!H", len(msg) - 20 + len(attr)) + msg[4:] + attr


def test_an_address_named_inside_the_request_is_never_answered_to() -> None:
    """RFC 3489 RESPONSE-ADDRESS (0x0002) and RFC 5780 RESPONSE-PORT (0x0027) would let anyone aim the
    server at a victim: ignored, the answer goes to the source."""
    victim = struct.pack("!BBH4s", 0, 1, 53, socket.inet_aton("198.51.100.99"))
    for t, v in ((0x0002, victim), (0x0027, struct.pack("!HH", 53, 0))):
        reply = StunResponder(P, ALT).handle(P, _with_attr(request(), t, v), SRC)
        assert reply is not None and reply.to == SRC


@pytest.mark.parametrize("kind", [aioice_stun.Class.RESPONSE, aioice_stun.Class.ERROR, aioice_stun.Class.INDICATION])
def test_messages_that_are_not_binding_requests_are_dropped(kind: aioice_stun.Class) -> None:
    """A response or indication is never answered (two STUN servers cannot be made to ping-pong)."""
    r = StunResponder(P, ALT)
    attrs = {"ERROR-CODE": (400, "x")} if kind == aioice_stun.Class.ERROR else {}
    assert r.handle(P, bytes(aioice_stun.Message(aioice_stun.Method.BINDING, kind, attributes=attrs)), SRC) is None
    assert r.handle(P, bytes(aioice_stun.Message(aioice_stun.Method.ALLOCATE, aioice_stun.Class.REQUEST)), SRC) is None
    assert (r.answered, r.dropped) == (0, 2)


def test_truncated_wrong_cookie_and_garbage_are_dropped() -> None:
    r = StunResponder(P, ALT)
    req = request(True, True)
    for n in range(len(req)):
        assert r.handle(P, req[:n], SRC) is None
    bad_cookie_response = bytearray(bytes(aioice_stun.Message(aioice_stun.Method.BINDING, aioice_stun.Class.RESPONSE)))
    bad_cookie_response[4:8] = b"\xde\xad\xbe\xef"
    for junk in (
        bytes(bad_cookie_response),
        b"\x00" * 20 + b"\x00",
        b"\xff" * 40,
        req + b"\x00\x00\x00\x00",
        req[:2] + b"\x00\x40" + req[4:],
        b"\x00\x01" + b"\xff" * 600,
    ):
        assert r.handle(P, junk, SRC) is None
    assert r.answered == 0 and r.dropped == len(req) + 6
    assert r.handle(P, req, (SRC[0], 0)) is None  # port 0: nowhere to answer


@FAST
@given(st.binary(max_size=600), st.sampled_from([P, ALT]), st.booleans())
def test_arbitrary_bytes_never_raise_and_answer_only_the_source(data: bytes, on: tuple[str, int], alt: bool) -> None:
    r = StunResponder(P, ALT if alt else None)
    reply = r.handle(on, data, SRC)
    assert reply is None or reply.to == SRC
    assert r.answered + r.dropped == 1


@FAST
@given(
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
    st.integers(0, 64),
    st.binary(max_size=24),
)
def test_mutated_requests_never_raise(flips: list[tuple[int, int]], cut: int, tail: bytes) -> None:
    data = bytearray(_with_attr(request(True, True), 0x8022, b"p2pd-test"))
    for pos, val in flips:
        data[pos % len(data)] = val
    data = data[: len(data) - cut % 8] + tail
    r = StunResponder(P, ALT)
    reply = r.handle(P, bytes(data), SRC)
    assert reply is None or reply.to == SRC


def test_drops_are_logged_at_most_once_per_period(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    r = StunResponder(P, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="tracker.stun"):
        for _ in range(500):
            r.handle(P, b"\x00\x01junk-that-is-not-stun", SRC)
        now[0] += LOG_EVERY
        r.handle(P, b"\x00\x01junk-that-is-not-stun", SRC)
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "tracker.stun"]
    assert len(lines) == 2, lines
    assert "203.0.113.7:40000" in lines[0] and "and 499 more" in lines[1]
    assert r.dropped == 501


@pytest.mark.parametrize(
    ("primary", "alt", "why"),
    [
        (("0.0.0.0", 3478), ("192.0.2.2", 3479), "specific primary"),
        (P, ("0.0.0.0", 3479), "specific primary"),
        (P, (P[0], 3479), "both IP and port"),
        (P, (ALT[0], P[1]), "both IP and port"),
        (P, (ALT[0], 0), "not 0"),
        (("tracker.example", 3478), ALT, "IP address"),
    ],
)
def test_settings_that_cannot_classify_are_refused(primary: tuple[str, int], alt: tuple[str, int], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        check_settings(primary, alt)


@pytest.mark.parametrize(
    ("listen", "stun_flag", "alt", "message"),
    [
        ("0.0.0.0:7070", None, "127.0.0.2:3479", "specific primary"),
        ("127.0.0.1:0", None, "127.0.0.2:3479", "--listen port 0"),
        ("127.0.0.1:7070", None, "127.0.0.1:3479", "both IP and port"),
        ("127.0.0.1:7070", "nonsense", None, "--stun: expected HOST:PORT"),
        ("127.0.0.1:7070", None, "x", "--stun-alt: expected HOST:PORT"),
        ("127.0.0.1:7070", "off", "127.0.0.2:3479", "needs STUN on"),
    ],
)
def test_serve_refuses_bad_stun_flags_in_one_line(
    listen: str, stun_flag: str | None, alt: str | None, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import typer

    from tracker.cli import serve

    with pytest.raises(typer.Exit) as e:
        serve(listen=listen, stun=stun_flag, stun_alt=alt)
    assert e.value.exit_code == ErrorCode.BAD_REQUEST.exit_status
    err = capsys.readouterr().err
    assert message in err and err.startswith("p2p-tracker: error: ") and len(err.strip().splitlines()) == 1


# ---- real sockets on loopback ------------------------------------------------------------------------


async def udp_socket() -> trio.socket.SocketType:
    s = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await s.bind(("127.0.0.1", 0))
    return s


async def test_stun_shares_the_heartbeat_port_and_neither_disturbs_the_other() -> None:
    srv = TrackerServer(MemoryStore(0.5))
    async with trio.open_nursery() as n:
        tcp, udp = await n.start(srv.serve, "127.0.0.1", 0)
        assert srv.stun_advert() == ["127.0.0.1", udp]
        s = await udp_socket()
        for junk in (b"\x00\x01" + b"\x00" * 30, b"\x01\x01\x00\x00" + b"\x00" * 16, b"\xc1garbage", b""):
            await s.sendto(junk, ("127.0.0.1", udp))
        with trio.fail_after(5):
            assert await binding(s, ("127.0.0.1", udp)) == s.getsockname()
            async with TrackerClient([("127.0.0.1", tcp)], nid(1), ("127.0.0.1", 9001)) as tc:
                await tc.register()
                assert tc.stun_server == ("127.0.0.1", udp)
                await tc.beat({})
                assert tc.udp_heartbeats == 1  # the heartbeat went over the shared UDP port
            verdict = await classify(s, ("127.0.0.1", udp))
        assert verdict.nat_type is NatType.UNKNOWN and "no second address" in verdict.reason
        assert verdict.mapped == s.getsockname()
        assert srv.metrics.udp_rejected >= 1  # the non-STUN garbage
        assert srv.stun is not None and srv.stun.responder.dropped == 2 and srv.stun.responder.answered >= 2
        assert "p2p_tracker_stun_dropped_total 2" in srv.metrics.render({})
        n.cancel_scope.cancel()


async def test_classification_with_a_second_address_and_a_dedicated_port() -> None:
    primary, alt = ("127.0.0.1", free_port()), ("127.0.0.2", free_port())
    srv = TrackerServer(MemoryStore(0.5), stun=StunSettings(listen=primary, alt=alt))
    async with trio.open_nursery() as n:
        tcp, udp = await n.start(srv.serve, "127.0.0.1", 0)
        assert srv.stun_advert() == list(primary) and udp != primary[1]
        s = await udp_socket()
        with trio.fail_after(10):
            verdict = await classify(s, primary)
        assert verdict.nat_type is NatType.OPEN, verdict.reason
        assert verdict.mapped == s.getsockname()
        n.cancel_scope.cancel()


async def test_stun_off_offers_nothing() -> None:
    srv = TrackerServer(MemoryStore(0.5), stun=None)
    async with trio.open_nursery() as n:
        tcp, _ = await n.start(srv.serve, "127.0.0.1", 0)
        async with TrackerClient([("127.0.0.1", tcp)], nid(1), ("127.0.0.1", 9001)) as tc:
            r = await tc.register()
            assert r["stun"] is None and tc.stun_server is None
        n.cancel_scope.cancel()


async def test_monitor_reports_through_registration_and_peers_carry_it() -> None:
    """NatMonitor -> TrackerClient.update_nat -> register -> registry: node list and peer lists."""
    alt = ("127.0.0.2", free_port())
    tport = free_port()
    store = MemoryStore(0.5)
    srv = TrackerServer(store, stun=StunSettings(alt=alt))
    async with trio.open_nursery() as n:
        await n.start(srv.serve, "127.0.0.1", tport)
        trackers = [("127.0.0.1", tport)]
        async with (
            TrackerClient(trackers, nid(1), ("127.0.0.1", 9001)) as tc,
            TrackerClient(trackers, nid(2), ("127.0.0.1", 9002)) as other,
        ):
            await tc.register()
            mon = NatMonitor(("127.0.0.1", 0), check_every=0.05)

            async def report(st: Any) -> bool:
                await tc.update_nat(st.registration())
                return True

            await n.start(mon.run, lambda: tc.stun_server, report)
            with trio.fail_after(10):
                while tc.nat is None:
                    await trio.sleep(0.02)
            assert mon.status.nat_type is NatType.OPEN and mon.status.state == "done"
            mapped = mon.status.mapped
            assert mapped is not None and mapped[0] == "127.0.0.1"
            node = store.reg.nodes[nid(1)]
            assert (node.nat_type, node.mapped) == ("open", mapped)
            aid = await tc.publish("nat-test:v1", make_manifest(1))
            await tc.heartbeat({aid: 1.0})
            await other.register()
            (peer,) = await other.peers(aid)
            assert peer["nat_type"] == "open" and peer["mapped"] == list(mapped)
            # the report survives a tracker that forgets the node: the next registration carries it
            store.reg.leave(nid(1))
            await tc.heartbeat({aid: 1.0})  # known: false -> registers again
            assert store.reg.nodes[nid(1)].nat_type == "open"
            n.cancel_scope.cancel()


async def test_monitor_classifies_again_when_the_mapping_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    srv = TrackerServer(MemoryStore(0.5), stun=StunSettings(alt=("127.0.0.2", free_port())))
    tport = free_port()
    reports: list[Any] = []
    async with trio.open_nursery() as n:
        await n.start(srv.serve, "127.0.0.1", tport)
        mon = NatMonitor(("127.0.0.1", 0), check_every=0.05, reclassify_every=3600)

        async def report(st: Any) -> bool:
            reports.append(st.registration())
            return True

        await n.start(mon.run, lambda: ("127.0.0.1", tport), report)
        with trio.fail_after(10):
            while mon.classifications < 1 or not reports:
                await trio.sleep(0.02)
            await trio.sleep(0.3)
            assert mon.classifications == 1  # cheap Binding checks meanwhile, no new classification

            async def moved(*args: Any, **kw: Any) -> tuple[str, int]:
                return ("198.51.100.1", 1)  # as if the NAT had given us a new mapping

            monkeypatch.setattr("p2pd.nat_detect.binding", moved)
            while mon.classifications < 2:
                await trio.sleep(0.02)
        assert len(reports) == 1  # the new classification found the same verdict: nothing to report
        n.cancel_scope.cancel()


# ---- both stores keep what nodes report --------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, cluster: LocalCluster) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore(0.5)
        return
    from tracker.redis_store import RedisStore

    s = await RedisStore.connect(start_redis(cluster).url, 0.5)
    try:
        yield s
    finally:
        await s.aclose()


async def test_stores_keep_nat_type_and_mapped_address(store: Store) -> None:
    A = "c" * 64
    await store.register(nid(1), "10.0.0.1", 7001, {}, "0.1.0", nat=("symmetric", ("203.0.113.5", 40123)))
    await store.register(nid(2), "10.0.0.2", 7002, {}, "0.1.0")  # an older node: reports nothing
    await store.register(nid(3), "10.0.0.3", 7003, {}, "0.1.0", nat=("udp-blocked", None))
    await store.heartbeat_many([Heartbeat(nid(i), {A: 1.0}) for i in (1, 2, 3)])
    nodes = {x["node_id"]: x for x in await store.node_list(10)}
    assert (nodes[nid(1)]["nat_type"], nodes[nid(1)]["mapped"]) == ("symmetric", ["203.0.113.5", 40123])
    assert (nodes[nid(2)]["nat_type"], nodes[nid(2)]["mapped"]) == ("unknown", None)
    assert (nodes[nid(3)]["nat_type"], nodes[nid(3)]["mapped"]) == ("udp-blocked", None)
    peers = {p["node_id"]: p for p in await store.peers(A, nid(9), 10)}
    assert (peers[nid(1)]["nat_type"], peers[nid(1)]["mapped"]) == ("symmetric", ["203.0.113.5", 40123])
    assert (peers[nid(3)]["nat_type"], peers[nid(3)]["mapped"]) == ("udp-blocked", None)
    assert "nat_type" not in peers[nid(2)] and "mapped" not in peers[nid(2)]  # optional: absent = not reported
    # registering again without a report forgets the old one (it may be stale)
    await store.register(nid(1), "10.0.0.1", 7001, {}, "0.1.0")
    nodes = {x["node_id"]: x for x in await store.node_list(10)}
    assert (nodes[nid(1)]["nat_type"], nodes[nid(1)]["mapped"]) == ("unknown", None)


@pytest.mark.parametrize(
    ("nat", "message"),
    [
        ("open", "must be a map"),
        ({"type": "Open Internet"}, "short lowercase name"),
        ({"type": 3}, "short lowercase name"),
        ({"type": "open", "mapped": ["host.example", 7000]}, "must be an IP address"),
        ({"type": "open", "mapped": ["10.0.0.1", 0]}, "1..65535"),
        ({"type": "open", "mapped": "10.0.0.1:7000"}, "[host, port]"),
    ],
)
async def test_register_refuses_a_malformed_nat_report(nat: Any, message: str) -> None:
    srv = TrackerServer(MemoryStore(0.5), stun=None)
    async with trio.open_nursery() as n:
        tcp, _ = await n.start(srv.serve, "127.0.0.1", 0)
        async with TrackerClient([("127.0.0.1", tcp)], nid(1), ("127.0.0.1", 9001)) as tc:
            tc.nat = nat
            with pytest.raises(RpcError) as e:
                await tc.register()
            assert e.value.code == ErrorCode.BAD_REQUEST and message in e.value.message
        n.cancel_scope.cancel()


# ---- processes: p2p-tracker serve --stun-alt, p2pd run, p2pd status, admin nodes --------------------


def test_daemon_reports_its_nat_to_status_and_admin_nodes(cluster: LocalCluster, tmp_path: Path) -> None:
    token = "t0ken"
    tport, alt = free_port(), ("127.0.0.2", free_port())
    tracker = cluster.start_tracker(
        "--stun-alt",
        f"{alt[0]}:{alt[1]}",
        "--admin-listen",
        "127.0.0.1:0",
        "--admin-token",
        token,
        port=tport,
        interval=0.5,
    )
    assert tracker.info["stun"] == ["127.0.0.1", tport]
    data = tmp_path / "node"
    cluster.spawn_node("p2pd", data_dir=data)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    deadline = time.monotonic() + 30
    nat: dict[str, Any] = {}
    while time.monotonic() < deadline:
        cp = subprocess.run(
            [sys.executable, "-m", "p2pd.cli", "status", "--json", "--data-dir", str(data)],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=30,
        )
        if cp.returncode == 0:
            nat = json.loads(cp.stdout)["nat"]
            if nat["state"] == "done":
                break
        time.sleep(0.2)
    assert nat.get("type") == "open", nat
    listen_port = int(json.loads(cp.stdout)["listen"].rsplit(":", 1)[1])
    assert nat["mapped"] == ["127.0.0.1", listen_port]  # the UDP twin of the peer port
    human = subprocess.run(
        [sys.executable, "-m", "p2pd.cli", "status", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=30,
    ).stdout
    assert f"NAT: open; public address 127.0.0.1:{listen_port}" in human
    admin = [
        sys.executable,
        "-m",
        "tracker.cli",
        "admin",
        "nodes",
        "--tracker",
        f"http://127.0.0.1:{tracker.admin_port}",
        "--token",
        token,
    ]
    deadline = time.monotonic() + 10
    while True:
        nodes = json.loads(
            subprocess.run(
                [*admin, "--json"], capture_output=True, text=True, env=env, cwd=REPO, timeout=30, check=True
            ).stdout
        )["nodes"]
        if nodes and nodes[0]["nat_type"] == "open" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    (node,) = nodes
    assert node["nat_type"] == "open" and node["mapped"] == ["127.0.0.1", listen_port]
    assert node["addr"] == ["127.0.0.1", listen_port]
    table = subprocess.run(admin, capture_output=True, text=True, env=env, cwd=REPO, timeout=30, check=True).stdout
    assert "open" in table and f"127.0.0.1:{listen_port}" in table and "mapped" in table
