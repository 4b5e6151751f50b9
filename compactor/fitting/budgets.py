"""Per-head budgets: how many keys each (layer, KV head) keeps for a compression ratio r.

- uniform: every head keeps t = ceil(T / r);
- global: the same total L * H * t, shared across all heads and layers by ranking every key of every head on one
  comparable score (its softmax weight statistic); each head first gets `floor` keys (a fraction of t) so that no
  head is emptied;
- layer: the global allocation summed per layer, then split equally among the layer's KV heads. Heads of one
  layer then have equal lengths, so the serving cache (padded to the longest head of a layer) wastes nothing.
- split (`split_budgets`): a share of the total goes by one score with layer budgets (RMS attention: what the
  continuation needs), the rest by another score with a global budget (a reconstruction score: what recall needs);
  each head keeps the union of both choices.
"""
from __future__ import annotations

import math

import torch

MODES = ("uniform", "global", "layer", "split")


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
    for l in range(L):  # the remainder goes to the first heads of the layer
        out[l, : int(rem[l])] += 1
    return out.clamp(max=scores.shape[-1])


def split_budgets(first: torch.Tensor, second: torch.Tensor, ratio: float, share: float = 0.5,
                  floor_fraction: float = 0.75) -> tuple[torch.Tensor, torch.Tensor]:
    """Budgets (L, H) and per-key ranking scores (L, H, T) for a split allocation: `share` of the total by `first`
    with layer budgets (floor `floor_fraction`), the rest by `second` with global budgets (no floor). A head ranks
    its `first`-chosen keys on top (score +inf), then the others by `second`; its budget is the sum of both parts,
    so keys chosen twice leave room for the next keys of `second`."""
    if not 0 <= share <= 1:
        raise ValueError(f"split share must be in [0, 1], got {share}")
    L, H, T = first.shape
    if per_head_budget(T, ratio) >= T:  # ratio 1: every head keeps everything (the two parts would overlap)
        return torch.full((L, H), T, dtype=torch.int64), second.float().clone()
    total = L * H * per_head_budget(T, ratio)
    n_first = round(share * total)
    b_first = layer_budgets(first, L * H * T / max(n_first, 1), floor_fraction) if n_first else \
        torch.zeros(L, H, dtype=torch.int64)
    b_second = global_budgets(second, L * H * T / max(total - n_first, 1), 0.0) if total > n_first else \
        torch.zeros(L, H, dtype=torch.int64)
    ranked = second.float().clone()
    for l in range(L):
        for h in range(H):
            k = int(b_first[l, h])
            if k:
                ranked[l, h, torch.topk(first[l, h].float(), k).indices] = float("inf")
    budgets = (b_first + b_second).clamp(max=T).flatten()
    # each part rounds its per-head budgets up on its own: give the excess over the total back from the heads whose
    # global part is largest, one entry each (an artifact never holds more than ceil(T / ratio) per head on average)
    extra = (budgets - b_first.flatten()).clamp_min(0)
    for _ in range(max(int(budgets.sum()) - total, 0)):
        h = int(extra.argmax())
        budgets[h] -= 1
        extra[h] -= 1
    return budgets.view(L, H), ranked
