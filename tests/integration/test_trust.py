"""Issue #14, identity rows, as the attacker of the issue ran them: real tracker and daemons on loopback.

The attacker is this test process: a host that reaches the ports (rows 3 and 10), or a cluster member
with the join secret and a key of its own (row 2). Each attack first tries what worked on the old
code, then what a motivated attacker would try against the new one; none may reach what it wants,
each refusal is in the victim's log, and the real nodes keep working afterwards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio

from p2pd.cluster import LocalCluster
from p2pd.errors import ErrorCode
from p2pd.protocol import auth, wire
from p2pd.protocol.auth import ClusterSecret, Identity, NodeKey
from p2pd.rpc import RpcError, connect_tcp
from p2pd.tracker_client import TrackerClient

HOST = "127.0.0.1"


def member(cluster: LocalCluster) -> Identity:
    """A new node of this cluster (it knows the join secret, its key is its own)."""
    assert cluster.join_secret_file is not None
    return Identity(NodeKey.from_seed(os.urandom(32)), ClusterSecret(cluster.join_secret_file.read_bytes().strip()))


def artifact(tmp_path: Path) -> Path:
    src = tmp_path / "model"
    src.mkdir()
    (src / "weights.bin").write_bytes(os.urandom(3 << 20))
    return src


async def holders(cluster: LocalCluster, aid: str) -> list[str]:
    me = member(cluster)
    async with TrackerClient([cluster.tracker.address], me.node_id, (HOST, 9), identity=me) as tc:
        await tc.register()
        return [p["node_id"] for p in await tc.peers(aid)]


async def test_row3_spoofed_heartbeat_leave_register_are_refused_and_logged(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    seed = await cluster.start_node_async("seed")
    src = artifact(tmp_path)
    aid = await cluster.publish_async(seed, src, "m:v1")
    seed_id = (await seed.call("status"))["node_id"]
    with trio.fail_after(10):
        while await holders(cluster, aid) != [seed_id]:
            await trio.sleep(0.1)
    impostor = member(cluster)  # even a member cannot speak for another node
    async with connect_tcp(HOST, cluster.tracker.port) as c:
        spoofs = [
            ("heartbeat", {"node_id": seed_id, "holdings": {}}),  # what the issue sent: every holder vanished
            ("leave", {"node_id": seed_id}),
            ("register", {"node_id": seed_id, "addr": [HOST, 9], "labels": {}, "version": "x"}),
        ]
        for method, params in spoofs:
            with pytest.raises(RpcError) as e:
                await c.call(method, params)
            assert e.value.code is ErrorCode.UNAUTHORIZED, (method, e.value)
        # with the tracker's challenge, its own key and the join secret, still not the seed's id
        nonce = (await c.call("challenge", {}))["nonce"]
        eph = os.urandom(32)
        t = auth.register_transcript(nonce, seed_id, impostor.key.public, eph, HOST, 9)
        assert impostor.cluster is not None
        forged = {
            "key": impostor.key.public,
            "eph": eph,
            "proof": impostor.key.sign(t),
            "member": impostor.cluster.mac(t),
        }
        with pytest.raises(RpcError, match="not that node id's"):
            await c.call("register", {**spoofs[2][1], **forged})
        # and the outsider connection may not resolve names either (row 10)
        with pytest.raises(RpcError, match="only registered cluster members") as e:
            await c.call("resolve", {"name": "m:v1"})
        assert e.value.code is ErrorCode.UNAUTHORIZED
    assert await holders(cluster, aid) == [seed_id]  # the seed is still listed, at its own address
    log = cluster.tracker.process.log_text()
    for what in ("refused heartbeat", "refused leave", "refused registration", "refused resolve"):
        assert what in log, what
    leech = await cluster.start_node_async("leech")
    with trio.fail_after(120):
        got = await cluster.fetch_async(leech, "m:v1")
    assert (got / "weights.bin").read_bytes() == (src / "weights.bin").read_bytes()  # a new fetch finds the seed


async def session_as(port: int, aid: str, me: Identity | None, claimed: str, *, version: int) -> set[str]:
    """Dial a daemon's peer port claiming `claimed`'s id; the message types it sent before it closed.

    `me` None: the old protocol (version 1, no key). Else `me`'s key is presented, nonces signed with it
    and the join secret's MAC added (when `me` holds it): all an attacker can do without `claimed`'s key."""
    got: set[str] = set()
    stream = await trio.open_tcp_stream(HOST, port)
    async with stream:
        nonce = os.urandom(auth.NONCE_SIZE)
        key = me.key.public if me is not None else b""
        await stream.send_all(wire.encode(wire.Handshake(version, claimed, aid, key, nonce)))
        dec = wire.FrameDecoder(1 << 24)
        with trio.move_on_after(5):
            while True:
                try:
                    data = await stream.receive_some(1 << 16)
                except trio.BrokenResourceError:
                    break
                if not data:
                    break
                for m in dec.feed(data):
                    got.add(type(m).__name__)
                    if isinstance(m, wire.Handshake) and me is not None:
                        t = auth.handshake_transcript(aid, claimed, nonce, m.node_id, m.nonce)
                        mac = me.cluster.mac(t) if me.cluster is not None else b""
                        await stream.send_all(wire.encode(wire.Auth(me.key.sign(t), mac)))
                    if isinstance(m, wire.Handshake) and me is None:  # the old protocol: a session now
                        await stream.send_all(wire.encode(wire.Bitfield(b"\x00")))
    return got


async def test_row2_and_row10_nobody_uses_another_nodes_id_or_reaches_the_peer_port_without_membership(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    seed, leech = await cluster.start_node_async("seed"), await cluster.start_node_async("leech")
    aid = await cluster.publish_async(seed, artifact(tmp_path), "m:v1")
    leech_id = (await leech.call("status"))["node_id"]
    insider = member(cluster)
    outsider = Identity(NodeKey.from_seed(os.urandom(32)), None)
    attempts = [
        (None, leech_id, 1),  # the old handshake, as the attacker sent it
        (insider, leech_id, wire.PROTOCOL_VERSION),  # a member presenting its own key under the leech's id
        (outsider, outsider.node_id, wire.PROTOCOL_VERSION),  # row 10: an outsider with its own id and key
    ]
    for me, claimed, version in attempts:
        got = await session_as(seed.port, aid, me, claimed, version=version)
        assert "Bitfield" not in got, (me, got)  # never a session: no piece can be asked for
    log = seed.log_text()
    assert "not a member of this cluster" in log and "not its own" in log
    ok = await session_as(seed.port, aid, insider, insider.node_id, version=wire.PROTOCOL_VERSION)
    assert "Bitfield" in ok  # a member under its own id is served: the refusals above are about identity
    with trio.fail_after(120):
        fetched = await cluster.fetch_async(leech, "m:v1")  # the real leech was neither replaced nor banned
    assert (fetched / "weights.bin").stat().st_size == 3 << 20


async def test_row1_a_tag_moves_only_by_its_owner(cluster: LocalCluster, tmp_path: Path) -> None:
    a = await cluster.start_node_async("a")
    b = await cluster.start_node_async("b")
    c = await cluster.start_node_async("c")
    (tmp_path / "a").mkdir()
    src_a = artifact(tmp_path / "a")
    (tmp_path / "b").mkdir()
    src_b = artifact(tmp_path / "b")
    await cluster.publish_async(a, src_a, "m:v1")
    r = await cluster.cli_async(b, "publish", str(src_b), "--name", "m:v1")  # the attack
    assert r.returncode != 0 and b"belongs to node" in r.stderr, r.stderr
    a_id = (await a.call("status"))["node_id"]
    assert f"node {a_id[:8]}".encode() in r.stderr
    assert "refused publish" in cluster.tracker.process.log_text()
    with trio.fail_after(120):
        got = await cluster.fetch_async(c, "m:v1")
    assert (got / "weights.bin").read_bytes() == (src_a / "weights.bin").read_bytes()  # A's bytes, not B's
    await cluster.publish_async(a, src_b, "m:v1")  # the owner moves its own tag


async def test_row1_publishers_file_scopes_names_to_nodes(cluster: LocalCluster, tmp_path: Path) -> None:
    from p2pd.identity import load_node_key

    team_dir = cluster.work / "team"
    team_dir.mkdir()
    team_id = load_node_key(team_dir).node_id  # the key the node will find at its first start
    scopes = tmp_path / "publishers.json"
    scopes.write_text(json.dumps({"publishers": [{"name": "ml-team", "node": team_id, "prefixes": ["models/"]}]}))
    t2 = await cluster.start_tracker_async("--publishers", str(scopes), name="scoped")
    team = await cluster.start_node_async("team", data_dir=team_dir, tracker=t2.addr)
    other = await cluster.start_node_async("other", tracker=t2.addr)
    src = artifact(tmp_path)
    await cluster.publish_async(team, src, "models/x:v1")
    for node, name in ((team, "envs/x:v1"), (other, "models/y:v1")):
        r = await cluster.cli_async(node, "publish", str(src), "--name", name)
        assert r.returncode != 0 and b"gives it no prefix of that name" in r.stderr, (name, r.stderr)
