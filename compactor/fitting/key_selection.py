"""How keys are chosen: highest attention over the reference queries.

A key's score is the RMS over the n reference queries of its softmax weight, sqrt(mean_i p_ij^2), or the max,
max_i p_ij (the two statistics come out of one streaming pass, `compactor.kernels.attention_stats`, which never
forms the n x T matrix of all heads at once). The weights p are normalised per query, so scores are comparable
across heads and layers (used by the global budget allocation).
"""
from __future__ import annotations

import torch

from ..kernels import AttentionStats, attention_stats

SCORES = ("rms", "max")


def key_stats(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, scale: float,
              query_pos: torch.Tensor | None = None) -> AttentionStats:
    """Batched over B heads: keys/values (B, T, d), queries (B, n, d), query_pos (n,) or (B, n) or None."""
    if query_pos is not None and query_pos.dim() == 1:
        query_pos = query_pos.unsqueeze(0).expand(queries.shape[0], -1)
    if query_pos is not None:
        query_pos = query_pos.to(queries.device)
    return attention_stats(queries, keys, values, scale, query_pos)


def score_of(stats: AttentionStats, score: str) -> torch.Tensor:
    if score == "rms":
        return stats.p_rms
    if score == "max":
        return stats.p_max
    raise ValueError(f"unknown key score {score!r}; choose from {SCORES}")


def top_keys(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices (sorted by position) of the `budget` highest scores (T,)."""
    budget = min(int(budget), scores.numel())
    return torch.topk(scores.float(), budget).indices.sort().values
