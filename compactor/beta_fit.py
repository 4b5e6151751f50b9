"""beta by non-negative least squares on the attention mass.

For one KV head with n reference queries and t kept keys, A[i, j] = exp(scale * q_i.c_j - lse_i) is kept key j's
share of query i's full-cache attention mass (lse_i: log of query i's total mass over all T keys), so the target
mass of every row is 1. We solve  min_w ||A w - 1||^2, w >= 0,  and set beta = log w.

The n x t problem is reduced to t x t with the same minimiser: A^T A = R^T R (Cholesky), and
||A w - y||^2 = ||R w - R^-T A^T y||^2 + const, then scipy's Lawson-Hanson NNLS runs on (R, R^-T A^T y).
Everything is float64; a small relative jitter on the Gram diagonal guards the factorisation.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import nnls


def nnls_normal(gram: np.ndarray, rhs: np.ndarray, jitter: float = 1e-12) -> np.ndarray:
    """argmin_{w>=0} w^T G w - 2 rhs^T w for a PSD Gram G (t, t) and rhs (t,), float64."""
    t = gram.shape[0]
    scale = max(float(np.trace(gram)) / max(t, 1), 1e-300)
    for attempt in range(6):
        try:
            r = np.linalg.cholesky(gram + (jitter * 100 ** attempt) * scale * np.eye(t)).T
            break
        except np.linalg.LinAlgError:
            continue
    else:
        raise np.linalg.LinAlgError("Gram matrix could not be factorised even with jitter")
    z = np.linalg.solve(r.T, rhs)
    w, _ = nnls(r, z, maxiter=max(50, 10 * t))
    return w


def fit_mass_weights(A: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """w >= 0 (t,) minimising ||A w - target||^2 for A (n, t); target defaults to all ones. Returns float64."""
    a = A.detach().double().cpu().numpy()
    y = np.ones(a.shape[0]) if target is None else target.detach().double().cpu().numpy()
    return torch.from_numpy(nnls_normal(a.T @ a, a.T @ y))
