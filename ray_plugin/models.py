"""A small real model format for the inference workers: an MLP stored as safetensors.

Why this and not a hub model: nothing may be downloaded from a model hub here, and the point is to
prove that the bytes p2pd moved are the weights the worker computes with. The format is the one real
checkpoints use (safetensors shards + config.json), so the same loading path works for a multi-GB
sharded checkpoint in the benchmark.

Layout of a model directory:
    config.json                       {"format": "p2pd-mlp/1", "activation": "relu"|"tanh", "layers": N}
    model-00001-of-0000K.safetensors  tensors "layers.{i}.weight" (out, in) and "layers.{i}.bias" (out,)

Workers compute with torch when it is installed (on CUDA when `torch.cuda.is_available()`), else with
numpy; tests compare against `forward_numpy`. This module imports nothing heavy at import time, so
the worker class can ship it by value into a packed env.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FORMAT = "p2pd-mlp/1"
ACTIVATIONS = ("relu", "tanh")

Layers = list[tuple[Any, Any]]  # [(weight (out, in), bias (out,)), ...] as numpy arrays


def make_mlp(sizes: Sequence[int], seed: int = 0) -> Layers:
    """Random float32 layers for sizes [in, hidden..., out], scaled so activations stay O(1)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    layers: Layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        w = (rng.standard_normal((fan_out, fan_in), dtype=np.float32) / np.float32(np.sqrt(fan_in))).astype(np.float32)
        b = (rng.standard_normal(fan_out, dtype=np.float32) * np.float32(0.1)).astype(np.float32)
        layers.append((w, b))
    return layers


def save_mlp(
    layers: Layers, model_dir: str | os.PathLike[str], activation: str = "relu", shard_bytes: int = 1 << 30
) -> Path:
    """Write the layers as safetensors shards of at most about `shard_bytes` each, plus config.json."""
    from safetensors.numpy import save_file

    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}")
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = [{}]
    size = 0
    for i, (w, b) in enumerate(layers):
        n = w.nbytes + b.nbytes
        if shards[-1] and size + n > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][f"layers.{i}.weight"] = w
        shards[-1][f"layers.{i}.bias"] = b
        size += n
    for k, tensors in enumerate(shards, 1):
        save_file(tensors, out / f"model-{k:05d}-of-{len(shards):05d}.safetensors", metadata={"format": "np"})
    (out / "config.json").write_text(json.dumps({"format": FORMAT, "activation": activation, "layers": len(layers)}))
    return out


def forward_numpy(layers: Layers, x: Any, activation: str = "relu") -> Any:
    """The reference forward pass (float32): activation after every layer but the last."""
    import numpy as np

    h = np.asarray(x, dtype=np.float32)
    for i, (w, b) in enumerate(layers):
        h = h @ w.T + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0) if activation == "relu" else np.tanh(h)
    return h


def _config(d: Path) -> dict[str, Any]:
    cfg: dict[str, Any] = json.loads((d / "config.json").read_text())
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{d} is not a {FORMAT} model (config.json format={cfg.get('format')!r})")
    return cfg


def _layers(tensors: dict[str, Any], n: int) -> Layers:
    return [(tensors[f"layers.{i}.weight"], tensors[f"layers.{i}.bias"]) for i in range(n)]


NUMPY_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
}


def map_safetensors(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The tensors of a safetensors file as read-only numpy arrays over a shared mapping of the file.

    Nothing is copied: loading costs milliseconds instead of a pass over every byte, the first use
    pages the weights in from the page cache (where p2pd just wrote them), and every worker on a node
    shares those pages instead of holding its own copy of a multi-GB model.
    """
    import mmap
    import struct

    import numpy as np

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise ValueError(f"{path} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise ValueError(f"{path} is not a safetensors file (header length {n} > file size)")
        header = json.loads(f.read(n))
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    base = 8 + n
    out: dict[str, Any] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = NUMPY_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, which numpy cannot hold")
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= size - base:
            raise ValueError(f"{path}: tensor {name} lies outside the file")
        arr = np.frombuffer(mm, dtype=dtype, count=(end - begin) // np.dtype(dtype).itemsize, offset=base + begin)
        out[name] = arr.reshape(info["shape"])
    return out


def read_layers(model_dir: str | os.PathLike[str]) -> tuple[Layers, str]:
    """Map every shard of a model directory as numpy arrays (read-only, zero-copy)."""
    d = Path(model_dir)
    cfg = _config(d)
    tensors: dict[str, Any] = {}
    for shard in sorted(d.glob("*.safetensors")):
        tensors.update(map_safetensors(shard))
    return _layers(tensors, int(cfg["layers"])), str(cfg.get("activation", "relu"))


class MLPPredictor:
    """A loaded model: call it with a batch (numpy array-like), get a numpy array back."""

    def __init__(self, model_dir: str | os.PathLike[str], device: str = "auto") -> None:
        self._torch: Any = None
        try:
            import torch
        except ImportError:
            torch = None
        if torch is None or device == "numpy":
            self.layers, self.activation = read_layers(model_dir)
            self.device, self.backend, self.device_name = "cpu", "numpy", "cpu"
            return
        from safetensors.torch import load_file

        d = Path(model_dir)
        cfg = _config(d)
        self.activation = str(cfg.get("activation", "relu"))
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.backend = "torch"
        # which card (or "cpu") computed the result, for benchmark records: "cuda" alone does not say
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.startswith("cuda") else "cpu"
        self._torch = torch
        tensors: dict[str, Any] = {}
        for shard in sorted(d.glob("*.safetensors")):  # straight onto the device, no host copy kept
            tensors.update(load_file(shard, device=self.device))
        self.layers = _layers(tensors, int(cfg["layers"]))

    def __call__(self, x: Any) -> Any:
        if self._torch is None:
            return forward_numpy(self.layers, x, self.activation)
        torch = self._torch
        import numpy as np

        with torch.inference_mode():
            h = torch.as_tensor(np.asarray(x, dtype=np.float32), device=self.device)
            for i, (w, b) in enumerate(self.layers):
                h = torch.nn.functional.linear(h, w, b)
                if i < len(self.layers) - 1:
                    h = torch.relu(h) if self.activation == "relu" else torch.tanh(h)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            return h.cpu().numpy()


def load_mlp(model_dir: str, device: str = "auto") -> MLPPredictor:
    """The default loader of InferencePool."""
    return MLPPredictor(model_dir, device)


def warmup(device: str = "auto") -> None:
    """Pay the one-time costs (imports, CUDA context) while the model is still downloading."""
    import numpy  # noqa: F401  (the numpy path maps shards itself: no safetensors import needed)

    try:
        import torch
    except ImportError:
        return
    import safetensors.torch  # noqa: F401

    if device not in ("cpu", "numpy") and torch.cuda.is_available():
        torch.cuda.init()
        torch.zeros(1, device="cuda")


load_mlp.warmup = warmup  # type: ignore[attr-defined]  # InferenceWorker calls it during an early start
