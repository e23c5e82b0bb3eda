"""A daemon's start-up imports only what every daemon uses: each process pays for its imports in CPU (~0.25 s for
aioquic, ~0.1 s for prometheus_client on the 2-core test machine), and an emulated swarm starts dozens of daemons.
A restarting daemon (churn) serves its peers again only once they are done: aioice (the STUN codec, ~0.2 s) is
imported by the NAT monitor once the daemon serves, cryptography's X.509 layer (~0.1 s) at the first certificate
(--encrypt, a UDP punch)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# the udp-punch path's QUIC; --metrics-listen; the STUN codec; certificates
LAZY = ("aioquic", "prometheus_client", "aioice", "cryptography.x509")


def test_daemon_import_leaves_optional_heavy_modules_out() -> None:
    code = f"import sys; import p2pd.cli, p2pd.daemon; print(' '.join(m for m in {LAZY!r} if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=True)
    assert out.stdout.split() == []


def test_quic_path_still_imports_aioquic_where_used() -> None:
    code = "import sys; from p2pd import quic_stream; quic_stream.configuration(True); print('aioquic' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=True)
    assert out.stdout.strip() == "True"


def test_stun_and_certificates_still_work_where_used() -> None:
    code = (
        "import sys; from p2pd.protocol import stun; from p2pd import quic_stream, tls;"
        "stun.parse_request(stun.binding_request(stun.new_transaction_id())); quic_stream.Credentials('ab' * 16);"
        "tls.PeerTls('ab' * 16); print('aioice' in sys.modules, 'cryptography.x509' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=True)
    assert out.stdout.split() == ["True", "True"]
