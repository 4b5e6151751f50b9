"""TOVA (arXiv 2401.06104): keys ranked by the attention of the last prefix token, averaged over heads.

The last query (position T - 1) of every query head attends its KV head's keys (softmax over all T); the weights are
averaged over heads and the last key itself ranks first. `heads="layer"` (TOVA and kvpress's TOVAPress) averages over
every query head of the layer, so all KV heads of a layer keep the same positions (needs `layer_keys` and
`layer_window` in the call context: the pipeline passes them); `heads="group"` over the KV head's own group.
TOVA proper evicts one token per decoding step; as kvpress, this is its one-shot form at the end of the prefill (one
query ranks all keys, so the softmax renormalisation over the kept keys changes no ranking).
"""
from __future__ import annotations

import torch

from ..fitting.key_selection import top_keys
from .base import Compacted, Method, keep_all, take
from .snapkv import rank_window_first, window_attention, window_of


def last_query_attention(keys: torch.Tensor, window_queries: torch.Tensor, scale: float, group: int) -> torch.Tensor:
    """(g, T) softmax weights of the last window query of each of the g heads."""
    return window_attention(keys, window_queries, scale, group)[:, -1]


def tova_scores(keys_by_head: list[torch.Tensor], windows: list[torch.Tensor], scale: float, group: int
                ) -> torch.Tensor:
    """(T,) ranking from the heads given (one or all KV heads of a layer): the mean over their query heads of the last
    query's weight on keys 0 .. T - 2; key T - 1 on top."""
    weights = torch.cat([last_query_attention(k, wq, scale, group) for k, wq in zip(keys_by_head, windows)])
    return rank_window_first(weights.mean(0)[:-1], 1)


class TOVA(Method):
    name = "tova"

    def __init__(self, heads: str = "layer"):
        if heads not in ("layer", "group"):
            raise ValueError(f"TOVA heads must be 'layer' or 'group', not {heads!r}")
        self.heads = heads

    def params(self) -> dict:
        return {"heads": self.heads}

    def compact(self, keys, values, queries, budget, **context) -> Compacted:
        if budget >= keys.shape[0]:
            return keep_all(keys, values)
        wq, group = window_of(context)
        if self.heads == "layer":
            layer_keys, layer_window = context.get("layer_keys"), context.get("layer_window")
            if layer_keys is None or layer_window is None:
                raise ValueError("TOVA heads='layer' needs layer_keys and layer_window in the call context")
            scores = tova_scores(list(layer_keys), list(layer_window), context["scale"], group)
        else:
            scores = tova_scores([keys], [wq], context["scale"], group)
        return take(keys, values, top_keys(scores.to(keys.device), budget))
