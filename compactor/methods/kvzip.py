"""KVzip (arXiv 2505.23416) with one budget shared by all heads and layers: eviction by the reconstruction score.

The score (fitting/key_scores.kvzip) is the max over the positions of a "repeat the document" pass of the softmax
weight each key receives, max-pooled over the GQA group (capture/reconstruction.py computes it). The budget rule is
fitting/budgets.global_budgets with no floor: the L * H * ceil(T / r) highest scores of the whole cache are kept,
wherever they fall (KVzip's non-uniform head budgets; global_budgets still gives every head its one best key). beta = 0, values copied.
This is eviction(score=kvzip) with budget=global and budget_floor=0, named so that the sweep lists it.
"""
from __future__ import annotations

from .attention_matching import Eviction


class KVzip(Eviction):
    name = "kvzip"
    budget_mode = "global"  # compact_capture takes this budget rule (and floor) whatever the run's --budget
    budget_floor = 0.0

    def __init__(self, score: str = "kvzip", context: str = "full"):
        super().__init__(score, context)
