"""H2O (arXiv 2306.14048): heavy hitters by accumulated attention, plus the most recent tokens.

A key's score is the sum of the softmax weights the document's own queries give it, each query seeing only its causal
past (query i at position p_i sees keys 0..p_i), summed over the query heads of the KV head's group. The budget is
split: round(recent * budget) most recent keys, then the highest scores among the rest (H2O's heavy-hitter + local
halves). H2O sums over every prefix query; here the sum runs over the capture's context queries, a seeded uniform
sample of the positions (an unbiased estimate of the full sum up to the constant factor T / n, which ranks alike in
expectation). kvpress's ObservedAttentionPress divides each key's sum by the number of queries that see it; H2O
does not, and neither do we.
"""
from __future__ import annotations

import torch

from ..capture.prefill import CONTEXT
from ..fitting.key_selection import top_keys
from .base import Compacted, Method, keep_all, take


def accumulated_attention(keys: torch.Tensor, queries: torch.Tensor, query_pos: torch.Tensor, scale: float
                          ) -> torch.Tensor:
    """(T,) float32: sum over queries (n, d) at positions query_pos (n,) of their causal softmax weights."""
    T = keys.shape[0]
    logits = scale * queries.float() @ keys.float().T
    visible = torch.arange(T, device=keys.device)[None, :] <= query_pos.to(keys.device)[:, None]
    return torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1).sum(0)


class H2O(Method):
    name = "h2o"

    def __init__(self, recent: float = 0.5):
        if not 0 <= recent <= 1:
            raise ValueError(f"H2O recent share must be in [0, 1], got {recent}")
        self.recent = float(recent)

    def params(self) -> dict:
        return {"recent": self.recent}

    def compact(self, keys, values, queries, budget, **context) -> Compacted:
        T = keys.shape[0]
        if budget >= T:
            return keep_all(keys, values)
        src, pos = context.get("query_source"), context.get("query_pos")
        if src is None or pos is None:
            raise ValueError("H2O needs query_source and query_pos in the call context")
        rows = (src == CONTEXT).to(queries.device)
        if not bool(rows.any()):
            raise ValueError("H2O needs context queries (the document's own; capture with a context share > 0)")
        n_recent = round(self.recent * budget)
        scores = accumulated_attention(keys, queries[rows], pos.to(queries.device)[rows], context["scale"])
        scores[T - n_recent:] = float("inf")
        return take(keys, values, top_keys(scores, budget))
