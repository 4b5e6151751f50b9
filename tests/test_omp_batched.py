"""Batched OMP-fast against a plain per-head greedy OMP with exact NNLS refits (scipy)."""
import numpy as np
import torch
from scipy.optimize import nnls

from compactor.fitting.key_selection import key_stats
from compactor.fitting.omp_batched import omp_select
from compactor.methods.batched import am_layer, omp_layer


def shares(B, n, T, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(2.5 * torch.randn(B, n, T, generator=g, dtype=torch.float64), -1)


def greedy_omp(A: np.ndarray, t: int) -> list[int]:
    """Reference: one key per step, the unchosen key of largest A^T r, exact NNLS on the chosen keys after each."""
    chosen, r = [], np.ones(A.shape[0])
    for _ in range(t):
        corr = A.T @ r
        corr[chosen] = -np.inf
        chosen.append(int(np.argmax(corr)))
        w, _ = nnls(A[:, chosen], np.ones(A.shape[0]), maxiter=1000)
        r = np.ones(A.shape[0]) - A[:, chosen] @ w
    return chosen


def test_one_key_per_step_matches_plain_greedy_omp():
    A = shares(3, 120, 40, 0)
    budgets = torch.tensor([6, 4, 6])
    idx, counts, w, m, A_sel = omp_select(A.float(), budgets, keys_per_step=1, refit_every=1, refit_iters=1500,
                                          final_iters=1500)
    assert counts.tolist() == budgets.tolist()
    for b in range(3):
        t = int(budgets[b])
        ref = greedy_omp(A[b].numpy(), t)
        assert idx[b, :t].tolist() == ref
        w_ref, _ = nnls(A[b].numpy()[:, ref], np.ones(120), maxiter=1000)
        np.testing.assert_allclose(w[b, :t].numpy(), w_ref, rtol=1e-2, atol=1e-3 * w_ref.max())
        assert (w[b, t:] == 0).all()
        torch.testing.assert_close(A_sel[b, :, :t], A[b, :, ref].float())
        torch.testing.assert_close(m[b], (A_sel[b] @ w[b]), rtol=1e-5, atol=1e-6)


def test_several_keys_per_step_respects_budgets_and_never_repeats():
    A = shares(2, 80, 50, 1)
    budgets = torch.tensor([13, 7])
    idx, counts, w, m, _ = omp_select(A.float(), budgets, keys_per_step=4, refit_every=2)
    assert counts.tolist() == [13, 7]
    for b in range(2):
        kept = idx[b, :int(budgets[b])]
        assert kept.unique().numel() == kept.numel()
        assert (w[b] >= 0).all() and (w[b, int(budgets[b]):] == 0).all()


def test_omp_fits_the_mass_better_than_highest_attention():
    """The point of OMP: at the same budget, a smaller mass residual on the reference queries than top-k + NNLS."""
    g = torch.Generator().manual_seed(2)
    H, T, D, n = 2, 120, 16, 300
    keys = torch.randn(H, T, D, generator=g)
    centers = keys[:, torch.randint(0, T, (10,), generator=g)]
    queries = 0.8 * centers[:, torch.randint(0, 10, (n,), generator=g)] + torch.randn(H, n, D, generator=g)
    values = torch.randn(H, T, D, generator=g)
    stats = key_stats(keys, values, queries, D ** -0.5)
    budgets = torch.full((H,), 12)
    omp = omp_layer(keys, values, queries, budgets, stats, D ** -0.5)
    am = am_layer(keys, values, queries, budgets, stats, stats.p_rms, D ** -0.5)

    def mass_err(layer, h):
        k = int(layer.lengths[h])
        s = D ** -0.5 * queries[h].double() @ layer.keys[h, :k].double().T + layer.beta[h, :k].double()
        return float(((torch.logsumexp(s, -1) - stats.lse[h].double()).exp() - 1).square().mean())

    for h in range(H):
        assert mass_err(omp, h) < 0.99 * mass_err(am, h)
