"""Chunked prefill of a document with capture of its keys, values and reference queries.

Reference queries (post-RoPE, as the attention function receives them) come from two sources:
- context: the document's own queries;
- repeat: after the document, a repeat instruction and the document again are teacher-forced, and the queries of
  that second copy are kept (they look back at the whole document, like the questions asked later will).
Both are capped by seeded random subsampling of token positions; the query heads of a GQA group are pooled per
KV head, so a layer's queries have shape (Hkv, g * positions, d).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..serving.attention import using_compactor_attention
from ..errors import DocumentError
from ..fitting.key_selection import key_stats
from .reconstruction import reconstruction_scores

REPEAT_PROMPT = "\n\nRepeat the text above, word for word.\n\n"
SOURCES = ("context", "repeat", "self_study", "random")  # index = query_source label
CONTEXT, REPEAT, SELF_STUDY, RANDOM = 0, 1, 2, 3
PROBES = ("none", "attention", "gradient")


@dataclass
class Capture:
    """What compaction needs from one prefill. L layers, Hkv KV heads, T tokens, n pooled queries per KV head."""

    keys: list[torch.Tensor]     # L x (Hkv, T, d), post-RoPE, model dtype
    values: list[torch.Tensor]   # L x (Hkv, T, d)
    queries: list[torch.Tensor]  # L x (Hkv, n, d), post-RoPE
    query_pos: torch.Tensor      # (n,) int64: a context query at position p saw keys 0..p; repeat queries: T-1
    query_source: torch.Tensor   # (n,) int8: CONTEXT, REPEAT, SELF_STUDY or RANDOM
    scale: float                 # softmax scale of the model's attention (usually d**-0.5)
    probe: dict | None = None    # reconstruction probe scores {"recon", "wo_norm"[, "recon_grad"]}: (L, Hq, T) each
    repeat_ids: torch.Tensor | None = None   # the ids fed after the document in the repeat pass
    repeat_keep: torch.Tensor | None = None  # (len(repeat_ids),) bool: positions whose queries are REPEAT rows
    # the observation window (SnapKV, TOVA, PyramidKV): the queries of the last w prefix positions T-w..T-1,
    # L x (Hkv, g * w, d) post-RoPE, head-major then position (as `queries`)
    window_queries: list[torch.Tensor] | None = None
    rope: tuple | None = None    # (inv_freq (d/2,) float32, attention_scaling): to undo/redo RoPE (ExpectedAttention)
    group: int = 1               # query heads per KV head
    _stats: dict = field(default_factory=dict, repr=False)

    @property
    def length(self) -> int:
        return self.keys[0].shape[1]

    def attention_stats(self, context: str = "full", progress: bool = False) -> list:
        """Per layer, AttentionStats of the reference queries over the document keys (batched over KV heads),
        computed once per visibility mode: "full" (every query sees the whole prefix) or "causal"."""
        if context not in self._stats:
            pos = self.query_pos if context == "causal" else None
            self._stats[context] = [key_stats(k, v, q, self.scale, pos) for k, v, q in
                                    tqdm(list(zip(self.keys, self.values, self.queries)), desc="score keys",
                                         unit="layer", disable=not progress)]
        return self._stats[context]


class QueryRecorder:
    """Receives (layer, query (b, Hq, q, d)) from the attention function and keeps the rows selected for the chunk."""

    def __init__(self, n_layers: int, n_kv_heads: int):
        self.n_kv = n_kv_heads
        self.rows: torch.Tensor | None = None
        self.store: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]

    def __call__(self, layer_idx: int, query: torch.Tensor) -> None:
        if self.rows is None or self.rows.numel() == 0:
            return
        q = query[0][:, self.rows.to(query.device), :]  # (Hq, k, d)
        self.store[layer_idx].append(q.detach())

    def pooled(self, layer_idx: int) -> torch.Tensor:
        """(Hkv, g * k_total, d): each KV head's query group, head-major then position."""
        q = torch.cat(self.store[layer_idx], dim=1)  # (Hq, k, d)
        hq, k, d = q.shape
        return q.reshape(self.n_kv, (hq // self.n_kv) * k, d)


def _sample_positions(count: int, cap: int, generator: torch.Generator) -> torch.Tensor:
    if cap >= count:
        return torch.arange(count)
    return torch.randperm(count, generator=generator)[:cap].sort().values


def _run_chunks(model, ids: torch.Tensor, start: int, cache, recorder: QueryRecorder, keep: torch.Tensor,
                chunk_size: int, bar, window: tuple[QueryRecorder, torch.Tensor] | None = None) -> None:
    """Feed ids (n,) at positions start.. in chunks; `keep` (n,) bool marks rows whose queries are recorded
    (`window`: a second recorder and its own keep mask)."""
    device = next(model.parameters()).device
    record = recorder
    if window is not None:
        def record(layer_idx, query):
            recorder(layer_idx, query)
            window[0](layer_idx, query)
    for lo in range(0, ids.numel(), chunk_size):
        hi = min(lo + chunk_size, ids.numel())
        recorder.rows = keep[lo:hi].nonzero().flatten().to(device)  # once per chunk, not once per layer
        if window is not None:
            window[0].rows = window[1][lo:hi].nonzero().flatten().to(device)
        pos = torch.arange(start + lo, start + hi, device=device)[None]
        model(input_ids=ids[None, lo:hi].to(device), position_ids=pos, past_key_values=cache, use_cache=True,
              logits_to_keep=1, compactor_recorder=record)
        bar.update(hi - lo)
    recorder.rows = None
    if window is not None:
        window[0].rows = None


def rope_of(model) -> tuple | None:
    """(inv_freq (d/2,) float32 on the CPU, attention_scaling) of the model's rotary embedding, or None when it has
    none a head rotates whole (partial rotary)."""
    emb = getattr(getattr(model, "model", None), "rotary_emb", None)
    inv = getattr(emb, "inv_freq", None)
    head_dim = getattr(model.model.layers[0].self_attn, "head_dim", None)
    if inv is None or head_dim is None or 2 * inv.numel() != head_dim:
        return None
    return inv.detach().float().cpu(), float(getattr(emb, "attention_scaling", 1.0))


def context_limit(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 0)


def check_length(model, n_tokens: int, what: str = "document") -> None:
    limit = context_limit(model)
    if limit and n_tokens > limit:
        raise DocumentError(f"{what} is {n_tokens} tokens but the model's context is {limit} tokens")


def source_shares(sources: dict | None, repeat_fraction: float) -> dict[str, float]:
    """Shares of the reference queries per source (summing to 1); None: context and repeat by repeat_fraction."""
    if sources is None:
        return {"context": 1.0 - repeat_fraction, "repeat": repeat_fraction}
    for name, share in sources.items():
        if name not in SOURCES:
            raise ValueError(f"unknown query source {name!r}; choose from {', '.join(SOURCES)}")
        if not share >= 0:
            raise ValueError(f"query source {name!r}: share must be >= 0, got {share}")
    total = sum(sources.values())
    if not total > 0:
        raise ValueError("query sources: at least one share must be > 0")
    return {name: share / total for name, share in sources.items()}


@torch.no_grad()
def prefill_and_capture(model, tokenizer, doc_ids: torch.Tensor, *, chunk_size: int = 512,
                        max_queries: int = 4096, repeat_fraction: float = 0.5, seed: int = 0,
                        progress: bool = True, probe: str = "none", probe_chunk: int = 256,
                        sources: dict | None = None, self_study: int = 4, window: int = 64) -> Capture:
    """Prefill doc_ids (T,) and capture keys, values and up to `max_queries` pooled queries per KV head.
    sources: {name: share} over SOURCES (context, repeat, self_study, random); default context and repeat by
    repeat_fraction. self_study: how many question/answer texts the model writes (capture/query_sources.py).
    probe: "none", "attention" (reconstruction scores, KVzip) or "gradient" (also KVgrad's gradient weighting),
    see capture/reconstruction.py. window: the observation window, the last `window` positions whose queries are kept
    whole (Capture.window_queries)."""
    from transformers import DynamicCache

    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    doc_ids = doc_ids.cpu()  # joined with tokenizer outputs (CPU) below; chunks go to the model's device when fed
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {', '.join(PROBES)}, not {probe!r}")
    shares = source_shares(sources, repeat_fraction)
    if shares.get("random", 0.0) >= 1.0:
        raise ValueError("random queries take their norms from the other sources: give at least one more source")
    cfg = model.config
    n_layers, n_kv, n_q = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.num_attention_heads
    group = n_q // n_kv
    T = doc_ids.numel()
    check_length(model, T)
    gen = torch.Generator().manual_seed(seed)

    prompt = tokenizer(REPEAT_PROMPT, add_special_tokens=False, return_tensors="pt").input_ids[0]
    room = context_limit(model) - T - prompt.numel() if context_limit(model) else T
    share_rep = shares.get("repeat", 0.0)
    repeat_len = max(0, min(T, room)) if share_rep > 0 else 0
    n_rep_pos = min(repeat_len, math.ceil(max_queries * share_rep / group)) if repeat_len else 0
    n_rand = round(max_queries * shares.get("random", 0.0))

    recorder = QueryRecorder(n_layers, n_kv)
    # no config: every layer keeps all T keys (with one, sliding-window layers would keep only the last window;
    # the model's masks still apply its window to the attention itself)
    cache = DynamicCache()
    total = T + (prompt.numel() + repeat_len if repeat_len else 0)
    with using_compactor_attention(model), tqdm(total=total, desc="prefill", unit="tok", disable=not progress) as bar:
        share_ss = shares.get("self_study", 0.0)
        n_ss_pos = n_ctx_pos = 0
        room_ss = 0
        keep = torch.zeros(T, dtype=torch.bool)
        # context positions are drawn after the other sources' counts are known (context takes the rest)
        if share_ss > 0 and self_study > 0:
            room_ss = (context_limit(model) or 10 ** 9) - T
            n_ss_pos = math.ceil(max_queries * share_ss / group)
        if shares.get("context", 0.0) > 0:
            n_ctx_pos = min(T, math.ceil((max_queries - n_rep_pos * group - n_ss_pos * group - n_rand) / group))
            n_ctx_pos = max(n_ctx_pos, 0)
        ctx_pos = _sample_positions(T, n_ctx_pos, gen)
        rep_pos = _sample_positions(repeat_len, n_rep_pos, gen)
        keep[ctx_pos] = True
        win_recorder = QueryRecorder(n_layers, n_kv)
        win_keep = torch.zeros(T, dtype=torch.bool)
        win_keep[max(0, T - window):] = True
        _run_chunks(model, doc_ids, 0, cache, recorder, keep, chunk_size, bar, (win_recorder, win_keep))
        keys = [cache.layers[i].keys[0] for i in range(n_layers)]
        values = [cache.layers[i].values[0] for i in range(n_layers)]
        if repeat_len:
            rep_ids = torch.cat([prompt, doc_ids[:repeat_len]])
            keep = torch.zeros(rep_ids.numel(), dtype=torch.bool)
            keep[prompt.numel() + rep_pos] = True
            _run_chunks(model, rep_ids, T, cache, recorder, keep, chunk_size, bar)
            repeat = (rep_ids, keep)
        else:
            repeat = (None, None)
        del cache
        ss_pos = torch.zeros(0, dtype=torch.int64)
        if n_ss_pos:
            from .query_sources import SELF_STUDY_PROMPT, self_study_texts
            from .reconstruction import _doc_cache

            ss_texts = self_study_texts(model, tokenizer, lambda: _doc_cache(keys, values), T, self_study,
                                        seed=seed)
            n_prompt = tokenizer(SELF_STUDY_PROMPT, add_special_tokens=False, return_tensors="pt").input_ids.shape[1]
            ss_texts = [t[:max(0, room_ss)] for t in ss_texts]
            spans = [t.numel() - n_prompt for t in ss_texts]  # generated tokens of each text
            n_ss_pos = min(n_ss_pos, sum(max(0, x) for x in spans))
            picked = _sample_positions(sum(max(0, x) for x in spans), n_ss_pos, gen)
            offset = 0
            for t, n_gen in zip(ss_texts, spans):
                n_gen = max(0, n_gen)
                mine = picked[(picked >= offset) & (picked < offset + n_gen)] - offset
                offset += n_gen
                if mine.numel() == 0:
                    continue
                keep = torch.zeros(t.numel(), dtype=torch.bool)
                keep[n_prompt + mine] = True
                _run_chunks(model, t, T, _doc_cache(keys, values), recorder, keep, chunk_size, bar)
            ss_pos = picked
    queries = [recorder.pooled(i) for i in range(n_layers)]
    pos = torch.cat([ctx_pos, torch.full((rep_pos.numel() + ss_pos.numel(),), T - 1)])
    src = torch.cat([torch.full((ctx_pos.numel(),), CONTEXT), torch.full((rep_pos.numel(),), REPEAT),
                     torch.full((ss_pos.numel(),), SELF_STUDY)]).to(torch.int8)
    pos, src = pos.repeat(group), src.repeat(group)
    if n_rand:
        from .query_sources import random_queries

        queries = [torch.cat([q, random_queries(q, n_rand, seed + 1000 * l)], 1) for l, q in enumerate(queries)]
        pos = torch.cat([pos, torch.full((n_rand,), T - 1)])
        src = torch.cat([src, torch.full((n_rand,), RANDOM, dtype=torch.int8)])
    scale = model.model.layers[0].self_attn.scaling
    probe_scores = None
    if probe != "none":
        probe_scores = reconstruction_scores(model, tokenizer, doc_ids, keys, values, gradient=probe == "gradient",
                                             chunk_size=probe_chunk, progress=progress)
    window_queries = [win_recorder.pooled(i) for i in range(n_layers)] if window > 0 else None
    return Capture(keys, values, queries, pos, src, float(scale), probe_scores, *repeat, window_queries=window_queries,
                   rope=rope_of(model), group=group)
