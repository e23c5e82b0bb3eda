"""Issue #14's resource and integrity rows as real daemons on loopback: fd bounds, poisoned replicas."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import trio

from p2pd.cluster import HOST, P2PD_CLI, LocalCluster, Node
from p2pd.rpc import free_port
from tests.integration.helpers import sha256_tree, wait_until

MiB = 1 << 20


async def start_limited_node(c: LocalCluster, name: str, nofile: int = 1024) -> Node:
    """A daemon whose open-file limit is `nofile`, soft and hard (`ulimit -n` as many services get)."""
    d = c.work / name
    d.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [
        "prlimit",
        f"--nofile={nofile}:{nofile}",
        "--",
        *P2PD_CLI,
        "run",
        "--tracker",
        c.tracker_addrs(),
        "--listen",
        f"{HOST}:{port}",
        "--data-dir",
        str(d),
    ]
    node = Node(name, d, port, argv, c.spawn(argv, name))
    c.nodes[name] = node
    await c.wait_ready_async(node)
    return node


def open_fds(node: Node) -> int:
    return len(os.listdir(f"/proc/{node.process.pid}/fd"))


async def test_an_artifact_of_3000_one_byte_files_under_1024_fds(cluster: LocalCluster, workdir: Path) -> None:
    """Row 5: the store kept one fd per file (1,023 open, "internal error", later fetches failed)."""
    src = workdir / "many"
    for i in range(3000):
        p = src / f"d{i % 10}" / f"f{i:05d}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(bytes([i % 251]))
    seed = await start_limited_node(cluster, "seed")
    leech = await start_limited_node(cluster, "leech")
    await cluster.publish_async(seed, src, "many:v1")
    other = workdir / "other.bin"
    other.write_bytes(os.urandom(3 * MiB))
    await cluster.publish_async(seed, other, "other:v1")
    path = await cluster.fetch_async(leech, "many:v1", timeout=120)
    assert sha256_tree(path) == sha256_tree(src)
    assert open_fds(leech) < 200 and open_fds(seed) < 200  # bounded by the store's LRU, not by the file count
    got = await cluster.fetch_async(leech, "other:v1", timeout=60)  # an unrelated fetch still works
    assert got.read_bytes() == other.read_bytes()


async def test_a_rotten_cached_copy_is_reported_dropped_and_repaired(cluster: LocalCluster, workdir: Path) -> None:
    """Row 7: a seeder with one flipped byte served it as complete for ever; the receiver banned it
    for good and hung. Now: the receiver reports it, the seeder re-verifies and stops serving it,
    a fetch with no honest source fails with `integrity` (exit 6), and the seeder fetches the piece
    again once an honest source is back."""
    src = workdir / "src" / "w.bin"
    src.parent.mkdir()
    src.write_bytes(os.urandom(8 * MiB))  # 32 pieces of 256 KiB
    origin = await cluster.start_node_async("origin")
    cacher = await cluster.start_node_async("cacher")
    leech = await cluster.start_node_async("leech")
    aid = await cluster.publish_async(origin, src, "w:v1")
    cached = await cluster.fetch_async(cacher, "w:v1")
    cluster.stop_node(origin)
    with open(cached, "r+b") as fh:  # bit rot in the cache of the only node left holding it
        fh.seek(5 * MiB + 123)
        b = fh.read(1)
        fh.seek(5 * MiB + 123)
        fh.write(bytes([b[0] ^ 0x40]))
    r = await cluster.cli_async(leech, "fetch", "w:v1", timeout=120)
    assert r.returncode == 6, (r.returncode, r.stderr)  # INTEGRITY, not a hang
    assert b"corrupt" in r.stderr and b"Traceback" not in r.stderr
    assert "on disk fails verification" in cacher.log_text()

    async def not_complete() -> bool:
        a = await cacher.artifact(aid)
        return a is not None and a["state"] != "complete"

    await wait_until(not_complete, 30, 0.2, "the cacher to stop holding the rotten piece")
    await cluster.restart_node_async(origin)

    async def repaired() -> bool:
        a = await cacher.artifact(aid)
        return a is not None and a["state"] == "complete"

    await wait_until(repaired, 60, 0.2, "the cacher to fetch the piece again")
    path = await cluster.fetch_async(leech, "w:v1", timeout=120)
    assert path.read_bytes() == src.read_bytes()
    assert (cluster.work / "cacher" / "cache" / aid / "w.bin").read_bytes() == src.read_bytes()


async def test_a_socket_group_member_gets_only_its_own_rights(cluster: LocalCluster, workdir: Path) -> None:
    """Row 9: a member of the control socket's group published a root-only file and had the daemon
    place files in a root-only directory. Now the daemon checks the caller's uid (SO_PEERCRED)."""
    if os.geteuid() != 0:
        import pytest

        pytest.skip("needs root: runs the client as nobody")
    workdir.chmod(0o711)
    node = await cluster.start_node_async("n")
    (node.data_dir).chmod(0o711)
    os.chown(node.socket, 0, 65534)  # the group docs/ray.md suggests: here nobody's own group
    secret = workdir / "secret.bin"
    secret.write_bytes(os.urandom(4096))
    secret.chmod(0o600)

    client = (
        "import json, socket, sys\n"
        "from p2pd.rpc import RpcError, call_blocking\n"
        "s = socket.socket(socket.AF_UNIX); s.settimeout(30); s.connect(sys.argv[1])\n"
        "try:\n"
        "    print(json.dumps(call_blocking(s, sys.argv[2], json.loads(sys.argv[3]))))\n"
        "except RpcError as e:\n"
        "    print(e.code.value, e.message, file=sys.stderr); sys.exit(e.code.exit_status)\n"
    )

    def as_nobody(method: str, params: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
        """A raw API call (not the CLI, which checks paths itself) from uid 65534, a socket group member."""
        drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]  # the uid SO_PEERCRED reports
        argv = [*drop, sys.executable, "-c", client, str(node.socket), method, json.dumps(params)]
        return subprocess.run(argv, capture_output=True, env=cluster.env, timeout=60, check=False, cwd="/")

    r = await trio.to_thread.run_sync(as_nobody, "publish", {"path": str(secret), "name": "stolen:v1"})
    assert r.returncode == 2 and b"may not read" in r.stderr, r.stderr
    public = workdir / "public.bin"
    public.write_bytes(os.urandom(4096))
    public.chmod(0o644)
    await cluster.publish_async(node, public, "pub:v1")  # root publishes
    root_only = workdir / "root-only"
    root_only.mkdir(mode=0o700)
    r = await trio.to_thread.run_sync(as_nobody, "fetch", {"name": "pub:v1", "dest": str(root_only / "x")})
    assert r.returncode == 2 and b"may not" in r.stderr, r.stderr
    assert list(root_only.iterdir()) == []


NOBODY_CLIENT = (
    "import json, socket, sys\n"
    "from p2pd.rpc import RpcError, call_blocking\n"
    "s = socket.socket(socket.AF_UNIX); s.settimeout(30); s.connect(sys.argv[1])\n"
    "try:\n"
    "    print(json.dumps(call_blocking(s, sys.argv[2], json.loads(sys.argv[3]))))\n"
    "except RpcError as e:\n"
    "    print(e.code.value, e.message, file=sys.stderr); sys.exit(e.code.exit_status)\n"
)


def call_as_nobody(
    cluster: LocalCluster, node: Node, method: str, params: dict[str, str]
) -> subprocess.CompletedProcess[bytes]:
    """A raw API call from uid 65534 (what SO_PEERCRED reports), a member of the socket's group."""
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    argv = [*drop, sys.executable, "-c", NOBODY_CLIENT, str(node.socket), method, json.dumps(params)]
    return subprocess.run(argv, capture_output=True, env=cluster.env, timeout=60, check=False, cwd="/")


async def test_a_source_swapped_for_a_symlink_after_publish_never_serves_root_only_bytes(
    cluster: LocalCluster, workdir: Path
) -> None:
    """The publish read race (docs/security.md): the daemon checked nobody's directory, then read it by
    path again while seeding; nobody swapped `sub` for a link to a root-only directory holding a file
    of the same name and size, and peers were sent its bytes (they failed verification: the leak is
    the bytes sent). Now the checked inodes are linked into the data dir and seeded from there."""
    if os.geteuid() != 0:
        import pytest

        pytest.skip("needs root: runs the client as nobody")
    workdir.chmod(0o711)
    seed = await cluster.start_node_async("seed")
    leech = await cluster.start_node_async("leech")
    seed.data_dir.chmod(0o711)
    os.chown(seed.socket, 0, 65534)
    vault = workdir / "vault"
    vault.mkdir(mode=0o700)
    (vault / "w.bin").write_bytes(os.urandom(MiB))
    (vault / "w.bin").chmod(0o600)
    home = workdir / "home"
    src = home / "src"
    (src / "sub").mkdir(parents=True)
    mine = os.urandom(MiB)
    (src / "sub" / "w.bin").write_bytes(mine)
    (src / "a.txt").write_bytes(b"hello")
    for p in [home, *home.rglob("*")]:
        os.chown(p, 65534, 65534)

    r = await trio.to_thread.run_sync(call_as_nobody, cluster, seed, "publish", {"path": str(src), "name": "mine:v1"})
    assert r.returncode == 0, r.stderr
    aid = json.loads(r.stdout)["artifact_id"]
    linked = seed.data_dir / "published" / aid / "sub" / "w.bin"
    assert linked.stat().st_ino == (src / "sub" / "w.bin").stat().st_ino  # the checked inode, not a copy
    (src / "sub").rename(src / "sub.old")  # what nobody may do in its own directory
    (src / "sub").symlink_to(vault)
    await trio.to_thread.run_sync(cluster.stop_node, seed)
    await cluster.restart_node_async(seed)  # the links are what it seeds after a restart too
    os.chown(seed.socket, 0, 65534)
    got = await cluster.fetch_async(leech, "mine:v1", timeout=60)
    assert (got / "sub" / "w.bin").read_bytes() == mine and (got / "a.txt").read_bytes() == b"hello"

    stolen = {"path": str(src / "sub" / "w.bin"), "name": "stolen:v1"}  # through the link now
    r = await trio.to_thread.run_sync(call_as_nobody, cluster, seed, "publish", stolen)
    assert r.returncode == 2 and b"may not" in r.stderr, r.stderr
    r = await cluster.cli_async(seed, "rm", "mine:v1")
    assert r.returncode == 0, r.stderr
    assert not (seed.data_dir / "published" / aid).exists()  # the links go; the publisher's files stay
    assert (src / "sub.old" / "w.bin").read_bytes() == mine
