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
1. `_partial_kernel`, grid (row tiles, slots). A KV head's query rows are (b, i, g) flattened, G query
   heads of one position next to each other, so one tile holds every query head of its group. Slots are
   - a work list of prefix chunks: `chunk` entries of one head, ceil(length/chunk) per head, found in the
     kernel from the device offsets (`_head_items`), so a short head launches no empty programs; ONE program
     reads its chunk for the rows of EVERY sequence of the batch (the prefix is read once per row tile);
   - per KV head: its exact segment (all sequences), then chunks of `chunk` appended tokens of one sequence.
   Each writes (running max, sum, accumulator) per row. Codes are read as stored, as contiguous byte tiles
   per row (`_tile_load`, `_tile_decode`), and dequantized in registers to the queries' dtype for tl.dot (float32
   accumulation), as the loader would have dequantized them:
   * lloyd keys: the query is rotated instead of the keys, exact since R is orthogonal:
     q.(mean + g R^T c) = q.mean + g (R q).c; each prefix program rotates its own rows in its prologue. For
     a power-of-two d <= 128 the rotation is R = H diag(s) / sqrt(d) (quant/hadamard.py), applied by a
     butterfly of float32 additions (`_fwht`: no d x d matrix on chip; `_FWHT = False` keeps the earlier bf16
     tensor-core products, `_times_hadamard`); other d use the stored float32 R (3xTF32; beyond d = 128
     `_rotate_kernel` runs just before). 4-bit centroids for 16-bit queries: byte permutes in inline
     PTX (`_lut4`, ~3 instructions per value; H100: K4V4 decode 2.1-2.4x faster than the select chain);
     otherwise centroids up to 4 bits by a select chain in registers (a gather measured 1.5x slower);
   * lloyd values: sum_j p_j g_j c_j is accumulated in rotated space (g folded into p) and un-rotated once per
     program (Hadamard: ((acc @ H) * s) / sqrt(d) + mean * sum_j p_j, linear, so the merge is the plain one),
     or for other d in the combine step with the stored R;
   * decode tiles (16 rows: the G query heads of one or a few sequences) take the products transposed,
     K q^T and V^T P^T (`_DECODE_SWAP`), so the dequantized tile is the wide operand and the few query rows
     the narrow one; every loop step loads the next block's beta and gains, and the q4_0 codes, one step
     ahead (`_PREFETCH`), since Triton's cp.async stages do not take them (H100 run 9: K4V4 decode at 128k
     38.6 -> 29.1 us, q4_0 39.9 -> 31.5, call 4); their prefix loop is pipelined 3 stages deep (`_prefix_stages`);
     the merge is launched by programmatic dependent launch (`_PDL`);
   * q8_0/q4_0: fp16 block scale times int8 / (nibble - 8), blocks byte for byte as llama.cpp writes them;
     a q4_0 tile holds each block's low and high nibbles side by side, so its columns are a fixed permutation
     of the coordinates (`_tile_coords`): the query is loaded and the accumulator stored in that order.
2. `_combine_kernel`, grid (row tiles, Hkv, column blocks) (decode; for prefill of one sequence the last
   program of each (row tile, KV head) does the merge itself, by an atomic ticket: `_FUSE_COMBINE`, in lanes,
   `_lane_slots`): gathers all the head's buffers in one round of loads (the merge's cost is its dependent L2
   round trips, not its bytes), un-rotates lloyd values of a non-Hadamard d ((rows x d) @ (d x cols) in
   float32), normalises and writes (B, Lq, Hq, d).
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
import warnings
from typing import Optional

import torch

from .attention_stats import _env_flag, _interpret_mode
from .ragged_prefix import CODECS, RaggedPrefix

try:  # triton is optional: CPU-only installs run the torch reference.
    import triton
    import triton.language as tl

    _HAS_TRITON = True
    _jit = triton.jit
    try:  # programmatic dependent launch (sm_90+; triton >= 3.3)
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

        _HAS_GDC = True
    except ImportError:  # pragma: no cover - depends on the install
        _HAS_GDC = False

    def _jit_sizes(*names):
        """triton.jit that does not specialise on the sizes `names` (appended length, batch, splits change from
        call to call: no recompilation when they do)."""
        return triton.jit(do_not_specialize=list(names))
except Exception:  # pragma: no cover - depends on the install
    triton = None
    _HAS_TRITON = False
    _HAS_GDC = False

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
_PROGRAMS_PER_SM = None  # split target override (benchmarks sweep it); None: _pick_config's rule
# lloyd centroids up to 4 bits: a select chain over the codebook in registers (True) or a gather from it
# (H100, K4V4 decode at 32k: 66 vs 96 µs/layer)
_LLOYD_SELECT = True
# 4-bit lloyd centroids for 16-bit queries by byte permutes in inline PTX (`_lut4`) instead of the select chain
# (GPU only; the interpreter takes the select chain)
_LLOYD_LUT = True
# lloyd parts whose rotation is a randomized Hadamard (power-of-two d <= 128): H made in registers, the query
# rotated and the values un-rotated in the partial kernel, instead of float32 d x d products with the stored R
# and an un-rotation in the merge
_HADAMARD = True
# the last program of each (row tile, KV head) merges its buffers (no combine launch): "prefill" (one sequence,
# several row tiles; H100 run 5: 16-bit prefill 138 vs 145 µs at 32k, and decode 0.3-2.5 µs SLOWER fused: the
# merge's ~12 µs is its own latency, not the launch), True (wherever the rows allow), False (never)
_FUSE_COMBINE = "prefill"
# lloyd query rotation R q: "prologue" (each prefix program rotates its rows, d <= 128), "kernel" (_rotate_kernel
# before the partial kernel), "matmul" (one float32 torch matmul before it)
_ROTATE = "prologue"
# keys per block of 64-row (prefill) tiles, d <= 128
_PREFILL_BN = 128
# decode tiles (16 rows, d <= 128): keys per block, programs per SM, warps (H100 sweep, run 8: 2 programs of 4
# warps with 64-key blocks was the best of {1, 2, 4} x {64, 128} x {4, 8} for 16-bit, K4V4 and q4_0 at 32k and
# 128k)
_DECODE_BN = 64
_DECODE_PPS = 2.0
_DECODE_WARPS = 4
# decode tiles (16 rows, d <= 128, 16-bit queries): products taken transposed, K q^T and V^T P^T (_prefix_chunk)
_DECODE_SWAP = True
# decode tiles: the next prefix block's per-key values (and q4_0 codes) loaded one step ahead (_prefetch_flags)
_PREFETCH = 1
# values un-rotated by a butterfly (_fwht) instead of three bf16 products with H (_times_hadamard)
_FWHT = True
# the merge launched while the partial kernel runs (programmatic dependent launch; it waits for the partials)
_PDL = True
_PRE_STAGES = None  # pipeline stages of the prefix loop (benchmarks sweep it); None: `_prefix_stages`' rule
_DECODE_MAXNREG = None  # registers per thread cap of decode tiles (benchmarks sweep it: 168 fits 3 programs per SM)


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
def _tile_coords(offs_d, CODEC: tl.constexpr):
    """Head-dim coordinate of each column of a `_tile_decode` tile: the identity, except q4_0 whose tiles hold
    a block's low nibbles and high nibbles side by side (column blk*32 + 2j + t is coordinate blk*32 + 16t + j)."""
    if CODEC == 3:
        w = offs_d % 32
        return offs_d - w + (w % 2) * 16 + w // 2
    else:
        return offs_d


@_jit
def _centroids(CENT, code, BITS: tl.constexpr, SELECT: tl.constexpr):
    """centroids[code]: a gather from the (L1-resident) codebook, or (SELECT, up to 4 bits) a chain of selects
    over codebook values held in registers."""
    if SELECT and BITS <= 4:
        x = tl.zeros(code.shape, dtype=tl.float32) + tl.load(CENT)
        for v in tl.static_range(1, 1 << BITS):
            x = tl.where(code == v, tl.load(CENT + v), x)
    else:
        x = tl.load(CENT + code)
    return x


@_jit
def _lut_word(CENT, first, SHIFT: tl.constexpr, DOT_TY: tl.constexpr):
    """One `_lut_words` word: byte k = bits SHIFT..SHIFT+7 of centroid first + k rounded to DOT_TY (k = 0..3)."""
    w = 0
    for k in tl.static_range(4):
        bits = tl.load(CENT + first + k).to(DOT_TY).to(tl.int16, bitcast=True).to(tl.int32)
        w = w | (((bits >> SHIFT) & 0xFF) << (8 * k))
    return w


@_jit
def _lut_words(CENT, DOT_TY: tl.constexpr):
    """The 16 centroids of a 4-bit codebook rounded to the 16-bit DOT_TY, as the 8 int32 words `_lut4` reads:
    the low bytes of entries 0-3, 4-7, 8-11, 12-15 (byte k of a word = entry 4w + k), then their high bytes.
    Made by every thread from 16 scalar loads (no 16-wide tensors and reductions: 186 fewer PTX lines, sm_90)."""
    return (_lut_word(CENT, 0, 0, DOT_TY), _lut_word(CENT, 4, 0, DOT_TY),
            _lut_word(CENT, 8, 0, DOT_TY), _lut_word(CENT, 12, 0, DOT_TY),
            _lut_word(CENT, 0, 8, DOT_TY), _lut_word(CENT, 4, 8, DOT_TY),
            _lut_word(CENT, 8, 8, DOT_TY), _lut_word(CENT, 12, 8, DOT_TY))


# One lookup of 4 codes: prmt.b32 picks byte c & 7 of a table word pair for each of the 4 selector nibbles (bit 3 of
# a nibble would switch prmt to sign replication, so it is masked off), once in entries 0-7 and once in 8-15; a third
# prmt keeps, per byte, the half that bit 3 of the code names. Done for the low and the high bytes of the 16-bit
# values, then the bytes are interleaved into two registers of two values each. $4 holds 4 code bytes (8 codes:
# byte k = code 2k | code 2k+1 << 4); outputs $0,$1 = values of the even codes 0,2 | 4,6 and $2,$3 = the odd ones;
# $5, $9, .., $33 are the 8 table words (each operand of a 32-bit splat comes 4 times with pack=4).
_LUT4_HALF = """
    and.b32 i, {sel}, 0x7777;
    and.b32 s, {sel}, 0x8888;
    shr.b32 s, s, 1;
    or.b32 s, s, 0x3210;
    prmt.b32 a, $5, $9, i;
    prmt.b32 b, $13, $17, i;
    prmt.b32 l, a, b, s;
    prmt.b32 a, $21, $25, i;
    prmt.b32 b, $29, $33, i;
    prmt.b32 h, a, b, s;
    prmt.b32 {even}, l, h, 0x6240;
    prmt.b32 {odd}, l, h, 0x7351;"""
_LUT4_ASM = ("{\n.reg .b32 i, s, a, b, l, h, t;" + _LUT4_HALF.format(sel="$4", even="$0", odd="$2")
             + "\n    shr.b32 t, $4, 16;" + _LUT4_HALF.format(sel="t", even="$1", odd="$3") + "\n}")
_LUT4_CONSTRAINTS = "=r,=r,=r,=r," + ",".join(["r"] * 33)  # 4 output registers; the codes, 8 words x 4
if _HAS_TRITON:  # a global read inside a jit function must be a constexpr
    _LUT4_ASM = tl.constexpr(_LUT4_ASM)
    _LUT4_CONSTRAINTS = tl.constexpr(_LUT4_CONSTRAINTS)


@_jit
def _lut4(byte, t0, t1, t2, t3, u0, u1, u2, u3, DOT_TY: tl.constexpr):
    """(values of the low nibbles, values of the high nibbles) of a uint8 tensor of packed 4-bit codes, in the
    16-bit DOT_TY, by byte permutes from 8 table words (`_lut_words`): ~3 instructions per value where the select
    chain takes ~30 (GPU only: inline PTX)."""
    if DOT_TY == tl.float16:
        lo, hi = tl.inline_asm_elementwise(asm=_LUT4_ASM, constraints=_LUT4_CONSTRAINTS,
                                           args=[byte, t0, t1, t2, t3, u0, u1, u2, u3],
                                           dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        lo, hi = tl.inline_asm_elementwise(asm=_LUT4_ASM, constraints=_LUT4_CONSTRAINTS,
                                           args=[byte, t0, t1, t2, t3, u0, u1, u2, u3],
                                           dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    return lo, hi


@_jit
def _tile_load(X, XS, rows, row_ok, offs_d, d_ok, row_stride, D: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, CODEC: tl.constexpr, BITS: tl.constexpr):
    """The stored bytes of rows `rows` for `_tile_decode`: (data, scales). X points at the data (int8 view for
    q8_0), XS at the same bytes viewed as float16 (block scales); row_stride in elements of X.

    raw: the (BLOCK_N, BLOCK_D) values, scales 0. lloyd codes of 1, 2, 4 or 8 bits: the rows' packed bytes as
    contiguous runs (vector loads), (BLOCK_N, BLOCK_D * BITS / 8) uint8; other lloyd widths (3, 5, 6, 7 bits:
    codes straddle bytes): one byte pair per coordinate, returned as the (BLOCK_N, BLOCK_D) int32 codes.
    q8_0/q4_0: (BLOCK_N, blocks, 32 or 16) byte tiles and the (BLOCK_N, blocks) float16 scales."""
    r = rows.to(tl.int64) * row_stride
    sc = 0.0
    if CODEC == 0:
        data = tl.load(X + r[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    elif CODEC == 1:
        if 8 % BITS == 0:
            NB: tl.constexpr = BLOCK_D // (8 // BITS)
            ROW_BYTES: tl.constexpr = (D * BITS + 7) // 8
            j = tl.arange(0, NB)
            data = tl.load(X + r[:, None] + j[None, :], mask=row_ok[:, None] & (j < ROW_BYTES)[None, :], other=0)
        else:  # codes may straddle two bytes
            ok = row_ok[:, None] & d_ok[None, :]
            bit = offs_d[None, :] * BITS
            byte = bit // 8
            shift = bit % 8
            word = tl.load(X + r[:, None] + byte, mask=ok, other=0).to(tl.int32)
            hi = tl.load(X + r[:, None] + byte + 1, mask=ok & (shift + BITS > 8), other=0).to(tl.int32)
            data = ((word | (hi << 8)) >> shift) & ((1 << BITS) - 1)
    else:
        NBLK: tl.constexpr = BLOCK_D // 32
        blk = tl.arange(0, NBLK)
        blk_ok = row_ok[:, None] & (blk < D // 32)[None, :]
        if CODEC == 2:  # q8_0: 34-byte blocks = fp16 scale + 32 int8
            j = tl.arange(0, 32)
            data = tl.load(X + r[:, None, None] + blk[None, :, None] * 34 + 2 + j[None, None, :],
                           mask=blk_ok[:, :, None], other=0)
            sc = tl.load(XS + (r // 2)[:, None] + blk[None, :] * 17, mask=blk_ok, other=0.0)
        else:  # q4_0: 18-byte blocks = fp16 scale + 16 bytes, byte j = q_j | q_{j+16} << 4
            j = tl.arange(0, 16)
            data = tl.load(X + r[:, None, None] + blk[None, :, None] * 18 + 2 + j[None, None, :],
                           mask=blk_ok[:, :, None], other=0)
            sc = tl.load(XS + (r // 2)[:, None] + blk[None, :] * 9, mask=blk_ok, other=0.0)
    return data, sc


@_jit
def _tile_decode(data, sc, CENT, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CODEC: tl.constexpr,
                 BITS: tl.constexpr, SELECT: tl.constexpr, LUT: tl.constexpr, DOT_TY: tl.constexpr, WORDS):
    """(BLOCK_N, BLOCK_D) tile from `_tile_load`'s bytes: raw values (stored dtype), lloyd centroids (float32,
    gain not applied; DOT_TY by byte permutes when LUT), q8_0/q4_0 dequantized (float32); column c holds
    coordinate `_tile_coords(c)`. Packed lloyd bytes hold coordinates j*8/BITS + t in byte j, split along a new
    minor axis, so the reshape back to (BLOCK_N, BLOCK_D) is in coordinate order."""
    if CODEC == 0:
        x = data
    elif CODEC == 1:
        if 8 % BITS == 0:
            P: tl.constexpr = 8 // BITS
            if LUT and BITS == 4:  # centroids already rounded to DOT_TY; the join puts them in coordinate order
                lo, hi = _lut4(data, WORDS[0], WORDS[1], WORDS[2], WORDS[3], WORDS[4], WORDS[5], WORDS[6], WORDS[7],
                               DOT_TY)
                x = tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_D])
            elif P == 1:
                x = _centroids(CENT, data.to(tl.int32), BITS, SELECT)
            else:
                sh = tl.arange(0, P) * BITS
                code = (data.to(tl.int32)[:, :, None] >> sh[None, None, :]) & ((1 << BITS) - 1)
                x = tl.reshape(_centroids(CENT, code, BITS, SELECT), [BLOCK_N, BLOCK_D])
        else:
            x = _centroids(CENT, data, BITS, SELECT)
    elif CODEC == 2:
        x = tl.reshape(data.to(tl.float32) * sc.to(tl.float32)[:, :, None], [BLOCK_N, BLOCK_D])
    else:
        byte = data.to(tl.int32)
        scf = sc.to(tl.float32)[:, :, None]
        lo = ((byte & 15) - 8).to(tl.float32) * scf
        hi = ((byte >> 4) - 8).to(tl.float32) * scf
        x = tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_D])  # column blk*32 + 2j + t: see _tile_coords
    return x


@_jit
def _block_meta(BETA, KGAIN, VGAIN, cols, ok, K_CODEC: tl.constexpr, V_CODEC: tl.constexpr):
    """Per-key values of prefix entries `cols`: (beta as stored, key gains, value gains), the gains as float32
    for lloyd codes, else 0."""
    beta = tl.load(BETA + cols, mask=ok, other=float("-inf"))
    gk = 0.0
    gv = 0.0
    if K_CODEC == 1:
        gk = tl.load(KGAIN + cols, mask=ok, other=0.0).to(tl.float32)
    if V_CODEC == 1:
        gv = tl.load(VGAIN + cols, mask=ok, other=0.0).to(tl.float32)
    return beta, gk, gv


@_jit
def _hadamard(BLOCK_D: tl.constexpr):
    """(BLOCK_D, BLOCK_D) float32 Sylvester Hadamard matrix (scipy.linalg.hadamard's order), entries +-1:
    H[i, j] = (-1)^popcount(i & j), made in registers (BLOCK_D <= 256: the parity of 8 bits by three folds)."""
    i = tl.arange(0, BLOCK_D)
    x = i[:, None] & i[None, :]
    x = x ^ (x >> 4)
    x = x ^ (x >> 2)
    x = x ^ (x >> 1)
    return (1 - 2 * (x & 1)).to(tl.float32)


@_jit
def _rot_signs(ROT, offs_d, d_ok):
    """s of a power-of-two rotation R = H diag(s) / sqrt(d) (quant/hadamard.py): H's row 0 is all ones, so
    s_j = sign(R[0, j]). Returns (BLOCK_D,) float32 +-1."""
    r0 = tl.load(ROT + offs_d, mask=d_ok, other=1.0)
    return tl.where(r0 < 0, -1.0, 1.0)


@_jit
def _times_hadamard(x, hmat, SPLIT: tl.constexpr):
    """x @ H for float32 x (rows, d), to float32 accuracy. SPLIT (GPU): x = x1 + x2 + x3, each part the bf16
    rounding of what the previous ones leave (24 bits in all, bf16 keeps float32's range), times the exact +-1 H
    in three bf16 tensor-core products with float32 accumulation; else one float32 product (interpreter)."""
    if SPLIT:
        hb = hmat.to(tl.bfloat16)
        x1 = x.to(tl.bfloat16)
        rem = x - x1.to(tl.float32)
        x2 = rem.to(tl.bfloat16)
        x3 = (rem - x2.to(tl.float32)).to(tl.bfloat16)
        y = tl.dot(x1, hb)
        y = tl.dot(x2, hb, y)
        y = tl.dot(x3, hb, y)
    else:
        y = tl.dot(x, hmat, input_precision="ieee")
    return y


@_jit
def _fwht(x, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """x @ H (Sylvester Hadamard, `_hadamard`) for float32 x (ROWS, BLOCK_D), BLOCK_D <= 256 a power of two: log2
    BLOCK_D butterfly stages (i, i + h) -> (a + b, a - b) of float32 additions, no product and no d x d matrix
    on chip."""
    for i in tl.static_range(8):
        if (2 << i) <= BLOCK_D:
            y = tl.permute(tl.reshape(x, [ROWS, BLOCK_D // (2 << i), 2, 1 << i]), (0, 1, 3, 2))
            a, b = tl.split(y)
            x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), [ROWS, BLOCK_D])
    return x


@_jit
def _softmax_step(s, m_i, l_i, KEY_AXIS: tl.constexpr):
    """One online-softmax step in the log2 domain over the scores s, keys along KEY_AXIS (1: (rows, keys); 0: the
    transposed (keys, rows)); returns (p, alpha, m_new, l_new). Safe when all of a row's scores are -inf (masked)
    and m_i is still -inf."""
    m_new = tl.maximum(m_i, tl.max(s, axis=KEY_AXIS))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - tl.expand_dims(m_safe, KEY_AXIS))
    l_new = l_i * alpha + tl.sum(p, axis=KEY_AXIS)
    return p, alpha, m_new, l_new


@_jit
def _prefix_chunk(q_dot, qm, lo, hi, BETA, KX, KS, KGAIN, KCENT, k_stride, VX, VS, VGAIN, VCENT, v_stride,
                  offs_d, d_ok, qk_scale2, D: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  K_CODEC: tl.constexpr, K_BITS: tl.constexpr, V_CODEC: tl.constexpr, V_BITS: tl.constexpr,
                  SELECT: tl.constexpr, LUT: tl.constexpr, DOT_TY: tl.constexpr, UPCAST: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, SWAP: tl.constexpr, PREFETCH: tl.constexpr, K_PRE: tl.constexpr,
                  V_PRE: tl.constexpr, STAGES: tl.constexpr):
    """Online softmax over prefix entries lo:hi (global rows) for one row tile. q_dot's columns are in the key
    tiles' column order, the returned accumulator's in the value tiles' (`_tile_coords`).

    SWAP (decode tiles of few query rows): the products are taken transposed, scores as K q^T (BLOCK_N, BLOCK_M)
    and the accumulator as V^T P^T (BLOCK_D, BLOCK_M), so the dequantized tiles are the wide operand of the
    tensor-core product. PREFETCH: each step issues the loads of the next block's per-key values (beta, gains),
    and K_PRE / V_PRE its key / value codes, before decoding its own, so their latency hides behind a block of
    work: Triton's cp.async stages do not pipeline loads of a few bytes per thread, nor q8_0/q4_0 blocks at
    2-byte offsets (raw tiles and lloyd bytes they do)."""
    KEY_AXIS: tl.constexpr = 0 if SWAP else 1  # of the scores: (BLOCK_N, BLOCK_M) if SWAP, else (BLOCK_M, BLOCK_N)
    ROW_AXIS: tl.constexpr = 1 - KEY_AXIS
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    q_t = q_dot
    if SWAP:
        acc = tl.zeros([BLOCK_D, BLOCK_M], dtype=tl.float32)
        q_t = tl.trans(q_dot)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_words = 0  # the byte-permute tables (`_lut_words`), made once per program
    v_words = 0
    if LUT and K_CODEC == 1 and K_BITS == 4:
        k_words = _lut_words(KCENT, DOT_TY)
    if LUT and V_CODEC == 1 and V_BITS == 4:
        v_words = _lut_words(VCENT, DOT_TY)
    if PREFETCH:  # the first block's (K_PRE / V_PRE need PREFETCH)
        cols = lo + tl.arange(0, BLOCK_N)
        ok = cols < hi
        beta, gk, gv = _block_meta(BETA, KGAIN, VGAIN, cols, ok, K_CODEC, V_CODEC)
        if K_PRE:
            kd, ks = _tile_load(KX, KS, cols, ok, offs_d, d_ok, k_stride, D, BLOCK_N, BLOCK_D, K_CODEC, K_BITS)
        if V_PRE:
            vd, vs = _tile_load(VX, VS, cols, ok, offs_d, d_ok, v_stride, D, BLOCK_N, BLOCK_D, V_CODEC, V_BITS)
    for n0 in tl.range(lo, hi, BLOCK_N, num_stages=STAGES):
        cols = n0 + tl.arange(0, BLOCK_N)
        ok = cols < hi
        nxt = cols + BLOCK_N
        nxt_ok = nxt < hi
        if PREFETCH:
            beta_n, gk_n, gv_n = _block_meta(BETA, KGAIN, VGAIN, nxt, nxt_ok, K_CODEC, V_CODEC)
            if K_PRE:
                kd_n, ks_n = _tile_load(KX, KS, nxt, nxt_ok, offs_d, d_ok, k_stride, D, BLOCK_N, BLOCK_D, K_CODEC,
                                        K_BITS)
            if V_PRE:
                vd_n, vs_n = _tile_load(VX, VS, nxt, nxt_ok, offs_d, d_ok, v_stride, D, BLOCK_N, BLOCK_D, V_CODEC,
                                        V_BITS)
        if not K_PRE:
            kd, ks = _tile_load(KX, KS, cols, ok, offs_d, d_ok, k_stride, D, BLOCK_N, BLOCK_D, K_CODEC, K_BITS)
        k = _dot_operand(_tile_decode(kd, ks, KCENT, BLOCK_N, BLOCK_D, K_CODEC, K_BITS, SELECT, LUT, DOT_TY,
                                      k_words), DOT_TY, UPCAST)
        if SWAP:
            s = tl.dot(k, q_t, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        else:
            s = tl.dot(q_dot, tl.trans(k), input_precision=DOT_PRECISION)
        if not PREFETCH:  # loaded where used (fewer registers held across the products)
            beta, gk, _ = _block_meta(BETA, KGAIN, VGAIN, cols, ok, K_CODEC, 0)
        if K_CODEC == 1:  # q.(mean + g R^T c) = q.mean + g (R q).c
            s = s * tl.expand_dims(gk, ROW_AXIS) + tl.expand_dims(qm, KEY_AXIS)
        s = s * qk_scale2 + tl.expand_dims(beta * 1.4426950408889634, ROW_AXIS)
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, KEY_AXIS)
        if not V_PRE:
            vd, vs = _tile_load(VX, VS, cols, ok, offs_d, d_ok, v_stride, D, BLOCK_N, BLOCK_D, V_CODEC, V_BITS)
        v = _dot_operand(_tile_decode(vd, vs, VCENT, BLOCK_N, BLOCK_D, V_CODEC, V_BITS, SELECT, LUT, DOT_TY,
                                      v_words), DOT_TY, UPCAST)
        if V_CODEC == 1:  # accumulate sum p g c in rotated space
            if not PREFETCH:
                gv = tl.load(VGAIN + cols, mask=ok, other=0.0).to(tl.float32)
            p = p * tl.expand_dims(gv, ROW_AXIS)
        if SWAP:
            pv = tl.dot(tl.trans(v), _dot_operand(p, DOT_TY, UPCAST), input_precision=DOT_PRECISION)
        else:
            pv = tl.dot(_dot_operand(p, DOT_TY, UPCAST), v, input_precision=DOT_PRECISION)
        acc = acc * tl.expand_dims(alpha, KEY_AXIS) + pv  # the accumulator's row axis is the scores' one
        if PREFETCH:
            beta, gk, gv = beta_n, gk_n, gv_n
            if K_PRE:
                kd, ks = kd_n, ks_n
            if V_PRE:
                vd, vs = vd_n, vs_n
    if SWAP:
        acc = tl.trans(acc)
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
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, 1)
        v = tl.load(V + cols.to(tl.int64)[:, None] * v_stride + offs_d[None, :], mask=tile_ok, other=0.0)
        pv = tl.dot(_dot_operand(p, DOT_TY, UPCAST), _dot_operand(v, DOT_TY, UPCAST), input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv
    return m_i, l_i, acc


@_jit
def _head_items(OFFS, h_or_item, n_heads, chunk, BLOCK_H: tl.constexpr, BY_ITEM: tl.constexpr):
    """The work list of prefix chunks, from the device offsets: head h owns items first_h .. first_h + n_h - 1,
    n_h = ceil(length_h / chunk) (no item for an empty head). BY_ITEM: h_or_item is an item, returns its
    (head, first item of the head, head start, head end); else a head, returns (head, first, first + n_h, 0)."""
    hh = tl.arange(0, BLOCK_H)
    h_ok = hh < n_heads
    st = tl.load(OFFS + hh, mask=h_ok, other=0)
    en = tl.load(OFFS + hh + 1, mask=h_ok, other=0)
    cnt = (en - st + chunk - 1) // chunk
    cum = tl.cumsum(cnt, 0)  # items up to and including head hh
    if BY_ITEM:
        h = tl.sum((cum <= h_or_item).to(tl.int32), 0)
    else:
        h = h_or_item
    sel = hh == h
    first = tl.sum(tl.where(sel, cum - cnt, 0), 0)
    if BY_ITEM:
        return h, first, tl.sum(tl.where(sel, st, 0), 0), tl.sum(tl.where(sel, en, 0), 0)
    else:
        return h, first, tl.sum(tl.where(sel, cum, 0), 0), 0


@_jit_sizes("B", "Lq", "L_app", "E", "n_items", "n_other", "n_obuf", "n_app", "chunk", "M_all")
def _partial_kernel(
    Q, QROT, KROT, OFFS, BETA,
    KX, KS, KGAIN, KMEAN, KCENT, VX, VS, VGAIN, VCENT,
    EK, EV, EBETA,
    AK, AV, AMASK,
    PM, PL, PACC,
    CNT, VMEAN, VROT, OUT,
    B, Lq, L_app, E, n_heads, n_items, n_other, n_obuf, n_app, chunk, M_all, qk_scale2, rot_scale,
    s_qb, s_qh, s_qi, s_rb, s_rh, s_ri,
    k_stride, v_stride, s_km,
    s_akb, s_akh, s_akl, s_avb, s_avh, s_avl, s_mb,
    s_vm, s_ob, s_oi, s_oh,
    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    K_CODEC: tl.constexpr, K_BITS: tl.constexpr, V_CODEC: tl.constexpr, V_BITS: tl.constexpr, SELECT: tl.constexpr,
    HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROT_IN: tl.constexpr, ROT_PRECISION: tl.constexpr, LUT: tl.constexpr, K_HAD: tl.constexpr, V_HAD: tl.constexpr,
    SPLIT: tl.constexpr, FUSED: tl.constexpr, CM: tl.constexpr, CS: tl.constexpr, CC: tl.constexpr,
    SWAP: tl.constexpr, PREFETCH: tl.constexpr, K_PRE: tl.constexpr, V_PRE: tl.constexpr, FWHT: tl.constexpr,
    PDL: tl.constexpr, PRE_STAGES: tl.constexpr,
):
    """One (row tile, slot): partial (max, sum, acc) of its rows over its slot's keys, written to buffer `buf`.
    Slots (= buffers) 0..n_items-1 are the prefix chunks of the work list (`_head_items`: only chunks that hold
    entries); then per KV head h, n_other slots n_items + h*n_other + k: its exact segment (k = 0, if E), then
    appended chunk a of sequence s (k = [E > 0] + s*n_app + a), written to buffer n_items + h*n_obuf + [E > 0] + a
    (the sequences' rows are disjoint).

    ROT_IN (lloyd keys, d <= 128): the program rotates its own query rows (R q, float32 product) instead of
    reading QROT from `_rotate_kernel`. K_HAD / V_HAD (lloyd keys / values whose rotation is the randomized
    Hadamard R = H diag(s) / sqrt(d) of a power-of-two d <= 128): H is made in registers (`_hadamard`), the query
    rotated as ((q * s) @ H) / sqrt(d), and (V_HAD) the program un-rotates its own accumulator,
    ((acc @ H) * s) / sqrt(d) + l * mean (linear, so the merge needs no rotation), instead of loading the
    float32 d x d matrix (rot_scale = 1 / sqrt(d)). LUT: 4-bit lloyd centroids by byte permutes (`_lut4`).
    FUSED (every program of row tile pid_m of head h covers the same global rows: one row tile, or one sequence;
    and every head has at least one program): after writing its buffer the program takes a ticket from the
    counter CNT[pid_m, h] (release/acquire); the one that draws the last merges the head's buffers for the tile
    (`_combine_rows`, CM rows at a time) and puts the counter back to 0 for the next launch (no memset,
    CUDA-graph safe). One stream at a time per counter buffer."""
    if PDL:  # let the merge launch now: it waits for this grid's writes (gdc_wait) before reading them
        gdc_launch_dependents()
    pid_m = tl.program_id(0)
    slot = tl.program_id(1)
    DOT_TY: tl.constexpr = Q.dtype.element_ty
    rows_per_seq = G * Lq
    seq = 0
    row0 = 0
    n_rows = M_all
    lo = 0
    hi = 0
    buf = slot
    if slot < n_items:
        h, first, start, end = _head_items(OFFS, slot, n_heads, chunk, BLOCK_H, True)
        lo = start + (slot - first) * chunk
        hi = tl.minimum(lo + chunk, end)
        kind = 0
    else:
        o = slot - n_items
        h = o // n_other
        k = o % n_other
        buf = n_items + h * n_obuf + k
        if E > 0:
            k = k - 1
        if k < 0:  # the exact segment of head h, all sequences
            kind = 1
        else:  # appended chunk k % n_app of sequence k // n_app: that sequence's rows only
            kind = 2
            seq = k // n_app
            row0 = seq * rows_per_seq
            n_rows = rows_per_seq
            lo = (k % n_app) * chunk
            buf = buf - seq * n_app
    local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = local < n_rows
    r = row0 + local
    b = r // rows_per_seq
    i = (r // G) % Lq
    hq = h * G + r % G
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_off = b.to(tl.int64) * s_qb + hq.to(tl.int64) * s_qh + i.to(tl.int64) * s_qi
    out_cols = offs_d

    if kind == 0:
        if K_CODEC == 1:
            q_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + q_off[:, None] + offs_d[None, :], mask=q_mask, other=0.0)
            if K_HAD:  # (R q)^T = q^T diag(s) H / sqrt(d)
                qs = q.to(tl.float32) * _rot_signs(KROT, offs_d, d_ok)[None, :]
                if FWHT:
                    q_rot = _fwht(qs, BLOCK_M, BLOCK_D) * rot_scale
                elif DOT_TY != tl.float32 and SPLIT:  # q * s is exact in the 16-bit dtype: one exact product
                    q_rot = tl.dot(qs.to(DOT_TY), _hadamard(BLOCK_D).to(DOT_TY)) * rot_scale
                else:
                    q_rot = _times_hadamard(qs, _hadamard(BLOCK_D), SPLIT) * rot_scale
            elif ROT_IN:  # (R q)^T = q^T R^T with R^T[k, c] = R[c, k]
                rt = tl.load(KROT + offs_d[None, :] * D + offs_d[:, None], mask=d_ok[:, None] & d_ok[None, :],
                             other=0.0)
                q_rot = tl.dot(q.to(tl.float32), rt, input_precision=ROT_PRECISION)
            else:
                r_off = b.to(tl.int64) * s_rb + hq.to(tl.int64) * s_rh + i.to(tl.int64) * s_ri
                q_rot = tl.load(QROT + r_off[:, None] + offs_d[None, :], mask=q_mask, other=0.0)
            mean = tl.load(KMEAN + h * s_km + offs_d, mask=d_ok, other=0.0).to(tl.float32)
            qm = tl.sum(q.to(tl.float32) * mean[None, :], axis=1)
            q_dot = _dot_operand(q_rot, DOT_TY, UPCAST)
        else:  # the query's columns in the key tiles' order
            kc = _tile_coords(offs_d, K_CODEC)
            q = tl.load(Q + q_off[:, None] + kc[None, :], mask=row_ok[:, None] & (kc < D)[None, :], other=0.0)
            qm = tl.zeros([BLOCK_M], dtype=tl.float32)
            q_dot = _dot_operand(q, DOT_TY, UPCAST)
        m_i, l_i, acc = _prefix_chunk(q_dot, qm, lo, hi, BETA, KX, KS, KGAIN, KCENT, k_stride,
                                      VX, VS, VGAIN, VCENT, v_stride, offs_d, d_ok, qk_scale2, D,
                                      BLOCK_M, BLOCK_N, BLOCK_D, K_CODEC, K_BITS, V_CODEC, V_BITS, SELECT, LUT,
                                      DOT_TY, UPCAST, DOT_PRECISION, SWAP, PREFETCH, K_PRE, V_PRE,
                                      PRE_STAGES)
        out_cols = _tile_coords(offs_d, V_CODEC)
        if V_HAD:  # x = mean + R^T y  ->  rows: (acc @ H) * s / sqrt(d) + l * mean
            vmean = tl.load(VMEAN + h * s_vm + offs_d, mask=d_ok, other=0.0).to(tl.float32)
            sv = _rot_signs(VROT, offs_d, d_ok) * rot_scale
            if FWHT:
                acc = _fwht(acc, BLOCK_M, BLOCK_D)
            else:
                acc = _times_hadamard(acc, _hadamard(BLOCK_D), SPLIT)
            acc = acc * sv[None, :] + l_i[:, None] * vmean[None, :]
    else:
        q = tl.load(Q + q_off[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if kind == 1:  # the exact segment of head h: E dense float32 entries with their beta
            last = tl.zeros([BLOCK_M], dtype=tl.int32)
            m_i, l_i, acc = _dense_chunk(_dot_operand(q, DOT_TY, UPCAST), last, 0, E,
                                         EK + h * E * D, EV + h * E * D, EBETA + h * E, AMASK, D, D,
                                         offs_d, d_ok, qk_scale2, True, False, False,
                                         BLOCK_M, BLOCK_N, BLOCK_D, DOT_TY, UPCAST, DOT_PRECISION)
        else:  # appended tokens of sequence `seq`, causal (bottom-right) and padding-masked
            last = L_app - Lq + i
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
    tl.store(PACC + p_off[:, None] * BLOCK_D + out_cols[None, :], acc, mask=row_ok[:, None])
    if FUSED:
        _, i0, i1, _ = _head_items(OFFS, h, n_heads, chunk, BLOCK_H, False)
        tl.debug_barrier()  # every thread's partial stores issued before the (release) ticket
        cnt_ptr = CNT + pid_m * n_heads + h
        ticket = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
        if ticket == i1 - i0 + n_other - 1:  # the last program of (tile, head): merge
            tl.atomic_xchg(cnt_ptr, 0)
            for c0 in range(pid_m * BLOCK_M, tl.minimum(pid_m * BLOCK_M + BLOCK_M, M_all), CM):
                rr = c0 + tl.arange(0, CM)
                _combine_rows(PM, PL, PACC, OFFS, VMEAN, VROT, OUT, h, rr, Lq, n_heads, n_items, n_obuf, chunk,
                              M_all, s_vm, s_ob, s_oi, s_oh, G, D, CM, BLOCK_D, CC, CS, BLOCK_H,
                              V_CODEC == 1 and not V_HAD, ROT_PRECISION)


@_jit
def _rotate_kernel(Q, ROT, QROT, n_rows, Hq, Lq, s_qb, s_qh, s_qi,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr):
    """QROT[row] = R @ Q[row] in float32 for the rows (b, hq, i) of queries (B, Hq, Lq, d); QROT contiguous.
    Output columns in chunks of BLOCK_C, so only a (d x BLOCK_C) slice of R is on chip at a time."""
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < n_rows
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    b = r // (Hq * Lq)
    hq = (r // Lq) % Hq
    i = r % Lq
    q_off = b.to(tl.int64) * s_qb + hq.to(tl.int64) * s_qh + i.to(tl.int64) * s_qi
    q = tl.load(Q + q_off[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    for c0 in tl.static_range(0, BLOCK_D, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        c_ok = cols < D
        # row form: (R q)^T = q^T R^T with R^T[k, c] = R[c, k]
        rt = tl.load(ROT + cols[None, :] * D + offs_d[:, None], mask=d_ok[:, None] & c_ok[None, :], other=0.0)
        qr = tl.dot(q, rt, input_precision="ieee")
        tl.store(QROT + r.to(tl.int64)[:, None] * D + cols[None, :], qr, mask=row_ok[:, None] & c_ok[None, :])


@_jit
def _lane_slots(PM, PL, PACC, s_lo, s_hi, r, row_ok, M_all, offs_d,
                BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, WITH_ACC: tl.constexpr):
    """Buffers s_lo:s_hi of rows r, BLOCK_S per load (one (S, R, D) tile), merged into BLOCK_S independent lanes
    (lane j takes buffers s_lo + j, s_lo + j + S, ...): element-wise online softmax, no reduction or layout
    change inside the loop. Returns the lanes' (max (S, R), sum (S, R), acc (S, R, D) if WITH_ACC else 0.0)."""
    sidx = tl.arange(0, BLOCK_S)
    m3 = tl.full([BLOCK_S, r.shape[0]], float("-inf"), dtype=tl.float32)
    l3 = tl.zeros([BLOCK_S, r.shape[0]], dtype=tl.float32)
    a3 = tl.zeros([BLOCK_S, r.shape[0], BLOCK_D], dtype=tl.float32)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        sl = s0 + sidx
        idx = sl.to(tl.int64)[:, None] * M_all + r[None, :]
        ok = (sl < s_hi)[:, None] & row_ok[None, :]
        m = tl.load(PM + idx, mask=ok, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(PL + idx, mask=ok, other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m3, m)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m3 - m_safe)
        w = tl.exp2(m - m_safe)
        l3 = l3 * alpha + w * l
        if WITH_ACC:
            a = tl.load(PACC + idx[:, :, None] * BLOCK_D + offs_d[None, None, :], mask=ok[:, :, None], other=0.0,
                        cache_modifier=".cg")
            a3 = a3 * alpha[:, :, None] + w[:, :, None] * a
        m3 = m_new
    return m3, l3, a3


@_jit
def _lane_weights(m3, m_fin):
    """exp2(lane max - final max) (0 for empty lanes), (S, R)."""
    m_safe = tl.where(m_fin == float("-inf"), 0.0, m_fin)
    return tl.exp2(m3 - m_safe[None, :])


@_jit_sizes("Lq", "n_items", "n_obuf", "M_all")
def _combine_kernel(
    PM, PL, PACC, OFFS, VMEAN, ROT, OUT,
    Lq, n_heads, n_items, n_obuf, chunk, M_all,
    s_vm, s_ob, s_oi, s_oh,
    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, V_LLOYD: tl.constexpr, ROT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    """Grid (row tiles, Hkv, BLOCK_D / BLOCK_C): output columns cols = BLOCK_C * pid_2 + [0, BLOCK_C) of BLOCK_M
    rows of KV head h, merged from all of h's buffers (its prefix items i0..i1, `_head_items`, then its n_obuf
    exact and appended buffers) when the partial kernel did not merge them itself.

    One round of loads: buffer j of the head is i0 + j (j < n_p = i1 - i0) or o0 + j - n_p, and BLOCK_S of
    them are gathered at once ((S, rows) maxima and sums, (S, rows, BLOCK_C) accumulators), then reduced over S;
    the launcher sizes BLOCK_S to the head's buffer count, so decode takes one step (a longer head loops, with
    an online rescale between steps). The maxima and sums are recomputed by each column block (S x rows floats).
    Lloyd values (prefix accumulators in rotated space): the prefix buffers are gathered over all d columns in
    the same round, acc_rot @ R[:, cols] un-rotates them (float32: 3xTF32 tl.dot from 16 rows, else a
    (rows, d, BLOCK_C) broadcast product), plus l_pre * mean[cols]."""
    h = tl.program_id(1)
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = r < M_all
    c_ok = cols < D
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    b = r // (G * Lq)
    i = (r // G) % Lq
    hq = h * G + r % G
    o_off = b.to(tl.int64) * s_ob + i.to(tl.int64) * s_oi + hq.to(tl.int64) * s_oh
    if V_LLOYD:  # independent of the partials: issued before the gather
        rc = tl.load(ROT + offs_d[:, None] * D + cols[None, :], mask=d_ok[:, None] & c_ok[None, :], other=0.0)
        mean = tl.load(VMEAN + h * s_vm + cols, mask=c_ok, other=0.0).to(tl.float32)
    _, i0, i1, _ = _head_items(OFFS, h, n_heads, chunk, BLOCK_H, False)
    n_p = i1 - i0
    n_all = n_p + n_obuf
    if PDL:  # launched early (programmatic dependent launch): the partial kernel's writes are visible after this
        gdc_wait()
    o0 = n_items + h * n_obuf
    sidx = tl.arange(0, BLOCK_S)
    m_run = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_run = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    l_pre = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_rot = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, n_all, BLOCK_S):
        j = s0 + sidx
        is_p = j < n_p
        buf = tl.where(is_p, i0 + j, o0 + j - n_p)
        idx = buf.to(tl.int64)[:, None] * M_all + r[None, :]
        ok = (j < n_all)[:, None] & row_ok[None, :]
        m = tl.load(PM + idx, mask=ok, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(PL + idx, mask=ok, other=0.0, cache_modifier=".cg")
        if V_LLOYD:
            ok_c = ok & (~is_p)[:, None]
            a_p = tl.load(PACC + idx[:, :, None] * BLOCK_D + offs_d[None, None, :],
                          mask=(ok & is_p[:, None])[:, :, None], other=0.0, cache_modifier=".cg")
        else:
            ok_c = ok
        a = tl.load(PACC + idx[:, :, None] * BLOCK_D + cols[None, None, :], mask=ok_c[:, :, None], other=0.0,
                    cache_modifier=".cg")
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_run - m_safe)
        w = tl.exp2(m - m_safe[None, :])  # (S, rows); 0 for masked buffers
        l_run = l_run * alpha + tl.sum(w * l, axis=0)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * a, axis=0)
        if V_LLOYD:
            l_pre = l_pre * alpha + tl.sum(tl.where(is_p[:, None], w * l, 0.0), axis=0)
            acc_rot = acc_rot * alpha[:, None] + tl.sum(w[:, :, None] * a_p, axis=0)
        m_run = m_new
    inv_l = 1.0 / tl.where(l_run > 0, l_run, 1.0)
    if V_LLOYD:  # x = mean + R^T y  ->  rows: acc_rot @ R + l_pre * mean
        if BLOCK_M >= 16 and BLOCK_D <= 128:
            acc += tl.dot(acc_rot, rc, input_precision=ROT_PRECISION)
        else:
            acc += tl.sum(acc_rot[:, :, None] * rc[None, :, :], axis=1)  # float32 FMAs, exact
        acc += l_pre[:, None] * mean[None, :]
    tl.store(OUT + o_off[:, None] + cols[None, :], (acc * inv_l[:, None]).to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & c_ok[None, :])


@_jit
def _combine_rows(PM, PL, PACC, OFFS, VMEAN, ROT, OUT, h, r, Lq, n_heads, n_items, n_obuf, chunk, M_all,
                  s_vm, s_ob, s_oi, s_oh, G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr,
                  V_LLOYD: tl.constexpr, ROT_PRECISION: tl.constexpr):
    """Merge the buffers of rows r of KV head h (its prefix items, `_head_items`, then its n_obuf exact and
    appended buffers), un-rotate lloyd values, normalise, write (B, Lq, Hq, d).

    Buffers are merged in BLOCK_S lanes (`_lane_slots`), the lanes once at the end. Lloyd values (prefix items
    in rotated space): the items' lanes with their accumulators, the other buffers' maxima and sums, then
    BLOCK_C output columns at a time the other buffers' columns plus the un-rotated acc_rot @ R[:, cols] (a
    float32 tl.dot from 16 rows (ROT_PRECISION: 3xTF32 on the GPU, ieee under the interpreter), else a
    (rows, d, BLOCK_C) broadcast product), so only a (d x BLOCK_C) slice of R is on chip at a time. Partials are
    read through L2 (.cg): in the fused path other programs of the same launch wrote them."""
    row_ok = r < M_all
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    _, i0, i1, _ = _head_items(OFFS, h, n_heads, chunk, BLOCK_H, False)
    o0 = n_items + h * n_obuf
    b = r // (G * Lq)
    i = (r // G) % Lq
    hq = h * G + r % G
    o_off = b.to(tl.int64) * s_ob + i.to(tl.int64) * s_oi + hq.to(tl.int64) * s_oh
    m_p, l_p, a_p = _lane_slots(PM, PL, PACC, i0, i1, r, row_ok, M_all, offs_d, BLOCK_S, BLOCK_D, True)
    m_o, l_o, a_o = _lane_slots(PM, PL, PACC, o0, o0 + n_obuf, r, row_ok, M_all, offs_d, BLOCK_S, BLOCK_D,
                                not V_LLOYD)
    m_fin = tl.maximum(tl.max(m_p, axis=0), tl.max(m_o, axis=0))
    w_p = _lane_weights(m_p, m_fin)
    w_o = _lane_weights(m_o, m_fin)
    l_pre = tl.sum(w_p * l_p, axis=0)
    l_all = l_pre + tl.sum(w_o * l_o, axis=0)
    inv_l = 1.0 / tl.where(l_all > 0, l_all, 1.0)
    if V_LLOYD:
        acc_rot = tl.sum(w_p[:, :, None] * a_p, axis=0)
        m_safe = tl.where(m_fin == float("-inf"), 0.0, m_fin)
        for c0 in tl.static_range(0, BLOCK_D, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            c_ok = cols < D
            acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
            for s in range(o0, o0 + n_obuf):  # the few exact/appended buffers, against the final max
                w = tl.exp2(tl.load(PM + s * M_all + r, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
                            - m_safe)
                a = tl.load(PACC + (s * M_all + r).to(tl.int64)[:, None] * BLOCK_D + cols[None, :],
                            mask=row_ok[:, None], other=0.0, cache_modifier=".cg")
                acc += w[:, None] * a
            # x = mean + R^T y  ->  rows: acc_rot @ R + l_pre * mean
            rc = tl.load(ROT + offs_d[:, None] * D + cols[None, :], mask=d_ok[:, None] & c_ok[None, :], other=0.0)
            if BLOCK_M >= 16 and BLOCK_D <= 128:
                acc += tl.dot(acc_rot, rc, input_precision=ROT_PRECISION)
            else:
                acc += tl.sum(acc_rot[:, :, None] * rc[None, :, :], axis=1)  # float32 FMAs, exact
            mean = tl.load(VMEAN + h * s_vm + cols, mask=c_ok, other=0.0).to(tl.float32)
            acc += l_pre[:, None] * mean[None, :]
            tl.store(OUT + o_off[:, None] + cols[None, :], (acc * inv_l[:, None]).to(OUT.dtype.element_ty),
                     mask=row_ok[:, None] & c_ok[None, :])
    else:
        acc = tl.sum(w_p[:, :, None] * a_p, axis=0) + tl.sum(w_o[:, :, None] * a_o, axis=0)
        tl.store(OUT + o_off[:, None] + offs_d[None, :], (acc * inv_l[:, None]).to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])



# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------


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


@functools.lru_cache(maxsize=None)
def _zero_offsets(device: torch.device, n_heads: int) -> torch.Tensor:
    """Offsets of an absent prefix (every head empty) for the work-list lookups."""
    return torch.zeros(n_heads + 1, dtype=torch.int32, device=device)


def _pick_config(M_all: int, n_entries: int, n_heads: int, d: int, device: torch.device,
                 block_m=None, block_n=None, chunk=None, programs_per_sm: Optional[float] = None,
                 wide: bool = False):
    """(BLOCK_M, BLOCK_N, chunk, num_warps, num_stages). Decode of up to 4 sequences (one tile of 16 rows):
    64-key blocks, 4 warps, chunks small enough for ~`programs_per_sm` (2) programs per SM; a single 32-row tile
    (decode of 8 sequences): 128-key blocks, 8 warps, one program per SM; prefill: 64-row tiles of 8 warps,
    128-key blocks (64 for d = 32), 2 programs per SM. wide (float32 queries): tiles of at most 32 rows (64-row float32 tiles
    of sub-byte codes fail to compile with triton 3.6-3.9 for sm_90, and at d = 128 need more shared memory
    than an H100 block has)."""
    bm = block_m or min(32 if wide else 64, max(16, _next_pow2(M_all)))
    decode = bm == 16 and d <= 128  # 32-row tiles (decode of 8 sequences): q4_0 slower with these (run 8)
    if d > 128:
        bn_auto = 32
    elif decode:
        bn_auto = _DECODE_BN
    elif bm == 32:
        bn_auto = 128
    elif d >= 64:  # H100 runs 4 and 8: 128-key blocks 10-15% faster than 64 for every codec
        bn_auto = _PREFILL_BN
    else:  # d = 32 with 128-key blocks and 4 warps: the byte-permute tiles fail in triton 3.6-3.9's compiler
        bn_auto = 64
    if wide and d > 64:  # float32 tiles of 128 keys x 128 need more shared memory than an H100 block has
        bn_auto = min(bn_auto, 64)
    bn = block_n or bn_auto
    n_tiles = -(-M_all // bm)
    if programs_per_sm is None:  # H100 sweeps (run 8): two programs per SM for decode tiles and for prefill
        programs_per_sm = _DECODE_PPS if decode else (1.0 if n_tiles == 1 else 2.0)
    if chunk is None:
        target = max(1, int(programs_per_sm * _num_sms(device)))
        want = -(-n_entries * n_tiles // target)  # entries per program for ~target programs
        chunk = max(bn, -(-want // bn) * bn)
    chunk = max(bn, -(-int(chunk) // bn) * bn)
    # 8 warps from d = 128 for prefill tiles: with 4, the 64 x 128 dequantized tiles and their addresses spill
    # registers; decode tiles: 4 warps (H100 run 8, K4V4 at 32k: 20.6 us against 29.8 with 8 at 2 programs per SM)
    warps = _DECODE_WARPS if decode else (8 if d > 64 else 4)
    return bm, bn, chunk, warps, 2


def _combine_config(M_all: int, block_d: int, v_lloyd: bool, fused_rows: Optional[int] = None,
                    head_buffers: Optional[int] = None):
    """(rows, buffers per step, output columns) of a merge program.

    Fused (fused_rows: the partial kernel's row tile; the last program of a tile merges it alone in steps of up
    to 32 rows, 16 for lloyd values, `_combine_rows`): (rows, buffers, d) loads and (rows, d, columns)
    un-rotation products of 8-16k elements (no register spills for sm_90, benchmarks/check_ragged_compile.py).

    `_combine_kernel` (decode: 4-row tiles; prefill of several sequences: 32 rows, 16 for lloyd values): one
    program per (row tile, KV head, column block) gathers up to `buffers` of the head's buffers in one round of
    loads; buffers = the power of two >= head_buffers (the most buffers a head has) within a register budget of
    (buffers, rows, columns) float32 tiles of 8k elements (lloyd: the prefix tiles span all d columns, ~20k),
    so decode at 32-128k (13-40 buffers per head) takes one step. head_buffers None: the largest allowed."""
    if fused_rows is not None:
        rows = min(fused_rows, 16 if v_lloyd else 32, max(4, _next_pow2(M_all)))
        per_step = max(1, (4096 if v_lloyd and rows >= 16 else 8192) // (rows * block_d))
        cols = 32 if rows >= 16 and block_d <= 128 else max(8, 16384 // (rows * block_d))
        return rows, per_step, min(cols, block_d)
    rows = min(4, _next_pow2(M_all)) if M_all <= 64 else (16 if v_lloyd else 32)
    if v_lloyd:
        cols = min(block_d, 32 if rows >= 16 and block_d <= 128 else max(8, 16384 // (rows * block_d)))
        cap = 20480 // (rows * (block_d + cols))
    else:
        cols = min(block_d, 32)
        cap = 8192 // (rows * cols)
    cap = max(2, 1 << (max(1, cap).bit_length() - 1))  # a power of two
    want = cap if head_buffers is None else max(2, _next_pow2(head_buffers))
    return rows, min(cap, want), cols


def _uses_hadamard(d: int) -> bool:
    """Whether lloyd rotations of head dim d are made in registers: rotation_matrix(d, seed) of a power-of-two d
    is H diag(s) / sqrt(d) (quant/hadamard.py), and H of d <= 128 fits a program."""
    return bool(_HADAMARD and d & (d - 1) == 0 and 16 <= d <= 128)


def _uses_lut(dtype: torch.dtype, interpret: bool) -> bool:
    """Whether 4-bit lloyd centroids are looked up by byte permutes: 16-bit queries, compiled for the GPU."""
    return bool(_LLOYD_LUT and not interpret and dtype in (torch.float16, torch.bfloat16))


def _prefetch_flags(block_m: int, k_codec: int, v_codec: int) -> tuple:
    """(PREFETCH, K_PRE, V_PRE) of `_prefix_chunk` for tiles of block_m rows: decode tiles (up to 32 rows) load
    the next block's beta and gains one step ahead, and (_PREFETCH 1) the q4_0 codes, whose blocks sit at 2-byte
    offsets that Triton's cp.async stages do not take (q8_0's too, but its twice larger prefetched tiles spill
    registers for sm_90: 336 B), or (_PREFETCH 2) every quantized codec's.
    Prefill tiles (64 rows) do not: what they would hold across a step spills registers (sm_90, 64 x 128 K4V4
    tiles: 560 B) and was 1.2-1.6x slower on an H100 (run 9, call 3)."""
    if not _PREFETCH or block_m > 32:
        return False, False, False
    codes = (lambda c: c != 0) if _PREFETCH >= 2 else (lambda c: c == _CODEC_ID["q4_0"])
    return True, codes(k_codec), codes(v_codec)


def _prefix_stages(swap: bool, stages: int) -> int:
    """cp.async pipeline stages of the prefix loop (`tl.range(num_stages=)`; the appended-token loop keeps the
    kernel's `stages`): 3 for transposed decode tiles (`_uses_swap`), whose stored blocks take 8-32 KB a stage, so
    a block's loads are issued a whole step before they are waited for (with 2 stages the one buffer is refilled
    only at the end of the step that reads it). H100 run 10: 1.04x at 128k for 16-bit and K4V4, equal for q4_0 /
    q8_0 and at 32k; 4 stages no better. sm_90 (check_ragged_compile): spills of K3V5 / K6V3 tiles 600 / 328 B ->
    96 / 64 B. Other tiles keep `stages` (64-row 16-bit tiles with 4 would exceed shared memory)."""
    if _PRE_STAGES:
        return _PRE_STAGES
    return 3 if swap else stages


def _uses_pdl(device: torch.device, interpret: bool) -> bool:
    """Whether the merge is launched by programmatic dependent launch (`_PDL`): compiled for a GPU of compute
    capability 9 or more, with a triton that has griddepcontrol. H100 run 9 (call 7): decode 0.6-1.0 us faster
    per step at 32k for every codec (K4V4 15.18 -> 14.34 us), 8 sequences 3-5%, 128k within +-1.5%."""
    return bool(_PDL and _HAS_GDC and not interpret and device.type == "cuda" and _capability(device)[0] >= 9)


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple:
    return torch.cuda.get_device_capability(device)


def _uses_swap(block_m: int, d: int, dtype: torch.dtype) -> bool:
    """Whether the prefix products are taken transposed (`_prefix_chunk`): decode tiles of 16 rows, d <= 128,
    16-bit queries."""
    return bool(_DECODE_SWAP and block_m == 16 and d <= 128 and dtype != torch.float32)


def _rot_cols(block_d: int) -> int:
    """Output columns per step of the float32 (rows x d) @ (d x d) rotation products: all of them up to d = 128
    (no register spills for sm_90), 64 beyond (a whole 256 x 256 float32 slice of R exceeds shared memory)."""
    return block_d if block_d <= 128 else 64


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Partial and output buffers (tests replace this with a NaN fill to check every element read was written)."""
    return torch.empty(shape, dtype=dtype, device=device)


@torch.no_grad()
def ragged_attention_triton(queries, prefix: Optional[RaggedPrefix], app_keys=None, app_values=None, app_mask=None,
                            scale: Optional[float] = None, *, block_m: Optional[int] = None,
                            block_n: Optional[int] = None, chunk: Optional[int] = None,
                            num_warps: Optional[int] = None, num_stages: Optional[int] = None) -> torch.Tensor:
    """Triton implementation; same contract as :func:`ragged_attention_torch`. Keyword-only tuning knobs:
    block_m (query rows per tile), block_n (keys per inner step), chunk (keys per split), num_warps/num_stages."""
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
    G = Hq // Hkv
    M_all = B * Lq * G
    n_entries = prefix.num_entries if prefix is not None else 0
    bm, bn, chunk, warps, stages = _pick_config(M_all, n_entries + (L_app if L_app else 0), Hkv, d, dev,
                                                block_m, block_n, chunk, _PROGRAMS_PER_SM,
                                                queries.dtype == torch.float32)
    warps, stages = num_warps or warps, num_stages or stages
    BD = max(16, _next_pow2(d))
    BH = max(2, _next_pow2(Hkv))
    if queries.stride(-1) != 1:
        queries = queries.contiguous()

    placeholder = _placeholder(dev)
    K_CODEC = V_CODEC = 0
    K_BITS = V_BITS = 8
    n_items, most_items, E = 0, 0, 0
    kx = ks = kg = km = kc = vx = vs = vg = vc = beta = placeholder
    ek = ev = eb = rot = vmean = krot = placeholder
    rotate = None  # how R q is made for lloyd keys
    offs = _zero_offsets(dev, Hkv) if prefix is None else prefix.offsets
    q_rot = queries
    k_stride = v_stride = s_km = s_vm = 0
    hadamard = _uses_hadamard(d)
    if prefix is not None and prefix.max_length:
        # the work list: ceil(length / chunk) items per head, found in the kernels from the device offsets
        head_items = [-(-n // chunk) for n in prefix.lengths]
        n_items, most_items = sum(head_items), max(head_items)
        beta = prefix.beta
        pk, pv = prefix.keys, prefix.values
        K_CODEC, V_CODEC = _CODEC_ID[pk.codec], _CODEC_ID[pv.codec]
        kx, ks, k_stride = _data_views(pk)
        vx, vs, v_stride = _data_views(pv)
        if pk.codec == "lloyd":
            K_BITS, kg, km, kc = pk.bits, pk.gains, pk.mean, pk.centroids
            s_km = km.stride(0)
            krot = pk.rotation
            if hadamard:
                rotate = "hadamard"
            else:
                rotate = "prologue" if _ROTATE == "prologue" and d <= 128 else (_ROTATE if _ROTATE != "prologue"
                                                                               else "kernel")
            if rotate == "kernel":
                q_rot = _alloc((B, Hq, Lq, d), torch.float32, dev)  # R q, filled by _rotate_kernel below
            elif rotate == "matmul":  # (B*Hq*Lq, d) @ R^T in float32 (cuBLAS; no TF32: the flag is switched off)
                q_rot = _rotate_matmul(queries, krot)
        if pv.codec == "lloyd":
            V_BITS, vg, vmean, vc, rot = pv.bits, pv.gains, pv.mean, pv.centroids, pv.rotation
            s_vm = vmean.stride(0)
    if prefix is not None and prefix.num_exact:
        E = prefix.num_exact
        ek, ev, eb = prefix.exact_keys.contiguous(), prefix.exact_values.contiguous(), prefix.exact_beta.contiguous()
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
    e1 = 1 if E else 0
    n_other = e1 + B * n_app  # programs per KV head beside its prefix items
    n_obuf = e1 + n_app  # their buffers per KV head (the sequences' appended rows are disjoint)
    n_slots = n_items + Hkv * n_other
    n_buf = n_items + Hkv * n_obuf
    V_HAD = V_CODEC == 1 and hadamard  # the partial kernel un-rotates the values
    V_LLOYD = V_CODEC == 1 and not V_HAD  # the merge un-rotates them
    lut = _uses_lut(queries.dtype, interpret)
    swap = _uses_swap(bm, d, queries.dtype)
    pre = _prefetch_flags(bm, K_CODEC, V_CODEC)
    pre_stages = num_stages or _prefix_stages(swap, stages)
    launch_opts = {"maxnreg": _DECODE_MAXNREG} if _DECODE_MAXNREG and bm == 16 and d <= 128 else {}

    n_tiles = -(-M_all // bm)
    # fused merge: every program of (tile, head) covers the same global rows (one tile, or one sequence) and
    # every head has a program (exact or appended slots), so the last one to finish can write the output
    fused = _fuse_merge(n_other, n_tiles, B)
    pdl = not fused and _uses_pdl(dev, interpret)
    counters = _counters(dev, n_tiles * Hkv) if fused else placeholder
    if interpret:
        rot_precision = "ieee"
    else:
        rot_precision = "tf32x3"  # ~float32 accuracy on the tensor cores (the rotations are float32 products)
    pm = _alloc((max(n_buf, 1), M_all), torch.float32, dev)
    pl = _alloc((max(n_buf, 1), M_all), torch.float32, dev)
    pacc = _alloc((max(n_buf, 1), M_all, BD), torch.float32, dev)
    out = _alloc((B, Lq, Hq, d), queries.dtype, dev)

    if queries.dtype == torch.float32:
        if dev.type != "cuda":
            dot_precision = "ieee"
        elif _env_flag("COMPACTOR_TF32") is False:
            dot_precision = "tf32x3"
        else:
            dot_precision = "tf32"
    else:
        dot_precision = "tf32"  # only affects float32 operands
    upcast = bool(interpret and queries.dtype == torch.bfloat16)

    ctx = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    with ctx:
        if rotate == "kernel":
            n_q = B * Hq * Lq
            # 16 rows x 8 warps: the float32 (exact-FMA) d x d product fits the registers without spilling
            _rotate_kernel[(-(-n_q // 16),)](queries, prefix.keys.rotation, q_rot, n_q, Hq, Lq,
                                             queries.stride(0), queries.stride(1), queries.stride(2),
                                             D=d, BLOCK_M=16, BLOCK_D=BD, BLOCK_C=_rot_cols(BD), num_warps=8)
        if n_slots:
            fm, fs, fc = _combine_config(M_all, BD, V_LLOYD, fused_rows=bm)
            _partial_kernel[(n_tiles, n_slots)](
                queries, q_rot, krot, offs, beta,
                kx, ks, kg, km, kc, vx, vs, vg, vc,
                ek, ev, eb,
                ak, av, mask,
                pm, pl, pacc,
                counters, vmean, rot, out,
                B, Lq, L_app, E, Hkv, n_items, max(n_other, 1), n_obuf, max(n_app, 1), chunk, M_all,
                scale * _LOG2E, 1.0 / math.sqrt(d),
                queries.stride(0), queries.stride(1), queries.stride(2),
                q_rot.stride(0), q_rot.stride(1), q_rot.stride(2),
                k_stride, v_stride, s_km,
                ak.stride(0) if L_app else 0, ak.stride(1) if L_app else 0, ak.stride(2) if L_app else 0,
                av.stride(0) if L_app else 0, av.stride(1) if L_app else 0, av.stride(2) if L_app else 0,
                mask.stride(0) if app_mask is not None else 0,
                s_vm, out.stride(0), out.stride(1), out.stride(2),
                G=G, D=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=BD, BLOCK_H=BH, K_CODEC=K_CODEC, K_BITS=K_BITS,
                V_CODEC=V_CODEC, V_BITS=V_BITS, SELECT=_LLOYD_SELECT, HAS_MASK=app_mask is not None,
                UPCAST=upcast, DOT_PRECISION=dot_precision, ROT_IN=rotate == "prologue",
                ROT_PRECISION=rot_precision, LUT=lut, K_HAD=rotate == "hadamard", V_HAD=V_HAD, SPLIT=not interpret,
                FUSED=fused, CM=fm, CS=fs, CC=fc, SWAP=swap, PREFETCH=pre[0], K_PRE=pre[1], V_PRE=pre[2],
                FWHT=_FWHT, PDL=pdl, PRE_STAGES=pre_stages,
                num_warps=warps, num_stages=stages, **launch_opts,
            )
        if not fused:
            head_buffers = n_obuf + most_items
            cm, cs, cc = _combine_config(M_all, BD, V_LLOYD, head_buffers=head_buffers)
            _combine_kernel[(-(-M_all // cm), Hkv, BD // cc)](
                pm, pl, pacc, offs, vmean, rot, out,
                Lq, Hkv, n_items, n_obuf, chunk, M_all,
                s_vm, out.stride(0), out.stride(1), out.stride(2),
                G=G, D=d, BLOCK_M=cm, BLOCK_D=BD, BLOCK_C=cc, BLOCK_S=cs, BLOCK_H=BH, V_LLOYD=V_LLOYD,
                ROT_PRECISION=rot_precision, PDL=pdl, num_warps=8, **({"launch_pdl": True} if pdl else {}),
            )
    return out


def _fuse_merge(n_other: int, n_tiles: int, B: int) -> bool:
    """Whether the partial kernel merges (see _FUSE_COMBINE): every head needs a program (exact or appended
    slots) and all programs of a (tile, head) must cover the same global rows (one tile, or one sequence)."""
    if not _FUSE_COMBINE or not n_other or not (n_tiles == 1 or B == 1):
        return False
    return _FUSE_COMBINE is True or n_tiles > 1


_COUNTERS: dict = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """The fused merge's int32 tickets, one per (row tile, KV head), zero between launches (the last program of
    each puts it back). One buffer per device, grown (never freed: captured CUDA graphs keep its address)."""
    held = _COUNTERS.setdefault(device, [])
    if not held or held[-1].numel() < n:
        held.append(torch.zeros(max(n, 4096), dtype=torch.int32, device=device))
    return held[-1]


def _rotate_matmul(queries: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """R q for every query row, float32 (B, Hq, Lq, d) contiguous: one matmul (rows, d) @ R^T, no TF32."""
    B, Hq, Lq, d = queries.shape
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return (queries.reshape(B * Hq * Lq, d).float() @ rotation.float().T).view(B, Hq, Lq, d)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def _data_views(part) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(data pointer tensor, float16 view for block scales, row stride in elements of the first)."""
    x = part.data
    if part.codec == "raw":
        if x.stride(-1) != 1:
            x = x.contiguous()
        return x, x, x.stride(0)
    x = x.contiguous()
    if part.codec == "q8_0":
        return x.view(torch.int8), x.view(torch.float16), x.shape[1]
    if part.codec == "q4_0":
        return x, x.view(torch.float16), x.shape[1]
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
