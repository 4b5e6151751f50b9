"""The eviction family, KVzip with one shared budget, PyramidKV budgets and prototype memory: each method's defining
rule checked exactly on hand-made inputs against plain float64 loops written here."""
from __future__ import annotations

import math

import pytest
import torch

from compactor.capture.prefill import CONTEXT, REPEAT, Capture
from compactor.fitting.budgets import pyramid_budgets
from compactor.methods import METHODS, make_method
from compactor.methods.expected_attention import expected_attention_scores, mean_rotation, unrotate
from compactor.methods.prototype_memory import stream_prototypes
from compactor.pipeline import compact_capture


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [x / sum(e) for x in e]


def _dot(a, b):
    return sum(float(x) * float(y) for x, y in zip(a, b))


def _top(scores, k):
    """Positions of the k largest scores (no ties in these inputs), sorted."""
    return sorted(sorted(range(len(scores)), key=lambda j: -scores[j])[:k])


def _kept(c):
    return c.positions.tolist()


def test_registry_lists_every_method():
    for name in ("snapkv", "pyramidkv", "h2o", "tova", "knorm", "expected_attention", "kvzip", "prototype"):
        assert METHODS[name]().name == name


def test_snapkv_window_attention_pooled():
    g, w, T, d, k, scale = 2, 3, 12, 4, 3, 0.7
    torch.manual_seed(0)
    keys, values = torch.randn(T, d), torch.randn(T, d)
    wq = torch.randn(g * w, d)
    ref = [0.0] * (T - w)
    for h in range(g):
        mean = [0.0] * (T - w)
        for i in range(w):
            p = _softmax([scale * _dot(wq[h * w + i], keys[j]) for j in range(T - w + i + 1)])
            for j in range(T - w):
                mean[j] += p[j] / w
        for j in range(T - w):  # average pool, kernel 3, zero padding counted
            ref[j] += sum(mean[j + o] for o in (-1, 0, 1) if 0 <= j + o < T - w) / k / g
    m = make_method("snapkv", kernel=k)
    got = m.compact(keys, values, None, w + 3, window_queries=wq, group=g, scale=scale)
    assert _kept(got) == sorted(_top(ref, 3) + list(range(T - w, T)))
    assert torch.equal(got.values, values[got.positions]) and torch.equal(got.beta, torch.zeros(w + 3))
    # a budget below the window keeps its most recent keys
    assert _kept(m.compact(keys, values, None, 2, window_queries=wq, group=g, scale=scale)) == [T - 2, T - 1]


def test_tova_last_query_mean_over_all_heads_of_the_layer():
    H, g, w, T, d, scale = 2, 2, 3, 10, 4, 0.5
    torch.manual_seed(1)
    keys, values = torch.randn(H, T, d), torch.randn(H, T, d)
    window = torch.randn(H, g * w, d)
    ref = [0.0] * T
    for h in range(H):
        for j in range(g):
            p = _softmax([scale * _dot(window[h, j * w + w - 1], keys[h, t]) for t in range(T)])
            ref = [a + b / (H * g) for a, b in zip(ref, p)]
    want = sorted(_top(ref[:-1], 3) + [T - 1])
    m = make_method("tova")
    for h in range(H):  # every KV head of the layer keeps the same positions
        got = m.compact(keys[h], values[h], None, 4, window_queries=window[h], group=g, scale=scale,
                        layer_keys=keys, layer_window=window)
        assert _kept(got) == want
    own = [0.0] * T
    for j in range(g):
        p = _softmax([scale * _dot(window[1, j * w + w - 1], keys[1, t]) for t in range(T)])
        own = [a + b / g for a, b in zip(own, p)]
    got = make_method("tova", heads="group").compact(keys[1], values[1], None, 4, window_queries=window[1], group=g,
                                                     scale=scale)
    assert _kept(got) == sorted(_top(own[:-1], 3) + [T - 1])


def test_h2o_accumulated_causal_attention_plus_recent():
    T, d, n, scale = 16, 4, 9, 0.8
    torch.manual_seed(2)
    keys, values, queries = torch.randn(T, d), torch.randn(T, d), torch.randn(n + 3, d)
    pos = torch.randint(0, T, (n + 3,))
    src = torch.tensor([CONTEXT] * n + [REPEAT] * 3, dtype=torch.int8)  # repeat rows do not count
    acc = [0.0] * T
    for i in range(n):
        p = _softmax([scale * _dot(queries[i], keys[j]) for j in range(int(pos[i]) + 1)])
        for j, x in enumerate(p):
            acc[j] += x
    budget = 6  # 3 recent + 3 heavy hitters
    got = make_method("h2o").compact(keys, values, queries, budget, query_pos=pos, query_source=src, scale=scale)
    assert _kept(got) == sorted(_top(acc[:T - 3], 3) + [T - 3, T - 2, T - 1])


def test_knorm_keeps_smallest_key_norms():
    norms = [5.0, 0.5, 3.0, 0.1, 4.0, 2.0, 0.3]
    keys = torch.stack([torch.tensor([x, 0.0, 0.0]) for x in norms])
    got = make_method("knorm").compact(keys, keys.clone(), None, 3)
    assert _kept(got) == [1, 3, 6]


def _rotate_pairs(x, p, inv_freq, scaling):
    """RoPE by explicit 2x2 rotations of the coordinate pairs (i, i + d/2) (transformers' rotate_half layout)."""
    h = x.shape[-1] // 2
    out = x.clone()
    for i in range(h):
        a = p * float(inv_freq[i])
        out[i] = scaling * (x[i] * math.cos(a) - x[i + h] * math.sin(a))
        out[i + h] = scaling * (x[i + h] * math.cos(a) + x[i] * math.sin(a))
    return out


def test_expected_attention_gaussian_rule():
    g, n, T, d, n_future, n_sink, scaling = 2, 40, 20, 4, 7, 2, 1.1
    scale = d ** -0.5
    torch.manual_seed(3)
    inv_freq = 1.0 / (100.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    pre = torch.randn(g, n, d, dtype=torch.float64) + torch.tensor([1.0, -0.5, 0.2, 0.8], dtype=torch.float64)
    pos = torch.randint(n_sink, T, (n,))
    post = torch.stack([torch.stack([_rotate_pairs(pre[h, i], int(pos[i]), inv_freq, scaling) for i in range(n)])
                        for h in range(g)])
    keys, values = torch.randn(T, d, dtype=torch.float64), torch.randn(T, d, dtype=torch.float64)
    # reference: mean rotation from explicit pair rotations, the Gaussian moment generating function, softmax
    R = torch.zeros(d, d, dtype=torch.float64)
    for p in range(T, T + n_future):
        R += torch.stack([_rotate_pairs(e, p, inv_freq, scaling) for e in torch.eye(d, dtype=torch.float64)]).T
    R /= n_future
    ref = [0.0] * (T - n_sink)
    for h in range(g):
        mu = pre[h].mean(0)
        cov = (pre[h] - mu).T @ (pre[h] - mu) / n
        mu_f, cov_f = R @ mu, R @ cov @ R.T
        logits = [scale * float(mu_f @ keys[j]) + 0.5 * scale ** 2 * float(keys[j] @ cov_f @ keys[j])
                  for j in range(n_sink, T)]
        ref = [a + b / g for a, b in zip(ref, _softmax(logits))]
    ref = [x * float(values[j + n_sink].norm()) for j, x in enumerate(ref)]
    # the pieces: RoPE undone exactly, the mean rotation, the scores
    assert torch.allclose(unrotate(post[0], pos, inv_freq.float(), scaling), pre[0], atol=1e-5)
    assert torch.allclose(mean_rotation(inv_freq, T, n_future, scaling), R, atol=1e-12)
    scores = expected_attention_scores(keys, values, pre, R, scale, n_sink)
    assert torch.allclose(scores[n_sink:], torch.tensor(ref, dtype=torch.float64), rtol=1e-10)
    # the method on pooled post-RoPE rows (head-major), with repeat rows that must be ignored
    rep = torch.randn(g, 3, d, dtype=torch.float64)
    pooled = torch.cat([torch.cat([post[h], rep[h]]) for h in range(g)]).float()
    qpos = torch.cat([pos, torch.full((3,), T - 1)]).repeat(g)
    src = torch.tensor([CONTEXT] * n + [REPEAT] * 3, dtype=torch.int8).repeat(g)
    got = make_method("expected_attention", n_future=n_future, n_sink=n_sink).compact(
        keys.float(), values.float(), pooled, n_sink + 5, query_pos=qpos, query_source=src, scale=scale,
        rope=(inv_freq.float(), scaling), group=g)
    assert _kept(got) == sorted(list(range(n_sink)) + [j + n_sink for j in _top(ref, 5)])


def _fake_capture(L=3, H=2, g=2, T=24, d=8, w=4, seed=0, recon=None):
    torch.manual_seed(seed)
    n = 6
    return Capture([torch.randn(H, T, d) for _ in range(L)], [torch.randn(H, T, d) for _ in range(L)],
                   [torch.randn(H, g * n, d) for _ in range(L)], torch.full((g * n,), T - 1),
                   torch.full((g * n,), REPEAT, dtype=torch.int8), d ** -0.5,
                   probe=None if recon is None else {"recon": recon, "wo_norm": torch.ones_like(recon)},
                   window_queries=[torch.randn(H, g * w, d) for _ in range(L)], group=g)


def test_kvzip_one_budget_for_all_heads_and_layers():
    L, H, g, T, ratio = 3, 2, 2, 24, 4
    torch.manual_seed(5)
    recon = torch.rand(L, H * g, T) ** 4  # skewed: some heads far more important than others
    cap = _fake_capture(L, H, g, T, recon=recon)
    layers, budgets = compact_capture(cap, make_method("kvzip"), ratio, budget="uniform", progress=False)
    per_kv = recon.reshape(L, H, g, T).amax(2)  # max over the GQA group
    total = L * H * math.ceil(T / ratio)
    flat = per_kv.reshape(L * H, T).clone()
    flat[torch.arange(L * H), flat.argmax(1)] = float("inf")  # global_budgets' minimum floor: each head's best key
    chosen = set(torch.topk(flat.reshape(-1), total).indices.tolist())
    kept = set()
    for l, layer in enumerate(layers):
        for h in range(H):
            kept |= {(l * H + h) * T + int(p) for p in layer.positions[h, :int(layer.lengths[h])]}
    assert kept == chosen and int(budgets.sum()) == total
    assert len(set(budgets.flatten().tolist())) > 1  # the budgets really are unequal


def test_pyramid_budgets_formula():
    # avg 25, last = 25 / 20 = 1.25, first = 48.75, step 11.875
    assert pyramid_budgets(5, 2, 100, 4).tolist() == [[49] * 2, [37] * 2, [25] * 2, [13] * 2, [1] * 2]
    # first capped at T = 10: avg 8, last = 2 * 8 - 10 = 6
    assert pyramid_budgets(3, 1, 10, 1.25).flatten().tolist() == [10, 8, 6]


def test_pyramidkv_layer_budgets_with_snapkv_ranking():
    from compactor.methods.snapkv import snapkv_scores

    L, H, g, T, ratio = 3, 2, 2, 24, 4
    cap = _fake_capture(L, H, g, T)
    layers, budgets = compact_capture(cap, make_method("pyramidkv"), ratio, budget="layer", progress=False)
    assert torch.equal(budgets, pyramid_budgets(L, H, T, ratio))
    for l in range(L):
        for h in range(H):
            b = int(budgets[l, h])
            want = torch.topk(snapkv_scores(cap.keys[l][h], cap.window_queries[l][h], cap.scale, g), b).indices
            assert layers[l].positions[h, :b].tolist() == sorted(want.tolist())


def test_prototype_memory_streaming_assignment():
    keys = torch.tensor([[0.0, 0.0], [10.0, 0.0], [1.0, 0.0], [9.0, 0.0], [2.0, 0.0]])
    values = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]])
    # one key at a time: k2 -> 0 (dist 1 vs 9), k3 -> 1, k4 -> 0 (mean [0.5, 0]: 1.5 vs mean [9.5, 0]: 7.5)
    _, _, counts, assign = stream_prototypes(keys, values, 2, chunk=1)
    assert assign.tolist() == [0, 1, 0, 1, 0] and counts.tolist() == [3.0, 2.0]
    got = make_method("prototype", chunk=1).compact(keys, values, None, 2)
    assert torch.allclose(got.keys, torch.tensor([[1.0, 0.0], [9.5, 0.0]]))
    assert torch.allclose(got.values, torch.tensor([[3.0], [3.0]]))
    assert torch.allclose(got.beta, torch.log(torch.tensor([3.0, 2.0])))
    # one chunk of three: all three see the seeds' means [0, 0] and [10, 0]; k4 still goes to 0 (2 vs 8)
    _, _, counts, assign = stream_prototypes(keys, values, 2, chunk=3)
    assert assign.tolist() == [0, 1, 0, 1, 0]


def test_prototype_readout_is_exact_for_identical_members():
    """With members of each prototype sharing one key, attention with beta = log n equals the full attention."""
    torch.manual_seed(6)
    seeds = torch.randn(4, 8, dtype=torch.float64) * 3
    members = torch.tensor([0, 1, 2, 3, 0, 0, 2, 1, 0, 3, 3, 3])
    keys = seeds[members]
    values = torch.randn(12, 5, dtype=torch.float64)
    c = make_method("prototype", chunk=2).compact(keys, values, None, 4)
    q = torch.randn(7, 8, dtype=torch.float64)
    full = torch.softmax(q @ keys.T * 0.4, -1) @ values
    comp = torch.softmax(q @ c.keys.T * 0.4 + c.beta.double(), -1) @ c.values
    assert torch.allclose(full, comp, atol=1e-12)


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "h2o", "tova", "knorm", "expected_attention", "prototype"])
def test_methods_on_a_real_capture(tiny_llama, doc_text, name):
    """Through prefill_and_capture and compact_capture on a tiny model: the context the methods read is there."""
    from compactor.capture.prefill import prefill_and_capture
    from compactor.models import load_model

    lm = load_model(str(tiny_llama))
    ids = lm.tokenizer(doc_text, return_tensors="pt").input_ids[0][:96]
    cap = prefill_and_capture(lm.model, lm.tokenizer, ids, max_queries=96 * 2 * 4, repeat_fraction=0.0,
                              progress=False, window=16)
    layers, budgets = compact_capture(cap, make_method(name), 8, progress=False)
    for layer, b in zip(layers, budgets):
        assert layer.lengths.tolist() == b.tolist() and torch.isfinite(layer.keys).all()


def test_window_queries_are_the_last_positions(tiny_llama, doc_text):
    from compactor.capture.prefill import prefill_and_capture
    from compactor.models import load_model

    lm = load_model(str(tiny_llama))
    T, w, g = 80, 16, 2
    ids = lm.tokenizer(doc_text, return_tensors="pt").input_ids[0][:T]
    cap = prefill_and_capture(lm.model, lm.tokenizer, ids, max_queries=T * g, repeat_fraction=0.0, progress=False,
                              window=w)
    assert cap.group == g and cap.rope is not None
    for q, wq in zip(cap.queries, cap.window_queries):  # every position captured: the window is the last w rows
        assert torch.equal(wq, q.reshape(q.shape[0], g, T, -1)[:, :, T - w:].reshape(q.shape[0], g * w, -1))
