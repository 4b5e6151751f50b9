"""OMP-fast key selection (Attention Matching, arXiv 2602.16284) for B heads at once.

Greedy selection of the keys whose attention mass best fits each query's full mass: with A (B, n, T) the mass
shares of *every* key (A_ij = exp(scale q_i.k_j - lse_i)), the kept set S and weights w >= 0 on it, the residual
r = y - A_S w (y = 1: each query's full mass; weights c per query), each step scores every unchosen key by its
correlation with the residual, A^T (c r), and adds the `keys_per_step` best of each head; every `refit_every`
steps the weights are refitted by NNLS on the kept keys (`nnls_batched` warm-started from the previous weights, a
few accelerated projected-gradient steps; new keys enter at weight 0, as in the paper's lazy refits). After the
last key a longer refit. Heads may have different budgets: a head whose budget is reached stops taking keys.

Cost per step: one product A^T r over all T keys (one read of A), plus the refits on the kept columns (a compact
copy A_S (B, n, t) filled as keys are chosen), so a whole head costs ~ (t / keys_per_step) reads of n x T shares;
nothing cubic in t.
"""
from __future__ import annotations

import math

import torch

from ..kernels import shares_t_matmul
from .batched_fits import BETA_ITERS, BatchedFitInfo, _per_query, _vec, nnls_batched

KEYS_PER_STEP = 4
REFIT_EVERY = 2
REFIT_ITERS = 8


def omp_select(A: torch.Tensor, budgets: torch.Tensor, target: torch.Tensor | None = None,
               query_weights: torch.Tensor | None = None, keys_per_step: int = KEYS_PER_STEP,
               refit_every: int = REFIT_EVERY, refit_iters: int = REFIT_ITERS, final_iters: int = BETA_ITERS,
               info: BatchedFitInfo | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy OMP over all T keys of B heads. A (B, n, T) mass shares of every key, budgets (B,).
    Returns (idx (B, t) key positions in the order chosen, padding 0; counts (B,); w (B, t) float32 weights (0 in
    padding); masses A_S w (B, n); A_S (B, n, t) the chosen columns), t = max budget."""
    B, n, T = A.shape
    dev = A.device
    if keys_per_step < 1 or refit_every < 1:
        raise ValueError("keys_per_step and refit_every must be >= 1")
    budgets = budgets.to(dev).clamp(0, T)
    t = max(int(budgets.max()), 1)
    y = _per_query(target, B, n, dev)
    c = _per_query(query_weights, B, n, dev)
    t_alloc = -(-t // 64) * 64 if dev.type == "cuda" else t  # 128-byte aligned rows (see methods/batched.py)
    A_sel = torch.zeros(B, n, t_alloc, dtype=A.dtype, device=dev)[:, :, :t]
    idx = torch.zeros(B, t, dtype=torch.int64, device=dev)
    w = torch.zeros(B, t, device=dev)
    count = torch.zeros(B, dtype=torch.int64, device=dev)
    chosen = torch.zeros(B, T, dtype=torch.bool, device=dev)
    residual = y.clone()
    m = torch.zeros(B, n, device=dev)
    k = min(keys_per_step, T)
    steps = math.ceil(t / k)
    offsets = torch.arange(k, device=dev)
    for step in range(steps):
        corr = shares_t_matmul(A, _vec(c * residual))[..., 0].masked_fill(chosen, float("-inf"))
        top = corr.topk(k, dim=1).indices  # (B, k)
        take = offsets[None, :] < (budgets - count)[:, None]
        slots = (count[:, None] + offsets[None, :]).clamp(max=t - 1)
        idx.scatter_(1, slots, torch.where(take, top, idx.gather(1, slots)))
        cols = A.gather(2, top[:, None, :].expand(B, n, k))
        old = A_sel.gather(2, slots[:, None, :].expand(B, n, k))
        A_sel.scatter_(2, slots[:, None, :].expand(B, n, k), torch.where(take[:, None, :], cols, old))
        chosen.scatter_(1, top, take | chosen.gather(1, top))
        count = count + take.sum(1)
        last = step == steps - 1
        if (step + 1) % refit_every == 0 or last:
            cur = min(t, (step + 1) * k)  # no head holds more keys than this yet
            mask = torch.arange(cur, device=dev)[None, :] < count[:, None]
            w_cur, m = nnls_batched(A_sel[:, :, :cur], mask, target=y, query_weights=c,
                                    iters=final_iters if last else refit_iters, info=info, init=w[:, :cur],
                                    power_iters=1)
            w[:, :cur] = w_cur
            residual = y - m
    return idx, count, w, m, A_sel
