"""Per-head budgets: how many keys each (layer, KV head) keeps for a compression ratio r.

- uniform: every head keeps t = ceil(T / r);
- global: the same total L * H * t, shared across all heads and layers by ranking every key of every head on one
  comparable score (its softmax weight statistic); each head first gets `floor` keys (a fraction of t) so that no
  head is emptied;
- layer: the global allocation summed per layer, then split equally among the layer's KV heads. Heads of one
  layer then have equal lengths, so the serving cache (padded to the longest head of a layer) wastes nothing.
"""
from __future__ import annotations

import math

import torch

MODES = ("uniform", "global", "layer")


def per_head_budget(T: int, ratio: float) -> int:
    if not ratio >= 1:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
    if ratio > T:
        raise ValueError(f"ratio {ratio} is larger than the document length T={T}: nothing would be kept")
    return math.ceil(T / ratio)


def uniform_budgets(n_layers: int, n_heads: int, T: int, ratio: float) -> torch.Tensor:
    """(L, H) int64, all equal to ceil(T / ratio)."""
    return torch.full((n_layers, n_heads), per_head_budget(T, ratio), dtype=torch.int64)


def global_budgets(scores: torch.Tensor, ratio: float, floor_fraction: float = 0.75) -> torch.Tensor:
    """(L, H) int64 budgets from key scores (L, H, T) with the same total as uniform_budgets."""
    L, H, T = scores.shape
    t = per_head_budget(T, ratio)
    floor = min(t, max(1, math.floor(floor_fraction * t)))
    flat = scores.float().reshape(L * H, T).clone()
    first = torch.topk(flat, floor, dim=1).indices
    flat.scatter_(1, first, float("inf"))  # the floor keys of each head are taken first
    chosen = torch.topk(flat.reshape(-1), L * H * t).indices
    counts = torch.bincount(chosen // T, minlength=L * H)
    return counts.reshape(L, H).to(torch.int64)


def layer_budgets(scores: torch.Tensor, ratio: float, floor_fraction: float = 0.75) -> torch.Tensor:
    """(L, H) int64: global_budgets summed per layer and split equally over its heads (same total)."""
    per_head = global_budgets(scores, ratio, floor_fraction)
    L, H = per_head.shape
    total = per_head.sum(1)
    out = (total // H)[:, None].repeat(1, H)
    rem = total - out.sum(1)
    out += torch.arange(H, device=out.device)[None, :] < rem[:, None]  # the remainder goes to the first heads
    return out.clamp(max=scores.shape[-1])
