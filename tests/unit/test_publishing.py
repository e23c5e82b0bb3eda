"""Issue #14 row 1, the rules: who may move a name (tracker/publishers.py) and what a fetcher accepts
(p2pd/provenance.py). The same rules run against real processes in tests/integration/test_trust.py."""

from __future__ import annotations

import pytest

from p2pd import provenance
from p2pd.errors import ErrorCode
from p2pd.protocol.auth import NodeKey
from p2pd.rpc import RpcError
from tracker.publishers import Publisher, Publishers, check_publish

A, B = NodeKey.from_seed(b"\x01" * 32), NodeKey.from_seed(b"\x02" * 32)
X, Y = "a" * 64, "b" * 64


def fields(key: NodeKey, name: str, aid: str, at: int) -> dict[str, object]:
    return provenance.sign(key, name, aid, at).params()


def test_the_first_signer_owns_a_name_and_only_it_moves_it() -> None:
    anyone = Publishers()
    first = check_publish(fields(A, "m:v1", X, 10), "m:v1", X, anyone, None)
    assert first is not None and first.owner == A.node_id
    assert check_publish(fields(B, "m:v1", X, 11), "m:v1", X, anyone, first) is None  # B seeds it too: no move
    with pytest.raises(ValueError, match=f"belongs to node {A.node_id[:8]}"):
        check_publish(fields(B, "m:v1", Y, 11), "m:v1", Y, anyone, first)
    moved = check_publish(fields(A, "m:v1", Y, 11), "m:v1", Y, anyone, first)
    assert moved is not None and moved.artifact_id == Y


@pytest.mark.parametrize(
    ("params", "why"),
    [
        ({}, "not signed"),
        (fields(A, "m:v1", Y, 10), "does not verify"),  # signed for another artifact
        (fields(A, "other:v1", X, 10), "does not verify"),  # signed for another name
        ({**fields(A, "m:v1", X, 10), "key": B.public}, "does not verify"),
    ],
)
def test_an_unsigned_or_misdirected_publish_is_refused(params: dict[str, object], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        check_publish(params, "m:v1", X, Publishers(), None)


def test_an_older_signed_publish_cannot_move_the_tag_back() -> None:
    now = check_publish(fields(A, "m:v1", Y, 20), "m:v1", Y, Publishers(), None)
    assert now is not None
    with pytest.raises(ValueError, match="older"):
        check_publish(fields(A, "m:v1", X, 10), "m:v1", X, Publishers(), now)


def test_a_publishers_file_scopes_names() -> None:
    scopes = Publishers([Publisher("ml", A.node_id, ("models/", "envs/"))])
    assert check_publish(fields(A, "models/m:v1", X, 1), "models/m:v1", X, scopes, None)
    for key, name in ((A, "other:v1"), (B, "models/m:v1")):
        with pytest.raises(ValueError, match="no prefix of that name"):
            check_publish(fields(key, name, X, 1), name, X, scopes, None)


SECURED = provenance.Trust(secured=True, trusted=())


def test_an_env_needs_a_signature_from_a_trusted_publisher() -> None:
    signed = provenance.sign(A, "envs/e:v1", X, 5)
    provenance.check(signed, "envs/e:v1", X, "env", SECURED)  # any member, when no one is named
    provenance.check(signed, "envs/e:v1", X, "env", provenance.Trust(True, (A.node_id,)))
    with pytest.raises(RpcError, match="does not trust") as e:
        provenance.check(signed, "envs/e:v1", X, "env", provenance.Trust(True, (B.node_id,)))
    assert e.value.code is ErrorCode.UNAUTHORIZED
    with pytest.raises(RpcError, match="no publisher signature"):
        provenance.check(None, "envs/e:v1", X, "env", SECURED)
    provenance.check(None, "m:v1", X, "files", SECURED)  # a model is checked by its hashes alone
    provenance.check(None, "envs/e:v1", X, "env", provenance.Trust(False, ()))  # --insecure: as before


def test_a_signature_that_does_not_verify_is_an_integrity_error_for_any_kind() -> None:
    signed = provenance.sign(A, "m:v1", X, 5)
    for name, aid in (("m:v1", Y), ("m:v2", X)):
        with pytest.raises(RpcError, match="does not verify") as e:
            provenance.check(signed, name, aid, "files", SECURED)
        assert e.value.code is ErrorCode.INTEGRITY
