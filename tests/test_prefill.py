"""Chunked prefill with capture: keys equal the model's own cache, captured queries reproduce the model's own
attention probabilities (eager), GQA pooling order and positions are right, subsampling is seeded."""
import pytest
import torch
from transformers import DynamicCache

from compactor.models import load_model
from compactor.capture.prefill import CONTEXT, REPEAT, prefill_and_capture

from conftest import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_matches_model_attention(tiny_models, doc_text, family):
    lm = load_model(str(tiny_models[family]))
    ids = lm.tokenizer(doc_text, return_tensors="pt").input_ids[0][:90]
    cap = prefill_and_capture(lm.model, lm.tokenizer, ids, chunk_size=17, max_queries=10_000, progress=False)
    T, cfg = 90, lm.config
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    # reference: one un-chunked eager forward, attention probabilities straight from transformers
    lm.model.set_attn_implementation("eager")
    cache = DynamicCache(config=cfg)
    with torch.no_grad():
        out = lm.model(ids[None], past_key_values=cache, use_cache=True, output_attentions=True)
    lm.model.set_attn_implementation("sdpa")
    ctx = (cap.query_source == CONTEXT).nonzero().flatten()
    assert ctx.numel() == g * T  # no subsampling when the cap is large
    for layer in range(cfg.num_hidden_layers):
        assert torch.allclose(cap.keys[layer], cache.layers[layer].keys[0], atol=1e-5)
        assert torch.allclose(cap.values[layer], cache.layers[layer].values[0], atol=1e-5)
        probs = out.attentions[layer][0]  # (Hq, T, T)
        for h in range(cfg.num_key_value_heads):
            q = cap.queries[layer][h][ctx]  # (g*T, d): head-major, then position
            s = cap.scale * q @ cap.keys[layer][h].T
            pos = cap.query_pos[ctx]
            s = s.masked_fill(torch.arange(T)[None] > pos[:, None], float("-inf"))
            ref = probs[h * g:(h + 1) * g].reshape(g * T, T)
            assert torch.allclose(torch.softmax(s, -1), ref, atol=1e-5)


def test_subsampling_is_seeded_and_capped(tiny_llama, doc_text):
    lm = load_model(str(tiny_llama))
    ids = lm.tokenizer(doc_text, return_tensors="pt").input_ids[0][:300]
    a = prefill_and_capture(lm.model, lm.tokenizer, ids, max_queries=64, seed=3, progress=False)
    b = prefill_and_capture(lm.model, lm.tokenizer, ids, max_queries=64, seed=3, progress=False)
    c = prefill_and_capture(lm.model, lm.tokenizer, ids, max_queries=64, seed=4, progress=False)
    assert a.queries[0].shape[1] == 64 and torch.equal(a.queries[1], b.queries[1])
    assert not torch.equal(a.query_pos, c.query_pos)
    rep = a.query_source == REPEAT
    assert int(rep.sum()) == 32 and (a.query_pos[rep] == 299).all()
    assert (a.query_pos[~rep] < 300).all()


def test_repeat_queries_need_room_in_the_context(tiny_llama, doc_text):
    lm = load_model(str(tiny_llama))  # context 1024
    ids = lm.tokenizer(doc_text * 2, return_tensors="pt").input_ids[0][:1020]
    cap = prefill_and_capture(lm.model, lm.tokenizer, ids, max_queries=64, progress=False)
    assert (cap.query_source == CONTEXT).all()  # no room left for a repeat pass: context queries only
    assert cap.queries[0].shape[1] == 64
