"""Redundancy ρ of a segment of keys or values: their mean pairwise cosine similarity.

For n vectors with unit directions u_i, ρ = 2/(n(n−1)) Σ_{i<j} u_i·u_j = (‖Σ u_i‖² − n) / (n(n−1)), computed in
O(n·d) without the n×n matrix. Mean pairwise cosine falls with segment length alone (distant tokens differ more,
and a long segment holds more distinct content), so comparing a 300-token think phase with a 60-token answer says
little; `windowed_rho` measures it on consecutive windows of the same token count in every phase (length-matched),
which the published measurement (TAQG) did not.
"""
from __future__ import annotations

import torch


def mean_pairwise_cosine(x: torch.Tensor) -> torch.Tensor:
    """x (..., n, d) -> (...) mean cosine over the n(n−1)/2 distinct pairs (float64; zero vectors count as
    direction 0). n >= 2."""
    n = x.shape[-2]
    if n < 2:
        raise ValueError("mean pairwise cosine needs at least 2 vectors")
    x = x.double()
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    u = x / torch.where(norm > 0, norm, torch.ones_like(norm))
    ones = (norm[..., 0] > 0).sum(-1)  # u_i·u_i for the non-zero vectors
    s = u.sum(-2)
    return ((s * s).sum(-1) - ones) / (n * (n - 1))


def windowed_rho(x: torch.Tensor, window: int) -> torch.Tensor:
    """x (..., n, d) -> (...) mean over the floor(n / window) consecutive, non-overlapping windows of
    `window` vectors of their mean pairwise cosine (NaN when n < window)."""
    n = x.shape[-2]
    k = n // window
    if k == 0 or window < 2:
        return torch.full(x.shape[:-2], float("nan"), dtype=torch.float64)
    w = x[..., : k * window, :].reshape(*x.shape[:-2], k, window, x.shape[-1])
    return mean_pairwise_cosine(w).mean(-1)
