"""Shared fixtures: tiny random-weight models of each supported family, saved as local Hugging Face folders
with a small byte-level BPE tokenizer trained here (no hub access needed)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
CORPUS = ("The quick brown fox jumps over the lazy dog. " * 3 +
          "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
          "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. ")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep the converted bundled model in the user's cache (expensive) but nothing else outside tmp."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    yield


def tiny_config(family: str, vocab_size: int = 320, **overrides):
    from transformers import AutoConfig

    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
              tie_word_embeddings=False)
    if family == "qwen2":
        kw["use_sliding_window"] = False
    kw.update(overrides)
    return AutoConfig.for_model(family, **kw)


# a minimal chat template (role tags, <eos> closing each turn), so chat wrapping is testable on the tiny models
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([CORPUS] * 4, vocab_size=300, min_frequency=1, special_tokens=["<eos>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>", pad_token="<eos>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_tiny_model(folder: Path, family: str = "llama", seed: int = 0, **overrides) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    # larger-than-init weights so attention is peaked rather than uniform (more like a trained model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj.weight" in name or "k_proj.weight" in name:
                p.mul_(8.0)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {f: make_tiny_model(root / f, f) for f in FAMILIES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def doc_text() -> str:
    return CORPUS * 6


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M (converted once to safetensors in the compactor cache)."""
    from compactor.models import load_model

    return load_model("smollm2-135m")
