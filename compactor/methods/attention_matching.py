"""Attention Matching (arXiv 2602.16284), highest-attention variant, for one (layer, KV head).

1. keys: the `budget` keys of highest attention score over the reference queries (key_selection.py);
2. beta: NNLS so that the kept keys, reweighted by w = exp(beta), carry each query's full attention mass
   (beta_fit.py); keys whose weight comes out 0 are dropped;
3. values: ridge least squares so that attention over the compact cache reproduces each query's full-cache
   attention output (value_fit.py).
`context="full"` lets every reference query see the whole prefix; `"causal"` limits a context query to its
causal past (in the scores and in both fits). A degenerate head (no positive weight, non-finite fit) falls back
to plain eviction of the same keys.
"""
from __future__ import annotations

import torch

from ..beta_fit import fit_mass_weights
from ..key_selection import SCORES, key_stats, score_of, top_keys
from ..value_fit import fit_values
from .base import Compacted, Method, keep_all, take


class ScoredMethod(Method):
    """Shared by AM and eviction: keys ranked by highest attention over the reference queries."""

    uses_scores = True

    def __init__(self, score: str = "rms", context: str = "full"):
        if context not in ("full", "causal"):
            raise ValueError(f"context must be 'full' or 'causal', not {context!r}")
        if score not in SCORES:
            raise ValueError(f"unknown key score {score!r}; choose from {', '.join(SCORES)}")
        self.score, self.context = score, context

    def params(self) -> dict:
        return {"score": self.score, "context": self.context}

    def visible_pos(self, query_pos):
        return query_pos if self.context == "causal" else None

    def _stats(self, keys, values, queries, context):
        """The head's AttentionStats: given by the pipeline (computed once per capture), or computed here."""
        stats = context.get("stats")
        if stats is None:
            stats = key_stats(keys[None], values[None], queries[None], context["scale"],
                              self.visible_pos(context.get("query_pos")))
            stats = type(stats)(*(x[0] for x in stats))
        return stats


class Eviction(ScoredMethod):
    """Baseline: the same keys as AM, beta = 0, original values."""

    name = "eviction"

    def compact(self, keys, values, queries, budget, **context) -> Compacted:
        if budget >= keys.shape[0]:
            return keep_all(keys, values)
        stats = self._stats(keys, values, queries, context)
        return take(keys, values, top_keys(score_of(stats, self.score), budget))


class AttentionMatching(ScoredMethod):
    name = "am"

    def __init__(self, score: str = "rms", context: str = "full", ridge: float = 1e-3):
        super().__init__(score, context)
        self.ridge = ridge

    def params(self) -> dict:
        return {**super().params(), "ridge": self.ridge}

    def compact(self, keys, values, queries, budget, **context) -> Compacted:
        T = keys.shape[0]
        if budget >= T:
            return keep_all(keys, values)
        stats = self._stats(keys, values, queries, context)
        idx = top_keys(score_of(stats, self.score), budget).to(keys.device)
        scale = context["scale"]
        q = queries.double()
        # share of each query's full mass carried by each kept key (n, t); 0 where the key is not visible
        A = torch.exp(scale * (q @ keys[idx].double().T) - stats.lse.double()[:, None])
        pos = self.visible_pos(context.get("query_pos"))
        if pos is not None:
            A = A * (idx[None, :].to(pos.device) <= pos[:, None]).to(A.device)
        w = fit_mass_weights(A).to(A.device)
        keep = w > 0
        if not bool(keep.any()):
            return take(keys, values, idx)
        idx, A, w = idx[keep], A[:, keep], w[keep]
        mass = A @ w
        rows = mass > 0
        P = (A[rows] * w) / mass[rows, None]
        X = fit_values(P, stats.out[rows].to(A.device), values[idx], ridge=self.ridge)
        beta = torch.log(w).float()
        if not (torch.isfinite(X).all() and torch.isfinite(beta).all()):
            return take(keys, values, idx)
        return Compacted(keys[idx], beta, X.to(values.dtype), idx)
