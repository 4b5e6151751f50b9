"""SnapKV (arXiv 2404.14469): keys ranked by the attention the observation window pays them.

For one (layer, KV head) with T keys and the queries of the last w prefix positions (Capture.window_queries, g query
heads x w positions, post-RoPE): each window query's softmax over the keys it sees (causal inside the window) is taken
on the T - w keys before the window, averaged over the w queries, smoothed along the positions by an average pool
(kernel k, zero padding, the pad counted in the mean: torch's avg_pool1d), and averaged over the g query heads of the
group. The w window keys rank above every other key (kvpress gives them max + 1; among themselves we rank the most
recent first, so a budget below w keeps the latest). The budget's highest-ranked keys are kept, beta = 0, values copied.
Definitions as kvpress's SnapKVPress (window 64, kernel 5).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..fitting.key_selection import top_keys
from .base import Compacted, Method, keep_all, take


def window_attention(keys: torch.Tensor, window_queries: torch.Tensor, scale: float, group: int) -> torch.Tensor:
    """(g, w, T) float32 softmax weights of the window queries (g * w, d), head-major then position, the last one at
    position T - 1, over keys (T, d); window query i sees keys 0 .. T - w + i."""
    T = keys.shape[0]
    w = window_queries.shape[0] // group
    logits = scale * window_queries.float().reshape(group, w, -1) @ keys.float().T
    visible = torch.arange(T, device=keys.device)[None, :] <= (T - w + torch.arange(w, device=keys.device))[:, None]
    return torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)


def rank_window_first(scores: torch.Tensor, w: int) -> torch.Tensor:
    """(T,) ranking: scores (T - w,) for the keys before the window, then the w window keys above all of them, the most
    recent highest."""
    top = (scores.max() if scores.numel() else torch.zeros((), device=scores.device)) + 1
    return torch.cat([scores, top + torch.arange(1, w + 1, device=scores.device, dtype=scores.dtype)])


def snapkv_scores(keys: torch.Tensor, window_queries: torch.Tensor, scale: float, group: int,
                  kernel: int = 5) -> torch.Tensor:
    """(T,) ranking of the keys (the window's keys last, ranked on top)."""
    T = keys.shape[0]
    w = window_queries.shape[0] // group
    attn = window_attention(keys, window_queries, scale, group)[..., : T - w].mean(1)  # (g, T - w)
    if T - w > 0:
        attn = F.avg_pool1d(attn[:, None], kernel_size=kernel, stride=1, padding=kernel // 2)[:, 0, : T - w]
    return rank_window_first(attn.mean(0), w)


def window_of(context: dict) -> tuple[torch.Tensor, int]:
    """The head's window queries and group size from the call context (the pipeline passes Capture's)."""
    wq = context.get("window_queries")
    if wq is None:
        raise ValueError("this method needs the observation window's queries (capture with window > 0)")
    return wq, int(context.get("group", 1))


class SnapKV(Method):
    name = "snapkv"

    def __init__(self, kernel: int = 5):
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"SnapKV pooling kernel must be odd and >= 1, got {kernel}")
        self.kernel = kernel

    def params(self) -> dict:
        return {"kernel": self.kernel}

    def compact(self, keys, values, queries, budget, **context) -> Compacted:
        if budget >= keys.shape[0]:
            return keep_all(keys, values)
        wq, group = window_of(context)
        return take(keys, values, top_keys(snapkv_scores(keys, wq, context["scale"], group, self.kernel), budget))
