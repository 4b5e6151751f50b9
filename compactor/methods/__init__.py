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


def method_from_options(name: str, seed: int = 0, context: str = "full", score: str | None = None,
                        ridge: float = 1e-3, preset: str = "fast", **am_options) -> Method:
    """A method from the options the CLI and `compactor.compress` share; each method takes the ones it uses.
    AM and eviction take the preset's method parameters (pipeline.PRESETS) unless given explicitly (not None);
    `am_options` are AttentionMatching's quality-mode options (source_weights, beta_floor, beta_ridge, ...)."""
    from ..fitting.presets import preset as preset_params

    params = dict(preset_params(preset)["method"])
    if score is not None:
        params["score"] = score
    if name == "am":
        params.update({k: v for k, v in am_options.items() if v is not None})
        return make_method("am", context=context, ridge=ridge, **params)
    if name == "eviction":
        return make_method("eviction", score=params["score"], context=context)
    if name == "random":
        return make_method("random", seed=seed)
    return make_method(name)


__all__ = ["AttentionMatching", "Compacted", "Eviction", "METHODS", "Method", "RandomKeep", "StreamingLLM",
           "make_method", "method_from_options"]
