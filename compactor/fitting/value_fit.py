"""Compact values by ridge least squares on the attention outputs.

With P (n, t) the compact attention weights of n reference queries over the t kept keys (rows sum to 1, beta
included) and O (n, d) the full-cache attention outputs, solve
    min_X ||P X - O||^2 + lam ||X - V0||^2,
shrinking toward the original values V0 of the kept keys; lam = ridge * trace(P^T P) / t keeps the problem
well conditioned whatever the scale of P. Solved in float64 through a Cholesky factorisation.
"""
from __future__ import annotations

import torch


def fit_values(P: torch.Tensor, O: torch.Tensor, V0: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """X (t, d) float64 for P (n, t), O (n, d), V0 (t, d)."""
    P, O, V0 = P.double(), O.double(), V0.double()
    gram = P.T @ P
    t = gram.shape[0]
    lam = ridge * float(torch.trace(gram)) / max(t, 1) + 1e-12
    lhs = gram + lam * torch.eye(t, dtype=gram.dtype, device=gram.device)
    rhs = P.T @ O + lam * V0
    L, info = torch.linalg.cholesky_ex(lhs)
    if int(info) != 0:
        return torch.linalg.lstsq(lhs, rhs).solution
    return torch.cholesky_solve(rhs, L)
