"""Bit packing of b-bit codes (1 <= b <= 8) over the last dim.

Bit order: the codes of a row form one little-endian bit stream. Code i occupies stream bits
[i·b, (i+1)·b), least significant bit first, and stream bit k is bit (k mod 8) (LSB = bit 0) of
byte k // 8. A row of n codes packs into ceil(n·b/8) bytes; unused high bits of the last byte are 0.
Example (b=3): codes [1, 2, 7] -> stream bits 100 010 111 -> bytes [0b11010001, 0b00000001].
"""
from __future__ import annotations

import torch


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or int(bits) != bits or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
    return int(bits)


def packed_size(count: int, bits: int) -> int:
    """Bytes per row for `count` codes of `bits` bits: ceil(count·bits/8)."""
    return (count * _check_bits(bits) + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: (..., n) integer tensor with values in [0, 2^bits) -> uint8 (..., ceil(n·bits/8))."""
    bits = _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"pack_bits needs integer codes, got {codes.dtype}")
    n = codes.shape[-1]
    if codes.numel() and (codes.min().item() < 0 or codes.max().item() >= 2**bits):
        raise ValueError(f"pack_bits: codes must lie in 0..{2**bits - 1} for {bits} bits")
    if bits == 8:
        return codes.to(torch.uint8).clone()
    lead = codes.shape[:-1]
    groups = -(-n // 8)  # 8 codes fill exactly `bits` bytes
    c = torch.zeros(*lead, groups * 8, dtype=torch.int64, device=codes.device)
    c[..., :n] = codes
    c = c.reshape(*lead, groups, 8)
    shifts = torch.arange(8, device=codes.device) * bits
    word = (c << shifts).sum(-1, keepdim=True)  # (..., groups, 1), < 2^56: no overlap, sum == or
    out = (word >> (torch.arange(bits, device=codes.device) * 8)) & 0xFF
    return out.reshape(*lead, groups * bits)[..., : packed_size(n, bits)].to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """packed: uint8 (..., ceil(count·bits/8)) from `pack_bits` -> uint8 codes (..., count)."""
    bits = _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_bits needs a uint8 tensor, got {packed.dtype}")
    nbytes = packed_size(count, bits)
    if packed.shape[-1] != nbytes:
        raise ValueError(f"unpack_bits: {count} codes of {bits} bits need {nbytes} bytes, got {packed.shape[-1]}")
    if bits == 8:
        return packed.clone()
    lead = packed.shape[:-1]
    groups = -(-count // 8)
    p = torch.zeros(*lead, groups * bits, dtype=torch.int64, device=packed.device)
    p[..., :nbytes] = packed
    p = p.reshape(*lead, groups, bits)
    word = (p << (torch.arange(bits, device=packed.device) * 8)).sum(-1, keepdim=True)
    codes = (word >> (torch.arange(8, device=packed.device) * bits)) & (2**bits - 1)
    return codes.reshape(*lead, groups * 8)[..., :count].to(torch.uint8)
