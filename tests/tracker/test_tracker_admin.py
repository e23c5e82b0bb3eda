"""Admin HTTP API (token, OpenAPI, metrics, bad requests) and the `p2p-tracker admin` CLI, against a real
tracker process."""

from __future__ import annotations

import json
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pd.cluster import TRACKER_CLI, LocalCluster, child_env
from p2pd.tracker_client import TrackerClient
from tests.tracker.tracker_testutil import make_manifest, nid

pytest.importorskip("fastapi", reason="the admin API needs the pip packages fastapi and hypercorn")
pytest.importorskip("hypercorn", reason="the admin API needs the pip packages fastapi and hypercorn")

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def admin() -> Iterator[dict[str, Any]]:
    tmp = tempfile.TemporaryDirectory(prefix="p2p-tracker-admin-")
    cluster = LocalCluster(Path(tmp.name), secure=False)  # fake node ids: the mechanics of the admin API
    try:
        t = cluster.start_tracker("--admin-listen", "127.0.0.1:0", "--admin-token", TOKEN, interval=5)
        url = f"http://127.0.0.1:{t.admin_port}"
        trackers = [t.address]

        async def populate() -> str:
            async with (
                TrackerClient(trackers, nid(1), ("127.0.0.1", 9001), {"zone": "eu-1"}, "0.1.0") as a,
                TrackerClient(trackers, nid(2), ("127.0.0.1", 9002), {"zone": "us-2"}, "0.1.0") as b,
            ):
                await a.register()
                await b.register()
                aid = await a.publish("llama-3-8b:v2", make_manifest(1, 5 << 30))
                await a.publish("other:v1", make_manifest(2))
                await a.heartbeat({aid: 1.0})
                await b.heartbeat({aid: 0.25})
                return aid

        aid = trio.run(populate)
        yield {"url": url, "aid": aid, "tcp_port": t.port}
    finally:
        cluster.close()
        tmp.cleanup()


def http(
    url: str,
    path: str,
    token: str | None = TOKEN,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    if body is not None:
        h.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url + path, data=body, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            data = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        data, status = e.read(), e.code
    try:
        return status, json.loads(data)
    except ValueError:
        return status, data.decode()


def cli(admin: dict[str, Any], *args: str, token: str = TOKEN, url: str | None = None) -> Any:
    """Run `p2p-tracker admin ...` in-process (fast); one test below also runs it as a real process."""
    from typer.testing import CliRunner

    from tracker.admin_cli import admin_app

    return CliRunner().invoke(admin_app, [*args, "--tracker", url or admin["url"], "--token", token])


def test_token_required_everywhere_but_health_and_openapi(admin: dict[str, Any]) -> None:
    url = admin["url"]
    for path in (
        "/v1/stats",
        "/v1/nodes",
        "/v1/artifacts",
        "/v1/swarm?name=llama-3-8b:v2",
        "/metrics",
        "/v1/tags/llama-3-8b:v2",
    ):
        for token in (None, "wrong"):
            status, body = http(url, path, token=token)
            assert status == 401, (path, token, status)
            assert body["error"]["code"] == "unauthorized"
    assert http(url, "/v1/nodes/" + nid(1) + "/evict", token=None, method="POST")[0] == 401
    assert http(url, "/healthz", token=None) == (200, {"ok": True, "store": "memory"})
    status, spec = http(url, "/openapi.json", token=None)
    assert status == 200 and spec["openapi"].startswith("3.")
    assert {
        "/v1/nodes",
        "/v1/artifacts",
        "/v1/swarm",
        "/v1/nodes/{node_id}/evict",
        "/v1/tags/{name}",
        "/v1/stats",
        "/metrics",
    } <= set(spec["paths"])
    assert "HTTPBearer" in json.dumps(spec["components"]["securitySchemes"])


def test_views_and_metrics(admin: dict[str, Any]) -> None:
    url, aid = admin["url"], admin["aid"]
    status, sw = http(url, "/v1/swarm?name=llama-3-8b:v2")
    assert status == 200 and sw["artifact_id"] == aid and (sw["complete"], sw["partial"]) == (1, 1)
    assert [h["progress"] for h in sw["holders"]] == [1.0, 0.25]
    status, metrics = http(url, "/metrics")
    assert status == 200 and "p2p_tracker_nodes 2" in metrics and "p2p_tracker_rpc_seconds_bucket" in metrics
    assert 'p2p_tracker_rpc_requests_total{method="publish",outcome="ok"} 2' in metrics


def test_malformed_and_oversized_requests_are_rejected_clearly(admin: dict[str, Any]) -> None:
    url = admin["url"]
    status, body = http(url, "/v1/nodes/not-a-node/evict", method="POST")
    assert status == 400 and "node_id" in body["error"]["message"]
    status, body = http(url, "/v1/tags/x:y", method="PUT", body=b'{"artifact_id": "nothex"}')
    assert status == 422 and "artifact_id" in body["error"]["message"]
    status, body = http(url, "/v1/tags/x:y", method="PUT", body=b"{not json")
    assert status == 422
    status, body = http(url, "/v1/tags/x:y", method="PUT", body=b"[" + b"1," * 40000 + b"1]")
    assert status == 413 and "64" in body["error"]["message"]
    status, body = http(url, "/v1/swarm")
    assert status == 400 and "exactly one" in body["error"]["message"]
    status, body = http(url, "/v1/swarm?name=missing:v1")
    assert status == 404 and body["error"]["code"] == "not_found"
    assert http(url, "/v1/nodes?limit=0")[0] == 422


def test_cli_tables_json_and_one_line_errors(admin: dict[str, Any]) -> None:
    aid = admin["aid"]
    r = cli(admin, "nodes")
    assert r.exit_code == 0 and nid(1) in r.stdout and "eu-1" in r.stdout and "2 node(s)" in r.stdout
    r = cli(admin, "artifacts", "--json")
    arts = {a["artifact_id"]: a for a in json.loads(r.stdout)["artifacts"]}
    assert arts[aid]["names"] == ["llama-3-8b:v2"] and arts[aid]["complete"] == 1
    r = cli(admin, "swarm", "llama-3-8b:v2")
    assert r.exit_code == 0 and "25.0%" in r.stdout and "100.0%" in r.stdout
    other = next(a for a in arts if a != aid)
    r = cli(admin, "tag", "llama-3-8b:latest", other)
    assert r.exit_code == 0 and "moved" in r.stdout
    assert http(admin["url"], "/v1/tags/llama-3-8b:latest")[1]["artifact_id"] == other
    r = cli(admin, "stats", "--json")
    assert json.loads(r.stdout)["nodes"] == 2
    r = cli(admin, "evict", nid(2))
    assert r.exit_code == 0 and f"evicted {nid(2)}" in r.stdout
    for r, needle, status in [
        (cli(admin, "evict", nid(2)), "no node", 3),
        (cli(admin, "nodes", token="wrong"), "refused the admin token (401)", 2),
        (cli(admin, "policy", "--egress-limit", "fast"), "--egress-limit", 2),
    ]:
        assert r.exit_code == status and r.stdout == "" and needle in r.stderr, (r.exit_code, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_process_errors_are_one_line(admin: dict[str, Any]) -> None:
    for args, token, needle, status in [  # the token from the environment, as docs/security.md advises
        (["stats", "--tracker", "http://127.0.0.1:9"], TOKEN, "cannot reach the tracker admin API", 4),
        (["nodes", "--tracker", admin["url"]], "wrong", "refused the admin token (401)", 2),
    ]:
        env = {**child_env(), "P2P_TRACKER_ADMIN_TOKEN": token}
        r = subprocess.run([*TRACKER_CLI, "admin", *args], capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == status and r.stdout == "", (r.returncode, r.stderr)
        assert needle in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_policy_is_set_by_admin_and_pushed_with_heartbeats(admin: dict[str, Any]) -> None:
    url = admin["url"]
    r = cli(admin, "policy", "--egress-limit", "50MB/s")
    assert r.exit_code == 0 and "egress_limit: 50 MB/s" in r.stdout
    assert http(url, "/v1/policy")[1] == {"policy": {"egress_limit": 50e6}}
    status, body = http(url, "/v1/policy", method="PUT", body=b'{"policy": {"egress": 5}}')
    assert status == 400 and "unknown policy key" in body["error"]["message"]
    status, body = http(url, "/v1/policy", method="PUT", body=b'{"policy": {"ingress_limit": -1}}')
    assert status == 400
    seen: list[dict[str, Any]] = []

    async def node() -> None:
        port = int(admin["tcp_port"])
        async with TrackerClient([("127.0.0.1", port)], nid(7), ("127.0.0.1", 9007)) as tc:
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda task_status: tc.run_heartbeats(dict, on_policy=seen.append, task_status=task_status)
                )
                with trio.fail_after(5):
                    while not seen:
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()

    trio.run(node)
    assert seen[-1] == {"egress_limit": 50e6}
    r = cli(admin, "policy", "--egress-limit", "none", "--json")
    assert json.loads(r.stdout) == {"policy": {}}
