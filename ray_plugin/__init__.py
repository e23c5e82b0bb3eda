"""Ray integration of p2pd: the "p2p" runtime_env plugin, inference workers on arrival, preheat.

Modules: `plugin` (the RuntimeEnvPlugin, imported by Ray's runtime_env agent), `daemon_client`
(asyncio client of the node daemon's control socket), `spec` (the runtime_env field), `router`
(latency-weighted smooth round-robin, pure), `inference` (InferencePool, preheat), `models`
(the safetensors MLP the example and tests serve). Nothing is imported here, so importing the
package does not import Ray.
"""
