"""The artifact's metadata: types, ranges and closed sets of every field, their canonical encoding, the digest.

Schema v2 (artifacts/README.md): the root holds four attributes, `format`, `format_version`, `meta` (one JSON
object holding every other field, typed: integers, floats and strings are distinct JSON types) and
`digest_sha256`, sha256 over the canonical JSON of the first three and over every dataset, so nothing that shapes
the cache can change unnoticed. One JSON attribute instead of ~30 HDF5 attributes saves ~4 KB per file (HDF5 moves
more than 8 attributes into a fractal heap). `validate_v2` / `validate_v1` check every field before a dataset is
opened.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from typing import NamedTuple

import numpy as np

from ..errors import ArtifactError
from .kv_codec import MAX_EXACT, MEAN_NP, STORED_NP, codec_from_label

FORMAT = "compactor-kv"
VERSION = 2
MAX_T = 2**31 - 1  # positions are int32; the loader bounds T by the model's context
DIGEST_PREFIX = b"compactor-kv/2\n"
POSITIONS = ("all", "bitmap", "delta8", "delta16", "delta32")
BETA = ("zero", "stored")
IDENTITY_GRIDS = ("bfloat16", "float16", "float32")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class Rule(NamedTuple):
    kind: str  # str | int | float | object (a JSON object) | json (v1: a string holding a JSON object)
    lo: float | None = None
    hi: float | None = None
    choices: tuple | None = None
    maxlen: int = 4096
    pattern: re.Pattern | None = None


def _s(maxlen=4096, choices=None, pattern=None):
    return Rule("str", choices=choices, maxlen=maxlen, pattern=pattern)


HEX = _s(64, pattern=_HEX64)
JSON = Rule("json", maxlen=1 << 20)
OBJECT = Rule("object")
ROOT_V2 = ("format", "format_version", "meta", "digest_sha256")  # the root attributes of a v2 file
V2_FIELDS = {
    "compactor_version": _s(64),
    "created": _s(64), "model_id": _s(4096), "model_type": _s(64, pattern=_NAME), "model_config_sha256": HEX,
    "model_weights": OBJECT, "tokenizer_sha256": HEX, "document_name": _s(1024), "document_sha256": HEX,
    "tokens_sha256": HEX, "T": Rule("int", 1, MAX_T), "ratio": Rule("float", 1, MAX_T),
    "method": _s(64, pattern=_NAME), "method_params": OBJECT, "budget_total": Rule("int", 0, 2**62),
    "num_layers": Rule("int", 1, 1024), "num_kv_heads": Rule("int", 1, 1024), "head_dim": Rule("int", 1, 4096),
    "layer_codecs": _s(16 * 1024), "kv_bits": _s(16 * 1024), "stored_dtype": _s(choices=tuple(STORED_NP)),
    "rotation_seed": Rule("int", 0, 2**32 - 1), "lloyd_exact": Rule("int", 0, MAX_EXACT),
    "lloyd_mean_dtype": _s(choices=tuple(MEAN_NP)), "beta": _s(choices=BETA), "positions": _s(choices=POSITIONS),
    "seconds": OBJECT,
}
# extra: caller metadata the schema does not interpret (still digested); chat: the document was wrapped as the first
# user turn of this chat template; phases: per-phase storage of a document with phases (names, bounds);
# calibration_sha256: digest of the calibration file compress used (informative).
V2_OPTIONAL = {"extra": OBJECT, "chat": OBJECT, "phases": OBJECT, "calibration_sha256": HEX}
MAX_PHASES = 16
_PHASE_NAME = re.compile(r"[a-z0-9_]{1,32}")


def _no_constants(name):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(text: str) -> object:
    return json.loads(text, parse_constant=_no_constants)


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def check_value(name: str, value, rule: Rule, where: str):
    """The attribute's value if it obeys `rule` (JSON attributes: parsed), else ArtifactError."""
    bad = f"{where}: {name}"
    if rule.kind == "object":
        if not isinstance(value, dict):
            raise ArtifactError(f"{bad} must be a JSON object, got {type(value).__name__}")
        return value
    if rule.kind == "int":
        if type(value) is not int:
            raise ArtifactError(f"{bad} must be an integer, got {type(value).__name__} {value!r:.40}")
        if not rule.lo <= value <= rule.hi:
            raise ArtifactError(f"{bad} = {value} is outside {rule.lo}..{rule.hi}")
        return value
    if rule.kind == "float":
        if type(value) is not float or not math.isfinite(value):
            raise ArtifactError(f"{bad} must be a finite float, got {type(value).__name__} {value!r:.40}")
        if not rule.lo <= value <= rule.hi:
            raise ArtifactError(f"{bad} = {value} is outside {rule.lo}..{rule.hi}")
        return value
    if type(value) is not str:
        raise ArtifactError(f"{bad} must be a string, got {type(value).__name__}")
    if len(value) > rule.maxlen:
        raise ArtifactError(f"{bad} is longer than {rule.maxlen} characters")
    if rule.kind == "json":
        try:
            parsed = parse_json(value)
        except ValueError as e:
            raise ArtifactError(f"{bad} is not valid JSON ({str(e).splitlines()[0]})") from None
        if not isinstance(parsed, dict):
            raise ArtifactError(f"{bad} must be a JSON object")
        return parsed
    if rule.choices is not None and value not in rule.choices:
        raise ArtifactError(f"{bad} = {value!r:.60} is not one of {', '.join(map(str, rule.choices))}")
    if rule.pattern is not None and not rule.pattern.fullmatch(value):
        raise ArtifactError(f"{bad} = {value!r:.60} is malformed")
    return value


def check_identity(ident: dict, where: str) -> dict:
    """The v2 model_weights object: {scheme, samples, tensors, classes, sha256: {grid: hex}}."""
    from ..models import IDENTITY_SCHEME

    keys = {"scheme", "samples", "tensors", "classes", "sha256"}
    ok = (set(ident) == keys and ident["scheme"] == IDENTITY_SCHEME
          and type(ident["samples"]) is int and 1 <= ident["samples"] <= 1 << 20
          and type(ident["tensors"]) is int and 1 <= ident["tensors"] <= 1 << 20
          and isinstance(ident["classes"], list) and set(ident["classes"]) <= set(IDENTITY_GRIDS)
          and isinstance(ident["sha256"], dict) and set(ident["sha256"]) == set(IDENTITY_GRIDS)
          and all(isinstance(v, str) and _HEX64.fullmatch(v) for v in ident["sha256"].values()))
    if not ok:
        raise ArtifactError(f"{where}: model_weights is not a valid weights identity "
                            f"(scheme {IDENTITY_SCHEME})")
    return ident


def parse_meta(raw: dict, where: str) -> dict:
    """The `meta` object of a v2 file's root attributes (exactly ROOT_V2; checked as in ROOT_RULES)."""
    if set(raw) != set(ROOT_V2):
        raise ArtifactError(f"{where}: root attributes {sorted(raw)[:8]} are not exactly {', '.join(ROOT_V2)}")
    check_value("digest_sha256", raw["digest_sha256"], HEX, where)
    meta = check_value("meta", raw["meta"], JSON, where)
    return meta


def check_field_set(meta: dict, required: dict, optional: dict, where: str, error=ArtifactError) -> None:
    """Refuse (with `error`) meta fields outside required + optional, and missing required ones."""
    unknown = sorted(set(meta) - set(required) - set(optional))
    if unknown:
        raise error(f"{where}: unknown meta fields {', '.join(unknown)[:200]}")
    missing = [k for k in required if k not in meta]
    if missing:
        raise error(f"{where} lacks required meta fields: {', '.join(missing)}")


def validate_v2(meta: dict, where: str) -> dict:
    """Typed, range-checked fields of a v2 file's meta (a new dict; layer_codecs parsed into `codecs`)."""
    check_field_set(meta, V2_FIELDS, V2_OPTIONAL, where)
    meta = {k: check_value(k, v, {**V2_FIELDS, **V2_OPTIONAL}[k], where) for k, v in meta.items()}
    check_identity(meta["model_weights"], where)
    if "chat" in meta:
        check_chat(meta["chat"], where)
    if not all(type(v) in (int, float) for v in meta["seconds"].values()):
        raise ArtifactError(f"{where}: seconds must map names to numbers")
    T, L = meta["T"], meta["num_layers"]
    if meta["ratio"] > T:
        raise ArtifactError(f"{where}: ratio {meta['ratio']} is larger than T={T}")
    P = _check_phases(meta, where)
    labels = meta["layer_codecs"].split(",")
    if len(labels) != L:
        raise ArtifactError(f"{where}: layer_codecs names {len(labels)} layers, num_layers is {L}")
    try:
        meta["codecs"] = [[codec_from_label(x, meta["lloyd_exact"]) for x in label.split("/")] for label in labels]
    except ValueError as e:
        raise ArtifactError(f"{where}: {e}") from None
    if any(len(units) != P for units in meta["codecs"]):
        raise ArtifactError(f"{where}: every layer_codecs entry must name {P} phase codec(s) joined by '/'")
    unit_labels = {c.label for units in meta["codecs"] for c in units}
    if meta["kv_bits"] != ",".join(sorted(unit_labels)):
        raise ArtifactError(f"{where}: kv_bits {meta['kv_bits']!r:.80} disagrees with layer_codecs")
    d = meta["head_dim"]
    book_bits: dict[str, int] = {}
    for c in (c for units in meta["codecs"] for c in units):
        for part in (c.keys, c.values):
            if part.name in ("q8_0", "q4_0") and d % 32 or part.name == "lloyd" and d < 4:
                raise ArtifactError(f"{where}: codec {part.name} cannot store head_dim {d}")
            if part.codebook is not None and book_bits.setdefault(part.codebook, part.bits) != part.bits:
                raise ArtifactError(f"{where}: codebook {part.codebook!r} is used with two bit widths")
    if meta["budget_total"] > L * meta["num_kv_heads"] * math.ceil(T / meta["ratio"]):
        raise ArtifactError(f"{where}: budget_total {meta['budget_total']} exceeds ceil(T/ratio) per head")
    return meta


def _check_phases(meta: dict, where: str) -> int:
    """Number of phases P (1 without the `phases` field); `phases` = {"names": P distinct names, "bounds": P+1
    non-decreasing ints from 0 to T}."""
    phases = meta.get("phases")
    if phases is None:
        return 1
    names, bounds = phases.get("names"), phases.get("bounds")
    ok = (set(phases) == {"names", "bounds"} and isinstance(names, list) and 1 <= len(names) <= MAX_PHASES
          and all(isinstance(n, str) and _PHASE_NAME.fullmatch(n) for n in names) and len(set(names)) == len(names)
          and isinstance(bounds, list) and len(bounds) == len(names) + 1 and all(type(b) is int for b in bounds)
          and bounds[0] == 0 and bounds[-1] == meta["T"] and all(a <= b for a, b in zip(bounds, bounds[1:])))
    if not ok:
        raise ArtifactError(f"{where}: phases must be {{names: 1..{MAX_PHASES} distinct [a-z0-9_] names, bounds: "
                            "one more non-decreasing integer from 0 to T}")
    return len(names)


def check_chat(chat: dict, where: str) -> None:
    """The optional chat object: {template_sha256: hex digest of the chat template, separator: str}."""
    if set(chat) != {"template_sha256", "separator"}:
        raise ArtifactError(f"{where}: chat must hold exactly template_sha256 and separator")
    check_value("chat.template_sha256", chat["template_sha256"], HEX, where)
    check_value("chat.separator", chat["separator"], _s(64), where)


def root_attrs(meta: dict) -> dict:
    """The v2 root attributes (without the digest) for a meta object: its canonical JSON text."""
    return {"format": FORMAT, "format_version": VERSION, "meta": canonical_json(meta)}


def digest_v2(meta: dict, datasets: dict[str, np.ndarray]) -> str:
    """sha256 of DIGEST_PREFIX, the canonical JSON of {"format", "format_version", "meta": the meta object}, a
    newline, then per dataset in name order `name|dtype|shape|` (dtype as numpy's str, e.g. <f4; shape as
    comma-separated ints) and its bytes in C order."""
    return container_digest(FORMAT, VERSION, meta, datasets)


def container_digest(fmt: str, version: int, meta: dict, datasets: dict[str, np.ndarray]) -> str:
    """The digest of any compactor .h5 container (caches: compactor-kv/2; calibration files: compactor-calibration/1):
    sha256 of `<format>/<version>\n`, the canonical JSON of {format, format_version, meta}, a newline, then each
    dataset in name order as `name|dtype|shape|` and its bytes in C order."""
    h = hashlib.sha256(f"{fmt}/{version}\n".encode())
    h.update(canonical_json({"format": fmt, "format_version": version, "meta": meta}).encode())
    h.update(b"\n")
    for name in sorted(datasets):
        arr = datasets[name]
        h.update(f"{name}|{arr.dtype.str}|{','.join(map(str, arr.shape))}|".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


# ---- schema v1 (read only) ----------------------------------------------------------------------------------------
V1_REQUIRED = ("format", "format_version", "compactor_version", "created", "model_id", "model_config_sha256",
               "tokenizer_sha256", "document_sha256", "T", "ratio", "method", "method_params", "num_layers",
               "num_kv_heads", "head_dim", "payload_sha256", "model_weights_signature")
V1_ATTRS = {
    "format": _s(choices=(FORMAT,)), "format_version": Rule("int", 1, 1), "compactor_version": _s(64),
    "created": _s(64), "model_id": _s(4096), "model_type": _s(64, pattern=_NAME), "model_config_sha256": HEX,
    "tokenizer_sha256": HEX, "document_name": _s(1024), "document_sha256": HEX, "tokens_sha256": HEX,
    "T": Rule("int", 1, MAX_T), "ratio": Rule("float", 1, MAX_T), "method": _s(64, pattern=_NAME),
    "method_params": JSON, "budget_total": Rule("int", 0, 2**62), "num_layers": Rule("int", 1, 1024),
    "num_kv_heads": Rule("int", 1, 1024), "head_dim": Rule("int", 1, 4096), "kv_bits": _s(16 * 1024),
    "seconds": JSON, "payload_sha256": HEX, "json_attributes": _s(4096),
}


def validate_v1(raw: dict, where: str) -> dict:
    unknown = sorted(set(raw) - set(V1_ATTRS) - {"model_weights_signature"})
    if unknown:
        raise ArtifactError(f"{where}: unknown attributes {', '.join(unknown)[:200]}")
    missing = [k for k in V1_REQUIRED if k not in raw]
    if missing:
        raise ArtifactError(f"{where} lacks required attributes: {', '.join(missing)}")
    meta = {k: check_value(k, v, V1_ATTRS[k], where) for k, v in raw.items() if k in V1_ATTRS}
    sig = raw["model_weights_signature"]
    if not (isinstance(sig, np.ndarray) and sig.ndim == 1 and sig.dtype.kind == "f" and 0 < sig.size <= 1 << 20
            and np.isfinite(sig).all()):
        raise ArtifactError(f"{where}: attribute model_weights_signature must be a finite float array")
    meta["model_weights_signature"] = sig.astype(np.float64)
    if meta["ratio"] > meta["T"]:
        raise ArtifactError(f"{where}: ratio {meta['ratio']} is larger than T={meta['T']}")
    return meta
