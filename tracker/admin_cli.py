"""`p2p-tracker admin ...`: the admin API from a terminal (rich tables) or a script (`--json`).

Plain blocking HTTP (urllib) on purpose: a CLI call is one request, and keeping it synchronous keeps
errors simple. Every failure a person can act on is one line on stderr, and the exit status of its
code (docs/interfaces.md): 2 for malformed input (400/413/422) or a refused token (401), 3 for an
unknown node or name (404), 4 for an unreachable tracker or Redis (503).
`--tracker` and `--token` default to $P2P_TRACKER_ADMIN_URL and $P2P_TRACKER_ADMIN_TOKEN; `--token @FILE`
reads the token from a file (a token typed on the command line is visible in `ps`: a warning says so).
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from p2pd.errors import ErrorCode, P2pdError
from p2pd.identity import token_value
from p2pd.units import format_rate, format_size, parse_rate

admin_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Administer a running tracker over its HTTP admin API.",
)

Url = Annotated[
    str,
    typer.Option("--tracker", envvar="P2P_TRACKER_ADMIN_URL", help="Admin API base URL, e.g. http://127.0.0.1:7071"),
]
Token = Annotated[
    str,
    typer.Option(
        "--token", envvar="P2P_TRACKER_ADMIN_TOKEN", help="Admin bearer token, or @FILE to read it from a file."
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table.")]
TIMEOUT = 10.0


class AdminError(P2pdError):
    """A failed admin request; the code is the API's (from its JSON error body) or says why none came."""


# What an HTTP status means when the reply has no JSON error body (a proxy, another server).
HTTP_CODES = {
    400: ErrorCode.BAD_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    404: ErrorCode.NOT_FOUND,
    413: ErrorCode.BAD_REQUEST,
    422: ErrorCode.BAD_REQUEST,
    503: ErrorCode.UNREACHABLE,
}


def request(base: str, token: str, method: str, path: str, body: Any = None) -> Any:
    if not base.startswith(("http://", "https://")):
        base = "http://" + base
    url = base.rstrip("/") + path
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={
            "Authorization": f"Bearer {token}",
            "Accept": "application/json",
            **({"Content-Type": "application/json"} if data is not None else {}),
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:  # noqa: S310 (operator-given URL)
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            err = json.loads(e.read())["error"]
            msg, code = str(err["message"]), ErrorCode.decode(err["code"])
        except (ValueError, KeyError, TypeError):
            msg, code = str(e.reason), HTTP_CODES.get(e.code, ErrorCode.INTERNAL)
        if code == ErrorCode.UNAUTHORIZED:
            raise AdminError(code, f"the tracker at {base} refused the admin token (401): check --token") from None
        raise AdminError(code, f"{msg} (HTTP {e.code})") from None
    except urllib.error.URLError as e:
        raise AdminError(ErrorCode.UNREACHABLE, f"cannot reach the tracker admin API at {base}: {e.reason}") from None
    except TimeoutError as e:
        raise AdminError(ErrorCode.TIMEOUT, f"the tracker admin API at {base} did not answer in time: {e}") from None
    except ConnectionError as e:
        raise AdminError(ErrorCode.UNREACHABLE, f"cannot reach the tracker admin API at {base}: {e}") from None
    except ValueError as e:
        raise AdminError(
            ErrorCode.PROTOCOL, f"{base} did not answer with JSON ({e}): is it the tracker's admin address?"
        ) from None


def call(base: str, token: str, method: str, path: str, body: Any = None) -> Any:
    try:
        return request(base, token_value(token, "--token") or "", method, path, body)
    except P2pdError as e:
        fail(e.message, e.code)


def fail(msg: str, code: ErrorCode) -> NoReturn:
    typer.echo(f"p2p-tracker: error: {msg}", err=True)
    raise typer.Exit(code.exit_status)


def out_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=True))


def console() -> Console:
    # piped output gets a wide fixed width so ids are never cut; a terminal uses its own width
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


@admin_app.command()
def nodes(
    tracker: Url,
    token: Token,
    json_: Json = False,
    limit: Annotated[int, typer.Option(help="At most this many nodes.")] = 1000,
) -> None:
    """Registered nodes: address (advertised, and mapped by its NAT), NAT type, labels, version, holdings,
    last heartbeat."""
    r = call(tracker, token, "GET", f"/v1/nodes?limit={limit}")
    if json_:
        return out_json(r)
    t = Table(title=f"{len(r['nodes'])} node(s)")
    for col in ("node", "address", "nat", "mapped", "zone", "version", "holds", "complete", "last seen", "age"):
        t.add_column(
            col,
            justify="right" if col in ("holds", "complete", "last seen", "age") else "left",
            no_wrap=col in ("node", "nat"),
        )
    for n in r["nodes"]:
        host, port = n["addr"]
        mapped = n.get("mapped")  # absent from trackers older than NAT detection
        t.add_row(
            n["node_id"],
            _hostport(host, port),
            n.get("nat_type", "unknown"),
            _hostport(*mapped) if mapped else "-",
            n["labels"].get("zone", ""),
            n["version"],
            str(n["holdings"]),
            str(n["complete"]),
            f"{n['last_seen_s']:.1f}s",
            f"{n['age_s']:.0f}s",
        )
    console().print(t)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@admin_app.command()
def artifacts(tracker: Url, token: Token, json_: Json = False) -> None:
    """Artifacts known to the tracker: names, size, complete and partial holders."""
    r = call(tracker, token, "GET", "/v1/artifacts")
    if json_:
        return out_json(r)
    t = Table(title=f"{len(r['artifacts'])} artifact(s)")
    for col in ("artifact", "names", "kind", "size", "pieces", "complete", "partial"):
        t.add_column(col, justify="right" if col in ("size", "pieces", "complete", "partial") else "left")
    for a in sorted(r["artifacts"], key=lambda a: (a["names"] == [], a["names"], a["artifact_id"])):
        t.add_row(
            a["artifact_id"][:16],
            ", ".join(a["names"]) or "-",
            a["kind"] or "-",
            format_size(a["size"]) if a["has_manifest"] else "-",
            str(a["pieces"] or "-"),
            str(a["complete"]),
            str(a["partial"]),
        )
    console().print(t)


@admin_app.command()
def swarm(
    name: Annotated[str, typer.Argument(help="NAME:TAG or a 64-hex artifact id.")],
    tracker: Url,
    token: Token,
    json_: Json = False,
) -> None:
    """Holders of an artifact and their progress."""
    key = "artifact_id" if ":" not in name else "name"
    r = call(tracker, token, "GET", "/v1/swarm?" + urllib.parse.urlencode({key: name}))
    if json_:
        return out_json(r)
    t = Table(
        title=f"{name}  {r['artifact_id'][:16]}  {format_size(r['size'])}  "
        f"{r['complete']} complete, {r['partial']} partial"
    )
    for col in ("node", "address", "zone", "progress"):
        t.add_column(col, justify="right" if col == "progress" else "left")
    for h in r["holders"]:
        host, port = h["addr"]
        t.add_row(h["node_id"], f"{host}:{port}", h["zone"], f"{h['progress'] * 100:.1f}%")
    console().print(t)


@admin_app.command()
def evict(
    node: Annotated[str, typer.Argument(help="Node id (32 hex).")], tracker: Url, token: Token, json_: Json = False
) -> None:
    """Drop a node from the registry and every peer list now (a live node registers again)."""
    r = call(tracker, token, "POST", f"/v1/nodes/{urllib.parse.quote(node)}/evict")
    if json_:
        return out_json(r)
    typer.echo(f"evicted {r['evicted']}")


@admin_app.command()
def tag(
    name: Annotated[str, typer.Argument(help="NAME:TAG to point.")],
    artifact_id: Annotated[str, typer.Argument(metavar="ID", help="Published artifact id (64 hex).")],
    tracker: Url,
    token: Token,
    json_: Json = False,
) -> None:
    """Point NAME:TAG at a published artifact (the previous target stays in the tag's history)."""
    r = call(tracker, token, "PUT", f"/v1/tags/{urllib.parse.quote(name)}", {"artifact_id": artifact_id})
    if json_:
        return out_json(r)
    typer.echo(f"{r['name']} -> {r['artifact_id']} ({'moved' if r['moved'] else 'unchanged'})")


@admin_app.command()
def stats(tracker: Url, token: Token, json_: Json = False) -> None:
    """Counters of the tracker: nodes, artifacts, heartbeats, expirations, evictions..."""
    r = call(tracker, token, "GET", "/v1/stats")
    if json_:
        return out_json(r)
    t = Table(title=f"tracker stats ({time.strftime('%H:%M:%S')})", show_header=False)
    t.add_column("key")
    t.add_column("value", justify="right")
    for k, v in r.items():
        t.add_row(k, str(v))
    console().print(t)


@admin_app.command()
def policy(
    tracker: Url,
    token: Token,
    json_: Json = False,
    egress_limit: Annotated[
        str | None, typer.Option(help="Per-node upload cap (50MB/s, 400Mbit/s); 'none' clears.")
    ] = None,
    ingress_limit: Annotated[str | None, typer.Option(help="Per-node download cap; 'none' clears.")] = None,
) -> None:
    """Show the cluster policy pushed to every node with heartbeat replies, or change it."""
    changes: dict[str, float | None] = {}  # None clears; parsed before any request so a typo costs no round trip
    for key, value in (("egress_limit", egress_limit), ("ingress_limit", ingress_limit)):
        if value is None:
            continue
        if value.strip().lower() in ("none", "off", "0"):
            changes[key] = None
            continue
        try:
            changes[key] = parse_rate(value)
        except ValueError as e:
            fail(f"--{key.replace('_', '-')}: {e}", ErrorCode.BAD_REQUEST)
    current = call(tracker, token, "GET", "/v1/policy")["policy"]
    if changes:
        for key, rate in changes.items():
            if rate is None:
                current.pop(key, None)
            else:
                current[key] = rate
        current = call(tracker, token, "PUT", "/v1/policy", {"policy": current})["policy"]
    if json_:
        return out_json({"policy": current})
    if not current:
        typer.echo("no cluster policy (nodes use their own limits)")
    for k, v in sorted(current.items()):
        typer.echo(f"{k}: {format_rate(v)}")


throttle_app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Global bandwidth budgets: set, show, clear (docs/tracker.md)."
)
admin_app.add_typer(throttle_app, name="throttle")


ZERO_RATE = re.compile(r"0+(\.0*)?\s*([A-Za-z]+(/s)?)?")  # `0`, `0MB/s`, `0 Mbit/s`: the emergency stop


def parse_budget(flag: str, text: str) -> float:
    """A budget RATE (`50MB/s`, `400Mbit/s`); `0` pauses. One clear line for anything else."""
    t = text.strip()
    if t.startswith("-"):
        fail(
            f"{flag}: {text!r} is negative; a budget is a rate >= 0 (0 pauses, `throttle clear` removes it)",
            ErrorCode.BAD_REQUEST,
        )
    if ZERO_RATE.fullmatch(t):
        return 0.0
    try:
        return parse_rate(t)
    except ValueError as e:
        fail(f"{flag}: {e}", ErrorCode.BAD_REQUEST)


@throttle_app.command("set")
def throttle_set(
    tracker: Url,
    token: Token,
    json_: Json = False,
    total: Annotated[
        str | None, typer.Option("--total", help="Cluster-wide egress of all p2pd traffic (RATE; 0 pauses everything).")
    ] = None,
    zone: Annotated[
        list[str], typer.Option("--zone", help="NAME=RATE: egress of the nodes labelled zone=NAME (repeatable).")
    ] = [],  # noqa: B006 (typer reads the default)
    cross_zone: Annotated[
        str | None, typer.Option("--cross-zone", help="Bytes/s sent from any zone to another, cluster-wide (RATE).")
    ] = None,
    priority: Annotated[
        list[str], typer.Option("--priority", help="ARTIFACT_ID=WEIGHT: nodes holding it get WEIGHT x a fair share.")
    ] = [],  # noqa: B006
) -> None:
    """Set the global budgets (replaces the previous ones); nodes follow within an interval."""
    body: dict[str, Any] = {"zones": {}, "priority": {}}
    if total is not None:
        body["total"] = parse_budget("--total", total)
    if cross_zone is not None:
        body["cross_zone"] = parse_budget("--cross-zone", cross_zone)
    for z in zone:
        name, sep, rate = z.partition("=")
        if not sep or not name.strip():
            fail(f"--zone {z!r}: write NAME=RATE, e.g. --zone eu-1a=500Mbit/s", ErrorCode.BAD_REQUEST)
        body["zones"][name.strip()] = parse_budget(f"--zone {name.strip()}", rate)
    for p in priority:
        aid, sep, w = p.partition("=")
        try:
            body["priority"][aid.strip()] = float(w) if sep else math.nan
        except ValueError:
            body["priority"][aid.strip()] = math.nan
        if not sep or not math.isfinite(body["priority"][aid.strip()]):
            fail(f"--priority {p!r}: write ARTIFACT_ID=WEIGHT, e.g. --priority {'a' * 8}...=4", ErrorCode.BAD_REQUEST)
    if total is None and cross_zone is None and not zone:
        fail("give at least one of --total, --zone NAME=RATE, --cross-zone", ErrorCode.BAD_REQUEST)
    r = call(tracker, token, "PUT", "/v1/throttle", body)
    if json_:
        return out_json(r)
    _print_throttle(r)


@throttle_app.command("show")
def throttle_show(tracker: Url, token: Token, json_: Json = False) -> None:
    """The budgets, the current use and every node's share."""
    r = call(tracker, token, "GET", "/v1/throttle")
    if json_:
        return out_json(r)
    _print_throttle(r)


@throttle_app.command("clear")
def throttle_clear(tracker: Url, token: Token, json_: Json = False) -> None:
    """Remove every global budget: nodes go back to their own limits (paused transfers resume)."""
    r = call(tracker, token, "DELETE", "/v1/throttle")
    if json_:
        return out_json(r)
    typer.echo("global budgets cleared: nodes use their own limits")


def _rate_or(v: float | None, none: str = "-") -> str:
    return none if v is None else ("0 (paused)" if v == 0 else format_rate(v))


def _print_throttle(r: dict[str, Any]) -> None:
    b, use = r["budgets"], r["use"]
    if not r["active"]:
        typer.echo("no global budget (nodes use their own limits)")
    else:
        typer.echo(f"total:      {_rate_or(b['total'], 'none')}   in use {format_rate(use['total'])}")
        for z, rate in sorted(b["zones"].items()):
            typer.echo(f"zone {z}: {_rate_or(rate)}   in use {format_rate(use['zones'].get(z, 0.0))}")
        typer.echo(f"cross-zone: {_rate_or(b['cross_zone'], 'none')}   in use {format_rate(use['cross_zone'])}")
        for aid, w in sorted(b["priority"].items()):
            typer.echo(f"priority {aid[:16]}: {w:g}")
    t = Table(title=f"{len(r['nodes'])} node(s)")
    for col in ("node", "zone", "rate", "demand", "share", "cross share"):
        t.add_column(col, justify="left" if col in ("node", "zone") else "right")
    for n in r["nodes"]:
        t.add_row(
            n["node_id"],
            n["zone"],
            format_rate(n["rate"]),
            format_rate(n["demand"]),
            _rate_or(n["share"]),
            _rate_or(n["cross_share"]),
        )
    console().print(t)


@admin_app.command()
def preheat(
    target: Annotated[str, typer.Argument(metavar="NAME:TAG|status", help="What to preheat, or `status`.")],
    tracker: Url,
    token: Token,
    name: Annotated[
        str | None, typer.Argument(metavar="[NAME:TAG]", help="With `status`: only the orders of this name.")
    ] = None,
    zone: Annotated[str | None, typer.Option("--zone", help="Only nodes labelled zone=Z.")] = None,
    label: Annotated[str | None, typer.Option("--label", help="Only nodes with the label K=V.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every registered node.")] = False,
    json_: Json = False,
) -> None:
    """Make nodes fetch NAME:TAG into their caches now (`preheat NAME:TAG --all|--zone Z|--label K=V`),
    or show what came of the orders (`preheat status [NAME:TAG]`)."""
    if target == "status":
        if zone is not None or label is not None or all_:
            fail("preheat status takes no --zone/--label/--all (it shows every chosen node)", ErrorCode.BAD_REQUEST)
        path = "/v1/preheat" + (f"?name={urllib.parse.quote(name)}" if name is not None else "")
        r = call(tracker, token, "GET", path)
        if json_:
            return out_json(r)
        return _print_preheat(r["orders"], name)
    if name is not None:
        fail(f"unexpected argument {name!r}: preheat NAME:TAG takes one name", ErrorCode.BAD_REQUEST)
    if sum((zone is not None, label is not None, all_)) != 1:
        fail("give exactly one of --zone Z, --label K=V or --all", ErrorCode.BAD_REQUEST)
    if label is not None and ("=" not in label or label.startswith("=")):
        fail(f"--label {label!r}: write KEY=VALUE, e.g. --label gpu=h100", ErrorCode.BAD_REQUEST)
    r = call(tracker, token, "POST", "/v1/preheat", {"name": target, "zone": zone, "label": label, "all": all_})
    if json_:
        return out_json(r)
    typer.echo(
        f"preheat {r['name']} ({r['artifact_id'][:16]}) ordered on {len(r['nodes'])} node(s) "
        f"({r['selector']}), order {r['order']}; follow it with `preheat status {r['name']}`"
    )


def _print_preheat(orders: list[dict[str, Any]], name: str | None) -> None:
    if not orders:
        typer.echo(f"no preheat order{' for ' + name if name else ''}")
        return
    for o in orders:
        t = Table(
            title=f"preheat {o['name']} ({o['selector']}, order {o['order']}): {o['complete']} complete, "
            f"{o['fetching']} fetching, {o['waiting']} waiting, {o['failed']} failed"
        )
        for col in ("node", "state", "progress", "error"):
            t.add_column(col, justify="right" if col == "progress" else "left")
        for n in o["nodes"]:
            t.add_row(n["node_id"], n["state"], f"{n['progress'] * 100:.1f}%", n["error"] or "")
        console().print(t)
