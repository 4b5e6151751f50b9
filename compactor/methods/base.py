"""The one contract every compaction method answers (AM and each baseline alike)."""
from __future__ import annotations

from typing import NamedTuple

import torch


class Compacted(NamedTuple):
    """One (layer, KV head) after compaction: t <= budget entries, sorted by original position."""

    keys: torch.Tensor       # (t, d), model dtype
    beta: torch.Tensor       # (t,) float32 additive log-mass bias (0 = plain key)
    values: torch.Tensor     # (t, d), model dtype
    positions: torch.Tensor  # (t,) int64 original positions of the kept keys


class Method:
    """compact(keys (T, d), values (T, d), queries (n, d), budget) -> Compacted.

    Keyword context the pipeline may pass: `query_pos` (n,) causal limits of the queries, `scale` (softmax scale),
    `stats` (precomputed `AttentionStats` of these queries over these keys), `head_id` (int, seeds randomness).
    Methods ignore what they do not use.
    """

    name = "base"
    uses_scores = False  # True when the method ranks keys by attention scores (the pipeline can share them)

    def params(self) -> dict:
        """Parameters recorded in the artifact."""
        return {}

    def compact(self, keys, values, queries, budget, **context) -> Compacted:
        raise TypeError(f"{type(self).__name__} does not implement compact()")  # pragma: no cover


def keep_all(keys: torch.Tensor, values: torch.Tensor) -> Compacted:
    """Budget >= T: the identity, exactly (no refit, beta = 0)."""
    T = keys.shape[0]
    return Compacted(keys, torch.zeros(T, dtype=torch.float32, device=keys.device), values,
                     torch.arange(T, device=keys.device))


def take(keys: torch.Tensor, values: torch.Tensor, idx: torch.Tensor) -> Compacted:
    """Plain eviction to the positions idx: beta = 0, values copied."""
    idx = idx.sort().values.to(keys.device)
    return Compacted(keys[idx], torch.zeros(idx.numel(), dtype=torch.float32, device=keys.device), values[idx], idx)
