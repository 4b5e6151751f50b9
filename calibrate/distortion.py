"""What quantizing one part of a cache costs, measured on held-out queries (the continuation's own queries).

A storage unit is (layer, phase, keys or values): the tokens of one phase in one layer, quantized together per head
(one mean per head, as `encode_layer` stores a phase). For a unit at b bits:
- `attention_error`: relative squared error of the layer's attention outputs, ‖o' − o‖² / ‖o‖² summed over the KV
  heads and the held-out queries, and the attention KL(p ‖ p') of the weights (what TAQG reports; keys only: values
  do not move the weights);
- `layer_weights`: output error is comparable between keys and values of one layer but not across layers, so each
  (layer, tensor) gets a weight w = (continuation KL with that tensor of that layer quantized at b_ref bits, through
  the whole model) / (its attention error at b_ref). The predicted cost of a unit is then w · error: the
  continuation KL it would cause alone, which the measured allocation minimises.
Quantization goes through the lloyd codec exactly as stored (`roundtrip_tensor`: centring, rotation, codebook,
gain, exact entries), with the calibrated codebook of the layer when one is given.
"""
from __future__ import annotations

import numpy as np
import torch

from ..storage.kv_codec import EXACT_DEFAULT, TensorCodec, roundtrip_tensor

TENSORS = ("keys", "values")


def lloyd(bits: int, book: np.ndarray | None, name: str = "cal") -> tuple[TensorCodec, dict]:
    """The lloyd TensorCodec at `bits` with the given centroids (None: the Beta codebook) and its codebooks dict."""
    if book is None:
        return TensorCodec("lloyd", bits, EXACT_DEFAULT), {}
    return TensorCodec("lloyd", bits, EXACT_DEFAULT, name), {name: book}


def quantize_groups(x: torch.Tensor, groups: torch.Tensor, codecs: dict[int, tuple[TensorCodec, dict] | None],
                    importance: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """x (H, T, d); groups (T,) or (H, T) int group of each token; codecs: group -> (codec, codebooks) or None
    (kept exact). Each group of each head is quantized as one unit. Returns float32 (H, T, d)."""
    H, T, _ = x.shape
    groups = groups.expand(H, T) if groups.dim() == 1 else groups
    out = x.float().clone()
    for h in range(H):
        for g, spec in codecs.items():
            if spec is None:
                continue
            rows = (groups[h] == g).nonzero().flatten()
            if rows.numel():
                out[h, rows] = roundtrip_tensor(x[h, rows], spec[0], "float32", seed,
                                                None if importance is None else importance[h, rows], spec[1])
    return out


@torch.no_grad()
def attention_error(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k2: torch.Tensor, v2: torch.Tensor,
                    scale: float) -> tuple[float, float]:
    """q (H, m, d) held-out queries; k, v the exact keys/values (H, T, d); k2, v2 quantized. Returns (relative
    squared output error, mean attention KL in nats) over heads and queries."""
    s, s2 = scale * q @ k.transpose(1, 2), scale * q @ k2.transpose(1, 2)
    lp, lp2 = torch.log_softmax(s.double(), -1), torch.log_softmax(s2.double(), -1)
    p, p2 = lp.exp(), lp2.exp()
    o, o2 = p @ v.double(), p2 @ v2.double()
    err = float(((o2 - o) ** 2).sum() / (o ** 2).sum().clamp_min(1e-30))
    kl = float((p * (lp - lp2)).sum(-1).mean())
    return err, kl


def head_importance(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(H, T) RMS over the held-out queries of each key's attention weight (picks the entries kept exact)."""
    p = torch.softmax(scale * q.float() @ k.float().transpose(1, 2), -1)
    return p.pow(2).mean(1).sqrt()


def unit_errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, phase: torch.Tensor, n_phases: int,
                options: list[int], books: dict, layer: int, seed: int = 0) -> np.ndarray:
    """Attention errors of one layer's units: (n_phases, 2 tensors, len(options)) relative output error when only
    that phase of that tensor is quantized at that many bits. books: (tensor, layer, bits) -> centroids or absent."""
    imp = head_importance(q, k, scale)
    out = np.zeros((n_phases, 2, len(options)))
    for p in range(n_phases):
        if not bool((phase == p).any()):
            continue
        for ti, t in enumerate(TENSORS):
            for bi, b in enumerate(options):
                spec = lloyd(b, books.get((t, layer, b)))
                xq = quantize_groups(k if t == "keys" else v, (phase == p).long(), {1: spec}, imp, seed)
                out[p, ti, bi] = attention_error(q, k, v, xq if t == "keys" else k, xq if t == "values" else v,
                                                 scale)[0]
    return out
