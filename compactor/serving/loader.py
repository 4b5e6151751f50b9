"""Serving: turn an artifact (or compacted layers in memory) into a transformers Cache for a model."""
from __future__ import annotations

from pathlib import Path

import torch

from ..storage.artifact import Artifact, read_artifact
from .attention import use_compactor_attention
from .generation import enable_generate
from ..layer_kv import LayerKV
from .cache import CompactedCache, CompactedLayer
from ..errors import ArtifactError
from ..storage.kv_codec import decode_layer
from ..models import config_fingerprint, signatures_match, tokenizer_fingerprint, weights_signature


def _device_dtype(model) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


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
    """Refuse an artifact made for another model (config or weights) or tokenizer."""
    if meta["model_config_sha256"] != config_fingerprint(model.config):
        raise ArtifactError(f"{where} was made for model {meta['model_id']!r} with a different configuration "
                            f"than this model ({model.config.model_type}); load the model it was made for")
    sig = meta.get("model_weights_signature")
    if sig is not None and not signatures_match(sig, weights_signature(model)):
        raise ArtifactError(f"{where} was made for model {meta['model_id']!r}: same architecture but different "
                            "weights than this model")
    if tokenizer is not None and meta["tokenizer_sha256"] != tokenizer_fingerprint(tokenizer):
        raise ArtifactError(f"{where} was made with a different tokenizer than the one given")


def decode_layers(art: Artifact) -> list[LayerKV]:
    """Dequantize (or unpack) every layer of an artifact to float32 LayerKV."""
    try:
        return [decode_layer(layer.arrays, layer.attrs, art.codebooks, int(art.meta["head_dim"]))
                for layer in art.layers]
    except (KeyError, ValueError) as e:
        raise ArtifactError(f"{art.path}: cannot decode its layers ({e})") from None


def cache_from_artifact(art: Artifact, model) -> CompactedCache:
    """The cache an (already checked) artifact serves, decoded to the model's device and dtype."""
    return cache_from_layers(decode_layers(art), art.T, model, art.meta)


def load_cache(path: str | Path | Artifact, model, tokenizer=None, verify: bool = True) -> CompactedCache:
    """Load an .h5 artifact as a CompactedCache for `model` (prepared with `prepare_model`).

    Position ids continue at the logical length T. Use `model(ids, past_key_values=cache)` (appends to the cache)
    or `model.generate(ids, past_key_values=cache, ...)` (runs on a fork: the cache can be reused as is).
    """
    art = path if isinstance(path, Artifact) else read_artifact(path, verify=verify)
    check_compatible(art.meta, model, tokenizer, where=str(art.path or "artifact"))
    return cache_from_artifact(art, model)
