"""From a captured prefill to compacted layers, and from a document to a written artifact."""
from __future__ import annotations

import datetime
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .storage.artifact import StoredLayer, write_artifact
from .fitting.budgets import MODES, global_budgets, layer_budgets, per_head_budget, uniform_budgets
from .capture.documents import Document
from .errors import CompactorError
from .fitting.key_selection import score_of
from .storage.kv_codec import (RAW, KVCodec, PhasedCodec, check_codec, encode_layer, estimate_entry_bytes,
                               parse_kv_bits, roundtrip_keys)
from .layer_kv import LayerKV
from .methods import Method
from .models import LoadedModel, config_fingerprint, tokenizer_fingerprint, weights_identity
from .capture.phases import Phases, find_phases
from .capture.prefill import Capture, check_length, prefill_and_capture
from .storage.calibrated_plan import Plan, calibrated_plan


@dataclass
class CompressOptions:
    ratio: float = 10.0
    budget: str = "layer"          # uniform | global | layer (see budgets.py)
    budget_floor: float = 0.75     # global/layer: fraction of the uniform budget every head keeps at least
    chunk_size: int = 512
    max_queries: int = 4096        # reference queries per KV head (pooled over its query group)
    repeat_fraction: float = 0.5   # share of those queries taken from the repeat pass
    seed: int = 0
    max_tokens: int | None = None  # compress only the first max_tokens tokens of the document
    stored_dtype: str = "bfloat16"  # of unquantized keys/values
    kv_bits: str = "16"            # e.g. K4V3 (lloyd), q4_0, q8_0; "16" = unquantized
    hi_layers: tuple = ()          # layer indices (negative from the end) stored at hi_bits instead
    hi_bits: str = "K8V8"
    layer_bits: dict | None = None  # per-layer overrides {layer index: "K4V3"} (library use)
    calibration: object = None     # a storage.calibration_file.Calibration for this model, or None


def codec_plan(n_layers: int, opts: CompressOptions) -> list[KVCodec]:
    """The KVCodec of every layer: kv_bits, hi_bits on hi_layers, then per-layer overrides."""
    plan = [parse_kv_bits(opts.kv_bits)] * n_layers
    for i in opts.hi_layers:
        if not -n_layers <= int(i) < n_layers:
            raise ValueError(f"--hi-layers: layer {i} does not exist (the model has {n_layers})")
        plan[int(i) % n_layers] = parse_kv_bits(opts.hi_bits)
    for i, text in (opts.layer_bits or {}).items():
        if not -n_layers <= int(i) < n_layers:
            raise ValueError(f"per-layer bits: layer {i} does not exist (the model has {n_layers})")
        plan[int(i) % n_layers] = parse_kv_bits(text)
    return plan


def _pad(items: list[torch.Tensor], length: int, fill) -> torch.Tensor:
    out = []
    for x in items:
        pad = length - x.shape[0]
        if pad:
            x = torch.cat([x, torch.full((pad, *x.shape[1:]), fill, dtype=x.dtype, device=x.device)])
        out.append(x)
    return torch.stack(out)


def compact_capture(capture: Capture, method: Method, ratio: float, budget: str = "layer",
                    budget_floor: float = 0.75, progress: bool = True,
                    codecs: list[KVCodec | PhasedCodec] | None = None, stored_dtype: str = "bfloat16", seed: int = 0,
                    score_weights: torch.Tensor | None = None, codebooks: dict | None = None
                    ) -> tuple[list[LayerKV], torch.Tensor]:
    """Compact every (layer, KV head) of a capture. Returns the layers and the (L, H) budgets used.
    Methods that do not score keys (StreamingLLM, random) are defined per head and always get uniform budgets.
    With `codecs` (one per layer; a PhasedCodec stores each phase with its own codec), methods that fit (AM) see the
    keys as they will be stored and loaded (custom codebooks the codecs name come from `codebooks`).
    `score_weights` (L, H) multiplies each head's key scores before the budgets are shared (e.g. per-head weights
    from calibration); it does not change which keys a head keeps for a given count."""
    if budget not in MODES:
        raise ValueError(f"budget must be one of {', '.join(MODES)}")
    if not method.uses_scores:
        budget = "uniform"
    L, (H, T, _) = len(capture.keys), capture.keys[0].shape
    per_head_budget(T, ratio)  # validates the ratio
    context = getattr(method, "context", "full")
    quantized = codecs is not None and any(not c.is_raw for c in codecs)
    # scores rank the keys (scored methods), share the budget, and tell the codecs which entries matter most
    stats = capture.attention_stats(context, progress) if method.uses_scores or budget != "uniform" or quantized \
        else None
    if budget in ("global", "layer"):
        scores = torch.stack([score_of(s, getattr(method, "score", "rms")) for s in stats]).cpu()
        if score_weights is not None:
            scores = scores * score_weights.to(scores)[..., None]
        budgets = (global_budgets if budget == "global" else layer_budgets)(scores, ratio, budget_floor)
    else:
        budgets = uniform_budgets(L, H, T, ratio)
    layers = []
    for l in tqdm(range(L), desc=f"compact {method.name}", unit="layer", disable=not progress):
        heads = []
        key_transform = lambda k, imp, pos, c=(codecs[l] if codecs else RAW): roundtrip_keys(  # noqa: E731
            k, c, pos, imp, stored_dtype, seed, codebooks)
        for h in range(H):
            head_stats = None if stats is None else type(stats[l])(*(x[h] for x in stats[l]))
            heads.append(method.compact(capture.keys[l][h], capture.values[l][h], capture.queries[l][h],
                                        int(budgets[l, h]), query_pos=capture.query_pos.to(capture.keys[l].device),
                                        scale=capture.scale, stats=head_stats, head_id=l * H + h,
                                        key_transform=key_transform))
        t_max = max(c.keys.shape[0] for c in heads)
        layers.append(LayerKV(
            keys=_pad([c.keys for c in heads], t_max, 0), values=_pad([c.values for c in heads], t_max, 0),
            beta=_pad([c.beta.float() for c in heads], t_max, 0.0),
            positions=_pad([c.positions.long() for c in heads], t_max, -1),
            lengths=torch.tensor([c.keys.shape[0] for c in heads], dtype=torch.int64),
            importance=None if stats is None else _pad([stats[l].p_rms[h][c.positions.to(stats[l].p_rms.device)]
                                                        .cpu() for h, c in enumerate(heads)], t_max, 0.0)))
    return layers, budgets


def tokenize_document(lm: LoadedModel, doc: Document, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids (T,) of the document (special tokens as the tokenizer adds them at a sequence start)."""
    ids = lm.tokenizer(doc.text, return_tensors="pt").input_ids[0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    check_length(lm.model, ids.numel(), f"document {doc.name!r}")
    return ids


def artifact_meta(lm: LoadedModel, doc: Document, ids: torch.Tensor, method: Method, opts: CompressOptions,
                  budgets: torch.Tensor, seconds: dict) -> dict:
    cfg = lm.config
    return {
        "compactor_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model_id": lm.model_id, "model_type": cfg.model_type,
        "model_config_sha256": config_fingerprint(cfg),
        "model_weights": weights_identity(lm.model),
        "tokenizer_sha256": tokenizer_fingerprint(lm.tokenizer),
        "document_name": doc.name, "document_sha256": doc.sha256,
        "tokens_sha256": hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest(),
        "T": int(ids.numel()), "ratio": float(opts.ratio), "method": method.name,
        "method_params": {**method.params(), "budget": opts.budget, "budget_floor": opts.budget_floor,
                          "max_queries": opts.max_queries, "repeat_fraction": opts.repeat_fraction,
                          "chunk_size": opts.chunk_size, "seed": opts.seed, "stored_dtype": opts.stored_dtype,
                          "hi_layers": list(opts.hi_layers), "hi_bits": opts.hi_bits},
        "budget_total": int(budgets.sum()),
        "num_kv_heads": int(cfg.num_key_value_heads),
        "head_dim": int(lm.model.model.layers[0].self_attn.head_dim),
        "seconds": seconds,
    }


def prepare(lm: LoadedModel, doc: Document, opts: CompressOptions) -> torch.Tensor:
    """Token ids of a document, checked against the model's context and the ratio (fails before any work)."""
    if not 0 <= opts.seed < 2**32:
        raise CompactorError(f"seed must be in 0..2^32-1 (got {opts.seed})")
    ids = tokenize_document(lm, doc, opts.max_tokens)
    try:
        per_head_budget(ids.numel(), opts.ratio)
    except ValueError as e:
        raise CompactorError(f"document {doc.name!r}: {e}") from None
    try:
        for codec in codec_plan(lm.config.num_hidden_layers, opts):
            check_codec(codec, lm.model.model.layers[0].self_attn.head_dim)
    except ValueError as e:
        raise CompactorError(str(e)) from None
    return ids


def estimate_artifact_bytes(lm: LoadedModel, n_tokens: int, opts: CompressOptions) -> int:
    """About how many bytes the artifact of an n_tokens document will take (for the free-space check)."""
    cfg = lm.config
    d = lm.model.model.layers[0].self_attn.head_dim
    per_head = per_head_budget(n_tokens, opts.ratio)
    entries = per_head * int(cfg.num_key_value_heads)
    total = sum(entries * estimate_entry_bytes(c, d, opts.stored_dtype) + 4 * int(cfg.num_key_value_heads) * d * 4
                for c in codec_plan(cfg.num_hidden_layers, opts))
    if opts.calibration is not None:  # calibrated bits average the same, but a layer may take up to twice
        total *= 2
    return int(total) + (64 << 10)


def document_phases(lm: LoadedModel, doc: Document, T: int, cal) -> Phases | None:
    """The document's phases (prompt, think, answer) from the calibration's markers, when they are all there."""
    if cal is None:
        return None
    ph = cal.meta["phases"]
    markers = tuple(tuple(m) for m in ph["markers"])
    phases = find_phases(doc.text, lm.tokenizer, markers, ph["fallback_fraction"], tuple(ph["names"]))
    return phases.clipped(T) if phases.by_markers else None


def compress(lm: LoadedModel, doc: Document, method: Method, out_path: str | Path, opts: CompressOptions,
             progress: bool = True, ids: torch.Tensor | None = None
             ) -> tuple[Path, list[LayerKV], Capture, torch.Tensor]:
    """Prefill, capture, compact and write one document. Returns (path, layers, capture, token ids).
    With `opts.calibration`, the codecs, codebooks and head weights follow it (storage/calibrated_plan.py)."""
    ids = prepare(lm, doc, opts) if ids is None else ids
    t0 = time.perf_counter()
    capture = prefill_and_capture(lm.model, lm.tokenizer, ids, chunk_size=opts.chunk_size,
                                  max_queries=opts.max_queries, repeat_fraction=opts.repeat_fraction,
                                  seed=opts.seed, progress=progress)
    t1 = time.perf_counter()
    plan = plan_for(lm, doc, ids.numel(), opts)
    layers, budgets = compact_capture(capture, method, opts.ratio, opts.budget, opts.budget_floor, progress,
                                      plan.codecs, opts.stored_dtype, opts.seed, plan.score_weights, plan.codebooks)
    t2 = time.perf_counter()
    meta = artifact_meta(lm, doc, ids, method, opts, budgets,
                         {"prefill": round(t1 - t0, 3), "compact": round(t2 - t1, 3)})
    if opts.calibration is not None:
        meta["calibration_sha256"] = opts.calibration.digest
        meta["method_params"]["calibration"] = plan.applied
    books: dict = dict(plan.codebooks)
    stored = [StoredLayer(*encode_layer(layer, codec, opts.stored_dtype, opts.seed, books))
              for layer, codec in zip(layers, plan.codecs)]
    path = write_artifact(out_path, meta, stored, books)
    return path, layers, capture, ids


def plan_for(lm: LoadedModel, doc: Document, T: int, opts: CompressOptions) -> Plan:
    """The codecs (per layer or per phase), codebooks and head weights for one document (calibrated_plan)."""
    head_dim = lm.model.model.layers[0].self_attn.head_dim
    base = codec_plan(lm.config.num_hidden_layers, opts)
    return calibrated_plan(base, opts.calibration, document_phases(lm, doc, T, opts.calibration), opts.hi_layers,
                           head_dim)
