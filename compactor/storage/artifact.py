"""The .h5 container (schema v1, documented in artifacts/README.md): root attributes, one group of named arrays
per layer, and the codebooks shared by the file. What the arrays mean is kv_codec.py's business.

Written atomically (temporary file in the same folder, fsync, rename) so a crash or Ctrl-C never leaves a partial
artifact under the final name. Every dataset is chunked with HDF5's Fletcher-32 filter (a checksum per chunk,
checked by HDF5 on every read), and the root carries a sha256 digest of the whole payload. No Python object
serialization anywhere: metadata are HDF5 attributes (strings, numbers, numeric arrays, JSON text), tensors are
numeric datasets.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..errors import ArtifactError

FORMAT = "compactor-kv"
VERSION = 1
REQUIRED_ATTRS = ("format", "format_version", "compactor_version", "created", "model_id", "model_config_sha256",
                  "tokenizer_sha256", "document_sha256", "T", "ratio", "method", "method_params", "num_layers",
                  "num_kv_heads", "head_dim", "payload_sha256")


@dataclass
class StoredLayer:
    arrays: dict[str, np.ndarray]
    attrs: dict


@dataclass
class Artifact:
    meta: dict
    layers: list[StoredLayer] = field(default_factory=list)
    codebooks: dict[str, np.ndarray] = field(default_factory=dict)
    path: Path | None = None

    @property
    def T(self) -> int:
        return int(self.meta["T"])

    @property
    def payload_bytes(self) -> int:
        """Bytes of every stored array: codes, gains, means, scales, raw keys/values, beta, positions, lengths,
        codebooks (the HDF5 file adds its own structure on top)."""
        return (sum(a.nbytes for layer in self.layers for a in layer.arrays.values())
                + sum(c.nbytes for c in self.codebooks.values()))


def _digest_update(h, name: str, arr: np.ndarray) -> None:
    h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
    h.update(np.ascontiguousarray(arr).tobytes())


def _items(layers: list[StoredLayer], codebooks: dict[str, np.ndarray]):
    """(dataset path, array) in the canonical order the digest uses."""
    for i, layer in enumerate(layers):
        for name in sorted(layer.arrays):
            yield f"layers/{i:05d}/{name}", layer.arrays[name]
    for name in sorted(codebooks):
        yield f"codebooks/{name}", codebooks[name]


def write_artifact(path: str | Path, meta: dict, layers: list[StoredLayer],
                   codebooks: dict[str, np.ndarray] | None = None) -> Path:
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


def read_meta(path: str | Path) -> dict:
    """Root attributes, validated (format, version, required keys); no payload read."""
    path = Path(path)
    with _open(path) as f:
        return _check_meta(path, {k: _attr(v) for k, v in f.attrs.items()})


def _read(f: h5py.File, path: Path, name: str) -> np.ndarray:
    try:
        return f[name][()]
    except OSError as e:
        raise ArtifactError(f"{path} is corrupted: {name} fails its checksum ({str(e).splitlines()[0]})") from None


def read_artifact(path: str | Path, verify: bool = True) -> Artifact:
    """Read every array; HDF5 checks each chunk's Fletcher-32 sum on read, and (by default) the payload digest
    is recomputed and compared."""
    path = Path(path)
    with _open(path) as f:
        meta = _check_meta(path, {k: _attr(v) for k, v in f.attrs.items()})
        layers = []
        for i in range(int(meta["num_layers"])):
            name = f"layers/{i:05d}"
            if name not in f:
                raise ArtifactError(f"{path} is missing group {name}")
            g = f[name]
            layers.append(StoredLayer({k: _read(f, path, f"{name}/{k}") for k in g},
                                      {k: _attr(v) for k, v in g.attrs.items()}))
        books = {k: _read(f, path, f"codebooks/{k}") for k in f.get("codebooks", {})}
    art = Artifact(meta, layers, books, path)
    if verify:
        digest = hashlib.sha256()
        for name, arr in _items(layers, books):
            _digest_update(digest, name, arr)
        if digest.hexdigest() != meta["payload_sha256"]:
            raise ArtifactError(f"{path} is corrupted: payload digest mismatch")
    return art
