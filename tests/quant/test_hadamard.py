import math

import numpy as np
import pytest
import scipy.linalg
import torch

from compactor.quant.hadamard import fwht, make_rotation


@pytest.mark.parametrize("d", [1, 2, 4, 8, 32, 64, 128, 256])
def test_fwht_matches_scipy_hadamard(d):
    x = torch.randn(3, 5, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
    ref = x.numpy() @ scipy.linalg.hadamard(d).T / math.sqrt(d)
    np.testing.assert_allclose(fwht(x).numpy(), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(fwht(fwht(x)), x, rtol=0, atol=1e-12)  # symmetric and orthonormal


def test_fwht_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.zeros(4, 96))


def test_power_of_two_rotation_is_hadamard_times_signs():
    rot = make_rotation(64, seed=7)
    s = rot.signs.numpy()
    assert set(np.unique(s)) == {-1.0, 1.0}
    ref = scipy.linalg.hadamard(64) * s[None, :] / 8.0  # H diag(s) / sqrt(d)
    np.testing.assert_allclose(rot.dense().numpy(), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("d", [64, 128, 96, 80, 3])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
def test_rotation_orthogonal_and_exact_inverse(d, dtype, tol):
    rot = make_rotation(d, seed=123)
    m = rot.dense()
    torch.testing.assert_close(m @ m.T, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-12)
    x = torch.randn(2, 3, 5, d, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = rot.apply(x)
    assert y.shape == x.shape and y.dtype == dtype
    torch.testing.assert_close(y.double(), x.double() @ m.T, rtol=0, atol=10 * tol)
    torch.testing.assert_close(rot.inverse(y), x, rtol=0, atol=tol)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=tol, atol=0)


def test_rotation_determined_by_dim_and_seed():
    for d in (128, 96):
        a, b, c = make_rotation(d, 5), make_rotation(d, 5), make_rotation(d, 6)
        assert torch.equal(a.dense(), b.dense())
        assert not torch.allclose(a.dense(), c.dense())


def test_non_power_of_two_rotation_is_sign_fixed_qr():
    # Independent rebuild: same generator draws, numpy QR, columns made to have R_ii > 0.
    d, seed = 48, 11
    g = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()
    q, r = np.linalg.qr(g)
    q = q * np.sign(np.diag(r))
    np.testing.assert_allclose(make_rotation(d, seed).matrix.numpy(), q, rtol=0, atol=1e-12)


def test_rotation_dim_mismatch():
    with pytest.raises(ValueError, match="dim 64"):
        make_rotation(64, 0).apply(torch.zeros(2, 32))
