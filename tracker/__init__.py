"""p2pd tracker: the control plane that knows every node by heartbeat and every artifact's holders.

Layout (each module's docstring says why it is shaped the way it is; docs/tracker.md is the manual):
- `registry`     sans-IO state of one tracker: nodes, holdings, names, peer selection (time passed in)
- `validate`     checks on every field a node or an admin sends, shared by all front ends
- `store`        the storage interface the front ends use, and `MemoryStore` (wraps the registry)
- `redis_store`  `RedisStore`: the same state in Redis (Lua scripts), shared by replicas; `resp` its client
- `server`       trio front ends: the TCP RPC of docs/interfaces.md and the UDP heartbeat fast path
- `admin`        HTTP admin API (bearer token, OpenAPI, Prometheus `/metrics` from `metrics`)
- `cli`          `p2p-tracker serve`; `admin_cli`: `p2p-tracker admin ...`

Not here: the heartbeat load benchmark is `python -m netsim.bench tracker` (netsim/bench/tracker_load.py);
tracker processes for tests and benchmarks come from `p2pd.cluster`. From p2pd this package imports
only the shared protocol and RPC modules (`p2pd.protocol.*`, `p2pd.rpc`).
"""
