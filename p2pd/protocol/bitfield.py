"""Piece sets as Python ints (bit i = piece i) and their wire form (MSB-first bytes, as BitTorrent).

Big-int bit operations run in C, so set algebra over thousands of pieces costs microseconds; that
keeps the picker's per-request work small enough for the daemon's hot path.
"""

from __future__ import annotations


def to_bytes(mask: int, num_pieces: int) -> bytes:
    return mask.to_bytes((num_pieces + 7) // 8, "little").translate(_REV)


def from_bytes(bits: bytes, num_pieces: int) -> int:
    # Reverse bit order within each byte, then read little-endian: bit i of the int = piece i.
    return int.from_bytes(bits.translate(_REV), "little") & ((1 << num_pieces) - 1)


def indices(mask: int) -> list[int]:
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


def full(num_pieces: int) -> int:
    return (1 << num_pieces) - 1


_REV = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))
