"""Tracker state in Redis, so several tracker replicas share it and killing one loses nothing.

Every state change is one Lua script (atomic, one round trip), and all replicas use Redis's own clock
(`TIME` inside the scripts), so replicas never disagree about who expired because of clock skew.

Keys (prefix `p2p:`, in the database of the URL):
- `alive`           ZSET node id -> last heartbeat (ms, Redis clock): expiry = ZRANGEBYSCORE
- `n:{id}`          HASH host, port, zone, labels (JSON), version, s (session), reg, nat (type), mapped
                    ("ip port", "" = unknown)
- `h:{id}`          HASH artifact id -> progress (what the node holds)
- `ac:{aid}:{zone}` SET complete holders in a zone;  `ap:{aid}:{zone}` HASH partial holder -> progress
- `az:{aid}`        SET zones with holders of the artifact
- `m:{aid}`         manifest bytes;  `mi:{aid}` HASH size, pieces, kind;  `arts` SET of artifact ids
- `t:{name}`        LIST "aid wall-time" (tag history, last 100; the last entry is current);  `names` SET
- `c`               HASH counters;  `interval` the interval the first replica was started with
- `policy`          JSON cluster policy (read by every replica once per interval)
- `budgets`         JSON global budgets (tracker/budgets.py), read by every replica once per interval
- `dm`              HASH node id -> "egress cross egress_rate cross_rate" (its last demand report);
                    every replica splits the budgets itself from `alive`, `dm` and the nodes' zones,
                    so replicas that see the same reports hand out the same shares
- `signed`          HASH name -> its signed publish (tracker/publishers.py, secured clusters)
- `pb:{node}`       HASH artifact id -> manifest bytes a publisher holds;  `pt` HASH node -> their total

Cost per heartbeat (measured in BENCHMARKS.md): an unchanged heartbeat is HMGET + ZADD inside the
batch script — 2 Redis operations, and one EVALSHA round trip per *batch* of heartbeats (the UDP front
end batches whatever arrived together). A holdings change adds O(changed artifacts) operations.
Peer lists are sampled inside Redis (SRANDMEMBER/HRANDFIELD) so their cost does not grow with the
swarm. Every replica runs the expiry script; it is idempotent, so no leader election is needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from typing import Any

from p2pd.errors import ErrorCode
from p2pd.protocol import manifest as mf
from p2pd.protocol.auth import heartbeat_mac
from tracker.budgets import (
    IDLE_DEMAND,
    MAX_BUDGET,
    RAMP_PROGRESS,
    Budgets,
    Demand,
    Share,
    ShareLedger,
    allocate,
    passes_nothing,
    passes_on,
    seed_weight,
    usage,
    weight_of,
    wire_share,
)
from tracker.preheat import Order, PreheatBook
from tracker.registry import NAT_UNKNOWN
from tracker.resp import Redis, RedisError, RedisUnavailable
from tracker.store import STORE_COUNTERS, Heartbeat, Registration, cluster_view, throttle_view
from tracker.validate import NatInfo, TrackerError

log = logging.getLogger("tracker.redis")

__all__ = ["RedisStore", "RedisUnavailable"]

EXPIRE_BATCH = 10_000
# nodes the cluster page's per-zone counts cover on Redis (a node list is a round trip per node: bounded work)
CLUSTER_VIEW_NODES = 10_000

_COMMON = r"""
local P = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function unhold(aid, zone, id)
  local ck, pk = P..'ac:'..aid..':'..zone, P..'ap:'..aid..':'..zone
  redis.call('SREM', ck, id)
  redis.call('HDEL', pk, id)
  if redis.call('EXISTS', ck, pk) == 0 then redis.call('SREM', P..'az:'..aid, zone) end
end
local function hold(aid, zone, id, p)
  local ck, pk = P..'ac:'..aid..':'..zone, P..'ap:'..aid..':'..zone
  if tonumber(p) >= 1 then
    redis.call('HDEL', pk, id)
    redis.call('SADD', ck, id)
  else
    redis.call('SREM', ck, id)
    redis.call('HSET', pk, id, p)
  end
  redis.call('SADD', P..'az:'..aid, zone)
  redis.call('SADD', P..'arts', aid)
end
local function set_holdings(id, zone, start, n)
  local hk = P..'h:'..id
  local old = redis.call('HGETALL', hk)
  local oldm, newm = {}, {}
  for i = 1, #old, 2 do oldm[old[i]] = old[i + 1] end
  redis.call('DEL', hk)
  local args = {}
  for i = start, start + 2 * n - 1, 2 do
    local aid, p = ARGV[i], ARGV[i + 1]
    newm[aid] = p
    if oldm[aid] ~= p then hold(aid, zone, id, p) end
    args[#args + 1] = aid
    args[#args + 1] = p
    if #args >= 200 then redis.call('HSET', hk, unpack(args)); args = {} end
  end
  if #args > 0 then redis.call('HSET', hk, unpack(args)) end
  for aid, _ in pairs(oldm) do
    if newm[aid] == nil then unhold(aid, zone, id) end
  end
end
local function drop(id)
  local nk = P..'n:'..id
  redis.call('ZREM', P..'alive', id)
  local zone = redis.call('HGET', nk, 'zone')
  if not zone then return 0 end
  for _, aid in ipairs(redis.call('HKEYS', P..'h:'..id)) do unhold(aid, zone, id) end
  redis.call('DEL', P..'h:'..id, nk)
  return 1
end
local function tag(name, aid, wall)
  if redis.call('EXISTS', P..'m:'..aid) == 0 then return -1 end
  local tk = P..'t:'..name
  local last = redis.call('LINDEX', tk, -1)
  if last and string.sub(last, 1, 64) == aid then return 0 end
  redis.call('RPUSH', tk, aid..' '..wall)
  redis.call('LTRIM', tk, -100, -1)
  redis.call('SADD', P..'names', name)
  return 1
end
"""

SCRIPTS = {
    # ARGV: P, id, host, port, zone, labels, version, session, nat type, mapped ("ip port" or "")
    "register": r"""
local id, zone = ARGV[2], ARGV[5]
local nk = P..'n:'..id
local now = now_ms()
local oldzone = redis.call('HGET', nk, 'zone')
if oldzone and oldzone ~= zone then
  local h = redis.call('HGETALL', P..'h:'..id)
  for i = 1, #h, 2 do
    unhold(h[i], oldzone, id)
    hold(h[i], zone, id, h[i + 1])
  end
end
if not oldzone then redis.call('HSET', nk, 'reg', now) end
redis.call('HSET', nk, 'host', ARGV[3], 'port', ARGV[4], 'zone', zone, 'labels', ARGV[6], 'version', ARGV[7],
           's', ARGV[8], 'nat', ARGV[9], 'mapped', ARGV[10])
redis.call('ZADD', P..'alive', now, id)
redis.call('HINCRBY', P..'c', 'registrations', 1)
return now
""",
    # ARGV: P, count, then per heartbeat: id, session ('' = not checked), n (-1 = unchanged), n pairs
    "heartbeat": r"""
local now = now_ms()
local known = {}
local i = 3
local ok_n, unknown_n = 0, 0
for b = 1, tonumber(ARGV[2]) do
  local id, sess, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  i = i + 3
  local f = redis.call('HMGET', P..'n:'..id, 's', 'zone')
  if f[1] and (sess == '' or f[1] == sess) then
    redis.call('ZADD', P..'alive', 'XX', now, id)
    if n >= 0 then set_holdings(id, f[2], i, n) end
    known[b] = 1
    ok_n = ok_n + 1
  else
    known[b] = 0
    unknown_n = unknown_n + 1
  end
  if n > 0 then i = i + 2 * n end
end
if ok_n > 0 then redis.call('HINCRBY', P..'c', 'heartbeats', ok_n) end
if unknown_n > 0 then redis.call('HINCRBY', P..'c', 'unknown_heartbeats', unknown_n) end
return known
""",
    # ARGV: P, id, counter
    "drop": r"""
local gone = drop(ARGV[2])
if gone == 1 then redis.call('HINCRBY', P..'c', ARGV[3], 1) end
return gone
""",
    # ARGV: P, ttl_ms, limit
    "expire": r"""
local cutoff = now_ms() - tonumber(ARGV[2])
local ids = redis.call('ZRANGEBYSCORE', P..'alive', '-inf', '('..cutoff, 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do drop(id) end
if #ids > 0 then redis.call('HINCRBY', P..'c', 'expirations', #ids) end
return ids
""",
    # ARGV: P, aid, manifest, size, pieces, kind, name, wall
    "publish": r"""
local aid = ARGV[2]
redis.call('SET', P..'m:'..aid, ARGV[3], 'NX')
redis.call('HSET', P..'mi:'..aid, 'size', ARGV[4], 'pieces', ARGV[5], 'kind', ARGV[6])
redis.call('SADD', P..'arts', aid)
redis.call('HINCRBY', P..'c', 'publishes', 1)
return tag(ARGV[7], aid, ARGV[8])
""",
    # ARGV: P, publisher, aid, size, limit. Returns -1 when counted (or counted before), else the total held.
    "charge": r"""
if redis.call('HEXISTS', P..'pb:'..ARGV[2], ARGV[3]) == 1 then return -1 end
local total = tonumber(redis.call('HGET', P..'pt', ARGV[2]) or '0')
if total + tonumber(ARGV[4]) > tonumber(ARGV[5]) then return total end
redis.call('HSET', P..'pb:'..ARGV[2], ARGV[3], ARGV[4])
redis.call('HINCRBY', P..'pt', ARGV[2], tonumber(ARGV[4]))
return -1
""",
    # ARGV: P, name, aid, wall
    "tag": r"""
return tag(ARGV[2], ARGV[3], ARGV[4])
""",
    # ARGV: P, name
    "resolve": r"""
local last = redis.call('LINDEX', P..'t:'..ARGV[2], -1)
if not last then return false end
local aid = string.sub(last, 1, 64)
return {aid, redis.call('GET', P..'m:'..aid)}
""",
    # ARGV: P, aid, requester, max.
    # Returns groups {complete, same_zone, size, {id, host, port, progress, nat, mapped}*}
    "peers": r"""
local aid, req, max = ARGV[2], ARGV[3], tonumber(ARGV[4])
local rzone = false
if req ~= '' then rzone = redis.call('HGET', P..'n:'..req, 'zone') end
redis.call('HINCRBY', P..'c', 'peer_queries', 1)
local out = {}
for _, z in ipairs(redis.call('SRANDMEMBER', P..'az:'..aid, 64)) do
  local same = (z == rzone) and 1 or 0
  local ck, pk = P..'ac:'..aid..':'..z, P..'ap:'..aid..':'..z
  local n = redis.call('SCARD', ck)
  if n > 0 then
    local g = {}
    for _, id in ipairs(redis.call('SRANDMEMBER', ck, max + 1)) do
      local a = redis.call('HMGET', P..'n:'..id, 'host', 'port', 'nat', 'mapped')
      if a[1] then
        g[#g + 1] = id; g[#g + 1] = a[1]; g[#g + 1] = a[2]; g[#g + 1] = '1.0'
        g[#g + 1] = a[3] or ''; g[#g + 1] = a[4] or ''
      end
    end
    out[#out + 1] = {1, same, n, g, z}
  end
  n = redis.call('HLEN', pk)
  if n > 0 then
    local g = {}
    local r = redis.call('HRANDFIELD', pk, max + 1, 'WITHVALUES')
    for i = 1, #r, 2 do
      local a = redis.call('HMGET', P..'n:'..r[i], 'host', 'port', 'nat', 'mapped')
      if a[1] then
        g[#g + 1] = r[i]; g[#g + 1] = a[1]; g[#g + 1] = a[2]; g[#g + 1] = r[i + 1]
        g[#g + 1] = a[3] or ''; g[#g + 1] = a[4] or ''
      end
    end
    out[#out + 1] = {0, same, n, g, z}
  end
end
return out
""",
}


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _nat_args(nat: NatInfo | None) -> tuple[str, str]:
    if nat is None:
        return "", ""
    t, mapped = nat
    return t, f"{mapped[0]} {mapped[1]}" if mapped else ""


def _nat_fields(t: Any, mapped: Any, *, always: bool = False) -> dict[str, Any]:
    """The `nat_type` and `mapped` of a peer (nothing when the node reported nothing) or node entry."""
    if not t and not always:
        return {}
    m = _s(mapped) if mapped else ""
    host, _, port = m.rpartition(" ")
    return {"nat_type": _s(t) if t else NAT_UNKNOWN, "mapped": [host, int(port)] if host and port.isdigit() else None}


def _progress(p: float) -> str:
    return "1.0" if p >= 1.0 else repr(float(p))


class RedisStore:
    kind = "redis"

    def __init__(
        self,
        redis: Redis,
        interval: float = 1.0,
        misses: int = 3,
        *,
        prefix: str = "p2p:",
        rng: random.Random | None = None,
    ) -> None:
        self.redis = redis
        self.interval = interval
        self.misses = misses
        self.prefix = prefix
        self.rng = rng or random.Random()
        self._sha: dict[str, str] = {}
        self._policy: dict[str, Any] = {}
        self._budgets = Budgets()
        self._shares: dict[str, Share] = {}
        self._ledger = ShareLedger()  # what the nodes beating at this replica hold (tracker/budgets.py)
        self._demands: dict[str, Demand] = {}
        self._zones: dict[str, str] = {}  # node id -> zone: a node's zone changes only when it registers again
        self._pending: set[str] = set()  # nodes with undelivered preheat orders, as of the last refresh

    @classmethod
    async def connect(cls, url: str, interval: float = 1.0, misses: int = 3, **kw: Any) -> RedisStore:
        """Connect, check Redis answers, load the scripts; RedisUnavailable with a clear message if not."""
        try:
            redis = Redis(url)
        except ValueError as e:
            raise RedisUnavailable(str(e)) from e
        store = cls(redis, interval, misses, **kw)
        try:
            info = _s(await redis.execute("INFO", "server"))
            ver = next(
                (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("redis_version:")), "0"
            )
            if tuple(int(x) for x in ver.split(".")[:2]) < (6, 2):
                raise RedisUnavailable(f"{redis.where} runs Redis {ver}; the tracker needs 6.2 or newer (HRANDFIELD)")
            await store._load_scripts()
            await store.refresh()
            prev = await redis.execute("SET", store.prefix + "interval", repr(interval), "NX", "GET")
            if prev is not None and float(_s(prev)) != interval:
                log.warning(
                    "other replicas on %s use --interval %s, this one %s: use the same everywhere",
                    redis.where,
                    _s(prev),
                    interval,
                )
        except RedisError as e:
            await redis.aclose()
            raise RedisUnavailable(f"{redis.where}: {e}") from e
        except RedisUnavailable:
            await redis.aclose()
            raise
        log.info("store: %s", redis.where)
        return store

    async def _load_scripts(self) -> None:
        for name, body in SCRIPTS.items():
            self._sha[name] = _s(await self.redis.execute("SCRIPT", "LOAD", _COMMON + body))

    async def _run(self, name: str, *args: Any) -> Any:
        try:
            try:
                return await self.redis.execute("EVALSHA", self._sha[name], 0, self.prefix, *args)
            except RedisError as e:
                if e.prefix != "NOSCRIPT":
                    raise
                await self._load_scripts()  # Redis restarted or SCRIPT FLUSH
                return await self.redis.execute("EVALSHA", self._sha[name], 0, self.prefix, *args)
        except RedisUnavailable as e:
            raise TrackerError(ErrorCode.UNREACHABLE, f"tracker store unavailable: {e}") from e
        except RedisError as e:
            raise TrackerError(ErrorCode.INTERNAL, f"tracker store error in {name}: {e}") from e

    async def _cmds(self, cmds: list[list[Any]]) -> list[Any]:
        try:
            out = await self.redis.pipeline(cmds)
        except RedisUnavailable as e:
            raise TrackerError(ErrorCode.UNREACHABLE, f"tracker store unavailable: {e}") from e
        for r in out:
            if isinstance(r, RedisError):
                raise TrackerError(ErrorCode.INTERNAL, f"tracker store error: {r}")
        return out

    # ---- nodes -------------------------------------------------------------------------------------

    async def register(
        self,
        node_id: str,
        host: str,
        port: int,
        labels: dict[str, str],
        version: str,
        *,
        nat: NatInfo | None = None,
        key: bytes | None = None,
        session_key: bytes | None = None,
    ) -> Registration:
        session = self.rng.getrandbits(31)
        self._zones.pop(node_id, None)
        if session_key is not None:  # before the session number: no replica sees a session without its key
            await self._cmds([["HSET", self.prefix + "n:" + node_id, "sk", session_key.hex() + " " + str(session)]])
        await self._run(
            "register",
            node_id,
            host,
            port,
            labels.get("zone", ""),
            json.dumps(labels, sort_keys=True, separators=(",", ":")),
            version,
            session,
            *_nat_args(nat),
        )
        return Registration(self.interval, session)

    async def heartbeat_many(self, beats: list[Heartbeat]) -> list[bool]:
        args: list[Any] = [len(beats)]
        for b in beats:
            args += [b.node_id, "" if b.session is None else b.session, -1 if b.holdings is None else len(b.holdings)]
            if b.holdings:
                for aid, p in b.holdings.items():
                    args += [aid, _progress(p)]
        known = await self._run("heartbeat", *args)
        reports: list[Any] = []
        for b, k in zip(beats, known, strict=True):
            if k and b.demand is not None:
                reports += [b.node_id, " ".join(repr(x) for x in b.demand)]
        if reports:
            await self._cmds([["HSET", self.prefix + "dm", *reports]])
        return [bool(k) for k in known]

    async def session_keys(self, nodes: list[tuple[str, int]]) -> list[Any]:
        """The session MAC (`auth.heartbeat_mac`) of each (node id, session) registered now (one round trip)."""
        if not nodes:
            return []
        rows = await self._cmds([["HMGET", self.prefix + "n:" + nid, "s", "sk"] for nid, _ in nodes])
        out: list[Any] = []
        for (_, session), (s, sk) in zip(nodes, rows, strict=True):
            key: Any = None
            if s is not None and sk is not None and int(s) == session:
                hexkey, _, for_session = _s(sk).partition(" ")
                if for_session == str(session):
                    key = heartbeat_mac(bytes.fromhex(hexkey))
            out.append(key)
        return out

    async def signed_tag(self, name: str) -> bytes | None:
        """The signed publish `name` points at (HASH `signed`: name -> SignedTag msgpack); None if unsigned."""
        (r,) = await self._cmds([["HGET", self.prefix + "signed", name]])
        return bytes(r) if r is not None else None

    async def set_signed_tag(self, name: str, blob: bytes) -> None:
        await self._cmds([["HSET", self.prefix + "signed", name, blob]])

    async def charge_publisher(self, publisher: str, artifact_id: str, size: int, limit: int) -> int | None:
        r: int = await self._run("charge", publisher, artifact_id, size, limit)
        return None if r == -1 else r

    async def leave(self, node_id: str) -> bool:
        return bool(await self._run("drop", node_id, "leaves"))

    async def node_info(self, node_id: str) -> tuple[str, int, int] | None:
        """(host, port, session) of a registered node, None if unknown: how signalling checks who asks."""
        ((host, port, session),) = await self._cmds([["HMGET", self.prefix + "n:" + node_id, "host", "port", "s"]])
        if host is None or port is None or session is None:
            return None
        return _s(host), int(port), int(session)

    async def evict(self, node_id: str) -> bool:
        return bool(await self._run("drop", node_id, "evictions"))

    async def expire(self) -> list[str]:
        ttl_ms = int(self.misses * self.interval * 1000)
        return [_s(x) for x in await self._run("expire", ttl_ms, EXPIRE_BATCH)]

    # ---- names -------------------------------------------------------------------------------------

    async def publish(self, name: str, manifest_bytes: bytes) -> str:
        try:
            m = mf.decode(manifest_bytes)
        except mf.ManifestError as e:
            raise TrackerError(ErrorCode.BAD_REQUEST, f"invalid manifest: {e}") from e
        aid = hashlib.sha256(manifest_bytes).hexdigest()
        await self._run("publish", aid, manifest_bytes, m.total_size, m.num_pieces, m.kind, name, _wall())
        return aid

    async def tag(self, name: str, artifact_id: str) -> bool:
        r: int = await self._run("tag", name, artifact_id, _wall())
        if r == -1:
            raise TrackerError(ErrorCode.NOT_FOUND, f"no manifest for artifact {artifact_id}: publish it first")
        return r == 1

    async def resolve(self, name: str) -> tuple[str, bytes]:
        r = await self._run("resolve", name)
        if not r:
            raise TrackerError(ErrorCode.NOT_FOUND, f"unknown name {name!r}")
        return _s(r[0]), bytes(r[1])

    async def manifest(self, artifact_id: str) -> bytes:
        (r,) = await self._cmds([["GET", self.prefix + "m:" + artifact_id]])
        if r is None:
            raise TrackerError(ErrorCode.NOT_FOUND, f"unknown artifact {artifact_id}")
        return bytes(r)

    async def history(self, name: str) -> list[dict[str, Any]]:
        (r,) = await self._cmds([["LRANGE", self.prefix + "t:" + name, 0, -1]])
        out = []
        for e in r:
            aid, _, at = _s(e).partition(" ")
            out.append({"artifact_id": aid, "at": float(at)})
        return out

    # ---- peers -------------------------------------------------------------------------------------

    async def peers(self, artifact_id: str, requester: str | None, max_peers: int) -> list[dict[str, Any]]:
        if max_peers <= 0:
            return []
        groups = await self._run("peers", artifact_id, requester or "", max_peers)
        # (complete, same zone) -> list of (zone size, candidates)
        buckets: dict[tuple[bool, bool], list[tuple[int, list[dict[str, Any]]]]] = {}
        for complete, same, size, flat, zone in groups:
            cands = []
            for i in range(0, len(flat), 6):
                nid = _s(flat[i])
                if nid == requester:
                    continue
                cands.append(
                    {
                        "node_id": nid,
                        "addr": [_s(flat[i + 1]), int(flat[i + 2])],
                        "progress": float(_s(flat[i + 3])),
                        "zone": _s(zone),
                        **_nat_fields(flat[i + 4], flat[i + 5]),
                    }
                )
            self.rng.shuffle(cands)
            buckets.setdefault((bool(complete), bool(same)), []).append((int(size), cands))
        out: list[dict[str, Any]] = []
        for key in ((True, True), (True, False), (False, True), (False, False)):
            zones = buckets.get(key, [])
            # draw zones in proportion to their size, so the union is sampled about uniformly
            while len(out) < max_peers and zones:
                total = sum(size for size, c in zones if c)
                if total == 0:
                    break
                r = self.rng.randrange(total)
                for j, (size, c) in enumerate(zones):
                    if not c:
                        continue
                    if r < size:
                        out.append(c.pop())
                        zones[j] = (size - 1, c)
                        break
                    r -= size
        return out

    async def policy(self) -> dict[str, Any]:
        """The cluster policy as of the last `refresh` (the server refreshes every interval): reading
        Redis for every heartbeat batch would double the round trips for a value that rarely changes."""
        return self._policy

    async def set_policy(self, policy: dict[str, Any]) -> None:
        await self._cmds([["SET", self.prefix + "policy", json.dumps(policy, sort_keys=True)]])
        self._policy = dict(policy)

    async def refresh(self) -> None:
        (raw, braw, pend) = await self._cmds(
            [["GET", self.prefix + "policy"], ["GET", self.prefix + "budgets"], ["SMEMBERS", self.prefix + "ph:pend"]]
        )
        self._pending = {_s(x) for x in pend}
        self._policy = json.loads(_s(raw)) if raw else {}
        try:
            self._budgets = Budgets.from_json(json.loads(_s(braw)) if braw else None)
        except (ValueError, TrackerError) as e:  # written by hand into Redis: keep the last good budgets
            log.warning("ignoring invalid budgets in %sbudgets: %s", self.prefix, e)
        if self._budgets.active:
            self._demands = await self._load_demands()
            self._shares = allocate(self._budgets, self._demands)
        else:
            self._shares = {}
        self._ledger.resplit(self._budgets, self._shares, {n: d.zone for n, d in self._demands.items()})

    async def _live_zones(self) -> dict[str, str]:
        """Zone of every live node (cached per node id; looked up in Redis for new ones)."""
        p = self.prefix
        (ids,) = await self._cmds([["ZRANGE", p + "alive", 0, -1]])
        live = [_s(x) for x in ids]
        new = [n for n in live if n not in self._zones]
        if new:
            for n, z in zip(new, await self._cmds([["HGET", p + "n:" + n, "zone"] for n in new]), strict=True):
                self._zones[n] = _s(z or b"")
        alive = set(live)
        for n in [n for n in self._zones if n not in alive]:
            del self._zones[n]
        return {n: self._zones[n] for n in live}

    async def _load_demands(self) -> dict[str, Demand]:
        p = self.prefix
        zones = await self._live_zones()
        (raw,) = await self._cmds([["HGETALL", p + "dm"]])
        reports: dict[str, tuple[float, ...]] = {}
        gone: list[str] = []
        for i in range(0, len(raw), 2):
            nid = _s(raw[i])
            if nid not in zones:
                gone.append(nid)
                continue
            try:
                reports[nid] = tuple(float(x) for x in _s(raw[i + 1]).split())
            except ValueError:
                gone.append(nid)
        if gone:
            await self._cmds([["HDEL", p + "dm", *gone]])
        prio = self._budgets.priority
        weights: dict[str, float] = {}
        if prio:
            ids = list(zones)
            held = await self._cmds([["HKEYS", p + "h:" + n] for n in ids]) if ids else []
            for n, keys in zip(ids, held, strict=True):
                weights[n] = weight_of({_s(k): 1.0 for k in keys}, prio)
        seed_weights, askers, idle = await self._holder_weights()
        for n, w in seed_weights.items():
            if n in zones:
                weights[n] = weights.get(n, 1.0) * w
        out = {}
        for nid, zone in zones.items():
            e, c, er, cr = (reports.get(nid) or (0.0, 0.0, 0.0, 0.0))[:4]
            if nid in askers:
                e = MAX_BUDGET
            elif nid in idle:
                e = min(e, IDLE_DEMAND)
            out[nid] = Demand(zone, e, c, er, cr, weights.get(nid, 1.0))
        return out

    async def _holder_weights(self) -> tuple[dict[str, float], set[str], set[str]]:
        """What `Registry.demands` takes from the holders, counted from the holder sets per artifact and zone
        (a read per artifact, not one per live node at every split): node id -> the largest seed weight
        (`seed_weight` > 1) of the artifacts it holds complete, the nodes that ask for all they can get
        (`passes_on`: complete holders of a swarm, and its fetchers below RAMP_PROGRESS), and the nodes none
        of whose pieces anyone can want (`passes_nothing`: read for the lone fetchers of an artifact only)."""
        p = self.prefix
        (arts,) = await self._cmds([["SMEMBERS", p + "arts"]])
        aids = [_s(a) for a in arts]
        zones = await self._cmds([["SMEMBERS", p + "az:" + a] for a in aids]) if aids else []
        pairs = [(a, _s(z)) for a, zs in zip(aids, zones, strict=True) for z in zs]
        if not pairs:
            return {}, set(), set()
        counts = await self._cmds(
            [c for a, z in pairs for c in (["SCARD", f"{p}ac:{a}:{z}"], ["HLEN", f"{p}ap:{a}:{z}"])]
        )
        complete: dict[str, int] = {}
        partial: dict[str, int] = {}
        for k, (a, _) in enumerate(pairs):
            complete[a] = complete.get(a, 0) + int(counts[2 * k])
            partial[a] = partial.get(a, 0) + int(counts[2 * k + 1])
        idle = await self._lone_fetchers(
            [(a, z) for k, (a, z) in enumerate(pairs) if partial[a] == 1 and int(counts[2 * k + 1])], partial
        )
        seeds = {a: w for a, c in complete.items() if (w := seed_weight(c, partial[a])) > 1.0}
        swarms = {a for a, c in complete.items() if passes_on(c, partial[a])}
        held = [(a, z) for a, z in pairs if a in seeds or a in swarms]
        if not held:
            return {}, set(), idle
        cmds = [c for a, z in held for c in (["SMEMBERS", f"{p}ac:{a}:{z}"], ["HGETALL", f"{p}ap:{a}:{z}"])]
        got = await self._cmds(cmds)
        weights: dict[str, float] = {}
        askers: set[str] = set()
        for k, (a, _) in enumerate(held):
            ids = [_s(i) for i in got[2 * k]]
            if a in seeds:
                for n in ids:
                    weights[n] = max(weights.get(n, 1.0), seeds[a])
            if a in swarms:
                askers.update(ids)
                fetching = got[2 * k + 1]
                for i in range(0, len(fetching), 2):
                    if float(_s(fetching[i + 1])) < RAMP_PROGRESS:
                        askers.add(_s(fetching[i]))
        return weights, askers, idle

    async def _lone_fetchers(self, lone: list[tuple[str, str]], partial: dict[str, int]) -> set[str]:
        """The nodes that `passes_nothing` holds idle, among the only fetchers of the artifacts and zones in
        `lone` (a partial holder elsewhere makes it no lone fetcher): each one's holdings decide."""
        if not lone:
            return set()
        p = self.prefix
        got = await self._cmds([["HKEYS", f"{p}ap:{a}:{z}"] for a, z in lone])
        ids = sorted({_s(n) for keys in got for n in keys})
        held = await self._cmds([["HGETALL", p + "h:" + n] for n in ids])
        idle = set()
        for n, h in zip(ids, held, strict=True):
            holdings = {_s(h[i]): float(_s(h[i + 1])) for i in range(0, len(h), 2)}
            if passes_nothing(holdings, partial):
                idle.add(n)
        return idle

    async def budgets(self) -> Budgets:
        return self._budgets

    async def set_budgets(self, budgets: Budgets) -> None:
        """Stored for every replica (each reads it within an interval); this one splits it at once."""
        await self._cmds([["SET", self.prefix + "budgets", json.dumps(budgets.to_json(), sort_keys=True)]])
        await self.refresh()

    async def known_zones(self) -> set[str]:
        return set((await self._live_zones()).values())

    def share_of(self, node_id: str) -> list[float | None] | None:
        """As the memory store's: what the nodes that beat at this replica hold is in its own ledger."""
        if not self._budgets.active:
            return None
        return wire_share(self._budgets, self._ledger.grant(node_id))

    async def throttle_view(self) -> dict[str, Any]:
        demands = self._demands if self._budgets.active else await self._load_demands()
        return throttle_view(self._budgets, demands, self._shares)

    async def cluster_view(self, rows: int) -> dict[str, Any]:
        return await cluster_view(self, rows, CLUSTER_VIEW_NODES)

    async def use_totals(self) -> tuple[float, float]:
        use = usage(self._demands if self._budgets.active else await self._load_demands())
        return float(use["total"]), float(use["cross_zone"])

    # ---- preheat orders (tracker/preheat.py): ph:o order id -> JSON, ph:u:NODE undelivered order ids,
    # ph:pend nodes with undelivered orders (cached each refresh for the UDP path), ph:f:ORDER failures --

    def preheat_pending(self, node_id: str) -> bool:
        return node_id in self._pending

    async def preheat_add(self, name: str, artifact_id: str, nodes: list[str], selector: str) -> Order:
        p = self.prefix
        order = PreheatBook().add(name, artifact_id, nodes, selector, time.time())
        cmds: list[list[Any]] = [["MULTI"], ["HSET", p + "ph:o", order.order_id, json.dumps(vars(order))]]
        cmds += [["SADD", p + "ph:u:" + n, order.order_id] for n in nodes]
        cmds += [["SADD", p + "ph:pend", *nodes], ["EXEC"]]
        await self._cmds(cmds)
        self._pending.update(nodes)
        return order

    async def preheat_take(self, node_id: str) -> list[dict[str, Any]]:
        p = self.prefix
        res = await self._cmds(
            [["MULTI"], ["SMEMBERS", p + "ph:u:" + node_id], ["DEL", p + "ph:u:" + node_id],
             ["SREM", p + "ph:pend", node_id], ["EXEC"]]
        )  # fmt: skip
        self._pending.discard(node_id)
        ids = sorted(_s(x) for x in (res[-1] or [[]])[0])
        if not ids:
            return []
        raws = await self._cmds([["HMGET", p + "ph:o", *ids]])
        return [
            {"order": o["order_id"], "name": o["name"], "artifact_id": o["artifact_id"]}
            for raw in raws[0]
            if raw is not None and (o := json.loads(_s(raw)))
        ]

    async def preheat_fail(self, node_id: str, order_id: str, message: str) -> bool:
        p = self.prefix
        (raw,) = await self._cmds([["HGET", p + "ph:o", order_id]])
        if raw is None or node_id not in json.loads(_s(raw))["nodes"]:
            return False
        await self._cmds([["HSET", p + "ph:f:" + order_id, node_id, message[:500]]])
        return True

    async def preheat_book(self) -> PreheatBook:
        p = self.prefix
        (raw,) = await self._cmds([["HGETALL", p + "ph:o"]])
        book = PreheatBook()
        for i in range(0, len(raw), 2):
            o = Order(**json.loads(_s(raw[i + 1])))
            book.orders[o.order_id] = o
        ids = list(book.orders)
        if ids:
            fails = await self._cmds([["HGETALL", p + "ph:f:" + i] for i in ids])
            for oid, f in zip(ids, fails, strict=True):
                if f:
                    book.failures[oid] = {_s(f[j]): _s(f[j + 1]) for j in range(0, len(f), 2)}
            nodes = sorted({n for o in book.orders.values() for n in o.nodes})
            und = await self._cmds([["SMEMBERS", p + "ph:u:" + n] for n in nodes])
            for n, members in zip(nodes, und, strict=True):
                if members:
                    book.undelivered[n] = [_s(x) for x in members]
        return book

    # ---- admin views -------------------------------------------------------------------------------

    async def node_list(self, limit: int) -> list[dict[str, Any]]:
        p = self.prefix
        (ids, (now_s, now_us)) = await self._cmds(
            [["ZRANGE", p + "alive", 0, max(0, limit - 1), "WITHSCORES"], ["TIME"]]
        )
        now_ms = int(now_s) * 1000 + int(now_us) // 1000
        pairs = [(_s(ids[i]), float(ids[i + 1])) for i in range(0, len(ids), 2)]
        if not pairs:
            return []
        cmds: list[list[Any]] = []
        for nid, _ in pairs:
            cmds.append(["HMGET", p + "n:" + nid, "host", "port", "labels", "version", "reg", "nat", "mapped"])
            cmds.append(["HGETALL", p + "h:" + nid])
        res = await self._cmds(cmds)
        out = []
        for k, (nid, seen) in enumerate(pairs):
            host, port, labels, version, reg, nat, mapped = res[2 * k]
            if host is None:
                continue
            h = res[2 * k + 1]
            progress = [float(_s(h[i + 1])) for i in range(0, len(h), 2)]
            out.append(
                {
                    "node_id": nid,
                    "addr": [_s(host), int(port)],
                    "labels": json.loads(_s(labels or b"{}")),
                    "version": _s(version or b""),
                    "age_s": round((now_ms - int(reg or now_ms)) / 1000, 3),
                    "last_seen_s": round((now_ms - seen) / 1000, 3),
                    "heartbeats": None,
                    "holdings": len(progress),
                    "complete": sum(1 for x in progress if x >= 1.0),
                    **_nat_fields(nat, mapped, always=True),
                }
            )
        return out

    async def _holders(self, aid: str) -> tuple[list[tuple[str, str, float]], Any]:
        p = self.prefix
        (zones, info) = await self._cmds([["SMEMBERS", p + "az:" + aid], ["HGETALL", p + "mi:" + aid]])
        zs = [_s(z) for z in zones]
        cmds: list[list[Any]] = []
        for z in zs:
            cmds += [["SMEMBERS", f"{p}ac:{aid}:{z}"], ["HGETALL", f"{p}ap:{aid}:{z}"]]
        res = await self._cmds(cmds) if cmds else []
        holders: list[tuple[str, str, float]] = []
        for k, z in enumerate(zs):
            holders += [(_s(n), z, 1.0) for n in res[2 * k]]
            part = res[2 * k + 1]
            holders += [(_s(part[i]), z, float(_s(part[i + 1]))) for i in range(0, len(part), 2)]
        return holders, info

    async def artifact_list(self) -> list[dict[str, Any]]:
        p = self.prefix
        (arts, names) = await self._cmds([["SMEMBERS", p + "arts"], ["SMEMBERS", p + "names"]])
        name_list = [_s(n) for n in names]
        lasts = await self._cmds([["LINDEX", p + "t:" + n, -1] for n in name_list]) if name_list else []
        by_aid: dict[str, list[str]] = {}
        for n, last in zip(name_list, lasts, strict=True):
            if last is not None:
                by_aid.setdefault(_s(last)[:64], []).append(n)
        out = []
        for a in sorted(_s(x) for x in arts):
            holders, info = await self._holders(a)
            d = {_s(info[i]): _s(info[i + 1]) for i in range(0, len(info), 2)}
            if not holders and not d:
                await self._cmds([["SREM", p + "arts", a]])  # held once, by nobody now, never published
                continue
            out.append(
                {
                    "artifact_id": a,
                    "names": sorted(by_aid.get(a, [])),
                    "kind": d.get("kind", ""),
                    "size": int(d.get("size", 0)),
                    "pieces": int(d.get("pieces", 0)),
                    "complete": sum(1 for h in holders if h[2] >= 1.0),
                    "partial": sum(1 for h in holders if h[2] < 1.0),
                    "has_manifest": bool(d),
                }
            )
        return out

    async def swarm(self, artifact_id: str) -> dict[str, Any]:
        holders, info = await self._holders(artifact_id)
        d = {_s(info[i]): _s(info[i + 1]) for i in range(0, len(info), 2)}
        if not holders and not d:
            raise TrackerError(ErrorCode.NOT_FOUND, f"unknown artifact {artifact_id}")
        holders = holders[:1000]
        addrs = (
            await self._cmds([["HMGET", self.prefix + "n:" + n, "host", "port"] for n, _, _ in holders])
            if holders
            else []
        )
        rows: list[dict[str, Any]] = []
        for (n, z, prog), (host, port) in zip(holders, addrs, strict=True):
            if host is not None:
                rows.append({"node_id": n, "addr": [_s(host), int(port)], "zone": z, "progress": prog})
        rows.sort(key=lambda h: (-h["progress"], h["node_id"]))
        return {
            "artifact_id": artifact_id,
            "kind": d.get("kind", ""),
            "size": int(d.get("size", 0)),
            "pieces": int(d.get("pieces", 0)),
            "complete": sum(1 for r in rows if r["progress"] >= 1.0),
            "partial": sum(1 for r in rows if r["progress"] < 1.0),
            "holders": rows,
        }

    async def stats(self) -> dict[str, Any]:
        p = self.prefix
        c, nodes, arts, names = await self._cmds(
            [["HGETALL", p + "c"], ["ZCARD", p + "alive"], ["SCARD", p + "arts"], ["SCARD", p + "names"]]
        )
        counters = {_s(c[i]): int(c[i + 1]) for i in range(0, len(c), 2)}
        out: dict[str, Any] = {
            "store": self.kind,
            "redis": self.redis.where,
            "nodes": nodes,
            "artifacts": arts,
            "names": names,
            "interval": self.interval,
            "ttl": self.misses * self.interval,
        }
        for k in STORE_COUNTERS:
            out[k] = counters.get(k, 0)
        return out

    async def aclose(self) -> None:
        await self.redis.aclose()


def _wall() -> float:
    return round(time.time(), 3)
