"""Key scores, one function per score: how much each document key matters, comparable across heads and layers.

Every score is a (Hkv, T) tensor per layer; the pipeline stacks them to (L, Hkv, T) to rank keys inside a head and to
share one budget across all heads and layers (fitting/budgets.py). Inputs:
- `AttentionStats` of the sampled reference queries (kernels/attention_stats.py): softmax weights normalised over
  the document keys;
- the reconstruction probe (capture/reconstruction.py), per layer (Hq, T): `recon` = max over every replay position
  of the model's own softmax weight, `recon_grad` = the same weighted by the gradient norm at the probe token
  (KVgrad), `wo_norm` = ||W_O^(h) v||, the value as query head h writes it into the residual stream.

The query heads of a GQA group are pooled by a max, after the per-head products (as KVzip/KVgrad do).
"""
from __future__ import annotations

import torch

from ..kernels import AttentionStats


def rms(stats: AttentionStats) -> torch.Tensor:
    """sqrt(mean_i p_ij^2) over the sampled reference queries (the spine's highest-attention score)."""
    return stats.p_rms


def max_weight(stats: AttentionStats) -> torch.Tensor:
    """max_i p_ij over the sampled reference queries."""
    return stats.p_max


def _group_max(per_q_head: torch.Tensor, n_kv: int) -> torch.Tensor:
    """(Hq, T) -> (Hkv, T): max over each KV head's query group (head-major grouping, as transformers repeats KV)."""
    hq, T = per_q_head.shape
    return per_q_head.reshape(n_kv, hq // n_kv, T).amax(1)


def kvzip(recon: torch.Tensor, n_kv: int) -> torch.Tensor:
    """KVzip: max over replay positions and the GQA group of the softmax weight. recon (Hq, T)."""
    return _group_max(recon, n_kv)


def kvzip_wo(recon: torch.Tensor, wo_norm: torch.Tensor, n_kv: int) -> torch.Tensor:
    """KVzip+ without the 1/||h|| row factor: max over the group of weight x ||W_O v||. (Hq, T) each."""
    return _group_max(recon * wo_norm, n_kv)


def kvgrad(recon_grad: torch.Tensor, wo_norm: torch.Tensor, n_kv: int) -> torch.Tensor:
    """KVgrad: max over positions and the group of weight x ||W_O v|| x ||dPhi/da_p||. (Hq, T) each."""
    return _group_max(recon_grad * wo_norm, n_kv)


def geometric_mix(a: torch.Tensor, b: torch.Tensor, alpha: float = 0.5, eps: float = 1e-12) -> torch.Tensor:
    """a^(1-alpha) * b^alpha, each first divided by its mean over everything given (all layers and heads), so that
    neither score's units decide the mix. Shapes equal, any."""
    a = a / a.mean().clamp_min(eps)
    b = b / b.mean().clamp_min(eps)
    return a.clamp_min(eps) ** (1 - alpha) * b.clamp_min(eps) ** alpha


# name -> (needs the reconstruction probe, needs its gradient)
SCORES = {"rms": (False, False), "max": (False, False), "kvzip": (True, False), "kvzip_wo": (True, False),
          "kvgrad": (True, True), "kvzip_rms": (True, False), "kvzip_wo_rms": (True, False),
          "kvgrad_rms": (True, True)}


def needs_probe(score: str) -> tuple[bool, bool]:
    if score not in SCORES:
        raise ValueError(f"unknown key score {score!r}; choose from {', '.join(SCORES)}")
    return SCORES[score]


def layer_scores(score: str, stats: AttentionStats | None, probe: dict | None, layer: int,
                 n_kv: int) -> torch.Tensor:
    """(Hkv, T) float32 scores of one layer (unmixed scores; mixes are made over all layers by `all_scores`)."""
    base = score.removesuffix("_rms")
    if base == "rms":
        return rms(stats)
    if base == "max":
        return max_weight(stats)
    if probe is None or "recon" not in probe:
        raise ValueError(f"key score {score!r} needs the reconstruction probe (capture with probe='attention' or "
                         f"'gradient')")
    if base == "kvzip":
        return kvzip(probe["recon"][layer], n_kv)
    if base == "kvzip_wo":
        return kvzip_wo(probe["recon"][layer], probe["wo_norm"][layer], n_kv)
    if base == "kvgrad":
        if "recon_grad" not in probe:
            raise ValueError("key score 'kvgrad' needs the gradient probe (capture with probe='gradient')")
        return kvgrad(probe["recon_grad"][layer], probe["wo_norm"][layer], n_kv)
    raise ValueError(f"unknown key score {score!r}; choose from {', '.join(SCORES)}")


def all_scores(score: str, stats: list[AttentionStats] | None, probe: dict | None, n_kv: int,
               mix: float = 0.5) -> torch.Tensor:
    """(L, Hkv, T) float32 on the CPU. A name ending in `_rms` mixes the reconstruction score with the RMS score
    (geometric_mix with weight `mix` on RMS)."""
    probe_needed, _ = needs_probe(score)
    if probe_needed and (probe is None or "recon" not in probe):
        raise ValueError(f"key score {score!r} needs the reconstruction probe (capture with probe='attention' or "
                         f"'gradient')")
    L = len(stats) if stats is not None else probe["recon"].shape[0]
    base = torch.stack([layer_scores(score.removesuffix("_rms"), None if stats is None else stats[l], probe, l, n_kv)
                        .float().cpu() for l in range(L)])
    if score.endswith("_rms") and score != "rms":
        base = geometric_mix(base, torch.stack([rms(s).float().cpu() for s in stats]), mix)
    return base
