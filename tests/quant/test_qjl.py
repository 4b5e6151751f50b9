import math

import pytest
import torch

from compactor.quant.lloyd_codec import lloyd_decode, lloyd_encode
from compactor.quant.qjl import qjl_correction, qjl_encode, qjl_inner_product, qjl_signs, sketch_matrix


def _setup(d=64, bits=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, d, generator=g)
    x_hat = lloyd_decode(lloyd_encode(x, bits))
    r = (x - x_hat)[0]
    # A query mostly along the residual: a large <q, r> makes a wrong scale factor visible.
    q = (2 * r / r.norm() + 0.5 * torch.randn(d, generator=g) / math.sqrt(d))[None, :]
    return x, x_hat, r, q


def _errors(x, x_hat, q, m, trials):
    truth = (q @ x.T).item()
    out = torch.empty(trials, dtype=torch.float64)
    for s in range(trials):
        out[s] = qjl_inner_product(q, x_hat, qjl_encode(x, x_hat, m=m, seed=s)).item() - truth
    return out


def test_unbiased_over_sketch_seeds():
    x, x_hat, r, q = _setup()
    err = _errors(x, x_hat, q, 64, 2000)
    se = err.std() / math.sqrt(err.numel())
    assert abs(err.mean().item()) < 3 * se.item()
    # Power: <q, r> is > 300 standard errors, so a 1% error in the √(π/2)/m scale would show
    # as a > 3 SE bias; and the MSE-only estimate <q, x_hat> would be off by all of it.
    assert abs((q @ r).item()) > 300 * se.item()


def test_variance_matches_closed_form_and_shrinks_as_1_over_m():
    x, x_hat, r, q = _setup()
    qn, rn, qr = q.norm().item(), r.half().float().norm().item(), (q @ r).item()
    variances = {}
    for m in (16, 128):
        var = _errors(x, x_hat, q, m, 1500).var().item()
        assert var == pytest.approx((math.pi / 2 * qn**2 * rn**2 - qr**2) / m, rel=0.15)
        variances[m] = var
    assert variances[16] / variances[128] == pytest.approx(8, rel=0.25)


def test_signs_and_bytes_by_hand():
    g = torch.Generator().manual_seed(1)
    x, x_hat = torch.randn(10, 64, generator=g), torch.randn(10, 64, generator=g)
    code = qjl_encode(x, x_hat, seed=3)
    assert code.m == 64 and code.signs.shape == (10, 8) and code.rnorm.dtype == torch.float16
    assert code.nbytes == 10 * 8 + 10 * 2
    s = sketch_matrix(64, 64, 3)
    assert torch.equal(qjl_signs(code), torch.where((x - x_hat) @ s.T >= 0, 1.0, -1.0))
    torch.testing.assert_close(code.rnorm.float(), (x - x_hat).norm(dim=-1), rtol=1e-3, atol=0)
    assert qjl_encode(x, x_hat, m=100).nbytes == 10 * 13 + 10 * 2  # ceil(100/8) = 13
    q = torch.randn(2, 3, 64, generator=g)  # leading dims broadcast: (2, 3 queries, 10 keys)
    assert qjl_correction(q, code).shape == (2, 3, 10)


def test_bad_inputs():
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="share a shape"):
        qjl_encode(x, x[:, :16])
    y = x.clone()
    y[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        qjl_encode(y, x)
    with pytest.raises(ValueError, match="m must be"):
        qjl_encode(x, x, m=0)
    code = qjl_encode(x, torch.zeros_like(x))
    with pytest.raises(ValueError, match="dim 16"):
        qjl_correction(torch.randn(2, 16), code)
    with pytest.raises(ValueError, match="NaN or inf"):
        qjl_correction(torch.full((1, 32), float("inf")), code)
