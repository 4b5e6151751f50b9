"""Batched beta/value fits and the batched per-layer AM/eviction, against the exact per-head solvers."""
import math

import numpy as np
import pytest
import torch
from scipy.optimize import nnls

import compactor.fitting.batched_fits as bf
from compactor.fitting.batched_fits import BatchedFitInfo, nnls_batched, ridge_values_batched
from compactor.fitting.key_selection import key_stats, top_keys
from compactor.fitting.value_fit import fit_values
from compactor.methods import make_method
from compactor.methods.batched import am_layer, evict_layer, select_top_keys


def shares(B, n, t, seed):
    """Attention-like mass shares: each row a softmax share, columns of very different weight."""
    g = torch.Generator().manual_seed(seed)
    s = 2.5 * torch.randn(B, n, t + 20, generator=g, dtype=torch.float64)
    p = torch.softmax(s, -1)
    return p[..., :t].contiguous()


def objective(A, w, y, c=None):
    r = A @ w - y
    return float(((r * r) if c is None else (c * r * r)).sum())


@pytest.mark.parametrize("gram", [False, True])
def test_nnls_converges_to_the_exact_minimiser(gram):
    B, n, t = 3, 300, 12
    A = shares(B, n, t, 0)
    y = torch.ones(n, dtype=torch.float64)
    y[:60] = 0.05  # some rows want less mass than the kept keys give: active constraints
    mask = torch.ones(B, t, dtype=torch.bool)
    w, m = nnls_batched(A.float(), mask, target=y, iters=1500, gram=gram)
    for b in range(B):
        ref, _ = nnls(A[b].numpy(), y.numpy(), maxiter=100 * t)
        assert (w[b] >= 0).all()
        f, f_ref = objective(A[b], w[b].double(), y), objective(A[b], torch.from_numpy(ref), y)
        assert f <= f_ref * (1 + 1e-4)
        np.testing.assert_allclose(w[b].numpy(), ref, rtol=2e-2, atol=2e-3 * ref.max())
    torch.testing.assert_close(m, torch.bmm(A.float(), w[..., None])[..., 0], rtol=1e-5, atol=1e-6)


def test_nnls_default_iterations_close_and_never_worse_than_the_warm_start():
    B, n, t = 4, 400, 30
    A = shares(B, n, t, 1)
    mask = torch.ones(B, t, dtype=torch.bool)
    w, _ = nnls_batched(A.float(), mask)
    y = torch.ones(n, dtype=torch.float64)
    for b in range(B):
        ref, _ = nnls(A[b].numpy(), y.numpy(), maxiter=100 * t)
        f_ref = objective(A[b], torch.from_numpy(ref), y)
        m = A[b].sum(1)
        f0 = objective(A[b], float(m.sum() / (m * m).sum()) * torch.ones(t, dtype=torch.float64), y)
        f = objective(A[b], w[b].double(), y)
        assert f <= f0 and (f - f_ref) <= 0.1 * (f0 - f_ref)  # most of the way from the warm start


@pytest.mark.parametrize("gram", [False, True])
def test_nnls_padding_and_query_weights(gram):
    """Padded keys get w = 0 and change nothing; integer query weights equal duplicated rows."""
    n, t = 200, 10
    A = shares(1, n, t, 2).float()
    c = torch.randint(1, 4, (n,))
    dup = A[0].repeat_interleave(c, 0)[None]
    w_dup, _ = nnls_batched(dup, torch.ones(1, t, dtype=torch.bool), iters=2000, gram=gram)
    w_c, _ = nnls_batched(A, torch.ones(1, t, dtype=torch.bool), query_weights=c.float(), iters=2000, gram=gram)
    torch.testing.assert_close(w_c, w_dup, rtol=1e-3, atol=1e-4)
    padded = torch.cat([A, torch.rand(1, n, 5)], 2)  # 5 junk columns beyond the head's keys
    mask = torch.arange(t + 5)[None] < t
    w_p, _ = nnls_batched(padded, mask, query_weights=c.float(), iters=2000, gram=gram)
    assert (w_p[0, t:] == 0).all()
    torch.testing.assert_close(w_p[:, :t], w_c, rtol=1e-3, atol=1e-4)


def test_nnls_guard_falls_back_to_the_exact_solver(monkeypatch):
    """A step far too long diverges: the guard notices (objective above the warm start) and refits exactly."""
    monkeypatch.setattr(bf, "_lipschitz", lambda apply, live, iters=3: torch.full((live.shape[0],), 1e-3))
    A = shares(2, 300, 15, 3)
    info = BatchedFitInfo()
    w, _ = nnls_batched(A.float(), torch.ones(2, 15, dtype=torch.bool), info=info)
    assert info.beta_fallback == 2
    for b in range(2):
        ref, _ = nnls(A[b].numpy(), np.ones(300), maxiter=1500)
        np.testing.assert_allclose(w[b].numpy(), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("gram", [False, True])
def test_ridge_values_match_the_exact_ridge_fit(gram):
    B, n, t, d = 2, 300, 20, 16
    g = torch.Generator().manual_seed(4)
    A = shares(B, n, t, 4)
    w = torch.rand(B, t, generator=g, dtype=torch.float64) + 0.5
    w[0, 3] = 0  # a dropped key: keeps V0, fits nothing
    O = torch.randn(B, n, d, generator=g, dtype=torch.float64)
    V0 = torch.randn(B, t, d, generator=g, dtype=torch.float64)
    c = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    info = BatchedFitInfo()
    X = ridge_values_batched(A.float(), w.float(), O.float(), V0.float(), 1e-3, query_weights=c.float(),
                             iters=400, info=info, gram=gram)
    assert info.value_fallback == 0
    for b in range(B):
        keep = w[b] > 0
        m = A[b] @ w[b]
        P = A[b][:, keep] * w[b, keep] / m[:, None]
        ref = fit_values(c.sqrt()[:, None] * P, c.sqrt()[:, None] * O[b], V0[b, keep], 1e-3)
        torch.testing.assert_close(X[b, keep].double(), ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))
    assert torch.equal(X[0, 3], V0[0, 3].float())


@pytest.mark.parametrize("gram", [False, True])
def test_ridge_values_guard(monkeypatch, gram):
    """A value solve that blows up (non-finite) is redone by the exact float64 fit."""
    B, n, t, d = 1, 200, 8, 4
    A = shares(B, n, t, 5)
    w = torch.ones(B, t, dtype=torch.float64)
    O = torch.randn(B, n, d, dtype=torch.float64)
    V0 = torch.randn(B, t, d, dtype=torch.float64)
    real = bf.shares_t_matmul
    monkeypatch.setattr(bf, "shares_t_matmul", lambda A, R, square=False: real(A, R, square) * float("nan")
                        if R.shape[-1] == d and not square else real(A, R, square))
    info = BatchedFitInfo()
    X = ridge_values_batched(A.float(), w.float(), O.float(), V0.float(), 1e-3, info=info, gram=gram)
    assert info.value_fallback == 1
    m = A[0] @ w[0]
    ref = fit_values(A[0] * w[0] / m[:, None], O[0], V0[0], 1e-3)
    torch.testing.assert_close(X[0].double(), ref, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# the batched layer against the per-head methods
# ------------------------------------------------------------------------------------------------

D, T = 16, 90


def layer(H=3, n=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(H, T, D, generator=g)
    keys[:, :3] *= 3
    centers = keys[:, torch.randint(0, T, (6,), generator=g)]
    queries = 2 * centers[:, torch.randint(0, 6, (n,), generator=g)] + torch.randn(H, n, D, generator=g)
    values = torch.randn(H, T, D, generator=g)
    return keys, values, queries


def test_select_top_keys_matches_per_head_top_keys():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(4, 50, generator=g)
    budgets = torch.tensor([5, 50, 1, 17])
    idx, counts = select_top_keys(scores, budgets)
    assert idx.shape == (4, 50) and counts.tolist() == budgets.tolist()
    for h in range(4):
        assert torch.equal(idx[h, :budgets[h]], top_keys(scores[h], int(budgets[h])))


@pytest.mark.parametrize("causal", [False, True])
def test_batched_layer_matches_the_per_head_methods(causal):
    """Eviction exactly; AM with many iterations to the per-head exact fits (same keys dropped, same beta, values)."""
    keys, values, queries = layer()
    H, n = keys.shape[0], queries.shape[1]
    scale = D ** -0.5
    qpos = torch.sort(torch.randint(0, T, (n,), generator=torch.Generator().manual_seed(3))).values if causal \
        else None
    stats = key_stats(keys, values, queries, scale, qpos)
    budgets = torch.tensor([12, 30, T])  # the last head keeps everything: the identity
    ev = evict_layer(keys, values, stats.p_rms, budgets, stats.p_rms)
    am = make_method("am", context="causal" if causal else "full")
    batched = am_layer(keys, values, queries, budgets, stats, stats.p_rms, scale, qpos, beta_iters=1200,
                       value_iters=300)
    for h in range(H):
        ctx = dict(scale=scale, query_pos=qpos, stats=type(stats)(*(x[h] for x in stats)))
        ref = make_method("eviction").compact(keys[h], values[h], queries[h], int(budgets[h]), **ctx)
        k = int(ev.lengths[h])
        assert torch.equal(ev.positions[h, :k], ref.positions) and (ev.positions[h, k:] == -1).all()
        assert torch.equal(ev.keys[h, :k], ref.keys) and torch.equal(ev.values[h, :k], ref.values)
        ref = am.compact(keys[h], values[h], queries[h], int(budgets[h]), **ctx)
        k = int(batched.lengths[h])
        assert torch.equal(batched.positions[h, :k], ref.positions)
        assert torch.equal(batched.keys[h, :k], ref.keys)
        torch.testing.assert_close(batched.beta[h, :k], ref.beta, rtol=0, atol=2e-2)
        torch.testing.assert_close(batched.values[h, :k], ref.values, rtol=0, atol=2e-2)
        assert (batched.beta[h, k:] == 0).all() and (batched.positions[h, k:] == -1).all()
    assert int(batched.lengths[2]) == T and (batched.beta[2] == 0).all() and torch.equal(batched.values[2], values[2])


def test_batched_layer_fidelity_close_to_exact_with_default_iterations():
    """Held-out attention error of the batched fits (default iterations, float16 shares) within a few percent of
    the exact per-head fits."""
    keys, values, queries = layer(H=4, n=400, seed=5)
    held = layer(H=4, n=200, seed=5)[2][:, ::1] + 0.3 * torch.randn(4, 200, D)
    scale = D ** -0.5
    stats = key_stats(keys, values, queries, scale)
    budgets = torch.full((4,), math.ceil(T / 5))
    fast = am_layer(keys, values, queries, budgets, stats, stats.p_rms, scale, share_dtype=torch.float16)
    from compactor.evaluation.metrics import head_fidelity
    errs = {"fast": [], "exact": []}
    for h in range(4):
        ctx = dict(scale=scale, stats=type(stats)(*(x[h] for x in stats)))
        ref = make_method("am").compact(keys[h], values[h], queries[h], int(budgets[h]), **ctx)
        k = int(fast.lengths[h])
        errs["fast"].append(head_fidelity(held[h], keys[h], values[h], fast.keys[h, :k], fast.beta[h, :k],
                                          fast.values[h, :k], scale)[0])
        errs["exact"].append(head_fidelity(held[h], keys[h], values[h], ref.keys, ref.beta, ref.values, scale)[0])
    assert np.mean(errs["fast"]) <= 1.05 * np.mean(errs["exact"])
