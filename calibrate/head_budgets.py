"""Per-head compaction budgets from measured sensitivity: how much continuation KL (and recall) a head loses when it
alone keeps fewer entries. The measurement and the weights are issue 9's code (compactor/evaluation/sensitivity.py:
`measure_sensitivity`, `sensitivity_weights`); calibration runs it once per model on a calibration document and
stores the per-head multipliers of the key scores, with which `compress` shares its global budget non-uniformly.
"""
from __future__ import annotations

import torch

from ..evaluation.sensitivity import measure_sensitivity, sensitivity_weights  # the one implementation (issue 9)


def head_weights(evaluator, method, ratio: float, shrink: float = 0.5, budget: str = "layer",
                 progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights (L, H) > 0, d_ckl (L, H), d_ret (L, H)) for the evaluator's document: each head shrunk alone to
    `shrink` x its budget at `ratio`, the others as compacted with `budget`."""
    sens = measure_sensitivity(evaluator, method, ratio, budget=budget, budget_floor=0.0, unit="head", shrink=shrink,
                               progress=progress)
    return sensitivity_weights(sens), sens.d_ckl, sens.d_ret
