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

REPEAT_PROMPT = "\n\nRepeat the text above, word for word.\n\n"
CONTEXT, REPEAT = 0, 1


@dataclass
class Capture:
    """What compaction needs from one prefill. L layers, Hkv KV heads, T tokens, n pooled queries per KV head."""

    keys: list[torch.Tensor]     # L x (Hkv, T, d), post-RoPE, model dtype
    values: list[torch.Tensor]   # L x (Hkv, T, d)
    queries: list[torch.Tensor]  # L x (Hkv, n, d), post-RoPE
    query_pos: torch.Tensor      # (n,) int64: a context query at position p saw keys 0..p; repeat queries: T-1
    query_source: torch.Tensor   # (n,) int8: CONTEXT or REPEAT
    scale: float                 # softmax scale of the model's attention (usually d**-0.5)
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
                chunk_size: int, bar) -> None:
    """Feed ids (n,) at positions start.. in chunks; `keep` (n,) bool marks rows whose queries are recorded."""
    device = next(model.parameters()).device
    for lo in range(0, ids.numel(), chunk_size):
        hi = min(lo + chunk_size, ids.numel())
        recorder.rows = keep[lo:hi].nonzero().flatten().to(device)  # once per chunk, not once per layer
        pos = torch.arange(start + lo, start + hi, device=device)[None]
        model(input_ids=ids[None, lo:hi].to(device), position_ids=pos, past_key_values=cache, use_cache=True,
              logits_to_keep=1, compactor_recorder=recorder)
        bar.update(hi - lo)
    recorder.rows = None


def context_limit(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 0)


def check_length(model, n_tokens: int, what: str = "document") -> None:
    limit = context_limit(model)
    if limit and n_tokens > limit:
        raise DocumentError(f"{what} is {n_tokens} tokens but the model's context is {limit} tokens")


@torch.no_grad()
def prefill_and_capture(model, tokenizer, doc_ids: torch.Tensor, *, chunk_size: int = 512,
                        max_queries: int = 4096, repeat_fraction: float = 0.5, seed: int = 0,
                        progress: bool = True) -> Capture:
    """Prefill doc_ids (T,) and capture keys, values and up to `max_queries` pooled queries per KV head."""
    from transformers import DynamicCache

    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    cfg = model.config
    n_layers, n_kv, n_q = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.num_attention_heads
    group = n_q // n_kv
    T = doc_ids.numel()
    check_length(model, T)
    gen = torch.Generator().manual_seed(seed)

    prompt = tokenizer(REPEAT_PROMPT, add_special_tokens=False, return_tensors="pt").input_ids[0]
    room = context_limit(model) - T - prompt.numel() if context_limit(model) else T
    repeat_len = max(0, min(T, room)) if repeat_fraction > 0 else 0
    n_rep_pos = min(repeat_len, math.ceil(max_queries * repeat_fraction / group)) if repeat_len else 0
    n_ctx_pos = min(T, math.ceil((max_queries - n_rep_pos * group) / group))
    ctx_pos = _sample_positions(T, n_ctx_pos, gen)
    rep_pos = _sample_positions(repeat_len, n_rep_pos, gen)

    recorder = QueryRecorder(n_layers, n_kv)
    # no config: every layer keeps all T keys (with one, sliding-window layers would keep only the last window;
    # the model's masks still apply its window to the attention itself)
    cache = DynamicCache()
    total = T + (prompt.numel() + repeat_len if repeat_len else 0)
    with using_compactor_attention(model), tqdm(total=total, desc="prefill", unit="tok", disable=not progress) as bar:
        keep = torch.zeros(T, dtype=torch.bool)
        keep[ctx_pos] = True
        _run_chunks(model, doc_ids, 0, cache, recorder, keep, chunk_size, bar)
        keys = [cache.layers[i].keys[0] for i in range(n_layers)]
        values = [cache.layers[i].values[0] for i in range(n_layers)]
        if repeat_len:
            rep_ids = torch.cat([prompt, doc_ids[:repeat_len]])
            keep = torch.zeros(rep_ids.numel(), dtype=torch.bool)
            keep[prompt.numel() + rep_pos] = True
            _run_chunks(model, rep_ids, T, cache, recorder, keep, chunk_size, bar)
    del cache
    queries = [recorder.pooled(i) for i in range(n_layers)]
    pos = torch.cat([ctx_pos, torch.full((rep_pos.numel(),), T - 1)])
    src = torch.cat([torch.full((ctx_pos.numel(),), CONTEXT), torch.full((rep_pos.numel(),), REPEAT)]).to(torch.int8)
    scale = model.model.layers[0].self_attn.scaling
    return Capture(keys, values, queries, pos.repeat(group), src.repeat(group), float(scale))
