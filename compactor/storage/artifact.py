"""The .h5 container (schema v2, documented in artifacts/README.md; v1 files are still read).

v2: four root attributes (format, format_version, `meta`: one JSON object with every field, digest_sha256) and a
few contiguous root datasets, one per kind of array with all layers concatenated (packing.py). The sha256 digest
covers the canonical encoding of every field and every dataset; it is checked on every read. Before any dataset
is read, every field is validated (schema.py), the expected datasets, dtypes and shapes are derived from the
fields, and each dataset is checked to be plain storage inside the file (h5safe.py), so a damaged or hostile file
is refused with one line and without allocating what it declares. Written atomically: a temporary file in the
same folder (`.<name>.tmp-<pid>`), fsynced, renamed (output.py removes those left by dead writers).

v1 (read only): layer groups of chunked Fletcher-32 datasets and a payload digest over the datasets only; its
attributes (T, dtypes, seeds) are not covered by any checksum, and its weights signature is loose. Read with the
same structural checks; see artifacts/README.md for what v1 cannot guarantee.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..errors import ArtifactError
from . import h5safe, packing, schema
from .kv_codec import STORED_NP, check_layer_arrays, codec_from_label, codebook_name, tensor_specs
from .output import atomic_target, cleanup_on_sigterm
from .schema import FORMAT, VERSION

READABLE_VERSIONS = (1, 2)


@dataclass
class StoredLayer:
    """One layer's arrays and attributes as `kv_codec.encode_layer` makes them and `decode_layer` reads them."""

    arrays: dict[str, np.ndarray]
    attrs: dict


@dataclass
class Artifact:
    meta: dict
    layers: list[StoredLayer] = field(default_factory=list)
    codebooks: dict[str, np.ndarray] = field(default_factory=dict)
    path: Path | None = None
    dataset_bytes: dict[str, int] = field(default_factory=dict)  # bytes of each dataset in the file

    @property
    def T(self) -> int:
        return int(self.meta["T"])

    @property
    def version(self) -> int:
        return int(self.meta["format_version"])

    @property
    def payload_bytes(self) -> int:
        """Bytes of the cache's arrays in the file: codes, gains, means, scales, raw keys/values, beta, positions,
        lengths, codebooks (not the model identity sample, nor HDF5's own structure)."""
        if self.dataset_bytes:
            return sum(n for k, n in self.dataset_bytes.items() if k != packing.IDENTITY_DATASET)
        return (sum(a.nbytes for layer in self.layers for a in layer.arrays.values())
                + sum(c.nbytes for c in self.codebooks.values()))


@dataclass(frozen=True)
class ModelLimits:
    """What a model allows an artifact to declare: its layout, and T up to its context (0: unbounded)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_T: int = 0

    def check(self, meta: dict, where: str) -> None:
        for k in ("num_layers", "num_kv_heads", "head_dim"):
            if int(meta[k]) != getattr(self, k):
                raise ArtifactError(f"{where} was made for a model with {k} = {meta[k]}; this model has "
                                    f"{getattr(self, k)}")
        if self.max_T and int(meta["T"]) > self.max_T:
            raise ArtifactError(f"{where} declares T = {meta['T']} tokens, beyond this model's context of "
                                f"{self.max_T}")


# ---- writing (v2) ---------------------------------------------------------------------------------------------------
def _typed(name: str, value):
    """Python value -> the JSON type the schema gives the field (numpy scalars and tuples made plain)."""
    rule = schema.V2_FIELDS.get(name) or schema.V2_OPTIONAL.get(name)
    if rule.kind == "object":
        return schema.parse_json(schema.canonical_json(value))  # plain JSON types (tuples -> lists), or raises
    return {"int": int, "float": float, "str": str}[rule.kind](value)


def v2_content(meta: dict, layers: list[StoredLayer], codebooks: dict[str, np.ndarray]
               ) -> tuple[dict, dict[str, np.ndarray]]:
    """(root attributes with digest, root datasets) of a v2 file; validated as a reader would validate it."""
    head_dim, T = int(meta["head_dim"]), int(meta["T"])
    layout, datasets = packing.pack(layers, codebooks, T, head_dim)
    ident = dict(meta["model_weights"])
    datasets[packing.IDENTITY_DATASET] = np.asarray(ident.pop("kept"), dtype="<u2")
    known = set(schema.V2_FIELDS) | set(schema.V2_OPTIONAL)
    derived = {"format", "format_version", "num_layers", "digest_sha256", "codecs", "model_weights", *layout}
    fields = {k: _typed(k, v) for k, v in meta.items() if k in known and k not in derived}
    extra = {k: v for k, v in meta.items() if k not in known and k not in derived and k != "model_weights_signature"}
    if extra:
        fields["extra"] = _typed("extra", {**fields.get("extra", {}), **extra})
    fields.update({k: _typed(k, v) for k, v in layout.items()})
    fields.update({"num_layers": len(layers), "model_weights": _typed("model_weights", ident)})
    checked = schema.validate_v2(fields, "refusing to write an artifact")
    specs = packing.dataset_specs(checked, datasets["lengths"], datasets.get("phase_lengths"))
    if set(specs) != set(datasets) or any(datasets[k].dtype != specs[k][0] or datasets[k].shape != specs[k][1]
                                          for k in specs):
        raise ValueError("packed datasets disagree with the schema (a bug in packing.py)")
    attrs = schema.root_attrs(fields)
    attrs["digest_sha256"] = schema.digest_v2(fields, datasets)
    return attrs, datasets


def _write_attr(obj, name: str, value) -> None:
    """Strings as fixed-length UTF-8 (their size is in the type, so a reader can bound it before reading)."""
    if isinstance(value, str):
        b = value.encode("utf-8")
        obj.attrs.create(name, np.array(b, dtype=h5py.string_dtype("utf-8", max(1, len(b)))))
    else:
        obj.attrs.create(name, np.int64(value))


def write_h5(path: Path, attrs: dict, datasets: dict[str, np.ndarray]) -> Path:
    """The container every compactor .h5 file uses (caches and calibration files): root attributes (ints,
    fixed-length UTF-8 strings) and contiguous root datasets, written atomically (temporary file in the same folder,
    fsynced, renamed; removed on any error, Ctrl-C or SIGTERM)."""
    with cleanup_on_sigterm(), atomic_target(path) as tmp:
        with h5py.File(tmp, "w", libver=("v110", "latest")) as f:
            for name in sorted(datasets):
                f.create_dataset(name, data=datasets[name], track_times=False)
            for name in sorted(attrs):
                _write_attr(f, name, attrs[name])
    return path


def write_artifact(path: str | Path, meta: dict, layers: list[StoredLayer],
                   codebooks: dict[str, np.ndarray] | None = None) -> Path:
    """Write a v2 artifact atomically. `meta` holds the fields of artifacts/README.md except those this function
    derives (num_layers, layer_codecs, kv_bits, stored_dtype, rotation_seed, lloyd_*, beta, positions, phases,
    digest); `model_weights` is `models.weights_identity(model)`. Keys the schema does not know go into `extra`.
    Raises ArtifactError when the result would not validate or cannot be written, ValueError when the layers
    disagree (e.g. unsorted positions)."""
    attrs, datasets = v2_content(meta, layers, codebooks or {})
    return write_h5(Path(path), attrs, datasets)


# ---- reading --------------------------------------------------------------------------------------------------------
def _version(raw: dict, where: str) -> int:
    if raw.get("format") != FORMAT:
        raise ArtifactError(f"{where} is not a compactor artifact (format attribute {raw.get('format')!r:.60})")
    v = raw.get("format_version")
    if type(v) is not int:
        raise ArtifactError(f"{where}: attribute format_version must be an integer")
    if v > VERSION:
        raise ArtifactError(f"{where} has format version {v}, newer than this compactor reads ({VERSION}); "
                            "upgrade compactor")
    if v not in READABLE_VERSIONS:
        raise ArtifactError(f"{where} has unknown format version {v}")
    return v


def _meta(f: h5py.File, where: str) -> dict:
    """Validated metadata. v1 files hold variable-length strings and an array attribute; v2 files only scalars and
    fixed-length strings, whose sizes are known before they are read."""
    v = _version(h5safe.read_attrs(f, where, allow_vlen=True, only=("format", "format_version")), where)
    if v == 1:
        return schema.validate_v1(h5safe.read_attrs(f, where, allow_arrays=True, allow_vlen=True), where)
    raw = h5safe.read_attrs(f, where)
    fields = schema.parse_meta(raw, where)
    meta = schema.validate_v2(fields, where)
    meta.update({"format": FORMAT, "format_version": v, "digest_sha256": raw["digest_sha256"], "_fields": fields})
    return meta


def guard(path: Path, fn):
    """Run fn(file, size) on the file opened read-only; any h5py/numpy error on the way is an ArtifactError with one
    line (an ArtifactError raised by fn, or a subclass, passes as it is)."""
    f, size = h5safe.open_file(path)
    try:
        with f:
            return fn(f, size)
    except ArtifactError:
        raise
    except Exception as e:  # a damaged file can make h5py/numpy raise nearly anything: all of it means "bad file"
        raise ArtifactError(f"{path} is damaged or not a valid artifact ({h5safe.first_line(e)})") from None


def read_meta(path: str | Path) -> dict:
    """Root attributes, validated (types, ranges, closed sets, consistency); no dataset is read, so the digest is
    NOT checked here: use read_artifact / load_cache before trusting the cache."""
    path = Path(path)
    meta = guard(path, lambda f, size: _meta(f, str(path)))
    meta.pop("_fields", None)
    return meta


def _read_v2(f: h5py.File, size: int, meta: dict, where: str, verify: bool) -> Artifact:
    found = h5safe.members(f, where)
    if "lengths" not in found:
        raise ArtifactError(f"{where} has no lengths dataset")
    L, H = meta["num_layers"], meta["num_kv_heads"]
    h5safe.check_dataset(f["lengths"], f"{where}:lengths", np.dtype("<i4"), (L, H), size)
    lengths = h5safe.read_dataset(f["lengths"], f"{where}:lengths")
    if (lengths < 0).any() or (lengths > meta["T"]).any():
        raise ArtifactError(f"{where}: a head keeps a negative count or more than T={meta['T']} entries")
    if int(lengths.sum(dtype=np.int64)) > meta["budget_total"]:
        raise ArtifactError(f"{where}: heads keep {int(lengths.sum(dtype=np.int64))} entries, more than "
                            f"budget_total {meta['budget_total']}")
    phase_lengths = None
    if "phases" in meta:
        if "phase_lengths" not in found:
            raise ArtifactError(f"{where} has phases but no phase_lengths dataset")
        h5safe.check_dataset(f["phase_lengths"], f"{where}:phase_lengths", np.dtype("<i4"),
                             (L, len(meta["phases"]["names"]), H), size)
        phase_lengths = h5safe.read_dataset(f["phase_lengths"], f"{where}:phase_lengths")
        if (phase_lengths < 0).any() or (phase_lengths.sum(1, dtype=np.int64) != lengths).any():
            raise ArtifactError(f"{where}: phase_lengths do not add up to lengths")
    specs = packing.dataset_specs(meta, lengths, phase_lengths)
    if set(found) != set(specs) or any(kind != "dataset" for kind in found.values()):
        extra, missing = sorted(set(found) - set(specs)), sorted(set(specs) - set(found))
        raise ArtifactError(f"{where}: datasets do not match the attributes (unexpected: {extra[:5]}, "
                            f"missing: {missing[:5]})")
    dsets = {name: f[name] for name in sorted(specs)}
    for name, (dtype, shape) in specs.items():
        h5safe.check_dataset(dsets[name], f"{where}:{name}", dtype, shape, size)
    data = {name: h5safe.read_dataset(d, f"{where}:{name}") for name, d in dsets.items()}
    if verify and schema.digest_v2(meta["_fields"], data) != meta["digest_sha256"]:
        raise ArtifactError(f"{where} is corrupted or was altered: its digest (over every attribute and dataset) "
                            "does not match")
    try:
        layers, books = packing.unpack(meta, data)
        for arrays, _ in layers:
            check_layer_arrays(arrays, meta["T"])
    except ValueError as e:
        raise ArtifactError(f"{where}: {e}") from None
    meta.pop("_fields")
    meta["model_weights"]["kept"] = data[packing.IDENTITY_DATASET]
    return Artifact(meta, [StoredLayer(a, t) for a, t in layers], books, None,
                    {name: arr.nbytes for name, arr in data.items()})


# v1: layer attributes and which datasets each codec keeps (v1 wrote bits/seed/codebook per tensor)
_V1_LAYER_ATTRS = {"kv_codec", "keys_codec", "values_codec",
                   *(f"{t}_{k}" for t in ("keys", "values")
                     for k in ("dtype", "bits", "seed", "codebook", "exact_dtype"))}


def _v1_layer_specs(attrs: dict, lengths: list[int], d: int, exact: int, mean_dtype: dict, where: str) -> dict:
    """Expected {dataset: (dtype, shape)} of one v1 layer group from its (untrusted) attributes."""
    unknown = set(attrs) - _V1_LAYER_ATTRS
    if unknown:
        raise ArtifactError(f"{where}: unknown layer attributes {sorted(unknown)[:5]}")
    try:
        codec = codec_from_label(str(attrs.get("kv_codec")), exact)
    except ValueError as e:
        raise ArtifactError(f"{where}: {e}") from None
    specs = {"lengths": (np.dtype("<i4"), (len(lengths),)), "beta": (np.dtype("<f4"), (sum(lengths),)),
             "positions": (np.dtype("<i4"), (sum(lengths),))}
    for t, part in (("keys", codec.keys), ("values", codec.values)):
        if attrs.get(f"{t}_codec") != part.name:
            raise ArtifactError(f"{where}: {t}_codec {attrs.get(f'{t}_codec')!r:.40} disagrees with kv_codec")
        if part.name in ("q8_0", "q4_0") and d % 32 or part.name == "lloyd" and d < 4:
            raise ArtifactError(f"{where}: codec {part.name} cannot store head_dim {d}")
        want = {"raw": {f"{t}_dtype"}, "lloyd": {f"{t}_bits", f"{t}_seed", f"{t}_codebook"} |
                ({f"{t}_exact_dtype"} if exact else set())}.get(part.name, set())
        have = {k for k in attrs if k.startswith(f"{t}_") and k != f"{t}_codec"}
        if have != want:
            raise ArtifactError(f"{where}: {t} attributes {sorted(have)} do not fit codec {part.name}")
        stored = attrs.get(f"{t}_dtype", attrs.get(f"{t}_exact_dtype", "float32"))
        if stored not in STORED_NP:
            raise ArtifactError(f"{where}: {t} stored dtype {stored!r:.40} is not one of {', '.join(STORED_NP)}")
        if part.name == "lloyd" and (attrs[f"{t}_bits"] != part.bits or type(attrs[f"{t}_seed"]) is not int
                                     or not 0 <= attrs[f"{t}_seed"] < 2**63
                                     or part.codebook or attrs[f"{t}_codebook"] != codebook_name(part.bits, d)):
            raise ArtifactError(f"{where}: {t} lloyd attributes (bits, seed, codebook) are inconsistent")
        specs.update(tensor_specs(t, part, lengths, d, stored, mean_dtype.get(t, "float16")))
    return specs


def _read_v1(f: h5py.File, size: int, meta: dict, where: str, verify: bool) -> Artifact:
    fletcher = (h5safe.FLETCHER32,)
    root = h5safe.members(f, where)
    if root != {"layers": "group", "codebooks": "group"}:
        raise ArtifactError(f"{where}: expected groups layers and codebooks, found {sorted(root)[:5]}")
    L, H, d, T = meta["num_layers"], meta["num_kv_heads"], meta["head_dim"], meta["T"]
    if h5safe.members(f["layers"], f"{where}:layers") != {f"{i:05d}": "group" for i in range(L)}:
        raise ArtifactError(f"{where}: layer groups do not match num_layers = {L}")
    if h5safe.read_attrs(f["layers"], where) or h5safe.read_attrs(f["codebooks"], where):
        raise ArtifactError(f"{where}: unexpected attributes on the layers/codebooks groups")
    books_found = h5safe.members(f["codebooks"], f"{where}:codebooks")
    layers, nbytes, items = [], {}, []
    for i in range(L):
        name = f"layers/{i:05d}"
        here, g = f"{where}:{name}", f[name]
        attrs = h5safe.read_attrs(g, here, allow_vlen=True)
        found = h5safe.members(g, here)
        if found.get("lengths") != "dataset":
            raise ArtifactError(f"{here} has no lengths dataset")
        h5safe.check_dataset(g["lengths"], f"{here}/lengths", np.dtype("<i4"), (H,), size, fletcher)
        lengths = h5safe.read_dataset(g["lengths"], f"{here}/lengths")
        if (lengths < 0).any() or (lengths > T).any():
            raise ArtifactError(f"{here}: a head keeps a negative count or more than T={T} entries")
        lengths = lengths.tolist()
        exact = {t: g[f"{t}_exact_rows"].shape for t in ("keys", "values") if found.get(f"{t}_exact_rows")}
        e = next(iter(exact.values()), (0, 0))[-1] if exact else 0
        if any(len(s) != 2 or s[-1] != e for s in exact.values()) or e > min(lengths, default=0) or e > 64:
            raise ArtifactError(f"{here}: inconsistent exact entries")
        means = {t: {"<f4": "float32"}.get(g[f"{t}_mean"].dtype.str, "float16")
                 for t in ("keys", "values") if found.get(f"{t}_mean") == "dataset"}
        specs = _v1_layer_specs(attrs, lengths, d, e, means, here)
        if set(found) != set(specs) or any(k != "dataset" for k in found.values()):
            raise ArtifactError(f"{here}: datasets {sorted(found)[:8]} do not match its codec")
        arrays = {}
        for k, (dtype, shape) in specs.items():
            h5safe.check_dataset(g[k], f"{here}/{k}", dtype, shape, size, fletcher)
            arrays[k] = h5safe.read_dataset(g[k], f"{here}/{k}")
        try:
            check_layer_arrays(arrays, T)
        except ValueError as e:
            raise ArtifactError(f"{here}: {e}") from None
        for k in sorted(arrays):
            items.append((f"{name}/{k}", arrays[k]))
            nbytes[f"{name}/{k}"] = arrays[k].nbytes
        layers.append(StoredLayer(arrays, attrs))
    needed = {layer.attrs[f"{t}_codebook"] for layer in layers for t in ("keys", "values")
              if f"{t}_codebook" in layer.attrs}
    if set(books_found) != needed or any(kind != "dataset" for kind in books_found.values()):
        raise ArtifactError(f"{where}: codebooks {sorted(books_found)[:5]} do not match the layers' "
                            f"{sorted(needed)[:5]}")
    books = {}
    for k in sorted(needed):
        bits = int(k.split("-b")[1].split("-")[0])
        h5safe.check_dataset(f["codebooks"][k], f"{where}:codebooks/{k}", np.dtype("<f4"), (2**bits,), size,
                             fletcher)
        books[k] = h5safe.read_dataset(f["codebooks"][k], f"{where}:codebooks/{k}")
        if not np.isfinite(books[k]).all():
            raise ArtifactError(f"{where}: codebook {k} holds non-finite values")
        items.append((f"codebooks/{k}", books[k]))
        nbytes[f"codebooks/{k}"] = books[k].nbytes
    if verify:
        digest = hashlib.sha256()
        for name, arr in items:
            _digest_update(digest, name, arr)
        if digest.hexdigest() != meta["payload_sha256"]:
            raise ArtifactError(f"{where} is corrupted: payload digest mismatch")
    return Artifact(meta, layers, books, None, nbytes)


def _digest_update(h, name: str, arr: np.ndarray) -> None:
    """Schema v1's payload digest: per dataset (layers in order, datasets by name, then codebooks)."""
    h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
    h.update(np.ascontiguousarray(arr).tobytes())


def read_artifact(path: str | Path, verify: bool = True, limits: ModelLimits | None = None) -> Artifact:
    """Read and check an artifact (v2 or v1). Attributes are validated and, with `limits` (the model it is for),
    matched against the model before any dataset is read; every dataset's storage, dtype and shape is checked
    before it is read; then the digest is verified. verify=False skips only the digest comparison (for forensics:
    `inspect --no-verify`); the cache it returns may then have been altered."""
    path = Path(path)
    where = str(path)

    def read(f, size):
        meta = _meta(f, where)
        if limits is not None:
            limits.check(meta, where)
        return (_read_v1 if meta["format_version"] == 1 else _read_v2)(f, size, meta, where, verify)

    art = guard(path, read)
    art.path = path
    return art
