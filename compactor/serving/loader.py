"""Serving: turn an artifact (or compacted layers in memory) into a transformers Cache for a model."""
from __future__ import annotations

from pathlib import Path

import torch

from ..capture.prefill import context_limit
from ..errors import ArtifactError
from ..layer_kv import LayerKV
from ..models import (BUNDLED, config_fingerprint, signatures_match, tokenizer_fingerprint, weights_mismatch,
                      weights_signature)
from ..storage.artifact import Artifact, ModelLimits, read_artifact
from ..storage.kv_codec import decode_layer
from .attention import use_compactor_attention
from .cache import CompactedCache, CompactedLayer
from .generation import enable_generate


def _device_dtype(model) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def model_limits(model) -> ModelLimits:
    """What `model` lets an artifact declare: its layer count, KV heads, head dim, and T up to its context."""
    cfg = model.config
    attn = model.model.layers[0].self_attn
    return ModelLimits(int(cfg.num_hidden_layers), int(cfg.num_key_value_heads), int(attn.head_dim),
                       context_limit(model))


def artifact_model(meta: dict, requested: str | None) -> str:
    """The model to load for an artifact: `requested` when given; otherwise the artifact's model only if it is a
    bundled name. A folder path or hub id written inside a file is never loaded on the file's word (it could name
    any local folder or remote code): the user must pass it (--model) explicitly."""
    if requested:
        return requested
    wanted = str(meta.get("model_id", ""))
    if wanted in BUNDLED:
        return wanted
    raise ArtifactError(f"this artifact was made with model {wanted!r:.200}, which is not bundled; pass it with "
                        f"--model (a local folder or hub id holding those same weights) to load it")


def cache_from_layers(layers: list[LayerKV], logical_length: int, model, metadata: dict | None = None
                      ) -> CompactedCache:
    """CompactedCache on the model's device and dtype; padded slots get beta = -inf."""
    device, dtype = _device_dtype(model)
    cache_layers = []
    for i, layer in enumerate(layers):
        if int(layer.lengths.max()) > logical_length:
            raise ArtifactError(f"layer {i} keeps {int(layer.lengths.max())} entries per head for a prefix of "
                                f"{logical_length} tokens")
        slots = torch.arange(layer.keys.shape[1])
        pad = slots[None, :] >= layer.lengths[:, None]
        beta = layer.beta.float().masked_fill(pad, float("-inf"))
        cache_layers.append(CompactedLayer(layer.keys.to(device, dtype), layer.values.to(device, dtype),
                                           beta.to(device), logical_length))
    prepare_model(model)
    return CompactedCache(cache_layers, logical_length, metadata)


def prepare_model(model) -> None:
    """What serving a compacted cache needs of a model (idempotent): the "compactor" attention, which is sdpa's
    whenever no compacted prefix is present, and a `generate` that takes a CompactedCache."""
    use_compactor_attention(model)
    enable_generate(model)


def check_compatible(meta: dict, model, tokenizer=None, where: str = "artifact") -> None:
    """Refuse an artifact made for another model (layout, config or weights) or tokenizer."""
    model_limits(model).check(meta, where)
    if meta["model_config_sha256"] != config_fingerprint(model.config):
        raise ArtifactError(f"{where} was made for model {meta['model_id']!r} with a different configuration "
                            f"than this model ({model.config.model_type}); load the model it was made for")
    if "model_weights" in meta:
        why = weights_mismatch(meta["model_weights"], model)
        if why:
            raise ArtifactError(f"{where} was made for model {meta['model_id']!r}: same architecture but different "
                                f"weights than this model ({why})")
    elif not signatures_match(meta["model_weights_signature"], weights_signature(model)):
        raise ArtifactError(f"{where} was made for model {meta['model_id']!r}: same architecture but different "
                            "weights than this model")
    if tokenizer is not None and meta["tokenizer_sha256"] != tokenizer_fingerprint(tokenizer):
        raise ArtifactError(f"{where} was made with a different tokenizer than the one given")


def decode_layers(art: Artifact) -> list[LayerKV]:
    """Dequantize (or unpack) every layer of an artifact to float32 LayerKV; refuses non-finite results."""
    out = []
    for i, layer in enumerate(art.layers):
        try:
            kv = decode_layer(layer.arrays, layer.attrs, art.codebooks, int(art.meta["head_dim"]))
        except Exception as e:  # checked arrays should always decode; anything else means a damaged file
            raise ArtifactError(f"{art.path}: cannot decode layer {i} ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None
        if not (torch.isfinite(kv.keys).all() and torch.isfinite(kv.values).all() and torch.isfinite(kv.beta).all()):
            raise ArtifactError(f"{art.path}: layer {i} decodes to non-finite keys, values or beta")
        out.append(kv)
    return out


def cache_from_artifact(art: Artifact, model) -> CompactedCache:
    """The cache an (already checked) artifact serves, decoded to the model's device and dtype."""
    return cache_from_layers(decode_layers(art), art.T, model, art.meta)


def load_cache(path: str | Path | Artifact, model, tokenizer=None, verify: bool = True) -> CompactedCache:
    """Load an .h5 artifact as a CompactedCache for `model` (prepared with `prepare_model`).

    The file is checked against the model before any dataset is read (layers, KV heads, head dim, T within the
    context), its digest verified, and the model's config, weights identity and (when given) tokenizer compared
    with the artifact's. verify=False skips the digest only; do not serve a cache loaded that way.
    Position ids continue at the logical length T. Use `model(ids, past_key_values=cache)` (appends to the cache)
    or `model.generate(ids, past_key_values=cache, ...)` (runs on a fork: the cache can be reused as is).
    """
    art = path if isinstance(path, Artifact) else read_artifact(path, verify=verify, limits=model_limits(model))
    check_compatible(art.meta, model, tokenizer, where=str(art.path or "artifact"))
    return cache_from_artifact(art, model)
