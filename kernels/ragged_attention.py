"""Attention over a ragged, beta-biased, possibly quantized compacted prefix followed by dense appended tokens.

For a batch of B sequences that all continue one compacted document (a `RaggedPrefix`, shared), query head
hq = h*G + g (GQA: the G query heads of KV head h share it), query i of the last Lq appended tokens:

    keys seen  = the prefix entries of head h (offsets[h]:offsets[h+1]) with score q.k*scale + beta_j,
                 the exact segment of head h (score q.k*scale + exact_beta),
                 the appended tokens j of sequence b with j <= L_app - Lq + i (causal, aligned bottom-right)
                 and app_mask[b, j] true (left padding);
    out        = softmax over all of them, times the values.
A query that sees no key at all (an empty head and everything else masked) gets out = 0.

Entry points, one signature ``(queries, prefix, app_keys=None, app_values=None, app_mask=None, scale=None)``:
- :func:`ragged_attention_torch`: plain-torch reference, float32 math: dequantize the prefix, then attend.
- :func:`ragged_attention_triton`: the Triton kernels (below).
- :func:`ragged_attention`: dispatch, Triton for CUDA tensors (or everywhere with COMPACTOR_TRITON=1, which on
  CPU also needs TRITON_INTERPRET=1), torch otherwise; COMPACTOR_TRITON=0 forces torch.

Shapes: queries (B, Hq, Lq, d) float32/float16/bfloat16 (any strides, last dim contiguous);
app_keys/app_values (B, Hkv, L_app, d) in the queries' dtype (any strides: views of a larger static cache are
read in place), L_app >= Lq; app_mask (B, L_app) bool (True = a real token) or None. Returns (B, Lq, Hq, d) in
the queries' dtype: the layout a transformers attention function returns.

Triton, one online-softmax pass per split, then a combine (flash-decoding style split-K):
1. `_partial_kernel`, grid (row tiles, Hkv, slots). A KV head's query rows are (b, i, g) flattened, G query
   heads of one position next to each other, so one tile holds every query head of its group. Slots are
   - prefix chunks of `chunk` entries of head h: ONE program reads its chunk for the rows of EVERY sequence of
     the batch (the prefix is read once per KV head and row tile, never once per sequence);
   - the exact segment of head h (all sequences);
   - chunks of `chunk` appended tokens of one sequence (its own rows only).
   Each writes (running max, sum, accumulator) per row. Codes are read as stored and dequantized in registers
   to the queries' dtype for tl.dot (float32 accumulation), as the loader would have dequantized them:
   * lloyd keys: the query is rotated instead of the keys, exact since R is orthogonal:
     q.(mean + g R^T c) = q.mean + g (R q).c; each prefix program computes R q itself (one (rows x d) @ (d x d)
     product: +-1 Hadamard entries in the queries' 16-bit dtype, exact; float32 otherwise, see `_query_rotation`);
     4-bit codes with 16-bit queries decode two at a time from a 256-entry table of centroid pairs (`_pair_table`);
   * q8_0/q4_0: read as 16-bit words (2 int8 or 4 nibbles per load); q4_0 tiles keep a word's nibbles together
     (`_natural_col`), the query is loaded in that column order;
   * lloyd values: sum_j p_j g_j c_j is accumulated in rotated space (g folded into p) and un-rotated once in
     the combine step, plus mean * sum_j p_j;
   * q8_0/q4_0: fp16 block scale times int8 / (nibble - 8), blocks byte for byte as llama.cpp writes them.
2. `_combine_kernel`, grid (row tiles, Hkv): merges a row's slots (log-sum-exp), un-rotates lloyd values with
   a float32 (rows x d) @ (d x d) product (KC rotated coordinates at a time), normalises and writes (B, Lq, Hq, d).
Decode (Lq = 1) and prefill (Lq = hundreds) are the same kernels with different tiles: `chunk` is chosen so
the grid holds about two programs per SM (`_pick_config`).

Numerics: scores and softmax in float32 (log2 domain); dot operands in the queries' dtype (16-bit queries: keys,
values and p rounded to it as in flash attention; float32 queries: TF32 on the GPU, COMPACTOR_TF32=0 for 3xTF32;
exact float32 under the interpreter); beta added in float32.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from typing import Optional

import torch

from .ragged_prefix import CODECS, RaggedPrefix

try:  # triton is optional: CPU-only installs run the torch reference.
    import triton
    import triton.language as tl

    _HAS_TRITON = True
    _jit = triton.jit

    def _jit_sizes(*names):
        """triton.jit that does not specialise on the sizes `names` (appended length, batch, splits change from
        call to call: no recompilation when they do)."""
        return triton.jit(do_not_specialize=list(names))
except Exception:  # pragma: no cover - depends on the install
    triton = None
    _HAS_TRITON = False

    class tl:  # noqa: N801 - stub so the annotations below still evaluate
        constexpr = None

    def _jit(fn):
        return fn

    def _jit_sizes(*names):
        return _jit

__all__ = ["ragged_attention", "ragged_attention_torch", "ragged_attention_triton"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CODEC_ID = {name: i for i, name in enumerate(CODECS)}  # raw 0, lloyd 1, q8_0 2, q4_0 3
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# input checking
# ----------------------------------------------------------------------------------------------


def _check_inputs(queries, prefix, app_keys, app_values, app_mask, scale):
    """Validate; returns (B, Hq, Lq, d, Hkv, L_app, scale)."""
    if not isinstance(queries, torch.Tensor) or queries.dim() != 4:
        raise ValueError(f"queries must be a 4-D tensor (B, Hq, Lq, d), got {getattr(queries, 'shape', queries)}")
    if queries.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"queries have dtype {queries.dtype}; expected float32, float16 or bfloat16")
    B, Hq, Lq, d = queries.shape
    if min(B, Hq, Lq, d) < 1:
        raise ValueError(f"empty queries {tuple(queries.shape)}")
    if prefix is None and app_keys is None:
        raise ValueError("nothing to attend to: no prefix and no appended tokens")
    Hkv = None
    if prefix is not None:
        if not isinstance(prefix, RaggedPrefix):
            raise ValueError(f"prefix must be a RaggedPrefix, got {type(prefix).__name__}")
        if prefix.head_dim != d:
            raise ValueError(f"head-dim mismatch: queries d={d}, prefix d={prefix.head_dim}")
        if prefix.device != queries.device:
            raise ValueError(f"prefix is on {prefix.device}, queries on {queries.device}")
        Hkv = prefix.num_kv_heads
    L_app = 0
    if (app_keys is None) != (app_values is None):
        raise ValueError("app_keys and app_values go together")
    if app_keys is not None:
        if app_keys.dim() != 4 or app_keys.shape != app_values.shape:
            raise ValueError(f"app_keys {tuple(app_keys.shape)} and app_values {tuple(app_values.shape)} must both be"
                             " (B, Hkv, L_app, d)")
        if app_keys.shape[0] != B or app_keys.shape[-1] != d or (Hkv is not None and app_keys.shape[1] != Hkv):
            raise ValueError(f"app_keys {tuple(app_keys.shape)} do not match queries {tuple(queries.shape)}"
                             + ("" if Hkv is None else f" and the prefix's {Hkv} KV heads"))
        if app_keys.dtype != queries.dtype or app_values.dtype != queries.dtype:
            raise ValueError(f"appended keys/values must have the queries' dtype {queries.dtype}")
        if app_keys.device != queries.device or app_values.device != queries.device:
            raise ValueError("appended keys/values must be on the queries' device")
        Hkv, L_app = app_keys.shape[1], app_keys.shape[2]
        if L_app < Lq:
            raise ValueError(f"the {Lq} queries must be the last of the {L_app} appended tokens (L_app >= Lq)")
    if app_mask is not None:
        if app_keys is None:
            raise ValueError("app_mask without appended tokens")
        if tuple(app_mask.shape) != (B, L_app):
            raise ValueError(f"app_mask has shape {tuple(app_mask.shape)}, expected ({B}, {L_app})")
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} KV heads")
    scale = d ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return B, Hq, Lq, d, Hkv, L_app, scale


# ----------------------------------------------------------------------------------------------
# plain-torch reference
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def ragged_attention_torch(queries: torch.Tensor, prefix: Optional[RaggedPrefix], app_keys=None, app_values=None,
                           app_mask=None, scale: Optional[float] = None) -> torch.Tensor:
    """Reference: dequantize the prefix to float32 and attend one KV head at a time in float32."""
    B, Hq, Lq, d, Hkv, L_app, scale = _check_inputs(queries, prefix, app_keys, app_values, app_mask, scale)
    G, dev = Hq // Hkv, queries.device
    out = torch.zeros(B, Lq, Hq, d, dtype=torch.float32, device=dev)
    if prefix is not None:
        keys, values = prefix.dequantize()
        offsets = prefix.host_offsets()
    if L_app:
        i = torch.arange(Lq, device=dev)[:, None] + (L_app - Lq)
        visible = torch.arange(L_app, device=dev)[None, :] <= i  # (Lq, L_app)
        visible = visible.expand(B, Lq, L_app)
        if app_mask is not None:
            visible = visible & app_mask.to(device=dev, dtype=torch.bool)[:, None, :]
        app_bias = torch.zeros(B, 1, Lq, L_app, device=dev).masked_fill(~visible[:, None], float("-inf"))
    for h in range(Hkv):
        q = queries[:, h * G:(h + 1) * G].float()  # (B, G, Lq, d)
        s_parts, v_parts = [], []
        if prefix is not None:
            lo, hi = offsets[h], offsets[h + 1]
            k, v, beta = keys[lo:hi], values[lo:hi], prefix.beta[lo:hi]
            if prefix.num_exact:
                k = torch.cat([k, prefix.exact_keys[h]])
                v = torch.cat([v, prefix.exact_values[h]])
                beta = torch.cat([beta, prefix.exact_beta[h]])
            s_parts.append(q @ k.T * scale + beta)
            v_parts.append(v[None, None].expand(B, G, -1, d))
        if L_app:
            ka, va = app_keys[:, h].float(), app_values[:, h].float()  # (B, L_app, d)
            s_parts.append(q @ ka[:, None].transpose(-1, -2) * scale + app_bias)
            v_parts.append(va[:, None].expand(B, G, L_app, d))
        s = torch.cat(s_parts, dim=-1)  # (B, G, Lq, n_keys)
        if s.shape[-1] == 0:  # an empty head and nothing appended: out stays 0
            continue
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        l = p.sum(-1, keepdim=True)
        o = (p @ torch.cat(v_parts, dim=-2)) / torch.where(l > 0, l, torch.ones_like(l))
        out[:, :, h * G:(h + 1) * G] = o.transpose(1, 2)
    return out.to(queries.dtype)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@_jit
def _dot_operand(x, DOT_TY: tl.constexpr, UPCAST: tl.constexpr):
    """Round to the dot dtype; under the interpreter (which multiplies bf16 bit patterns) go back to float32."""
    x = x.to(DOT_TY)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@_jit
def _natural_col(c, CODEC: tl.constexpr):
    """Head-dim coordinate held in column c of a dequantized tile. q4_0 tiles keep the four nibbles of each 16-bit
    word together: column blk*32 + 4j + 2t + s holds coordinate blk*32 + 2j + t + 16s; every other codec the
    natural order."""
    if CODEC == 3:
        return (c // 32) * 32 + ((c % 32) // 4) * 2 + (c // 2) % 2 + (c % 2) * 16
    else:
        return c


@_jit
def _dequant_tile(X, XS, CENT, rows, row_ok, row_stride, D: tl.constexpr, BLOCK_N: tl.constexpr,
                  BD: tl.constexpr, CODEC: tl.constexpr, BITS: tl.constexpr, PAIR: tl.constexpr,
                  DOT_TY: tl.constexpr):
    """(BLOCK_N, BD) tile of stored rows `rows` in the column order of `_natural_col`: raw values (stored dtype),
    lloyd centroids (float32, or DOT_TY with PAIR; gain not applied), q8_0/q4_0 dequantized (float32). Columns >= D
    are 0, except lloyd's, which may hold a finite centroid (multiplied by 0 wherever they are used). X points at
    the data (int16 view for q8_0/q4_0), XS at the same bytes viewed as float16 (block scales); row_stride in
    elements of X.

    Fast paths read whole rows with wide loads and decode several codes per load:
    - lloyd widths 1, 2, 4, 8 (a byte holds 8/BITS codes): one load of the row's bytes, shifts, one centroid gather
      per code, interleaved back with tl.join; with PAIR (4-bit codes, 16-bit dot operands) CENT is a 256-entry
      table of both centroids of a byte as two DOT_TY values in one int32: one gather per two codes;
    - q8_0/q4_0: 16-bit loads (a block is 2-byte aligned), 2 int8 or 4 nibbles per load;
    other lloyd widths (codes straddling bytes) read one or two bytes per code."""
    if CODEC == 0:
        c = tl.arange(0, BD)
        x = tl.load(X + rows.to(tl.int64)[:, None] * row_stride + c[None, :],
                    mask=row_ok[:, None] & (c < D)[None, :], other=0.0)
    elif CODEC == 1:
        r = rows.to(tl.int64) * row_stride
        if (BITS == 1 or BITS == 2 or BITS == 4 or BITS == 8) and (D * BITS) % 8 == 0:
            PER: tl.constexpr = 8 // BITS  # codes per byte
            W: tl.constexpr = BD // PER if BD >= PER else 1
            j = tl.arange(0, W)
            byte = tl.load(X + r[:, None] + j[None, :], mask=row_ok[:, None] & (j < D // PER)[None, :],
                           other=0).to(tl.int32)
            if PER == 1:
                x = tl.load(CENT + byte)
            elif PER == 2:
                if PAIR:
                    pair = tl.load(CENT + byte)
                    c0 = (pair & 0xFFFF).to(tl.int16).to(DOT_TY, bitcast=True)
                    c1 = (pair >> 16).to(tl.int16).to(DOT_TY, bitcast=True)
                    x = tl.reshape(tl.join(c0, c1), (BLOCK_N, BD))
                else:
                    c0 = tl.load(CENT + (byte & 15))
                    c1 = tl.load(CENT + (byte >> 4))
                    x = tl.reshape(tl.join(c0, c1), (BLOCK_N, BD))
            elif PER == 4:
                c0 = tl.load(CENT + (byte & 3))
                c1 = tl.load(CENT + ((byte >> 2) & 3))
                c2 = tl.load(CENT + ((byte >> 4) & 3))
                c3 = tl.load(CENT + (byte >> 6))
                x = tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), (BLOCK_N, BD))
            else:  # 8 one-bit codes per byte
                b0 = tl.join(tl.join(tl.load(CENT + (byte & 1)), tl.load(CENT + ((byte >> 4) & 1))),
                             tl.join(tl.load(CENT + ((byte >> 2) & 1)), tl.load(CENT + ((byte >> 6) & 1))))
                b1 = tl.join(tl.join(tl.load(CENT + ((byte >> 1) & 1)), tl.load(CENT + ((byte >> 5) & 1))),
                             tl.join(tl.load(CENT + ((byte >> 3) & 1)), tl.load(CENT + (byte >> 7))))
                x = tl.reshape(tl.join(b0, b1), (BLOCK_N, BD))
        else:
            c = tl.arange(0, BD)[None, :]
            ok = row_ok[:, None] & (c < D)
            bit = c * BITS
            byte = bit // 8
            shift = bit % 8
            word = tl.load(X + r[:, None] + byte, mask=ok, other=0).to(tl.int32)
            hi = tl.load(X + r[:, None] + byte + 1, mask=ok & (shift + BITS > 8), other=0).to(tl.int32)
            code = ((word | (hi << 8)) >> shift) & ((1 << BITS) - 1)
            x = tl.load(CENT + code)
    else:  # llama.cpp blocks: q8_0 = 17 int16 words (fp16 scale, 16 x 2 int8), q4_0 = 9 (scale, 8 x 4 nibbles)
        NB: tl.constexpr = BD // 32
        WORDS: tl.constexpr = 17 if CODEC == 2 else 9
        HALF: tl.constexpr = 16 if CODEC == 2 else 8
        r = rows * row_stride  # int32: a layer's codes stay far below 2^31 bytes
        blk = tl.arange(0, NB)
        w = tl.arange(0, HALF)
        ok = row_ok[:, None] & (blk < D // 32)[None, :]
        base = r[:, None] + (blk * WORDS)[None, :]
        word = tl.load(X + base[:, :, None] + 1 + w[None, None, :], mask=ok[:, :, None], other=0).to(tl.int32)
        sc = tl.load(XS + base, mask=ok, other=0.0).to(tl.float32)
        if CODEC == 2:  # bytes 2j, 2j+1 of the block: coordinates 2j, 2j+1
            q = tl.join((word << 24) >> 24, word >> 8).to(tl.float32)
            x = tl.reshape(q * sc[:, :, None, None], (BLOCK_N, BD))
        else:  # nibbles of word j: q_2j, q_2j+16, q_2j+1, q_2j+17 (see _natural_col)
            off = -8.0 * sc
            n0 = tl.join(word & 15, (word >> 8) & 15)
            n1 = tl.join((word >> 4) & 15, (word >> 12) & 15)
            q = tl.join(n0, n1).to(tl.float32)
            x = tl.reshape(q * sc[:, :, None, None, None] + off[:, :, None, None, None], (BLOCK_N, BD))
    return x


@_jit
def _softmax_step(s, m_i, l_i):
    """One online-softmax step in the log2 domain; returns (p, alpha, m_new, l_new). Safe when a whole row of s
    is -inf (masked) and m_i is still -inf."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_new = l_i * alpha + tl.sum(p, axis=1)
    return p, alpha, m_new, l_new


@_jit
def _prefix_chunk(q_dot, qm, lo, hi, BETA, KX, KS, KGAIN, KCENT, k_stride, VX, VS, VGAIN, VCENT, v_stride,
                  qk_scale2, D: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BD: tl.constexpr,
                  K_CODEC: tl.constexpr, K_BITS: tl.constexpr, V_CODEC: tl.constexpr, V_BITS: tl.constexpr,
                  K_PAIR: tl.constexpr, V_PAIR: tl.constexpr,
                  DOT_TY: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over prefix entries lo:hi (global rows) for one row tile. q_dot is in the keys' column
    order, the returned accumulator in the values' (see _natural_col)."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BD], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        ok = cols < hi
        k = _dequant_tile(KX, KS, KCENT, cols, ok, k_stride, D, BLOCK_N, BD, K_CODEC, K_BITS, K_PAIR, DOT_TY)
        s = tl.dot(q_dot, tl.trans(_dot_operand(k, DOT_TY, UPCAST)), input_precision=DOT_PRECISION)
        beta = tl.load(BETA + cols, mask=ok, other=float("-inf"))
        if K_CODEC == 1:  # q.(mean + g R^T c) = q.mean + g (R q).c
            gk = tl.load(KGAIN + cols, mask=ok, other=0.0).to(tl.float32)
            s = (s * gk[None, :] + qm[:, None]) * qk_scale2 + beta[None, :] * 1.4426950408889634
        else:
            s = s * qk_scale2 + beta[None, :] * 1.4426950408889634
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i)
        v = _dequant_tile(VX, VS, VCENT, cols, ok, v_stride, D, BLOCK_N, BD, V_CODEC, V_BITS, V_PAIR, DOT_TY)
        if V_CODEC == 1:  # accumulate sum p g c in rotated space; the combine un-rotates
            gv = tl.load(VGAIN + cols, mask=ok, other=0.0).to(tl.float32)
            p = p * gv[None, :]
        pv = tl.dot(_dot_operand(p, DOT_TY, UPCAST), _dot_operand(v, DOT_TY, UPCAST), input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv
    return m_i, l_i, acc


@_jit
def _dense_chunk(q_dot, last_key, lo, hi, K, V, BETA, MASK, k_stride, v_stride, offs_d, d_ok, qk_scale2,
                 HAS_BETA: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_TY: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over dense keys lo:hi (rows of K/V with the given row strides); row r of the tile sees key
    j only if j <= last_key[r] (CAUSAL) and MASK[j] != 0 (HAS_MASK); beta added if HAS_BETA."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        ok = cols < hi
        tile_ok = ok[:, None] & d_ok[None, :]
        k = tl.load(K + cols.to(tl.int64)[:, None] * k_stride + offs_d[None, :], mask=tile_ok, other=0.0)
        s = tl.dot(q_dot, tl.trans(_dot_operand(k, DOT_TY, UPCAST)), input_precision=DOT_PRECISION)
        s = s * qk_scale2
        if HAS_BETA:
            beta = tl.load(BETA + cols, mask=ok, other=float("-inf"))
            s = s + beta[None, :] * 1.4426950408889634
        vis = ok[None, :]
        if CAUSAL:
            vis = vis & (cols[None, :] <= last_key[:, None])
        if HAS_MASK:
            keep = tl.load(MASK + cols, mask=ok, other=0)
            vis = vis & (keep != 0)[None, :]
        s = tl.where(vis, s, float("-inf"))
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i)
        v = tl.load(V + cols.to(tl.int64)[:, None] * v_stride + offs_d[None, :], mask=tile_ok, other=0.0)
        pv = tl.dot(_dot_operand(p, DOT_TY, UPCAST), _dot_operand(v, DOT_TY, UPCAST), input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv
    return m_i, l_i, acc


@_jit_sizes("B", "Lq", "L_app", "E", "n_items", "n_app", "chunk", "M_all")
def _partial_kernel(
    Q, ITEMS, BETA,
    KX, KS, KGAIN, KMEAN, KCENT, KROT, VX, VS, VGAIN, VCENT,
    EK, EV, EBETA,
    AK, AV, AMASK,
    PM, PL, PACC,
    B, Lq, L_app, E, n_items, n_app, chunk, M_all, Hkv, qk_scale2, rot_scale,
    s_qb, s_qh, s_qi,
    k_stride, v_stride, s_km,
    s_akb, s_akh, s_akl, s_avb, s_avh, s_avl, s_mb,
    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    K_CODEC: tl.constexpr, K_BITS: tl.constexpr, V_CODEC: tl.constexpr, V_BITS: tl.constexpr,
    K_PAIR: tl.constexpr, V_PAIR: tl.constexpr,
    HAS_EXACT: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROT_PRECISION: tl.constexpr,
):
    """One (row tile, work item): partial (max, sum, acc) of its rows over the item's keys. Items, in order:
    prefix chunks (ITEMS = [head; first entry; end] per chunk, only the chunks a head has: ragged heads launch no
    empty programs) for the rows of EVERY sequence; the exact segment of each head (HAS_EXACT); chunks of
    `chunk` appended tokens of one sequence and head (that sequence's rows only)."""
    pid_m = tl.program_id(0)
    item = tl.program_id(1)
    DOT_TY: tl.constexpr = Q.dtype.element_ty
    rows_per_seq = G * Lq
    n_exact = Hkv * HAS_EXACT
    if item < n_items:  # prefix chunk: the rows of every sequence
        h = tl.load(ITEMS + item)
        seq = 0
        row0 = 0
        n_rows = M_all
        buf = item
    elif item < n_items + n_exact:  # exact segment of head h
        h = item - n_items
        seq = 0
        row0 = 0
        n_rows = M_all
        buf = item
    else:  # appended chunk `a` of sequence `seq`, head h: that sequence's rows only
        t = item - n_items - n_exact
        h = t // (B * n_app)
        seq = (t // n_app) % B
        row0 = seq * rows_per_seq
        n_rows = rows_per_seq
        buf = n_items + n_exact + h * n_app + t % n_app
    local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = local < n_rows
    r = row0 + local
    b = r // rows_per_seq
    i = (r // G) % Lq
    hq = h * G + r % G
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_off = b.to(tl.int64) * s_qb + hq.to(tl.int64) * s_qh + i.to(tl.int64) * s_qi
    v_cols = offs_d

    if item < n_items:
        lo = tl.load(ITEMS + n_items + item)
        hi = tl.load(ITEMS + 2 * n_items + item)
        if K_CODEC == 1:  # R q in-program: (rows x d) @ R^T, exact for 16-bit queries (R^T*sqrt(d) is +-1)
            q = tl.load(Q + q_off[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            ROT_TY: tl.constexpr = KROT.dtype.element_ty
            rt = tl.load(KROT + offs_d[:, None] * D + offs_d[None, :], mask=d_ok[:, None] & d_ok[None, :],
                         other=0.0)
            q_rot = tl.dot(_dot_operand(q, ROT_TY, UPCAST), _dot_operand(rt, ROT_TY, UPCAST),
                           input_precision=ROT_PRECISION) * rot_scale
            mean = tl.load(KMEAN + h * s_km + offs_d, mask=d_ok, other=0.0).to(tl.float32)
            qm = tl.sum(q.to(tl.float32) * mean[None, :], axis=1)
            q_dot = _dot_operand(q_rot, DOT_TY, UPCAST)
        else:  # the query in the keys' column order
            k_cols = _natural_col(offs_d, K_CODEC)
            q = tl.load(Q + q_off[:, None] + k_cols[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            qm = tl.zeros([BLOCK_M], dtype=tl.float32)
            q_dot = _dot_operand(q, DOT_TY, UPCAST)
        m_i, l_i, acc = _prefix_chunk(q_dot, qm, lo, hi, BETA, KX, KS, KGAIN, KCENT, k_stride,
                                      VX, VS, VGAIN, VCENT, v_stride, qk_scale2, D,
                                      BLOCK_M, BLOCK_N, BLOCK_D, K_CODEC, K_BITS, V_CODEC, V_BITS,
                                      K_PAIR, V_PAIR, DOT_TY, UPCAST, DOT_PRECISION)
        v_cols = _natural_col(offs_d, V_CODEC)
    else:
        q = tl.load(Q + q_off[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if item < n_items + n_exact:  # the exact segment of head h: E dense float32 entries with their beta
            last = tl.zeros([BLOCK_M], dtype=tl.int32)
            m_i, l_i, acc = _dense_chunk(_dot_operand(q, DOT_TY, UPCAST), last, 0, E,
                                         EK + h * E * D, EV + h * E * D, EBETA + h * E, AMASK, D, D,
                                         offs_d, d_ok, qk_scale2, True, False, False,
                                         BLOCK_M, BLOCK_N, BLOCK_D, DOT_TY, UPCAST, DOT_PRECISION)
        else:  # appended tokens of sequence `seq`, causal (bottom-right) and padding-masked
            a = (item - n_items - n_exact) % n_app
            last = L_app - Lq + i
            lo = a * chunk
            hi = tl.minimum(tl.minimum(lo + chunk, L_app), tl.max(tl.where(row_ok, last, 0), axis=0) + 1)
            m_i, l_i, acc = _dense_chunk(_dot_operand(q, DOT_TY, UPCAST), last, lo, hi,
                                         AK + seq.to(tl.int64) * s_akb + h * s_akh,
                                         AV + seq.to(tl.int64) * s_avb + h * s_avh,
                                         BETA, AMASK + seq.to(tl.int64) * s_mb, s_akl, s_avl,
                                         offs_d, d_ok, qk_scale2, False, True, HAS_MASK,
                                         BLOCK_M, BLOCK_N, BLOCK_D, DOT_TY, UPCAST, DOT_PRECISION)

    p_off = buf.to(tl.int64) * M_all + r
    tl.store(PM + p_off, m_i, mask=row_ok)
    tl.store(PL + p_off, l_i, mask=row_ok)
    tl.store(PACC + p_off[:, None] * BLOCK_D + v_cols[None, :], acc, mask=row_ok[:, None])


@_jit
def _slot_ids(s, first, n_h, h, HAS_EXACT: tl.constexpr, n_items, n_exact, n_app):
    """Partial-buffer index of slot s of head h: its prefix chunks, its exact segment, its appended chunks."""
    e = s - n_h
    return tl.where(s < n_h, first + s,
                    tl.where(e < HAS_EXACT, n_items + h, n_items + n_exact + h * n_app + e - HAS_EXACT))


@_jit_sizes("Lq", "n_items", "n_app", "M_all")
def _combine_kernel(
    PM, PL, PACC, HEAD_FIRST, VMEAN, VROT, OUT,
    Lq, M_all, n_items, n_app, Hkv,
    s_vm, s_ob, s_oi, s_oh,
    G: tl.constexpr, D: tl.constexpr, CM: tl.constexpr, SA: tl.constexpr, SB: tl.constexpr, SC: tl.constexpr,
    KC: tl.constexpr, BLOCK_D: tl.constexpr, V_LLOYD: tl.constexpr, HAS_EXACT: tl.constexpr,
    ROT_PRECISION: tl.constexpr,
):
    """Merge every slot of CM rows of KV head h (grid (Hkv, row tiles)), un-rotate lloyd values, normalise,
    write (B, Lq, Hq, d). Slots are read as whole blocks (SA x CM maxima and sums, SB x CM x d accumulators),
    so a head's dozens of slots take a few dependent loads rather than one per slot.

    1. each row's max m and normaliser over all slots;
    2. sum_s exp2(m_s - m) acc_s over the slots whose values are not rotated (all slots for other codecs);
    3. lloyd values: the prefix chunks' accumulators are in rotated space: x = mean * l_rot + (sum_s w_s acc_s) R,
       the rotated sum built KC coordinates at a time and multiplied by those KC rows of R (tl.dot for tiles of
       16 rows or more, broadcast products below)."""
    h = tl.program_id(0)
    rows = tl.program_id(1) * CM + tl.arange(0, CM)
    row_ok = rows < M_all
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    first = tl.load(HEAD_FIRST + h)
    n_h = tl.load(HEAD_FIRST + h + 1) - first
    n_exact = Hkv * HAS_EXACT
    n_slots = n_h + HAS_EXACT + n_app

    m_run = tl.full([CM], float("-inf"), dtype=tl.float32)
    l_run = tl.zeros([CM], dtype=tl.float32)
    l_rot = tl.zeros([CM], dtype=tl.float32)
    for s0 in range(0, n_slots, SA):
        s = s0 + tl.arange(0, SA)
        ok = (s < n_slots)[:, None] & row_ok[None, :]
        off = _slot_ids(s, first, n_h, h, HAS_EXACT, n_items, n_exact, n_app).to(tl.int64)[:, None] * M_all + rows[None, :]
        m = tl.load(PM + off, mask=ok, other=float("-inf"))
        l = tl.load(PL + off, mask=ok, other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_run - m_safe)
        wl = tl.exp2(m - m_safe[None, :]) * l
        l_run = l_run * alpha + tl.sum(wl, axis=0)
        if V_LLOYD:
            l_rot = l_rot * alpha + tl.sum(tl.where((s < n_h)[:, None], wl, 0.0), axis=0)
        m_run = m_new
    m_fin = tl.where(m_run == float("-inf"), 0.0, m_run)

    acc = tl.zeros([CM, BLOCK_D], dtype=tl.float32)
    if V_LLOYD:
        start = n_h
    else:
        start = n_h * 0
    for s0 in range(start, n_slots, SB):
        s = s0 + tl.arange(0, SB)
        ok = (s < n_slots)[:, None] & row_ok[None, :]
        off = _slot_ids(s, first, n_h, h, HAS_EXACT, n_items, n_exact, n_app).to(tl.int64)[:, None] * M_all + rows[None, :]
        w = tl.exp2(tl.load(PM + off, mask=ok, other=float("-inf")) - m_fin[None, :])
        a = tl.load(PACC + off[:, :, None] * BLOCK_D + offs_d[None, None, :], mask=ok[:, :, None], other=0.0)
        acc += tl.sum(w[:, :, None] * a, axis=0)

    if V_LLOYD:
        for k0 in tl.static_range(0, BLOCK_D, KC):
            kk = k0 + tl.arange(0, KC)
            part = tl.zeros([CM, KC], dtype=tl.float32)
            for s0 in range(0, n_h, SC):
                s = s0 + tl.arange(0, SC)
                ok = (s < n_h)[:, None] & row_ok[None, :]
                off = (first + s).to(tl.int64)[:, None] * M_all + rows[None, :]
                w = tl.exp2(tl.load(PM + off, mask=ok, other=float("-inf")) - m_fin[None, :])
                a = tl.load(PACC + off[:, :, None] * BLOCK_D + kk[None, None, :], mask=ok[:, :, None], other=0.0)
                part += tl.sum(w[:, :, None] * a, axis=0)
            rk = tl.load(VROT + kk[:, None] * D + offs_d[None, :], mask=(kk < D)[:, None] & d_ok[None, :], other=0.0)
            if CM >= 16:
                acc += tl.dot(part, rk, input_precision=ROT_PRECISION)
            else:
                acc += tl.sum(part[:, :, None] * rk[None, :, :], axis=1)
        mean = tl.load(VMEAN + h * s_vm + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        acc += l_rot[:, None] * mean[None, :]

    inv_l = 1.0 / tl.where(l_run > 0, l_run, 1.0)
    b = rows // (G * Lq)
    i = (rows // G) % Lq
    hq = h * G + rows % G
    o_off = b.to(tl.int64) * s_ob + i.to(tl.int64) * s_oi + hq.to(tl.int64) * s_oh
    tl.store(OUT + o_off[:, None] + offs_d[None, :], (acc * inv_l[:, None]).to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------


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


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@functools.lru_cache(maxsize=None)
def _placeholder(device: torch.device) -> torch.Tensor:
    """A 1-element buffer passed for pointers a launch does not use (one per device, no kernel per call)."""
    return torch.zeros(1, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=64)
def _query_rotation(rotation: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """(Rt, scale) with R q = scale * (q @ Rt) for queries of `dtype`: for a Hadamard rotation (d a power of two,
    R = H diag(s)/sqrt(d)) and 16-bit queries, Rt = R^T sqrt(d) holds exactly +-1 in the queries' dtype, so the
    products are exact and the dot runs on 16-bit tensor cores; otherwise Rt = R^T in float32."""
    d = rotation.shape[0]
    rt = rotation.t().contiguous()
    if dtype in (torch.float16, torch.bfloat16) and d & (d - 1) == 0:
        pm = rt * math.sqrt(d)
        # a Hadamard rotation: float32 entries +-1/sqrt(d) times sqrt(d) are +-1 up to one rounding (not equal)
        if bool(((pm.abs() - 1).abs() < 1e-4).all()):
            return pm.round().to(dtype).contiguous(), 1.0 / math.sqrt(d)
    return rt.float(), 1.0


@functools.lru_cache(maxsize=64)
def _pair_table(centroids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(256,) int32: for each byte of two 4-bit codes, centroids[b & 15] and centroids[b >> 4] rounded to the 16-bit
    `dtype`, low and high half (what the kernel would round the gathered float32 centroids to anyway)."""
    bits = centroids.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    b = torch.arange(256, device=centroids.device)
    return (bits[b & 15] | (bits[b >> 4] << 16)).to(torch.int32).contiguous()


def _pick_config(M_all: int, n_entries: int, n_heads: int, d: int, device: torch.device,
                 block_m=None, block_n=None, chunk=None, programs_per_sm: float = 2.0):
    """(BLOCK_M, BLOCK_N, chunk, num_warps, num_stages). Decode (few rows): one tile of 16..64 rows and chunks
    small enough for ~`programs_per_sm` programs per SM over the prefix entries; prefill: 64-row tiles, longer
    chunks."""
    bm = block_m or min(64, max(16, _next_pow2(M_all)))
    bn = block_n or (64 if d <= 128 else 32)
    n_tiles = -(-M_all // bm)
    if chunk is None:
        target = max(1, int(programs_per_sm * _num_sms(device)))
        want = -(-n_entries * n_tiles // target)  # entries per program for ~target programs
        chunk = want
    chunk = max(bn, -(-int(chunk) // bn) * bn)
    # 8 warps from d = 128: with 4, the 64 x 128 dequantized tiles and their addresses spill registers
    warps = 8 if d > 64 else 4
    return bm, bn, chunk, warps, 2


def _combine_tiles(M_all: int, block_d: int, combine_rows: Optional[int] = None) -> tuple[int, int, int, int]:
    """(CM rows per combine program, SB and SC slots per block load, KC coordinates per un-rotation step): blocks
    of about 8192 float32 accumulator values (32 registers a thread at 8 warps)."""
    cm = combine_rows or min(16, max(1, _next_pow2(M_all)))
    kc = min(32, block_d)
    sb = max(1, 8192 // (cm * block_d))
    sc = max(1, 8192 // (cm * kc))
    return cm, sb, sc, kc


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Partial and output buffers (tests replace this with a NaN fill to check every element read was written)."""
    return torch.empty(shape, dtype=dtype, device=device)


@torch.no_grad()
def ragged_attention_triton(queries, prefix: Optional[RaggedPrefix], app_keys=None, app_values=None, app_mask=None,
                            scale: Optional[float] = None, *, block_m: Optional[int] = None,
                            block_n: Optional[int] = None, chunk: Optional[int] = None,
                            num_warps: Optional[int] = None, num_stages: Optional[int] = None,
                            programs_per_sm: float = 2.0, combine_rows: Optional[int] = None,
                            pair_table: Optional[bool] = None) -> torch.Tensor:
    """Triton implementation; same contract as :func:`ragged_attention_torch`. Keyword-only tuning knobs:
    block_m (query rows per tile), block_n (keys per inner step), chunk (keys per split; default: about
    `programs_per_sm` programs per SM), num_warps/num_stages, combine_rows (rows per combine program), pair_table
    (4-bit lloyd codes decoded two at a time from a 256-entry table; 16-bit queries and tiles of at most 32 rows
    only)."""
    if not _HAS_TRITON:
        raise RuntimeError("ragged_attention_triton needs the `triton` package, which is not importable here")
    B, Hq, Lq, d, Hkv, L_app, scale = _check_inputs(queries, prefix, app_keys, app_values, app_mask, scale)
    dev = queries.device
    interpret = _interpret_mode()
    if dev.type != "cuda" and not interpret:
        raise RuntimeError(f"ragged_attention_triton got {dev.type} tensors: Triton needs CUDA tensors, "
                           "or TRITON_INTERPRET=1 to run the interpreter on CPU")
    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        if blk is not None and (blk < 16 or blk & (blk - 1)):
            raise ValueError(f"{name} must be a power of two >= 16, got {blk}")
    if combine_rows is not None and (combine_rows < 1 or combine_rows & (combine_rows - 1)):
        raise ValueError(f"combine_rows must be a power of two, got {combine_rows}")
    G = Hq // Hkv
    M_all = B * Lq * G
    n_entries = prefix.num_entries if prefix is not None else 0
    bm, bn, chunk, warps, stages = _pick_config(M_all, n_entries + (L_app if L_app else 0), Hkv, d, dev,
                                                block_m, block_n, chunk, programs_per_sm)
    warps, stages = num_warps or warps, num_stages or stages
    lloyd_keys = prefix is not None and prefix.max_length > 0 and prefix.keys.codec == "lloyd"
    if lloyd_keys and block_m is None and bm > 32 and \
            _query_rotation(prefix.keys.rotation, queries.dtype)[0].dtype == torch.float32:
        bm = 32  # triton 3.6 fails to compile the float32 rotation product in 64-row tiles (OptimizeDotOperands)
    BD = max(16, _next_pow2(d))
    if queries.stride(-1) != 1:
        queries = queries.contiguous()
    if pair_table is None:
        pair_table = True
    # pair tables in 64-row tiles do not compile on triton 3.6 (OptimizeDotOperands): decode-sized tiles only
    pair_ok = pair_table and queries.dtype != torch.float32 and bm <= 32
    if queries.dtype == torch.float32:
        if dev.type != "cuda":
            dot_precision = "ieee"
        elif _env_flag("COMPACTOR_TF32") is False:
            dot_precision = "tf32x3"
        else:
            dot_precision = "tf32"
    else:
        dot_precision = "tf32"  # only affects float32 operands
    rot_precision = "ieee" if dev.type != "cuda" else "tf32x3"  # float32 rotation products: as exact as float32
    upcast = bool(interpret and queries.dtype == torch.bfloat16)

    placeholder = _placeholder(dev)
    K_CODEC = V_CODEC = 0
    K_BITS = V_BITS = 8
    K_PAIR = V_PAIR = False
    E = 0
    kx = ks = kg = km = kc = krot = vx = vs = vg = vc = placeholder
    ek = ev = eb = vrot = vmean = beta = placeholder
    rot_scale = 1.0
    k_stride = v_stride = s_km = s_vm = 0
    items, n_items = placeholder, 0
    head_first = torch.zeros(Hkv + 1, dtype=torch.int32, device=dev) if prefix is None else \
        prefix.work_items(chunk)[1]
    if prefix is not None and prefix.max_length:
        items = prefix.work_items(chunk)[0]
        n_items = items.shape[1]
        beta = prefix.beta
        pk, pv = prefix.keys, prefix.values
        K_CODEC, V_CODEC = _CODEC_ID[pk.codec], _CODEC_ID[pv.codec]
        kx, ks, k_stride = _data_views(pk)
        vx, vs, v_stride = _data_views(pv)
        if pk.codec == "lloyd":
            K_BITS, kg, km, kc = pk.bits, pk.gains, pk.mean, pk.centroids
            s_km = km.stride(0)
            krot, rot_scale = _query_rotation(pk.rotation, queries.dtype)
            K_PAIR = pair_ok and K_BITS == 4 and d % 2 == 0
            if K_PAIR:
                kc = _pair_table(kc, queries.dtype)
        if pv.codec == "lloyd":
            V_BITS, vg, vmean, vc, vrot = pv.bits, pv.gains, pv.mean, pv.centroids, pv.rotation
            s_vm = vmean.stride(0)
            V_PAIR = pair_ok and V_BITS == 4 and d % 2 == 0
            if V_PAIR:
                vc = _pair_table(vc, queries.dtype)
    if prefix is not None and prefix.num_exact:
        E = prefix.num_exact
        ek, ev, eb = prefix.exact_keys.contiguous(), prefix.exact_values.contiguous(), prefix.exact_beta.contiguous()
    has_exact = int(E > 0)
    n_app = -(-L_app // chunk) if L_app else 0
    if L_app:
        ak, av = app_keys, app_values
        if ak.stride(-1) != 1:
            ak = ak.contiguous()
        if av.stride(-1) != 1:
            av = av.contiguous()
        if app_mask is None:
            mask = placeholder
        else:  # a bool mask is read in place (same bytes as int8)
            mask = app_mask.view(torch.int8) if app_mask.dtype == torch.bool else (app_mask != 0).view(torch.int8)
            if mask.stride(-1) != 1:
                mask = mask.contiguous()
    else:
        ak = av = mask = placeholder
    n_work = n_items + Hkv * has_exact + Hkv * B * n_app
    n_buf = n_work - Hkv * B * n_app + Hkv * n_app
    V_LLOYD = V_CODEC == 1

    pm = _alloc((max(n_buf, 1), M_all), torch.float32, dev)
    pl = _alloc((max(n_buf, 1), M_all), torch.float32, dev)
    pacc = _alloc((max(n_buf, 1), M_all, BD), torch.float32, dev)
    out = _alloc((B, Lq, Hq, d), queries.dtype, dev)

    ctx = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    with ctx:
        n_tiles = -(-M_all // bm)
        if n_work:
            _partial_kernel[(n_tiles, n_work)](
                queries, items, beta,
                kx, ks, kg, km, kc, krot, vx, vs, vg, vc,
                ek, ev, eb,
                ak, av, mask,
                pm, pl, pacc,
                B, Lq, L_app, E, n_items, max(n_app, 1), chunk, M_all, Hkv, scale * _LOG2E, rot_scale,
                queries.stride(0), queries.stride(1), queries.stride(2),
                k_stride, v_stride, s_km,
                ak.stride(0) if L_app else 0, ak.stride(1) if L_app else 0, ak.stride(2) if L_app else 0,
                av.stride(0) if L_app else 0, av.stride(1) if L_app else 0, av.stride(2) if L_app else 0,
                mask.stride(0) if app_mask is not None else 0,
                G=G, D=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=BD, K_CODEC=K_CODEC, K_BITS=K_BITS, V_CODEC=V_CODEC,
                V_BITS=V_BITS, K_PAIR=K_PAIR, V_PAIR=V_PAIR, HAS_EXACT=has_exact, HAS_MASK=app_mask is not None, UPCAST=upcast,
                DOT_PRECISION=dot_precision, ROT_PRECISION=rot_precision,
                num_warps=warps, num_stages=stages,
            )
        cm, sb, sc, kc_ = _combine_tiles(M_all, BD, combine_rows)
        _combine_kernel[(Hkv, -(-M_all // cm))](
            pm, pl, pacc, head_first, vmean, vrot, out,
            Lq, M_all, n_items, n_app, Hkv,
            s_vm, out.stride(0), out.stride(1), out.stride(2),
            G=G, D=d, CM=cm, SA=64, SB=sb, SC=sc, KC=kc_, BLOCK_D=BD, V_LLOYD=V_LLOYD, HAS_EXACT=has_exact,
            ROT_PRECISION=rot_precision, num_warps=8,
        )
    return out


def _data_views(part) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(data pointer tensor, float16 view for block scales, row stride in elements of the first)."""
    x = part.data
    if part.codec == "raw":
        if x.stride(-1) != 1:
            x = x.contiguous()
        return x, x, x.stride(0)
    x = x.contiguous()
    if part.codec in ("q8_0", "q4_0"):  # int16 words (blocks are 2-byte aligned) and their fp16 view for scales
        return x.view(torch.int16), x.view(torch.float16), x.shape[1] // 2
    return x, x, x.shape[1]


# ----------------------------------------------------------------------------------------------
# dispatcher
# ----------------------------------------------------------------------------------------------

_WARNED: set = set()


def _use_triton(queries: torch.Tensor) -> bool:
    forced = _env_flag("COMPACTOR_TRITON")
    if forced is False:
        return False
    if not _HAS_TRITON:
        if forced or (isinstance(queries, torch.Tensor) and queries.is_cuda):
            if "no-triton" not in _WARNED:
                _WARNED.add("no-triton")
                warnings.warn("triton is not importable; ragged_attention uses the torch reference", RuntimeWarning,
                              stacklevel=3)
        return False
    return bool(forced) or (isinstance(queries, torch.Tensor) and queries.is_cuda)


def ragged_attention(queries: torch.Tensor, prefix: Optional[RaggedPrefix], app_keys=None, app_values=None,
                     app_mask=None, scale: Optional[float] = None) -> torch.Tensor:
    """Attention over a compacted ragged prefix and the appended tokens; see the module docstring.

    queries (B, Hq, Lq, d); prefix a RaggedPrefix (shared by the B sequences) or None; app_keys/app_values
    (B, Hkv, L_app, d) or None; app_mask (B, L_app) bool or None. Returns (B, Lq, Hq, d) in the queries' dtype.
    Triton on CUDA (or with COMPACTOR_TRITON=1), torch otherwise."""
    if _use_triton(queries):
        return ragged_attention_triton(queries, prefix, app_keys, app_values, app_mask, scale)
    return ragged_attention_torch(queries, prefix, app_keys, app_values, app_mask, scale)
