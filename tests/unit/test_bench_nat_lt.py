"""The libtorrent side of the NAT bench: its --clients option, the driver's RESULT lines, the table and summary."""

from __future__ import annotations

import json
from typing import Any

import pytest

from netsim.bench.harness import BenchError
from netsim.bench.nat_lt import lt_matrix_table, lt_summary, parse_clients, parse_result


def test_clients_option() -> None:
    assert parse_clients("p2pd") == ("p2pd",)
    assert parse_clients("p2pd,libtorrent") == ("p2pd", "libtorrent")
    assert parse_clients(" libtorrent ") == ("libtorrent",)
    for bad in ("", ",", "p2pd,aria2", "p2pd,p2pd", "libtorent"):
        with pytest.raises(ValueError, match="--clients"):
            parse_clients(bad)


def _line(**over: Any) -> str:
    r = {"name": "ltpubfc", "connected": True, "complete": True, "first_piece_s": 0.41, "total_s": 0.52}
    r |= {"bytes": 2 << 20, "transport": "uTP", "holepunched": False, "sources": {}}
    r.update(over)
    return "RESULT " + json.dumps(r)


def test_result_line_parsed() -> None:
    r = parse_result(_line())
    assert (r["name"], r["connected"], r["bytes"], r["transport"]) == ("ltpubfc", True, 2 << 20, "uTP")
    assert parse_result(_line(connected=False, complete=False, first_piece_s=None, total_s=None))["total_s"] is None


@pytest.mark.parametrize(
    "line",
    [
        "READY",
        "RESULT",
        "RESULT {not json",
        "RESULT [1, 2]",
        _line(name=None),
        _line(connected="yes"),
        _line(bytes=1.5),
        _line(total_s=-1),
        _line(first_piece_s="soon"),
        _line(first_piece_s=True),
    ],
)
def test_bad_result_line_is_one_clear_error(line: str) -> None:
    with pytest.raises(BenchError, match="libtorrent driver") as e:
        parse_result(line)
    assert "\n" not in str(e.value)


def _cell(seed: str, leech: str, **over: Any) -> dict[str, Any]:
    c = {"seed": seed, "leech": leech, "connected": True, "ok": True, "first_piece_s": 0.5, "total_s": 0.6}
    c |= {"transport": "uTP", "holepunched": False}
    c.update(over)
    return c


def test_table_and_summary() -> None:
    kinds = ["public", "symmetric"]
    m = {
        "kinds": kinds,
        "cells": [
            _cell("public", "public", transport="TCP", first_piece_s=0.2),
            _cell("public", "symmetric"),
            _cell("symmetric", "public", holepunched=True, first_piece_s=3.0),
            _cell(
                "symmetric", "symmetric", connected=False, ok=False, first_piece_s=None, total_s=None, transport=None
            ),
        ],
        "throughput": {"cone": {"MBps": None}, "public": {"MBps": 50.0}},
    }
    table = lt_matrix_table(m).splitlines()
    assert table[1].split() == ["public", "TCP", "0.20s", "uTP", "0.50s"]
    assert table[2].split() == ["symmetric", "uTP+holepunch", "3.00s", "no-connection"]
    s = lt_summary(m)
    assert (s["cells"], s["connected"], s["complete"], s["over_utp"], s["over_tcp"], s["holepunched"]) == (
        4,
        3,
        3,
        2,
        1,
        1,
    )
    assert s["first_piece_p95_s"] == 3.0
    assert s["cone_over_public_throughput"] is None and s["public_MBps"] == 50.0
