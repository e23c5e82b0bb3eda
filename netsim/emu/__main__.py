"""`python -m netsim.emu list|cleanup`: inspect or delete namespaces of netsim runs whose process is gone.

A run that is SIGKILLed cannot clean up after itself; its namespaces carry the creator's PID in their names
(`p2e<pid hex>x<n>-...`), so leftovers are recognisable and only those whose creator is dead are touched.
"""

from __future__ import annotations

import argparse
import sys

from netsim.emu.topology import PREFIX_RE, list_namespaces, reap_stale, stale_namespaces


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    ap = argparse.ArgumentParser(prog="python -m netsim.emu", description=__doc__)
    ap.add_argument("command", choices=["list", "cleanup"])
    a = ap.parse_args(argv)
    if a.command == "list":
        stale = {ns for ns, _ in stale_namespaces()}
        for ns in list_namespaces():
            if PREFIX_RE.match(ns):
                print(f"{ns}\t{'stale' if ns in stale else 'live'}")
        return 0
    reap_stale(sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
