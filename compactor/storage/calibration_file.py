"""The calibration file, `artifacts/calibration/<model>.h5` (schema in artifacts/README.md, "Calibration files").

The same container as a cache (artifact.write_h5, h5safe, schema's typed fields and digest): four root attributes
(`format` = compactor-calibration, `format_version` = 1, `meta` = one JSON object, `digest_sha256` over the meta and
every dataset) and contiguous root datasets whose names, dtypes and shapes follow from the meta. A calibration file
is untrusted input like a cache: every field is validated, the dataset set is derived from them and checked with
h5safe before anything is read, the digest is verified, then every value is range-checked (codebooks ascending in
[-1, 1], bits in the allowed options, head weights finite and positive, ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, CalibrationError
from . import h5safe, schema
from .artifact import guard, write_h5
from .schema import HEX, OBJECT, Rule, _s

FORMAT = "compactor-calibration"
VERSION = 1
IDENTITY_DATASET = "model_weights_kept"
TENSORS = ("keys", "values")
CODEBOOK_KINDS = ("empirical", "beta", "gaussian")  # the third axis of codebook_mse
FIELDS = {
    "compactor_version": _s(64), "created": _s(64), "model_id": _s(4096),
    "model_type": _s(64, pattern=schema._NAME), "model_config_sha256": HEX, "model_weights": OBJECT,
    "tokenizer_sha256": HEX, "num_layers": Rule("int", 1, 1024), "num_kv_heads": Rule("int", 1, 1024),
    "head_dim": Rule("int", 4, 4096), "phases": OBJECT, "codebooks": OBJECT, "allocation": OBJECT,
    "head_budgets": OBJECT, "defaults": OBJECT, "settings": OBJECT, "summary": OBJECT,
}
OPTIONAL = {"extra": OBJECT, "defaults_split": OBJECT}  # defaults_split: files made before it have none
DEFAULT_KEYS = {"codebooks": bool, "layer_bits": bool, "phase_bits": bool, "head_budgets": bool, "budget": str}
OPTIONAL_DEFAULT_KEYS = {"head_power": float}  # head weights raised to this power in (0, 1]; absent: 1


@dataclass
class Calibration:
    """A validated calibration: `meta` (the fields above, plus digest_sha256 and path) and its arrays by name."""

    meta: dict
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return self.meta["digest_sha256"]

    @property
    def phase_names(self) -> list[str]:
        return list(self.meta["phases"]["names"])

    @property
    def codebook_bits(self) -> list[int]:
        return list(self.meta["codebooks"]["bits"])

    @property
    def avg_bits(self) -> list[float]:
        return list(self.meta["allocation"]["avg_bits"])

    def codebook(self, tensor: str, layer: int, bits: int, phase: int | None = None) -> np.ndarray | None:
        """Fitted centroids (2^bits,) float32 for keys/values of a layer (and phase, where the per-phase codebook
        pays; else the layer's), or None when no codebook was fitted at that bit width."""
        if bits not in self.codebook_bits:
            return None
        if phase is not None and self.arrays["phase_codebook_used"][phase, layer, TENSORS.index(tensor),
                                                                    self.codebook_bits.index(bits)]:
            return self.arrays[f"phase_codebook_{tensor}_b{bits}"][phase, layer]
        return self.arrays[f"codebook_{tensor}_b{bits}"][layer]

    def bits(self, avg: float, phased: bool = False) -> np.ndarray | None:
        """Measured allocation at `avg` average bits: (L, 2) K/V bits per layer, or (L, P, 2) per layer and phase
        with `phased`; None when no allocation was made for that average."""
        for i, a in enumerate(self.avg_bits):
            if abs(a - avg) < 1e-9:
                return self.arrays["bits_phases" if phased else "bits_document"][i]
        return None


def _list(x, kind, lo=None, hi=None, n_max=64) -> bool:
    return (isinstance(x, list) and 1 <= len(x) <= n_max and all(type(v) is kind for v in x)
            and (lo is None or all(lo <= v <= hi for v in x)))


def validate_meta(meta: dict, where: str) -> dict:
    """Typed, range-checked fields (ArtifactError otherwise); a new dict."""
    schema.check_field_set(meta, FIELDS, OPTIONAL, where, CalibrationError)
    try:
        meta = {k: schema.check_value(k, v, {**FIELDS, **OPTIONAL}[k], where) for k, v in meta.items()}
        schema.check_identity(meta["model_weights"], where)
    except CalibrationError:
        raise
    except ArtifactError as e:
        raise CalibrationError(str(e)) from None
    ph, cb, al, hb, de = (meta[k] for k in ("phases", "codebooks", "allocation", "head_budgets", "defaults"))
    names = ph.get("names")
    checks = [
        ("phases", set(ph) == {"names", "markers", "fallback_fraction"} and _list(names, str, n_max=schema.MAX_PHASES)
         and all(schema._PHASE_NAME.fullmatch(n) for n in names) and len(set(names)) == len(names)
         and isinstance(ph["markers"], list) and len(ph["markers"]) == len(names) - 1
         and all(_list(m, str, n_max=8) and all(0 < len(x) <= 64 for x in m) for m in ph["markers"])
         and type(ph["fallback_fraction"]) is float and 0 < ph["fallback_fraction"] < 1),
        ("codebooks", set(cb) == {"bits", "phase_gain"} and _list(cb["bits"], int, 1, 8, 8)
         and cb["bits"] == sorted(set(cb["bits"])) and type(cb["phase_gain"]) is float and 0 <= cb["phase_gain"] < 1),
        ("allocation", set(al) == {"avg_bits", "bit_options"} and _list(al["avg_bits"], float, 1.0, 8.0, 32)
         and _list(al["bit_options"], int, 1, 8, 8) and al["bit_options"] == sorted(set(al["bit_options"]))),
        ("head_budgets", set(hb) == {"ratio", "shrink", "unit"} and type(hb["ratio"]) is float and hb["ratio"] >= 1
         and type(hb["shrink"]) is float and 0 <= hb["shrink"] < 1 and hb["unit"] in ("head", "layer")),
        ("defaults", _defaults_ok(de, ("global", "layer"))),
        ("defaults_split", "defaults_split" not in meta or _defaults_ok(meta["defaults_split"], ("split",))),
    ]
    for name, ok in checks:
        if not ok:
            raise CalibrationError(f"{where}: meta field {name} is malformed (see artifacts/README.md)")
    return meta


def _defaults_ok(de: dict, budgets: tuple) -> bool:
    kinds = {**DEFAULT_KEYS, **OPTIONAL_DEFAULT_KEYS}
    return set(DEFAULT_KEYS) <= set(de) <= set(kinds) and all(type(v) is kinds[k] for k, v in de.items()) \
        and de["budget"] in budgets and 0 < de.get("head_power", 1.0) <= 1


def dataset_specs(meta: dict) -> dict[str, tuple[np.dtype, tuple]]:
    """Every dataset a calibration file with this (validated) meta holds, exactly."""
    L, H = meta["num_layers"], meta["num_kv_heads"]
    P, S = len(meta["phases"]["names"]), len(meta["phases"]["names"]) + 1
    bits, n_avg = meta["codebooks"]["bits"], len(meta["allocation"]["avg_bits"])
    f4, u1 = np.dtype("<f4"), np.dtype("u1")
    specs = {"rho": (f4, (2, 2, S, L, H)), "phase_codebook_used": (u1, (P, L, 2, len(bits))),
             "codebook_mse": (f4, (L, 2, len(bits), len(CODEBOOK_KINDS))), "bits_document": (u1, (n_avg, L, 2)),
             "bits_phases": (u1, (n_avg, L, P, 2)), "head_weights": (f4, (L, H)), "head_d_ckl": (f4, (L, H)),
             "head_d_ret": (f4, (L, H)), IDENTITY_DATASET: (np.dtype("<u2"), (meta["model_weights"]["tensors"], 8))}
    for t in TENSORS:
        for b in bits:
            specs[f"codebook_{t}_b{b}"] = (f4, (L, 2 ** b))
            specs[f"phase_codebook_{t}_b{b}"] = (f4, (P, L, 2 ** b))
    return specs


def check_values(meta: dict, arrays: dict[str, np.ndarray], where: str) -> None:
    """Content rules of every dataset (CalibrationError)."""
    def bad(msg):
        raise CalibrationError(f"{where}: {msg}")

    for name, arr in arrays.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad(f"{name} holds non-finite values")
    if np.abs(arrays["rho"]).max(initial=0) > 1 + 1e-5:
        bad("rho holds a cosine outside [-1, 1]")
    for name, arr in arrays.items():
        if name.startswith(tuple(f"{x}codebook_{t}_b" for x in ("", "phase_") for t in TENSORS)) and (
                (np.diff(arr, axis=-1) <= 0).any() or np.abs(arr).max() > 1):
            bad(f"{name} is not ascending codebooks in [-1, 1]")
    if (arrays["phase_codebook_used"] > 1).any():
        bad("phase_codebook_used must hold 0 or 1")
    if (arrays["codebook_mse"] < 0).any():
        bad("codebook_mse holds a negative error")
    options = np.asarray(meta["allocation"]["bit_options"])
    for name in ("bits_document", "bits_phases"):
        if not np.isin(arrays[name], options).all():
            bad(f"{name} holds bit widths outside bit_options {options.tolist()}")
    if (arrays["head_weights"] <= 0).any():
        bad("head_weights must be positive")


def write_calibration(path: str | Path, meta: dict, arrays: dict[str, np.ndarray]) -> Path:
    """Write a calibration file atomically after validating it as a reader would. `meta["model_weights"]` is
    `models.weights_identity(model)` (its `kept` samples become the model_weights_kept dataset)."""
    ident = dict(meta["model_weights"])
    datasets = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    datasets[IDENTITY_DATASET] = np.asarray(ident.pop("kept"), dtype="<u2")
    fields = schema.parse_json(schema.canonical_json({**meta, "model_weights": ident}))  # plain JSON types
    where = "refusing to write a calibration file"
    checked = validate_meta(fields, where)
    specs = dataset_specs(checked)
    if set(specs) != set(datasets):
        raise ValueError(f"calibration datasets {sorted(set(datasets) ^ set(specs))} disagree with the schema")
    for name, (dtype, shape) in specs.items():
        datasets[name] = datasets[name].astype(dtype, casting="same_kind" if dtype.kind == "f" else "unsafe")
        if datasets[name].shape != shape:
            raise ValueError(f"calibration dataset {name} has shape {datasets[name].shape}, expected {shape}")
    check_values(checked, datasets, where)
    attrs = {"format": FORMAT, "format_version": VERSION, "meta": schema.canonical_json(fields),
             "digest_sha256": schema.container_digest(FORMAT, VERSION, fields, datasets)}
    return write_h5(Path(path), attrs, datasets)


def read_calibration(path: str | Path, verify: bool = True) -> Calibration:
    """Read and validate a calibration file: fields, then dataset storage/dtypes/shapes (h5safe), the digest,
    then every value. Any problem is one CalibrationError line."""
    path = Path(path)
    where = str(path)

    def read(f, size):
        head = h5safe.read_attrs(f, where, only=("format", "format_version"))
        if head.get("format") != FORMAT:
            raise CalibrationError(f"{where} is not a compactor calibration file (format "
                                   f"{head.get('format')!r:.60})")
        if head.get("format_version") != VERSION:
            raise CalibrationError(f"{where} has calibration format version {head.get('format_version')!r:.20}; "
                                   f"this compactor reads version {VERSION}")
        raw = h5safe.read_attrs(f, where)
        fields = schema.parse_meta(raw, where)
        meta = validate_meta(fields, where)
        found = h5safe.members(f, where)
        specs = dataset_specs(meta)
        if set(found) != set(specs) or any(kind != "dataset" for kind in found.values()):
            extra, missing = sorted(set(found) - set(specs))[:5], sorted(set(specs) - set(found))[:5]
            raise CalibrationError(f"{where}: datasets do not match the meta (unexpected: {extra}, missing: {missing})")
        for name, (dtype, shape) in specs.items():
            h5safe.check_dataset(f[name], f"{where}:{name}", dtype, shape, size)
        data = {name: h5safe.read_dataset(f[name], f"{where}:{name}") for name in sorted(specs)}
        if verify and schema.container_digest(FORMAT, VERSION, fields, data) != raw["digest_sha256"]:
            raise CalibrationError(f"{where} is corrupted or was altered: its digest does not match")
        check_values(meta, data, where)
        meta["model_weights"]["kept"] = data.pop(IDENTITY_DATASET)
        meta.update({"digest_sha256": raw["digest_sha256"], "path": where})
        return Calibration(meta, data)

    try:
        return guard(path, read)
    except CalibrationError:
        raise
    except ArtifactError as e:  # container-level refusals (not found, not HDF5, bad storage): say what the file is
        raise CalibrationError(f"calibration file: {e}") from None


def check_calibration_model(cal: Calibration, lm) -> None:
    """Refuse a calibration made for another model (layout, config, weights or tokenizer): one line."""
    from ..models import config_fingerprint, tokenizer_fingerprint, weights_mismatch

    m = cal.meta
    cfg = lm.model.config
    ours = (int(cfg.num_hidden_layers), int(cfg.num_key_value_heads), int(lm.model.model.layers[0].self_attn.head_dim))
    theirs = (m["num_layers"], m["num_kv_heads"], m["head_dim"])
    head = f"calibration {m['path']} was made for model {m['model_id']!r:.120}"
    if ours != theirs:
        raise CalibrationError(f"{head} ({theirs[0]} layers, {theirs[1]} KV heads, head dim {theirs[2]}), not this "
                               f"one ({ours[0]}, {ours[1]}, {ours[2]}); run make calibrate MODEL=... for it or pass "
                               "--no-calibration")
    why = None
    if m["model_config_sha256"] != config_fingerprint(cfg):
        why = "a different configuration"
    else:
        why = weights_mismatch(m["model_weights"], lm.model)
    if why is None and m["tokenizer_sha256"] != tokenizer_fingerprint(lm.tokenizer):
        why = "a different tokenizer"
    if why:
        raise CalibrationError(f"{head}, not this one ({why}); run make calibrate MODEL=... for it or pass "
                               "--no-calibration")


def default_path(model_name: str, folder: str | Path = "artifacts/calibration") -> Path:
    """Where `make calibrate MODEL=name` writes and `compress` looks: <folder>/<name's last path part>.h5."""
    return Path(folder) / f"{Path(str(model_name).rstrip('/')).name}.h5"
