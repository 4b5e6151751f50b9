"""Schema v1's writer, verbatim from compactor 0.1.0 before schema v2 (write side only), kept to make v1 files for
the tests of the v1 reader and for the before/after numbers of benchmarks/bench_artifact.py."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np

FORMAT = "compactor-kv"
VERSION = 1


def _digest_update(h, name: str, arr: np.ndarray) -> None:
    h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
    h.update(np.ascontiguousarray(arr).tobytes())


def _items(layers, codebooks: dict[str, np.ndarray]):
    """(dataset path, array) in the canonical order the digest uses."""
    for i, layer in enumerate(layers):
        for name in sorted(layer.arrays):
            yield f"layers/{i:05d}/{name}", layer.arrays[name]
    for name in sorted(codebooks):
        yield f"codebooks/{name}", codebooks[name]


def write_artifact_v1(path: str | Path, meta: dict, layers, codebooks: dict[str, np.ndarray] | None = None) -> Path:
    """Write atomically; `meta` holds the root attributes except format/version/digest (added here)."""
    path, codebooks = Path(path), codebooks or {}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with h5py.File(tmp, "w") as f:
            for i, layer in enumerate(layers):
                g = f.create_group(f"layers/{i:05d}")
                for k, v in layer.attrs.items():
                    g.attrs[k] = v
            f.create_group("codebooks")
            for name, arr in _items(layers, codebooks):
                f.create_dataset(name, data=arr, chunks=True if arr.size else None, fletcher32=bool(arr.size))
                _digest_update(digest, name, arr)
            attrs = {**meta, "format": FORMAT, "format_version": VERSION, "num_layers": len(layers),
                     "payload_sha256": digest.hexdigest()}
            json_keys = sorted(k for k, v in attrs.items() if isinstance(v, dict))
            for k, v in attrs.items():
                f.attrs[k] = json.dumps(v) if k in json_keys else (np.asarray(v) if isinstance(v, list) else v)
            f.attrs["json_attributes"] = json.dumps(json_keys)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def v1_meta(meta: dict, model) -> dict:
    """A v2 pipeline meta turned into what the v1 pipeline wrote: the loose weights signature, no identity."""
    from compactor.models import weights_signature

    out = {k: v for k, v in meta.items() if k != "model_weights"}
    out["model_weights_signature"] = weights_signature(model).tolist()
    return out
