"""SIZE, RATE and DURATION strings and the human formats (p2pd/units.py), for p2pd, the tracker CLI and netsim."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from p2pd.units import (
    BITS_PER_BYTE,
    MAX_SIZE,
    format_bits_rate,
    format_duration,
    format_rate,
    format_size,
    format_size_exact,
    parse_duration,
    parse_rate,
    parse_size,
    rate_bits,
)

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40


# ------------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MiB", 512 * MiB),
        ("2GiB", 2 * GiB),
        ("100MB", 100_000_000),
        ("3GB", 3_000_000_000),
        ("4096", 4096),
        ("1.5KiB", 1536),
        ("1.5GiB", 3 * GiB // 2),
        ("1 kb", 1000),
        (" 2 GiB ", 2 * GiB),
        ("100B", 100),
        ("100b", 100),
        ("1TiB", TiB),
        ("2tb", 2 * 10**12),
        # single letters are binary, as in `head -c 64M`
        ("64M", 64 * MiB),
        ("64m", 64 * MiB),
        ("64K", 64 * KiB),
        ("1G", GiB),
        ("1t", TiB),
        # exact, not a float's neighbour
        ("1.1GB", 1_100_000_000),
        ("0.1KiB", 102),
        ("1e3", 1000),
        ("5.", 5),
        (".5KiB", 512),
        ("+7", 7),
        ("1024TiB", 1024 * TiB),
        ("2PiB", 2**51),
        ("1p", 2**50),
        ("1EiB", 2**60),
        ("1EB", 10**18),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    got = parse_size(text)
    assert got == expected and isinstance(got, int)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", r"invalid size '': it is empty; use e\.g\. 512MiB, 2GiB, 100MB, 64M or a number of bytes"),
        ("   ", "it is empty"),
        ("big", "invalid size 'big': expected a number followed by a unit; use e.g. 512MiB"),
        ("GiB", "expected a number followed by a unit"),
        ("-1GiB", "invalid size '-1GiB': must be positive"),
        ("0", "must be positive"),
        ("0MiB", "must be positive"),
        ("0.4", "less than one byte"),
        ("10 parsecs", "invalid size '10 parsecs': unknown unit 'parsecs'"),
        ("5XB", "unknown unit 'XB'"),
        ("1Mbit", "unknown unit 'Mbit'"),
        ("5MB/s", "that is a rate, not a size"),
        ("nan", "expected a number"),
        ("inf", "expected a number"),
        ("1.2.3MiB", "expected a number"),
        ("2**61", "expected a number"),
        ("1e19", r"too large \(over 1 EiB\)"),
        ("1025TiBx", "unknown unit"),
        ("2000000TiB", "too large"),
        ("2EiB", "too large"),
        ("1e", "unknown unit 'e'"),
        ("1e999", "too large"),
        ("9" * 100, "the number is too long"),
    ],
)
def test_parse_size_errors(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as e:
        parse_size(text)
    assert "\n" not in str(e.value)


def test_size_limit_is_inclusive() -> None:
    assert parse_size(str(MAX_SIZE)) == MAX_SIZE
    with pytest.raises(ValueError, match="too large"):
        parse_size(str(MAX_SIZE + 1))


@given(st.integers(min_value=1, max_value=MAX_SIZE))
def test_format_size_exact_round_trips(n: int) -> None:
    assert parse_size(format_size_exact(n)) == n


@given(
    st.integers(min_value=1, max_value=10**6),
    st.sampled_from(
        [
            ("", 1),
            ("B", 1),
            ("KB", 10**3),
            ("MB", 10**6),
            ("GB", 10**9),
            ("KiB", KiB),
            ("MiB", MiB),
            ("GiB", GiB),
            ("K", KiB),
            ("M", MiB),
            ("G", GiB),
            ("T", TiB),
        ]
    ),
    st.sampled_from(["", " "]),
    st.booleans(),
)
def test_parse_size_of_whole_units(n: int, unit: tuple[str, int], space: str, lower: bool) -> None:
    name, mult = unit
    assert parse_size(f"{n}{space}{name.lower() if lower else name}") == n * mult


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0B"),
        (1, "1B"),
        (1000, "1000B"),
        (KiB, "1KiB"),
        (1536, "1536B"),
        (3 * KiB // 2 * 1024, "1536KiB"),
        (512 * MiB, "512MiB"),
        (2 * GiB, "2GiB"),
        (3 * TiB, "3TiB"),
        (1024 * TiB, "1PiB"),
        (2**60, "1EiB"),
        (GiB + 1, f"{GiB + 1}B"),
    ],
)
def test_format_size_exact(n: int, text: str) -> None:
    assert format_size_exact(n) == text


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1000, "1000 B"),
        (1023, "1023 B"),
        (KiB, "1 KiB"),
        (1536, "1.5 KiB"),
        (3 * GiB // 2, "1.5 GiB"),
        (512 * MiB, "512 MiB"),
        (int(12.34 * MiB), "12.3 MiB"),
        (1023 * MiB, "1023 MiB"),
        (2**60, "1 EiB"),
        (2**70, "1024 EiB"),
        (-2048, "-2 KiB"),
    ],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


@given(st.integers(min_value=1, max_value=MAX_SIZE))
def test_format_size_reads_back_within_its_precision(n: int) -> None:
    assert parse_size(format_size(n)) == pytest.approx(n, rel=0.005)


# ------------------------------------------------------------------------------------------------- rates
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("50MB/s", 50e6),
        ("50mB/s", 50e6),
        ("40MiB/s", 40 * MiB),
        ("40miB/s", 40 * MiB),
        ("400Mbit/s", 50e6),
        ("1Gbit/s", 125e6),
        ("1gbit/s", 125e6),
        ("1GBit/s", 125e6),
        ("100kbit/s", 12500),
        ("8bit/s", 1),
        ("1Kibit/s", 128),
        # tc's spellings
        ("200mbit", 25e6),
        ("1gbit", 125e6),
        ("800kbit", 1e5),
        # b/B decides in bps/Bps: lower-case b = bits (the network convention), upper-case B = bytes
        ("400Mbps", 50e6),
        ("1Gbps", 125e6),
        ("50MBps", 50e6),
        ("5MBps", 5e6),
        ("100Bps", 100),
        # plain numbers are bytes per second
        ("1000000", 1e6),
        ("1000", 1000),
        ("1e6", 1e6),
        ("2.5", 2.5),
        ("100/s", 100),
        ("100B/s", 100),
        ("100B", 100),
        ("2.5GB/s", 2.5e9),
        ("1 GiB/s", GiB),
        (" 50 MB/s ", 50e6),
        ("10KB/s", 1e4),
        ("10kB/s", 1e4),
        ("10KiB/s", 10240),
        ("50MB", 50e6),
    ],
)
def test_parse_rate(text: str, expected: float) -> None:
    got = parse_rate(text)
    assert got == pytest.approx(expected) and isinstance(got, float)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", r"invalid rate '': it is empty; use e\.g\. 50MB/s, 40MiB/s, 400Mbit/s, 200mbit or a number of bytes"),
        ("fast", "invalid rate 'fast': expected a number followed by a unit"),
        ("MB/s", "expected a number"),
        ("-5MB/s", "invalid rate '-5MB/s': must be positive"),
        ("-1", "must be positive"),
        ("0", "must be positive"),
        ("0MB/s", "must be positive"),
        ("0.0Gbit/s", "must be positive"),
        ("1e999", r"too large \(over 1 EiB/s\)"),
        ("2000000TB/s", "too large"),
        ("1e-6", "too small"),
        ("1bit/s", "too small"),
        ("nan", "expected a number"),
        ("inf", "expected a number"),
        ("5 XB/s", "invalid rate '5 XB/s': unknown unit 'XB/s'"),
        ("5 MB/h", "unknown unit 'MB/h'"),
        ("5Mbits", "unknown unit"),
        ("5MBPS", "unknown unit"),
        ("5Mbps/s", "unknown unit"),
        ("1.2.3MB/s", "expected a number"),
        ("50MB/s/s", "expected a number"),
        ("9" * 100, "the number is too long"),
        ("1" * 5000 + "MB/s", "the number is too long"),
    ],
)
def test_parse_rate_errors(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as e:
        parse_rate(text)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        # a bare K/M/G is a size's binary unit, but a rate could be bytes or bits: refused, as netsim did
        (
            "64M",
            r"ambiguous rate '64M': a bare M could mean bytes or bits; write 64MB/s or 64MiB/s for bytes, "
            r"64Mbit/s for bits per second",
        ),
        ("200M", "a bare M"),
        ("1G/s", r"write 1GB/s or 1GiB/s for bytes, 1Gbit/s for bits"),
        ("64k", r"write 64KB/s or 64KiB/s for bytes, 64Kbit/s"),
        ("64Ki", r"write 64KiB/s for bytes, 64Kibit/s for bits"),
        # a lone lower-case b: network people mean bits, file people bytes
        ("50Mb/s", r"ambiguous rate '50Mb/s': a lone lower-case b could mean bytes or bits; write 50MB/s"),
        ("50mb/s", "a lone lower-case b"),
        ("5kb", "a lone lower-case b"),
        ("100b/s", r"write 100B/s for bytes, 100bit/s for bits per second"),
    ],
)
def test_ambiguous_rates_offer_both_spellings(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_rate(text)


finite_rates = st.floats(min_value=1e-3, max_value=1e9, allow_nan=False, allow_infinity=False)


@given(
    finite_rates,
    st.sampled_from([("Mbit/s", 1e6), ("mbit", 1e6), ("Gbit/s", 1e9), ("kbit", 1e3), ("Mbps", 1e6), ("Gbps", 1e9)]),
)
def test_parse_rate_of_bits_is_exact(x: float, unit: tuple[str, float]) -> None:
    name, mult = unit
    rate = x * mult / 8
    if 1 <= rate <= 2**60:
        assert parse_rate(f"{x}{name}") == rate


@given(
    finite_rates,
    st.sampled_from(
        [("MB/s", 1e6), ("MBps", 1e6), ("GB/s", 1e9), ("KiB/s", 1024.0), ("MiB/s", float(MiB)), ("", 1.0), ("B/s", 1.0)]
    ),
)
def test_parse_rate_of_bytes_is_exact(x: float, unit: tuple[str, float]) -> None:
    name, mult = unit
    rate = x * mult
    if 1 <= rate <= 2**60:
        assert parse_rate(f"{x}{name}") == rate


@given(st.integers(min_value=1, max_value=10**5), st.sampled_from(["Mbit/s", "mbit", "Mbps", "kbit", "Gbit/s"]))
def test_rate_bits_is_exact_for_netsim(n: int, unit: str) -> None:
    mult = {"k": 10**3, "m": 10**6, "g": 10**9}[unit[0].lower()]
    assert rate_bits(f"{n}{unit}") == n * mult
    assert parse_rate(f"{n}{unit}") * BITS_PER_BYTE == n * mult


def test_rate_bits() -> None:
    assert rate_bits("200Mbit/s") == rate_bits("200mbit") == 200_000_000
    assert rate_bits("50MB/s") == 400_000_000
    assert rate_bits("40MiB/s") == 40 * MiB * 8
    assert rate_bits("1000") == 8000  # a plain number is bytes/s (docs/interfaces.md)
    assert isinstance(rate_bits("1.1Mbit/s"), int) and rate_bits("1.1Mbit/s") == 1_100_000
    with pytest.raises(ValueError, match="ambiguous"):
        rate_bits("200M")


@pytest.mark.parametrize(
    ("rate", "text"),
    [
        (0, "0 B/s"),
        (1, "1 B/s"),
        (999, "999 B/s"),
        (1000, "1 kB/s"),
        (12.34e6, "12.3 MB/s"),
        (50e6, "50 MB/s"),
        (999.6e3, "1 MB/s"),
        (125e6, "125 MB/s"),
        (1.5e9, "1.5 GB/s"),
        (1e20, "100 EB/s"),
        (1e22, "10000 EB/s"),
        (math.inf, "unlimited"),
    ],
)
def test_format_rate(rate: float, text: str) -> None:
    assert format_rate(rate) == text


@given(st.floats(min_value=1, max_value=2**60))
def test_format_rate_reads_back_within_its_precision(rate: float) -> None:
    assert parse_rate(format_rate(rate)) == pytest.approx(rate, rel=0.005)


@pytest.mark.parametrize(
    ("bps", "text"),
    [
        (200e6, "200Mbit/s"),
        (1e9, "1Gbit/s"),
        (1.5e9, "1.5Gbit/s"),
        (100e3, "100kbit/s"),
        (800, "800bit/s"),
        (0, "0bit/s"),
    ],
)
def test_format_bits_rate(bps: float, text: str) -> None:
    assert format_bits_rate(bps) == text
    if bps:
        assert rate_bits(text) == bps


# --------------------------------------------------------------------------------------------- durations
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30", 30.0),
        ("30s", 30.0),
        (" 30 s ", 30.0),
        ("1.5s", 1.5),
        ("500ms", 0.5),
        ("2m", 120.0),
        ("2min", 120.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("0", 0.0),
        ("0s", 0.0),
        ("1h30m", 5400.0),
        ("2 min 5 s", 125.0),
        ("1m 0.5s", 60.5),
        ("0.3ms", 0.0003),
        ("10SEC", 10.0),
        ("1e3", 1000.0),
    ],
)
def test_parse_duration(text: str, expected: float) -> None:
    got = parse_duration(text)
    assert got == expected and isinstance(got, float)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", r"invalid duration '': it is empty; use e\.g\. 30s, 500ms, 2m, 1h or a number of seconds"),
        ("soon", "expected numbers with units"),
        ("ms", "expected numbers with units"),
        ("1h30", "expected numbers with units"),
        ("-1", "must not be negative"),
        ("-1s", "must not be negative"),
        ("1h-30m", "must not be negative"),
        ("5 parsecs", "unknown unit 'parsecs'"),
        ("5 y", "unknown unit 'y'"),
        ("1e10", r"too long \(over 30 years\)"),
        ("nan", "expected numbers with units"),
        ("inf", "expected numbers with units"),
        ("9" * 100, "the number is too long"),
        ("1" * 5000 + "s", "the number is too long"),
    ],
)
def test_parse_duration_errors(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as e:
        parse_duration(text)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0 ms"),
        (0.0005, "0.5 ms"),
        (0.85, "850 ms"),
        (1, "1 s"),
        (12.34, "12.3 s"),
        (59.96, "1 min"),
        (245, "4 min 5 s"),
        (3599.6, "1 h"),
        (7380, "2 h 3 min"),
        (-1.5, "-1.5 s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.floats(min_value=0, max_value=1e8))
def test_format_duration_reads_back_within_its_precision(seconds: float) -> None:
    # three significant digits below a minute, whole seconds below an hour, whole minutes above
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, rel=0.005, abs=30)


# ---------------------------------------------------------------------------------------- command lines
def test_daemon_cli_names_the_option_with_a_bad_rate() -> None:
    from p2pd.cli import app

    r = CliRunner().invoke(app, ["run", "--tracker", "127.0.0.1:9", "--egress-limit", "64M"])
    assert r.exit_code == 2  # BAD_REQUEST
    assert r.stderr.strip() == (
        "p2pd: error: --egress-limit: ambiguous rate '64M': a bare M could mean bytes or bits; "
        "write 64MB/s or 64MiB/s for bytes, 64Mbit/s for bits per second"
    )
    r = CliRunner().invoke(app, ["run", "--tracker", "127.0.0.1:9", "--ingress-limit", "-5MB/s"])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("p2pd: error: --ingress-limit: invalid rate '-5MB/s': must be positive")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "12 parsecs"], "p2pd: error: --size: invalid size '12 parsecs': unknown unit 'parsecs'"),
        (["--size", "64M", "--egress-limit", "fast"], "p2pd: error: --egress-limit: invalid rate 'fast'"),
    ],
)
def test_demo_cli_checks_size_and_rate_before_starting(args: list[str], message: str) -> None:
    from p2pd.cli import app

    r = CliRunner().invoke(app, ["demo", *args])
    assert r.exit_code == 2 and r.stderr.startswith(message) and r.stderr.count("\n") == 1


def test_admin_policy_checks_the_rate_before_calling_the_tracker() -> None:
    from tracker.admin_cli import admin_app

    args = ["policy", "--tracker", "http://127.0.0.1:9", "--token", "t", "--ingress-limit", "50Mb/s"]
    r = CliRunner().invoke(admin_app, args)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("p2p-tracker: error: --ingress-limit: ambiguous rate '50Mb/s'")
