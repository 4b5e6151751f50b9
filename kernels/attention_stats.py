"""Attention statistics for key scoring: outputs, log-sum-exp and per-key weight statistics.

For a batch of B independent (layer, KV-head) problems, each with n reference queries (the query heads
of one GQA group pooled) and T cached keys/values, compute

    s_ij   = scale * q_i . k_j                      (visible j only: j <= query_pos[i], if given)
    lse_i  = log sum_j exp(s_ij)                    (natural log)
    p_ij   = exp(s_ij - lse_i)                      (0 where j is not visible to i)
    out_i  = sum_j p_ij v_j
    p_rms_j = sqrt( (1/n) sum_i p_ij^2 )            (mean over ALL n queries)
    p_max_j = max_i p_ij

`out` and `lse` are what Attention Matching needs to fit the compacted cache; `p_rms` / `p_max` score
keys ("highest attention" selection).

Three entry points with the same signature ``(queries, keys, values, scale, query_pos=None)``:

- :func:`attention_stats_torch`: plain-torch reference. Streams one problem and one chunk of
  ``_TORCH_CHUNK`` queries at a time (peak extra memory ~ a few chunk x T float32 matrices).
- :func:`attention_stats_triton`: two Triton kernels. Pass 1 is a flash-attention forward
  (grid: query block x problem, online softmax over key blocks) writing ``out`` and ``lse``; pass 2
  (grid: key block x problem) recomputes the scores against the stored ``lse`` while streaming query
  blocks and keeps sum p^2 and max p per key in registers. Nothing n x T ever reaches memory.
- :func:`attention_stats`: dispatcher. Triton for CUDA tensors (or everywhere when the environment
  sets ``COMPACTOR_TRITON=1``; with CPU tensors that also needs ``TRITON_INTERPRET=1``), torch otherwise.
  ``COMPACTOR_TRITON=0`` forces the torch path. Where triton is missing, or the head dimension is not
  one the kernels support, CUDA tensors fall back to torch with a one-time warning.

Numerics: inputs float32 / float16 / bfloat16 (all the same dtype); every accumulation is float32 and all
four results are float32. In the Triton kernels half-precision inputs go through tl.dot with float32
accumulation (p is rounded to the input dtype for the p @ v product, as in flash attention). float32
inputs use TF32 tensor cores on the GPU (``COMPACTOR_TF32=0`` switches to 3xTF32, ~float32 accurate); the
interpreter always computes exact float32 products.
"""

import contextlib
import math
import os
import warnings
from typing import NamedTuple, Optional

import torch

try:  # triton is optional: CPU-only installs (and macOS) run the torch reference.
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    triton = None
    _HAS_TRITON = False

    class tl:  # stub so the kernel signatures below (annotated tl.constexpr) still evaluate
        constexpr = None

__all__ = [
    "AttentionStats",
    "attention_stats",
    "attention_stats_torch",
    "attention_stats_triton",
    "TRITON_HEAD_DIMS",
]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: head dimensions the Triton kernels accept (d is a tl.constexpr and tl.dot needs K >= 16).
TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)
#: query rows per chunk in the torch reference.
_TORCH_CHUNK = 1024

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


class AttentionStats(NamedTuple):
    out: torch.Tensor  # (B, n, d) float32: softmax(scale q k^T) v over visible keys
    lse: torch.Tensor  # (B, n) float32: natural-log logsumexp of the visible scores
    p_rms: torch.Tensor  # (B, T) float32: sqrt(mean_i p_ij^2), mean over all n queries
    p_max: torch.Tensor  # (B, T) float32: max_i p_ij


# ----------------------------------------------------------------------------------------------
# input checking (shared by all entry points)
# ----------------------------------------------------------------------------------------------


def _check_inputs(queries, keys, values, scale, query_pos):
    """Validate shapes/dtypes; returns (B, n, T, d, scale, query_pos as int64 (B, n) or (1, n) or None)."""
    for name, x in (("queries", queries), ("keys", keys), ("values", values)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"{name} must be 3-D (B, rows, d), got shape {tuple(x.shape)}")
        if x.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {x.dtype}; expected float32, float16 or bfloat16")
    if not (queries.dtype == keys.dtype == values.dtype):
        raise ValueError(
            f"queries, keys and values must share one dtype, got {queries.dtype}, {keys.dtype}, {values.dtype}"
        )
    if not (queries.device == keys.device == values.device):
        raise ValueError(
            f"queries, keys and values must be on one device, got {queries.device}, {keys.device}, {values.device}"
        )
    B, n, d = queries.shape
    Bk, T, dk = keys.shape
    if keys.shape != values.shape:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must have the same shape")
    if Bk != B:
        raise ValueError(f"batch mismatch: queries have B={B}, keys have B={Bk}")
    if dk != d:
        raise ValueError(f"head-dim mismatch: queries have d={d}, keys have d={dk}")
    if B < 1 or n < 1 or T < 1 or d < 1:
        raise ValueError(f"empty problem: B={B}, n={n}, T={T}, d={d}")
    if scale is None:
        scale = d ** -0.5
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")

    qpos = None
    if query_pos is not None:
        if not isinstance(query_pos, torch.Tensor):
            query_pos = torch.as_tensor(query_pos)
        if query_pos.dtype.is_floating_point or query_pos.dtype.is_complex or query_pos.dtype == torch.bool:
            raise ValueError(f"query_pos must be an integer tensor, got dtype {query_pos.dtype}")
        if query_pos.dim() == 1:
            if query_pos.shape[0] != n:
                raise ValueError(f"query_pos of shape {tuple(query_pos.shape)} does not match n={n}")
            qpos = query_pos.reshape(1, n)
        elif query_pos.dim() == 2:
            if tuple(query_pos.shape) != (B, n):
                raise ValueError(f"query_pos of shape {tuple(query_pos.shape)} does not match (B, n)=({B}, {n})")
            qpos = query_pos
        else:
            raise ValueError(f"query_pos must have shape (B, n) or (n,), got {tuple(query_pos.shape)}")
        qpos = qpos.to(device=queries.device, dtype=torch.int64)
        if bool((qpos < 0).any()):
            raise ValueError("query_pos must be >= 0 (every query must see at least key 0)")
    return B, n, T, d, scale, qpos


# ----------------------------------------------------------------------------------------------
# plain-torch reference (streaming)
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def attention_stats_torch(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: Optional[float] = None,
    query_pos: Optional[torch.Tensor] = None,
) -> AttentionStats:
    """Reference implementation: one problem at a time, ``_TORCH_CHUNK`` query rows at a time.

    Each query chunk sees all T keys at once, so its softmax is exact in one pass and Σp² / max p per key
    accumulate directly (no second pass needed). Peak extra memory ~ 3 x chunk x T float32.
    """
    B, n, T, d, scale, qpos = _check_inputs(queries, keys, values, scale, query_pos)
    dev = queries.device
    out = torch.empty(B, n, d, dtype=torch.float32, device=dev)
    lse = torch.empty(B, n, dtype=torch.float32, device=dev)
    p_rms = torch.empty(B, T, dtype=torch.float32, device=dev)
    p_max = torch.empty(B, T, dtype=torch.float32, device=dev)
    key_idx = torch.arange(T, device=dev)
    chunk = max(1, int(_TORCH_CHUNK))
    for b in range(B):
        k = keys[b].to(torch.float32)
        v = values[b].to(torch.float32)
        sumsq = torch.zeros(T, dtype=torch.float32, device=dev)
        pmax = torch.zeros(T, dtype=torch.float32, device=dev)
        for i0 in range(0, n, chunk):
            i1 = min(n, i0 + chunk)
            s = queries[b, i0:i1].to(torch.float32) @ k.T
            s.mul_(scale)
            if qpos is not None:
                qp = qpos[b if qpos.shape[0] > 1 else 0, i0:i1]
                s.masked_fill_(key_idx[None, :] > qp[:, None], float("-inf"))
            row_lse = torch.logsumexp(s, dim=1)
            s.sub_(row_lse[:, None]).exp_()  # s is now p (exactly 0 where masked)
            out[b, i0:i1] = s @ v
            lse[b, i0:i1] = row_lse
            torch.maximum(pmax, s.amax(dim=0), out=pmax)
            sumsq.add_(s.square_().sum(dim=0))
        p_rms[b] = sumsq.div_(n).sqrt_()
        p_max[b] = pmax
    return AttentionStats(out, lse, p_rms, p_max)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
# The kernel bodies are plain functions; `_get_kernels()` wraps them with triton.jit lazily, once per
# mode (compiled vs TRITON_INTERPRET), because triton.jit picks JIT or interpreter at decoration time and
# tests switch the interpreter on after triton may already have been imported.


def _fwd_kernel(
    Q, K, V, QPOS, OUT, LSE,
    n, T, qk_scale2,
    stride_qb, stride_qn, stride_qd,
    stride_kb, stride_kt, stride_kd,
    stride_vb, stride_vt, stride_vd,
    stride_pb, stride_pn,
    stride_ob, stride_on, stride_od,
    stride_lb, stride_ln,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_QPOS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Pass 1: flash-attention forward for one (query block, problem); writes out and lse."""
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < n

    q = tl.load(
        Q + pid_b * stride_qb + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=mask_m[:, None],
        other=0.0,
    )
    if UPCAST:  # interpreter only: its tl.dot cannot multiply bfloat16 (stored as raw uint16)
        q = q.to(tl.float32)
    k_base = K + pid_b * stride_kb
    v_base = V + pid_b * stride_vb

    if HAS_QPOS:
        # padded rows get position 0: they see key 0 only and never widen the key range
        qpos = tl.load(QPOS + pid_b * stride_pb + offs_m * stride_pn, mask=mask_m, other=0)
        q_lo = tl.min(tl.where(mask_m, qpos, T), axis=0)  # keys [0, q_lo] visible to every real row
        lo = tl.minimum(q_lo + 1, T)
        hi = tl.minimum(tl.max(qpos, axis=0) + 1, T)  # no row sees keys >= hi
    else:
        lo = T
        hi = T
    lo_full = (lo // BLOCK_N) * BLOCK_N  # blocks below lo_full need no mask at all

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # stage 1: full key blocks visible to every row of this query block (no masks)
    for start_n in range(0, lo_full, BLOCK_N):
        cols = start_n + offs_n
        kt = tl.load(k_base + offs_d[:, None] * stride_kd + cols[None, :] * stride_kt)
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION)
        s = s * qk_scale2
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :] * stride_vd)
        if UPCAST:
            # round p to the input dtype exactly as the GPU path does, then multiply in float32
            pv = tl.dot(p.to(V.dtype.element_ty).to(tl.float32), v.to(tl.float32), input_precision=DOT_PRECISION)
        else:
            pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    # stage 2: the partially visible blocks (causal boundary and/or the ragged tail), masked
    for start_n in range(lo_full, hi, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < T
        kt = tl.load(
            k_base + offs_d[:, None] * stride_kd + cols[None, :] * stride_kt,
            mask=mask_n[None, :],
            other=0.0,
        )
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION)
        s = s * qk_scale2
        if HAS_QPOS:
            visible = (cols[None, :] <= qpos[:, None]) & mask_n[None, :]
        else:
            visible = mask_n[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: key 0 is in stage 1 or in this block
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_base + cols[:, None] * stride_vt + offs_d[None, :] * stride_vd,
            mask=mask_n[:, None],
            other=0.0,
        )
        if UPCAST:
            # round p to the input dtype exactly as the GPU path does, then multiply in float32
            pv = tl.dot(p.to(V.dtype.element_ty).to(tl.float32), v.to(tl.float32), input_precision=DOT_PRECISION)
        else:
            pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    out = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # base-2 running max/sum -> natural log
    tl.store(
        OUT + pid_b * stride_ob + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
        out,
        mask=mask_m[:, None],
    )
    tl.store(LSE + pid_b * stride_lb + offs_m * stride_ln, lse, mask=mask_m)


def _stats_kernel(
    Q, K, QPOS, QSTART, LSE, PRMS, PMAX,
    n, T, qk_scale2, inv_n,
    stride_qb, stride_qn, stride_qd,
    stride_kb, stride_kt, stride_kd,
    stride_pb, stride_pn,
    stride_zb, stride_zt,
    stride_lb, stride_ln,
    stride_sb, stride_st,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_QPOS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Pass 2: for one (key block, problem), stream the query blocks; sum p^2 and max p per key.

    With query_pos, QSTART[b, j] is the first query that can see key j when the positions of problem b
    are sorted (0 otherwise), so query blocks that see none of this block's keys are skipped by the loop
    bound rather than by a branch (a branch around the dot would stop triton from pipelining the loads).
    """
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    start_key = pid_n * BLOCK_N
    offs_n = start_key + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_n = offs_n < T

    kt = tl.load(
        K + pid_b * stride_kb + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kt,
        mask=mask_n[None, :],
        other=0.0,
    )
    if UPCAST:
        kt = kt.to(tl.float32)
    q_base = Q + pid_b * stride_qb
    lse_base = LSE + pid_b * stride_lb
    # elementwise accumulators, reduced over the query axis once at the end
    acc_sq = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_max = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    if HAS_QPOS:
        m_begin = (tl.load(QSTART + pid_b * stride_zb + start_key * stride_zt) // BLOCK_M) * BLOCK_M
    else:
        m_begin = 0
    for start_m in range(m_begin, n, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < n
        # padded rows get lse = +inf, so their p = exp2(s - inf) = 0 without a mask
        lse2 = tl.load(lse_base + rows * stride_ln, mask=mask_m, other=float("inf")) * 1.4426950408889634
        q = tl.load(
            q_base + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
            mask=mask_m[:, None],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION)
        p = tl.exp2(s * qk_scale2 - lse2[:, None])
        if HAS_QPOS:
            qpos = tl.load(QPOS + pid_b * stride_pb + rows * stride_pn, mask=mask_m, other=-1)
            p = tl.where(offs_n[None, :] <= qpos[:, None], p, 0.0)
        acc_sq += p * p
        acc_max = tl.maximum(acc_max, p)

    p_rms = tl.sqrt(tl.sum(acc_sq, axis=0) * inv_n)
    p_max = tl.max(acc_max, axis=0)
    tl.store(PRMS + pid_b * stride_sb + offs_n * stride_st, p_rms, mask=mask_n)
    tl.store(PMAX + pid_b * stride_sb + offs_n * stride_st, p_max, mask=mask_n)


# Launch configurations (BLOCK_M, BLOCK_N, num_warps, num_stages), tuned for Hopper (H100, 227 KB shared
# memory per block). The first entry of each list is the default; CUDA launches autotune over the list.
# Pass 1 tiles BLOCK_M queries x BLOCK_N keys (128 x 64, 8 warps, 3 stages is the classic d=128 bf16 flash
# attention choice; 128 x 128 needs ~224 KB shared memory at d=128). Pass 2 holds BLOCK_N keys and streams
# BLOCK_M queries. Every entry was compiled for sm_90 with triton 3.9 (no register spills, shared memory
# within the limit) except where noted; float32 inputs hold twice the bytes per tile, hence smaller tiles
# and 2 stages. Configs that do not fit at run time are dropped by the autotuner.
_CONFIGS = {
    # ---- pass 1 (fwd), 16-bit inputs
    ("fwd", 16, False): [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    ("fwd", 32, False): [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    ("fwd", 64, False): [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3)],
    ("fwd", 128, False): [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3)],
    ("fwd", 256, False): [(64, 32, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2)],
    # ---- pass 1 (fwd), float32 inputs (TF32 dot; the tf32x3 variant spills a little at d=128)
    ("fwd", 16, True): [(64, 64, 4, 2), (128, 64, 4, 2)],
    ("fwd", 32, True): [(64, 64, 4, 2), (128, 64, 4, 2)],
    ("fwd", 64, True): [(128, 64, 8, 2), (64, 64, 4, 2)],
    ("fwd", 128, True): [(128, 32, 8, 2), (64, 32, 4, 2), (128, 64, 8, 2)],
    ("fwd", 256, True): [(32, 32, 4, 2), (64, 16, 8, 2)],
    # ---- pass 2 (stats), 16-bit inputs: (BLOCK_M queries streamed, BLOCK_N keys held)
    ("stats", 16, False): [(64, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    ("stats", 32, False): [(64, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    ("stats", 64, False): [(64, 128, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3)],
    ("stats", 128, False): [(64, 128, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3)],
    ("stats", 256, False): [(32, 64, 8, 2), (64, 64, 8, 2), (32, 128, 8, 2)],
    # ---- pass 2 (stats), float32 inputs
    ("stats", 16, True): [(64, 128, 8, 2), (64, 64, 4, 2)],
    ("stats", 32, True): [(64, 128, 8, 2), (64, 64, 4, 2)],
    ("stats", 64, True): [(64, 128, 8, 2), (64, 64, 4, 2)],
    ("stats", 128, True): [(64, 128, 8, 2), (64, 64, 8, 2)],
    ("stats", 256, True): [(32, 64, 8, 2), (32, 32, 4, 2)],
}

_KERNELS: dict = {}
_WARNED: set = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _env_flag(name: str) -> Optional[bool]:
    v = os.environ.get(name)
    if v is None or v.strip() == "":
        return None
    return v.strip().lower() not in ("0", "false", "no", "off")


def _interpret_mode() -> bool:
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # older triton without knobs
        return bool(_env_flag("TRITON_INTERPRET"))


def _autotune_enabled() -> bool:
    flag = _env_flag("COMPACTOR_AUTOTUNE")
    return True if flag is None else flag


def _get_kernels(interpret: bool, autotune: bool, head_dim: int, fp32: bool):
    """(fwd, stats) kernel objects for the mode; jit-wrapped lazily and cached.

    triton.jit picks compiled vs interpreted at wrap time, hence the lazy wrapping. Autotuned variants get
    one autotuner per (head dim, fp32) with the config lists above; triton also keys its tuning cache on
    HAS_QPOS / DOT_PRECISION and the tensor dtypes.
    """
    key = (interpret, autotune, head_dim if autotune else None, fp32 if autotune else None)
    if key not in _KERNELS:
        fwd = triton.jit(_fwd_kernel)
        stats = triton.jit(_stats_kernel)
        if autotune and not interpret:
            tune_key = ["HEAD_DIM", "HAS_QPOS", "DOT_PRECISION"]

            def cfgs(which):
                return [
                    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                    for bm, bn, w, s in _CONFIGS[(which, head_dim, fp32)]
                ]

            fwd = triton.autotune(configs=cfgs("fwd"), key=tune_key)(fwd)
            stats = triton.autotune(configs=cfgs("stats"), key=tune_key)(stats)
        _KERNELS[key] = (fwd, stats)
    return _KERNELS[key]


def _alloc_output(shape, device) -> torch.Tensor:
    """Output allocation (tests replace this with a NaN fill to check every element is written)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


@torch.no_grad()
def attention_stats_triton(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: Optional[float] = None,
    query_pos: Optional[torch.Tensor] = None,
    *,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
) -> AttentionStats:
    """Triton implementation (two kernels). Same contract as :func:`attention_stats_torch`.

    ``block_m`` / ``block_n`` (keyword-only, powers of two >= 16) override the tile sizes of both passes
    and switch autotuning off; pass 1 tiles BLOCK_M queries x BLOCK_N keys, pass 2 streams BLOCK_M queries
    past BLOCK_N resident keys. Without them CUDA launches autotune over a few Hopper configurations
    keyed on (d, dtype, causal, tf32) unless ``COMPACTOR_AUTOTUNE=0`` (then fixed defaults).
    """
    if not _HAS_TRITON:
        raise RuntimeError("attention_stats_triton needs the `triton` package, which is not importable here")
    B, n, T, d, scale, qpos = _check_inputs(queries, keys, values, scale, query_pos)
    if d not in TRITON_HEAD_DIMS:
        raise ValueError(
            f"attention_stats_triton supports head dims {TRITON_HEAD_DIMS} (a power of two, tl.constexpr); got d={d}"
        )
    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        if blk is not None and (blk < 16 or blk & (blk - 1)):
            raise ValueError(f"{name} must be a power of two >= 16, got {blk}")
    dev = queries.device
    interpret = _interpret_mode()
    if dev.type != "cuda" and not interpret:
        raise RuntimeError(
            f"attention_stats_triton got {dev.type} tensors: Triton needs CUDA tensors, "
            "or TRITON_INTERPRET=1 to run the interpreter on CPU"
        )

    if queries.stride(-1) != 1:
        queries = queries.contiguous()
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    if values.stride(-1) != 1:
        values = values.contiguous()

    has_qpos = qpos is not None
    if has_qpos:
        # clamp: positions >= T-1 mean "all keys"; keeps the int32 comparisons in range
        qp = qpos.clamp(max=T - 1).to(torch.int32).contiguous()
        qp_strides = (0 if qp.shape[0] == 1 else qp.stride(0), qp.stride(1))
        # pass-2 loop start per key: first query with position >= j where a problem's positions are
        # sorted (context queries usually are), else 0 (all query blocks, masked)
        is_sorted = (qp[:, 1:] >= qp[:, :-1]).all(dim=1, keepdim=True)
        key_ids = torch.arange(T, dtype=torch.int32, device=dev).expand(qp.shape[0], T).contiguous()
        qstart = torch.where(is_sorted, torch.searchsorted(qp, key_ids, out_int32=True), 0).to(torch.int32)
        qs_strides = (0 if qstart.shape[0] == 1 else qstart.stride(0), qstart.stride(1))
    else:
        qp = qstart = torch.zeros(1, dtype=torch.int32, device=dev)  # unused placeholder pointers
        qp_strides = qs_strides = (0, 0)

    out = _alloc_output((B, n, d), dev)
    lse = _alloc_output((B, n), dev)
    p_rms = _alloc_output((B, T), dev)
    p_max = _alloc_output((B, T), dev)

    if queries.dtype == torch.float32:
        if dev.type != "cuda":
            dot_precision = "ieee"  # the interpreter multiplies exactly anyway
        elif _env_flag("COMPACTOR_TF32") is False:
            dot_precision = "tf32x3"  # ~float32 accuracy on tensor cores ("ieee" spills badly)
        else:
            dot_precision = "tf32"
    else:
        dot_precision = "tf32"  # triton's default; only affects float32 operands
    # triton's interpreter keeps bfloat16 as raw uint16 bits and its tl.dot multiplies those: upcast there
    upcast = bool(interpret and queries.dtype == torch.bfloat16)
    qk_scale2 = scale * _LOG2E
    fixed = block_m is not None or block_n is not None
    autotune = (not fixed) and (not interpret) and _autotune_enabled()
    fwd, stats = _get_kernels(interpret, autotune, d, queries.dtype == torch.float32)

    fwd_args = (
        queries, keys, values, qp, out, lse,
        n, T, qk_scale2,
        queries.stride(0), queries.stride(1), queries.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        qp_strides[0], qp_strides[1],
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
    )
    stats_args = (
        queries, keys, qp, qstart, lse, p_rms, p_max,
        n, T, qk_scale2, 1.0 / n,
        queries.stride(0), queries.stride(1), queries.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2),
        qp_strides[0], qp_strides[1],
        qs_strides[0], qs_strides[1],
        lse.stride(0), lse.stride(1),
        p_rms.stride(0), p_rms.stride(1),
    )
    consts = dict(HEAD_DIM=d, HAS_QPOS=has_qpos, DOT_PRECISION=dot_precision, UPCAST=upcast)

    ctx = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    with ctx:
        if autotune:
            fwd[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), B)](*fwd_args, **consts)
            stats[lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B)](*stats_args, **consts)
        else:
            bm, bn, w, s = _CONFIGS[("fwd", d, queries.dtype == torch.float32)][0]
            bm = block_m or bm
            bn = block_n or bn
            fwd[(triton.cdiv(n, bm), B)](*fwd_args, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, **consts)
            bm, bn, w, s = _CONFIGS[("stats", d, queries.dtype == torch.float32)][0]
            bm = block_m or bm
            bn = block_n or bn
            stats[(triton.cdiv(T, bn), B)](*stats_args, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, **consts)
    return AttentionStats(out, lse, p_rms, p_max)


# ----------------------------------------------------------------------------------------------
# dispatcher
# ----------------------------------------------------------------------------------------------


def _use_triton(queries: torch.Tensor) -> bool:
    forced = _env_flag("COMPACTOR_TRITON")
    if forced is False:
        return False
    if forced is True:
        if not _HAS_TRITON:
            _warn_once("no-triton-forced", "COMPACTOR_TRITON=1 but triton is not importable; using the torch reference")
            return False
        return True
    if not (isinstance(queries, torch.Tensor) and queries.is_cuda):
        return False
    if not _HAS_TRITON:
        _warn_once("no-triton", "triton is not importable; attention_stats falls back to the torch reference on CUDA")
        return False
    if queries.dim() == 3 and queries.shape[-1] not in TRITON_HEAD_DIMS:
        _warn_once(
            f"head-dim-{queries.shape[-1]}",
            f"attention_stats: head dim {queries.shape[-1]} is not one of {TRITON_HEAD_DIMS}; "
            "using the torch reference",
        )
        return False
    return True


def attention_stats(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: Optional[float] = None,
    query_pos: Optional[torch.Tensor] = None,
) -> AttentionStats:
    """Attention outputs, lse and per-key weight statistics; see the module docstring.

    queries (B, n, d), keys/values (B, T, d), one float dtype; query_pos None or int (B, n)/(n,) with
    query i seeing keys j <= query_pos[..., i]. Returns float32 (out (B,n,d), lse (B,n), p_rms (B,T),
    p_max (B,T)). Triton on CUDA (or with COMPACTOR_TRITON=1), torch otherwise.
    """
    if _use_triton(queries):
        return attention_stats_triton(queries, keys, values, scale, query_pos)
    return attention_stats_torch(queries, keys, values, scale, query_pos)
