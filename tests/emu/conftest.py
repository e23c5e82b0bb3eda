"""Emulation tests run real processes in network namespaces: they need root and iproute2 (`ip`, `tc`).

They skip, saying exactly what is missing, where that is not available; .ci/run installs everything and runs as
root, so in CI nothing here skips. Every test checks that no namespace of this process is left afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from netsim.emu import list_namespaces
from netsim.emu.topology import PREFIX_ROOT
from p2pd.identity import JOIN_SECRET_ENV, new_join_secret


def emu_unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root: creates network namespaces (run the emu tests as root)"
    for tool in ("ip", "tc"):
        if not shutil.which(tool):
            return f"`{tool}` not found: apt-get install iproute2"
    probe = f"{PREFIX_ROOT}{os.getpid():x}xprobe-x"
    cp = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if cp.returncode != 0:
        return f"`ip netns add` failed (needs CAP_SYS_ADMIN and CAP_NET_ADMIN): {cp.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=True)
    return None


_REASON = emu_unavailable()
_SECRET = new_join_secret()


@pytest.fixture(autouse=True)
def secured_cluster_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemons and trackers these tests start (they inherit this environment) form a secured cluster.
    Set per test, not at import: in one pytest session the secret must not reach other directories' tests
    (a tracker started with --insecure there would find a secret too and refuse to start)."""
    if JOIN_SECRET_ENV not in os.environ:
        monkeypatch.setenv(JOIN_SECRET_ENV, _SECRET)


def ours() -> list[str]:
    """Namespaces created by this test process (netsim prefixes carry the creator's PID)."""
    mine = f"{PREFIX_ROOT}{os.getpid():x}x"
    return [n for n in list_namespaces() if n.startswith(mine)]


@pytest.fixture
def emu() -> Iterator[None]:
    """Skip unless namespaces can be made; afterwards assert that none of ours is left."""
    if _REASON:
        pytest.skip(_REASON)
    assert ours() == [], f"namespaces left by an earlier test: {ours()}"
    yield
    left = ours()
    assert left == [], f"namespaces left behind: {left}"


@pytest.fixture
def iptables(emu: None) -> None:
    """For tests whose topology adds packet loss or a NAT router: both are iptables rules in the namespaces."""
    if not shutil.which("iptables"):
        pytest.skip("`iptables` not found (packet loss and NAT are iptables rules): apt-get install iptables")
