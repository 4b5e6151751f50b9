"""QJL residual sketch (TurboQuant_prod): 1-bit signs of a Gaussian projection of the residual.

Given x (..., n, d) and its MSE reconstruction x̂, the residual r = x − x̂ is stored as
sign(S r) ∈ {±1}^m (bit 1 = "≥ 0", pack_bits order, ceil(m/8) bytes per vector) and ‖r‖ (fp16),
with S an m×d matrix of iid N(0, 1) entries drawn from torch.Generator(seed) (float64, then used in
float32), so only the seed is stored. For every fixed q,
    ⟨q, x⟩ ≈ ⟨q, x̂⟩ + ‖r‖·√(π/2)/m · ⟨S q, sign(S r)⟩
is unbiased over S (E[⟨s, q⟩ sign⟨s, r⟩] = √(2/π)⟨q, r⟩/‖r‖ for s ~ N(0, I)), with variance
(π/2·‖q‖²‖r‖² − ⟨q, r⟩²)/m.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .bitpack import pack_bits, unpack_bits


def sketch_matrix(m: int, dim: int, seed: int) -> torch.Tensor:
    """The (m, dim) float32 Gaussian sketch S for `seed`."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(m, dim, generator=g, dtype=torch.float64).to(torch.float32)


@dataclass
class QJLCode:
    """signs: uint8 (..., n, ceil(m/8)) packed sign bits; rnorm: fp16 (..., n) residual norms."""

    signs: torch.Tensor
    rnorm: torch.Tensor
    m: int
    dim: int
    seed: int

    @property
    def nbytes(self) -> int:
        """Stored bytes: packed sign bits + fp16 residual norms (m, dim, seed are metadata)."""
        return self.signs.numel() + 2 * self.rnorm.numel()


def qjl_encode(x: torch.Tensor, x_hat: torch.Tensor, *, m: int | None = None, seed: int = 0) -> QJLCode:
    """x, x_hat: (..., d) finite, same shape. m: sketch rows (default d). Returns a QJLCode."""
    x, x_hat = torch.as_tensor(x), torch.as_tensor(x_hat)
    if x.shape != x_hat.shape or x.ndim == 0:
        shapes = f"{tuple(x.shape)} and {tuple(x_hat.shape)}"
        raise ValueError(f"qjl_encode: x and x_hat must share a shape (..., d), got {shapes}")
    if not (torch.isfinite(x).all() and torch.isfinite(x_hat).all()):
        raise ValueError("qjl_encode: input contains NaN or inf")
    d = x.shape[-1]
    m = d if m is None else int(m)
    if m < 1:
        raise ValueError(f"qjl_encode: m must be >= 1, got {m}")
    r = x.to(torch.float32) - x_hat.to(torch.float32)
    rnorm = torch.linalg.vector_norm(r, dim=-1).to(torch.float16)
    if torch.isinf(rnorm).any():
        raise ValueError("qjl_encode: a residual norm overflows fp16 (inputs too large)")
    proj = r @ sketch_matrix(m, d, seed).to(r.device).T
    return QJLCode(pack_bits((proj >= 0).to(torch.uint8), 1), rnorm, m, d, int(seed))


def qjl_signs(code: QJLCode) -> torch.Tensor:
    """±1 float32 signs (..., n, m)."""
    return unpack_bits(code.signs, 1, code.m).to(torch.float32) * 2 - 1


def qjl_correction(q: torch.Tensor, code: QJLCode) -> torch.Tensor:
    """Estimate of ⟨q_i, r_j⟩: q (..., nq, d), code over (..., n) vectors -> float32 (..., nq, n)."""
    q = torch.as_tensor(q)
    if q.shape[-1] != code.dim:
        raise ValueError(f"qjl_correction: queries have dim {q.shape[-1]}, the sketch is for {code.dim}")
    if not torch.isfinite(q).all():
        raise ValueError("qjl_correction: queries contain NaN or inf")
    sq = q.to(torch.float32) @ sketch_matrix(code.m, code.dim, code.seed).to(q.device).T  # (..., nq, m)
    scale = code.rnorm.to(torch.float32) * (math.sqrt(math.pi / 2) / code.m)  # (..., n)
    return (sq @ qjl_signs(code).to(q.device).transpose(-1, -2)) * scale.to(q.device).unsqueeze(-2)


def qjl_inner_product(q: torch.Tensor, x_hat: torch.Tensor, code: QJLCode) -> torch.Tensor:
    """Unbiased ⟨q_i, x_j⟩: q (..., nq, d), x_hat (..., n, d) -> float32 (..., nq, n)."""
    return q.to(torch.float32) @ x_hat.to(torch.float32).transpose(-1, -2) + qjl_correction(q, code)
