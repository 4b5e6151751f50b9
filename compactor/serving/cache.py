"""A transformers `Cache` holding a compacted prefix: physical length t per layer, logical length T.

Logical vs physical length is decided here, once:
- `get_seq_length()` returns the LOGICAL length (T + tokens appended since), so a plain forward pass without
  position ids gives new tokens the RoPE positions T, T+1, ... exactly as after the full prefix;
- the key/value tensors hold the PHYSICAL entries: t_max compacted slots per KV head (heads shorter than t_max are
  padded with beta = -inf, so padding receives no attention) followed by the appended tokens;
- `get_mask_sizes()` reports physical sizes; the "compactor" attention function builds its own causal mask and adds
  beta to the prefix columns (see attention.py).
"""
from __future__ import annotations

import copy

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .attention import attach_beta


class CompactedLayer(DynamicLayer):
    """One layer: prefix keys/values (b, Hkv, t_max, d), beta (Hkv, t_max) float32, logical prefix length T."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, beta: torch.Tensor, logical_length: int):
        super().__init__()
        if keys.dim() == 3:
            keys, values = keys.unsqueeze(0), values.unsqueeze(0)
        self.dtype, self.device = keys.dtype, keys.device
        self.keys, self.values = keys, values
        self.beta = beta.to(device=keys.device, dtype=torch.float32)
        self.prefix_slots = keys.shape[-2]
        self.logical_length = int(logical_length)
        self.is_initialized = True
        self._prefix = (keys, values)

    def lazy_initialization(self, key_states, value_states) -> None:  # already initialised with the prefix
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys = torch.cat([self.keys, key_states.to(self.keys.dtype)], dim=-2)
        self.values = torch.cat([self.values, value_states.to(self.values.dtype)], dim=-2)
        return attach_beta(self.keys, self.beta), self.values

    @property
    def appended(self) -> int:
        return self.keys.shape[-2] - self.prefix_slots

    def get_seq_length(self) -> int:
        return self.logical_length + self.appended

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.keys.shape[-2] + query_length, 0

    def reset(self) -> None:
        """Forget the appended tokens; the compacted prefix stays."""
        self.keys, self.values = self._prefix

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove")
        n = -tokens_to_remove
        if n > self.appended:
            raise ValueError(f"cannot crop {n} tokens: only {self.appended} were appended after the compacted prefix")
        if n:
            self.keys, self.values = self.keys[..., :-n, :], self.values[..., :-n, :]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._prefix = tuple(x.repeat_interleave(repeats, dim=0) for x in self._prefix)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._prefix = tuple(x[indices, ...] for x in self._prefix)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._prefix = tuple(x.index_select(0, beam_idx.to(x.device)) for x in self._prefix)


class CompactedCache(Cache):
    """Cache of a compacted document prefix. Use it like any transformers cache:

    - forward: `model(new_ids, past_key_values=cache)` (positions continue at T automatically);
    - generate: `model.generate(**cache.generation_inputs(new_ids), max_new_tokens=...)`, which passes an
      attention mask covering the logical length T + n so transformers neither slices the prompt nor restarts
      the positions at 0.
    The model must use the "compactor" attention implementation (`compactor.load_cache` switches it).
    `cache.fork()` gives an independent copy to answer several prompts from one loaded prefix.
    """

    def __init__(self, layers: list[CompactedLayer], logical_length: int, metadata: dict | None = None):
        super().__init__(layers=layers)
        self.logical_length = int(logical_length)
        self.metadata = dict(metadata or {})

    def generation_inputs(self, input_ids: torch.Tensor) -> dict:
        """Keyword arguments for `model.generate` continuing after the prefix with prompt `input_ids` (b, n)."""
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        seen = self.get_seq_length()
        mask = torch.ones(input_ids.shape[0], seen + input_ids.shape[1], dtype=torch.long, device=input_ids.device)
        return {"input_ids": input_ids, "attention_mask": mask, "past_key_values": self}

    def fork(self) -> "CompactedCache":
        """An independent copy sharing nothing mutable (the prefix tensors are immutable and shared)."""
        clone = copy.copy(self)
        clone.layers = [copy.copy(layer) for layer in self.layers]
        return clone
