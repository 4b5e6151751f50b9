"""The attention function registered in transformers' AttentionInterface as "compactor".

It is transformers' own sdpa attention (`sdpa_attention_forward`) with one addition: a per-key additive bias beta
on the compacted prefix, scores q.k*scale + beta_j, passed to sdpa as its `position_bias`. beta rides on the key
tensor that `CompactedCache.update` returns (see `attach_beta`); without it the call is sdpa's, unchanged.

The mask is transformers' too: "compactor" is registered in AttentionMaskInterface with sdpa's mask builder, so the
function receives exactly the 4-D mask sdpa would (padding, causal, sliding window), sized and offset by the cache's
`get_mask_sizes` (cache.py maps every physical key slot to a logical position). transformers builds one mask for
all layers, sized for the layer with the most prefix slots; a layer with fewer takes the mask's last columns (its
slots stand at the latest prefix positions, see cache.py). A model switched to "compactor" therefore gives sdpa's
logits, bit for bit, whenever no compacted prefix is present.

A `compactor_recorder` keyword passed to the model forward reaches this function and is handed the post-RoPE queries
of every layer (prefill capture: then transformers' own sdpa path runs, so recording costs only the copy of the
sampled query rows).
"""
from __future__ import annotations

import contextlib

import torch

NAME = "compactor"
_BETA_ATTR = "_compactor_beta"


def attach_beta(keys: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Mark `keys` (b, Hkv, L, d) as starting with a compacted prefix whose per-key bias is `beta` (Hkv, t), t <= L."""
    setattr(keys, _BETA_ATTR, beta)
    return keys


def beta_bias(beta: torch.Tensor, kv_len: int, n_heads: int, dtype) -> torch.Tensor:
    """(1, n_heads, 1, kv_len) additive bias: beta (Hkv, t) repeated over each KV head's query group on the first t
    columns, 0 on the rest (the tokens appended after the prefix)."""
    n_kv, t = beta.shape
    bias = torch.zeros(n_heads, kv_len, dtype=dtype, device=beta.device)
    bias[:, :t] = beta.to(dtype).repeat_interleave(n_heads // n_kv, dim=0)
    return bias[None, :, None, :]


def _bottom_right_causal(q_len: int, kv_len: int, device) -> torch.Tensor:
    """(1, 1, q_len, kv_len) bool: the last query row sees every key (a cache precedes the queries)."""
    rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    return (torch.arange(kv_len, device=device)[None, :] <= rows)[None, None]


def compactor_attention(module, query, key, value, attention_mask, **kwargs):
    """AttentionInterface signature: query (b, Hq, q, d), key/value (b, Hkv, L, d) -> ((b, q, Hq, d), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    recorder = kwargs.pop("compactor_recorder", None)
    if recorder is not None:
        recorder(module.layer_idx, query)
    beta = getattr(key, _BETA_ATTR, None)
    if beta is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None and attention_mask.shape[-1] > kv_len:
        attention_mask = attention_mask[..., -kv_len:]  # this layer keeps fewer prefix slots than the widest
    if attention_mask is None and q_len > 1:
        # sdpa's mask builder returns None only when `is_causal` can stand in for the mask, which it cannot once a
        # prefix precedes the queries (sdpa aligns is_causal top-left); the cache's mask sizes never lead there,
        # but a caller passing attention_mask=None with a custom mask function might.
        attention_mask = _bottom_right_causal(q_len, kv_len, query.device)
    out_dtype = query.dtype
    if query.dtype in (torch.float16, torch.bfloat16):
        # A half-precision bias would round beta (about 3% of mass near beta=7): attend in float32 instead;
        # the compacted prefix is small, so this costs little.
        query, key, value = query.float(), key.float(), value.float()
    bias = beta_bias(beta, kv_len, query.shape[1], query.dtype)
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, position_bias=bias, **kwargs)
    return out.to(out_dtype), weights


def register() -> None:
    """Register "compactor" as an attention function and give it sdpa's mask builder (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, compactor_attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_compactor_attention(model) -> None:
    """Switch the model to the "compactor" attention: sdpa plus beta where a compacted prefix is present."""
    register()
    if model.config._attn_implementation != NAME:
        model.set_attn_implementation(NAME)


@contextlib.contextmanager
def using_compactor_attention(model):
    """Temporarily switch `model` to the compactor attention function."""
    previous = model.config._attn_implementation
    use_compactor_attention(model)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
