"""`model.generate(ids, past_key_values=compacted_cache)`: what generate needs to continue after a compacted prefix.

transformers' generate derives position ids from the attention mask (cumulative sum) and slices `input_ids` when the
mask is as long as they are, both of which assume the ids include every cached token. A compacted prefix has no ids,
so `enable_generate(model)` wraps this model instance's `generate` (no transformers class is touched): when
`past_key_values` is a CompactedCache, the ids are the new tokens, the mask is extended over the cached logical
length (T + tokens appended since), and generation runs on a fork of the cache, so the caller's cache is never
changed. Any other call passes through unchanged.
"""
from __future__ import annotations

import functools

import torch

from .cache import CompactedCache, ids_and_mask


def generate_kwargs(cache: CompactedCache, inputs, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """(input_ids, kwargs) for transformers' generate continuing after `cache` (on a fork of it)."""
    if kwargs.get("inputs_embeds") is not None:
        raise ValueError("generate with a CompactedCache takes input_ids, not inputs_embeds")
    ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
    if ids is None:
        raise ValueError("generate with a CompactedCache needs input_ids: the tokens that follow the cached prefix")
    ids, _ = ids_and_mask(ids)
    seen, (b, n) = cache.get_seq_length(), ids.shape
    mask = kwargs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask, device=ids.device).long()
    if mask.dim() == 1:
        mask = mask.unsqueeze(0)
    if mask.shape == ids.shape:
        mask = cache.full_attention_mask(mask)
    elif tuple(mask.shape) != (b, seen + n):
        raise ValueError(f"attention_mask of shape {tuple(mask.shape)}: expected ({b}, {n}) over the new tokens or "
                         f"({b}, {seen + n}) over the cached logical length {seen} and the new tokens")
    return ids, {**kwargs, "attention_mask": mask, "past_key_values": cache.fork()}


def enable_generate(model) -> None:
    """Let `model.generate` take a CompactedCache as `past_key_values` (idempotent; this instance only)."""
    if getattr(model.generate, "_compactor_adapter", False):
        return
    original = model.generate

    @functools.wraps(original)
    def generate(inputs=None, *args, **kwargs):
        cache = kwargs.get("past_key_values")
        if isinstance(cache, CompactedCache):
            inputs, kwargs = generate_kwargs(cache, inputs, kwargs)
        return original(inputs, *args, **kwargs)

    generate._compactor_adapter = True
    model.generate = generate
