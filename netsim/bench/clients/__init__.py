"""Client runners: the systems the benchmarks compare (names are the `--clients` spellings)."""

from __future__ import annotations

from typing import Any

from netsim.bench.clients.base import Client

SYSTEMS = ("p2pd", "libtorrent", "aria2", "http")  # what `--clients` runs by default: the systems compared
# ...and `chain`, a reference rather than a system: the payload relayed byte by byte along every node (chain.py)
CLIENT_NAMES = (*SYSTEMS, "chain")


def make_client(name: str, opts: Any = None) -> Client:
    """A runner by its `--clients` name (imports lazily so a missing wheel only matters when it is asked for)."""
    if name == "p2pd":
        from netsim.bench.clients.p2pd import P2pd

        return P2pd(
            egress_limit=getattr(opts, "p2pd_egress_limit", None),
            run_args=getattr(opts, "p2pd_run_args", None),
            churn=getattr(opts, "churn", None),
            insecure=getattr(opts, "p2pd_insecure", False),
        )
    if name == "libtorrent":
        from netsim.bench.clients.bittorrent import Libtorrent

        return Libtorrent()
    if name == "aria2":
        from netsim.bench.clients.bittorrent import Aria2

        return Aria2()
    if name == "http":
        from netsim.bench.clients.http import Http

        return Http()
    if name == "chain":
        from netsim.bench.clients.chain import Chain

        return Chain()
    raise ValueError(f"unknown client {name!r}; choose from {', '.join(CLIENT_NAMES)}")
