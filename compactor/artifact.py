"""The .h5 artifact, schema v1 (documented in artifacts/README.md).

Written atomically (temporary file in the same folder, fsync, rename) so a crash or Ctrl-C never leaves a partial
artifact under the final name. Every dataset is chunked with HDF5's Fletcher-32 filter (a checksum per chunk,
checked by HDF5 on every read), and the root carries a sha256 digest of the whole payload. No pickle anywhere:
metadata are HDF5 attributes (strings, numbers, JSON text), tensors are plain numeric datasets; bfloat16 is
stored explicitly as its uint16 bit pattern with a `dtype="bfloat16"` attribute.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from .errors import ArtifactError

FORMAT = "compactor-kv"
VERSION = 1
STORED_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
REQUIRED_ATTRS = ("format", "format_version", "compactor_version", "created", "model_id", "model_config_sha256",
                  "tokenizer_sha256", "document_sha256", "T", "ratio", "method", "method_params", "num_layers",
                  "num_kv_heads", "head_dim", "stored_dtype", "payload_sha256")
LAYER_DATASETS = ("keys", "values", "beta", "positions", "lengths")


@dataclass
class LayerKV:
    """One layer of a compacted cache; heads shorter than t_max are padded (beta 0, position -1, zeros)."""

    keys: torch.Tensor       # (Hkv, t_max, d)
    values: torch.Tensor     # (Hkv, t_max, d)
    beta: torch.Tensor       # (Hkv, t_max) float32
    positions: torch.Tensor  # (Hkv, t_max) int64, -1 in padding
    lengths: torch.Tensor    # (Hkv,) int64 valid entries per head

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        """In-memory bytes of the valid entries: keys+values at `dtype`, beta float32, positions int32."""
        item = torch.empty((), dtype=dtype or self.keys.dtype).element_size()
        n, d = int(self.lengths.sum()), self.keys.shape[-1]
        return n * (2 * d * item + 4 + 4)


@dataclass
class Artifact:
    meta: dict
    layers: list[LayerKV] = field(default_factory=list)
    path: Path | None = None

    @property
    def T(self) -> int:
        return int(self.meta["T"])


def _to_numpy(x: torch.Tensor, stored: str) -> np.ndarray:
    x = x.detach().cpu()
    if stored == "bfloat16":
        return x.to(torch.bfloat16).view(torch.uint16).numpy()
    return x.to(STORED_DTYPES[stored]).numpy()


def _digest_update(h, name: str, arr: np.ndarray) -> None:
    h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
    h.update(np.ascontiguousarray(arr).tobytes())


def _layer_arrays(layer: LayerKV, stored: str) -> dict[str, np.ndarray]:
    return {"keys": _to_numpy(layer.keys, stored), "values": _to_numpy(layer.values, stored),
            "beta": layer.beta.detach().cpu().float().numpy(),
            "positions": layer.positions.detach().cpu().to(torch.int32).numpy(),
            "lengths": layer.lengths.detach().cpu().to(torch.int32).numpy()}


def write_artifact(path: str | Path, meta: dict, layers: list[LayerKV], stored_dtype: str = "bfloat16") -> Path:
    """Write atomically; `meta` holds the root attributes except format/version/dtype/digest (added here)."""
    if stored_dtype not in STORED_DTYPES:
        raise ValueError(f"stored dtype must be one of {', '.join(STORED_DTYPES)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with h5py.File(tmp, "w") as f:
            for i, layer in enumerate(layers):
                g = f.create_group(f"layers/{i:05d}")
                g.attrs["encoding"] = "raw"
                for name, arr in _layer_arrays(layer, stored_dtype).items():
                    ds = g.create_dataset(name, data=arr, chunks=True if arr.size else None,
                                          fletcher32=bool(arr.size))
                    if name in ("keys", "values"):
                        ds.attrs["dtype"] = stored_dtype
                    _digest_update(digest, f"layers/{i:05d}/{name}", arr)
            attrs = {**meta, "format": FORMAT, "format_version": VERSION, "stored_dtype": stored_dtype,
                     "num_layers": len(layers), "payload_sha256": digest.hexdigest()}
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


def _attr(v):
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, (np.generic, np.ndarray)):
        v = v.tolist()
    return v


def _open(path: Path) -> h5py.File:
    if not path.exists():
        raise ArtifactError(f"artifact not found: {path}")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise ArtifactError(f"{path} is not a readable .h5 artifact (truncated or corrupted?): "
                            f"{str(e).splitlines()[0]}") from None


def read_meta(path: str | Path) -> dict:
    """Root attributes, validated (format, version, required keys); no payload read."""
    path = Path(path)
    with _open(path) as f:
        return _check_meta(path, {k: _attr(v) for k, v in f.attrs.items()})


def _check_meta(path: Path, meta: dict) -> dict:
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a compactor artifact (format attribute {meta.get('format')!r})")
    if int(meta["format_version"]) > VERSION:
        raise ArtifactError(f"{path} has format version {meta['format_version']}, newer than this compactor "
                            f"reads ({VERSION}); upgrade compactor")
    missing = [k for k in REQUIRED_ATTRS if k not in meta]
    if missing:
        raise ArtifactError(f"{path} lacks required attributes: {', '.join(missing)}")
    for k in json.loads(meta.get("json_attributes", "[]")):
        meta[k] = json.loads(meta[k])
    return meta


def _from_numpy(arr: np.ndarray, stored: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.view(torch.bfloat16) if stored == "bfloat16" else t


def read_artifact(path: str | Path, verify: bool = True) -> Artifact:
    """Read and (by default) verify the payload digest; HDF5 checks each chunk's Fletcher-32 sum on read."""
    path = Path(path)
    with _open(path) as f:
        meta = _check_meta(path, {k: _attr(v) for k, v in f.attrs.items()})
        stored = meta["stored_dtype"]
        digest = hashlib.sha256()
        layers = []
        for i in range(int(meta["num_layers"])):
            name = f"layers/{i:05d}"
            if name not in f:
                raise ArtifactError(f"{path} is missing group {name}")
            if _attr(f[name].attrs.get("encoding", "raw")) != "raw":
                raise ArtifactError(f"{path}: {name} uses encoding {f[name].attrs['encoding']!r}, unknown here")
            arrays = {}
            for ds in LAYER_DATASETS:
                try:
                    arrays[ds] = f[f"{name}/{ds}"][()]
                except KeyError:
                    raise ArtifactError(f"{path} is missing dataset {name}/{ds}") from None
                except OSError as e:
                    raise ArtifactError(f"{path} is corrupted: {name}/{ds} fails its checksum "
                                        f"({str(e).splitlines()[0]})") from None
                _digest_update(digest, f"{name}/{ds}", arrays[ds])
            layers.append(LayerKV(_from_numpy(arrays["keys"], stored), _from_numpy(arrays["values"], stored),
                                  torch.from_numpy(arrays["beta"]), torch.from_numpy(arrays["positions"]).long(),
                                  torch.from_numpy(arrays["lengths"]).long()))
    if verify and digest.hexdigest() != meta["payload_sha256"]:
        raise ArtifactError(f"{path} is corrupted: payload digest mismatch")
    return Artifact(meta, layers, path)
