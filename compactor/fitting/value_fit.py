"""Compact values by ridge least squares on the attention outputs.

With P (n, t) the compact attention weights of n reference queries over the t kept keys (rows sum to 1, beta
included) and O (n, d) the full-cache attention outputs, solve
    min_X ||P X - O||^2 + lam ||X - V0||^2,
shrinking toward the original values V0 of the kept keys; lam = ridge * trace(P^T P) / t keeps the problem
well conditioned whatever the scale of P. Solved in float64 through a Cholesky factorisation.
Options: query weights u (n,) turn the data term into sum_i u_i ||P_i X - O_i||^2; a per-key `anchor` (t,) >= 0 adds
anchor_j * trace(P^T P) / t to key j's ridge, holding keys that must stay verbatim (copy-like keys) at their values.
"""
from __future__ import annotations

import torch


def fit_values(P: torch.Tensor, O: torch.Tensor, V0: torch.Tensor, ridge: float = 1e-3,
               weights: torch.Tensor | None = None, anchor: torch.Tensor | None = None) -> torch.Tensor:
    """X (t, d) float64 for P (n, t), O (n, d), V0 (t, d); weights (n,), anchor (t,) optional."""
    P, O, V0 = P.double(), O.double(), V0.double()
    Pu = P if weights is None else P * weights.to(P.device, P.dtype)[:, None]
    gram = Pu.T @ P
    t = gram.shape[0]
    unit = float(torch.trace(gram)) / max(t, 1)
    lam = torch.full((t,), ridge * unit + 1e-12, dtype=gram.dtype, device=gram.device)
    if anchor is not None:
        lam = lam + unit * anchor.to(gram.device, gram.dtype)
    lhs = gram + torch.diag(lam)
    rhs = Pu.T @ O + lam[:, None] * V0
    L, info = torch.linalg.cholesky_ex(lhs)
    if int(info) != 0:
        return torch.linalg.lstsq(lhs, rhs).solution
    return torch.cholesky_solve(rhs, L)
