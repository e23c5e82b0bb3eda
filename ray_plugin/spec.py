"""The `p2p` runtime_env field: parsing, URIs and the env compatibility rule (pure, no Ray import).

Kept apart from the plugin class so that it can be tested and reused (the inference pool builds its
runtime_env with it) without loading Ray's private modules.

Spec: `{"model": "NAME:TAG" | ["NAME:TAG", ...], "env": "NAME:TAG", "wait": bool}`; model or env may
be left out but not both. `wait` (default True) gates the worker's start on the models; False only
starts their downloads and lets the worker start at once (it then fetches them itself, joining the
download: what InferencePool's early start uses to hide the worker start-up under the download).

A name may also be an artifact id (64 hex digits), which never moves: tags are resolved once
per node and Ray caches the result by URI (see docs/ray.md), so immutable tags or ids are the safe choice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from p2pd.protocol.manifest import ID_RE, NAME_RE

FIELD = "p2p"
KEYS = ("model", "env", "wait")
URI_SCHEME = "p2p://"


@dataclass(frozen=True)
class ArtifactRef:
    """One artifact a runtime_env asks for: a model (files) or a packed env."""

    kind: str  # "model" | "env"
    name: str  # NAME:TAG or a 64-hex artifact id

    @property
    def uri(self) -> str:
        """Ray's cache key for it: one per (kind, name), so a model and an env never share an entry."""
        return f"{URI_SCHEME}{self.kind}/{self.name}"


@dataclass(frozen=True)
class P2PSpec:
    """A validated `p2p` field."""

    models: tuple[str, ...]
    env: str | None
    wait: bool = True  # False: start the model downloads but let the worker start at once (it fetches itself)

    @property
    def refs(self) -> list[ArtifactRef]:
        """Models first, in the user's order (P2P_MODEL_DIR is the first), then the env."""
        refs = [ArtifactRef("model", m) for m in self.models]
        if self.env is not None:
            refs.append(ArtifactRef("env", self.env))
        return refs

    @property
    def gating_refs(self) -> list[ArtifactRef]:
        """What the worker's start waits for: everything, or only the env when `wait` is False."""
        return self.refs if self.wait else [r for r in self.refs if r.kind == "env"]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.models:
            out["model"] = self.models[0] if len(self.models) == 1 else list(self.models)
        if self.env is not None:
            out["env"] = self.env
        if not self.wait:
            out["wait"] = False
        return out


def _check_name(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"runtime_env['p2p']['{where}'] must be a string NAME:TAG, got {type(value).__name__}")
    if not (NAME_RE.match(value) or ID_RE.match(value)):
        raise ValueError(
            f"runtime_env['p2p']['{where}'] = {value!r} is not NAME:TAG (e.g. 'llama-3-8b:v2'; letters, digits "
            "and '._-/' in the name) nor a 64-hex artifact id"
        )
    return value


def parse_spec(spec: Any) -> P2PSpec:
    """Validate the user's `p2p` field; every error names the offending key and shows a valid example."""
    if isinstance(spec, str):
        raise ValueError(
            f"runtime_env['p2p'] must be a dict like {{'model': {spec!r}}} or {{'env': {spec!r}}}, "
            f"got the string {spec!r}"
        )
    if not isinstance(spec, Mapping):
        raise ValueError(
            "runtime_env['p2p'] must be a dict like {'model': 'llama-3-8b:v2', 'env': 'infer:7'}, "
            f"got {type(spec).__name__}"
        )
    unknown = sorted(str(k) for k in spec if k not in KEYS)
    if unknown:
        raise ValueError(f"runtime_env['p2p'] has unknown key(s) {unknown}; allowed keys: 'model', 'env', 'wait'")
    if spec.get("model") is None and spec.get("env") is None:
        raise ValueError("runtime_env['p2p'] needs 'model' (NAME:TAG or a list of them) and/or 'env' (NAME:TAG)")
    raw_models = spec.get("model")
    models: list[str] = []
    if isinstance(raw_models, str):
        models = [_check_name(raw_models, "model")]
    elif isinstance(raw_models, list | tuple):
        if not raw_models:
            raise ValueError("runtime_env['p2p']['model'] is an empty list; give at least one NAME:TAG or leave it out")
        for i, m in enumerate(raw_models):
            name = _check_name(m, f"model'][{i}")
            if name not in models:  # a repeated model is one download and one directory
                models.append(name)
    elif raw_models is not None:
        raise ValueError(
            f"runtime_env['p2p']['model'] must be NAME:TAG or a list of them, got {type(raw_models).__name__}"
        )
    env = spec.get("env")
    if env is not None:
        env = _check_name(env, "env")
    wait = spec.get("wait", True)
    if not isinstance(wait, bool):
        raise ValueError(f"runtime_env['p2p']['wait'] must be True or False, got {wait!r}")
    return P2PSpec(tuple(models), env, wait)


def python_mismatch(env_python: str, cluster_python: str, level: str) -> bool:
    """Ray's own rule for a worker's Python: same major.minor, and same patch at level 'patch' (Ray's default)."""
    mine, theirs = env_python.split("."), cluster_python.split(".")
    if level == "minor":
        return mine[:2] != theirs[:2]
    return mine[:3] != theirs[:3]


def check_env_compat(
    name: str,
    versions: Mapping[str, Any],
    *,
    cluster_python: str,
    cluster_ray: str,
    match_level: str = "patch",
    cluster_platform: str | None = None,
    source: str = "its manifest",
) -> None:
    """Refuse an env Ray would start a worker in but never hear from (it hangs rather than failing).

    Ray workers must run the cluster's Ray version and Python (minor always; patch too unless
    RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL=minor). Missing fields are not judged here: the probe that
    runs the env's interpreter fills them in.
    """
    plat = versions.get("platform")
    if cluster_platform and isinstance(plat, str) and plat not in (cluster_platform, "noarch"):
        raise EnvMismatch(
            f"p2p: env {name} was built for {plat} ({source}) but this node is {cluster_platform}: pack the env on "
            f"a {cluster_platform} machine and publish it under a new tag"
        )
    py = versions.get("python_version")
    if isinstance(py, str) and py and python_mismatch(py, cluster_python, match_level):
        hint = (
            " (or set RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL=minor for `ray start` if only the patch differs)"
            if match_level == "patch" and py.split(".")[:2] == cluster_python.split(".")[:2]
            else ""
        )
        raise EnvMismatch(
            f"p2p: env {name} has Python {py} ({source}) but this Ray cluster runs Python {cluster_python}; Ray "
            f"workers must use the cluster's Python: rebuild the env with Python {cluster_python}, repack and "
            f"publish it under a new tag{hint}"
        )
    if "ray_version" in versions:
        ray_v = versions.get("ray_version")
        if not ray_v:
            raise EnvMismatch(
                f"p2p: env {name} does not contain Ray ({source}); a worker started in it would hang: install "
                f"ray=={cluster_ray} into the env, repack and publish it under a new tag"
            )
        if ray_v != cluster_ray:
            raise EnvMismatch(
                f"p2p: env {name} has Ray {ray_v} ({source}) but this cluster runs Ray {cluster_ray}; install "
                f"ray=={cluster_ray} into the env, repack and publish it under a new tag"
            )


class EnvMismatch(RuntimeError):
    """A packed env cannot host a Ray worker of this cluster."""
