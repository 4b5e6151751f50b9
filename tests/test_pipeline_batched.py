"""compact_capture's batched path (all heads of a group of layers at once) against its per-head path."""
import pytest
import torch

import compactor.pipeline as pipeline
from compactor.capture.prefill import prefill_and_capture
from compactor.evaluation.metrics import head_fidelity
from compactor.methods import make_method
from compactor.models import load_model
from compactor.pipeline import compact_capture, layer_groups, use_batched
from compactor.storage.kv_codec import parse_kv_bits


@pytest.fixture(scope="module")
def capture(tiny_models, doc_text):
    lm = load_model(str(tiny_models["llama"]))
    ids = lm.tokenizer(doc_text, return_tensors="pt").input_ids[0][:120]
    return prefill_and_capture(lm.model, lm.tokenizer, ids, chunk_size=32, max_queries=200, progress=False)


def test_layer_groups_respect_codecs_limits_and_sort_by_budget():
    budgets = torch.tensor([[10, 12], [70, 60], [11, 9], [65, 66]])
    assert layer_groups(budgets, 100) == [[2, 0, 3, 1]]  # sorted by each layer's longest head
    assert layer_groups(budgets, 100, limit=2 * 2 * 100 * 128 * 2) == [[2, 0], [3, 1]]  # 2 layers a group
    codecs = [parse_kv_bits("16"), parse_kv_bits("K4V4"), parse_kv_bits("16"), parse_kv_bits("16")]
    groups = layer_groups(budgets, 100, codecs)
    assert sorted(sum(groups, [])) == [0, 1, 2, 3] and [1] in groups


def test_use_batched_env(monkeypatch):
    monkeypatch.delenv("COMPACTOR_BATCHED", raising=False)
    assert not use_batched(torch.device("cpu")) and use_batched(torch.device("cuda"))
    monkeypatch.setenv("COMPACTOR_BATCHED", "1")
    assert use_batched(torch.device("cpu"))
    monkeypatch.setenv("COMPACTOR_BATCHED", "0")
    assert not use_batched(torch.device("cuda"))


@pytest.mark.parametrize("budget", ["layer", "global"])
def test_batched_eviction_equals_per_head(capture, budget):
    ref, b_ref = compact_capture(capture, make_method("eviction"), 4, budget, progress=False, batched=False)
    got, b_got = compact_capture(capture, make_method("eviction"), 4, budget, progress=False, batched=True)
    assert torch.equal(b_ref, b_got)
    for r, g in zip(ref, got):
        assert torch.equal(r.positions, g.positions) and torch.equal(r.lengths, g.lengths)
        assert torch.equal(r.keys, g.keys) and torch.equal(r.values, g.values) and torch.equal(r.importance,
                                                                                                 g.importance)


@pytest.mark.parametrize("kv_bits", ["16", "K4V4"])
def test_batched_am_close_to_per_head_and_grouping_changes_nothing(capture, kv_bits, monkeypatch):
    codecs = [parse_kv_bits(kv_bits)] * len(capture.keys)
    am = make_method("am")
    ref, _ = compact_capture(capture, am, 4, "layer", progress=False, codecs=codecs, batched=False)
    got, _ = compact_capture(capture, am, 4, "layer", progress=False, codecs=codecs, batched=True)
    monkeypatch.setattr(pipeline, "BATCH_SHARE_BYTES", 1)  # one layer per group
    single, _ = compact_capture(capture, am, 4, "layer", progress=False, codecs=codecs, batched=True)
    for r, g, s in zip(ref, got, single):
        assert torch.equal(g.positions, s.positions)
        torch.testing.assert_close(g.values, s.values, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(g.beta, s.beta, rtol=1e-4, atol=1e-4)
        # the batched fits stop early: the keys the exact fit keeps are kept, and the fit on the reference
        # queries is as good (within 10%)
        for h in range(r.keys.shape[0]):
            kr, kg = int(r.lengths[h]), int(g.lengths[h])
            assert set(r.positions[h, :kr].tolist()) <= set(g.positions[h, :kg].tolist())
    err = {"ref": [], "got": []}
    for name, layers in (("ref", ref), ("got", got)):
        for l, lay in enumerate(layers):
            for h in range(lay.keys.shape[0]):
                k = int(lay.lengths[h])
                err[name].append(head_fidelity(capture.queries[l][h], capture.keys[l][h], capture.values[l][h],
                                               lay.keys[h, :k], lay.beta[h, :k], lay.values[h, :k],
                                               capture.scale)[0])
    assert sum(err["got"]) <= 1.1 * sum(err["ref"])
