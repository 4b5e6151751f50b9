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
from .fitting.budgets import MODES, global_budgets, layer_budgets, per_head_budget, split_budgets, uniform_budgets
from .capture.documents import Document
from .errors import CompactorError
from .fitting.key_scores import all_scores
from .fitting.key_selection import key_stats
from .storage.kv_codec import RAW, KVCodec, check_codec, encode_layer, parse_kv_bits, roundtrip_tensor
from .layer_kv import LayerKV
from .methods import Method
from .models import LoadedModel, config_fingerprint, tokenizer_fingerprint, weights_signature
from .capture.on_policy import OnPolicyQueries
from .capture.prefill import Capture, check_length, prefill_and_capture, source_shares


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
    layer_bits: dict | None = None  # per-layer overrides {layer index: "K4V3"} (e.g. from a calibration file)
    preset: str = "fast"           # the preset these options came from (recorded; see PRESETS)
    sources: dict | None = None    # reference-query shares {context, repeat, self_study, random}; None: repeat_fraction
    self_study: int = 4            # question/answer texts the model writes when sources has self_study
    on_policy: int = 0             # > 1: refit layer groups on queries recaptured through compacted earlier layers
    probe: str | None = None       # reconstruction probe: none | attention | gradient; None: what the score needs
    split_share: float = 0.5       # budget "split": share of the total allocated by RMS with layer budgets


# Presets set defaults that explicit options override. "fast" is the spine's path; "quality" is the best
# combination of benchmarks/results_quality.md (issue 9).
PRESETS = {
    "fast": {"options": {"budget": "layer", "budget_floor": 0.75}, "method": {"score": "rms"}},
    "quality": {"options": {"budget": "split", "budget_floor": 0.75, "split_share": 0.25},
                "method": {"score": "kvgrad", "value_fit": "check", "beta_ridge": 0.01}},
}


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


def probe_for(method: Method, requested: str | None = None) -> str:
    """The reconstruction probe a capture needs for this method's key score (or the one requested)."""
    if requested is not None:
        return requested
    from .fitting.key_scores import needs_probe

    score = getattr(method, "score", None)
    if score is None:
        return "none"
    recon, grad = needs_probe(score)
    return "gradient" if grad else ("attention" if recon else "none")


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
                    budget_floor: float = 0.75, progress: bool = True, codecs: list[KVCodec] | None = None,
                    stored_dtype: str = "bfloat16", seed: int = 0, on_policy=None,
                    score_weights: torch.Tensor | None = None, split_share: float = 0.5
                    ) -> tuple[list[LayerKV], torch.Tensor]:
    """Compact every (layer, KV head) of a capture. Returns the layers and the (L, H) budgets used.
    Methods that do not score keys (StreamingLLM, random) are defined per head and always get uniform budgets.
    With `codecs` (one per layer), methods that fit (AM) see the keys as they will be stored and loaded.
    With `on_policy` (capture/on_policy.OnPolicyQueries), each group of layers after the first is fitted on repeat
    queries recaptured with the layers before it already compacted (budgets and key scores stay those of `capture`).
    `score_weights` (L, H) multiplies each head's key scores before the budgets are shared (e.g. from
    evaluation/sensitivity.sensitivity_weights); it does not change which keys a head keeps for a given count.
    budget "split": `split_share` of the total by RMS attention with layer budgets, the rest by the method's score
    with one global budget; each head keeps the union (fitting/budgets.split_budgets)."""
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
    scores = None
    if method.uses_scores or budget != "uniform":
        scores = all_scores(getattr(method, "score", "rms"), stats, capture.probe, H)
        if score_weights is not None:
            scores = scores * score_weights.to(scores)[..., None]
    if budget == "split":
        rms_scores = torch.stack([s.p_rms for s in stats]).float().cpu()
        budgets, scores = split_budgets(rms_scores, scores, ratio, split_share, budget_floor)
    elif budget in ("global", "layer"):
        budgets = (global_budgets if budget == "global" else layer_budgets)(scores, ratio, budget_floor)
    else:
        budgets = uniform_budgets(L, H, T, ratio)
    copy = None if capture.probe is None else all_scores("kvzip", None, capture.probe, H)
    device = capture.keys[0].device
    layers = []
    fit_capture = capture
    if on_policy is not None:
        fit_capture = on_policy.capture
        stats = fit_capture.attention_stats(context)
    for l in tqdm(range(L), desc=f"compact {method.name}", unit="layer", disable=not progress):
        if on_policy is not None and l in on_policy.starts:
            on_policy.refresh(layers, on_policy.group_of(l))
        if stats is not None and stats[l] is None:
            pos = fit_capture.query_pos if context == "causal" else None
            stats[l] = key_stats(fit_capture.keys[l], fit_capture.values[l], fit_capture.queries[l],
                                 fit_capture.scale, pos)
        heads = []
        key_codec = (codecs[l] if codecs else RAW).keys
        key_transform = lambda k, imp, c=key_codec: roundtrip_tensor(k, c, stored_dtype, seed, imp)  # noqa: E731
        for h in range(H):
            head_stats = None if stats is None else type(stats[l])(*(x[h] for x in stats[l]))
            heads.append(method.compact(capture.keys[l][h], capture.values[l][h], fit_capture.queries[l][h],
                                        int(budgets[l, h]), query_pos=capture.query_pos.to(device),
                                        query_source=capture.query_source, scale=capture.scale, stats=head_stats,
                                        head_id=l * H + h, key_transform=key_transform,
                                        scores=None if scores is None else scores[l, h].to(device),
                                        copy_scores=None if copy is None else copy[l, h].to(device)))
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
        "model_weights_signature": weights_signature(lm.model).tolist(),
        "tokenizer_sha256": tokenizer_fingerprint(lm.tokenizer),
        "document_name": doc.name, "document_sha256": doc.sha256,
        "tokens_sha256": hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest(),
        "T": int(ids.numel()), "ratio": float(opts.ratio), "method": method.name,
        "method_params": {**method.params(), "preset": opts.preset, "budget": opts.budget,
                          "budget_floor": opts.budget_floor, "probe": probe_for(method, opts.probe),
                          "query_sources": source_shares(opts.sources, opts.repeat_fraction),
                          "self_study": opts.self_study if (opts.sources or {}).get("self_study") else 0,
                          "on_policy_groups": opts.on_policy if opts.on_policy > 1 else 0,
                          "split_share": opts.split_share if opts.budget == "split" else None,
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


def compress(lm: LoadedModel, doc: Document, method: Method, out_path: str | Path, opts: CompressOptions,
             progress: bool = True, ids: torch.Tensor | None = None
             ) -> tuple[Path, list[LayerKV], Capture, torch.Tensor]:
    """Prefill, capture, compact and write one document. Returns (path, layers, capture, token ids)."""
    ids = prepare(lm, doc, opts) if ids is None else ids
    t0 = time.perf_counter()
    capture = prefill_and_capture(lm.model, lm.tokenizer, ids, chunk_size=opts.chunk_size,
                                  max_queries=opts.max_queries, repeat_fraction=opts.repeat_fraction,
                                  seed=opts.seed, progress=progress, probe=probe_for(method, opts.probe),
                                  sources=opts.sources, self_study=opts.self_study)
    t1 = time.perf_counter()
    codecs = codec_plan(len(capture.keys), opts)
    on_policy = OnPolicyQueries(lm.model, capture, opts.on_policy, opts.chunk_size) \
        if opts.on_policy > 1 and method.name == "am" else None
    layers, budgets = compact_capture(capture, method, opts.ratio, opts.budget, opts.budget_floor, progress,
                                      codecs, opts.stored_dtype, opts.seed, on_policy=on_policy,
                                      split_share=opts.split_share)
    t2 = time.perf_counter()
    meta = artifact_meta(lm, doc, ids, method, opts, budgets,
                         {"prefill": round(t1 - t0, 3), "compact": round(t2 - t1, 3)})
    books: dict = {}
    stored = [StoredLayer(*encode_layer(layer, codec, opts.stored_dtype, opts.seed, books))
              for layer, codec in zip(layers, codecs)]
    meta["kv_bits"] = ",".join(sorted({c.label for c in codecs}))
    path = write_artifact(out_path, meta, stored, books)
    return path, layers, capture, ids
