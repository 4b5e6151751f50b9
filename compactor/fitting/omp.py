"""Key selection by orthogonal matching pursuit on the attention mass (the paper's AM-OMP), batched over heads.

For B independent heads with mass matrices A (B, n, T) (A[b, i, j]: key j's share of query i's full attention mass,
so every row's target is 1) and query weights u (n,), greedily grow a key set S per head:
    residual r = 1 - A_S w_S;  pick the k keys with the largest correlation A_j^T (u * r) not yet chosen;
    every `refit` steps, w_S = argmin_{w >= 0} sum_i u_i (A_S w - 1)_i^2 (NNLS), r updated.
k = 1, refit = 1 is plain OMP; larger k / refit is OMP-fast (several keys per step, a refit every few steps).
Everything is a tensor operation over the batch: the Gram matrix of S grows by appended columns, and the NNLS
refits are a batched primal-dual active-set solve (beta_fit.nnls_active_set, one problem per head, the same method);
a head whose active set does not settle falls back to scipy's NNLS.
"""
from __future__ import annotations

import torch

from .beta_fit import nnls_normal


def nnls_batched(gram: torch.Tensor, rhs: torch.Tensor, max_iter: int = 60, jitter: float = 1e-12
                 ) -> torch.Tensor:
    """argmin_{w>=0} 1/2 w^T G w - rhs^T w for B problems at once: gram (B, s, s), rhs (B, s), float64."""
    B, s, _ = gram.shape
    diag = gram.diagonal(dim1=1, dim2=2)
    G = gram + (jitter * diag.mean(1).clamp_min(1e-300))[:, None, None] * torch.eye(s, dtype=gram.dtype,
                                                                                     device=gram.device)
    eye = torch.eye(s, dtype=G.dtype, device=G.device).expand(B, s, s)
    free = torch.ones(B, s, dtype=torch.bool, device=G.device)
    done = torch.zeros(B, dtype=torch.bool, device=G.device)
    w = torch.zeros(B, s, dtype=G.dtype, device=G.device)
    scale = rhs.abs().amax(1).clamp_min(1e-300)
    for _ in range(max_iter):
        m = free.to(G.dtype)
        L, info = torch.linalg.cholesky_ex(G * m[:, :, None] * m[:, None, :] + eye * (1 - m)[:, None, :])
        ok = info == 0
        sol = torch.cholesky_solve((rhs * m)[..., None], torch.where(ok[:, None, None], L, eye))[..., 0]
        w = torch.where(done[:, None], w, sol)
        lam = (G @ w[..., None])[..., 0] - rhs
        new_free = (w - lam) > 0
        settled = (new_free == free).all(1) & ok
        done = done | settled
        if bool(done.all()):
            break
        free = torch.where(done[:, None], free, new_free)
    good = done & (w >= -1e-9 * scale[:, None]).all(1)
    w = w.clamp_min(0)
    for b in (~good).nonzero().flatten().tolist():  # the rare head that did not settle: exact scipy NNLS
        w[b] = torch.from_numpy(nnls_normal(gram[b].cpu().numpy(), rhs[b].cpu().numpy())).to(w)
    return w


def omp_select_batched(A: torch.Tensor, budget: int, keys_per_step: int = 1, refit_every: int = 1,
                       weights: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (B, budget) of the keys OMP picks for A (B, n, T) (float64 recommended), sorted by position."""
    B, n, T = A.shape
    budget = min(int(budget), T)
    A = A.double()
    u = torch.ones(n, dtype=A.dtype, device=A.device) if weights is None else weights.to(A.device, A.dtype)
    Au = A * u[None, :, None]
    y = torch.ones(B, n, dtype=A.dtype, device=A.device)
    b_idx = torch.arange(B, device=A.device)[:, None]
    chosen = torch.zeros(B, T, dtype=torch.bool, device=A.device)
    S = torch.empty(B, 0, dtype=torch.int64, device=A.device)
    gram = torch.empty(B, 0, 0, dtype=A.dtype, device=A.device)
    rhs = torch.empty(B, 0, dtype=A.dtype, device=A.device)
    r = y.clone()
    step = 0
    while S.shape[1] < budget:
        k = min(keys_per_step, budget - S.shape[1])
        corr = torch.einsum("bnt,bn->bt", Au, r).masked_fill(chosen, float("-inf"))
        new = torch.topk(corr, k, dim=1).indices  # (B, k)
        chosen[b_idx, new] = True
        A_new = torch.gather(A, 2, new[:, None, :].expand(B, n, k))
        A_S_old = torch.gather(A, 2, S[:, None, :].expand(B, n, S.shape[1]))
        cross = torch.einsum("bns,bnk->bsk", A_S_old * u[None, :, None], A_new)
        corner = torch.einsum("bnk,bnj->bkj", A_new * u[None, :, None], A_new)
        gram = torch.cat([torch.cat([gram, cross], 2), torch.cat([cross.transpose(1, 2), corner], 2)], 1)
        rhs = torch.cat([rhs, torch.einsum("bnk,n->bk", A_new, u)], 1)
        S = torch.cat([S, new], 1)
        step += 1
        if step % refit_every == 0 or S.shape[1] >= budget:
            w = nnls_batched(gram, rhs)
            A_S = torch.gather(A, 2, S[:, None, :].expand(B, n, S.shape[1]))
            r = y - torch.einsum("bns,bs->bn", A_S, w)
    return S.sort(1).values


def omp_select(A: torch.Tensor, budget: int, keys_per_step: int = 1, refit_every: int = 1,
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """One head: indices (budget,) sorted by position, for A (n, T)."""
    return omp_select_batched(A[None], budget, keys_per_step, refit_every, weights)[0]
