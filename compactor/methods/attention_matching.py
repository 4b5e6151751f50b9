"""Attention Matching (arXiv 2602.16284), highest-attention variant, for one (layer, KV head).

1. keys: the `budget` keys of highest attention score over the reference queries (key_selection.py);
2. beta: NNLS so that the kept keys, reweighted by w = exp(beta), carry each query's full attention mass
   (beta_fit.py); keys whose weight comes out 0 are dropped;
3. values: ridge least squares so that attention over the compact cache reproduces each query's full-cache
   attention output (value_fit.py).
`context="full"` lets every reference query see the whole prefix; `"causal"` limits a context query to its
causal past (in the scores and in both fits). With a `key_transform` in the call context (the pipeline passes
the store-and-load round trip of the layer's key codec), both fits use the keys as they will be served, so
beta and the values absorb the key quantization error. A degenerate head (no positive weight, non-finite fit) falls back
to plain eviction of the same keys.
"""
from __future__ import annotations

import torch

from ..fitting.beta_fit import fit_mass_weights
from ..fitting.key_selection import SCORES, key_stats, score_of, top_keys
from ..fitting.value_fit import fit_values
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
        scale, pos = context["scale"], self.visible_pos(context.get("query_pos"))
        # fit around the keys as they will be stored and loaded (bf16 rounding, quantization), if given;
        # the transform gets the keys' positions too (a phased codec stores each phase with its own codec)
        stored = context.get("key_transform") or (lambda k, importance, positions: k)
        q, lse = queries.double(), stats.lse.double()[:, None]

        def mass_shares(kept: torch.Tensor) -> torch.Tensor:
            """(n, t) share of each query's full mass carried by each kept key; 0 where not visible."""
            A = torch.exp(scale * (q @ stored(keys[kept], stats.p_rms[kept], kept).double().T) - lse)
            if pos is not None:
                A = A * (kept[None, :].to(pos.device) <= pos[:, None]).to(A.device)
            return A

        A = mass_shares(idx)
        w = fit_mass_weights(A).to(A.device)
        keep = w > 0
        if not bool(keep.any()):
            return take(keys, values, idx)
        idx, w = idx[keep], w[keep]
        A = A[:, keep] if context.get("key_transform") is None else mass_shares(idx)
        mass = A @ w
        rows = mass > 0
        P = (A[rows] * w) / mass[rows, None]
        X = fit_values(P, stats.out[rows].to(A.device), values[idx], ridge=self.ridge)
        beta = torch.log(w).float()
        if not (torch.isfinite(X).all() and torch.isfinite(beta).all()):
            return take(keys, values, idx)
        return Compacted(keys[idx], beta, X.to(values.dtype), idx)
