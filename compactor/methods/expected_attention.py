"""ExpectedAttention (kvpress, NVIDIA): keys ranked by the attention future queries are expected to pay them.

For one (layer, KV head), per query head h of the group:
1. the statistics of its queries before RoPE: mean mu_h and covariance Sigma_h (divided by n) of the capture's context
   queries at positions >= n_sink (their post-RoPE rows rotated back by their positions);
2. the average RoPE rotation over the next `n_future` positions, R = mean_{p = T .. T + n_future - 1} R(p) (with the
   model's attention scaling), applied as mu' = R mu_h, Sigma' = R Sigma_h R^T;
3. a query q ~ N(mu', Sigma') gives key k the expected unnormalised weight E exp(s q.k) = exp(s mu'.k + s^2/2 k^T
   Sigma' k) (s the softmax scale); these are normalised by a softmax over the non-sink keys;
then averaged over the group's heads and multiplied by ||v|| (+ epsilon). The first n_sink keys rank on top.
kvpress estimates the statistics from every prefill query; here from the capture's context queries, a seeded uniform
sample of the positions.
"""
from __future__ import annotations

import torch

from ..capture.prefill import CONTEXT, RANDOM
from ..fitting.key_selection import top_keys
from .base import Compacted, Method, keep_all, take


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype=torch.float64):
    """(n, d) cos and sin of the rotation at each position (transformers' Llama layout: frequencies repeated twice)."""
    angles = positions.to(dtype)[:, None] * inv_freq.to(dtype)[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def unrotate(queries: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0
             ) -> torch.Tensor:
    """Queries (n, d) before RoPE, from post-RoPE rows q' = scaling * R(p) q (float64)."""
    cos, sin = rope_cos_sin(inv_freq, positions)
    q = queries.double().cpu()
    return (q * cos - rotate_half(q) * sin) / scaling


def mean_rotation(inv_freq: torch.Tensor, start: int, count: int, scaling: float = 1.0) -> torch.Tensor:
    """(d, d) float64: scaling * mean over p = start .. start + count - 1 of RoPE's rotation matrix R(p)."""
    cos, sin = rope_cos_sin(inv_freq, torch.arange(start, start + count))
    d = cos.shape[1]
    P = torch.zeros(d, d, dtype=torch.float64)  # P x = rotate_half(x)
    P[: d // 2, d // 2:] = -torch.eye(d // 2, dtype=torch.float64)
    P[d // 2:, : d // 2] = torch.eye(d // 2, dtype=torch.float64)
    R = cos[:, :, None] * torch.eye(d, dtype=torch.float64) + sin[:, :, None] * P
    return scaling * R.mean(0)


def expected_attention_scores(keys: torch.Tensor, values: torch.Tensor, pre_rope_queries: torch.Tensor,
                              rotation: torch.Tensor, scale: float, n_sink: int = 4, use_covariance: bool = True,
                              use_vnorm: bool = True, epsilon: float = 0.0) -> torch.Tensor:
    """(T,) float64 ranking. pre_rope_queries (g, n, d): each query head's statistics sample; rotation (d, d)."""
    k = keys.double().cpu()[n_sink:]
    mu = pre_rope_queries.mean(1)                              # (g, d)
    logits = scale * (mu @ rotation.T) @ k.T                   # (g, T - n_sink)
    if use_covariance:
        centred = pre_rope_queries - mu[:, None]
        cov = centred.transpose(1, 2) @ centred / pre_rope_queries.shape[1]
        cov = rotation @ cov @ rotation.T                      # (g, d, d)
        logits = logits + 0.5 * scale ** 2 * torch.einsum("td,gde,te->gt", k, cov, k)
    scores = torch.softmax(logits, dim=-1).mean(0)
    if use_vnorm:
        scores = (scores + epsilon) * values.double().cpu()[n_sink:].norm(dim=-1)
    top = (scores.max() if scores.numel() else torch.zeros((), dtype=scores.dtype)) + 1
    return torch.cat([top + torch.arange(n_sink, 0, -1, dtype=scores.dtype), scores])


class ExpectedAttention(Method):
    name = "expected_attention"

    def __init__(self, n_future: int = 512, n_sink: int = 4, use_covariance: bool = True, use_vnorm: bool = True,
                 epsilon: float = 0.0):
        if n_future < 1 or n_sink < 0:
            raise ValueError("ExpectedAttention needs n_future >= 1 and n_sink >= 0")
        self.n_future, self.n_sink = int(n_future), int(n_sink)
        self.use_covariance, self.use_vnorm, self.epsilon = bool(use_covariance), bool(use_vnorm), float(epsilon)

    def params(self) -> dict:
        return {"n_future": self.n_future, "n_sink": self.n_sink, "use_covariance": self.use_covariance,
                "use_vnorm": self.use_vnorm, "epsilon": self.epsilon}

    def compact(self, keys, values, queries, budget, **context) -> Compacted:
        T = keys.shape[0]
        if budget >= T:
            return keep_all(keys, values)
        rope, src, pos = context.get("rope"), context.get("query_source"), context.get("query_pos")
        if rope is None:
            raise ValueError("ExpectedAttention needs the model's RoPE frequencies (Capture.rope; models whose heads "
                             "rotate only part of their dimensions are not supported)")
        if src is None or pos is None:
            raise ValueError("ExpectedAttention needs query_source and query_pos in the call context")
        group = int(context.get("group", 1))
        src, pos = src.cpu(), pos.cpu()
        per_head = int((src != RANDOM).sum()) // group  # pooled rows: head-major, then the capture's positions
        head = torch.full((src.numel(),), -1)
        head[: per_head * group] = torch.arange(per_head * group) // per_head
        rows = (src == CONTEXT) & (pos >= self.n_sink) & (head >= 0)
        if not bool(rows.any()):
            raise ValueError("ExpectedAttention needs context queries (capture with a context share > 0)")
        inv_freq, scaling = rope
        pre = unrotate(queries.cpu()[rows], pos[rows], inv_freq, scaling)
        counts = torch.bincount(head[rows], minlength=group)
        if int(counts.min()) != int(counts.max()):
            raise ValueError("ExpectedAttention: query heads of a group hold unequal query counts")
        pre = pre.reshape(group, int(counts[0]), -1)
        R = mean_rotation(inv_freq, T, self.n_future, scaling)
        scores = expected_attention_scores(keys, values, pre, R, context["scale"], min(self.n_sink, T),
                                           self.use_covariance, self.use_vnorm, self.epsilon)
        return take(keys, values, top_keys(scores.to(keys.device), budget))
