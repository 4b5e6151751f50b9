"""Budget sensitivity: how continuation KL and recall retention change when one unit (a layer, or one KV head) keeps
fewer entries, everything else unchanged. Calibration stores the result per model; budgets can follow it.

`measure_sensitivity` compacts the capture once with the given method and budgets, then, for every unit, recompacts
that unit alone with `shrink` times its budget and scores the cache with the Evaluator:
    d_ckl[u] = cKL(unit shrunk) - cKL(reference),   d_ret[u] = retention(reference) - retention(unit shrunk)
(both >= 0 when losing entries hurts). `sensitivity_weights` turns them into per-(layer, head) multipliers of the key
scores: the global budget ranking (fitting/budgets.py) then gives more entries to units whose loss costs more.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..layer_kv import LayerKV


@dataclass
class Sensitivity:
    d_ckl: torch.Tensor   # (L, H) float64: cKL increase when the unit keeps `shrink` x its budget
    d_ret: torch.Tensor   # (L, H) float64: retention decrease
    unit: str             # "layer" (every head of a layer shares its layer's numbers) or "head"
    shrink: float
    ratio: float

    def as_dict(self) -> dict:
        return {"d_ckl": self.d_ckl.tolist(), "d_ret": self.d_ret.tolist(), "unit": self.unit,
                "shrink": self.shrink, "ratio": self.ratio}


def _replace_heads(layer: LayerKV, heads: dict[int, LayerKV]) -> LayerKV:
    """A copy of `layer` in which head h is taken from heads[h] (a one-head LayerKV), re-padded."""
    H = layer.keys.shape[0]
    parts = []
    for h in range(H):
        src, i = (heads[h], 0) if h in heads else (layer, h)
        n = int(src.lengths[i])
        parts.append((src.keys[i, :n], src.values[i, :n], src.beta[i, :n], src.positions[i, :n]))
    t = max(p[0].shape[0] for p in parts)

    def pad(x, fill):
        return torch.cat([x, torch.full((t - x.shape[0], *x.shape[1:]), fill, dtype=x.dtype, device=x.device)]) \
            if x.shape[0] < t else x

    return LayerKV(torch.stack([pad(p[0], 0) for p in parts]), torch.stack([pad(p[1], 0) for p in parts]),
                   torch.stack([pad(p[2], 0.0) for p in parts]), torch.stack([pad(p[3], -1) for p in parts]),
                   torch.tensor([p[0].shape[0] for p in parts]))


def measure_sensitivity(evaluator, method, ratio: float, budget: str = "global", budget_floor: float = 0.0,
                        unit: str = "layer", shrink: float = 0.5, progress: bool = True,
                        split_share: float = 0.5) -> Sensitivity:
    """Per-unit sensitivity of cKL and retention on the evaluator's document (module docstring)."""
    from ..pipeline import compact_capture

    if unit not in ("layer", "head"):
        raise ValueError("unit must be 'layer' or 'head'")
    if not 0 <= shrink < 1:
        raise ValueError("shrink must be in [0, 1)")
    cap = evaluator.capture
    layers, budgets = compact_capture(cap, method, ratio, budget, budget_floor, progress=False,
                                      split_share=split_share)
    ranking = _ranking(cap, method, ratio, budget, budget_floor, split_share)
    ref = evaluator.score(layers, method.name, ratio, 0.0)
    L, H = budgets.shape
    d_ckl = torch.zeros(L, H, dtype=torch.float64)
    d_ret = torch.zeros(L, H, dtype=torch.float64)
    units = [(l, None) for l in range(L)] if unit == "layer" else [(l, h) for l in range(L) for h in range(H)]
    for l, h in tqdm(units, desc="sensitivity", unit=unit, disable=not progress):
        heads = range(H) if h is None else [h]
        small = budgets.clone()
        for hh in heads:
            small[l, hh] = max(1, int(budgets[l, hh] * shrink))
        new_heads = {}
        for hh in heads:
            one, _ = _compact_one(cap, method, l, hh, int(small[l, hh]), ranking)
            new_heads[hh] = one
        trial = list(layers)
        trial[l] = _replace_heads(layers[l], new_heads)
        row = evaluator.score(trial, method.name, ratio, 0.0)
        sl = slice(None) if h is None else h
        d_ckl[l, sl] = row.ckl - ref.ckl
        d_ret[l, sl] = ref.retention - row.retention
    return Sensitivity(d_ckl, d_ret, unit, shrink, ratio)


def _ranking(cap, method, ratio, budget, budget_floor, split_share) -> torch.Tensor:
    """(L, H, T) key ranking scores the pipeline uses for these options."""
    from ..fitting.budgets import split_budgets
    from ..fitting.key_scores import all_scores

    stats = cap.attention_stats("full")
    scores = all_scores(getattr(method, "score", "rms"), stats, cap.probe, cap.keys[0].shape[0])
    if budget == "split":
        rms = torch.stack([s.p_rms for s in stats]).float().cpu()
        _, scores = split_budgets(rms, scores, ratio, split_share, budget_floor)
    return scores


def _compact_one(cap, method, l: int, h: int, budget: int, ranking: torch.Tensor) -> tuple[LayerKV, int]:
    """One (layer, head) compacted to `budget` with the capture's statistics, as a one-head LayerKV."""
    from ..fitting.key_scores import all_scores

    stats = cap.attention_stats("full")
    H = cap.keys[0].shape[0]
    copy = None if cap.probe is None else all_scores("kvzip", None, cap.probe, H)
    device = cap.keys[l].device
    head_stats = type(stats[l])(*(x[h] for x in stats[l]))
    c = method.compact(cap.keys[l][h], cap.values[l][h], cap.queries[l][h], budget, query_pos=cap.query_pos,
                       query_source=cap.query_source, scale=cap.scale, stats=head_stats, head_id=l * H + h,
                       scores=ranking[l, h].to(device), copy_scores=None if copy is None else copy[l, h].to(device))
    n = c.keys.shape[0]
    return LayerKV(c.keys[None], c.values[None], c.beta.float()[None], c.positions.long()[None],
                   torch.tensor([n])), n


def sensitivity_weights(sens: Sensitivity, recall_weight: float = 1.0, power: float = 1.0,
                        eps: float = 1e-3) -> torch.Tensor:
    """(L, H) multipliers of the key scores: each unit's normalised cost of losing entries,
    c = d_ckl / mean(d_ckl) + recall_weight * d_ret / mean(d_ret) (negative parts clipped), as (c / mean c)^power,
    floored at eps so that no unit's keys drop out of the ranking."""
    def norm(x):
        x = x.clamp_min(0)
        return x / x.mean().clamp_min(1e-12)

    c = norm(sens.d_ckl) + recall_weight * norm(sens.d_ret)
    c = c / c.mean().clamp_min(1e-12)
    return c.clamp_min(eps) ** power
