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
