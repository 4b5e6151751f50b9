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
Quantization goes through the lloyd codec as stored (centring, rotation, codebook, gain, exact entries; batched over
heads, without bit packing), with the calibrated codebook of the layer when one is given.
"""
from __future__ import annotations

import numpy as np
import torch

from ..quant import lloyd_decode, lloyd_encode
from ..storage.kv_codec import EXACT_DEFAULT, TensorCodec, codebook_from_centroids

TENSORS = ("keys", "values")


def lloyd(bits: int, book: np.ndarray | None, name: str = "cal") -> tuple[TensorCodec, dict]:
    """The lloyd TensorCodec at `bits` with the given centroids (None: the Beta codebook) and its codebooks dict."""
    if book is None:
        return TensorCodec("lloyd", bits, EXACT_DEFAULT), {}
    return TensorCodec("lloyd", bits, EXACT_DEFAULT, name), {name: book}


def quantize_heads(x: torch.Tensor, spec: tuple[TensorCodec, dict], importance: torch.Tensor | None = None,
                   seed: int = 0) -> torch.Tensor:
    """x (H, n, d) -> float32 (H, n, d) after the lloyd codec of `spec`, all heads in one batched call: the same
    steps as a stored tensor (centre on the fp16-rounded head mean, unit norm, rotation, nearest centroid, fp16
    least-squares gain, the `exact` most important rows per head kept as they are; kv_codec._encode_tensor) without
    the bit packing, which calibration does not need."""
    codec, books = spec
    d = x.shape[-1]
    book = codebook_from_centroids(books[codec.codebook], d) if codec.codebook else None
    out = lloyd_decode(lloyd_encode(x.float(), codec.bits, seed=seed, center=True, codebook=book))
    e = min(codec.exact, x.shape[1])
    if e:
        score = importance if importance is not None else -torch.arange(x.shape[1], dtype=torch.float32).expand(
            x.shape[0], -1)
        rows = torch.topk(score.float(), e, dim=-1).indices[..., None].expand(-1, -1, d)
        out.scatter_(1, rows, x.float().gather(1, rows))
    return out


def quantize_groups(x: torch.Tensor, groups: torch.Tensor, codecs: dict[int, tuple[TensorCodec, dict] | None],
                    importance: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """x (H, T, d); groups (T,) int group of each token (the same for every head); codecs: group -> (codec,
    codebooks) or None (kept exact). Each group of each head is quantized as one unit. Returns float32 (H, T, d)."""
    out = x.float().clone()
    for g, spec in codecs.items():
        if spec is None:
            continue
        rows = (groups == g).nonzero().flatten()
        if rows.numel():
            out[:, rows] = quantize_heads(x[:, rows], spec, None if importance is None else importance[:, rows], seed)
    return out


@torch.no_grad()
def attention_error(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k2: torch.Tensor, v2: torch.Tensor,
                    scale: float) -> tuple[float, float]:
    """q (H, m, d) held-out queries; k, v the exact keys/values (H, T, d); k2, v2 quantized. Returns (relative
    squared output error, mean attention KL in nats) over heads and queries."""
    s, s2 = scale * q @ k.transpose(1, 2), scale * q @ k2.transpose(1, 2)
    lp, lp2 = torch.log_softmax(s.float(), -1), torch.log_softmax(s2.float(), -1)
    p, p2 = lp.exp(), lp2.exp()
    o, o2 = p @ v.float(), p2 @ v2.float()
    err = float(((o2 - o).double() ** 2).sum() / (o.double() ** 2).sum().clamp_min(1e-30))
    kl = float((p * (lp - lp2)).sum(-1).double().mean())
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
