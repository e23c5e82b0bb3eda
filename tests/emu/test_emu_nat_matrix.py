"""Every pair of NAT kinds, both directions, through real Linux NAT routers (netsim.bench.nat.run_matrix).

Each cell is its own pair of daemons, all cells at once against one tracker. Every cell must deliver its
artifact byte-identically, over the path traversal gives it today (`expected_path` says why): a public
seed is dialled directly, a NATed seed reaches a public leech by the punch (a connection reversal, never the
relay), cone <-> cone punches TCP (never the relay), a cone (UDP-blocked included: its TCP is a cone's) and a
symmetric NAT meet by the TCP birthday punch (`tcp-punch`, never the relay), and two symmetric NATs leave only
the relay. A birthday punch under way holds the UDP punch and the relay until its outcome, so QUIC (`udp-punch`)
wins such a cell only where the spray missed (it did in 1 to 3 runs in 12 on `6b3196a` and after it, when the UDP
punch still started at 1.0 s beside it). Those cells must be on a punched path, and all but one of them on
`tcp-punch`. (Under load, a UDP-blocked seed once answered its publishes one per second, waiting out each UDP
heartbeat: its last cell started 5.7 s late and went to the relay, 4 in 29 loaded runs; BENCHMARKS.md.)
"""

from __future__ import annotations

import time

import pytest

from netsim.bench.nat import expected_path, matrix_summary, matrix_table, run_matrix
from netsim.emu import NAT_KINDS

pytestmark = [pytest.mark.emu, pytest.mark.slow]

MiB = 1 << 20


def test_every_pair_of_nat_kinds_connects_over_its_path(emu: None, iptables: None) -> None:
    t0 = time.monotonic()
    m = run_matrix(size=2 * MiB, throughput_size=0)
    print(f"\nNAT matrix ({time.monotonic() - t0:.0f} s), cell: path and time to first piece\n{matrix_table(m)}")
    print(matrix_summary(m))
    cells = {(c["seed"], c["leech"]): c for c in m["cells"]}
    assert set(cells) == {(s, lk) for s in NAT_KINDS for lk in NAT_KINDS}
    birthday = []  # the cone <-> symmetric cells
    for (sk, lk), c in cells.items():
        assert c["identical"] is True, f"{sk} -> {lk}: {c}"
        if "public" not in (sk, lk) and "symmetric" not in (sk, lk):
            assert c["path"] != "relay", f"{sk} -> {lk} went through the relay: {c}"
        if "symmetric" in (sk, lk) and {sk, lk} & {"full-cone", "port-restricted-cone", "udp-blocked"}:
            assert c["path"] in ("tcp-punch", "udp-punch"), f"{sk} -> {lk} was not punched: {c}"
            birthday.append(c)
        else:
            assert c["path"] == expected_path(sk, lk), f"{sk} -> {lk}: {c}"
        assert c["first_piece_s"] is not None and c["first_piece_s"] > 0
    assert len(birthday) == 6
    on_tcp = [c for c in birthday if c["path"] == "tcp-punch"]
    assert len(on_tcp) >= len(birthday) - 1, f"the TCP birthday punch won {len(on_tcp)} of {len(birthday)}: {birthday}"
