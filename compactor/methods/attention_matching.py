"""Attention Matching (arXiv 2602.16284), highest-attention variant, for one (layer, KV head).

1. keys: the `budget` keys of highest score (the pipeline passes any score of fitting/key_scores.py; alone, a head
   ranks by the RMS or max of its reference queries' attention), or OMP on the attention mass
   (fitting/omp_batched.py, run on one head);
2. beta: NNLS so that the kept keys, reweighted by w = exp(beta), carry each query's full attention mass
   (beta_fit.py), optionally pulled toward w = 1; keys whose weight comes out 0 are dropped unless beta_floor is set;
3. values: ridge least squares so that attention over the compact cache reproduces each query's full-cache
   attention output (value_fit.py), optionally only where held-out reference queries confirm it helps.
The options (per-source query weights, beta ridge and floor, value anchors, value-fit check, OMP) are listed on
AttentionMatching; the issue-9 ablation of each is in benchmarks/results_quality.md.
`context="full"` lets every reference query see the whole prefix; `"causal"` limits a context query to its
causal past (in the scores and in both fits). With a `key_transform` in the call context (the pipeline passes
the store-and-load round trip of the layer's key codec), both fits use the keys as they will be served, so
beta and the values absorb the key quantization error. A degenerate head (no positive weight, non-finite fit) falls back
to plain eviction of the same keys.
"""
from __future__ import annotations

import math

import torch

from ..fitting.beta_fit import fit_mass_weights
from ..fitting.key_scores import SCORES
from ..fitting.key_selection import key_stats, score_of, top_keys
from ..fitting.value_fit import fit_values
from .base import Compacted, Method, keep_all, take
from .batched import am_layer, evict_layer


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

    def _scores(self, stats, context) -> torch.Tensor:
        """(T,) key scores of the head: given by the pipeline (`scores`, any score of fitting/key_scores.py), or the
        RMS / max of this head's own statistics."""
        if context.get("scores") is not None:
            return context["scores"]
        if self.score not in ("rms", "max"):
            raise ValueError(f"key score {self.score!r} is computed by the pipeline (compact_capture); a single "
                             f"head can only score 'rms' or 'max' on its own")
        return score_of(stats, self.score)


class Eviction(ScoredMethod):
    """Baseline: the same keys as AM, beta = 0, original values."""

    name = "eviction"

    def compact(self, keys, values, queries, budget, **context) -> Compacted:
        if budget >= keys.shape[0]:
            return keep_all(keys, values)
        stats = self._stats(keys, values, queries, context)
        return take(keys, values, top_keys(self._scores(stats, context), budget))

    def compact_layer(self, keys, values, queries, budgets, **context):
        """All KV heads of a layer at once (methods/batched.py): keys/values (H, T, d), budgets (H,), context
        `stats` (the layer's batched AttentionStats) and optionally `scores` (H, T) from the pipeline. Returns a
        LayerKV."""
        stats = context["stats"]
        scores = context.get("scores")
        return evict_layer(keys, values, score_of(stats, self.score) if scores is None else scores, budgets,
                           stats.p_rms)

    def batched_ok(self) -> bool:
        return True


SOURCE_NAMES = ("context", "repeat", "self_study", "random")  # index = the capture's query_source label
VALUE_FITS = ("all", "check", "select", "none")


class AttentionMatching(ScoredMethod):
    """Options (each recorded in params()):
    - source_weights: {source name: weight} per-query weights in the beta and value fits (default 1 each);
    - beta_floor: None drops keys whose NNLS weight is 0 (the paper's rule); a number keeps every selected key with
      beta >= beta_floor (a key no reference query needed can still serve a recall query that matches it);
    - value_anchor: extra ridge toward the original value for copy-like keys, anchor * copy_j with copy_j the key's
      reconstruction score (max softmax weight a replay query gave it, in [0, 1]; needs the probe);
    - beta_ridge: pulls the NNLS weights toward 1 (beta toward 0, the plain key), relative to the Gram's mean
      diagonal like `ridge`; without it a head that keeps most of its keys can fit its reference queries with
      weights far from 1 that generalise badly;
    - value_fit: "all" refits every head's values; "check" refits only where it lowers the attention-output error
      on held-out reference queries (every 5th row); "select" also falls back to plain eviction of the same keys
      (beta 0, original values) where that reproduces the held-out rows' attention (mass x output) better; "none"
      keeps the original values (beta only).
    - selection: "top" (highest score) or "omp" (greedy matching pursuit on the mass matrix,
      fitting/omp_batched.py, with B = 1) with omp_keys keys chosen per step and an NNLS refit every omp_refit
      steps; beta and values are then fitted on the chosen keys as for "top".
    """

    name = "am"

    def __init__(self, score: str = "rms", context: str = "full", ridge: float = 1e-3,
                 source_weights: dict | None = None, beta_floor: float | None = None, value_anchor: float = 0.0,
                 value_fit: str = "all", selection: str = "top", omp_keys: int = 1, omp_refit: int = 1,
                 beta_ridge: float = 0.0):
        super().__init__(score, context)
        for name in source_weights or {}:
            if name not in SOURCE_NAMES:
                raise ValueError(f"unknown query source {name!r}; choose from {', '.join(SOURCE_NAMES)}")
        if value_fit not in VALUE_FITS:
            raise ValueError(f"value_fit must be one of {', '.join(VALUE_FITS)}")
        if selection not in ("top", "omp"):
            raise ValueError("selection must be 'top' or 'omp'")
        self.ridge, self.source_weights = ridge, dict(source_weights or {})
        self.beta_floor, self.value_anchor, self.value_fit = beta_floor, float(value_anchor), value_fit
        self.selection, self.omp_keys, self.omp_refit = selection, int(omp_keys), int(omp_refit)
        self.beta_ridge = float(beta_ridge)

    def params(self) -> dict:
        p = {**super().params(), "ridge": self.ridge, "source_weights": self.source_weights,
             "beta_floor": self.beta_floor, "value_anchor": self.value_anchor, "value_fit": self.value_fit,
             "selection": self.selection, "beta_ridge": self.beta_ridge}
        if self.selection == "omp":
            p.update(omp_keys=self.omp_keys, omp_refit=self.omp_refit)
        return p

    def query_weights(self, context) -> torch.Tensor | None:
        """(n,) float64 per-query weights from the query sources, or None when all are 1."""
        src = context.get("query_source")
        if not self.source_weights or src is None:
            return None
        table = torch.tensor([float(self.source_weights.get(n, 1.0)) for n in SOURCE_NAMES], dtype=torch.float64)
        return table[src.long().cpu()]

    def compact(self, keys, values, queries, budget, **context) -> Compacted:
        T = keys.shape[0]
        if budget >= T:
            return keep_all(keys, values)
        stats = self._stats(keys, values, queries, context)
        scale, pos = context["scale"], self.visible_pos(context.get("query_pos"))
        # fit around the keys as they will be stored and loaded (bf16 rounding, quantization), if given;
        # the transform gets the keys' positions too (a phased codec stores each phase with its own codec)
        stored = context.get("key_transform") or (lambda k, importance, positions: k)
        q, lse = queries.double(), stats.lse.double()[:, None]
        u = self.query_weights(context)
        if u is not None:
            u = u.to(keys.device)

        def mass_shares(kept: torch.Tensor) -> torch.Tensor:
            """(n, t) share of each query's full mass carried by each kept key; 0 where not visible."""
            A = torch.exp(scale * (q @ stored(keys[kept], stats.p_rms[kept], kept).double().T) - lse)
            if pos is not None:
                A = A * (kept[None, :].to(pos.device) <= pos[:, None]).to(A.device)
            return A

        if self.selection == "omp":
            from ..fitting.omp_batched import omp_select

            chosen, count, *_ = omp_select(mass_shares(torch.arange(T, device=keys.device))[None],
                                           torch.tensor([budget]), query_weights=u, keys_per_step=self.omp_keys,
                                           refit_every=self.omp_refit)
            idx = chosen[0, :int(count[0])].sort().values.to(keys.device)
        else:
            idx = top_keys(self._scores(stats, context), budget).to(keys.device)
        A = mass_shares(idx)
        w = fit_mass_weights(A, weights=u, ridge=self.beta_ridge).to(A.device)
        if self.beta_floor is None:
            keep = w > 0
            if not bool(keep.any()):
                return take(keys, values, idx)
            idx, w, A = idx[keep], w[keep], A[:, keep]
        else:
            w = w.clamp_min(math.exp(self.beta_floor))
        beta = torch.log(w).float()
        if self.value_fit == "none":
            return Compacted(keys[idx], beta, values[idx], idx) if torch.isfinite(beta).all() \
                else take(keys, values, idx)
        mass = A @ w
        rows = mass > 0
        P = (A[rows] * w) / mass[rows, None]
        O, V0 = stats.out[rows].to(A.device), values[idx]
        ur = None if u is None else u[rows]
        anchor = None
        copy = context.get("copy_scores")
        if self.value_anchor > 0 and copy is not None:
            anchor = self.value_anchor * copy.to(A.device, A.dtype)[idx]
        X = fit_values(P, O, V0, ridge=self.ridge, weights=ur, anchor=anchor)
        if self.value_fit in ("check", "select") and not _refit_helps(P, O, V0, self.ridge, ur, anchor):
            X = V0.double()
        if self.value_fit == "select" and _eviction_is_better(A, w, X, stats.out.to(A.device), V0, u):
            return take(keys, values, idx)
        if not (torch.isfinite(X).all() and torch.isfinite(beta).all()):
            return take(keys, values, idx)
        return Compacted(keys[idx], beta, X.to(values.dtype), idx)

    def batched_ok(self) -> bool:
        """Whether compact_layer (the batched GPU fits, methods/batched.am_layer) implements these options;
        otherwise the pipeline takes the per-head path. Batched: source_weights, beta_ridge, beta_floor, every
        value_fit, selection top and omp. Per head only: value_anchor (a per-key ridge from the probe's copy
        scores: the batched call does not receive those scores, and the batched value CG and its exact fallback
        take one ridge per head)."""
        return self.value_anchor == 0

    def compact_layer(self, keys, values, queries, budgets, **context):
        """All KV heads of a layer at once with the batched fits (methods/batched.py): keys/values (H, T, d),
        queries (H, n, d), budgets (H,); context as compact() with `stats` the layer's batched AttentionStats,
        `scores` (H, T) from the pipeline (else the method's own RMS/max) and
        `layer_key_transform(keys (H, t, d), importance (H, t), counts (H,))`. Returns a LayerKV."""
        stats = context["stats"]
        scores = context.get("scores")
        return am_layer(keys, values, queries, budgets, stats, score_of(stats, self.score) if scores is None
                        else scores, context["scale"], self.visible_pos(context.get("query_pos")), self.ridge,
                        context.get("layer_key_transform"), query_weights=self.query_weights(context),
                        info=context.get("fit_info"), beta_ridge=self.beta_ridge, value_fit=self.value_fit,
                        selection=self.selection, omp_keys=self.omp_keys, omp_refit=self.omp_refit,
                        beta_floor=self.beta_floor)

def _refit_helps(P, O, V0, ridge, u, anchor, holdout: int = 5) -> bool:
    """Whether values fitted on 4 of every 5 reference rows reproduce the held-out 5th's outputs better than the
    original values do (weighted squared error)."""
    n = P.shape[0]
    test = torch.arange(n, device=P.device) % holdout == holdout - 1
    if int(test.sum()) == 0 or int((~test).sum()) == 0:
        return True
    X = fit_values(P[~test], O[~test], V0, ridge=ridge, weights=None if u is None else u[~test], anchor=anchor)
    wt = torch.ones(int(test.sum()), dtype=torch.float64, device=P.device) if u is None else u[test].double()
    err = lambda V: float((wt[:, None] * (P[test].double() @ V.double() - O[test].double()) ** 2).sum())  # noqa
    return err(X) < err(V0)


def _eviction_is_better(A, w, X, O, V0, u, holdout: int = 5) -> bool:
    """Whether plain eviction of the same keys (w = 1, original values) reproduces the held-out reference rows'
    unnormalised attention over the prefix, mass x output (mass 1 and output O in the full cache), better than the
    fit (w, X). Rows: every 5th (as _refit_helps); weighted by u. The fit saw these rows too, so this favours the
    fit: eviction is chosen only where the fit is clearly worse."""
    n = A.shape[0]
    test = torch.arange(n, device=A.device) % holdout == holdout - 1
    if int(test.sum()) == 0:
        return False
    At, Ot = A[test], O[test].double()
    wt = torch.ones(At.shape[0], dtype=torch.float64, device=A.device) if u is None else u[test].double()

    def err(weights, vals):
        return float((wt[:, None] * ((At * weights) @ vals.double() - Ot) ** 2).sum())

    return err(torch.ones_like(w), V0) < err(w, X)
