"""SEAM, temporary: issue 9's compactor/evaluation/sensitivity.py (`measure_sensitivity`, `sensitivity_weights`,
same names, arguments and results) is not on this branch yet. This is the smallest stand-in against this branch's
pipeline (no split budgets, no reconstruction probe) so that calibration runs and can be measured before the merge.
At the merge: delete this file and the ImportError branch in head_budgets.py; nothing else imports it.
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
    unit: str
    shrink: float
    ratio: float


def measure_sensitivity(evaluator, method, ratio: float, budget: str = "global", budget_floor: float = 0.0,
                        unit: str = "layer", shrink: float = 0.5, progress: bool = True) -> Sensitivity:
    from ..pipeline import compact_capture

    if unit != "head":
        raise ValueError("this stand-in measures heads only")
    cap = evaluator.capture
    layers, budgets = compact_capture(cap, method, ratio, budget, budget_floor, progress=False)
    ref = evaluator.score(layers, method.name, ratio, 0.0)
    L, H = budgets.shape
    d_ckl, d_ret = torch.zeros(L, H, dtype=torch.float64), torch.zeros(L, H, dtype=torch.float64)
    stats = cap.attention_stats(getattr(method, "context", "full"))
    for l, h in tqdm([(l, h) for l in range(L) for h in range(H)], desc="sensitivity", unit="head",
                     disable=not progress):
        head_stats = type(stats[l])(*(x[h] for x in stats[l]))
        c = method.compact(cap.keys[l][h], cap.values[l][h], cap.queries[l][h], max(1, int(budgets[l, h] * shrink)),
                           query_pos=cap.query_pos, scale=cap.scale, stats=head_stats, head_id=l * H + h)
        layer = layers[l]
        parts = [(c.keys, c.values, c.beta.float(), c.positions.long()) if i == h else
                 (layer.keys[i, :n], layer.values[i, :n], layer.beta[i, :n], layer.positions[i, :n])
                 for i, n in enumerate(layer.lengths.tolist())]
        t = max(p[0].shape[0] for p in parts)

        def pad(x, fill):
            return torch.cat([x, x.new_full((t - x.shape[0], *x.shape[1:]), fill)])

        trial = list(layers)
        trial[l] = LayerKV(*(torch.stack([pad(p[j], f) for p in parts]) for j, f in enumerate((0, 0, 0.0, -1))),
                           torch.tensor([p[0].shape[0] for p in parts]))
        row = evaluator.score(trial, method.name, ratio, 0.0)
        d_ckl[l, h], d_ret[l, h] = row.ckl - ref.ckl, ref.retention - row.retention
    return Sensitivity(d_ckl, d_ret, unit, shrink, ratio)


def sensitivity_weights(sens: Sensitivity, recall_weight: float = 1.0, power: float = 1.0,
                        eps: float = 1e-3) -> torch.Tensor:
    def norm(x):
        x = x.clamp_min(0)
        return x / x.mean().clamp_min(1e-12)

    c = norm(sens.d_ckl) + recall_weight * norm(sens.d_ret)
    c = c / c.mean().clamp_min(1e-12)
    return c.clamp_min(eps) ** power
