"""HTTP admin API of the tracker: FastAPI (OpenAPI at /openapi.json, docs at /docs) on hypercorn's trio
worker, so it runs in the tracker's own nursery next to the RPC and UDP front ends.

Why FastAPI + hypercorn: the OpenAPI description comes from the code (it cannot drift from it), the
request validation is declarative, hypercorn serves ASGI on trio natively, and both are widely used
and maintained. The app only calls the `Store` interface, so it works the same on memory and Redis.

Security: every route except `/healthz`, `/ui` (the cluster page: HTML with no data in it), `/openapi.json` and
`/docs` needs `Authorization: Bearer
TOKEN` (compared in constant time); without it the answer is 401. `/metrics` is behind the token too
(Prometheus sends it with `authorization: {credentials: TOKEN}` in the scrape config). Request bodies
are capped at 64 KiB (413), malformed ones get 422 with the reason, and errors are JSON
`{"error": {"code", "message"}}` like the RPC's.
"""

from __future__ import annotations

import hmac
import logging
import time
from functools import cache
from importlib.resources import files
from typing import TYPE_CHECKING, Any

import trio
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from p2pd.errors import ErrorCode
from tracker import cluster_view as CV
from tracker import validate as V
from tracker.budgets import Budgets
from tracker.preheat import select
from tracker.validate import TrackerError

if TYPE_CHECKING:
    from tracker.server import TrackerServer

log = logging.getLogger("tracker.admin")
MAX_BODY = 64 * 1024
# The page is self-contained: its inline script and style may run, it may fetch only from this listener, and
# nothing else loads (cluster nodes have no internet; an injected <img>/<script src> goes nowhere either).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
}
# HTTP status of each code the admin API answers with; any other code is a 500.
STATUS = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.UNREACHABLE: 503,
    ErrorCode.INTERNAL: 500,
}


class Unauthorized(Exception):
    pass


class TagBody(BaseModel):
    artifact_id: str = Field(pattern=r"^[0-9a-f]{64}$", description="64 hex chars")


class PreheatBody(BaseModel):
    name: str = Field(description="NAME:TAG to fetch on the chosen nodes")
    zone: str | None = Field(None, description="only nodes labelled zone=ZONE")
    label: str | None = Field(None, description="only nodes with this label, KEY=VALUE")
    all: bool = Field(False, description="every registered node")


@cache
def cluster_page() -> str:
    return files("tracker").joinpath("cluster_page.html").read_text(encoding="utf-8")


def error(status: int, code: ErrorCode, message: str, **headers: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code.value, "message": message}}, status_code=status, headers=headers or None
    )


class BodyLimit:
    """ASGI middleware: refuse request bodies over MAX_BODY bytes (413) before the app reads them."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            await error(413, ErrorCode.BAD_REQUEST, f"request body over {MAX_BODY // 1024} KiB")(scope, receive, send)
            return
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            msg: dict[str, Any] = await receive()
            seen += len(msg.get("body", b""))
            if seen > MAX_BODY:
                raise TrackerError(ErrorCode.BAD_REQUEST, f"request body over {MAX_BODY // 1024} KiB")
            return msg

        await self.app(scope, limited, send)


def make_app(server: TrackerServer, token: str) -> Any:
    """The admin ASGI app for a `tracker.server.TrackerServer` (its store and metrics)."""
    store = server.store
    metrics = server.metrics
    bearer = HTTPBearer(auto_error=False, description="The tracker's admin token (--admin-token).")
    expected = token.encode()

    async def auth(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if (
            cred is None
            or cred.scheme.lower() != "bearer"
            or not hmac.compare_digest(cred.credentials.encode(), expected)
        ):
            raise Unauthorized()

    app = FastAPI(
        title="p2pd tracker admin API",
        version="1",
        description="Nodes, artifacts, swarms, tags and counters of a p2pd tracker. Bearer token required.",
    )
    guarded = [Depends(auth)]

    @app.exception_handler(Unauthorized)
    async def _unauth(request: Request, exc: Unauthorized) -> JSONResponse:
        return error(401, ErrorCode.UNAUTHORIZED, "missing or wrong admin token", **{"WWW-Authenticate": "Bearer"})

    @app.exception_handler(TrackerError)
    async def _terr(request: Request, exc: TrackerError) -> JSONResponse:
        return error(STATUS.get(exc.code, 500), exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        msgs = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return error(422, ErrorCode.BAD_REQUEST, f"invalid request: {msgs}")

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.admin_requests[(getattr(route, "path", "other"), response.status_code)] += 1
        return response

    @app.get("/healthz", summary="Liveness (no token needed)")
    async def healthz() -> dict[str, Any]:
        return {"ok": True, "store": store.kind}

    @app.get("/v1/stats", dependencies=guarded, summary="Counters and sizes")
    async def stats() -> dict[str, Any]:
        return {**await store.stats(), **server.signals.stats()}

    @app.get("/v1/nodes", dependencies=guarded, summary="Registered nodes (oldest heartbeat first)")
    async def nodes(limit: int = Query(1000, ge=1, le=100_000)) -> dict[str, Any]:
        return {"nodes": await store.node_list(limit)}

    @app.post("/v1/nodes/{node_id}/evict", dependencies=guarded, summary="Drop a node now")
    async def evict(node_id: str) -> dict[str, Any]:
        V.node_id(node_id)
        if not await store.evict(node_id):
            raise TrackerError(ErrorCode.NOT_FOUND, f"no node {node_id}")
        log.info("node %s evicted by admin", node_id)
        return {"evicted": node_id}

    @app.get("/v1/artifacts", dependencies=guarded, summary="Artifacts: names, size, holders")
    async def artifacts() -> dict[str, Any]:
        return {"artifacts": await store.artifact_list()}

    @app.get("/v1/swarm", dependencies=guarded, summary="Holders of an artifact and their progress")
    async def swarm(name: str | None = None, artifact_id: str | None = None) -> dict[str, Any]:
        if (name is None) == (artifact_id is None):
            raise TrackerError(ErrorCode.BAD_REQUEST, "give exactly one of name=NAME:TAG or artifact_id=ID")
        if name is not None:
            aid, _ = await store.resolve(V.name(name))
        else:
            aid = V.artifact_id(artifact_id)
        out = await store.swarm(aid)
        out["name"] = name
        return out

    @app.get("/v1/tags/{name:path}", dependencies=guarded, summary="Where NAME:TAG points, with its history")
    async def get_tag(name: str) -> dict[str, Any]:
        V.name(name)
        hist = await store.history(name)
        if not hist:
            raise TrackerError(ErrorCode.NOT_FOUND, f"unknown name {name!r}")
        return {"name": name, "artifact_id": hist[-1]["artifact_id"], "history": hist}

    @app.put("/v1/tags/{name:path}", dependencies=guarded, summary="Point NAME:TAG at a published artifact")
    async def put_tag(name: str, body: TagBody) -> dict[str, Any]:
        V.name(name)
        moved = await store.tag(name, body.artifact_id)
        if moved:
            log.info("tag %s moved to %s by admin", name, body.artifact_id)
        return {"name": name, "artifact_id": body.artifact_id, "moved": moved}

    @app.get("/v1/policy", dependencies=guarded, summary="Cluster policy pushed to nodes with heartbeats")
    async def get_policy() -> dict[str, Any]:
        return {"policy": await store.policy()}

    @app.put(
        "/v1/policy",
        dependencies=guarded,
        summary="Replace the cluster policy: {egress_limit, ingress_limit} in bytes/s per node, null = none",
    )
    async def put_policy(body: dict[str, Any]) -> dict[str, Any]:
        policy = V.policy(body.get("policy", body))
        await store.set_policy(policy)
        log.info("policy set by admin: %s", policy)
        return {"policy": policy}

    @app.get(
        "/v1/throttle",
        dependencies=guarded,
        summary="Global budgets, current use (as nodes measured it) and every node's share, bytes/s",
    )
    async def get_throttle() -> dict[str, Any]:
        return await store.throttle_view()

    @app.put(
        "/v1/throttle",
        dependencies=guarded,
        summary="Set global budgets {total, zones: {NAME: rate}, cross_zone, priority: {ARTIFACT_ID: weight}} "
        "in bytes/s; null/absent = no such budget; total 0 pauses every transfer (none fails)",
    )
    async def put_throttle(body: dict[str, Any]) -> dict[str, Any]:
        budgets = Budgets.from_json(body.get("budgets", body))
        if budgets.zones:
            known = await store.known_zones()
            unknown = sorted(z for z in budgets.zones if z not in known)
            if unknown:
                raise TrackerError(
                    ErrorCode.BAD_REQUEST,
                    f"unknown zone {unknown[0]!r}: no registered node has the label zone={unknown[0]} "
                    f"(known: {', '.join(sorted(z for z in known if z)) or 'none'})",
                )
        await store.set_budgets(budgets)
        log.info("global budgets set by admin: %s", budgets.to_json())
        return await store.throttle_view()

    @app.delete("/v1/throttle", dependencies=guarded, summary="Clear every global budget (paused transfers resume)")
    async def clear_throttle() -> dict[str, Any]:
        await store.set_budgets(Budgets())
        log.info("global budgets cleared by admin")
        return await store.throttle_view()

    @app.post(
        "/v1/preheat",
        dependencies=guarded,
        summary="Order nodes to fetch NAME:TAG into their caches (exactly one of zone, label=K=V, all=true); "
        "each chosen node learns it at once over its signal channel, or else from its next heartbeat reply",
    )
    async def preheat(body: PreheatBody) -> dict[str, Any]:
        name = V.name(body.name)
        aid, _ = await store.resolve(name)  # unknown name: 404
        label: tuple[str, str] | None = None
        if body.label is not None:
            key, eq, value = body.label.partition("=")
            if not eq or not key:
                raise TrackerError(ErrorCode.BAD_REQUEST, f"label must be KEY=VALUE, got {body.label!r}")
            label = (key, value)
        try:
            nodes, selector = select(await store.node_list(100_000), zone=body.zone, label=label, all_nodes=body.all)
        except ValueError as e:
            raise TrackerError(ErrorCode.BAD_REQUEST, str(e)) from None
        order = await store.preheat_add(name, aid, nodes, selector)
        pushed = server.signals.nudge(nodes, {"kind": "preheat"})
        log.info(
            "preheat %s (%s) ordered by admin for %d nodes (%s); %d told at once over their signal channels",
            name,
            aid[:12],
            len(nodes),
            selector,
            pushed,
        )
        return {"order": order.order_id, "name": name, "artifact_id": aid, "selector": selector, "nodes": nodes}

    @app.get(
        "/v1/preheat",
        dependencies=guarded,
        summary="Preheat orders (of NAME:TAG if given), newest first, with every chosen node's state "
        "(waiting, fetching, complete, failed), progress (0..1) and error",
    )
    async def preheat_status(name: str | None = None) -> dict[str, Any]:
        if name is not None:
            V.name(name)
        book = await store.preheat_book()
        progress: dict[str, dict[str, float]] = {}
        for aid in {o.artifact_id for o in book.orders.values() if name is None or o.name == name}:
            try:
                sw = await store.swarm(aid)
            except TrackerError:  # nobody holds it yet (an in-memory tracker forgets artifacts nobody holds)
                continue
            progress[aid] = {h["node_id"]: float(h["progress"]) for h in sw["holders"]}
        return {"orders": book.status(lambda aid, nid: progress.get(aid, {}).get(nid), name)}

    @app.get(
        "/ui", summary="The live cluster page (HTML; no data in it, it asks for the token)", response_class=HTMLResponse
    )
    async def ui() -> HTMLResponse:
        return HTMLResponse(cluster_page(), headers=PAGE_HEADERS)

    @app.get(
        "/v1/cluster",
        dependencies=guarded,
        summary="What the cluster page shows: nodes by zone (health, NAT type, how reached), the busiest "
        "artifacts' swarms, cluster throughput per interval, budgets vs use; lists bounded",
    )
    async def cluster(rows: int = Query(CV.MAX_ROWS, ge=0, le=10_000)) -> JSONResponse:
        view = await store.cluster_view(rows)
        out = {"at": time.time(), "interval": store.interval, "store": store.kind, **view}
        out["throughput"] = server.throughput.to_json()
        return JSONResponse(out)  # already plain JSON: skip FastAPI's per-value encoder (most of the time at scale)

    @app.get("/metrics", dependencies=guarded, summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prom() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(await store.stats()), media_type="text/plain; version=0.0.4")

    return BodyLimit(app)


async def serve_admin(
    server: TrackerServer,
    host: str,
    port: int,
    token: str,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin API on host:port until cancelled; started with the bound port."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("tracker.admin.http")
    config.graceful_timeout = 1.0

    async def run(*, task_status: trio.TaskStatus[list[str]]) -> None:
        await serve(make_app(server, token), config, task_status=task_status)

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(run)
        task_status.started(int(binds[0].rsplit(":", 1)[1]))
