"""The compacted cache of one layer, as the pipeline produces it and the serving cache consumes it."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerKV:
    """Hkv heads padded to the longest (t_max): padding has beta 0, position -1 and zero keys/values."""

    keys: torch.Tensor       # (Hkv, t_max, d)
    values: torch.Tensor     # (Hkv, t_max, d)
    beta: torch.Tensor       # (Hkv, t_max) float32
    positions: torch.Tensor  # (Hkv, t_max) int64, -1 in padding
    lengths: torch.Tensor    # (Hkv,) int64 valid entries per head
    importance: torch.Tensor | None = None  # (Hkv, t_max) attention score of each entry (guides quantization)
