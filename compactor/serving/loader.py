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
from .cache import CompactedCache, CompactedLayer, RaggedLayer
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


def ragged_kernel_available(model) -> bool:
    """Whether the ragged Triton kernel serves this model: on CUDA with triton importable."""
    from ..kernels.ragged_attention import _HAS_TRITON

    return _HAS_TRITON and _device_dtype(model)[0].type == "cuda"


def keep_quantized_default(model, art: Artifact | None = None) -> bool:
    """The rule for `keep_quantized=None`: keep the stored codes when the ragged Triton kernel runs (the model
    on CUDA, triton importable), the model has no sliding-window attention (the ragged path takes a causal +
    padding mask only) and every layer of `art` has one codec (not per-phase codecs); otherwise dequantize (on
    CPU the ragged path is the plain-torch reference, which decodes the prefix at every call: correct but slower
    than the padded cache)."""
    phased = art is not None and artifact_is_phased(art)
    return ragged_kernel_available(model) and not _sliding_window(model) and not phased


def artifact_is_phased(art: Artifact) -> bool:
    """Whether some layer stores per-phase codecs (a reasoning trace compressed with a calibration)."""
    return any(is_phased(layer.arrays) for layer in art.layers)


def is_phased(arrays: dict) -> bool:
    """Whether a stored layer's arrays hold per-phase units (kv_codec.encode_layer with a PhasedCodec)."""
    return "phase_lengths" in arrays


def _sliding_window(model) -> bool:
    cfg = model.config
    layer_types = getattr(cfg, "layer_types", None) or ()
    return bool(getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True)) or \
        any("sliding" in str(t) for t in layer_types)


def ragged_layers(art: Artifact, device) -> list:
    """Every layer of an (already checked) artifact as a RaggedPrefix on `device`, codes kept as stored; refuses
    inconsistent arrays and non-finite decoded values (checked on the host, once)."""
    from ..kernels.ragged_prefix import RaggedPrefix

    out = []
    for i, layer in enumerate(art.layers):
        try:
            prefix = RaggedPrefix.from_stored(layer.arrays, layer.attrs, art.codebooks, int(art.meta["head_dim"]))
        except Exception as e:  # checked arrays should always be consistent; anything else means a damaged file
            raise ArtifactError(f"{art.path}: cannot serve layer {i} as stored ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None
        keys, values = prefix.dequantize()
        finite_beta = prefix.beta[prefix.beta != float("-inf")]
        exact = [t for t in (prefix.exact_keys, prefix.exact_values) if t is not None]
        if not (torch.isfinite(keys).all() and torch.isfinite(values).all() and torch.isfinite(finite_beta).all()
                and all(torch.isfinite(t).all() for t in exact)):
            raise ArtifactError(f"{art.path}: layer {i} decodes to non-finite keys, values or beta")
        if prefix.max_length > art.T:
            raise ArtifactError(f"layer {i} keeps {prefix.max_length} entries per head for a prefix of {art.T} tokens")
        out.append(prefix.to(device))
    return out


def served_bytes(encoded: list[tuple[dict, dict]], decoded: list[LayerKV], codebooks: dict, head_dim: int,
                 logical_length: int, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
    """(dequantized, as stored): bytes a served cache of these layers allocates with keep_quantized=False (the
    `decoded` layers in `dtype`, padded to each layer's longest head) and with keep_quantized=True (the `encoded`
    arrays and attributes of `encode_layer` kept as codes, ragged), measured from the tensors each load path
    builds (on the host, one layer at a time; the same tensors go to the GPU). Layers with per-phase codecs are
    always served dequantized: then both numbers are the dequantized one."""
    from ..kernels.ragged_prefix import RaggedPrefix

    keep = not any(is_phased(arrays) for arrays, _ in encoded)
    padded, ragged, shared = 0, 0, {}
    for (arrays, attrs), kv in zip(encoded, decoded):
        pad = torch.arange(kv.keys.shape[1])[None, :] >= kv.lengths[:, None]
        layer = CompactedLayer(kv.keys.to(dtype), kv.values.to(dtype), kv.beta.float().masked_fill(pad, float("-inf")),
                               logical_length)
        padded += layer.prefix_bytes()
        if not keep:
            continue
        stored = RaggedLayer(RaggedPrefix.from_stored(arrays, attrs, codebooks, head_dim), logical_length, dtype)
        ragged += stored.prefix_bytes()
        shared.update(stored.shared_tensors())
    if not keep:
        return padded, padded
    return padded, ragged + sum(t.numel() * t.element_size() for t in shared.values())


def cache_from_artifact(art: Artifact, model, keep_quantized: bool | None = None) -> CompactedCache:
    """The cache an (already checked) artifact serves on the model's device. keep_quantized=True: the prefix as
    stored, ragged per head and in its codecs (`RaggedLayer`, served by the ragged kernel); False: decoded to the
    model's dtype and padded to each layer's longest head; None: `keep_quantized_default(model, art)`."""
    if keep_quantized is None:
        keep_quantized = keep_quantized_default(model, art)
    if not keep_quantized:
        return cache_from_layers(decode_layers(art), art.T, model, art.meta)
    if _sliding_window(model):
        raise ArtifactError("keep_quantized needs a model without sliding-window attention (the ragged kernel "
                            "takes a causal + padding mask only); load with keep_quantized=False")
    if artifact_is_phased(art):
        raise ArtifactError("keep_quantized serves one codec per layer, and this artifact stores per-phase codecs "
                            "(a reasoning trace); load with keep_quantized=False")
    device, dtype = _device_dtype(model)
    layers = [RaggedLayer(prefix, art.T, dtype) for prefix in ragged_layers(art, device)]
    prepare_model(model)
    return CompactedCache(layers, art.T, art.meta)


def load_cache(path: str | Path | Artifact, model, tokenizer=None, verify: bool = True,
               keep_quantized: bool | None = None) -> CompactedCache:
    """Load an .h5 artifact as a CompactedCache for `model` (prepared with `prepare_model`).

    keep_quantized: True serves the prefix as stored (codes, gains, per-head lengths: memory = the stored bytes
    plus a small fixed part, see `CompactedCache.memory_bytes`) through the ragged attention kernel; False decodes
    it to the model's dtype, padded per layer to its longest head (transformers' sdpa with a beta bias); None (the
    default) keeps it quantized exactly when the ragged Triton kernel runs (model on CUDA, triton importable) and
    the model has no sliding window (`keep_quantized_default`).

    The file is checked against the model before any dataset is read (layers, KV heads, head dim, T within the
    context), its digest verified, and the model's config, weights identity and (when given) tokenizer compared
    with the artifact's. verify=False skips the digest only; do not serve a cache loaded that way.
    Position ids continue at the logical length T. Use `model(ids, past_key_values=cache)` (appends to the cache)
    or `model.generate(ids, past_key_values=cache, ...)` (runs on a fork: the cache can be reused as is).
    """
    art = path if isinstance(path, Artifact) else read_artifact(path, verify=verify, limits=model_limits(model))
    check_compatible(art.meta, model, tokenizer, where=str(art.path or "artifact"))
    return cache_from_artifact(art, model, keep_quantized)
