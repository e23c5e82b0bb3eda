"""`p2pd run --encrypt` with real daemons on loopback: artifacts arrive byte-identical over TLS on the
direct, relayed and punched paths; a plain node and an encrypted one refuse each other with a log line
that names the cause. (What a tap on the wire sees, and a man in the middle: tests/unit/test_tls.py.)"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from p2pd.cluster import ClusterError, LocalCluster, Node
from tests.integration.helpers import sha256_tree, wait_until
from tests.integration.test_nat_paths import UNREACHABLE, fetch_and_check, make_artifact

MiB = 1 << 20


async def test_two_encrypted_daemons_transfer_identically(cluster: LocalCluster, workdir: Path) -> None:
    src = make_artifact(workdir / "src", 12 * MiB + 5)
    seed = await cluster.start_node_async("seed", "--encrypt")
    leech = await cluster.start_node_async("leech", "--encrypt")
    await cluster.publish_async(seed, src, "secret:v1")
    got = await cluster.fetch_async(leech, "secret:v1", timeout=60)
    assert sha256_tree(got) == sha256_tree(src)


async def test_encrypted_through_the_trackers_relay(cluster: LocalCluster, workdir: Path) -> None:
    src = make_artifact(workdir / "src", 6 * MiB + 11)
    seed = await cluster.start_node_async("seed", "--encrypt", *UNREACHABLE, "--paths", "direct,relay")
    leech = await cluster.start_node_async("leech", "--encrypt", *UNREACHABLE, "--paths", "direct,relay")
    await fetch_and_check(cluster, seed, leech, src, "secret:relay", "relay")


async def test_encrypted_over_a_tcp_punch(cluster: LocalCluster, workdir: Path) -> None:
    src = make_artifact(workdir / "src", 6 * MiB + 3)
    seed = await cluster.start_node_async("seed", "--encrypt", *UNREACHABLE, "--paths", "direct,tcp-punch")
    leech = await cluster.start_node_async("leech", "--encrypt", *UNREACHABLE, "--paths", "direct,tcp-punch")
    await fetch_and_check(cluster, seed, leech, src, "secret:punch", "tcp-punch")


def logged(node: Node, line: str) -> Callable[[], Awaitable[bool]]:
    async def pred() -> bool:
        return line in node.log_text()

    return pred


async def test_plain_and_encrypted_nodes_refuse_each_other_clearly(cluster: LocalCluster, workdir: Path) -> None:
    plain = await cluster.start_node_async("plain")
    secret = await cluster.start_node_async("secret", "--encrypt")
    await cluster.publish_async(plain, make_artifact(workdir / "a", 2 * MiB), "m:plain")
    await cluster.publish_async(secret, make_artifact(workdir / "b", 2 * MiB), "m:secret")

    async def fetch(node: Node, name: str) -> None:
        try:
            await cluster.fetch_async(node, name, timeout=120)
        except (ClusterError, trio.TooSlowError):
            pass  # it cannot finish: the only source refuses it (what the log lines below show)

    async with trio.open_nursery() as n:
        n.start_soon(fetch, secret, "m:plain")  # an encrypted dialler at a plain acceptor
        n.start_soon(fetch, plain, "m:secret")  # a plain dialler at an encrypted acceptor
        await wait_until(
            logged(plain, "speaks TLS (it runs with --encrypt), this node does not"),
            90,
            what="the plain node's log names the encrypted peer",
        )
        await wait_until(
            logged(secret, "this node runs with --encrypt and refuses plaintext peers"),
            90,
            what="the encrypted node's log names the plaintext peer",
        )
        n.cancel_scope.cancel()
