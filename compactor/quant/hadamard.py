"""Randomized Hadamard rotation over the last dim.

`make_rotation(dim, seed)` is fully determined by (dim, seed), so an artifact stores only the seed.
  * dim a power of two: R x = H · diag(s) · x / sqrt(dim), H the Sylvester Hadamard matrix and
    s ∈ {±1}^dim seeded random signs; applied with the O(d log d) butterfly `fwht`.
  * any other dim: R = Q, a seeded random orthogonal matrix (QR of a float64 Gaussian,
    columns sign-fixed by sign(diag(R)) so Q is Haar distributed and unique).
Both are orthogonal: `inverse(apply(x)) == x` up to rounding, and norms are preserved.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh–Hadamard transform over the last dim.

    x: (..., d) floating tensor, d a power of two. Returns H x / sqrt(d) with H the Sylvester
    Hadamard matrix (scipy.linalg.hadamard ordering), same shape and dtype. O(d log d).
    The transform is symmetric and its own inverse.
    """
    d = x.shape[-1]
    if not _is_pow2(d):
        raise ValueError(f"fwht needs a power-of-two last dim, got {d}")
    lead = x.shape[:-1]
    y = x.reshape(-1, d)
    h = 1
    while h < d:
        y = y.reshape(-1, d // (2 * h), 2, h)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(*lead, d) / math.sqrt(d)).to(x.dtype)


@dataclass(frozen=True)
class Rotation:
    """Orthogonal map of R^dim determined by (dim, seed); see module docstring.

    signs:  (dim,) ±1 float64 when dim is a power of two, else None.
    matrix: (dim, dim) float64 orthogonal Q when dim is not a power of two, else None.
    """

    dim: int
    seed: int
    signs: torch.Tensor | None
    matrix: torch.Tensor | None

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.dim:
            raise ValueError(f"rotation is for dim {self.dim}, got last dim {x.shape[-1]}")
        if not x.is_floating_point():
            raise ValueError(f"rotation needs a floating tensor, got {x.dtype}")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) -> R x, same shape and dtype."""
        self._check(x)
        if self.signs is not None:
            return fwht(x * self.signs.to(x.device, x.dtype))
        return x @ self.matrix.to(x.device, x.dtype).T

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """y: (..., dim) -> R^T y (= R^{-1} y), same shape and dtype."""
        self._check(y)
        if self.signs is not None:
            return fwht(y) * self.signs.to(y.device, y.dtype)
        return y @ self.matrix.to(y.device, y.dtype)

    def dense(self) -> torch.Tensor:
        """The (dim, dim) float64 matrix R (for tests and kernels)."""
        return self.apply(torch.eye(self.dim, dtype=torch.float64)).T


def make_rotation(dim: int, seed: int = 0) -> Rotation:
    """Build the rotation of R^dim for `seed` (CPU torch.Generator, so identical on every host)."""
    if dim < 1:
        raise ValueError(f"rotation dim must be >= 1, got {dim}")
    g = torch.Generator().manual_seed(int(seed))
    if _is_pow2(dim):
        signs = torch.randint(0, 2, (dim,), generator=g).to(torch.float64) * 2 - 1
        return Rotation(dim, int(seed), signs, None)
    gauss = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    q = q * torch.sign(torch.diagonal(r))
    return Rotation(dim, int(seed), None, q)
