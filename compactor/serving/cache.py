"""A transformers `Cache` holding a compacted prefix: physical length t per layer, logical length T.

Logical vs physical length is decided here, once:
- `get_seq_length()` returns the LOGICAL length (T + tokens appended since), so new tokens get the RoPE positions
  T, T+1, ... exactly as after the full prefix;
- a layer holds the compacted prefix, t_max slots per KV head (heads shorter than t_max are padded with
  beta = -inf, so padding receives no attention), shared and never written to, and separately the tokens appended
  after it; `update` returns both, prefix first;
- `get_mask_sizes()` tells transformers' mask builder the physical key count and an offset T - t_max, so physical
  slot i stands at logical position i + T - t_max: every prefix slot sits before T (always visible to the new
  tokens, which start at T) and every appended token sits at its own logical position. Padding masks of logical
  length T + n (what `generate` passes) therefore line up, and so does a sliding window: exactly at ratio 1, where
  slot i is token i; above it the t_max slots count as the most recent prefix positions. transformers builds one
  mask for all layers, so the cache reports the widest layer's t_max and a layer with fewer slots uses the mask's
  last columns (attention.py).
A prefix stored with batch 1 serves any batch size: it is expanded (a view) to the batch of the tokens appended.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..errors import CompactorError
from .attention import attach_beta, attach_prefix


class CompactedLayer(DynamicLayer):
    """One layer: prefix keys/values (1, Hkv, t_max, d), beta (Hkv, t_max) float32, logical prefix length T.
    `keys`/`values` hold only the tokens appended after the prefix, (b, Hkv, n, d), as a DynamicLayer would."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, beta: torch.Tensor, logical_length: int):
        super().__init__()
        if keys.dim() == 3:
            keys, values = keys.unsqueeze(0), values.unsqueeze(0)
        if keys.shape[-2] > logical_length:
            raise ValueError(f"a compacted prefix of {keys.shape[-2]} slots cannot stand for {logical_length} tokens")
        self.dtype, self.device = keys.dtype, keys.device
        self.prefix_keys, self.prefix_values = keys, values
        self.beta = beta.to(device=keys.device, dtype=torch.float32)
        self.logical_length = int(logical_length)
        self.is_initialized = True
        self.reset()

    @property
    def prefix_slots(self) -> int:
        return self.prefix_keys.shape[-2]

    @property
    def appended(self) -> int:
        return self.keys.shape[-2]

    def lazy_initialization(self, key_states, value_states) -> None:  # initialised with the prefix already
        return None

    def _prefix(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prefix_keys.shape[0] == batch:
            return self.prefix_keys, self.prefix_values
        if self.prefix_keys.shape[0] != 1:
            raise ValueError(f"a compacted prefix of batch {self.prefix_keys.shape[0]} cannot serve a batch of {batch}")
        shape = (batch, *self.prefix_keys.shape[1:])
        return self.prefix_keys.expand(shape), self.prefix_values.expand(shape)

    def _append(self, key_states, value_states) -> None:
        """Append new tokens' keys/values (b, Hkv, q, d) after the ones appended so far (the prefix is untouched)."""
        key_states, value_states = key_states.to(self.dtype), value_states.to(self.dtype)
        if self.appended == 0:
            self.keys, self.values = key_states, value_states
        else:
            if key_states.shape[0] != self.keys.shape[0]:
                raise ValueError(f"batch of {key_states.shape[0]} new tokens after {self.keys.shape[0]} appended "
                                 "rows; fork the cache for a new batch")
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)

    def update(self, key_states, value_states, *args, **kwargs):
        self._append(key_states, value_states)
        prefix_k, prefix_v = self._prefix(self.keys.shape[0])
        keys = torch.cat([prefix_k, self.keys], dim=-2)
        values = torch.cat([prefix_v, self.values], dim=-2)
        return attach_beta(keys, self.beta), values

    def get_seq_length(self) -> int:
        return self.logical_length + self.appended

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        """(kv_length, kv_offset): the physical key count, and the logical position of slot 0 (T - t_max)."""
        return self.prefix_slots + self.appended + query_length, self.logical_length - self.prefix_slots

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        """Forget the appended tokens; the compacted prefix stays."""
        b, h, _, d = self.prefix_keys.shape
        self.keys = self.prefix_keys.new_zeros(b, h, 0, d)
        self.values = self.prefix_values.new_zeros(b, h, 0, self.prefix_values.shape[-1])

    def crop(self, max_length: int) -> None:
        """transformers' semantics: a negative count removes that many tokens, a positive one keeps that many in
        total (logical length). Only appended tokens can be removed, never the compacted prefix."""
        remove = -max_length if max_length < 0 else max(0, self.get_seq_length() - max_length)
        if remove > self.appended:
            raise ValueError(f"cannot crop {remove} tokens: only {self.appended} were appended after the compacted "
                             f"prefix of {self.logical_length} tokens")
        if remove:
            self.keys, self.values = self.keys[..., :-remove, :], self.values[..., :-remove, :]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.keys = self.keys.repeat_interleave(repeats, dim=0)
        self.values = self.values.repeat_interleave(repeats, dim=0)
        if self.prefix_keys.shape[0] > 1:
            self.prefix_keys = self.prefix_keys.repeat_interleave(repeats, dim=0)
            self.prefix_values = self.prefix_values.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.keys, self.values = self.keys[indices, ...], self.values[indices, ...]
        if self.prefix_keys.shape[0] > 1:
            self.prefix_keys, self.prefix_values = self.prefix_keys[indices, ...], self.prefix_values[indices, ...]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx.to(self.keys.device))

    def prefix_bytes(self) -> int:
        """Bytes held by the compacted prefix (keys, values, beta), shared by every fork."""
        return sum(x.numel() * x.element_size() for x in (self.prefix_keys, self.prefix_values, self.beta))


class RaggedLayer(CompactedLayer):
    """One layer whose compacted prefix stays as stored: a `RaggedPrefix` (kernels/ragged_prefix.py), ragged per KV
    head (no padding to the longest head) with keys/values in their stored codec (raw, lloyd, q8_0, q4_0).
    `keys`/`values` hold the tokens appended after it, (b, Hkv, n, d) in the model's dtype. The prefix takes no
    slot of the mask (`prefix_slots` = 0): transformers' mask covers the appended tokens at their logical positions
    T, T+1, ..., and `update` returns those tokens with the prefix attached for the attention function, which
    runs the ragged kernel (attention.py)."""

    def __init__(self, prefix, logical_length: int, dtype: torch.dtype):
        DynamicLayer.__init__(self)
        if prefix.max_length > logical_length:
            raise ValueError(f"a compacted prefix of {prefix.max_length} entries per head cannot stand for "
                             f"{logical_length} tokens")
        self.prefix = prefix
        self.dtype, self.device = dtype, prefix.device
        self.logical_length = int(logical_length)
        self.is_initialized = True
        self.reset()

    @property
    def prefix_slots(self) -> int:
        return 0

    def reset(self) -> None:
        """Forget the appended tokens; the compacted prefix stays."""
        shape = (1, self.prefix.num_kv_heads, 0, self.prefix.head_dim)
        self.keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.values = torch.zeros(shape, dtype=self.dtype, device=self.device)

    def update(self, key_states, value_states, *args, **kwargs):
        self._append(key_states, value_states)
        return attach_prefix(self.keys, self.prefix), self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.keys = self.keys.repeat_interleave(repeats, dim=0)
        self.values = self.values.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.keys, self.values = self.keys[indices, ...], self.values[indices, ...]

    def prefix_bytes(self) -> int:
        """Bytes the served prefix allocates, measured from its tensors (codes, gains, means, centroids, beta,
        offsets, exact segment; the rotation matrix, shared by all layers, is counted once by the cache)."""
        return self.prefix.nbytes()

    def shared_tensors(self) -> dict:
        """Tensors shared by every layer (lloyd rotation matrices), by identity."""
        out = {}
        for part in (self.prefix.keys, self.prefix.values):
            if part.rotation is not None:
                out[id(part.rotation)] = part.rotation
        return out


class CompactedCache(Cache):
    """Cache of a compacted document prefix. Use it like any transformers cache (after `compactor.load_cache`):

    - forward: `model(new_ids, past_key_values=cache)`: positions continue at T automatically and the new tokens
      are appended to this cache, as with a DynamicCache;
    - generate: `model.generate(new_ids, past_key_values=cache, ...)` or `model.generate(**cache.generation_inputs(
      new_ids))`: input ids are the tokens after the prefix (and after any tokens appended since); an attention mask
      may cover those tokens only or the logical length T + n. `generate` works on a fork, so this cache is left as
      it was: reuse it for the next prompt (the fork is returned as `past_key_values` with
      `return_dict_in_generate=True`).
    `cache.fork()` gives an independent copy sharing the prefix tensors.
    """

    def __init__(self, layers: list[CompactedLayer], logical_length: int, metadata: dict | None = None):
        super().__init__(layers=layers)
        self.logical_length = int(logical_length)
        self.mask_slots = max(layer.prefix_slots for layer in layers)  # the widest layer's prefix
        self.metadata = dict(metadata or {})
        self.artifact = None  # the encoded artifact when compressed in memory (see `save`)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """(kv_length, kv_offset) of the one mask transformers builds for every layer: sized for the widest prefix
        (`mask_slots`), slot 0 at logical position T - mask_slots."""
        appended = self.layers[layer_idx].appended
        return self.mask_slots + appended + query_length, self.logical_length - self.mask_slots

    def generation_inputs(self, inputs) -> dict:
        """Keyword arguments for `model.generate` continuing after this cache with `inputs`: token ids (n,) or
        (b, n), a list of ids, or a tokenizer's output (a BatchEncoding / dict with `input_ids` and optionally
        `attention_mask` over the new tokens, e.g. from `apply_chat_template(..., return_dict=True)`)."""
        input_ids, mask = ids_and_mask(inputs)
        return {"input_ids": input_ids, "attention_mask": self.full_attention_mask(mask), "past_key_values": self}

    def full_attention_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A mask (b, n) over new tokens, prefixed with ones for everything the cache holds: (b, seen + n)."""
        seen = self.get_seq_length()
        return torch.cat([torch.ones(mask.shape[0], seen, dtype=mask.dtype, device=mask.device), mask], dim=1)

    def fork(self) -> "CompactedCache":
        """An independent copy: appended tokens are copied by reference and replaced, never written in place;
        the prefix tensors are shared (nothing writes to them)."""
        clone = copy.copy(self)
        clone.layers = [copy.copy(layer) for layer in self.layers]
        return clone

    @property
    def keeps_quantized(self) -> bool:
        """True when the prefix is served as stored (ragged, codes kept; `RaggedLayer`), False when it was
        dequantized and padded to each layer's longest head."""
        return isinstance(self.layers[0], RaggedLayer)

    def memory_bytes(self) -> int:
        """Bytes the compacted prefix allocates, measured from the tensors held (every layer's keys, values, beta,
        and for a ragged cache its codes, gains, means, offsets, exact segment, plus each shared rotation matrix
        once). Tokens appended since are not counted."""
        shared = {}
        for layer in self.layers:
            if isinstance(layer, RaggedLayer):
                shared.update(layer.shared_tensors())
        return (sum(layer.prefix_bytes() for layer in self.layers)
                + sum(t.numel() * t.element_size() for t in shared.values()))

    def save(self, path) -> Path:
        """Write the artifact this cache was compressed into (the same file `compactor compress` writes)."""
        from ..storage.artifact import write_artifact

        if self.artifact is None:
            raise CompactorError("this cache was not compressed in this process (it was loaded from a file, or built "
                                 "from layers): there is no encoded artifact to save; copy the file it came from")
        return write_artifact(path, self.artifact.meta, self.artifact.layers, self.artifact.codebooks)


def ids_and_mask(inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (b, n) long, attention_mask (b, n)) from ids, a list, or a mapping with input_ids/attention_mask."""
    mask = None
    if hasattr(inputs, "keys") and "input_ids" in inputs.keys():  # BatchEncoding or dict
        mask = inputs.get("attention_mask")
        inputs = inputs["input_ids"]
    ids = torch.as_tensor(inputs)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        raise ValueError(f"expected token ids of shape (n,) or (batch, n), got {tuple(ids.shape)} {ids.dtype}")
    if mask is None:
        mask = torch.ones_like(ids)
    mask = torch.as_tensor(mask, device=ids.device)
    if mask.dim() == 1:
        mask = mask.unsqueeze(0)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
    return ids.long(), mask.long()
