"""Highest-attention eviction and Attention Matching for all KV heads of a layer at once (the GPU path).

Same methods as `Eviction.compact` / `AttentionMatching.compact` (one head at a time, exact float64 fits), batched:
key selection by one top-k over the heads, the mass shares of all heads from one kernel
(`compactor.kernels.mass_shares`, float16 on the GPU), beta and values by the batched fits of
`compactor.fitting.batched_fits` (fixed iteration counts, per-head guards that fall back to the exact solvers).
Heads that keep every key (budget >= T) come out as the identity, as in the per-head path; a head whose fit is
degenerate (no positive weight, non-finite values) falls back to plain eviction of its selected keys.
Returns the padded `LayerKV` directly (keys of each head sorted by position, padding at the end).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..fitting.batched_fits import BETA_ITERS, VALUE_ITERS, BatchedFitInfo, nnls_batched, ridge_values_batched
from ..kernels import AttentionStats, mass_shares
from ..layer_kv import LayerKV

LayerKeyTransform = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
#: dtype of the mass shares by device type: float16 on the GPU (half the bytes of every step); float32 on the CPU,
#: where float16 products are slow (benchmarks/bench_fit_quality.py sets "cpu" to float16 to measure GPU numerics).
SHARE_DTYPE = {"cuda": torch.float16, "cpu": torch.float32}


#: kept-key slots are padded to a multiple of this, so that rows of the shares (and Gram matrices) start 128-byte
#: aligned: unaligned rows (t = 3277) cost the kernels half their bandwidth and cuBLAS its fast paths on an H100
PAD_KEYS = 64


def select_top_keys(scores: torch.Tensor, budgets: torch.Tensor, pad_to: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (B, t) of the budgets[b] highest scores (B, T) of each head, sorted, padding (index 0) at the end
    of each row, t = the largest budget rounded up to a multiple of pad_to; and the counts (B,) on the scores'
    device. The same keys as `key_selection.top_keys` per head."""
    B, T = scores.shape
    budgets = budgets.to(scores.device).clamp(0, T)
    t_max = max(int(budgets.max()), 1)
    top = torch.topk(scores.float(), t_max, dim=1).indices
    valid = torch.arange(t_max, device=scores.device)[None, :] < budgets[:, None]
    pos = torch.where(valid, top, torch.full_like(top, T)).sort(dim=1).values
    pos = torch.where(pos == T, torch.zeros_like(pos), pos)
    t_pad = -(-t_max // pad_to) * pad_to
    if t_pad > t_max:
        pos = torch.cat([pos, pos.new_zeros(B, t_pad - t_max)], 1)
    return pos, budgets


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, T, d) at idx (B, t) -> (B, t, d)."""
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


def _layer(keys, values, beta, positions, lengths, importance) -> LayerKV:
    """Pack (B, t, ...) rows whose valid entries are marked by positions >= 0 into a LayerKV: valid entries first (in
    position order), trimmed to the longest head."""
    B, t = positions.shape
    big = torch.iinfo(torch.int64).max
    order = torch.where(positions >= 0, positions, torch.full_like(positions, big)).argsort(dim=1, stable=True)
    t_max = max(int(lengths.max()), 0) if B else 0
    order = order[:, :t_max]
    pos = torch.gather(positions, 1, order)
    valid = pos >= 0
    zero = torch.zeros((), dtype=keys.dtype, device=keys.device)
    return LayerKV(
        keys=torch.where(valid[..., None], _gather(keys, order), zero),
        values=torch.where(valid[..., None], _gather(values, order), torch.zeros((), dtype=values.dtype,
                                                                                   device=values.device)),
        beta=torch.where(valid, torch.gather(beta, 1, order), torch.zeros((), device=beta.device)).float(),
        positions=torch.where(valid, pos, torch.full_like(pos, -1)),
        lengths=lengths.to("cpu", torch.int64),
        importance=None if importance is None else
        torch.where(valid, torch.gather(importance, 1, order), torch.zeros((), device=importance.device)).cpu())


def split_heads(layer: LayerKV, heads: int) -> list[LayerKV]:
    """A LayerKV of G * heads rows (several layers compacted together) -> G LayerKVs, each trimmed to its longest
    head."""
    out = []
    for lo in range(0, layer.keys.shape[0], heads):
        hi = lo + heads
        lengths = layer.lengths[lo:hi]
        t = int(lengths.max()) if lengths.numel() else 0
        out.append(LayerKV(keys=layer.keys[lo:hi, :t], values=layer.values[lo:hi, :t], beta=layer.beta[lo:hi, :t],
                           positions=layer.positions[lo:hi, :t], lengths=lengths,
                           importance=None if layer.importance is None else layer.importance[lo:hi, :t]))
    return out


def _identity_rows(T: int, B: int, device) -> torch.Tensor:
    return torch.arange(T, device=device)[None].expand(B, T)


def evict_layer(keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor, budgets: torch.Tensor,
                importance: torch.Tensor | None = None) -> LayerKV:
    """Plain eviction of all heads of a layer: keys/values (B, T, d), scores (B, T), budgets (B,)."""
    idx, counts = select_top_keys(scores, budgets)
    valid = torch.arange(idx.shape[1], device=idx.device)[None, :] < counts[:, None]
    positions = torch.where(valid, idx, torch.full_like(idx, -1))
    beta = torch.zeros(idx.shape, dtype=torch.float32, device=keys.device)
    imp = None if importance is None else torch.gather(importance.to(idx.device), 1, idx)
    return _layer(_gather(keys, idx.to(keys.device)), _gather(values, idx.to(values.device)), beta,
                  positions.to(keys.device), counts.cpu(), imp)


def am_layer(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, budgets: torch.Tensor,
             stats: AttentionStats, scores: torch.Tensor, scale: float, query_pos: torch.Tensor | None = None,
             ridge: float = 1e-3, key_transform: LayerKeyTransform | None = None,
             query_weights: torch.Tensor | None = None, beta_iters: int = BETA_ITERS,
             value_iters: int = VALUE_ITERS, share_dtype: torch.dtype | None = None,
             info: BatchedFitInfo | None = None) -> LayerKV:
    """Attention Matching for the B KV heads of a layer. keys/values (B, T, d), queries (B, n, d), budgets (B,),
    stats: AttentionStats of these queries over these keys (batched), scores (B, T) the key ranking,
    query_pos (n,) or (B, n) to limit each query to its causal past (None: every query sees every key).
    key_transform(keys (B, t, d), importance (B, t), counts (B,)) gives the keys as they will be stored and loaded.
    share_dtype: dtype of the mass shares (default SHARE_DTYPE of the device)."""
    B, T, d = keys.shape
    n = queries.shape[1]
    dev = keys.device
    budgets = budgets.to(dev)
    full = budgets >= T
    if bool(full.all()):
        pos = _identity_rows(T, B, dev)
        return _layer(keys, values, torch.zeros(B, T, device=dev), pos, torch.full((B,), T),
                      stats.p_rms.to(dev))
    info = info if info is not None else BatchedFitInfo()
    with info.step("select", dev):
        idx, counts = select_top_keys(scores.to(dev), budgets, PAD_KEYS if dev.type == "cuda" else 1)
        t = idx.shape[1]
        key_mask = torch.arange(t, device=dev)[None, :] < counts[:, None]
        k_sel, v_sel = _gather(keys, idx), _gather(values, idx)
        importance = torch.gather(stats.p_rms.to(dev), 1, idx)
        k_fit = k_sel if key_transform is None else key_transform(k_sel, importance, counts)
    q = queries if queries.dtype == k_fit.dtype else queries.to(k_fit.dtype)
    qpos = kpos = None
    if query_pos is not None:
        qpos = (query_pos if query_pos.dim() == 2 else query_pos[None].expand(B, n)).to(dev)
        kpos = idx
    if share_dtype is None:
        share_dtype = SHARE_DTYPE.get(dev.type, torch.float32)
    with info.step("shares", dev):
        A = mass_shares(q, k_fit, stats.lse.to(dev), scale, counts, qpos, kpos, out_dtype=share_dtype)
    with info.step("beta", dev):
        w, m = nnls_batched(A, key_mask, query_weights=query_weights, iters=beta_iters, info=info)
    with info.step("values", dev):
        X = ridge_values_batched(A, w, stats.out.to(dev), v_sel, ridge, query_weights=query_weights, masses=m,
                                 iters=value_iters, info=info)
    del A
    keep = (w > 0) & key_mask
    beta = torch.log(torch.where(keep, w, torch.ones((), device=dev)))
    ok = keep.any(1) & torch.isfinite(X).flatten(1).all(1) & torch.isfinite(beta).all(1)
    # degenerate heads: plain eviction of the selected keys (beta 0, original values)
    keep = torch.where(ok[:, None], keep, key_mask)
    beta = torch.where(ok[:, None], beta, torch.zeros((), device=dev))
    X = torch.where(ok[:, None, None], X, v_sel.float())
    positions = torch.where(keep, idx, torch.full_like(idx, -1))
    lengths = keep.sum(1)
    if bool(full.any()):  # heads with budget >= T: the identity, exactly (their rows are padded to T)
        if t > T:  # alignment padding beyond T holds no key of any head
            k_sel, X, beta, positions, importance = (x[:, :T] for x in (k_sel, X, beta, positions, importance))
            t = T
        pad = T - t
        grow = (lambda x, fill: torch.cat([x, x.new_full((B, pad, *x.shape[2:]), fill)], 1)) if pad > 0 else \
            (lambda x, fill: x)
        k_sel, X, beta, positions, importance = (grow(k_sel, 0), grow(X, 0), grow(beta, 0.0), grow(positions, -1),
                                                 grow(importance, 0.0))
        f = full
        k_sel = torch.where(f[:, None, None], keys, k_sel)
        X = torch.where(f[:, None, None], values.float(), X)
        beta = torch.where(f[:, None], torch.zeros((), device=dev), beta)
        positions = torch.where(f[:, None], _identity_rows(T, B, dev), positions)
        importance = torch.where(f[:, None], stats.p_rms.to(dev), importance)
        lengths = torch.where(f, torch.full_like(lengths, T), lengths)
    with info.step("pack", dev):
        return _layer(k_sel, X.to(values.dtype), beta, positions, lengths, importance)


def omp_layer(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, budgets: torch.Tensor,
              stats: AttentionStats, scale: float, query_pos: torch.Tensor | None = None, ridge: float = 1e-3,
              query_weights: torch.Tensor | None = None, keys_per_step: int = 4, refit_every: int = 2,
              value_iters: int = VALUE_ITERS, share_dtype: torch.dtype | None = None,
              info: BatchedFitInfo | None = None) -> LayerKV:
    """Attention Matching with OMP-fast key selection (fitting/omp_batched.py) for the B KV heads of a layer:
    keys chosen greedily for the mass fit (beta from the same NNLS), then values by the batched ridge fit.
    Arguments as am_layer (the keys are used as given: no store-and-load transform)."""
    from ..fitting.omp_batched import omp_select

    B, T, d = keys.shape
    n = queries.shape[1]
    dev = keys.device
    budgets = budgets.to(dev).clamp(max=T)
    if share_dtype is None:
        share_dtype = SHARE_DTYPE.get(dev.type, torch.float32)
    qpos = kpos = None
    if query_pos is not None:
        qpos = (query_pos if query_pos.dim() == 2 else query_pos[None].expand(B, n)).to(dev)
        kpos = torch.arange(T, device=dev)[None].expand(B, T)
    A_all = mass_shares(queries, keys, stats.lse.to(dev), scale, torch.full((B,), T, device=dev), qpos, kpos,
                        out_dtype=share_dtype)
    idx, counts, w, m, A = omp_select(A_all, budgets, query_weights=query_weights, keys_per_step=keys_per_step,
                                      refit_every=refit_every, info=info)
    del A_all
    v_sel = _gather(values, idx)
    X = ridge_values_batched(A, w, stats.out.to(dev), v_sel, ridge, query_weights=query_weights, masses=m,
                             iters=value_iters, info=info)
    key_mask = torch.arange(idx.shape[1], device=dev)[None, :] < counts[:, None]
    keep = (w > 0) & key_mask
    beta = torch.log(torch.where(keep, w, torch.ones((), device=dev)))
    ok = keep.any(1) & torch.isfinite(X).flatten(1).all(1) & torch.isfinite(beta).all(1)
    keep = torch.where(ok[:, None], keep, key_mask)
    beta = torch.where(ok[:, None], beta, torch.zeros((), device=dev))
    X = torch.where(ok[:, None, None], X, v_sel.float())
    positions = torch.where(keep, idx, torch.full_like(idx, -1))
    importance = torch.gather(stats.p_rms.to(dev), 1, idx)
    return _layer(_gather(keys, idx), X.to(values.dtype), beta, positions, keep.sum(1), importance)
