"""One test matrix over every compaction method (the shared contract), plus what distinguishes each."""
import math

import pytest
import torch

from compactor.fitting.budgets import global_budgets, per_head_budget, uniform_budgets
from compactor.methods import METHODS, make_method

D, T, N = 32, 160, 384
SCALE = D ** -0.5


def head(seed=0, n=N):
    """Keys with a few strongly attended directions, queries drawn near them (peaked, realistic attention)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(T, D, generator=g)
    keys[:4] *= 3  # sink-like keys
    centers = keys[torch.randint(0, T, (8,), generator=g)]
    queries = 2.0 * centers[torch.randint(0, 8, (n,), generator=g)] + torch.randn(n, D, generator=g)
    values = torch.randn(T, D, generator=g)
    return keys, values, queries


def dense(queries, keys, values, beta=None):
    s = SCALE * queries.double() @ keys.double().T
    if beta is not None:
        s = s + beta.double()
    return torch.softmax(s, -1) @ values.double(), torch.logsumexp(s, -1), torch.softmax(s, -1)


def full_context(keys, queries) -> dict:
    """What the pipeline passes a head (compact_capture): every method takes what it uses. Group 1, a 16-query
    observation window, context queries at random positions, RoPE frequencies, reconstruction scores."""
    g = torch.Generator().manual_seed(9)
    window = 2.0 * keys[torch.randint(0, T, (16,), generator=g)] + torch.randn(16, D, generator=g)
    return {"scale": SCALE, "head_id": 3, "window_queries": window, "layer_window": window[None],
            "layer_keys": keys[None], "group": 1, "query_pos": torch.randint(0, T, (queries.shape[0],), generator=g),
            "query_source": torch.zeros(queries.shape[0], dtype=torch.int8),
            "rope": (1.0 / 10000 ** (torch.arange(0, D, 2).float() / D), 1.0),
            "scores": torch.rand(T, generator=g)}


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("budget", [1, 7, 40, T, T + 5])
def test_contract(name, budget):
    keys, values, queries = head()
    out = make_method(name).compact(keys, values, queries, budget, **full_context(keys, queries))
    t = out.keys.shape[0]
    assert 1 <= t <= min(budget, T)
    assert out.values.shape == (t, D) and out.beta.shape == (t,) and out.positions.shape == (t,)
    assert out.beta.dtype == torch.float32 and torch.isfinite(out.beta).all()
    assert torch.isfinite(out.values).all()
    pos = out.positions
    assert (pos[1:] > pos[:-1]).all() and pos.min() >= 0 and pos.max() < T
    if budget >= T:  # identity, exactly
        assert torch.equal(out.values, values) and torch.equal(pos, torch.arange(T)) and (out.beta == 0).all()
    if name == "prototype":  # means of keys and values, beta = log(count) with counts summing to T
        assert t == min(budget, T) and abs(float(out.beta.double().exp().sum()) - T) < 1e-3
        return
    assert torch.equal(out.keys, keys[pos])  # every other method keeps original keys
    if name != "am":
        assert (out.beta == 0).all() and torch.equal(out.values, values[pos])


def test_streaming_keeps_sinks_and_recent_window():
    keys, values, queries = head()
    pos = make_method("streaming").compact(keys, values, queries, 20).positions
    assert pos.tolist() == [0, 1, 2, 3] + list(range(T - 16, T))


def test_random_is_seeded_per_head():
    keys, values, queries = head()
    m = make_method("random", seed=1)
    a = m.compact(keys, values, queries, 30, head_id=0).positions
    assert torch.equal(a, m.compact(keys, values, queries, 30, head_id=0).positions)
    assert not torch.equal(a, m.compact(keys, values, queries, 30, head_id=1).positions)


@pytest.mark.parametrize("score", ["rms", "max"])
def test_eviction_keeps_highest_attention_keys(score):
    keys, values, queries = head(1)
    budget = 25
    p = dense(queries, keys, values)[2]
    ref_score = p.pow(2).mean(0).sqrt() if score == "rms" else p.max(0).values
    expected = torch.topk(ref_score, budget).indices.sort().values
    got = make_method("eviction", score=score).compact(keys, values, queries, budget, scale=SCALE).positions
    assert torch.equal(got, expected)


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_am_beats_eviction_on_heldout_queries(seed):
    keys, values, queries = head(seed, n=2 * N)
    fit, held = queries[:N], queries[N:]
    budget = 16
    am = make_method("am").compact(keys, values, fit, budget, scale=SCALE)
    ev = make_method("eviction").compact(keys, values, fit, budget, scale=SCALE)
    out_full, lse_full, _ = dense(held, keys, values)

    def errors(c):
        out, lse, _ = dense(held, c.keys, c.values.double(), c.beta)
        return float((out - out_full).norm() / out_full.norm()), float((lse - lse_full).exp().sub(1).abs().mean())

    (am_out, am_mass), (ev_out, ev_mass) = errors(am), errors(ev)
    assert am_out < 0.8 * ev_out
    assert am_mass < ev_mass


def test_am_mass_fit_is_the_nnls_optimum_on_fit_queries():
    keys, values, queries = head(5)
    am = make_method("am").compact(keys, values, queries, 30, scale=SCALE)
    _, lse_full, _ = dense(queries, keys, values)
    A = torch.exp(SCALE * queries.double() @ am.keys.double().T - lse_full[:, None])
    w = am.beta.double().exp()
    obj = float(((A @ w - 1) ** 2).sum())
    for trial in range(20):  # no random feasible perturbation does better
        g = torch.Generator().manual_seed(trial)
        w2 = (w * (1 + 0.05 * torch.randn(w.shape, generator=g, dtype=torch.float64))).clamp_min(0)
        assert obj <= float(((A @ w2 - 1) ** 2).sum()) + 1e-12


def test_am_causal_context_respects_positions():
    keys, values, queries = head(6)
    pos = torch.randint(0, T, (N,), generator=torch.Generator().manual_seed(0))
    out = make_method("am", context="causal").compact(keys, values, queries, 30, scale=SCALE, query_pos=pos)
    assert torch.isfinite(out.values).all() and out.keys.shape[0] <= 30


def test_uniform_budgets():
    b = uniform_budgets(3, 2, 100, 7)
    assert b.shape == (3, 2) and (b == math.ceil(100 / 7)).all()
    with pytest.raises(ValueError, match=">= 1"):
        per_head_budget(100, 0.5)
    with pytest.raises(ValueError, match="larger than the document"):
        per_head_budget(100, 101)


def test_global_budgets_total_floor_and_preference():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(4, 3, 200, generator=g)
    scores[1, 2] *= 10  # one head with far larger scores takes more of the shared budget
    b = global_budgets(scores, ratio=10, floor_fraction=0.25)
    t = per_head_budget(200, 10)
    assert int(b.sum()) == 4 * 3 * t
    assert int(b.min()) >= t // 4
    assert int(b[1, 2]) == b.max() and int(b[1, 2]) > t
    assert int(b.max()) <= 200


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("budget", [16, 100])
def test_am_on_cuda_matches_cpu(budget, monkeypatch):
    """The device path (Triton scores, active-set NNLS, Cholesky values on the GPU) gives the CPU result."""
    monkeypatch.setenv("COMPACTOR_TF32", "0")  # IEEE-accurate float32 scores, so the same keys are chosen
    keys, values, queries = head(7, n=2 * N)
    fit, held = queries[:N], queries[N:]
    cpu = make_method("am").compact(keys, values, fit, budget, scale=SCALE)
    gpu = make_method("am").compact(keys.cuda(), values.cuda(), fit.cuda(), budget, scale=SCALE)
    assert torch.equal(gpu.positions.cpu(), cpu.positions)
    # beta and values need not be unique (near-collinear kept keys); the attention they produce must agree
    out_cpu, lse_cpu, _ = dense(held, cpu.keys, cpu.values, cpu.beta)
    out_gpu, lse_gpu, _ = dense(held, gpu.keys.cpu(), gpu.values.cpu(), gpu.beta.cpu())
    out_full, _, _ = dense(held, keys, values)
    assert float((out_gpu - out_cpu).norm() / out_full.norm()) < 1e-3
    assert float((lse_gpu - lse_cpu).abs().max()) < 1e-3


def test_am_ridge_shrinks_values_toward_originals():
    keys, values, queries = head(8)
    weak = make_method("am", ridge=1e-6).compact(keys, values, queries, 20, scale=SCALE)
    strong = make_method("am", ridge=1e6).compact(keys, values, queries, 20, scale=SCALE)
    assert torch.equal(weak.positions, strong.positions)
    assert (strong.values - values[strong.positions]).abs().max() < 1e-3
    assert (weak.values - values[weak.positions]).abs().max() > 0.1


def test_layer_budgets_equal_within_layer_same_total():
    from compactor.fitting.budgets import layer_budgets

    g = torch.Generator().manual_seed(1)
    scores = torch.rand(5, 4, 300, generator=g)
    scores[2] *= 20  # layer 2 attracts budget
    b = layer_budgets(scores, ratio=10, floor_fraction=0.5)
    t = per_head_budget(300, 10)
    assert int(b.sum()) == 5 * 4 * t
    assert ((b.max(1).values - b.min(1).values) <= 1).all()  # equal split (remainder on the first heads)
    assert int(b[2].min()) > t and int(b.min()) >= t // 2
