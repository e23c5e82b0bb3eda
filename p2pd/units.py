"""Sizes, rates and durations: the one grammar every command line accepts and the one style humans read.

The daemon's CLI, the tracker's admin CLI, the Ray plugin and netsim used to parse and print these each
their own way and disagreed (netsim took `64M` and the daemon did not; the daemon took `400Mbps` and netsim
did not). This module is stdlib-only, so netsim and the Ray plugin import it without pulling in trio.

Units, by name: sizes are bytes (`int`), rates bytes per second (`float`, what the token buckets count),
durations seconds (`float`). Bits appear only at netsim's edge, where tc and the Kumar-Ross bound count
them: `rate_bits`, `format_bits_rate` and `BITS_PER_BYTE`.

SIZE: `512MiB`, `2GiB`, `100MB` (MB = 10^6 bytes), `64M` / `64k` (a single letter is binary, as in
`head -c`), `1.5GiB`, `4096` (bytes), an optional `B`, spaces allowed; letters in any case.

RATE: `50MB/s`, `40MiB/s`, `400Mbit/s`, `1Gbit/s`, tc's `200mbit`, `400Mbps` (lower-case b: bits, the
network convention), `50MBps` (upper-case B: bytes), a plain number = bytes per second; `/s` optional.
Only the b/B of `bps`/`Bps` and the `B` of a byte unit decide bits against bytes: a bare `64M` and a
lone lower-case b as in `50Mb/s` could mean either, so they are refused with both spellings offered.

DURATION: `30` (seconds), `30s`, `1.5s`, `500ms`, `2m` / `2min`, `1h`, `1d`, and sums like `1h30m`.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

BITS_PER_BYTE = 8

MAX_SIZE = 2**60  # bytes (1 EiB): anything larger is a typo, not a model
MAX_RATE = float(2**60)  # bytes per second
MIN_RATE = 1.0  # bytes per second: a slower limit would stall any transfer for hours per chunk
MAX_DURATION = 10**9  # seconds (about 32 years)

SIZE_EXAMPLES = "512MiB, 2GiB, 100MB, 64M or a number of bytes"
RATE_EXAMPLES = "50MB/s, 40MiB/s, 400Mbit/s, 200mbit or a number of bytes per second"
DURATION_EXAMPLES = "30s, 500ms, 2m, 1h or a number of seconds"

# The exponent is capped at three digits so that `1e999999999` is refused at once instead of building a
# billion-digit integer.
_NUMBER = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?"
_MAX_DIGITS = 64  # Fraction() refuses over 4300 digits with a message about ints, not about the input
_QUANTITY = re.compile(rf"\s*(?P<num>{_NUMBER})\s*(?P<unit>[A-Za-z]*(?:/[A-Za-z]+)?)\s*")

_KIB, _MIB, _GIB, _TIB, _PIB, _EIB = 2**10, 2**20, 2**30, 2**40, 2**50, 2**60
_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "pb": 10**15,
    "eb": 10**18,
    "kib": _KIB,
    "mib": _MIB,
    "gib": _GIB,
    "tib": _TIB,
    "pib": _PIB,
    "eib": _EIB,
    # `head -c 64M`: a single letter is binary (no bare E: `1e` reads like a number cut short)
    "k": _KIB,
    "m": _MIB,
    "g": _GIB,
    "t": _TIB,
    "p": _PIB,
}

_RATE_PREFIXES: dict[str, float] = {
    "": 1.0,
    "k": 1e3,
    "m": 1e6,
    "g": 1e9,
    "t": 1e12,
    "p": 1e15,
    "e": 1e18,
    "ki": float(_KIB),
    "mi": float(_MIB),
    "gi": float(_GIB),
    "ti": float(_TIB),
    "pi": float(_PIB),
    "ei": float(_EIB),
}
# prefix (any case), then what is counted (b/B case-sensitive), then per second
_RATE_UNIT = re.compile(r"(?P<prefix>[kKmMgGtTpPeE][iI]?)?(?P<kind>[bB][iI][tT]|bps|Bps|b|B)?(?P<per>/s)?")

_DURATION_UNITS: dict[str, Fraction] = {
    "ms": Fraction(1, 1000),
    "s": Fraction(1),
    "sec": Fraction(1),
    "m": Fraction(60),
    "min": Fraction(60),
    "h": Fraction(3600),
    "d": Fraction(86400),
}
_DURATION_PART = re.compile(rf"\s*(?P<num>{_NUMBER})\s*(?P<unit>[A-Za-z]+)")


def _show(text: str) -> str:
    """The user's input, quoted and kept short, for a one-line error."""
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _invalid(what: str, text: str, why: str, examples: str) -> ValueError:
    return ValueError(f"invalid {what} {_show(text)}: {why}; use e.g. {examples}")


def _split(text: str, what: str, examples: str) -> tuple[str, str]:
    """(number, unit) of `text`, or a ValueError saying what is not a number with a unit."""
    if not text.strip():
        raise _invalid(what, text, "it is empty", examples)
    m = _QUANTITY.fullmatch(text)
    if m is None:
        raise _invalid(what, text, "expected a number followed by a unit", examples)
    if len(m["num"]) > _MAX_DIGITS:
        raise _invalid(what, text, "the number is too long", examples)
    return m["num"], m["unit"]


# ------------------------------------------------------------------------------------------------ parse
def parse_size(text: str) -> int:
    """Bytes in a SIZE string (`512MiB`, `2GiB`, `100MB`, `64M`, `4096`), rounded to a whole byte."""
    num, unit = _split(text, "size", SIZE_EXAMPLES)
    if "/" in unit:
        raise _invalid("size", text, "that is a rate, not a size", SIZE_EXAMPLES)
    mult = _SIZE_UNITS.get(unit.lower())
    if mult is None:
        raise _invalid("size", text, f"unknown unit {unit!r}", SIZE_EXAMPLES)
    value = Fraction(num) * mult  # exact: `1.1GB` is 1100000000 bytes, not a float's neighbour
    if value <= 0:
        raise _invalid("size", text, "must be positive", SIZE_EXAMPLES)
    if value > MAX_SIZE:
        raise _invalid("size", text, "too large (over 1 EiB)", SIZE_EXAMPLES)
    n = round(value)
    if n < 1:
        raise _invalid("size", text, "less than one byte", SIZE_EXAMPLES)
    return n


def parse_rate(text: str) -> float:
    """Bytes per second in a RATE string (`50MB/s`, `40MiB/s`, `400Mbit/s`, `400Mbps`, `200mbit`, `1000`)."""
    num, unit = _split(text, "rate", RATE_EXAMPLES)
    m = _RATE_UNIT.fullmatch(unit)
    if m is None or (m["per"] and m["kind"] in ("bps", "Bps")):
        raise _invalid("rate", text, f"unknown unit {unit!r}", RATE_EXAMPLES)
    prefix, kind = (m["prefix"] or "").lower(), m["kind"] or ""
    if kind == "b" or (kind == "" and prefix):
        p, n = prefix[:1].upper() + prefix[1:], num.lstrip("+")
        reason = "a lone lower-case b" if kind == "b" else f"a bare {p}"
        binary = f" or {n}{p}iB/s" if p and not p.endswith("i") else ""
        raise ValueError(
            f"ambiguous rate {_show(text)}: {reason} could mean bytes or bits; "
            f"write {n}{p}B/s{binary} for bytes, {n}{p}bit/s for bits per second"
        )
    value = float(num)
    if value <= 0:
        raise _invalid("rate", text, "must be positive", RATE_EXAMPLES)
    scale = _RATE_PREFIXES[prefix]
    # bits: multiply then divide, so `f"{x}Mbit/s"` gives exactly x * 1e6 / 8 (dividing by 8 is exact)
    bits = kind == "bps" or kind.lower() == "bit"
    rate = value * scale / BITS_PER_BYTE if bits else value * scale
    if not rate <= MAX_RATE:  # also catches inf from `1e999`
        raise _invalid("rate", text, "too large (over 1 EiB/s)", RATE_EXAMPLES)
    if rate < MIN_RATE:
        raise _invalid("rate", text, "too small (under 1 byte per second)", RATE_EXAMPLES)
    return rate


def rate_bits(text: str) -> int:
    """Bits per second in a RATE string: `parse_rate` for netsim, whose tc shaping and bound count bits."""
    return round(parse_rate(text) * BITS_PER_BYTE)


def parse_duration(text: str) -> float:
    """Seconds in a DURATION string (`30`, `30s`, `1.5s`, `500ms`, `2m`, `1h`, `1h30m`)."""
    if not text.strip():
        raise _invalid("duration", text, "it is empty", DURATION_EXAMPLES)
    if any(len(m[0]) > _MAX_DIGITS for m in re.finditer(_NUMBER, text)):
        raise _invalid("duration", text, "the number is too long", DURATION_EXAMPLES)
    bare = re.fullmatch(rf"\s*({_NUMBER})\s*", text)
    if bare:
        total = Fraction(bare[1])
    else:
        total, pos = Fraction(0), 0
        stripped = text.rstrip()
        while pos < len(stripped):
            m = _DURATION_PART.match(stripped, pos)
            if m is None:
                raise _invalid("duration", text, "expected numbers with units", DURATION_EXAMPLES)
            mult = _DURATION_UNITS.get(m["unit"].lower())
            if mult is None:
                raise _invalid("duration", text, f"unknown unit {m['unit']!r}", DURATION_EXAMPLES)
            part = Fraction(m["num"])
            if part < 0:
                raise _invalid("duration", text, "must not be negative", DURATION_EXAMPLES)
            total += part * mult
            pos = m.end()
    if total < 0:
        raise _invalid("duration", text, "must not be negative", DURATION_EXAMPLES)
    if total > MAX_DURATION:
        raise _invalid("duration", text, "too long (over 30 years)", DURATION_EXAMPLES)
    return float(total)


# ----------------------------------------------------------------------------------------------- format
def _scaled(value: float, base: int, units: tuple[str, ...]) -> str:
    """Three significant digits in the largest unit that keeps the number under `base` (`1000 B`, not `0.977 KiB`)."""
    if not math.isfinite(value):
        return f"{value} {units[0]}"
    v, sign = abs(value), "-" if value < 0 else ""
    for unit in units:
        if v < 999.5:  # from here on `.3g` would switch to exponent notation
            return f"{sign}{v:.3g} {unit}"
        if v < base - 0.5 or unit == units[-1]:
            return f"{sign}{v:.0f} {unit}"
        v /= base
    raise AssertionError("unreachable: the last unit always returns")


def format_size(n: float) -> str:
    """A size for people, binary units: `512 B`, `1.5 GiB`, `12.3 MiB`."""
    return _scaled(float(n), 1024, ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"))


def format_rate(bytes_per_s: float) -> str:
    """A rate for people, decimal bytes per second like a network dashboard: `12.3 MB/s`; inf is `unlimited`."""
    if math.isinf(bytes_per_s) and bytes_per_s > 0:
        return "unlimited"
    return _scaled(float(bytes_per_s), 1000, ("B/s", "kB/s", "MB/s", "GB/s", "TB/s", "PB/s", "EB/s"))


def format_bits_rate(bits_per_s: float) -> str:
    """A rate in bits as tc and netsim's headlines write it: `200Mbit/s` (largest readable decimal unit)."""
    for unit, mult in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits_per_s >= mult:
            return f"{bits_per_s / mult:g}{unit}"
    return f"{bits_per_s:g}bit/s"


def format_size_exact(n: int) -> str:
    """The shortest exact binary spelling (`512MiB`, `1536KiB`, `1000B`) for file names and headlines.

    `parse_size` reads it back to the same number.
    """
    for unit, mult in (("EiB", _EIB), ("PiB", _PIB), ("TiB", _TIB), ("GiB", _GIB), ("MiB", _MIB), ("KiB", _KIB)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return f"{n}B"


def format_duration(seconds: float) -> str:
    """A duration for people: `850 ms`, `12.3 s`, `4 min 5 s`, `2 h 3 min` (parse_duration reads each back)."""
    if not math.isfinite(seconds):
        return f"{seconds} s"
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds < 0.9995:
        return f"{seconds * 1000:.3g} ms"
    if seconds < 59.95:
        return f"{seconds:.3g} s"
    if seconds < 3599.5:
        minutes, secs = divmod(round(seconds), 60)
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"
