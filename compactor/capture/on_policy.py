"""On-policy reference queries: layer l's repeat queries from a pass in which layers < l already use their compacted
caches (the paper's on-policy extraction), one pass per group of layers.

Off-policy, every layer is fitted on queries computed with the full cache below it; once earlier layers are
compacted, the queries that reach layer l at serving time differ a little. Before compacting a group of layers
[a, b), `OnPolicyQueries.refresh` replays the capture's repeat pass (same ids, same sampled positions) through a cache
whose layers < a are the compacted ones and layers >= a the full ones, and replaces the REPEAT rows of the queries of
layers [a, b) (context rows come from the document prefill itself and self-study / random rows stay as captured).
Its targets stay exact: layer l itself still has its full cache in that pass. Cost: one repeat pass (T tokens) per
group after the first.
"""
from __future__ import annotations

import dataclasses

import torch
from tqdm.auto import tqdm

from ..layer_kv import LayerKV
from .prefill import REPEAT, Capture, QueryRecorder, _run_chunks


def full_layer(keys: torch.Tensor, values: torch.Tensor) -> LayerKV:
    """The identity 'compaction' of one layer (all T keys, beta 0) for a mixed cache."""
    H, T, _ = keys.shape
    return LayerKV(keys, values, torch.zeros(H, T), torch.arange(T).repeat(H, 1), torch.full((H,), T))


class OnPolicyQueries:
    def __init__(self, model, capture: Capture, groups: int = 3, chunk_size: int = 512):
        if capture.repeat_ids is None:
            raise ValueError("on-policy queries need a capture with a repeat pass")
        L = len(capture.keys)
        # a private copy: refreshing replaces queries and statistics, the caller's capture stays as it was
        capture = dataclasses.replace(capture, queries=list(capture.queries),
                                      _stats={k: list(v) for k, v in capture._stats.items()})
        self.model, self.capture, self.chunk_size = model, capture, chunk_size
        bounds = torch.linspace(0, L, max(1, min(groups, L)) + 1).round().long().tolist()
        self.starts = set(bounds[1:-1])  # a refresh before each group but the first
        self.bounds = bounds
        self.passes = 0

    def group_of(self, layer: int) -> range:
        for a, b in zip(self.bounds[:-1], self.bounds[1:]):
            if a <= layer < b:
                return range(a, b)
        raise IndexError(layer)

    @torch.no_grad()
    def refresh(self, done: list[LayerKV], group: range) -> None:
        """Replace the REPEAT rows of capture.queries[l] for l in group; done: the compacted layers < group.start."""
        from ..serving.attention import using_compactor_attention
        from ..serving.loader import cache_from_layers

        cap, model = self.capture, self.model
        T = cap.length
        layers = list(done) + [full_layer(cap.keys[l], cap.values[l]) for l in range(len(done), len(cap.keys))]
        previous = model.config._attn_implementation
        with using_compactor_attention(model):
            cache = cache_from_layers(layers, T, model)
            recorder = QueryRecorder(len(cap.keys), cap.keys[0].shape[0])
            with tqdm(total=cap.repeat_ids.numel(), disable=True) as bar:
                _run_chunks(model, cap.repeat_ids, T, cache, recorder, cap.repeat_keep, self.chunk_size, bar)
        model.set_attn_implementation(previous)
        rows = (cap.query_source == REPEAT).nonzero().flatten().to(cap.queries[0].device)
        for l in group:
            q = cap.queries[l].clone()
            q[:, rows] = recorder.pooled(l).to(q.dtype)
            cap.queries[l] = q
        for stats in cap._stats.values():
            for l in group:
                stats[l] = None  # recomputed on demand by the pipeline
        self.passes += 1
