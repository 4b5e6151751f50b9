"""Model identity (schema v2): the same weights in float32, bfloat16 or float16, or saved in another dtype, are
accepted; noise of 0.1% of a tensor's std on any one tensor is refused."""
import copy

import pytest
import torch

from compactor.models import weights_identity, weights_mismatch


@pytest.fixture(scope="module")
def model(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)


def perturbed(model, name, rel=1e-3, seed=0):
    """A copy with N(0, (rel * std)^2) noise added to one tensor (float32)."""
    out = copy.deepcopy(model)
    p = dict(out.named_parameters())[name]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        p.add_(torch.randn(p.shape, generator=g) * rel * p.float().std())
    return out


@pytest.mark.parametrize("writer", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reader", [torch.float32, torch.bfloat16, torch.float16])
def test_same_weights_in_any_dtype_accepted(model, writer, reader):
    ident = weights_identity(copy.deepcopy(model).to(writer))
    assert weights_mismatch(ident, copy.deepcopy(model).to(reader)) is None


def test_checkpoint_saved_in_bfloat16_loaded_as_float32_accepted(model):
    """Another folder holding the bf16-rounded weights, loaded in float32: same weights up to storage rounding."""
    ident = weights_identity(model)
    assert weights_mismatch(ident, copy.deepcopy(model).to(torch.bfloat16).to(torch.float32)) is None
    assert weights_mismatch(weights_identity(copy.deepcopy(model).to(torch.bfloat16).float()), model) is None


@pytest.mark.parametrize("reader", [torch.float32, torch.bfloat16, torch.float16])
def test_noise_on_any_one_tensor_refused(model, reader):
    ident = weights_identity(model)
    names = [n for n, p in model.named_parameters() if p.float().std() > 0]
    assert len(names) >= 15
    for name in names:
        why = weights_mismatch(ident, perturbed(model, name).to(reader))
        assert why is not None, name


def test_other_model_refused(model, tmp_path):
    from conftest import make_tiny_model
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "o", "llama", seed=1))
    assert "differ" in weights_mismatch(weights_identity(model), other)


def test_identity_is_small(model):
    ident = weights_identity(model)
    n = sum(1 for _ in model.parameters())
    assert ident["tensors"] == n and ident["kept"].shape == (n, 8) and ident["kept"].nbytes == 16 * n


@pytest.mark.slow
def test_smollm2_one_tensor_fine_tune_refused(smollm2):
    """SmolLM2: the bundled weights in bfloat16 pass; 0.1%-of-std noise on one tensor (a matrix, a norm, the
    embedding) is refused in float32, and in bfloat16 unless rounding to bf16 erased it (a norm's noise of ~1e-4 is
    far below its bf16 step, so that bf16 model is bit-identical to the original's)."""
    from compactor.models import load_model

    model = smollm2.model
    ident = weights_identity(model)
    bf16 = load_model("smollm2-135m", dtype=torch.bfloat16).model
    assert weights_mismatch(ident, bf16) is None
    params, params16 = dict(model.named_parameters()), dict(bf16.named_parameters())
    g = torch.Generator().manual_seed(0)
    for name in ("model.layers.14.mlp.down_proj.weight", "model.layers.3.input_layernorm.weight",
                 "model.embed_tokens.weight"):
        p, p16 = params[name], params16[name]
        original, original16 = p.detach().clone(), p16.detach().clone()
        noise = torch.randn(p.shape, generator=g) * 1e-3 * original.std()
        with torch.no_grad():
            p.add_(noise)
            p16.copy_((original + noise).to(torch.bfloat16))
        try:
            assert weights_mismatch(ident, model) is not None, name
            erased = torch.equal(p16, original16)
            assert (weights_mismatch(ident, bf16) is None) == erased, name
            assert erased is False or "norm" in name, name
        finally:
            with torch.no_grad():
                p.copy_(original)
                p16.copy_(original16)
    assert weights_mismatch(ident, model) is None


def test_mixed_precision_checkpoint_accepted(model):
    """A checkpoint holding bf16 matrices and float32 norms (common), loaded in float32, against the float32
    original: the same weights up to storage rounding."""
    original = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in original.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))  # trained-looking norms, not bf16-exact
    mixed = copy.deepcopy(original)
    with torch.no_grad():
        for name, p in mixed.named_parameters():
            if "norm" not in name:
                p.copy_(p.to(torch.bfloat16).float())
    assert weights_mismatch(weights_identity(original), mixed) is None
    assert weights_mismatch(weights_identity(mixed), original) is None
    assert weights_mismatch(weights_identity(original), perturbed(mixed, "model.norm.weight")) is not None


@pytest.mark.slow
def test_bundled_tokenizer_special_tokens_follow_the_gguf_file(smollm2, tmp_path, monkeypatch):
    """The conversion takes bos/eos/unk/pad from the GGUF metadata (transformers 5.17's GGUF conversion made
    <|im_start|> SmolLM2's EOS and dropped its pad token, so the fingerprint differed between machines), and a copy
    made by an older conversion (no version stamp) is converted again."""
    import json

    from compactor import models

    gguf = models._bundled_gguf("smollm2-135m")
    special = models.gguf_special_tokens(gguf, smollm2.tokenizer.get_vocab())
    # SmolLM2-135M-Instruct's file: bos 1, eos 2, unk 0, pad 2
    assert special == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
                       "pad_token": "<|im_end|>"}
    assert {k: smollm2.tokenizer.special_tokens_map[k] for k in special} == special
    stamp = json.loads((models.bundled_folder("smollm2-135m") / "compactor_conversion.json").read_text())
    assert stamp["version"] == models.CONVERSION_VERSION
    # an unstamped copy (older conversion) is converted again, into the same place
    monkeypatch.setenv("COMPACTOR_CACHE", str(tmp_path))
    target = tmp_path / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (target / name).write_text("stale")
    assert models.bundled_folder("smollm2-135m") == target
    assert json.loads((target / "compactor_conversion.json").read_text())["version"] == models.CONVERSION_VERSION
    assert json.loads((target / "config.json").read_text())["model_type"] == "llama"
