import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from compactor.quant.lloyd_max import (
    beta_codebook,
    dequantize_scalar,
    empirical_codebook,
    gaussian_codebook,
    quantize_scalar,
)

# Published Lloyd-Max MSE for N(0,1) (Max 1960) and TurboQuant's d=128 table.
GAUSS_MSE = {1: 0.363380, 2: 0.117482, 3: 0.034548, 4: 0.009501}
BETA128_DMSE = {1: 0.3609, 2: 0.1160, 3: 0.0340, 4: 0.00931}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_gaussian_mse_table(bits):
    assert gaussian_codebook(bits).mse == pytest.approx(GAUSS_MSE[bits], abs=1e-5)


def test_gaussian_one_bit_centroids():
    c = gaussian_codebook(1).centroids.numpy()
    np.testing.assert_allclose(c, [-math.sqrt(2 / math.pi), math.sqrt(2 / math.pi)], rtol=0, atol=1e-12)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_beta_dim128_table(bits):
    assert 128 * beta_codebook(bits, 128).mse == pytest.approx(BETA128_DMSE[bits], rel=5e-3)


@pytest.mark.parametrize("dim", [64, 128, 256])
def test_beta_turboquant_bound(dim):
    for bits in range(1, 9):
        dmse = dim * beta_codebook(bits, dim).mse
        assert 4.0**-bits <= dmse <= math.sqrt(3) * math.pi / 2 * 4.0**-bits


def _check_by_quadrature(cb, pdf, lo, hi):
    """Centroid condition and mse by scipy numerical integration, cell by cell."""
    c, b = cb.centroids.numpy(), cb.boundaries.numpy()
    edges = np.concatenate(([lo], b, [hi]))
    mse = 0.0
    for i in range(c.size):
        a, z = edges[i], edges[i + 1]
        m0 = integrate.quad(pdf, a, z, epsabs=1e-14, epsrel=1e-12)[0]
        m1 = integrate.quad(lambda t: t * pdf(t), a, z, epsabs=1e-14, epsrel=1e-12)[0]
        mse += integrate.quad(lambda t: (t - c[i]) ** 2 * pdf(t), a, z, epsabs=1e-14, epsrel=1e-12)[0]
        assert c[i] == pytest.approx(m1 / m0, rel=1e-8, abs=1e-12)
    assert cb.mse == pytest.approx(mse, rel=1e-7)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_gaussian_codebook_by_quadrature(bits):
    _check_by_quadrature(gaussian_codebook(bits), stats.norm.pdf, -np.inf, np.inf)


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_beta_codebook_by_quadrature(bits):
    a = (128 - 1) / 2  # (x + 1)/2 ~ Beta(a, a)
    _check_by_quadrature(beta_codebook(bits, 128), lambda x: stats.beta.pdf((x + 1) / 2, a, a) / 2, -1.0, 1.0)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_beta_dim3_is_uniform(bits):
    # A coordinate of a uniform point on S^2 is uniform on [-1, 1] (Archimedes): the Lloyd-Max
    # quantizer is uniform with cells of width 2/n and mse (2/n)^2/12.
    n = 2**bits
    cb = beta_codebook(bits, 3)
    np.testing.assert_allclose(cb.centroids.numpy(), -1 + (2 * np.arange(n) + 1) / n, rtol=0, atol=1e-9)
    assert cb.mse == pytest.approx((2 / n) ** 2 / 12, rel=1e-9)


def test_beta_approaches_gaussian_in_high_dim():
    # sqrt(dim)·X -> N(0, 1) as dim grows.
    for bits in (1, 3):
        c = beta_codebook(bits, 20000).centroids * math.sqrt(20000)
        torch.testing.assert_close(c, gaussian_codebook(bits).centroids, rtol=0, atol=2e-3)


def test_beta_mse_matches_monte_carlo_on_the_sphere():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(20000, 128, dtype=torch.float64, generator=g)
    u = u / u.norm(dim=-1, keepdim=True)
    for bits in (2, 4):
        cb = beta_codebook(bits, 128)
        err = (dequantize_scalar(quantize_scalar(u, cb), cb, torch.float64) - u).pow(2).sum(-1).mean()
        assert err.item() == pytest.approx(128 * cb.mse, rel=0.01)


def test_codebook_structure():
    for cb in (gaussian_codebook(3), beta_codebook(5, 96)):
        c, b = cb.centroids, cb.boundaries
        assert c.dtype == torch.float64 and c.numel() == 2 ** cb.bits and b.numel() == c.numel() - 1
        assert torch.all(torch.diff(c) > 0)
        torch.testing.assert_close(b, (c[1:] + c[:-1]) / 2, rtol=0, atol=0)
        torch.testing.assert_close(c, -c.flip(0), rtol=0, atol=1e-15)
    assert beta_codebook(2, 96).dim == 96 and gaussian_codebook(2).dim is None


def test_empirical_codebook_approaches_gaussian():
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.cat((x, -x))  # symmetric sample: the flat shift mode of the optimum stays at 0
    for bits in (2, 3, 6):
        cb, ref = empirical_codebook(x, bits), gaussian_codebook(bits)
        if bits <= 3:  # at 6 bits the extreme tail cells hold only a few dozen samples
            torch.testing.assert_close(cb.centroids, ref.centroids, rtol=0, atol=0.01)
        assert cb.mse == pytest.approx(ref.mse, rel=0.02)
        recomputed = (dequantize_scalar(quantize_scalar(x, cb), cb, torch.float64) - x).pow(2).mean().item()
        assert cb.mse == pytest.approx(recomputed, rel=1e-9)
        # On its own sample the fitted codebook is at least as good as the Lloyd-Max one.
        on_sample = (dequantize_scalar(quantize_scalar(x, ref), ref, torch.float64) - x).pow(2).mean().item()
        assert recomputed <= on_sample * (1 + 1e-9)


def test_empirical_codebook_matches_beta_on_sphere_coordinates():
    u = torch.randn(4000, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    u = u / u.norm(dim=-1, keepdim=True)
    cb, ref = empirical_codebook(u, 4, dim=64), beta_codebook(4, 64)
    assert cb.dim == 64
    assert 64 * cb.mse == pytest.approx(64 * ref.mse, rel=0.02)
    torch.testing.assert_close(cb.centroids, ref.centroids, rtol=0, atol=0.01)


def test_empirical_weighted_equals_repeated():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(300)
    w = rng.integers(0, 5, size=300)
    a = empirical_codebook(torch.tensor(x), 3, weights=torch.tensor(w, dtype=torch.float64))
    b = empirical_codebook(torch.tensor(np.repeat(x, w)), 3)
    torch.testing.assert_close(a.centroids, b.centroids, rtol=0, atol=1e-12)
    assert a.mse == pytest.approx(b.mse, rel=1e-9)


def test_empirical_few_distinct_values():
    cb = empirical_codebook(torch.tensor([1.0, 1.0, 2.0, 2.0, 2.0]), 3)
    assert torch.isfinite(cb.centroids).all() and cb.centroids.numel() == 8 and cb.mse == 0.0
    assert torch.all(torch.diff(cb.centroids) >= 0)
    x = torch.tensor([2.0, 1.0, 2.0])
    assert torch.equal(dequantize_scalar(quantize_scalar(x, cb), cb), x)
    # Heavy point mass plus a few values: more distinct values than levels, quantile init collides.
    x = torch.tensor([0.0] * 1000 + [1.0, 2.0, 3.0, 4.0, 5.0])
    cb = empirical_codebook(x, 2)
    assert torch.isfinite(cb.centroids).all() and torch.all(torch.diff(cb.centroids) > 0)
    err = (dequantize_scalar(quantize_scalar(x, cb), cb, torch.float64) - x.double()).pow(2).mean()
    assert cb.mse == pytest.approx(err.item(), rel=1e-9)
    assert cb.mse <= 2.0 / 1005 + 1e-12  # e.g. {0, 1.5, 3.5, 5}: four points off by 1/2


def test_quantize_scalar_picks_nearest_centroid():
    cb = beta_codebook(4, 128)
    x = torch.randn(5000, generator=torch.Generator().manual_seed(3)) * 0.15
    codes = quantize_scalar(x, cb)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    brute = (x.double()[:, None] - cb.centroids[None, :]).abs().argmin(-1)
    assert torch.equal(codes.long(), brute)


def test_bad_inputs():
    for bits in (0, 9, 2.5, True):
        with pytest.raises(ValueError, match="bits"):
            gaussian_codebook(bits)
        with pytest.raises(ValueError, match="bits"):
            beta_codebook(bits, 128)
        with pytest.raises(ValueError, match="bits"):
            empirical_codebook(torch.randn(100), bits)
    with pytest.raises(ValueError, match="dim"):
        beta_codebook(2, 2)
    with pytest.raises(ValueError, match="NaN"):
        empirical_codebook(torch.tensor([1.0, float("nan"), 2.0]), 1)
    with pytest.raises(ValueError, match="NaN"):
        empirical_codebook(torch.tensor([1.0, 3.0]), 1, weights=torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match="weights"):
        empirical_codebook(torch.tensor([1.0, 3.0]), 1, weights=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="NaN"):
        quantize_scalar(torch.tensor([0.0, float("inf")]), gaussian_codebook(2))
    with pytest.raises(ValueError, match="codes"):
        dequantize_scalar(torch.tensor([4], dtype=torch.uint8), gaussian_codebook(2))
