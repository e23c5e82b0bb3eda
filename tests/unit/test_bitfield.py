"""Piece sets as ints and their MSB-first wire form (p2pd/protocol/bitfield.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pd.protocol import bitfield as bf
from p2pd.protocol.wire import bitfield_bytes, check_bitfield
from tests.unit._util import FAST


@st.composite
def masks(draw: st.DrawFn) -> tuple[int, int]:
    n = draw(st.integers(min_value=0, max_value=2000))
    pieces = draw(st.sets(st.integers(min_value=0, max_value=max(n - 1, 0)), max_size=64)) if n else set()
    mask = 0
    for p in pieces:
        mask |= 1 << p
    if draw(st.booleans()):
        mask |= draw(st.integers(min_value=0, max_value=(1 << n) - 1))
    return mask, n


@FAST
@given(masks())
def test_to_bytes_from_bytes_inverse(mn: tuple[int, int]) -> None:
    mask, n = mn
    data = bf.to_bytes(mask, n)
    assert len(data) == bitfield_bytes(n)
    check_bitfield(data, n)  # what we send passes our own receive check
    assert bf.from_bytes(data, n) == mask
    assert bf.to_bytes(bf.from_bytes(data, n), n) == data


@FAST
@given(
    st.integers(min_value=1, max_value=300).flatmap(
        lambda n: st.tuples(st.just(n), st.binary(min_size=bitfield_bytes(n), max_size=bitfield_bytes(n)))
    )
)
def test_from_bytes_masks_spare_bits(nb: tuple[int, bytes]) -> None:
    n, data = nb
    mask = bf.from_bytes(data, n)
    assert mask < (1 << n)
    # Every piece bit agrees with the MSB-first reading of the bytes.
    for i in range(n):
        assert bool(mask >> i & 1) == bool(data[i // 8] & (0x80 >> (i % 8)))


def test_msb_first_layout() -> None:
    assert bf.to_bytes(1 << 0, 8) == b"\x80"
    assert bf.to_bytes(1 << 7, 8) == b"\x01"
    assert bf.to_bytes(1 << 8, 9) == b"\x00\x80"
    assert bf.to_bytes((1 << 0) | (1 << 9), 16) == b"\x80\x40"
    assert bf.to_bytes(bf.full(10), 10) == b"\xff\xc0"
    assert bf.from_bytes(b"\x80", 1) == 1
    assert bf.from_bytes(b"\x00\x01", 16) == 1 << 15


def test_empty() -> None:
    assert bf.to_bytes(0, 0) == b""
    assert bf.from_bytes(b"", 0) == 0
    assert bf.indices(0) == []
    assert bf.full(0) == 0


@FAST
@given(st.sets(st.integers(min_value=0, max_value=5000), max_size=100))
def test_indices_ascending(pieces: set[int]) -> None:
    mask = sum(1 << p for p in pieces)
    assert bf.indices(mask) == sorted(pieces)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 2048])
def test_full(n: int) -> None:
    assert bf.indices(bf.full(n)) == list(range(n))
    data = bf.to_bytes(bf.full(n), n)
    check_bitfield(data, n)
    assert data[: n // 8] == b"\xff" * (n // 8)
