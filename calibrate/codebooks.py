"""Empirical Lloyd-Max codebooks for the rotated coordinates the lloyd codec quantizes, and their error against the
analytic codebooks.

The codec (quant/lloyd_codec.py) centres each head's vectors on their mean, scales each to unit norm and rotates it
(randomized Hadamard); it then quantizes every coordinate with the Lloyd-Max codebook of a coordinate of a uniform
random unit vector (the Beta codebook). Real keys and values are not uniform directions (a few large channels,
shared directions left after centring), so their rotated coordinates have another distribution; a codebook fitted
to them (`quant.empirical_codebook`, weighted 1-D Lloyd) lowers the error at the same bits. `codebook_mse` compares
the fitted, the Beta and the Gaussian (N(0, 1/d), the large-d limit) codebooks on held-out coordinates.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..quant import beta_codebook, dequantize_scalar, empirical_codebook, gaussian_codebook, make_rotation
from ..quant.lloyd_max import quantize_scalar

MAX_FIT_SAMPLES = 100_000  # coordinates per fit or error estimate (a seeded random subset beyond that)


def rotated_coordinates(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """x (H, n, d) one head's vectors per row block -> (H·n·d,) float32 coordinates of R (x − mean_h)/‖x − mean_h‖,
    as the lloyd codec quantizes them (mean over each head's n vectors; zero vectors dropped)."""
    x = x.float()
    x = x - x.mean(-2, keepdim=True)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    keep = norm[..., 0] > 0
    unit = x[keep] / norm[keep]
    return make_rotation(x.shape[-1], seed).apply(unit).reshape(-1)


def subsample(x: torch.Tensor, cap: int, seed: int) -> torch.Tensor:
    if x.numel() <= cap:
        return x
    g = torch.Generator().manual_seed(seed)
    return x[torch.randperm(x.numel(), generator=g)[:cap]]


def fit_codebook(coords: torch.Tensor, bits: int, dim: int, seed: int = 0) -> np.ndarray:
    """(2^bits,) float32 ascending centroids in [-1, 1] fitted to the coordinates (strictly increasing: ties from
    few distinct samples are spread by the smallest float32 steps)."""
    book = empirical_codebook(subsample(coords, MAX_FIT_SAMPLES, seed), bits, seed=seed, dim=dim)
    c = np.clip(book.centroids.numpy(), -1, 1).astype(np.float32)
    for i in range(1, c.size):  # float32 rounding (or a repeated last value) must not break strict order
        if c[i] <= c[i - 1]:
            c[i] = np.nextafter(c[i - 1], np.float32(2))
    if c[-1] > 1:
        raise ValueError("fitted codebook does not fit in [-1, 1] (too few distinct coordinates)")
    return c


def analytic_codebooks(bits: int, dim: int) -> dict[str, np.ndarray]:
    """The Beta (unit-vector coordinate in R^dim) and Gaussian N(0, 1/dim) Lloyd-Max centroids."""
    return {"beta": beta_codebook(bits, dim).centroids.numpy(),
            "gaussian": gaussian_codebook(bits).centroids.numpy() / math.sqrt(dim)}


def codebook_mse(coords: torch.Tensor, centroids: np.ndarray) -> float:
    """Mean squared error of quantizing the coordinates to the nearest of the ascending centroids."""
    from ..quant.lloyd_max import Codebook

    c = torch.from_numpy(np.asarray(centroids, dtype=np.float64))
    book = Codebook(c, (c[1:] + c[:-1]) / 2, float("nan"), None)
    y = coords.double()
    return float(((dequantize_scalar(quantize_scalar(y, book), book, torch.float64) - y) ** 2).mean())
