"""The products the batched Attention Matching fits need, for B heads at once over a padded set of kept keys.

For B independent (layer, KV-head) problems, each with n reference queries q_i, its t_b <= t kept keys k_j (the
first t_b columns; the rest is padding) and the log-sum-exp lse_i of each query over all T keys of the full cache
(from `attention_stats`):

    A[b, i, j] = exp(scale * q_bi . k_bj - lse_bi)   if j < t_b (and key_pos[b, j] <= query_pos[b, i], if given)
               = 0                                    otherwise

is kept key j's share of query i's full-cache attention mass. Shares lie in [0, 1] (up to the rounding of keys that
went through a store-and-load round trip), so float16 holds them to 2^-11 relative; shares below ~6e-8 flush to 0,
far below what the fits resolve. The fits then only need products with A:

- :func:`mass_shares`  (queries (B,n,d), keys (B,t,d), lse (B,n), scale, lengths (B,), query_pos, key_pos,
  out_dtype) -> A (B, n, t): one pass, nothing n x t in float32 ever reaches memory;
- :func:`shares_matmul`   (A (B,n,t), X (B,t,k)) -> A @ X   (B, n, k) float32;
- :func:`shares_t_matmul` (A (B,n,t), R (B,n,k), square=False) -> A^T @ R (B, t, k) float32; square=True gives
  (A*A)^T @ R for one vector R (the Jacobi diagonal of a weighted Gram, sum_i c_i A_ij^2, without forming it).

k = 1 (the NNLS gradient) runs as a streaming reduction (memory-bound: one read of A); k > 1 (the value fit, k = d)
through tl.dot: with float16 A on the GPU, the other operand's columns are divided by their largest magnitude and
rounded to float16 (2^-11 relative, like A itself) for a float16 tensor-core dot with float32 accumulation (a TF32
dot on upcast tiles ran at 13% of the copy floor on an H100); otherwise a float32 dot (TF32 on the GPU, exact in
the interpreter). Both read A once, so their floor is A's bytes over the copy bandwidth. `shares_t_matmul` splits the query axis across programs
when t is small (too few column strips to fill the GPU) and sums the partial results in a fixed order (deterministic).

Dispatch as in `attention_stats`: CUDA tensors -> Triton, CPU -> torch; COMPACTOR_TRITON=0 forces torch,
COMPACTOR_TRITON=1 forces Triton (on CPU tensors that needs TRITON_INTERPRET=1). The torch references compute in
float32 in chunks of queries and round A to out_dtype exactly like the kernels.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

from .attention_stats import _HAS_TRITON, _env_flag, _interpret_mode, _warn_once, tl, triton

__all__ = ["mass_shares", "mass_shares_torch", "mass_shares_triton", "shares_matmul", "shares_matmul_torch",
           "shares_matmul_triton", "shares_t_matmul", "shares_t_matmul_torch", "shares_t_matmul_triton"]

_LOG2E = 1.4426950408889634
_TORCH_CHUNK = 2048  # query rows per chunk in the torch reference of mass_shares
_TORCH_WHOLE = 1 << 20  # the torch products convert all of A at once up to this many entries, else head by head
SHARE_DTYPES = (torch.float16, torch.float32, torch.float64)
HEAD_DIMS = (16, 32, 64, 128, 256)


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------


def _check_shares_inputs(queries, keys, lse, lengths, query_pos, key_pos, out_dtype):
    if queries.dim() != 3 or keys.dim() != 3:
        raise ValueError(f"queries (B, n, d) and keys (B, t, d) must be 3-D, got {tuple(queries.shape)}, "
                         f"{tuple(keys.shape)}")
    B, n, d = queries.shape
    if keys.shape[0] != B or keys.shape[2] != d:
        raise ValueError(f"keys {tuple(keys.shape)} do not match queries {tuple(queries.shape)}")
    if queries.dtype != keys.dtype:
        raise ValueError(f"queries and keys must share one dtype, got {queries.dtype} and {keys.dtype}")
    if tuple(lse.shape) != (B, n):
        raise ValueError(f"lse must have shape (B, n) = {(B, n)}, got {tuple(lse.shape)}")
    if tuple(lengths.shape) != (B,) or lengths.dtype.is_floating_point:
        raise ValueError(f"lengths must be an integer tensor of shape (B,) = ({B},), got {tuple(lengths.shape)}")
    if (query_pos is None) != (key_pos is None):
        raise ValueError("query_pos and key_pos go together (causal visibility needs both)")
    if query_pos is not None:
        if tuple(query_pos.shape) != (B, n) or tuple(key_pos.shape) != (B, keys.shape[1]):
            raise ValueError(f"query_pos must be (B, n) and key_pos (B, t), got {tuple(query_pos.shape)}, "
                             f"{tuple(key_pos.shape)}")
    if out_dtype not in SHARE_DTYPES:
        raise ValueError(f"out_dtype must be one of {SHARE_DTYPES}, got {out_dtype}")


def _check_matmul_inputs(A, X, rows: bool):
    if A.dim() != 3 or X.dim() != 3:
        raise ValueError(f"A (B, n, t) and its operand must be 3-D, got {tuple(A.shape)}, {tuple(X.shape)}")
    B, n, t = A.shape
    inner = t if rows else n
    if X.shape[0] != B or X.shape[1] != inner:
        want = "(B, t, k)" if rows else "(B, n, k)"
        raise ValueError(f"operand must be {want} for A of shape {tuple(A.shape)}, got {tuple(X.shape)}")
    if A.dtype not in SHARE_DTYPES:
        raise ValueError(f"A must be float16/32/64, got {A.dtype}")


# ----------------------------------------------------------------------------------------------
# torch references
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def mass_shares_torch(queries, keys, lse, scale: float, lengths, query_pos=None, key_pos=None,
                      out_dtype=torch.float16) -> torch.Tensor:
    """Reference: float32 scores (float64 if out_dtype is float64), chunks of queries, rounded to out_dtype."""
    _check_shares_inputs(queries, keys, lse, lengths, query_pos, key_pos, out_dtype)
    B, n, _ = queries.shape
    t = keys.shape[1]
    work = torch.float64 if out_dtype == torch.float64 else torch.float32
    out = torch.empty(B, n, t, dtype=out_dtype, device=queries.device)
    cols = torch.arange(t, device=queries.device)
    for b in range(B):
        k = keys[b].to(work)
        valid = cols < lengths[b].to(queries.device)
        for i0 in range(0, n, _TORCH_CHUNK):
            i1 = min(n, i0 + _TORCH_CHUNK)
            s = queries[b, i0:i1].to(work) @ k.T
            a = torch.exp(s * scale - lse[b, i0:i1, None].to(work))
            keep = valid[None, :]
            if query_pos is not None:
                keep = keep & (key_pos[b][None, :].to(queries.device) <= query_pos[b, i0:i1, None].to(queries.device))
            out[b, i0:i1] = torch.where(keep, a, torch.zeros((), dtype=work, device=a.device)).to(out_dtype)
    return out


@torch.no_grad()
def shares_matmul_torch(A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """A @ X in float32 (float64 if either is float64)."""
    _check_matmul_inputs(A, X, rows=True)
    work = torch.float64 if torch.float64 in (A.dtype, X.dtype) else torch.float32
    if A.numel() <= _TORCH_WHOLE:
        return torch.bmm(A.to(work), X.to(work))
    out = torch.empty(A.shape[0], A.shape[1], X.shape[2], dtype=work, device=A.device)
    for b in range(A.shape[0]):  # one head at a time: a float32 copy of one head's A, not of all
        out[b] = A[b].to(work) @ X[b].to(work)
    return out


@torch.no_grad()
def shares_t_matmul_torch(A: torch.Tensor, R: torch.Tensor, square: bool = False) -> torch.Tensor:
    """A^T @ R in float32 (float64 if either is float64); (A*A)^T @ R with square=True (k = 1 only)."""
    _check_matmul_inputs(A, R, rows=False)
    if square and R.shape[2] != 1:
        raise ValueError("square=True takes one vector R (B, n, 1)")
    work = torch.float64 if torch.float64 in (A.dtype, R.dtype) else torch.float32
    if A.numel() <= _TORCH_WHOLE:
        a = A.to(work)
        return torch.bmm((a * a if square else a).transpose(1, 2), R.to(work))
    out = torch.empty(A.shape[0], A.shape[2], R.shape[2], dtype=work, device=A.device)
    for b in range(A.shape[0]):  # one head at a time: a float32 copy of A (and its square) per head, not all
        a = A[b].to(work)
        out[b] = (a.square() if square else a).T @ R[b].to(work)
    return out


# ----------------------------------------------------------------------------------------------
# Triton kernels (jit-wrapped lazily, as in attention_stats: the interpreter is chosen at wrap time)
# ----------------------------------------------------------------------------------------------


def _shares_kernel(
    Q, K, LSE, LEN, QPOS, KPOS, A,
    n, t, qk_scale2,
    stride_qb, stride_qn, stride_qd,
    stride_kb, stride_kt, stride_kd,
    stride_lb, stride_ln,
    stride_pb, stride_pn,
    stride_cb, stride_ct,
    stride_ab, stride_an, stride_at,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_POS: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One (query block, key block, problem) tile of A: scores on the tensor cores, exp2 against lse, masks."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = rows < n
    length = tl.load(LEN + pid_b)
    mask_n = cols < t
    q = tl.load(Q + pid_b * stride_qb + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None], other=0.0)
    kt = tl.load(K + pid_b * stride_kb + offs_d[:, None] * stride_kd + cols[None, :] * stride_kt,
                 mask=mask_n[None, :], other=0.0)
    if UPCAST:  # interpreter only: its tl.dot cannot multiply bfloat16
        q = q.to(tl.float32)
        kt = kt.to(tl.float32)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION)
    lse2 = tl.load(LSE + pid_b * stride_lb + rows * stride_ln, mask=mask_m, other=0.0) * 1.4426950408889634
    a = tl.exp2(s * qk_scale2 - lse2[:, None])
    keep = (cols < length)[None, :]
    if HAS_POS:
        qpos = tl.load(QPOS + pid_b * stride_pb + rows * stride_pn, mask=mask_m, other=0)
        kpos = tl.load(KPOS + pid_b * stride_cb + cols * stride_ct, mask=mask_n, other=0)
        keep = keep & (kpos[None, :] <= qpos[:, None])
    a = tl.where(keep, a, 0.0)
    tl.store(A + pid_b * stride_ab + rows[:, None] * stride_an + cols[None, :] * stride_at,
             a.to(A.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _rows_kernel(
    A, X, Y, XSCALE,
    n, t, k,
    stride_ab, stride_an, stride_at,
    stride_xb, stride_xt, stride_xk,
    stride_yb, stride_yn, stride_yk,
    stride_sb,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    VEC: tl.constexpr,
    HALF: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Y[b, rows, :] = A[b, rows, :] @ X[b]: one query block (x one output-column block), streaming the keys.
    k > 1: X's columns are divided by XSCALE[b, col] (their largest magnitude) and, with HALF, rounded to float16
    for a float16 tensor-core dot with float32 accumulation; the result is multiplied back."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < n
    offs_n = tl.arange(0, BLOCK_N)
    a_base = A + pid_b * stride_ab + rows[:, None] * stride_an
    x_base = X + pid_b * stride_xb
    if VEC:
        acc = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, t, BLOCK_N):
            cols = start + offs_n
            mask_n = cols < t
            a = tl.load(a_base + cols[None, :] * stride_at, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            x = tl.load(x_base + cols * stride_xt, mask=mask_n, other=0.0)
            acc += tl.sum(a.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        tl.store(Y + pid_b * stride_yb + rows * stride_yn, acc, mask=mask_m)
    else:
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k
        xs = tl.load(XSCALE + pid_b * stride_sb + offs_k, mask=mask_k, other=1.0)
        inv = 1.0 / xs
        acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for start in range(0, t, BLOCK_N):
            cols = start + offs_n
            mask_n = cols < t
            a = tl.load(a_base + cols[None, :] * stride_at, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            x = tl.load(x_base + cols[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                        mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            x = x.to(tl.float32) * inv[None, :]
            if HALF:
                acc += tl.dot(a, x.to(tl.float16))
            else:
                acc += tl.dot(a.to(tl.float32), x, input_precision=DOT_PRECISION)
        acc = acc * xs[None, :]
        tl.store(Y + pid_b * stride_yb + rows[:, None] * stride_yn + offs_k[None, :] * stride_yk, acc,
                 mask=mask_m[:, None] & mask_k[None, :])


def _cols_kernel(
    A, R, Z, RSCALE,
    n, t, k, rows_per_split,
    stride_ab, stride_an, stride_at,
    stride_rb, stride_rn, stride_rk,
    stride_zs, stride_zb, stride_zt, stride_zk,
    stride_sb,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    VEC: tl.constexpr,
    SQUARE: tl.constexpr,
    HALF: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Z[split, b, cols, :] = A[b, rows of the split, cols]^T @ R[b, rows of the split] (A squared elementwise if
    SQUARE): one key block (x one output-column block x one slice of the queries), streaming the queries."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    n_k = tl.cdiv(k, BLOCK_K)
    pid_k = pid_s % n_k
    split = pid_s // n_k
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < t
    offs_m = tl.arange(0, BLOCK_M)
    row_lo = split * rows_per_split
    row_hi = tl.minimum(row_lo + rows_per_split, n)
    a_base = A + pid_b * stride_ab + cols[None, :] * stride_at
    r_base = R + pid_b * stride_rb
    z_base = Z + split.to(tl.int64) * stride_zs + pid_b * stride_zb
    if VEC:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(row_lo, row_hi, BLOCK_M):
            rows = start + offs_m
            mask_m = rows < row_hi
            a = tl.load(a_base + rows[:, None] * stride_an, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            r = tl.load(r_base + rows * stride_rn, mask=mask_m, other=0.0)
            a = a.to(tl.float32)
            if SQUARE:
                a = a * a
            acc += tl.sum(a * r.to(tl.float32)[:, None], axis=0)
        tl.store(z_base + cols * stride_zt, acc, mask=mask_n)
    else:
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k
        rs = tl.load(RSCALE + pid_b * stride_sb + offs_k, mask=mask_k, other=1.0)
        inv = 1.0 / rs
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for start in range(row_lo, row_hi, BLOCK_M):
            rows = start + offs_m
            mask_m = rows < row_hi
            a = tl.load(a_base + rows[:, None] * stride_an, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            r = tl.load(r_base + rows[:, None] * stride_rn + offs_k[None, :] * stride_rk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            r = r.to(tl.float32) * inv[None, :]
            if HALF:
                acc += tl.dot(tl.trans(a), r.to(tl.float16))
            else:
                acc += tl.dot(tl.trans(a.to(tl.float32)), r, input_precision=DOT_PRECISION)
        acc = acc * rs[None, :]
        tl.store(z_base + cols[:, None] * stride_zt + offs_k[None, :] * stride_zk, acc,
                 mask=mask_n[:, None] & mask_k[None, :])


# Tile configurations (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for Hopper; the first entry is the default,
# CUDA launches autotune over the list (COMPACTOR_AUTOTUNE=0: default only).
_CONFIGS = {
    "shares": [(128, 64, 0, 8, 3), (64, 128, 0, 8, 3), (128, 128, 0, 8, 3), (64, 64, 0, 4, 3)],
    "rows_vec": [(64, 128, 0, 4, 4), (32, 256, 0, 4, 4), (128, 64, 0, 8, 4)],
    "cols_vec": [(128, 64, 0, 4, 4), (256, 32, 0, 8, 4), (64, 128, 0, 4, 4)],
    "rows_mat": [(128, 64, 128, 8, 3), (64, 64, 128, 4, 4), (128, 32, 128, 8, 4), (128, 64, 64, 4, 4)],
    "cols_mat": [(64, 128, 128, 8, 3), (32, 128, 128, 8, 4), (64, 64, 128, 4, 3)],
}
_KERNELS: dict = {}


def _kernel(name: str, fn, interpret: bool, autotune: bool, keys: list):
    cache_key = (name, interpret, autotune)
    if cache_key not in _KERNELS:
        kern = triton.jit(fn)
        if autotune:
            cfgs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, **({"BLOCK_K": bk} if bk else {})},
                                  num_warps=w, num_stages=s) for bm, bn, bk, w, s in _CONFIGS[name]]
            kern = triton.autotune(configs=cfgs, key=keys)(kern)
        _KERNELS[cache_key] = kern
    return _KERNELS[cache_key]


def _launch_mode(device) -> tuple[bool, bool]:
    if not _HAS_TRITON:
        raise RuntimeError("fit_products' Triton kernels need the `triton` package, which is not importable here")
    interpret = _interpret_mode()
    if device.type != "cuda" and not interpret:
        raise RuntimeError(f"fit_products' Triton kernels got {device.type} tensors: they need CUDA tensors, "
                           "or TRITON_INTERPRET=1 to run the interpreter on CPU")
    flag = _env_flag("COMPACTOR_AUTOTUNE")
    return interpret, (not interpret) and (True if flag is None else flag)


def _device_ctx(device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _fixed(name: str, override: Optional[dict]) -> dict:
    bm, bn, bk, w, s = _CONFIGS[name][0]
    cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}
    if bk:
        cfg["BLOCK_K"] = bk
    cfg.update(override or {})
    return cfg


@torch.no_grad()
def mass_shares_triton(queries, keys, lse, scale: float, lengths, query_pos=None, key_pos=None,
                       out_dtype=torch.float16, *, blocks: Optional[dict] = None) -> torch.Tensor:
    """Triton version of :func:`mass_shares_torch` (float16/float32 out). `blocks` (e.g. {"BLOCK_M": 16,
    "BLOCK_N": 16}) fixes the tile sizes and switches autotuning off."""
    _check_shares_inputs(queries, keys, lse, lengths, query_pos, key_pos, out_dtype)
    if out_dtype == torch.float64:
        raise ValueError("mass_shares_triton writes float16 or float32; use the torch reference for float64")
    B, n, d = queries.shape
    t = keys.shape[1]
    if d not in HEAD_DIMS:
        raise ValueError(f"mass_shares_triton supports head dims {HEAD_DIMS}, got d={d}")
    dev = queries.device
    interpret, autotune = _launch_mode(dev)
    autotune = autotune and blocks is None
    lse = lse.float()
    lengths = lengths.to(device=dev, dtype=torch.int32).contiguous()
    has_pos = query_pos is not None
    if has_pos:
        qp = query_pos.to(device=dev, dtype=torch.int32)
        kp = key_pos.to(device=dev, dtype=torch.int32)
    else:
        qp = kp = torch.zeros(1, 1, dtype=torch.int32, device=dev)
    A = torch.empty(B, n, t, dtype=out_dtype, device=dev)
    args = (queries, keys, lse, lengths, qp, kp, A, n, t, scale * _LOG2E,
            *queries.stride(), *keys.stride(), *lse.stride(),
            qp.stride(0) if has_pos else 0, qp.stride(1) if has_pos else 0,
            kp.stride(0) if has_pos else 0, kp.stride(1) if has_pos else 0, *A.stride())
    # float32 keys (after a quantization round trip) need ~float32 scores: tf32 would cost ~1% of a share at |s|~20
    precision = "ieee" if interpret else ("tf32x3" if queries.dtype == torch.float32 else "tf32")
    consts = dict(HEAD_DIM=d, HAS_POS=has_pos, UPCAST=bool(interpret and queries.dtype == torch.bfloat16),
                  DOT_PRECISION=precision)
    kern = _kernel("shares", _shares_kernel, interpret, autotune, ["HEAD_DIM", "HAS_POS", "DOT_PRECISION"])
    with _device_ctx(dev):
        if autotune:
            kern[lambda m: (triton.cdiv(n, m["BLOCK_M"]), triton.cdiv(t, m["BLOCK_N"]), B)](*args, **consts)
        else:
            cfg = _fixed("shares", blocks)
            kern[(triton.cdiv(n, cfg["BLOCK_M"]), triton.cdiv(t, cfg["BLOCK_N"]), B)](*args, **consts, **cfg)
    return A


def _column_scales(X: torch.Tensor, vec: bool) -> torch.Tensor:
    """(B, k) float32: the largest magnitude of each column of X (B, rows, k) (1 where a column is all zero), so
    that the scaled operand fits float16 for the tensor-core dot. Unused (ones) for k = 1."""
    if vec:
        return torch.ones(X.shape[0], 1, dtype=torch.float32, device=X.device)
    m = X.abs().amax(1).float()
    return torch.where(m > 0, m, torch.ones((), dtype=m.dtype, device=m.device)).contiguous()


def _dot_precision(interpret: bool) -> str:
    return "ieee" if interpret else "tf32"


@torch.no_grad()
def shares_matmul_triton(A: torch.Tensor, X: torch.Tensor, *, blocks: Optional[dict] = None) -> torch.Tensor:
    """Triton version of :func:`shares_matmul_torch`."""
    _check_matmul_inputs(A, X, rows=True)
    if A.dtype == torch.float64 or X.dtype == torch.float64:
        raise ValueError("shares_matmul_triton works in float32; use the torch reference for float64")
    B, n, t = A.shape
    k = X.shape[2]
    interpret, autotune = _launch_mode(A.device)
    autotune = autotune and blocks is None
    Y = torch.empty(B, n, k, dtype=torch.float32, device=A.device)
    vec = k == 1
    name = "rows_vec" if vec else "rows_mat"
    xs = _column_scales(X, vec)
    half = bool(A.dtype == torch.float16 and not interpret and not vec)
    args = (A, X, Y, xs, n, t, k, *A.stride(), *X.stride(), *Y.stride(), xs.stride(0))
    consts = dict(VEC=vec, HALF=half, DOT_PRECISION=_dot_precision(interpret))
    kern = _kernel(name, _rows_kernel, interpret, autotune, ["VEC", "HALF"])
    with _device_ctx(A.device):
        if autotune:
            kern[lambda m: (triton.cdiv(n, m["BLOCK_M"]), 1 if vec else triton.cdiv(k, m["BLOCK_K"]), B)](
                *args, **({"BLOCK_K": 16} if vec else {}), **consts)
        else:
            cfg = _fixed(name, blocks)
            cfg.setdefault("BLOCK_K", 16)
            kern[(triton.cdiv(n, cfg["BLOCK_M"]), 1 if vec else triton.cdiv(k, cfg["BLOCK_K"]), B)](
                *args, **consts, **cfg)
    return Y


def _splits(n: int, programs: int, block_m: int, device) -> int:
    """How many slices of the query axis so that a launch has enough programs to fill the GPU."""
    if device.type != "cuda":
        return max(1, min(4, triton.cdiv(n, block_m)))  # exercise the split path in interpreter tests too
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, math.ceil(4 * sms / max(programs, 1)))
    return max(1, min(want, triton.cdiv(n, 4 * block_m)))


@torch.no_grad()
def shares_t_matmul_triton(A: torch.Tensor, R: torch.Tensor, square: bool = False, *,
                           blocks: Optional[dict] = None, splits: Optional[int] = None) -> torch.Tensor:
    """Triton version of :func:`shares_t_matmul_torch`."""
    _check_matmul_inputs(A, R, rows=False)
    if square and R.shape[2] != 1:
        raise ValueError("square=True takes one vector R (B, n, 1)")
    if A.dtype == torch.float64 or R.dtype == torch.float64:
        raise ValueError("shares_t_matmul_triton works in float32; use the torch reference for float64")
    B, n, t = A.shape
    k = R.shape[2]
    interpret, _ = _launch_mode(A.device)
    vec = k == 1
    name = "cols_vec" if vec else "cols_mat"
    # fixed tiles here: the split count depends on them, and autotuning would have to retune per split
    cfg = _fixed(name, blocks)
    cfg.setdefault("BLOCK_K", 16)
    n_k = 1 if vec else triton.cdiv(k, cfg["BLOCK_K"])
    col_blocks = triton.cdiv(t, cfg["BLOCK_N"])
    if splits is None:
        splits = _splits(n, col_blocks * n_k * B, cfg["BLOCK_M"], A.device)
    rows_per_split = triton.cdiv(triton.cdiv(n, splits), cfg["BLOCK_M"]) * cfg["BLOCK_M"]
    splits = triton.cdiv(n, rows_per_split)
    Z = torch.empty(splits, B, t, k, dtype=torch.float32, device=A.device)
    rs = _column_scales(R, vec)
    half = bool(A.dtype == torch.float16 and not interpret and not vec)
    kern = _kernel(name, _cols_kernel, interpret, False, [])
    with _device_ctx(A.device):
        kern[(col_blocks, splits * n_k, B)](A, R, Z, rs, n, t, k, rows_per_split, *A.stride(), *R.stride(),
                                           *Z.stride(), rs.stride(0), VEC=vec, SQUARE=square, HALF=half,
                                           DOT_PRECISION=_dot_precision(interpret), **cfg)
    return Z[0] if splits == 1 else Z.sum(0)


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------


def _use_triton(x: torch.Tensor, head_dim: Optional[int] = None) -> bool:
    forced = _env_flag("COMPACTOR_TRITON")
    if forced is False:
        return False
    if not _HAS_TRITON:
        if forced or x.is_cuda:
            _warn_once("fit-no-triton", "triton is not importable; fit_products uses the torch reference")
        return False
    if head_dim is not None and head_dim not in HEAD_DIMS:
        if x.is_cuda:
            _warn_once(f"fit-head-dim-{head_dim}", f"fit_products: head dim {head_dim} is not one of {HEAD_DIMS}; "
                                                   "using the torch reference")
        return False
    return bool(forced) or x.is_cuda


def mass_shares(queries, keys, lse, scale: float, lengths, query_pos=None, key_pos=None,
                out_dtype=torch.float16) -> torch.Tensor:
    """A (B, n, t) of out_dtype; see the module docstring. Triton on CUDA (float64 always runs the reference)."""
    if out_dtype != torch.float64 and _use_triton(queries, queries.shape[-1]):
        return mass_shares_triton(queries, keys, lse, scale, lengths, query_pos, key_pos, out_dtype)
    return mass_shares_torch(queries, keys, lse, scale, lengths, query_pos, key_pos, out_dtype)


def shares_matmul(A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """A @ X (B, n, k) float32 for A (B, n, t), X (B, t, k)."""
    if A.dtype != torch.float64 and X.dtype != torch.float64 and _use_triton(A):
        return shares_matmul_triton(A, X)
    return shares_matmul_torch(A, X)


def shares_t_matmul(A: torch.Tensor, R: torch.Tensor, square: bool = False) -> torch.Tensor:
    """A^T @ R (B, t, k) float32 for A (B, n, t), R (B, n, k); with square=True, (A*A)^T @ R for R (B, n, 1)."""
    if A.dtype != torch.float64 and R.dtype != torch.float64 and _use_triton(A):
        return shares_t_matmul_triton(A, R, square)
    return shares_t_matmul_torch(A, R, square)
