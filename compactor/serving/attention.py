"""The attention function registered in transformers' AttentionInterface as "compactor".

It computes ordinary scaled-dot-product attention with two additions:
- a per-key additive bias beta on the compacted prefix: scores q.k*scale + beta_j (beta rides on the key tensor
  returned by `CompactedCache.update`, see `attach_beta`);
- its own causal mask, aligned bottom-right (the last query row sees every key), because transformers builds no
  mask for a custom implementation and sdpa's `is_causal` aligns top-left, which is wrong whenever a cache exists.
A `compactor_recorder` keyword passed to the model forward reaches this function and is handed the post-RoPE queries
of every layer. Prefill capture uses `capture_attention` instead: the recorder, then transformers' own sdpa path.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

NAME = "compactor"
_BETA_ATTR = "_compactor_beta"


def attach_beta(keys: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Mark `keys` (b, Hkv, L, d) as starting with a compacted prefix whose per-key bias is `beta` (Hkv, t), t <= L."""
    setattr(keys, _BETA_ATTR, beta)
    return keys


def attention_bias(q_len: int, kv_len: int, n_heads: int, beta: torch.Tensor | None,
                   device, dtype) -> torch.Tensor:
    """Additive mask (1, n_heads or 1, q_len, kv_len): -inf above the bottom-right-aligned causal diagonal,
    beta (repeated over each KV head's query group) on the first beta.shape[-1] columns, 0 elsewhere."""
    rows = torch.arange(q_len, device=device).unsqueeze(1) + (kv_len - q_len)
    cols = torch.arange(kv_len, device=device).unsqueeze(0)
    causal = torch.zeros(q_len, kv_len, device=device, dtype=dtype).masked_fill(cols > rows, float("-inf"))
    if beta is None:
        return causal[None, None]
    n_kv, t = beta.shape
    bias = causal.expand(n_heads, q_len, kv_len).clone()
    bias[:, :, :t] += beta.to(device=device, dtype=dtype).repeat_interleave(n_heads // n_kv, dim=0)[:, None, :]
    return bias[None]


def compactor_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface signature: query (b, Hq, q, d), key/value (b, Hkv, L, d) -> ((b, q, Hq, d), None)."""
    recorder = kwargs.get("compactor_recorder")
    if recorder is not None:
        recorder(module.layer_idx, query)
    q_len, kv_len = query.shape[2], key.shape[2]
    beta = getattr(key, _BETA_ATTR, None)
    out_dtype = query.dtype
    if beta is not None and query.dtype in (torch.float16, torch.bfloat16):
        # A half-precision mask would round beta (about 3% of mass near beta=7): attend in float32 instead;
        # the compacted prefix is small, so this costs little.
        query, key, value = query.float(), key.float(), value.float()
    bias = attention_bias(q_len, kv_len, query.shape[1], beta, query.device, query.dtype)
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-2:] == (q_len, kv_len):
        extra = attention_mask
        if extra.dtype == torch.bool:
            extra = torch.zeros_like(extra, dtype=query.dtype).masked_fill(~extra, float("-inf"))
        bias = bias + extra.to(query.dtype)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=0.0, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1]).to(out_dtype)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, compactor_attention)


def use_compactor_attention(model) -> None:
    """Switch the model to the beta-aware "compactor" attention (plain attention when no beta is present)."""
    register()
    if model.config._attn_implementation != NAME:
        model.set_attn_implementation(NAME)


CAPTURE_NAME = "compactor_capture"


def capture_attention(module, query, key, value, attention_mask, **kwargs):
    """Prefill capture: hand the post-RoPE queries to the `compactor_recorder`, then run transformers' own sdpa
    attention with the mask transformers built for it (one boolean mask per forward, flash/efficient kernels), so
    recording costs only the copy of the sampled query rows."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    recorder = kwargs.get("compactor_recorder")
    if recorder is not None:
        recorder(module.layer_idx, query)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@contextlib.contextmanager
def using_capture_attention(model):
    """Temporarily switch `model` to the capture attention (registered with transformers' sdpa mask function)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_NAME, capture_attention)
    AttentionMaskInterface.register(CAPTURE_NAME, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE_NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


@contextlib.contextmanager
def using_compactor_attention(model):
    """Temporarily switch `model` to the compactor attention function."""
    previous = model.config._attn_implementation
    use_compactor_attention(model)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
