"""Relay tokens and the relay greeting (sans-IO): a token works only for its two nodes, once each, before
it expires, at the relay whose key minted it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pd.protocol import rendezvous as rv

A, B, C = "a" * 32, "b" * 32, "c" * 32
KEY, OTHER_KEY = b"k" * 32, b"o" * 32


def test_a_token_names_its_pair_and_expiry() -> None:
    t = rv.mint_token(KEY, A, B, now=1000.0, ttl=30)
    for node in (A, B):
        claims = rv.verify_token([OTHER_KEY, KEY], t, node, now=1029.0)
        assert (claims.a, claims.b, claims.expires) == (A, B, 1030.0)


@pytest.mark.parametrize(
    ("keys", "node", "now", "why"),
    [
        ([OTHER_KEY], A, 1000.0, "unknown token"),
        ([KEY], C, 1000.0, "not issued to node cccccccc"),
        ([KEY], A, 1031.0, "expired"),
    ],
)
def test_refused_tokens_say_why(keys: list[bytes], node: str, now: float, why: str) -> None:
    t = rv.mint_token(KEY, A, B, now=1000.0, ttl=30)
    with pytest.raises(rv.TokenError, match=why):
        rv.verify_token(keys, t, node, now)


@given(st.binary(max_size=300))
def test_random_bytes_are_never_a_token(data: bytes) -> None:
    with pytest.raises(rv.TokenError):
        rv.verify_token([KEY], data, A, 0.0)


def test_a_token_altered_in_any_byte_is_unknown() -> None:
    t = rv.mint_token(KEY, A, B, now=0.0)
    for i in range(len(t)):
        bad = t[:i] + bytes([t[i] ^ 1]) + t[i + 1 :]
        with pytest.raises(rv.TokenError):
            rv.verify_token([KEY], bad, A, 0.0)


def test_each_node_uses_a_token_once() -> None:
    ledger = rv.TokenLedger()
    t = rv.mint_token(KEY, A, B, now=0.0, ttl=30)
    ca = rv.verify_token([KEY], t, A, 1.0)
    ledger.claim(ca, A, 1.0)
    ledger.claim(rv.verify_token([KEY], t, B, 1.0), B, 1.0)
    with pytest.raises(rv.TokenError, match="already used by node aaaaaaaa"):
        ledger.claim(ca, A, 2.0)
    assert len(ledger) == 2
    ledger.claim(rv.verify_token([KEY], rv.mint_token(KEY, A, C, now=100.0), A, 100.0), A, 100.0)
    assert len(ledger) == 1  # the expired ones are forgotten


def test_hello_round_trip_and_garbage() -> None:
    t = rv.mint_token(KEY, A, B, now=0.0)
    hello = rv.encode_hello(t, A)
    n = rv.parse_hello_fixed(hello[: rv.HELLO_FIXED])
    assert rv.parse_hello_rest(hello[rv.HELLO_FIXED :]) == (t, A) and n == len(hello) - rv.HELLO_FIXED
    with pytest.raises(rv.HelloError, match="not a relay greeting"):
        rv.parse_hello_fixed(b"GET / ")
    with pytest.raises(rv.HelloError, match="version"):
        rv.parse_hello_fixed(b"P2PR\x09\x10")
    with pytest.raises(rv.HelloError, match="node id"):
        rv.parse_hello_rest(t + b"Z" * 32)
    with pytest.raises(ValueError):
        rv.encode_hello(b"", A)
