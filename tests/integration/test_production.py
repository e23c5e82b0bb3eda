"""Running it as a service: systemd notifications from the real processes, settings from a config file,
Prometheus metrics of a real transfer, the unit files and the Grafana dashboard."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from p2pd.cluster import HOST, P2PD_CLI, TRACKER_CLI, LocalCluster
from p2pd.rpc import free_port

REPO = Path(__file__).resolve().parents[2]


class NotifySocket:
    """What systemd does for a Type=notify service: a datagram socket whose path goes in $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.seen: list[dict[str, str]] = []

    def wait_for(self, key: str, timeout: float, proc: Any = None) -> dict[str, str]:
        """Messages until one sets `key`; fails if the process exits first or after `timeout` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and not proc.alive():
                raise AssertionError(f"{proc.name} exited before {key}: {proc.log_tail()}")
            self.sock.settimeout(0.2)
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            msg = dict(line.split("=", 1) for line in data.splitlines() if line)
            self.seen.append(msg)
            if key in msg:
                return msg
        raise AssertionError(f"no {key} within {timeout} s; got {self.seen}")

    def drain(self) -> None:
        """Read what is queued: a datagram socket queues only ~10 messages (net.unix.max_dgram_qlen), then
        the sender's next one is refused, as it would be if systemd stopped reading."""
        self.sock.setblocking(False)
        try:
            while True:
                self.sock.recv(4096)
        except BlockingIOError:
            pass

    def close(self) -> None:
        self.sock.close()


def answers_tcp(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=2):
            return True
    except OSError:
        return False


def scrape(port: int) -> dict[str, list[Any]]:
    """The samples of a /metrics page by sample name."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out: dict[str, list[Any]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def total(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    return float(sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())))


def test_tracker_and_daemon_tell_systemd_when_ready_and_stopping(tmp_path: Path) -> None:
    with LocalCluster(tmp_path / "c") as c:
        tn = NotifySocket(tmp_path / "tracker.notify")
        tport = free_port()
        ready = tmp_path / "tracker.ready.json"
        tracker = c.spawn(
            [*TRACKER_CLI, "serve", "--listen", f"{HOST}:{tport}", "--ready-file", str(ready)],
            "tracker",
            env={"NOTIFY_SOCKET": str(tn.path), "WATCHDOG_USEC": "400000"},
        )
        msg = tn.wait_for("READY", 30, tracker)
        assert ready.exists() and answers_tcp(tport)  # READY=1 only once it serves
        assert msg["MAINPID"] == str(tracker.pid) and "serving" in msg["STATUS"]
        tn.wait_for("WATCHDOG", 5, tracker)

        # the daemon takes every setting from its config file (the unit runs `p2pd run --config FILE`)
        dn = NotifySocket(tmp_path / "daemon.notify")
        port, mport = free_port(), free_port()
        conf = tmp_path / "p2pd.toml"
        conf.write_text(
            f'tracker = "{HOST}:{tport}"\nlisten = "{HOST}:{port}"\ndata_dir = "{tmp_path / "node"}"\n'
            f'metrics_listen = "{HOST}:{mport}"\nmax_peers = 7\n[label]\nzone = "z1"\n'
        )
        daemon = c.spawn(
            [*P2PD_CLI, "run", "--config", str(conf)],
            "node",
            env={"NOTIFY_SOCKET": str(dn.path), "WATCHDOG_USEC": "400000"},
        )
        msg = dn.wait_for("READY", 60, daemon)
        statuses = [m["STATUS"] for m in dn.seen if "STATUS" in m]
        assert "registering with the tracker" in statuses[0]  # said while it was not ready yet
        # at READY=1 it listens for peers, serves metrics and answers on its control socket
        assert answers_tcp(port) and answers_tcp(mport)
        status = json.loads(
            subprocess.run(
                [*P2PD_CLI, "status", "--json", "--data-dir", str(tmp_path / "node")],
                capture_output=True,
                timeout=60,
                check=True,
                env=c.env,
            ).stdout
        )
        assert status["listen"] == f"{HOST}:{port}" and status["metrics_port"] == mport
        assert msg["MAINPID"] == str(daemon.pid) and f"port {port}" in msg["STATUS"]
        dn.wait_for("WATCHDOG", 5, daemon)

        dn.drain()
        daemon.signal(signal.SIGTERM)
        assert dn.wait_for("STOPPING", 10)["STOPPING"] == "1"
        assert daemon.wait(20) == 0
        tn.drain()
        tracker.signal(signal.SIGTERM)
        assert tn.wait_for("STOPPING", 10)["STOPPING"] == "1"
        assert tracker.wait(20) == 0
        tn.close()
        dn.close()


def test_metrics_count_a_real_transfer(tmp_path: Path) -> None:
    with LocalCluster(tmp_path / "c") as c:
        c.start_tracker(interval=0.5)
        seed_m, leech_m = free_port(), free_port()
        seed = c.start_node("seed", "--metrics-listen", f"{HOST}:{seed_m}", "--egress-limit", "400MB/s")
        leech = c.start_node("leech", "--metrics-listen", f"{HOST}:{leech_m}")
        src = tmp_path / "model.bin"
        size = 24 << 20
        src.write_bytes(os.urandom(size))
        aid = c.publish(seed, src, "model:v1")
        c.fetch(leech, "model:v1")

        got = scrape(leech_m)
        art = aid[:16]
        assert total(got, "p2pd_bytes_received_total", artifact=art, path="direct") >= size
        pieces = total(got, "p2pd_pieces_verified_total", artifact=art)
        assert pieces >= 1 and pieces == leech.call_blocking("status")["artifacts"][0]["pieces_total"]
        assert total(got, "p2pd_pieces_failed_total", artifact=art) == 0
        assert total(got, "p2pd_fetch_seconds_count") == 1
        assert total(got, "p2pd_artifact_progress", artifact=art) == 1.0
        assert total(got, "p2pd_cache_bytes") == size  # fetched into the cache
        assert total(got, "p2pd_info") == 1

        sent = scrape(seed_m)
        assert total(sent, "p2pd_bytes_sent_total", artifact=art, path="direct") >= size
        assert total(sent, "p2pd_cache_bytes") == 0  # published in place, not in the cache
        limit = [s for s in sent["p2pd_rate_limit_bytes_per_second"] if s.labels["direction"] == "egress"]
        assert [(s.labels["by"], s.value) for s in limit] == [("flag", 400e6)]

        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://{HOST}:{seed_m}/other", timeout=10)
        assert e.value.code == 404


def metric_names_in(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:p2pd|p2p_tracker)_[a-z0-9_]+)", expr))


def exported_names() -> set[str]:
    """Every sample name the daemon and the tracker export (a daemon's collector on a stub, the tracker's
    renderer with every optional part on)."""
    from p2pd.metrics import DaemonMetrics, registered_names
    from tracker.metrics import Metrics
    from tracker.store import STORE_COUNTERS

    class Stub:  # what DaemonMetrics reads of a daemon with no artifacts yet
        node_id = "n" * 32
        swarms: dict[str, Any] = {}
        egress = ingress = None

        class cache:  # noqa: N801
            max_bytes = None

        def cache_items(self) -> list[Any]:
            return []

        class config:  # noqa: N801
            data_dir = Path("/var/lib/p2pd")

    names = registered_names(DaemonMetrics(Stub()).registry)  # type: ignore[arg-type]
    tm = Metrics()
    tm.stun = type("Stun", (), {"answered": 0, "dropped": 0})()
    text = tm.render({"nodes": 1, "artifacts": 1, "names": 1, **{k: 0 for k in STORE_COUNTERS}})
    for fam in text_string_to_metric_families(text):  # the tracker's hand-written exposition parses as Prometheus'
        names.add(fam.name)
        names.update(fam.name + s for s in ("_total", "_bucket", "_sum", "_count"))
    return names


def test_grafana_dashboard_charts_only_exported_metrics() -> None:
    dash = json.loads((REPO / "docs" / "grafana-p2pd.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used = set().union(*(metric_names_in(e) for e in exprs))
    assert any(n.startswith("p2pd_") for n in used) and any(n.startswith("p2p_tracker_") for n in used)
    missing = used - exported_names()
    assert not missing, f"the dashboard charts metrics nobody exports: {sorted(missing)}"
    # the daemon's event metrics are there even before any event
    assert {"p2pd_bytes_received_total", "p2pd_fetch_seconds_bucket", "p2pd_cache_evictions_total"} <= exported_names()


def test_systemd_analyze_verifies_both_units(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package `systemd`; .ci/run installs it)")
    bindir = Path(sys.executable).parent
    units = []
    for unit, exe in (("p2pd.service", "p2pd"), ("p2p-tracker.service", "p2p-tracker")):
        text = (REPO / "docs" / "systemd" / unit).read_text()
        for needed in ("Type=notify", "ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes", "User="):
            assert needed in text, (unit, needed)
        assert "CapabilityBoundingSet=\n" in text
        # verify also checks that ExecStart's program exists: point it at the one installed here
        installed = shutil.which(exe, path=str(bindir)) or shutil.which(exe)
        if installed is None:
            pytest.skip(f"{exe} is not installed as a command (pip install -e .)")
        (tmp_path / unit).write_text(text.replace(f"/usr/local/bin/{exe} ", f"{installed} "))
        units.append(str(tmp_path / unit))
    assert "ReadWritePaths=/var/lib/p2pd" in (tmp_path / "p2pd.service").read_text()
    r = subprocess.run([tool, "verify", *units], capture_output=True, text=True, timeout=120)
    # any message (an unknown key, a bad value) is a failure, not only a non-zero status
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr
