"""p2pd tracker: the control plane that knows every node by heartbeat and every artifact's holders.

Layout (each module's docstring says why it is shaped the way it is):
- `registry`  sans-IO state of one tracker: nodes, holdings, names, peer selection (time passed in)
- `validate`  checks on every field a node or an admin sends, shared by all front ends
- `store`     the storage interface the servers use: `MemoryStore` (wraps the registry) or `RedisStore`
- `server`    trio front ends: the TCP RPC of docs/interfaces.md and the UDP heartbeat fast path
- `admin`     HTTP admin API (bearer token, OpenAPI, Prometheus `/metrics`)
- `cli`       `p2p-tracker serve` and `p2p-tracker admin ...`
- `bench`     `python -m tracker.bench`: heartbeat load generator and the opentracker comparison
"""
