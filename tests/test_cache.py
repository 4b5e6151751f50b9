"""CompactedCache + compactor attention: identity reproduces the full cache, beta means log-multiplicity,
positions continue at the logical length, generate() works, for every supported family."""
import pytest
import torch
from transformers import DynamicCache

from compactor.layer_kv import LayerKV
from compactor.models import load_model
from compactor.serving.loader import cache_from_layers

from conftest import FAMILIES


def prefix_kv(model, ids):
    """Keys/values of ids through the model's own sdpa path (independent of compactor's capture)."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[None], past_key_values=cache, use_cache=True)
    return [(layer.keys[0], layer.values[0]) for layer in cache.layers]


def identity_layers(kv, dup=None, drop=0):
    """LayerKV per layer keeping every key; dup=(pos, copies) duplicates one key `copies` extra times; drop=n
    removes keys 1..n (so a prefix with duplicates still has no more slots than the T tokens it stands for)."""
    layers = []
    for k, v in kv:
        H, T, _ = k.shape
        pos = torch.arange(T).expand(H, T)
        if dup is not None:
            j, copies = dup
            k = torch.cat([k] + [k[:, j:j + 1]] * copies, 1)
            v = torch.cat([v] + [v[:, j:j + 1]] * copies, 1)
            pos = torch.cat([pos] + [pos[:, j:j + 1]] * copies, 1)
        if drop:
            keep = torch.cat([torch.arange(1), torch.arange(drop + 1, k.shape[1])])
            k, v, pos = k[:, keep], v[:, keep], pos[:, keep]
        layers.append(LayerKV(k, v, torch.zeros(H, k.shape[1]), pos.clone(), torch.full((H,), k.shape[1])))
    return layers


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_cache_reproduces_full_logits(tiny_models, doc_text, family):
    lm = load_model(str(tiny_models[family]))
    ids = lm.tokenizer(doc_text, return_tensors="pt").input_ids[0][:200]
    T = 150
    with torch.no_grad():
        ref = lm.model(ids[None]).logits[0, T:]
        kv = prefix_kv(lm.model, ids[:T])
        cache = cache_from_layers(identity_layers(kv), T, lm.model)
        assert cache.get_seq_length() == T
        out = lm.model(ids[None, T:], past_key_values=cache).logits[0]  # no position ids: must continue at T
    assert (out - ref).abs().max() < 1e-4
    assert cache.get_seq_length() == ids.numel()


def test_beta_is_log_multiplicity(tiny_llama, doc_text):
    """A key stored once with beta = log 3 attends exactly like the same key stored three times (keys 1 and 2
    dropped from both)."""
    lm = load_model(str(tiny_llama))
    ids = lm.tokenizer(doc_text, return_tensors="pt").input_ids[0][:120]
    T, j = 100, 37
    kv = prefix_kv(lm.model, ids[:T])
    dup = cache_from_layers(identity_layers(kv, dup=(j, 2), drop=2), T, lm.model)
    layers = identity_layers(kv, drop=2)
    for layer in layers:
        layer.beta[:, j - 2] = torch.log(torch.tensor(3.0))
    beta = cache_from_layers(layers, T, lm.model)
    plain = cache_from_layers(identity_layers(kv, drop=2), T, lm.model)
    with torch.no_grad():
        a = lm.model(ids[None, T:], past_key_values=dup).logits
        b = lm.model(ids[None, T:], past_key_values=beta).logits
        c = lm.model(ids[None, T:], past_key_values=plain).logits
    assert (a - b).abs().max() < 1e-4
    assert (a - c).abs().max() > 1e-3  # and beta does change the result


def test_padding_slots_are_invisible(tiny_llama, doc_text):
    """Heads of unequal length: padding (beta=-inf) must equal a cache that never had those slots."""
    lm = load_model(str(tiny_llama))
    ids = lm.tokenizer(doc_text, return_tensors="pt").input_ids[0][:90]
    T = 80
    kv = prefix_kv(lm.model, ids[:T])
    full = identity_layers(kv)
    short = []
    for layer in full:  # head 1 of every layer loses its last 10 keys (positions 70..79)
        garbage = layer.keys.clone()
        garbage[1, 70:] = 100.0
        lengths = torch.tensor([T, 70])
        short.append(LayerKV(garbage, layer.values, layer.beta, layer.positions, lengths))
    dense = cache_from_layers(short, T, lm.model)
    # reference: head 1's last keys pushed to -inf attention by construction of a plain mask
    ref_layers = []
    for layer in full:
        beta = layer.beta.clone()
        beta[1, 70:] = float("-inf")
        ref_layers.append(LayerKV(layer.keys, layer.values, beta, layer.positions, torch.tensor([T, T])))
    ref = cache_from_layers(ref_layers, T, lm.model)
    with torch.no_grad():
        a = lm.model(ids[None, T:], past_key_values=dense).logits
        b = lm.model(ids[None, T:], past_key_values=ref).logits
    assert torch.isfinite(a).all()
    assert (a - b).abs().max() < 1e-5


def test_generate_matches_full_context(tiny_llama, doc_text):
    lm = load_model(str(tiny_llama))
    ids = lm.tokenizer(doc_text, return_tensors="pt").input_ids[0][:130]
    T = 120
    kv = prefix_kv(lm.model, ids[:T])
    cache = cache_from_layers(identity_layers(kv), T, lm.model)
    prompt = ids[None, T:]
    with torch.no_grad():
        ours = lm.model.generate(**cache.fork().generation_inputs(prompt), max_new_tokens=12, do_sample=False,
                                 pad_token_id=0)
        ref = lm.model.generate(ids[None], max_new_tokens=12, do_sample=False, pad_token_id=0,
                                attention_mask=torch.ones(1, ids.numel(), dtype=torch.long))
    assert ours[0, prompt.shape[1]:].tolist() == ref[0, ids.numel():].tolist()


def test_fork_reset_crop(tiny_llama, doc_text):
    lm = load_model(str(tiny_llama))
    ids = lm.tokenizer(doc_text, return_tensors="pt").input_ids[0][:70]
    T = 60
    cache = cache_from_layers(identity_layers(prefix_kv(lm.model, ids[:T])), T, lm.model)
    a = cache.fork()
    with torch.no_grad():
        lm.model(ids[None, T:], past_key_values=a)
    assert a.get_seq_length() == 70 and cache.get_seq_length() == T  # the original is untouched
    a.crop(-4)
    assert a.get_seq_length() == 66
    with pytest.raises(ValueError):
        a.crop(-7)  # cannot crop into the compacted prefix
    a.reset()
    assert a.get_seq_length() == T


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_beta_in_bf16_on_cuda(tiny_llama, doc_text):
    """bf16 serving on the GPU: beta keeps full precision (attention runs in float32 when beta is present)."""
    lm = load_model(str(tiny_llama), device="cuda", dtype=torch.bfloat16)
    ids = lm.tokenizer(doc_text, return_tensors="pt").input_ids[0][:120].cuda()
    T, j = 100, 37
    kv = [(k.float().cpu(), v.float().cpu()) for k, v in prefix_kv(lm.model, ids[:T])]
    dup = cache_from_layers(identity_layers(kv, dup=(j, 6), drop=6), T, lm.model)
    layers = identity_layers(kv, drop=6)
    for layer in layers:
        layer.beta[:, j - 6] = torch.log(torch.tensor(7.0))
    beta = cache_from_layers(layers, T, lm.model)
    with torch.no_grad():
        a = lm.model(ids[None, T:], past_key_values=dup).logits.float()
        b = lm.model(ids[None, T:], past_key_values=beta).logits.float()
    assert (a - b).abs().max() < 5e-2  # bf16 model arithmetic; a bf16-rounded beta=log 7 would be off ~1% in mass
