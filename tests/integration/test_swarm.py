"""Loopback swarms with real daemons: correctness, resume, failures, throttling."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from p2pd.cluster import LocalCluster, Node, scratch_dir
from p2pd.demo import generate_model
from tests.integration.helpers import member_identity, sha256_tree, wait_until

GiB = 1 << 30
MiB = 1 << 20


def make_file(path: Path, size: int, seed: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(MiB)
    with open(path, "wb") as fh:
        i = 0
        while size > 0:
            n = min(MiB, size)
            fh.write(i.to_bytes(8, "little") + bytes([seed]) + block[9:n] if n > 9 else block[:n])
            size -= n
            i += 1
    return path


@pytest.fixture
def bigdir() -> Iterator[Path]:
    with scratch_dir(11 * GiB, prefix="p2pd-test-") as d:
        yield d


@pytest.mark.slow
async def test_one_seed_four_peers_2gib_identical(bigdir: Path) -> None:
    """1 seed + 4 peers, several files totalling > 2 GiB: every copy identical (hashlib sha256)."""
    with LocalCluster(bigdir) as c:
        c.start_tracker()
        src = bigdir / "src" / "model"
        generate_model(src, 2 * GiB + 3 * MiB + 12345)
        (src / "empty.txt").write_bytes(b"")
        seed = await c.start_node_async("seed")
        peers = [await c.start_node_async(f"peer{i}") for i in range(4)]
        await c.publish_async(seed, src, "model:v1")
        paths: dict[str, Path] = {}

        async def one(p: Node) -> None:
            paths[p.name] = await c.fetch_async(p, "model:v1", timeout=600)

        t0 = time.monotonic()
        async with trio.open_nursery() as n:
            for p in peers:
                n.start_soon(one, p)
        elapsed = time.monotonic() - t0
        expected = sha256_tree(src)
        assert len(expected) >= 4
        for name, path in paths.items():
            assert sha256_tree(path) == expected, f"{name} differs"
        seed_art = (await seed.call("status"))["artifacts"][0]
        size = seed_art["size"]
        print(f"4 peers x {size / 1e9:.2f} GB in {elapsed:.1f} s; seed uploaded {seed_art['uploaded'] / size:.2f} F")


async def test_kill9_resume_refetches_only_in_flight(cluster: LocalCluster, workdir: Path) -> None:
    src = make_file(workdir / "src" / "weights.bin", 256 * MiB)
    seed = await cluster.start_node_async("seed", "--egress-limit", "40MB/s")
    leech = await cluster.start_node_async("leech", "--pipeline", "4")
    aid = await cluster.publish_async(seed, src, "weights:v1")

    async with trio.open_nursery() as n:
        n.start_soon(cluster.cli_async, leech, "fetch", "weights:v1")

        async def progressed() -> int:
            a = await leech.artifact(aid)
            return a["pieces_done"] if a and a["pieces_done"] >= a["pieces_total"] * 0.4 else 0

        seen = await wait_until(progressed, 60, 0.05, "40% downloaded")
        cluster.kill_node(leech)
        n.cancel_scope.cancel()
    await cluster.restart_node_async(leech)
    a = await leech.artifact(aid)
    assert a is not None
    total, piece = a["pieces_total"], a["size"] / a["pieces_total"]
    resumed = a["resumed_pieces"]
    in_flight_max = 4 + 8  # pipeline depth + verify queue: pieces received but not yet on disk
    assert resumed >= seen, f"journal lost verified pieces: resumed {resumed} < seen {seen}"
    path = await cluster.fetch_async(leech, "weights:v1")
    a = await leech.artifact(aid)
    assert a is not None
    fetched_after = a["downloaded"] / piece  # in pieces
    assert fetched_after <= total - resumed + in_flight_max, (fetched_after, resumed)
    assert sha256_tree(path) == sha256_tree(src)
    print(f"killed at >= {seen} pieces, resumed with {resumed}, fetched {fetched_after:.0f} more of {total}")


async def test_non_seed_source_killed_others_complete(cluster: LocalCluster, workdir: Path) -> None:
    """The seed is slow (egress cap) so peers feed each other; killing one of them must not stall the rest."""
    src = make_file(workdir / "src" / "blob.bin", 192 * MiB)
    seed = await cluster.start_node_async("seed", "--egress-limit", "60MB/s")
    peers = [await cluster.start_node_async(f"p{i}") for i in range(3)]
    aid = await cluster.publish_async(seed, src, "blob:v1")
    paths: dict[str, Path] = {}

    async def one(node: Node) -> None:
        paths[node.name] = await cluster.fetch_async(node, "blob:v1")

    async with trio.open_nursery() as n:
        n.start_soon(one, peers[1])
        n.start_soon(one, peers[2])
        n.start_soon(cluster.cli_async, peers[0], "fetch", "blob:v1")

        async def uploading() -> bool:
            a = await peers[0].artifact(aid)
            return bool(a and a["uploaded"] > 8 * MiB and a["pieces_done"] < a["pieces_total"] * 0.8)

        await wait_until(uploading, 60, 0.05, "peer 0 serving others")
        cluster.kill_node(peers[0])
    want = sha256_tree(src)
    for name, p in paths.items():
        assert sha256_tree(p) == want, name


async def test_corrupt_source_is_banned_and_result_identical(cluster: LocalCluster, workdir: Path) -> None:
    good_src = make_file(workdir / "good" / "w.bin", 96 * MiB)
    bad_src = workdir / "bad" / "w.bin"
    bad_src.parent.mkdir()
    bad_src.write_bytes(good_src.read_bytes())
    good = await cluster.start_node_async("good", "--egress-limit", "30MB/s")
    bad = await cluster.start_node_async("bad")
    leech = await cluster.start_node_async("leech")
    aid = await cluster.publish_async(good, good_src, "w:v1")
    assert await cluster.publish_async(bad, bad_src, "w:v1") == aid
    with open(bad_src, "r+b") as fh:  # bit rot on the bad node after it published: every piece is wrong
        for off in range(0, 96 * MiB, MiB):
            fh.seek(off + 1000)
            fh.write(b"\xff\x00\xff")
    path = await cluster.fetch_async(leech, "w:v1")
    assert sha256_tree(path) == sha256_tree(good_src)
    a = await leech.artifact(aid)
    assert a is not None and a["banned_peers"] == 1
    assert "fails verification" in leech.log_text()


async def test_stalled_peer_dropped_within_about_a_second(cluster: LocalCluster, workdir: Path) -> None:
    src = make_file(workdir / "src" / "s.bin", 128 * MiB)
    a_seed = await cluster.start_node_async("a", "--egress-limit", "40MB/s")
    b_seed = await cluster.start_node_async("b", "--egress-limit", "40MB/s")
    leech = await cluster.start_node_async("leech")
    aid = await cluster.publish_async(a_seed, src, "s:v1")
    await cluster.publish_async(b_seed, src, "s:v1")
    async with trio.open_nursery() as n:
        n.start_soon(cluster.fetch_async, leech, "s:v1")

        async def two_peers() -> bool:
            a = await leech.artifact(aid)
            return bool(a and a["peers"] == 2 and a["pieces_done"] > 10)

        await wait_until(two_peers, 30, 0.05, "two peers")
        b_seed.process.signal(signal.SIGSTOP)
        t0 = time.monotonic()

        async def one_peer() -> bool:
            a = await leech.artifact(aid)
            return bool(a and (a["peers"] == 1 or a["state"] == "complete"))

        await wait_until(one_peer, 10, 0.05, "stalled peer dropped")
        dropped_after = time.monotonic() - t0
    b_seed.process.signal(signal.SIGCONT)
    assert "stalled" in leech.log_text()
    assert dropped_after < 2.5, dropped_after
    art = await leech.artifact(aid)
    assert art is not None
    assert sha256_tree(Path(art["path"])) == sha256_tree(src)


async def test_egress_limit_50MBps_within_10_percent(cluster: LocalCluster, workdir: Path) -> None:
    src = make_file(workdir / "src" / "r.bin", 400 * MiB)
    seed = await cluster.start_node_async("seed", "--egress-limit", "50MB/s")
    leech = await cluster.start_node_async("leech")
    aid = await cluster.publish_async(seed, src, "r:v1")
    samples: list[tuple[float, int]] = []
    async with trio.open_nursery() as n:
        n.start_soon(cluster.fetch_async, leech, "r:v1")
        while True:
            a = await leech.artifact(aid)
            if a is not None:
                samples.append((time.monotonic(), a["bytes_done"]))
                if a["state"] == "complete":
                    break
            await trio.sleep(0.05)
    size = 400 * MiB
    lo = next(s for s in samples if s[1] >= 0.1 * size)
    hi = next(s for s in samples if s[1] >= 0.9 * size)
    rate = (hi[1] - lo[1]) / (hi[0] - lo[0])
    print(f"measured {rate / 1e6:.1f} MB/s with --egress-limit 50MB/s")
    assert 45e6 <= rate <= 55e6, rate


async def test_sigterm_says_goodbye_and_journal_survives(cluster: LocalCluster, workdir: Path) -> None:
    src = make_file(workdir / "src" / "g.bin", 128 * MiB)
    seed = await cluster.start_node_async("seed", "--egress-limit", "30MB/s")
    leech = await cluster.start_node_async("leech")
    aid = await cluster.publish_async(seed, src, "g:v1")
    async with trio.open_nursery() as n:
        n.start_soon(cluster.cli_async, leech, "fetch", "g:v1")

        async def some() -> int:
            a = await leech.artifact(aid)
            return a["pieces_done"] if a and a["pieces_done"] > 20 else 0

        seen = await wait_until(some, 30, 0.05, "some progress")
        t0 = time.monotonic()
        cluster.stop_node(leech)
        stop_s = time.monotonic() - t0
        n.cancel_scope.cancel()
    assert leech.process.returncode == 0, leech.log_text()[-2000:]
    assert stop_s < 5
    assert "goodbye" in leech.log_text()
    await cluster.restart_node_async(leech)
    a = await leech.artifact(aid)
    assert a is not None and a["resumed_pieces"] >= seen


async def test_bad_requests_get_clear_errors(cluster: LocalCluster, workdir: Path) -> None:
    node = await cluster.start_node_async("n")
    r = await cluster.cli_async(node, "fetch", "no-such-model:v9")
    assert r.returncode == 3 and b"not published" in r.stderr and b"Traceback" not in r.stderr  # NOT_FOUND
    r = await cluster.cli_async(node, "fetch", "bad name")
    assert r.returncode == 2 and b"invalid name" in r.stderr  # BAD_REQUEST
    r = await cluster.cli_async(node, "publish", str(workdir / "missing"), "--name", "x:1")
    assert r.returncode == 2 and b"does not exist" in r.stderr
    r = await cluster.cli_async(node, "status", "--socket", str(workdir / "nope.sock"))
    assert r.returncode == 4 and b"cannot reach the p2pd daemon" in r.stderr  # UNREACHABLE


async def test_garbage_on_peer_port_closes_only_that_connection(cluster: LocalCluster, workdir: Path) -> None:
    src = make_file(workdir / "src" / "x.bin", 32 * MiB)
    seed = await cluster.start_node_async("seed")
    leech = await cluster.start_node_async("leech")
    await cluster.publish_async(seed, src, "x:v1")
    for payload in (b"\x00\x00\x00\x05\x63hello", b"\xff" * 64, b"\x00\x10\x00\x00\x01" + b"x" * 100):
        s = trio.socket.socket()
        await s.connect(("127.0.0.1", seed.port))
        await s.send(payload)
        with trio.fail_after(10):
            while await s.recv(4096):
                pass
        s.close()
    path = await cluster.fetch_async(leech, "x:v1")
    assert sha256_tree(path) == sha256_tree(src)
    assert seed.process.alive()


@contextlib.contextmanager
def small_tmpfs(workdir: Path, cluster: LocalCluster) -> Iterator[Path]:
    """A 160 MiB tmpfs (a disk that fills up), unmounted afterwards; skips the test without root."""
    mnt = workdir / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"needs root to mount a small tmpfs: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        cluster.close()
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_disk_full_is_a_clear_error_and_nothing_marked_complete(cluster: LocalCluster, workdir: Path) -> None:
    with small_tmpfs(workdir, cluster) as mnt:
        src = make_file(workdir / "src" / "big.bin", 96 * MiB)
        seed = await cluster.start_node_async("seed")
        await cluster.publish_async(seed, src, "big:v1")
        filler = mnt / "filler"
        make_file(filler, 100 * MiB)
        node = await cluster.start_node_async("small", data_dir=mnt / "node")
        res = await cluster.cli_async(node, "fetch", "big:v1")
        assert res.returncode == 5  # DISK_FULL
        assert b"not enough disk space" in res.stderr and b"Traceback" not in res.stderr, res.stderr
        assert not list((node.data_dir / "artifacts").glob("*.json"))  # nothing marked complete
        filler.unlink()
        path = await cluster.fetch_async(node, "big:v1")
        assert sha256_tree(path) == sha256_tree(src)


async def test_disk_full_mid_transfer_stops_cleanly_and_a_later_fetch_resumes(
    cluster: LocalCluster, workdir: Path
) -> None:
    """The space check passed, then something else filled the disk: a clear error, the daemon lives on,
    nothing is marked complete, and once space is freed the next fetch resumes from the verified pieces."""
    with small_tmpfs(workdir, cluster) as mnt:
        src = make_file(workdir / "src" / "mid.bin", 96 * MiB)
        seed = await cluster.start_node_async("seed", "--egress-limit", "16MB/s")
        aid = await cluster.publish_async(seed, src, "mid:v1")
        node = await cluster.start_node_async("small", data_dir=mnt / "node")
        results: list[subprocess.CompletedProcess[bytes]] = []
        async with trio.open_nursery() as n:

            async def fetch() -> None:
                results.append(await cluster.cli_async(node, "fetch", "mid:v1"))

            n.start_soon(fetch)

            async def started() -> bool:
                a = await node.artifact(aid)
                return bool(a and a["pieces_done"] >= 2)

            await wait_until(started, 30, 0.05, "transfer started")
            filler = mnt / "filler"
            with open(filler, "wb") as f:  # take every byte left: the next piece write hits ENOSPC
                try:
                    while True:
                        f.write(b"\0" * MiB)
                        f.flush()
                except OSError:
                    pass
        res = results[0]
        assert res.returncode == 5  # DISK_FULL: the swarm keeps the code of its failure
        assert b"disk full" in res.stderr and b"Traceback" not in res.stderr, res.stderr
        assert node.process.alive(), "the daemon must survive a full disk"
        assert not list((node.data_dir / "artifacts").glob("*.json"))  # nothing marked complete
        filler.unlink()
        path = await cluster.fetch_async(node, "mid:v1")
        assert sha256_tree(path) == sha256_tree(src)
        log = node.log_text()
        assert "retrying the download that stopped" in log
        assert "resuming with" in log  # the pieces verified before the disk filled were kept


async def test_tracker_restart_transfers_continue_and_nodes_reregister(cluster: LocalCluster, workdir: Path) -> None:
    from p2pd.tracker_client import TrackerClient

    src = make_file(workdir / "src" / "t.bin", 128 * MiB)
    seed = await cluster.start_node_async("seed", "--egress-limit", "40MB/s")
    leech = await cluster.start_node_async("leech")
    aid = await cluster.publish_async(seed, src, "t:v1")
    port = cluster.tracker.port
    async with trio.open_nursery() as n:
        n.start_soon(cluster.fetch_async, leech, "t:v1")

        async def started() -> bool:
            a = await leech.artifact(aid)
            return bool(a and a["pieces_done"] > 5)

        await wait_until(started, 30, 0.05, "transfer started")
        cluster.tracker.process.kill()
        before = (await leech.artifact(aid))["pieces_done"]  # type: ignore[index]
        await trio.sleep(1.5)
        during = (await leech.artifact(aid))["pieces_done"]  # type: ignore[index]
        assert during > before, "transfer stalled while the tracker was down"
        await cluster.start_tracker_async(port=port)
        t0 = time.monotonic()
        me = member_identity(cluster)  # the cluster is secured: only members may ask for peers
        async with TrackerClient([("127.0.0.1", port)], me.node_id, ("127.0.0.1", 1), identity=me) as tc:

            async def both_known() -> bool:
                return len(await tc.peers(aid)) == 2

            await wait_until(both_known, 10, 0.1, "nodes re-registered")
            print(f"re-registered {time.monotonic() - t0:.2f} s after the tracker restart")
            assert time.monotonic() - t0 < 2 * 1.0 + 1.0

            async def name_back() -> bool:
                try:
                    return (await tc.resolve("t:v1"))[0] == aid
                except Exception:  # not_found until the seed gives the name back
                    return False

            await wait_until(name_back, 5, 0.1, "the seed to give the name back")
    assert sha256_tree(Path((await leech.artifact(aid))["path"])) == sha256_tree(src)  # type: ignore[index]


async def test_several_complete_nodes_never_send_requesters_back_and_forth(
    cluster: LocalCluster, workdir: Path
) -> None:
    """Two seeds plus a node that completed earlier: newcomers must still be served promptly."""
    src = make_file(workdir / "src" / "m.bin", 64 * MiB)
    a = await cluster.start_node_async("a")
    b = await cluster.start_node_async("b")
    aid = await cluster.publish_async(a, src, "m:v1")
    await cluster.publish_async(b, src, "m:v1")
    first = await cluster.start_node_async("first")
    await cluster.fetch_async(first, "m:v1", timeout=60)
    late = [await cluster.start_node_async(f"late{i}") for i in range(2)]
    t0 = time.monotonic()
    async with trio.open_nursery() as n:
        for node in late:
            n.start_soon(functools.partial(cluster.fetch_async, node, "m:v1", timeout=60))
    assert time.monotonic() - t0 < 30
    for node in late:
        art = await node.artifact(aid)
        assert art is not None and art["state"] == "complete"


async def test_chain_passes_every_piece_along_one_chain(cluster: LocalCluster, workdir: Path) -> None:
    """--chain: three nodes released at once each fetch everything from one predecessor (the ring by node id, cut
    at the seed), so the seed sends about one copy, two nodes pass on about a copy each and the last passes on
    nothing; a node passes pieces on while it is still fetching (more than one node is part-way at once, where
    passing on only a whole copy would have one at a time); every copy is identical. The uploads are capped so
    that the chain forms before anyone finishes."""
    src = make_file(workdir / "src" / "c.bin", 64 * MiB)
    cap = ("--chain", "--egress-limit", "40MB/s")
    seed = await cluster.start_node_async("seed", *cap)
    nodes = [await cluster.start_node_async(f"c{i}", *cap) for i in range(3)]
    aid = await cluster.publish_async(seed, src, "c:v1")
    paths: dict[str, Path] = {}
    most_part_way = 0

    async def one(node: Node) -> None:
        paths[node.name] = await cluster.fetch_async(node, "c:v1", timeout=120)

    async def watch() -> None:
        nonlocal most_part_way
        while len(paths) < len(nodes):
            arts = [await node.artifact(aid) for node in nodes]
            part_way = [a for a in arts if a and 0 < a["pieces_done"] < a["pieces_total"]]
            most_part_way = max(most_part_way, len(part_way))
            await trio.sleep(0.05)

    async with trio.open_nursery() as n:
        for node in nodes:
            n.start_soon(one, node)
        n.start_soon(watch)
    want = sha256_tree(src)
    for name, path in paths.items():
        assert sha256_tree(path) == want, name
    assert most_part_way >= 2, "pieces were passed on only once a node had them all"
    size = 64 * MiB
    seed_art = await seed.artifact(aid)
    assert seed_art is not None and seed_art["uploaded"] <= 1.3 * size, seed_art
    ups = []
    for node in nodes:
        art = await node.artifact(aid)
        assert art is not None
        ups.append(art["uploaded"] / size)
    ups.sort()
    assert ups[0] < 0.2 and ups[1] > 0.7 and ups[2] > 0.7, ups  # the tail, and the two that pass it all on


async def test_compressible_pieces_travel_zstd_and_arrive_identical(cluster: LocalCluster, workdir: Path) -> None:
    """Text-like data goes compressed on the wire; mixed with raw pieces, buffers must never be mixed up."""
    src = workdir / "src" / "snap"
    src.mkdir(parents=True)
    words = b" ".join(b"token%d" % i for i in range(200_000))
    (src / "tokenizer.json").write_bytes(words * 20)  # ~26 MB, compresses ~10x
    make_file(src / "weights.bin", 24 * MiB)
    seed = await cluster.start_node_async("seed")
    peers = [await cluster.start_node_async(f"p{i}") for i in range(2)]
    aid = await cluster.publish_async(seed, src, "snap:v1")
    async with trio.open_nursery() as n:
        for p in peers:
            n.start_soon(cluster.fetch_async, p, "snap:v1")
    want = sha256_tree(src)
    for p in peers:
        a = await p.artifact(aid)
        assert a is not None and sha256_tree(Path(a["path"])) == want
        assert a["downloaded"] < a["size"] * 0.75, "compressible pieces should have travelled compressed"
        assert "internal error" not in p.log_text()


@pytest.mark.parametrize("limited", ["--egress-limit on the seed", "--ingress-limit on the leecher"])
async def test_slow_limit_is_not_taken_for_a_stall(cluster: LocalCluster, workdir: Path, limited: str) -> None:
    """At 200 kB/s one 256 KiB piece takes longer than the stall timeout (1 s): the limited side must
    move it in small paced chunks and the leecher must count bytes queued below its receive mark as
    progress, so that the seed is not dropped as stalled again and again."""
    src = make_file(workdir / "src" / "slow.bin", 1536 * 1024)
    option = limited.split()[0]
    seed = await cluster.start_node_async("seed", *([option, "200kB/s"] if "seed" in limited else []))
    leech = await cluster.start_node_async("leech", *([option, "200kB/s"] if "leecher" in limited else []))
    await cluster.publish_async(seed, src, "slow:v1")
    start = time.monotonic()
    path = await cluster.fetch_async(leech, "slow:v1", timeout=60)
    took = time.monotonic() - start
    assert sha256_tree(path) == sha256_tree(src)
    assert "stalled" not in leech.log_text(), leech.log_text()[-2000:]
    assert took < 1536 * 1024 / 200e3 * 1.5 + 3, took
    print(f"1.5 MiB at 200 kB/s ({limited}) in {took:.1f} s")
