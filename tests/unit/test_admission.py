"""Caps on incoming peer connections (p2pd/admission.py), issue #14 row 4."""

from __future__ import annotations

import resource

from p2pd.admission import FD_RESERVE, Admission, incoming_cap, raise_fd_limit


def test_total_and_per_address_caps_and_release() -> None:
    a = Admission(max_total=5, max_per_addr=2)
    assert a.admit("10.0.0.1") is None
    assert a.admit("10.0.0.1") is None
    assert "per-address cap" in (a.admit("10.0.0.1") or "")
    for host in ("10.0.0.2", "10.0.0.3", "10.0.0.4"):
        assert a.admit(host) is None
    assert "the cap" in (a.admit("10.0.0.5") or "")
    assert a.total == 5 and a.refused == 2
    a.release("10.0.0.1")
    assert a.admit("10.0.0.5") is None  # room again
    assert a.admit("10.0.0.1") is not None  # total full again
    for _ in range(3):
        a.release("10.0.0.1")  # more releases than admissions never go negative
    assert a.by_addr.get("10.0.0.1") is None and a.total >= 0


def test_the_cap_leaves_half_the_fds_free() -> None:
    assert incoming_cap(512, 1024) == (1024 - FD_RESERVE) // 2
    assert incoming_cap(512, 1 << 20) == 512
    assert incoming_cap(512, 10) == 1


def test_raise_fd_limit_goes_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
        got = raise_fd_limit()
        assert got == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if hard != resource.RLIM_INFINITY:
            assert got == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
