"""Uniform random keep baseline: a seeded random subset of the keys, beta = 0, values copied."""
from __future__ import annotations

import torch

from .base import Compacted, Method, keep_all, take


class RandomKeep(Method):
    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def params(self) -> dict:
        return {"seed": self.seed}

    def compact(self, keys, values, queries, budget, **context) -> Compacted:
        T = keys.shape[0]
        if budget >= T:
            return keep_all(keys, values)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(context.get("head_id", 0)))
        return take(keys, values, torch.randperm(T, generator=gen)[:budget])
