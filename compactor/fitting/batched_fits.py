"""beta and value fits of Attention Matching for B heads at once: fixed shapes, masks, no loop over heads.

Every head b has n reference queries and a padded set of t kept keys (key_mask (B, t) marks the real ones). The
fits only touch the mass shares A (B, n, t) of `compactor.kernels.mass_shares` (float16 on the GPU, read through
`shares_matmul` / `shares_t_matmul`), optional per-query weights c (B, n) or (n,) (default 1) and targets y
(default 1: each query's full mass):

- beta: min_{w >= 0} sum_i c_i (A_i w - y_i)^2 (the NNLS of beta_fit.py), by accelerated projected gradient
  (FISTA with adaptive restart, O'Donoghue & Candes 2015) in Jacobi-scaled variables u_j = w_j ||sqrt(c) A_j||,
  warm-started from the best single scale w = s 1, with the step 1/L from a Collatz-Wielandt upper bound on the
  largest eigenvalue of the scaled Gram (entrywise non-negative, unit diagonal). A step is one product with A and
  one with A^T (2 reads of A), or, when t is small next to n, one product with the scaled t x t Gram built once
  (`use_gram`: whichever moves fewer bytes);
- values: min_X sum_i c_i ||P_i X - O_i||^2 + lam ||X - V0||^2 with P = diag(1/m) A diag(w), m = A w (rows with
  m = 0 left out) and lam = ridge * trace(P^T C P) / (number of keys with w > 0), as value_fit.py; by
  Jacobi-preconditioned conjugate gradients from X = V0, one product with A and one with A^T (d columns) per step.

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
_CHUNK_BYTES = 512 << 20  # float32 temporaries of _row_scaled, per chunk of heads


def use_gram(n: int, t: int, iters: int = BETA_ITERS, k: int = 1) -> bool:
    """True when `iters` steps on the scaled t x t Gram (built once: 2 n t^2 flops; a step: one read of its float16
    t x t, 2 t^2 k flops) cost less time than on the n x t shares (a step: a product with A and one with A^T, each
    one read of float16 A and 2 n t k flops). k: columns of the unknown (1 for beta, d for the values)."""
    gram = 2 * n * t * t / _FLOPS + 4 * n * t / _BYTES + iters * max(2 * t * t / _BYTES, 2 * t * t * k / _FLOPS)
    free = iters * 2 * max(2 * n * t / _BYTES, 2 * n * t * k / _FLOPS)
    return gram < free


def _scaled_gram(M: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """diag(s) M^T M diag(s) (B, t, t) in dtype (entries in [0, 1] when s normalises M's columns). On CUDA: float16
    tensor-core products with float32 output (torch.bmm out_dtype, torch >= 2.8), or, where torch lacks that, a
    float16 product of the column-normalised M with float32 reductions."""
    if M.is_cuda and M.dtype == torch.float16:
        try:
            G = torch.bmm(M.transpose(1, 2), M, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch without the out_dtype overload
            Ms = _row_scaled(M, torch.ones(M.shape[:2], device=M.device), s)
            flag = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
            try:
                return torch.bmm(Ms.transpose(1, 2), Ms).to(dtype)
            finally:
                torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = flag
    else:
        work = torch.float64 if M.dtype == torch.float64 else torch.float32
        G = torch.bmm(M.transpose(1, 2).to(work), M.to(work))
    G.mul_(s[:, :, None]).mul_(s[:, None, :])
    return G.to(dtype)


def _row_scaled(A: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
    """A * rows[:, :, None] (* cols[:, None, :]) in A's dtype, computed in float32 one head at a time (the factors may
    exceed float16's range where the products do not)."""
    out = torch.empty_like(A)
    step = max(1, _CHUNK_BYTES // max(1, A.shape[1] * A.shape[2] * 4))  # heads per float32 temporary
    for b0 in range(0, A.shape[0], step):
        b1 = min(A.shape[0], b0 + step)
        x = A[b0:b1].float() * rows[b0:b1, :, None]
        if cols is not None:
            x = x * cols[b0:b1, None, :]
        out[b0:b1] = x.to(A.dtype)
    return out


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
                 power_iters: int = POWER_ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    """w (B, t) float32 >= 0 (0 off key_mask) approximately minimising sum_i c_i (A_i w - y_i)^2 per head, and the
    row masses m = A w (B, n) float32 of the result. A (B, n, t), key_mask (B, t) bool, target / query_weights
    (n,) or (B, n). gram=None chooses by `use_gram`. init (B, t): start there instead of the best single scale
    (OMP's refits); power_iters: power steps of the step-size bound (1 = the Gershgorin bound, 2 passes)."""
    B, n, t = A.shape
    dev = A.device
    info = info if info is not None else BatchedFitInfo()
    y = _per_query(target, B, n, dev)
    c = _per_query(query_weights, B, n, dev)
    mask = key_mask.to(dev)
    diag = shares_t_matmul(A, _vec(c), square=True)[..., 0]  # sum_i c_i A_ij^2
    live = mask & (diag > 0)
    s = torch.where(live, diag.clamp_min(_TINY).rsqrt(), torch.zeros((), device=dev))
    if init is None:
        m0 = shares_matmul(A, _vec(live.float()))[..., 0]  # row masses of the kept keys at w = 1
        scale0 = (c * m0 * y).sum(1) / (c * m0 * m0).sum(1).clamp_min(_TINY)
        f0 = (c * (scale0[:, None] * m0 - y) ** 2).sum(1)
        u = torch.where(live, scale0[:, None] / s.clamp_min(_TINY), torch.zeros((), device=dev))
    else:
        w0 = torch.where(live, init.float().clamp_min(0), torch.zeros((), device=dev))
        f0 = (c * (shares_matmul(A, _vec(w0))[..., 0] - y) ** 2).sum(1)
        u = torch.where(live, w0 / s.clamp_min(_TINY), torch.zeros((), device=dev))

    gram = use_gram(n, t, iters) if gram is None else gram
    info.used_gram = gram
    info.gram_calls += int(gram)
    if gram:
        gdtype = torch.float16 if A.dtype == torch.float16 else torch.float32
        weighted = query_weights is not None
        G = _scaled_gram(_row_scaled(A, c.sqrt()) if weighted else A, s, gdtype)  # unit diagonal, entries in [0, 1]
        b_hat = s * shares_t_matmul(A, _vec(c * y))[..., 0]

        def apply(v):
            return shares_matmul(G, _vec(v))[..., 0]

        def grad(v):
            return apply(v) - b_hat
    else:
        def apply(v):
            return s * shares_t_matmul(A, _vec(c * shares_matmul(A, _vec(s * v))[..., 0]))[..., 0]

        def grad(v):
            r = shares_matmul(A, _vec(s * v))[..., 0] - y
            return s * shares_t_matmul(A, _vec(c * r))[..., 0]

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
    f = (c * (m - y) ** 2).sum(1)
    bad = ~(torch.isfinite(w).all(1) & torch.isfinite(f) & (f <= f0 * (1 + 1e-5) + 1e-12))
    if bool(bad.any()):
        for b in bad.nonzero().flatten().tolist():
            cols = mask[b].nonzero().flatten()
            rc = c[b].double().sqrt()[:, None]
            wb = fit_mass_weights(rc * A[b][:, cols].double(), rc[:, 0] * y[b].double())
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
    `use_gram` (CG on the scaled t x t Gram of P, or matrix-free on A)."""
    B, n, t = A.shape
    dev = A.device
    info = info if info is not None else BatchedFitInfo()
    w = w.float()
    c = _per_query(query_weights, B, n, dev)
    m = shares_matmul(A, _vec(w))[..., 0] if masses is None else masses.float()
    rows = m > _TINY
    zero = torch.zeros((), device=dev)
    inv_m = torch.where(rows, 1.0 / m.clamp_min(_TINY), zero)
    c = torch.where(rows, c, zero)
    cm2 = c * inv_m * inv_m
    diag = w * w * shares_t_matmul(A, _vec(cm2), square=True)[..., 0]  # Jacobi of P^T C P
    kept = (w > 0).sum(1).clamp_min(1)
    lam = (ridge * diag.sum(1) / kept + 1e-12)[:, None, None]
    wv = _vec(w)
    X = V0.float().clone()
    O = outputs.float()
    d = O.shape[-1]
    gram = use_gram(n, t, iters, d) if gram is None else gram
    info.value_gram_calls += int(gram)
    if gram:
        X, rz, rz0 = _values_on_gram(A, w, c, inv_m, O, X, diag, lam, iters)
        return _values_guard(A, w, c, rows, inv_m, O, V0, X, ridge, rz, rz0, info)

    def op(Z):  # (P^T C P + lam) Z
        return wv * shares_t_matmul(A, _vec(cm2) * shares_matmul(A, wv * Z)) + lam * Z

    PV0 = shares_matmul(A, wv * X) * _vec(inv_m)
    R = wv * shares_t_matmul(A, _vec(c * inv_m) * (O - PV0))  # right-hand side minus op(V0)
    Minv = 1.0 / (_vec(diag) + lam)
    Z = Minv * R
    D = Z
    rz = (R * Z).sum(1)  # (B, d): one CG per value column, sharing the operator
    rz0 = rz
    for _ in range(iters):
        Q = op(D)
        alpha = rz / (D * Q).sum(1).clamp_min(_TINY)
        X = X + alpha[:, None, :] * D
        R = R - alpha[:, None, :] * Q
        Z = Minv * R
        rz_next = (R * Z).sum(1)
        D = Z + (rz_next / rz.clamp_min(_TINY))[:, None, :] * D
        rz = rz_next
    return _values_guard(A, w, c, rows, inv_m, O, V0, X, ridge, rz, rz0, info)


def _values_on_gram(A, w, c, inv_m, O, X, diag, lam, iters):
    """The value CG on the scaled Gram of P: with S = diag(P^T C P)^-1/2 (0 for dropped keys), solve
    (S P^T C P S + lam S^2) Y = S (P^T C O + lam V0), X = S Y, from X = V0; Jacobi is then 1 + lam S^2."""
    dev = A.device
    s = torch.where(diag > 0, diag.clamp_min(_TINY).rsqrt(), torch.zeros((), device=dev))
    P = _row_scaled(A, c.sqrt() * inv_m, w)  # sqrt(c) P, entries in [0, 1]
    G = _scaled_gram(P, s, torch.float16 if A.dtype == torch.float16 else torch.float32)
    rhs = shares_t_matmul(P, c.sqrt()[..., None] * O)  # P^T C O
    del P
    sv, lam_s2 = _vec(s), lam * _vec(s * s)
    V0 = X
    Y = torch.where(sv > 0, V0 / sv.clamp_min(_TINY), torch.zeros((), device=dev))
    R = sv * (rhs + lam * V0) - shares_matmul(G, Y) - lam_s2 * Y
    Minv = 1.0 / (1.0 + lam_s2)
    Z = Minv * R
    D = Z
    rz = rz0 = (R * Z).sum(1)
    for _ in range(iters):
        Q = shares_matmul(G, D) + lam_s2 * D
        alpha = rz / (D * Q).sum(1).clamp_min(_TINY)
        Y = Y + alpha[:, None, :] * D
        R = R - alpha[:, None, :] * Q
        Z = Minv * R
        rz_next = (R * Z).sum(1)
        D = Z + (rz_next / rz.clamp_min(_TINY))[:, None, :] * D
        rz = rz_next
    return torch.where(sv > 0, sv * Y, V0), rz, rz0


def _values_guard(A, w, c, rows, inv_m, O, V0, X, ridge, rz, rz0, info):
    """Heads whose values are not finite (or whose CG residual grew) are refitted exactly in float64."""
    ok = torch.isfinite(X).flatten(1).all(1) & (rz.sum(1) <= rz0.sum(1) * (1 + 1e-5) + 1e-30)
    bad = ~ok
    if bool(bad.any()):
        for b in bad.nonzero().flatten().tolist():
            cols = (w[b] > 0).nonzero().flatten()
            r = rows[b].nonzero().flatten()
            rc = c[b, r].double().sqrt()[:, None]
            P = A[b][r][:, cols].double() * w[b, cols].double() * inv_m[b, r].double()[:, None]
            X[b] = V0[b].float()
            X[b, cols] = fit_values(rc * P, rc * O[b, r].double(), V0[b, cols].double(), ridge).float()
            info.value_fallback += 1
    return X
