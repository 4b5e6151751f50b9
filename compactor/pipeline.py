"""From a captured prefill to compacted layers, and from a document to a written artifact."""
from __future__ import annotations

import datetime
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .storage.artifact import Artifact, StoredLayer, write_artifact
from .fitting.budgets import (MODES, global_budgets, layer_budgets, per_head_budget, pyramid_budgets, split_budgets,
                              uniform_budgets)
from .capture import chat
from .capture.documents import Document
from .errors import CompactorError
from .fitting.key_scores import all_scores
from .fitting.key_selection import key_stats
from .storage.kv_codec import (RAW, STORED_DTYPES, KVCodec, PhasedCodec, TensorCodec, check_codec, encode_layer,
                               estimate_entry_bytes, parse_kv_bits, roundtrip_keys, roundtrip_tensor)
from .layer_kv import LayerKV
from .methods import Method
from .methods.batched import split_heads
from .models import LoadedModel, config_fingerprint, tokenizer_fingerprint, weights_identity
from .capture.on_policy import OnPolicyQueries
from .capture.phases import Phases, find_phases
from .capture.prefill import Capture, check_length, prefill_and_capture, source_shares
from .fitting.presets import DEFAULT_PRESET, PRESETS, preset  # noqa: F401  (re-exported)
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
    chat: bool = False             # wrap the document as the opening of the first user turn (capture/chat.py)
    preset: str = "fast"           # the preset these options came from (recorded; see PRESETS)
    sources: dict | None = None    # reference-query shares {context, repeat, self_study, random}; None: repeat_fraction
    self_study: int = 4            # question/answer texts the model writes when sources has self_study
    on_policy: int = 0             # > 1: refit layer groups on queries recaptured through compacted earlier layers
    probe: str | None = None       # reconstruction probe: none | attention | gradient; None: what the score needs
    split_share: float = 0.5       # budget "split": share of the total allocated by RMS with layer budgets


def probe_for(method: Method, requested: str | None = None, keeps_all: bool = False) -> str:
    """The reconstruction probe a capture needs for this method's key score (or the one requested); "none" when
    every head keeps every key (`keeps_all`, ratio 1), where no score decides anything."""
    if keeps_all:
        return "none"
    if requested is not None:
        return requested
    from .fitting.key_scores import needs_probe

    score = getattr(method, "score", None)
    if score is None:
        return "none"
    recon, grad = needs_probe(score)
    return "gradient" if grad else ("attention" if recon else "none")


def keeps_all(ids: torch.Tensor, opts: "CompressOptions") -> bool:
    """Whether every head keeps every one of the document's tokens at this ratio."""
    return per_head_budget(ids.numel(), opts.ratio) >= ids.numel()


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


def use_batched(device: torch.device) -> bool:
    """Whether compact_capture takes the batched per-layer path: COMPACTOR_BATCHED=1/0 forces it, otherwise on CUDA."""
    flag = os.environ.get("COMPACTOR_BATCHED", "").strip().lower()
    if flag:
        return flag not in ("0", "false", "no", "off")
    return device.type == "cuda"


def layer_key_transform(codec: TensorCodec, stored_dtype: str, seed: int, codebooks: dict | None = None):
    """The keys of a layer's heads (H, t, d) as stored and loaded (for the batched fits): a dtype round trip for
    raw storage (no copy when the dtype is the keys' own), the codec's round trip head by head otherwise (a custom
    codebook the codec names comes from `codebooks`)."""
    dt = STORED_DTYPES[stored_dtype]
    if codec.name == "raw":
        return lambda k, imp, counts: k.to(dt).to(torch.promote_types(dt, k.dtype))

    def quantized(k, imp, counts):
        out = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        for h, c in enumerate(counts.tolist()):
            out[h, :c] = roundtrip_tensor(k[h, :c], codec, stored_dtype, seed, imp[h, :c], codebooks)
        return out
    return quantized


#: the batched path compacts several layers together while their float16 mass shares (n x t per head, t padded to
#: the group's longest head) stay under this many bytes: fewer, larger launches (at T=8k one layer's work is a few
#: microseconds per kernel, far below the launch cost)
BATCH_SHARE_BYTES = 4 << 30


def layer_groups(budgets: torch.Tensor, n: int, codecs: list[KVCodec] | None = None,
                 limit: int = BATCH_SHARE_BYTES, devices: list | None = None) -> list[list[int]]:
    """Layers to compact together: same key codec, on the same device (`devices`: each layer's, when a model is
    spread over several), similar budgets (sorted by their longest head, so that little is padded), at most
    `limit` bytes of float16 shares per group."""
    L, H = budgets.shape
    longest = budgets.max(1).values.tolist()
    label = [(codecs[l].keys.label if codecs else "16", str(devices[l]) if devices else "") for l in range(L)]
    order = sorted(range(L), key=lambda l: (label[l], longest[l]))
    groups: list[list[int]] = []
    for l in order:
        if groups:
            g = groups[-1]
            t = -(-max(longest[l], max(longest[i] for i in g)) // 64) * 64
            if label[g[0]] == label[l] and (len(g) + 1) * H * n * t * 2 <= limit:
                g.append(l)
                continue
        groups.append([l])
    return groups


def window_context(capture: Capture, layer: int, head: int) -> dict:
    """What the observation-window and query-statistics methods (SnapKV, TOVA, ExpectedAttention) read from the
    capture for one (layer, KV head): its window queries, the layer's keys and windows (TOVA), RoPE, group size."""
    window = capture.window_queries
    return {"window_queries": None if window is None else window[layer][head],
            "layer_window": None if window is None else window[layer], "layer_keys": capture.keys[layer],
            "rope": capture.rope, "group": capture.group}


def compact_capture(capture: Capture, method: Method, ratio: float, budget: str = "layer",
                    budget_floor: float = 0.75, progress: bool = True,
                    codecs: list[KVCodec | PhasedCodec] | None = None, stored_dtype: str = "bfloat16", seed: int = 0,
                    batched: bool | None = None, fit_info=None, on_policy=None,
                    score_weights: torch.Tensor | None = None, split_share: float = 0.5,
                    codebooks: dict | None = None) -> tuple[list[LayerKV], torch.Tensor]:
    """Compact every (layer, KV head) of a capture. Returns the layers and the (L, H) budgets used.
    Methods that do not score keys (StreamingLLM, random) are defined per head and always get uniform budgets.
    With `codecs` (one per layer; a PhasedCodec stores each phase with its own codec), methods that fit (AM) see the
    keys as they will be stored and loaded (custom codebooks the codecs name come from `codebooks`).
    Methods with a `compact_layer` (AM, eviction) take all heads of a layer at once when `batched` (default:
    `use_batched`, i.e. on CUDA) and their options allow it (`batched_ok`, no on-policy queries, no phased codecs);
    the per-head path stays the reference (exact float64 fits). `fit_info` (a BatchedFitInfo) collects what the
    batched fits did. Each layer is compacted on the device its captured keys are on (a model spread over several
    GPUs: the GPU holding that layer).
    With `on_policy` (capture/on_policy.OnPolicyQueries), each group of layers after the first is fitted on repeat
    queries recaptured with the layers before it already compacted (budgets and key scores stay those of `capture`).
    `score_weights` (L, H) multiplies each head's key scores before the budgets are shared (e.g. from
    evaluation/sensitivity.sensitivity_weights, stored by calibration); it does not change which keys a head keeps
    for a given count.
    budget "split": `split_share` of the total by RMS attention with layer budgets, the rest by the method's score
    with one global budget; each head keeps the union (fitting/budgets.split_budgets). budget "pyramid": PyramidKV's
    layer budgets (no scores). A method with a `budget_mode` attribute (PyramidKV, KVzip) always gets that rule (and
    its `budget_floor`)."""
    if budget not in MODES:
        raise ValueError(f"budget must be one of {', '.join(MODES)}")
    if getattr(method, "budget_mode", None):  # a method defined by its budget rule (PyramidKV, KVzip)
        budget = method.budget_mode
        budget_floor = getattr(method, "budget_floor", budget_floor)
    elif not method.uses_scores and budget != "pyramid":
        budget = "uniform"
    L, (H, T, _) = len(capture.keys), capture.keys[0].shape
    keep_everything = per_head_budget(T, ratio) >= T  # (also validates the ratio) ratio 1: no score decides
    context = getattr(method, "context", "full")
    quantized = codecs is not None and any(not c.is_raw for c in codecs)
    # scores rank the keys (scored methods), share the budget, and tell the codecs which entries matter most
    scored_budget = budget not in ("uniform", "pyramid")
    stats = capture.attention_stats(context, progress) if method.uses_scores or scored_budget or quantized else None
    if batched is None:
        batched = use_batched(capture.keys[0].device)
    scores = None
    if (method.uses_scores or scored_budget) and not keep_everything:
        scores = all_scores(getattr(method, "score", "rms"), stats, capture.probe, H)
        if score_weights is not None:
            scores = scores * score_weights.to(scores)[..., None]
    if keep_everything:
        budgets = torch.full((L, H), T, dtype=torch.int64)
    elif budget == "split":
        rms_scores = torch.stack([s.p_rms for s in stats]).float().cpu()
        budgets, scores = split_budgets(rms_scores, scores, ratio, split_share, budget_floor)
    elif budget in ("global", "layer"):
        # the batched path ranks the L*H*T scores on the device (a top-k of 3.4M of 34M scores took ~1.3 s on the
        # CPU at T=131k, more than the fits); the per-head path on the CPU, as before
        scores = scores.to(capture.keys[0].device) if batched else scores
        budgets = (global_budgets if budget == "global" else layer_budgets)(scores, ratio, budget_floor).cpu()
    elif budget == "pyramid":
        budgets = pyramid_budgets(L, H, T, ratio)
    else:
        budgets = uniform_budgets(L, H, T, ratio)
    copy = None if capture.probe is None else all_scores("kvzip", None, capture.probe, H)
    layers = []
    phased = codecs is not None and any(isinstance(c, PhasedCodec) for c in codecs)
    if (batched and hasattr(method, "compact_layer") and method.batched_ok() and stats is not None
            and on_policy is None and not phased):
        devices = [k.device for k in capture.keys]
        qpos = {d: capture.query_pos.to(d) for d in dict.fromkeys(devices)}
        out: list = [None] * L
        groups = layer_groups(budgets, capture.queries[0].shape[1], codecs, devices=devices)
        for group in tqdm(groups, desc=f"compact {method.name}", unit="layer group", disable=not progress):
            cat = (lambda xs: xs[0]) if len(group) == 1 else torch.cat
            transform = layer_key_transform((codecs[group[0]] if codecs else RAW).keys, stored_dtype, seed,
                                            codebooks)
            group_stats = type(stats[group[0]])(*(cat([getattr(stats[l], f) for l in group])
                                                  for f in stats[group[0]]._fields))
            layer = method.compact_layer(cat([capture.keys[l] for l in group]),
                                         cat([capture.values[l] for l in group]),
                                         cat([capture.queries[l] for l in group]), budgets[group].flatten(),
                                         stats=group_stats, scale=capture.scale, query_pos=qpos[devices[group[0]]],
                                         query_source=capture.query_source,
                                         scores=None if scores is None else
                                         scores[group].flatten(0, 1).to(devices[group[0]]),
                                         layer_key_transform=transform, fit_info=fit_info)
            for l, part in zip(group, split_heads(layer, H)):
                out[l] = part
        return out, budgets
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
        key_transform = lambda k, imp, pos, c=(codecs[l] if codecs else RAW): roundtrip_keys(  # noqa: E731
            k, c, pos, imp, stored_dtype, seed, codebooks)
        device = capture.keys[l].device
        for h in range(H):
            head_stats = None if stats is None else type(stats[l])(*(x[h] for x in stats[l]))
            heads.append(method.compact(capture.keys[l][h], capture.values[l][h], fit_capture.queries[l][h],
                                        int(budgets[l, h]), query_pos=capture.query_pos.to(device),
                                        query_source=capture.query_source, scale=capture.scale, stats=head_stats,
                                        head_id=l * H + h, key_transform=key_transform,
                                        scores=None if scores is None else scores[l, h].to(device),
                                        copy_scores=None if copy is None else copy[l, h].to(device),
                                        **window_context(capture, l, h)))
        t_max = max(c.keys.shape[0] for c in heads)
        layers.append(LayerKV(
            keys=_pad([c.keys for c in heads], t_max, 0), values=_pad([c.values for c in heads], t_max, 0),
            beta=_pad([c.beta.float() for c in heads], t_max, 0.0),
            positions=_pad([c.positions.long() for c in heads], t_max, -1),
            lengths=torch.tensor([c.keys.shape[0] for c in heads], dtype=torch.int64),
            importance=None if stats is None else _pad([stats[l].p_rms[h][c.positions.to(stats[l].p_rms.device)]
                                                        .cpu() for h, c in enumerate(heads)], t_max, 0.0)))
    return layers, budgets


def tokenize_document(lm: LoadedModel, doc: Document, max_tokens: int | None = None, chat_turn: bool = False
                      ) -> torch.Tensor:
    """Token ids (T,) of the document: as the tokenizer encodes a sequence start (special tokens included), or, with
    `chat_turn`, the chat template's head followed by the document (max_tokens then cuts the document alone)."""
    if chat_turn:
        ids = chat.document_ids(lm.tokenizer, doc.text, max_tokens)
    else:
        ids = lm.tokenizer(doc.text, return_tensors="pt").input_ids[0]
        if max_tokens is not None:
            ids = ids[:max_tokens]
    check_length(lm.model, ids.numel(), f"document {doc.name!r}")
    return ids


def artifact_meta(lm: LoadedModel, doc: Document | None, ids: torch.Tensor, method: Method, opts: CompressOptions,
                  budgets: torch.Tensor, seconds: dict) -> dict:
    """Root attributes of the artifact. Without a document (compressed from token ids), the document digest is
    that of the tokens."""
    cfg = lm.config
    tokens_sha256 = hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()
    meta = {
        "compactor_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model_id": lm.model_id, "model_type": cfg.model_type,
        "model_config_sha256": config_fingerprint(cfg),
        "model_weights": weights_identity(lm.model),
        "tokenizer_sha256": tokenizer_fingerprint(lm.tokenizer),
        "document_name": doc.name if doc else "tokens", "document_sha256": doc.sha256 if doc else tokens_sha256,
        "tokens_sha256": tokens_sha256,
        "T": int(ids.numel()), "ratio": float(opts.ratio), "method": method.name,
        "method_params": {**method.params(), "preset": opts.preset,
                          "budget": getattr(method, "budget_mode", None) or opts.budget,
                          "budget_floor": getattr(method, "budget_floor", opts.budget_floor),
                          "probe": probe_for(method, opts.probe, keeps_all(ids, opts)),
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
    if opts.chat:
        meta["chat"] = {"template_sha256": chat.template_digest(lm.tokenizer), "separator": chat.SEPARATOR}
    return meta


def prepare(lm: LoadedModel, doc: Document, opts: CompressOptions) -> torch.Tensor:
    """Token ids of a document, checked against the model's context and the ratio (fails before any work)."""
    ids = tokenize_document(lm, doc, opts.max_tokens, opts.chat)
    check_options(lm, ids, opts, f"document {doc.name!r}")
    return ids


def check_options(lm: LoadedModel, ids: torch.Tensor, opts: CompressOptions, what: str) -> None:
    """Seed range, ratio against the document length, and every layer's codec against the head size."""
    if not 0 <= opts.seed < 2**32:
        raise CompactorError(f"seed must be in 0..2^32-1 (got {opts.seed})")
    try:
        per_head_budget(ids.numel(), opts.ratio)
    except ValueError as e:
        raise CompactorError(f"{what}: {e}") from None
    try:
        for codec in codec_plan(lm.config.num_hidden_layers, opts):
            check_codec(codec, lm.model.model.layers[0].self_attn.head_dim)
    except ValueError as e:
        raise CompactorError(str(e)) from None


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


def document_phases(lm: LoadedModel, doc: Document, T: int, cal, chat_turn: bool = False,
                    max_tokens: int | None = None) -> Phases | None:
    """The document's phases (prompt, think, answer) over its T compressed tokens, from the calibration's markers,
    when they are all there. With `chat_turn` the document follows the chat template's head (tokenized without
    special tokens, capture/chat.py): its boundaries move by the head's length and the head joins the first phase."""
    if cal is None:
        return None
    ph = cal.meta["phases"]
    markers = tuple(tuple(m) for m in ph["markers"])
    phases = find_phases(doc.text, lm.tokenizer, markers, ph["fallback_fraction"], tuple(ph["names"]),
                         add_special_tokens=not chat_turn)
    if not phases.by_markers:
        return None
    if chat_turn:
        n_doc = phases.bounds[-1] if max_tokens is None else min(phases.bounds[-1], max_tokens)
        head = T - n_doc
        phases = Phases(phases.names, (0,) + tuple(b + head for b in phases.bounds[1:]), phases.methods)
    return phases.clipped(T)


@dataclass
class Compressed:
    """One document compressed in memory: the encoded artifact (not yet written), and what made it."""

    artifact: Artifact             # meta, stored layers, codebooks; path None until written
    layers: list[LayerKV]          # the compacted layers before storage encoding
    capture: Capture
    ids: torch.Tensor              # (T,) the compressed token ids


def build_artifact(lm: LoadedModel, doc: Document | None, method: Method, opts: CompressOptions,
                   progress: bool = True, ids: torch.Tensor | None = None) -> Compressed:
    """Prefill, capture, compact and encode one document (or token ids, when `ids` is given). With
    `opts.calibration`, the codecs, codebooks and head weights follow it (storage/calibrated_plan.py)."""
    ids = prepare(lm, doc, opts) if ids is None else ids
    t0 = time.perf_counter()
    capture = prefill_and_capture(lm.model, lm.tokenizer, ids, chunk_size=opts.chunk_size,
                                  max_queries=opts.max_queries, repeat_fraction=opts.repeat_fraction,
                                  seed=opts.seed, progress=progress, probe=probe_for(method, opts.probe, keeps_all(ids, opts)),
                                  sources=opts.sources, self_study=opts.self_study)
    t1 = time.perf_counter()
    plan = plan_for(lm, doc, ids, opts)
    on_policy = OnPolicyQueries(lm.model, capture, opts.on_policy, opts.chunk_size) \
        if opts.on_policy > 1 and method.name == "am" else None
    layers, budgets = compact_capture(capture, method, opts.ratio, opts.budget, opts.budget_floor, progress,
                                      plan.codecs, opts.stored_dtype, opts.seed, on_policy=on_policy,
                                      score_weights=plan.score_weights, split_share=opts.split_share,
                                      codebooks=plan.codebooks)
    t2 = time.perf_counter()
    meta = artifact_meta(lm, doc, ids, method, opts, budgets,
                         {"prefill": round(t1 - t0, 3), "compact": round(t2 - t1, 3)})
    if opts.calibration is not None:
        meta["calibration_sha256"] = opts.calibration.digest
        meta["method_params"]["calibration"] = plan.applied
    books: dict = dict(plan.codebooks)
    stored = [StoredLayer(*encode_layer(layer, codec, opts.stored_dtype, opts.seed, books))
              for layer, codec in zip(layers, plan.codecs)]
    meta["kv_bits"] = ",".join(sorted({u.label for c in plan.codecs
                                       for u in (c.codecs if isinstance(c, PhasedCodec) else (c,))}))
    return Compressed(Artifact(meta, stored, books), layers, capture, ids)


def compress(lm: LoadedModel, doc: Document, method: Method, out_path: str | Path, opts: CompressOptions,
             progress: bool = True, ids: torch.Tensor | None = None
             ) -> tuple[Path, list[LayerKV], Capture, torch.Tensor]:
    """Prefill, capture, compact and write one document. Returns (path, layers, capture, token ids)."""
    done = build_artifact(lm, doc, method, opts, progress, ids)
    art = done.artifact
    path = write_artifact(out_path, art.meta, art.layers, art.codebooks)
    return path, done.layers, done.capture, done.ids


def plan_for(lm: LoadedModel, doc: Document | None, ids: torch.Tensor | int, opts: CompressOptions) -> Plan:
    """The codecs (per layer or per phase), codebooks and head weights for one document (calibrated_plan); `ids`
    the compressed token ids (or their count)."""
    head_dim = lm.model.model.layers[0].self_attn.head_dim
    base = codec_plan(lm.config.num_hidden_layers, opts)
    T = ids if isinstance(ids, int) else int(ids.numel())
    phases = None if doc is None else document_phases(lm, doc, T, opts.calibration, opts.chat, opts.max_tokens)
    return calibrated_plan(base, opts.calibration, phases, opts.hi_layers, head_dim, opts.budget)


def calibrated_budget_mode(cal, preset_mode: str) -> str:
    """The budget mode compress uses with a calibration when none was given explicitly: the calibration's own
    (`defaults.budget`, the mode under which its held-out check found the head budgets to help) replaces the
    preset's "layer"/"global"; "split" (the quality preset) stays, without head budgets (calibrated_plan)."""
    de = cal.meta["defaults"]
    if de["head_budgets"] and preset_mode in ("layer", "global"):
        return de["budget"]
    return preset_mode


_METHOD_OPTIONS = ("context", "score", "ridge", "source_weights", "beta_floor", "beta_ridge", "value_anchor",
                   "value_fit", "selection", "omp_keys", "omp_refit")


def compress_to_cache(document, model, tokenizer, ratio: float = 10.0, *, method: str = "am",
                      name: str = "document", model_id: str | None = None, progress: bool = False, **options):
    """`compactor.compress`: a document (text, or token ids (T,)) compressed in memory into a CompactedCache for
    `model`, by the same steps as `compactor compress` (so `cache.save(path)` writes the artifact the CLI writes).
    `options` are CompressOptions fields (preset, chat, budget, max_queries, kv_bits, stored_dtype, seed, ...) and
    the method's (context, score, ridge and AM's quality-mode options); the preset (default DEFAULT_PRESET) fills
    in what is not given, as on the command line."""
    from dataclasses import fields

    from .methods import method_from_options
    from .serving.loader import cache_from_artifact

    known = {f.name for f in fields(CompressOptions)} - {"ratio"}
    unknown = set(options) - known - set(_METHOD_OPTIONS)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(sorted(unknown))}; expected some of "
                        f"{', '.join(sorted(known | set(_METHOD_OPTIONS)))}")
    if ratio < 1:
        raise CompactorError(f"ratio must be >= 1 (got {ratio})")
    preset_name = options.get("preset") or DEFAULT_PRESET
    try:
        given = {k: v for k, v in options.items() if k in known and v is not None}
        opts = CompressOptions(ratio=float(ratio), **{**preset(preset_name)["options"], **given,
                                                      "preset": preset_name})
        m = method_from_options(method, opts.seed, preset=preset_name,
                                **{k: v for k, v in options.items() if k in _METHOD_OPTIONS})
    except ValueError as e:
        raise CompactorError(str(e)) from None
    lm = LoadedModel(model, tokenizer, model_id or str(getattr(model.config, "_name_or_path", "") or
                                                        model.config.model_type))
    if isinstance(document, str):
        doc = Document(name, document)
        if not document.strip():
            raise CompactorError("the document is empty")
        ids = prepare(lm, doc, opts)
    else:
        if opts.chat:
            raise CompactorError("chat wrapping needs the document as text, not token ids")
        doc, ids = None, torch.as_tensor(document, dtype=torch.long).reshape(-1).cpu()
        if opts.max_tokens is not None:
            ids = ids[:opts.max_tokens]
        if ids.numel() == 0:
            raise CompactorError("the document has no tokens")
        check_length(model, ids.numel(), "the document")
        check_options(lm, ids, opts, "the document")
    done = build_artifact(lm, doc, m, opts, progress, ids)
    cache = cache_from_artifact(done.artifact, model)
    cache.artifact = done.artifact
    return cache
