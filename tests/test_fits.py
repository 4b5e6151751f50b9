"""beta by NNLS and values by ridge LS, against independent float64 references."""
import numpy as np
import pytest
import torch
from scipy.optimize import nnls

from compactor.fitting.beta_fit import fit_mass_weights, nnls_active_set, nnls_normal
from compactor.fitting.value_fit import fit_values


def attention_like(n, t, seed):
    g = torch.Generator().manual_seed(seed)
    s = 3 * torch.randn(n, t, generator=g, dtype=torch.float64)
    return torch.exp(s - s.max(1, keepdim=True).values) * 0.5


@pytest.mark.parametrize("n,t,seed", [(200, 20, 0), (500, 64, 1), (300, 150, 2)])
def test_nnls_reduced_matches_scipy_on_full_system(n, t, seed):
    A = attention_like(n, t, seed)
    y = torch.ones(n, dtype=torch.float64)
    y[: n // 3] = 0.05  # some rows want less mass than the kept keys give: forces active constraints
    w = fit_mass_weights(A, y).numpy()
    ref, _ = nnls(A.numpy(), y.numpy(), maxiter=50 * t)
    assert (w >= 0).all()
    assert (w == 0).any()  # the constraint is active somewhere
    obj = lambda x: float(np.sum((A.numpy() @ x - y.numpy()) ** 2))
    assert obj(w) <= obj(ref) * (1 + 1e-9) + 1e-12
    np.testing.assert_allclose(w, ref, rtol=1e-5, atol=1e-7)


def test_nnls_kkt_conditions():
    A = attention_like(400, 40, 3).numpy()
    y = np.linspace(0.1, 1.5, 400)
    G, b = A.T @ A, A.T @ y
    w = nnls_normal(G, b)
    grad = G @ w - b  # KKT: grad >= 0 where w == 0, grad == 0 where w > 0
    assert np.all(grad[w == 0] >= -1e-8)
    assert np.allclose(grad[w > 0], 0, atol=1e-8)


def test_nnls_recovers_exact_weights():
    A = attention_like(300, 25, 4)
    w_true = torch.rand(25, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5
    w = fit_mass_weights(A, A @ w_true)
    assert torch.allclose(w, w_true, rtol=1e-6)


def test_nnls_singular_gram_is_guarded():
    A = attention_like(100, 10, 6)
    A = torch.cat([A, A[:, :3]], 1)  # duplicated columns: singular Gram
    w = fit_mass_weights(A)
    assert torch.isfinite(w).all() and (w >= 0).all()
    w10 = fit_mass_weights(A[:, :10])  # the same column space without the copies
    assert float(((A @ w - 1) ** 2).sum()) <= float(((A[:, :10] @ w10 - 1) ** 2).sum()) * (1 + 1e-6)


@pytest.mark.parametrize("ridge", [0.0, 1e-3, 1e-1])
def test_value_fit_matches_augmented_lstsq(ridge):
    g = torch.Generator().manual_seed(7)
    n, t, d = 300, 30, 16
    P = torch.softmax(2 * torch.randn(n, t, generator=g, dtype=torch.float64), -1)
    O = torch.randn(n, d, generator=g, dtype=torch.float64)
    V0 = torch.randn(t, d, generator=g, dtype=torch.float64)
    X = fit_values(P, O, V0, ridge=ridge)
    lam = ridge * float(torch.trace(P.T @ P)) / t + 1e-12
    # independent reference: least squares on the stacked system [P; sqrt(lam) I] X = [O; sqrt(lam) V0]
    Aug = torch.cat([P, lam ** 0.5 * torch.eye(t, dtype=torch.float64)])
    rhs = torch.cat([O, lam ** 0.5 * V0])
    ref = torch.linalg.lstsq(Aug, rhs, driver="gelsd").solution
    assert torch.allclose(X, ref, rtol=1e-6, atol=1e-8)


def test_value_fit_exact_when_consistent():
    g = torch.Generator().manual_seed(8)
    P = torch.softmax(torch.randn(200, 12, generator=g, dtype=torch.float64), -1)
    X_true = torch.randn(12, 8, generator=g, dtype=torch.float64)
    X = fit_values(P, P @ X_true, torch.zeros(12, 8, dtype=torch.float64), ridge=1e-9)
    assert torch.allclose(X, X_true, atol=1e-4)


@pytest.mark.parametrize("n,t,seed", [(200, 20, 0), (500, 64, 1), (800, 150, 2), (1500, 400, 9)])
def test_active_set_nnls_matches_scipy(n, t, seed):
    """The device solver (run here on CPU tensors) finds the same minimiser as scipy's Lawson-Hanson."""
    A = attention_like(n, t, seed)
    y = torch.ones(n, dtype=torch.float64)
    y[: n // 4] = 0.1
    G, b = A.T @ A, A.T @ y
    w = nnls_active_set(G, b)
    assert w is not None
    ref = nnls_normal(G.numpy(), b.numpy())
    obj = lambda x: float(((A @ x - y) ** 2).sum())
    assert obj(w) <= obj(torch.from_numpy(ref)) * (1 + 1e-9) + 1e-12
    assert torch.allclose(w, torch.from_numpy(ref), rtol=1e-5, atol=1e-7)
