"""StreamingLLM baseline: keep the first `sinks` tokens (attention sinks) and the most recent window."""
from __future__ import annotations

import torch

from .base import Compacted, Method, keep_all, take


class StreamingLLM(Method):
    name = "streaming"

    def __init__(self, sinks: int = 4):
        self.sinks = sinks

    def params(self) -> dict:
        return {"sinks": self.sinks}

    def compact(self, keys, values, queries, budget, **context) -> Compacted:
        T = keys.shape[0]
        if budget >= T:
            return keep_all(keys, values)
        sinks = min(self.sinks, budget)
        idx = torch.cat([torch.arange(sinks), torch.arange(T - (budget - sinks), T)])
        return take(keys, values, idx)
