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


def method_from_options(name: str, seed: int = 0, context: str = "full", score: str = "rms", ridge: float = 1e-3
                        ) -> Method:
    """A method from the options the CLI and `compactor.compress` share; each method takes the ones it uses."""
    if name == "am":
        return make_method("am", score=score, context=context, ridge=ridge)
    if name == "eviction":
        return make_method("eviction", score=score, context=context)
    if name == "random":
        return make_method("random", seed=seed)
    return make_method(name)


__all__ = ["AttentionMatching", "Compacted", "Eviction", "METHODS", "Method", "RandomKeep", "StreamingLLM",
           "make_method", "method_from_options"]
