"""RATE and SIZE strings as docs/interfaces.md spells them, plus tc's spellings (`200mbit`).

netsim parses its own units (instead of importing p2pd's) so that the benchmark harness keeps working when the
daemon under test is broken or absent. Rates are returned in bits per second (what tc and the Kumar-Ross bound
use); sizes in bytes.
"""

from __future__ import annotations

import re

_NUM = r"(\d+(?:\.\d*)?|\.\d+)"
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    # `head -c 512M` convention: single letters are binary
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_BIT_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}


def parse_size(text: str) -> int:
    """Bytes in a SIZE string: `512MiB`, `2GiB`, `100MB`, `64M` (binary), or a plain number of bytes."""
    m = re.fullmatch(_NUM + r"\s*([a-zA-Z]*)", text.strip())
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"bad size {text!r}: use e.g. 512MiB, 2GiB, 100MB or a number of bytes")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_rate(text: str) -> int:
    """Bits per second in a RATE string: `200Mbit/s`, `200mbit`, `1Gbit/s`, `50MB/s`, `40MiB/s`, plain = bytes/s."""
    m = re.fullmatch(_NUM + r"\s*([a-zA-Z]*)(/s)?", text.strip())
    if m:
        unit = m.group(2).lower()
        if unit in _BIT_UNITS:
            return int(float(m.group(1)) * _BIT_UNITS[unit])
        if (unit in _SIZE_UNITS and len(unit) != 1) or unit in ("", "b"):  # no bare K/M/G: ambiguous for rates
            return int(float(m.group(1)) * _SIZE_UNITS[unit] * 8)
    raise ValueError(f"bad rate {text!r}: use e.g. 200Mbit/s, 200mbit, 50MB/s, 40MiB/s or a number of bytes/s")


def fmt_size(n: int) -> str:
    """Shortest exact binary spelling of a size (for headlines and file names)."""
    for unit, mult in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return f"{n}B"


def fmt_rate(bps: float) -> str:
    """Rate in the largest decimal bit unit that keeps it readable (`200Mbit/s`)."""
    for unit, mult in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= mult:
            return f"{bps / mult:g}{unit}"
    return f"{bps:g}bit/s"
