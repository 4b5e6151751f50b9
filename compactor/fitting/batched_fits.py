"""beta and value fits of Attention Matching for B heads at once: fixed shapes, masks, no loop over heads.

Every head b has n reference queries and a padded set of t kept keys (key_mask (B, t) marks the real ones). The
fits only touch the mass shares A (B, n, t) of `compactor.kernels.mass_shares` (float16 on the GPU, read through
`shares_matmul` / `shares_t_matmul`), optional per-query weights c (B, n) or (n,) (default 1) and targets y
(default 1: each query's full mass):

- beta: min_{w >= 0} sum_i c_i (A_i w - y_i)^2 + mu ||w - 1||^2 (the NNLS of beta_fit.py; mu = ridge *
  trace(A^T C A) / t over the head's t kept keys, 0 by default, as fit_mass_weights' `ridge`), by accelerated projected gradient
  (FISTA with adaptive restart, O'Donoghue & Candes 2015) in Jacobi-scaled variables u_j = w_j ||sqrt(c) A_j||,
  warm-started from the best single scale w = s 1, with the step 1/L from a Collatz-Wielandt upper bound on the
  largest eigenvalue of the scaled Gram (entrywise non-negative, unit diagonal). A step is one product with A and
  one with A^T (2 reads of A), or, when t is small next to n, one product with the scaled t x t Gram built once
  (`use_gram`: whichever moves fewer bytes);
- values: min_X sum_i c_i ||P_i X - O_i||^2 + lam ||X - V0||^2 with P = diag(1/m) A diag(w), m = A w (rows with
  m = 0 left out) and lam = ridge * trace(P^T C P) / (number of keys with w > 0), as value_fit.py; by
  Jacobi-preconditioned conjugate gradients from X = V0 (one CG per value column, sharing the operator), a step
  being one product of the scaled t x t Gram of P (built once, when `use_gram` says it pays) with d columns, or
  one product with A and one with A^T. The vector work of a step runs fused (kernels/fit_products.py, `cg_*`).

Why a fixed number of iterations instead of the exact solvers: their cost is cubic in t per head (an active-set
Cholesky per iteration; 668 ms per head at T=131k on an H100), these are linear in n*t per step. Measured on
SmolLM2 heads (benchmarks/notes_gpu_fits.md, benchmarks/results_fit_quality.md), 40 beta steps and 20 value steps
give the same held-out attention error as the exact float64 solution when t < n, and a better one when t > n,
where the exact NNLS has many minimisers and picks a sparse vertex that overfits the reference queries; the early
stopped iterate stays near the warm start.

Guards (measured per head, in float32 after the batched solve): a head whose beta objective is not finite or
ended above its warm start, or whose value residual is not finite or grew, is refitted by the exact float64
per-head solvers (fit_mass_weights / fit_values on sqrt(c)-weighted rows). `BatchedFitInfo` counts them.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from ..kernels import shares_matmul, shares_t_matmul
from ..kernels.fit_products import (_cg_q as cg_q, _full_precision_reductions, _half_columns, cg_direction, cg_dot,
                                    cg_update, scale_shares, shares_matmul_torch, shares_t_matmul_torch)
from .beta_fit import fit_mass_weights
from .value_fit import fit_values

BETA_ITERS = 40
VALUE_ITERS = 20
POWER_ITERS = 3
_TINY = 1e-30


@dataclass
class BatchedFitInfo:
    """What the batched fits did (for benchmarks and tests). With `timings` a dict, the batched layer methods
    synchronise the device after each step and add its seconds there (benchmarks only: the syncs cost time)."""

    beta_fallback: int = 0     # heads refitted by the exact float64 NNLS
    value_fallback: int = 0    # heads refitted by the exact float64 ridge solve
    used_gram: bool = False    # beta steps on the scaled t x t Gram instead of A (last call)
    gram_calls: int = 0        # beta fits that used the Gram
    value_gram_calls: int = 0  # value fits that used the Gram of P
    timings: dict | None = None

    @contextlib.contextmanager
    def step(self, name: str, device: torch.device):
        if self.timings is None:
            yield
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0


def _vec(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(-1)


def _per_query(x: torch.Tensor | None, B: int, n: int, device, default: float = 1.0) -> torch.Tensor:
    if x is None:
        return torch.full((B, n), default, dtype=torch.float32, device=device)
    x = x.to(device=device, dtype=torch.float32)
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.shape[-1] != n or x.shape[0] not in (1, B):
        raise ValueError(f"per-query tensor must be (n,) or (B, n) = ({B}, {n}), got {tuple(x.shape)}")
    return x.expand(B, n)


# nominal H100 rates for the path choice below (measured: 780 TFLOP/s bf16 matmul, 2.96 TB/s copy)
_FLOPS, _BYTES = 7e14, 2.8e12
_CHUNK_BYTES = 1 << 30  # the scaled copy of the shares that a Gram is built from, per chunk of heads


def use_gram(n: int, t: int, iters: int = BETA_ITERS, k: int = 1) -> bool:
    """True when `iters` steps on the scaled t x t Gram (built once: 2 n t^2 flops; a step: one read of its float16
    t x t, 2 t^2 k flops) cost less time than on the n x t shares (a step: a product with A and one with A^T, each
    one read of float16 A and 2 n t k flops). k: columns of the unknown (1 for beta, d for the values)."""
    gram = 2 * n * t * t / _FLOPS + 4 * n * t / _BYTES + iters * max(2 * t * t / _BYTES, 2 * t * t * k / _FLOPS)
    free = iters * 2 * max(2 * n * t / _BYTES, 2 * n * t * k / _FLOPS)
    return gram < free


def scaled_gram(A: torch.Tensor, s: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """diag(s) A^T diag(r)^2 A diag(s) (B, t, t) for A (B, n, t), s (B, t), r = row_scale (B, n) (None: 1): the
    Gram of the scaled copy M = diag(r) A diag(s) (`scale_shares`, rounded to A's dtype: entries in [0, 1] when s
    normalises the columns of diag(r) A). float16 A: one float16 GEMM with float32 accumulation (cuBLAS on the GPU;
    on the CPU in float32, rounded to float16 like the GPU's result); float32 (float64) A: in float32 (float64).
    Built in chunks of heads (the copy is at most _CHUNK_BYTES at a time)."""
    B, n, t = A.shape
    G = torch.empty(B, t, t, dtype=A.dtype if A.dtype != torch.bfloat16 else torch.float32, device=A.device)
    step = max(1, _CHUNK_BYTES // max(1, n * t * A.element_size()))
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        M = scale_shares(A[b0:b1], None if row_scale is None else row_scale[b0:b1].contiguous(),
                         s[b0:b1].contiguous())
        if A.dtype == torch.float16 and not A.is_cuda:  # CPU float16 GEMMs are slow; same result up to sum order
            G[b0:b1] = torch.bmm(M.transpose(1, 2).float(), M.float()).half()
        else:
            with _full_precision_reductions():
                torch.bmm(M.transpose(1, 2), M, out=G[b0:b1])
        del M
    return G


def _lipschitz(apply, live: torch.Tensor, iters: int = POWER_ITERS) -> torch.Tensor:
    """(B,) upper bound on the largest eigenvalue of a symmetric entrywise non-negative operator with unit diagonal
    on the live coordinates: Collatz-Wielandt, max_j (G x)_j / x_j for x > 0, after a few power steps."""
    x = live.float()
    bound = torch.ones(live.shape[0], device=live.device)
    for _ in range(iters):
        gx = apply(x)
        ratio = torch.where(live, gx / x.clamp_min(_TINY), torch.zeros((), device=x.device))
        bound = ratio.amax(1).clamp_min(1.0)  # >= the unit diagonal
        x = torch.where(live, gx / gx.amax(1, keepdim=True).clamp_min(_TINY), torch.zeros((), device=x.device))
        x = torch.where(live, x.clamp_min(1e-12), x)
    return bound


def nnls_batched(A: torch.Tensor, key_mask: torch.Tensor, target: torch.Tensor | None = None,
                 query_weights: torch.Tensor | None = None, iters: int = BETA_ITERS, gram: bool | None = None,
                 info: BatchedFitInfo | None = None, init: torch.Tensor | None = None,
                 power_iters: int = POWER_ITERS, ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """w (B, t) float32 >= 0 (0 off key_mask) approximately minimising sum_i c_i (A_i w - y_i)^2 + mu ||w - 1||^2
    per head, and the row masses m = A w (B, n) float32 of the result. A (B, n, t), key_mask (B, t) bool, target /
    query_weights (n,) or (B, n). gram=None chooses by `use_gram`. init (B, t): start there instead of the best
    single scale (OMP's refits); power_iters: power steps of the step-size bound (1 = the Gershgorin bound, 2
    passes). ridge: mu = ridge * trace(A^T C A) / t per head (t: its kept keys), as fit_mass_weights(ridge=...); a
    kept key no weighted query sees then gets w = 1, as there."""
    B, n, t = A.shape
    dev = A.device
    info = info if info is not None else BatchedFitInfo()
    y = _per_query(target, B, n, dev)
    c = _per_query(query_weights, B, n, dev)
    mask = key_mask.to(dev)
    diag = shares_t_matmul(A, _vec(c), square=True)[..., 0]  # sum_i c_i A_ij^2
    live = mask & (diag > 0)
    s = torch.where(live, diag.clamp_min(_TINY).rsqrt(), torch.zeros((), device=dev))
    zero = torch.zeros((), device=dev)
    # the pull toward w = 1 (beta = 0): mu (B,), in the scaled variables a diagonal mu s^2 and a gradient mu s (s u - 1)
    mu = ridge * torch.where(mask, diag, zero).sum(1) / mask.sum(1).clamp_min(1) if ridge > 0 else \
        torch.zeros(B, device=dev)
    n_live = live.sum(1)

    def objective(w_, m_):
        return (c * (m_ - y) ** 2).sum(1) + mu * torch.where(live, (w_ - 1) ** 2, zero).sum(1)

    if init is None:
        m0 = shares_matmul(A, _vec(live.float()))[..., 0]  # row masses of the kept keys at w = 1
        # the best single scale w = a 1 on the live keys
        scale0 = ((c * m0 * y).sum(1) + mu * n_live) / ((c * m0 * m0).sum(1) + mu * n_live).clamp_min(_TINY)
        f0 = (c * (scale0[:, None] * m0 - y) ** 2).sum(1) + mu * n_live * (scale0 - 1) ** 2
        u = torch.where(live, scale0[:, None] / s.clamp_min(_TINY), zero)
    else:
        w0 = torch.where(live, init.float().clamp_min(0), zero)
        f0 = objective(w0, shares_matmul(A, _vec(w0))[..., 0])
        u = torch.where(live, w0 / s.clamp_min(_TINY), zero)
    mu_s2, mu_s = mu[:, None] * s * s, mu[:, None] * s

    gram = use_gram(n, t, iters) if gram is None else gram
    info.used_gram = gram
    info.gram_calls += int(gram)
    if gram:
        G = scaled_gram(A, s, None if query_weights is None else c.sqrt())  # unit diagonal, entries in [0, 1]
        b_hat = s * shares_t_matmul(A, _vec(c * y))[..., 0]

        b_hat = b_hat + mu_s

        def apply(v):
            return shares_matmul(G, _vec(v))[..., 0] + mu_s2 * v

        def grad(v):
            return apply(v) - b_hat
    else:
        def apply(v):
            return s * shares_t_matmul(A, _vec(c * shares_matmul(A, _vec(s * v))[..., 0]))[..., 0] + mu_s2 * v

        def grad(v):
            r = shares_matmul(A, _vec(s * v))[..., 0] - y
            return s * shares_t_matmul(A, _vec(c * r))[..., 0] + mu_s2 * v - mu_s

    step = 1.0 / _lipschitz(apply, live, power_iters)[:, None]
    prev, z = u, u
    tk = torch.ones(B, device=dev)
    zero, one = torch.zeros((), device=dev), torch.ones((), device=dev)
    livef = live.float()
    for _ in range(iters):
        new = (z - step * grad(z)).clamp_min_(0).mul_(livef)
        diff = new - prev
        restart = ((z - new) * diff).sum(1) > 0  # momentum points uphill: drop it (adaptive restart)
        tk_next = (1 + torch.sqrt(1 + 4 * tk * tk)) / 2
        mom = torch.where(restart, zero, (tk - 1) / tk_next)
        tk = torch.where(restart, one, tk_next)
        z = torch.addcmul(new, mom[:, None], diff)
        prev = new
    w = s * prev
    m = shares_matmul(A, _vec(w))[..., 0]
    f = objective(w, m)
    if ridge > 0:  # kept keys that no weighted query sees: only the pull acts on them
        w = torch.where(mask & ~live, torch.ones((), device=dev), w)
        m = shares_matmul(A, _vec(w))[..., 0]
    bad = ~(torch.isfinite(w).all(1) & torch.isfinite(f) & (f <= f0 * (1 + 1e-5) + 1e-12))
    if bool(bad.any()):
        for b in bad.nonzero().flatten().tolist():
            cols = mask[b].nonzero().flatten()
            rc = c[b].double().sqrt()[:, None]
            wb = fit_mass_weights(rc * A[b][:, cols].double(), rc[:, 0] * y[b].double(), ridge=ridge)
            w[b] = 0
            w[b, cols] = wb.to(w.dtype)
            m[b] = shares_matmul(A[b:b + 1], _vec(w[b:b + 1]))[0, :, 0]
            info.beta_fallback += 1
    return w, m


def ridge_values_batched(A: torch.Tensor, w: torch.Tensor, outputs: torch.Tensor, V0: torch.Tensor,
                         ridge: float = 1e-3, query_weights: torch.Tensor | None = None,
                         masses: torch.Tensor | None = None, iters: int = VALUE_ITERS,
                         info: BatchedFitInfo | None = None, gram: bool | None = None) -> torch.Tensor:
    """X (B, t, d) float32 approximately minimising sum_i c_i ||P_i X - O_i||^2 + lam ||X - V0||^2 per head (see
    the module docstring). A (B, n, t), w (B, t) >= 0, outputs O (B, n, d), V0 (B, t, d); masses = A w if known.
    Keys with w = 0 keep X = V0 (they carry no weight; callers drop them). gram=None chooses the path by
    `use_gram` (CG on the scaled t x t Gram of P, or on A)."""
    B, n, t = A.shape
    dev = A.device
    info = info if info is not None else BatchedFitInfo()
    zero = torch.zeros((), device=dev)
    w = w.float()
    c = _per_query(query_weights, B, n, dev)
    m = shares_matmul(A, _vec(w))[..., 0] if masses is None else masses.float()
    rows = m > _TINY
    inv_m = torch.where(rows, 1.0 / m.clamp_min(_TINY), zero)
    r2 = torch.where(rows, c, zero) * inv_m * inv_m  # P^T C P = W A^T diag(r2) A W
    O = outputs.float()
    d = O.shape[-1]
    diag = shares_t_matmul(A, _vec(r2), square=True)[..., 0]  # sum_i r2_i A_ij^2: the Jacobi of P^T C P is w^2 diag
    keep = (w > 0) & (diag > 0)
    s = torch.where(keep, diag.clamp_min(_TINY).rsqrt(), zero)
    # X = u Y on the kept keys, u = s / w: the normal matrix becomes S A^T diag(r2) A S + lam diag(u^2), unit diagonal
    u = torch.where(keep, s / w.clamp_min(_TINY), zero)
    kept = keep.sum(1).clamp_min(1)
    lam = (ridge * (w * w * diag * keep).sum(1) / kept + 1e-12)[:, None]  # ridge * trace(P^T C P) / kept
    dg = (lam * u * u).contiguous()
    gram = use_gram(n, t, iters, d) if gram is None else gram
    info.value_gram_calls += int(gram)
    half = A.is_cuda and A.dtype == torch.float16  # float16 operands for the GEMMs (cuBLAS)
    if gram:
        G = scaled_gram(A, s, r2.sqrt())  # the Gram of sqrt(C) P in the scaled variables: entries in [0, 1]

        def core(Ds, sigma):  # G D, for Ds = D / sigma
            return _bmm(G, Ds), sigma, None
        cs = None
    else:
        def core(Ds, sigma):  # S A^T diag(r2) A S D, for Ds = s D / sigma
            V = r2[..., None] * _bmm(A, Ds).float()
            if not half:
                return _bmm(A, V, transpose=True), sigma, s
            V16, sigma_v = _half_columns(V, n)
            return _bmm(A, V16, transpose=True), sigma * sigma_v, s
        cs = s.contiguous()
    V0f = V0.float()
    uv = _vec(u)
    ci = torch.where(rows, c, zero) * inv_m
    b = _vec(s) * shares_t_matmul(A, _vec(ci) * O) + _vec(lam) * uv * V0f  # U (W A^T C diag(1/m) O + lam V0)
    Y = torch.where(uv > 0, V0f / uv.clamp_min(_TINY), zero).contiguous()
    Y, rz, rz0 = _pcg(core, b, Y, dg, (keep / (1.0 + dg)).contiguous(), cs, iters, t,
                      torch.float16 if half else torch.float32)
    X = torch.where(uv > 0, uv * Y, V0f)
    ok = torch.isfinite(X).flatten(1).all(1) & (rz.sum(1) <= rz0.sum(1) * (1 + 1e-5) + 1e-30)
    if not bool(ok.all()):  # the guard: the exact float64 ridge fit, head by head
        for b_ in (~ok).nonzero().flatten().tolist():
            cols = keep[b_].nonzero().flatten()
            live = rows[b_].nonzero().flatten()
            rc = c[b_, live].double().sqrt()[:, None]
            P = A[b_][live][:, cols].double() * w[b_, cols].double() * inv_m[b_, live].double()[:, None]
            X[b_] = V0f[b_]
            X[b_, cols] = fit_values(rc * P, rc * O[b_, live].double(), V0f[b_, cols].double(), ridge).float()
            info.value_fallback += 1
    return X


def _bmm(M: torch.Tensor, X: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """M @ X (M^T @ X): a float16 GEMM with float32 accumulation and float16 result when both are float16 on the GPU
    (operands scaled so that the result fits), else the float32 torch product."""
    if M.is_cuda and M.dtype == torch.float16 and X.dtype == torch.float16:
        with _full_precision_reductions():
            return torch.bmm(M.transpose(1, 2) if transpose else M, X)
    return (shares_t_matmul_torch if transpose else shares_matmul_torch)(M, X)


def _scaled_operand(X: torch.Tensor, cs: torch.Tensor | None, inner: int, dtype: torch.dtype):
    """(cs X / sigma in dtype, sigma (B, k), max_t |cs X| (B, k)) with sigma the column maxima of |cs X| (1 where
    zero) times max(1, inner / 2^15), so that a product with a float16 matrix of entries in [0, 1] fits float16."""
    Xs = X if cs is None else X * cs[:, :, None]
    xmax = torch.linalg.vector_norm(Xs, ord=float("inf"), dim=1)
    sigma = _column_sigma(xmax, inner)
    return (Xs / sigma[:, None, :]).to(dtype), sigma, xmax


def _column_sigma(bound: torch.Tensor, inner: int) -> torch.Tensor:
    return torch.where(bound > 0, bound, torch.ones((), device=bound.device)) * max(1.0, inner / 32768)


def _pcg(core, b: torch.Tensor, Y: torch.Tensor, dg: torch.Tensor, minv: torch.Tensor, cs: torch.Tensor | None,
         iters: int, inner: int, dtype: torch.dtype):
    """Jacobi-preconditioned conjugate gradients on (Op + diag(dg)) Y = b from Y, one CG per column of the
    (B, t, k) unknowns, all sharing the operator. core(Ds, sigma) -> (Qh, sq, rs) gives Op D = rs * Qh * sq from
    Ds = cs D / sigma (dtype; cs None: 1); minv (B, t): the inverse Jacobi diagonal, 0 off the solved rows. The vector
    work of a step runs fused (`cg_dot`, `cg_update`, `cg_direction`: Triton on the GPU). Returns Y and the
    preconditioned residual norms r^T M^-1 r (B, k) at the end and at the start."""
    Ys, sigma, _ = _scaled_operand(Y, cs, inner, dtype)
    Qh, sq, rs = core(Ys, sigma)
    R = b - cg_q(Qh, sq, rs, dg, Y)
    R.mul_((minv > 0).to(R.dtype)[:, :, None])
    D = (minv[:, :, None] * R).contiguous()
    rz = rz0 = (R * D).sum(1)
    Ds, sigma, dmax = _scaled_operand(D, cs, inner, dtype)
    for _ in range(iters):
        Qh, sq, rs = core(Ds, sigma)
        alpha = rz / cg_dot(Qh, sq, rs, dg, D).clamp_min(_TINY)
        rz_next, zmax = cg_update(Qh, sq, rs, dg, D, Y, R, alpha, minv, cs)
        beta = rz_next / rz.clamp_min(_TINY)
        sigma = _column_sigma(zmax + beta.abs() * dmax, inner)  # >= max |cs D| of the new direction
        Ds, dmax = cg_direction(R, D, minv, beta, sigma, cs, dtype)
        rz = rz_next
    return Y, rz, rz0
