"""Compaction methods, all answering `compact(keys, values, queries, budget) -> Compacted`."""
from .attention_matching import AttentionMatching, Eviction
from .base import Compacted, Method
from .random_keep import RandomKeep
from .streaming import StreamingLLM

METHODS = {m.name: m for m in (AttentionMatching, Eviction, StreamingLLM, RandomKeep)}


def make_method(name: str, **params) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name](**params)


__all__ = ["AttentionMatching", "Compacted", "Eviction", "METHODS", "Method", "RandomKeep", "StreamingLLM",
           "make_method"]
