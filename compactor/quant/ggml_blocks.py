"""llama.cpp Q8_0 and Q4_0 blocks, byte-identical to ggml-quants.c `quantize_row_q8_0_ref` /
`quantize_row_q4_0_ref` (and to `gguf.quants`).

Blocks of 32 consecutive values along the last dim; all arithmetic in float32 as in the C code.
  * Q8_0, 34 bytes: fp16 little-endian d = amax/127, then 32 int8 q = roundf(x·(1/d))
    (round half away from zero). Decode q·d.
  * Q4_0, 18 bytes: fp16 little-endian d = max/−8, max the value of largest magnitude (first one
    on ties; +0 for an all-zero block, so its d is −0.0 = bytes 00 80), then 16 bytes
    byte j = q[j] | q[j+16] << 4 with q = min(15, trunc(x·(1/d) + 8.5)). Decode (q − 8)·d.
(1/d is taken as 0 when d == 0.) Encoded tensors are uint8 (..., d/32·block_bytes); their numel is
the stored byte count. Inputs must be finite with a last dim that is a multiple of 32, and the scale
must fit fp16 (|x| < ~8.3e6 for Q8_0, < ~5.2e5 for Q4_0); anything else raises ValueError.
"""
from __future__ import annotations

import torch

QK = 32
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18}


def _blocks(x: torch.Tensor, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim == 0 or x.shape[-1] % QK:
        raise ValueError(f"{name}: last dim must be a multiple of {QK}, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: input contains NaN or inf")
    return x.to(torch.float32).reshape(*x.shape[:-1], x.shape[-1] // QK, QK)


def _scale(d: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 scales (..., 1) -> (fp16 scale as 2 little-endian bytes (..., 2), 1/d with 1/0 = 0)."""
    h = d.to(torch.float16)
    if not torch.isfinite(h).all():
        raise ValueError(f"{name}: block scale overflows fp16 (inputs too large)")
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    if not torch.isfinite(inv).all():
        raise ValueError(f"{name}: block scale underflows float32 (inputs too small)")
    v = h.view(torch.int16).to(torch.int32) & 0xFFFF
    return torch.cat((v & 0xFF, v >> 8), dim=-1).to(torch.uint8), inv


def _read_scale(blocks: torch.Tensor) -> torch.Tensor:
    v = blocks[..., 0:1].to(torch.int32) | (blocks[..., 1:2].to(torch.int32) << 8)
    return v.to(torch.int16).view(torch.float16).to(torch.float32)


def _split(enc: torch.Tensor, name: str) -> torch.Tensor:
    nb = BLOCK_BYTES[name]
    if enc.dtype != torch.uint8 or enc.ndim == 0 or enc.shape[-1] % nb:
        raise ValueError(f"{name}: encoded data must be uint8 with last dim a multiple of {nb}")
    return enc.reshape(*enc.shape[:-1], enc.shape[-1] // nb, nb)


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C roundf: nearest integer, halves away from zero (exact, no float32 x + 0.5 rounding)."""
    a = v.abs()
    f = a.floor()
    return torch.copysign(f + (a - f >= 0.5).to(v.dtype), v)


def q8_0_encode(x: torch.Tensor) -> torch.Tensor:
    """x: (..., d), d % 32 == 0 -> uint8 (..., d/32·34) Q8_0 blocks."""
    b = _blocks(x, "q8_0")
    d = b.abs().amax(-1, keepdim=True) / 127
    scale, inv = _scale(d, "q8_0")
    q = _roundf(b * inv).to(torch.int8).view(torch.uint8)
    return torch.cat((scale, q), dim=-1).reshape(*b.shape[:-2], -1)


def q8_0_decode(enc: torch.Tensor) -> torch.Tensor:
    """uint8 (..., n·34) Q8_0 blocks -> float32 (..., n·32)."""
    blk = _split(enc, "q8_0")
    q = blk[..., 2:].contiguous().view(torch.int8).to(torch.float32)
    return (q * _read_scale(blk)).reshape(*blk.shape[:-2], -1)


def q4_0_encode(x: torch.Tensor) -> torch.Tensor:
    """x: (..., d), d % 32 == 0 -> uint8 (..., d/32·18) Q4_0 blocks."""
    b = _blocks(x, "q4_0")
    a = b.abs()
    amax, idx = a.max(-1, keepdim=True)  # first index of the largest magnitude
    mx = torch.where(amax > 0, b.gather(-1, idx), torch.zeros_like(amax))
    d = mx / -8
    scale, inv = _scale(d, "q4_0")
    q = torch.clamp(torch.trunc(b * inv + 8.5), max=15).to(torch.uint8)
    packed = q[..., :16] | (q[..., 16:] << 4)
    return torch.cat((scale, packed), dim=-1).reshape(*b.shape[:-2], -1)


def q4_0_decode(enc: torch.Tensor) -> torch.Tensor:
    """uint8 (..., n·18) Q4_0 blocks -> float32 (..., n·32)."""
    blk = _split(enc, "q4_0")
    qs = blk[..., 2:]
    q = torch.cat((qs & 0x0F, qs >> 4), dim=-1).to(torch.float32) - 8
    return (q * _read_scale(blk)).reshape(*blk.shape[:-2], -1)
