"""Quality-mode levers (issue 9) against independent references: reconstruction probe scores against the model's own
eager attention and finite differences, key scores, weighted fits against row duplication / an augmented lstsq, OMP
against a plain loop with scipy NNLS, query sources, on-policy queries."""
import numpy as np
import pytest
import torch
from scipy.optimize import nnls
from transformers import DynamicCache

from compactor.capture.prefill import CONTEXT, RANDOM, REPEAT, SELF_STUDY, prefill_and_capture
from compactor.capture.query_sources import SELF_STUDY_PROMPT
from compactor.capture.reconstruction import FIRST_PROMPT, _chunks, doc_weights, reconstruction_scores
from compactor.evaluation.metrics import RECALL_CUE
from compactor.fitting import key_scores
from compactor.fitting.beta_fit import fit_mass_weights
from compactor.fitting.value_fit import fit_values
from compactor.methods import make_method
from compactor.models import load_model

from test_methods import SCALE, head


def _ids(lm, text, n):
    return lm.tokenizer(text, return_tensors="pt").input_ids[0][:n]


def test_probe_weights_are_the_models_own_attention(tiny_llama, doc_text):
    """recon = max over replay positions of the eager attention probabilities on the document keys."""
    lm = load_model(str(tiny_llama))
    ids = _ids(lm, doc_text, 70)
    cap = prefill_and_capture(lm.model, lm.tokenizer, ids, max_queries=64, progress=False)
    got = reconstruction_scores(lm.model, lm.tokenizer, ids, cap.keys, cap.values, chunk_size=30)
    cfg = lm.config
    ref = torch.zeros(cfg.num_hidden_layers, cfg.num_attention_heads, 70)
    lm.model.set_attn_implementation("eager")
    for s, e, replay in _chunks(ids, 30, lm.tokenizer):
        cache = DynamicCache(config=cfg)
        with torch.no_grad():
            lm.model(ids[None], past_key_values=cache, use_cache=True)
            out = lm.model(replay[None], past_key_values=cache, use_cache=True, output_attentions=True,
                           position_ids=torch.arange(70, 70 + replay.numel())[None])
        for l, a in enumerate(out.attentions):
            ref[l] = torch.maximum(ref[l], a[0, :, :, :70].amax(1))
    lm.model.set_attn_implementation("sdpa")
    assert torch.allclose(got["recon"], ref, atol=1e-5)
    # wo_norm: ||W_O^(h) v|| through the model's own o_proj with every other head's slice zeroed
    l, h = 1, 3
    attn = lm.model.model.layers[l].self_attn
    d = attn.head_dim
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    x = torch.zeros(70, cfg.num_attention_heads * d)
    x[:, h * d:(h + 1) * d] = cap.values[l][h // g]
    with torch.no_grad():
        assert torch.allclose(got["wo_norm"][l, h], attn.o_proj(x).norm(dim=-1), rtol=1e-4, atol=1e-5)


def test_probe_gradient_score_matches_autograd_and_finite_differences(tiny_llama, doc_text):
    """recon_grad[l, h, c] = max_p p_hpc * ||dPhi/da_p||: the weights from the model's eager attention, the gradient
    from a separate autograd pass, itself checked by a central difference along its direction."""
    lm = load_model(str(tiny_llama))
    ids = _ids(lm, doc_text, 40)
    cap = prefill_and_capture(lm.model, lm.tokenizer, ids, max_queries=32, progress=False)
    got = reconstruction_scores(lm.model, lm.tokenizer, ids, cap.keys, cap.values, gradient=True, chunk_size=64)
    (_, _, replay), = _chunks(ids, 64, lm.tokenizer)
    cfg, layer, p = lm.config, 0, 5
    pos = torch.arange(40, 40 + replay.numel())[None]
    model = lm.model.model

    def doc_cache():
        cache = DynamicCache(config=cfg)
        for i, (k, v) in enumerate(zip(cap.keys, cap.values)):
            cache.update(k[None].clone(), v[None].clone(), i)
        return cache

    def run(delta=None, grad=False, attentions=False):
        """Phi = sum ||h^L||^2 (last decoder layer, before the final norm); optionally a_p += delta at layer 0."""
        seen = {}

        def at_attn(m, a, o):
            out = o[0]
            if delta is not None:
                out = out.clone()
                out[0, p] += delta
            if grad:
                out.retain_grad()
            seen["a"] = out
            return (out, *o[1:])

        hooks = [model.layers[layer].self_attn.register_forward_hook(at_attn),
                 model.layers[-1].register_forward_hook(lambda m, a, o: seen.setdefault("h", o[0] if isinstance(
                     o, tuple) else o))]
        try:
            with torch.set_grad_enabled(grad):
                out = model(replay[None], position_ids=pos, past_key_values=doc_cache(), output_attentions=attentions)
                phi = seen["h"].double().square().sum()
                if grad:
                    phi.backward()
        finally:
            for h in hooks:
                h.remove()
        return phi.item(), seen, out

    _, seen, _ = run(grad=True)
    G = seen["a"].grad[0].double().norm(dim=-1)  # (q,)
    u = seen["a"].grad[0, p] / seen["a"].grad[0, p].norm()
    eps = 1e-3
    fd = (run(eps * u)[0] - run(-eps * u)[0]) / (2 * eps)
    assert abs(fd - float(G[p])) < 1e-2 * float(G[p])
    lm.model.set_attn_implementation("eager")
    _, _, out = run(attentions=True)
    lm.model.set_attn_implementation("sdpa")
    w = out.attentions[layer][0, :, :, :40].double()  # (Hq, q, T)
    ref = (w * G[None, :, None]).amax(1)
    assert torch.allclose(got["recon_grad"][layer].double(), ref, rtol=1e-3, atol=1e-6)


def test_doc_weights_normalise_over_the_replay_too():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 5, 8, generator=g), torch.randn(2, 10 + 5, 8, generator=g)
    p = doc_weights(q, k, 0.5, 10)
    s = 0.5 * q @ k.repeat_interleave(2, 0).transpose(1, 2)
    for i in range(5):  # replay row i sees the 10 document keys and replay keys 0..i
        ref = torch.softmax(s[:, i, :10 + i + 1], -1)[:, :10]
        assert torch.allclose(p[:, i], ref, atol=1e-6)
    assert (p.sum(-1) < 1).all()


def test_key_scores_pool_the_group_after_the_products():
    g = torch.Generator().manual_seed(1)
    recon, grad, wo = torch.rand(6, 20, generator=g), torch.rand(6, 20, generator=g), torch.rand(6, 20, generator=g)
    assert torch.equal(key_scores.kvzip(recon, 2), torch.stack([recon[:3].amax(0), recon[3:].amax(0)]))
    ref = torch.stack([(grad * wo)[:3].amax(0), (grad * wo)[3:].amax(0)])
    assert torch.equal(key_scores.kvgrad(grad, wo, 2), ref)
    # the mix does not depend on either score's units
    a, b = torch.rand(3, 2, 20, generator=g), torch.rand(3, 2, 20, generator=g)
    assert torch.allclose(key_scores.geometric_mix(a, b), key_scores.geometric_mix(7 * a, 0.01 * b), rtol=1e-5)
    with pytest.raises(ValueError, match="probe"):
        key_scores.all_scores("kvzip", None, None, 2)


def test_weighted_beta_fit_equals_duplicated_rows():
    g = torch.Generator().manual_seed(2)
    A = torch.rand(60, 8, generator=g, dtype=torch.float64) ** 3
    u = torch.randint(1, 4, (60,), generator=g).double()
    dup = A.repeat_interleave(u.long(), 0)
    ref, _ = nnls(dup.numpy(), np.ones(dup.shape[0]))
    assert np.allclose(fit_mass_weights(A, weights=u).numpy(), ref, atol=1e-8)


def test_value_fit_with_weights_and_anchor_matches_augmented_lstsq():
    g = torch.Generator().manual_seed(3)
    P = torch.softmax(torch.randn(50, 6, generator=g, dtype=torch.float64), -1)
    O, V0 = torch.randn(50, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    u, anchor = torch.rand(50, generator=g, dtype=torch.float64), torch.rand(6, generator=g, dtype=torch.float64) * 5
    X = fit_values(P, O, V0, ridge=1e-2, weights=u, anchor=anchor)
    unit = float(torch.trace(P.T @ (P * u[:, None]))) / 6
    lam = 1e-2 * unit + 1e-12 + unit * anchor
    lhs = torch.cat([P * u.sqrt()[:, None], torch.diag(lam.sqrt())])
    rhs = torch.cat([O * u.sqrt()[:, None], lam.sqrt()[:, None] * V0])
    assert torch.allclose(X, torch.linalg.lstsq(lhs, rhs).solution, atol=1e-9)


def test_am_options_keep_keys_and_values():
    keys, values, queries = head()
    base = make_method("am").compact(keys, values, queries, 40, scale=SCALE)
    floor = make_method("am", beta_floor=-6.0).compact(keys, values, queries, 40, scale=SCALE)
    assert floor.keys.shape[0] == 40 and (floor.beta >= -6.0 - 1e-6).all()
    assert base.keys.shape[0] <= 40
    plain = make_method("am", value_fit="none").compact(keys, values, queries, 40, scale=SCALE)
    assert torch.equal(plain.values, values[plain.positions])
    src = torch.tensor([CONTEXT] * 200 + [REPEAT] * (queries.shape[0] - 200), dtype=torch.int8)
    m = make_method("am", source_weights={"repeat": 4.0})
    u = m.query_weights({"query_source": src})
    assert u[:200].eq(1).all() and u[200:].eq(4).all()
    weighted = m.compact(keys, values, queries, 40, scale=SCALE, query_source=src)
    assert torch.isfinite(weighted.values).all()
    with pytest.raises(ValueError, match="source"):
        make_method("am", source_weights={"recall": 1.0})
    check = make_method("am", value_fit="check").compact(keys, values, queries, 40, scale=SCALE)
    sel = make_method("am", value_fit="select").compact(keys, values, queries, 40, scale=SCALE)
    evicted = make_method("eviction").compact(keys, values, queries, 40, scale=SCALE)
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b))  # noqa: E731
    assert same(sel, check) or same(sel, evicted)
    omp = make_method("am", selection="omp", omp_keys=4, omp_refit=2).compact(keys, values, queries, 40, scale=SCALE)
    assert omp.keys.shape[0] <= 40


def test_query_sources_are_labelled_and_capped(tiny_llama, doc_text):
    lm = load_model(str(tiny_llama))
    ids = _ids(lm, doc_text, 120)
    cap = prefill_and_capture(lm.model, lm.tokenizer, ids, max_queries=96, progress=False, self_study=2,
                              sources={"context": 1, "repeat": 1, "self_study": 1, "random": 1})
    counts = {s: int((cap.query_source == s).sum()) for s in (CONTEXT, REPEAT, SELF_STUDY, RANDOM)}
    assert counts[RANDOM] == 24 and counts[REPEAT] == 24 and 0 < counts[SELF_STUDY] <= 24
    assert sum(counts.values()) == cap.queries[0].shape[1] <= 96 + 2
    assert (cap.query_pos[cap.query_source != CONTEXT] == 119).all()
    rnd = cap.queries[0][:, cap.query_source == RANDOM]
    other = cap.queries[0][:, cap.query_source != RANDOM]
    assert rnd.norm(dim=-1).max() <= other.norm(dim=-1).max() + 1e-4


def test_probes_never_use_the_recall_cue(tiny_llama):
    """The evaluation's recall cue is not among the prompts that produce reference queries or probe scores."""
    cue = RECALL_CUE.strip()
    for prompt in (FIRST_PROMPT, SELF_STUDY_PROMPT):
        assert cue not in prompt and "Recite" not in prompt


def test_on_policy_queries_change_only_repeat_rows_of_later_groups(tiny_llama, doc_text):
    from compactor.capture.on_policy import OnPolicyQueries
    from compactor.pipeline import compact_capture

    lm = load_model(str(tiny_llama))  # 2 layers: groups {0}, {1}
    ids = _ids(lm, doc_text, 100)
    cap = prefill_and_capture(lm.model, lm.tokenizer, ids, max_queries=64, progress=False)
    before = [q.clone() for q in cap.queries]
    op = OnPolicyQueries(lm.model, cap, groups=2)
    layers, _ = compact_capture(cap, make_method("am"), 1.0, "uniform", progress=False, on_policy=op)
    # ratio 1: earlier layers are the identity, so the refreshed queries equal the captured ones
    assert op.passes == 1 and torch.allclose(op.capture.queries[1], before[1], atol=1e-4)
    op = OnPolicyQueries(lm.model, cap, groups=2)
    compact_capture(cap, make_method("am"), 8.0, "uniform", progress=False, on_policy=op)
    rep = cap.query_source == REPEAT
    q1 = op.capture.queries[1]
    assert torch.equal(q1[:, ~rep], before[1][:, ~rep]) and not torch.allclose(q1[:, rep], before[1][:, rep])
    assert torch.equal(op.capture.queries[0], before[0]) and torch.equal(cap.queries[1], before[1])


def test_split_budgets_keep_the_total_and_rank_first_choices_on_top():
    from compactor.fitting.budgets import layer_budgets, split_budgets

    g = torch.Generator().manual_seed(6)
    first, second = torch.rand(5, 3, 120, generator=g), torch.rand(5, 3, 120, generator=g) ** 6
    budgets, ranked = split_budgets(first, second, 10, share=0.5, floor_fraction=0.75)
    assert int(budgets.sum()) == 5 * 3 * 12
    b_first = layer_budgets(first, 20, 0.75)  # half the total by the first score, layer budgets
    for l in range(5):
        for h in range(3):
            top = torch.topk(first[l, h], int(b_first[l, h])).indices
            assert torch.isinf(ranked[l, h, top]).all() and int(torch.isinf(ranked[l, h]).sum()) == top.numel()
    ones, _ = split_budgets(first, second, 1.0)
    assert (ones == 120).all()  # ratio 1 keeps everything
    full, _ = split_budgets(first, second, 10, share=1.0)
    assert torch.equal(full, layer_budgets(first, 10, 0.75))
    # the two parts round up separately; the sum never exceeds ceil(T / ratio) per head, nor cuts the first part
    for T, ratio, share in [(70, 4, 0.25), (70, 3, 0.5), (121, 7, 0.25), (33, 5, 0.75)]:
        f, s = torch.rand(4, 3, T, generator=g), torch.rand(4, 3, T, generator=g) ** 6
        b, _ = split_budgets(f, s, ratio, share=share)
        total = 4 * 3 * -(-T // ratio)
        n_first = round(share * total)
        assert total - 4 * 3 <= int(b.sum()) <= total, (T, ratio, share)
        assert (b >= layer_budgets(f, 4 * 3 * T / n_first, 0.75)).all()


def test_sensitivity_units_and_weights(tiny_llama, doc_text):
    from compactor.evaluation.harness import Evaluator
    from compactor.evaluation.sensitivity import measure_sensitivity, sensitivity_weights

    lm = load_model(str(tiny_llama))
    ids = _ids(lm, doc_text, 200)
    cap = prefill_and_capture(lm.model, lm.tokenizer, ids[:150], max_queries=64, progress=False)
    ev = Evaluator(lm.model, lm.tokenizer, cap, ids, C=40, span_len=16)
    sens = measure_sensitivity(ev, make_method("eviction"), 4.0, "global", 0.0, unit="layer", progress=False)
    assert sens.d_ckl.shape == (2, 2) and torch.isfinite(sens.d_ckl).all()
    assert torch.equal(sens.d_ckl[:, 0], sens.d_ckl[:, 1])  # a layer unit: its heads share the numbers
    w = sensitivity_weights(sens)
    assert w.shape == (2, 2) and (w > 0).all()
    one = measure_sensitivity(ev, make_method("eviction"), 4.0, "global", 0.0, unit="head", shrink=0.0,
                              progress=False)
    assert one.d_ckl.shape == (2, 2) and torch.isfinite(one.d_ret).all()


def test_beta_ridge_matches_augmented_nnls():
    g = torch.Generator().manual_seed(7)
    A = torch.rand(50, 10, generator=g, dtype=torch.float64) ** 3
    mu = 0.1 * float(torch.trace(A.T @ A)) / 10
    aug = np.vstack([A.numpy(), np.sqrt(mu) * np.eye(10)])
    y = np.concatenate([np.ones(50), np.sqrt(mu) * np.ones(10)])
    ref, _ = nnls(aug, y)
    assert np.allclose(fit_mass_weights(A, ridge=0.1).numpy(), ref, atol=1e-10)


def test_presets_are_recorded_and_explicit_options_win(tmp_path, tiny_llama, doc_text):
    from click.testing import CliRunner

    from compactor.cli import cli
    from compactor.pipeline import PRESETS
    from compactor.storage.artifact import read_meta

    doc = tmp_path / "story.txt"
    doc.write_text(doc_text)

    def compress(*extra):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}.h5"
        r = CliRunner().invoke(cli, ["compress", str(doc), "--model", str(tiny_llama), "--ratio", "4", "-o",
                                     str(out), "--quiet", "--max-queries", "128", *extra])
        assert r.exit_code == 0, r.output
        return read_meta(out)["method_params"]

    q = compress("--preset", "quality")
    for key, value in {**PRESETS["quality"]["options"], **PRESETS["quality"]["method"]}.items():
        assert q["query_sources" if key == "sources" else key] == value, key
    assert q["preset"] == "quality" and q["probe"] == "gradient"
    assert q["query_sources"] == {"context": 0.25, "repeat": 0.75}
    f = compress("--preset", "fast")
    assert (f["score"], f["budget"], f["budget_floor"], f["probe"]) == ("rms", "layer", 0.75, "none")
    assert f["query_sources"] == {"context": 0.5, "repeat": 0.5}
    o = compress("--preset", "quality", "--budget", "layer", "--score", "kvzip", "--query-sources",
                 "context=1,repeat=1,random=0.5", "--beta-floor", "-4")
    assert (o["budget"], o["score"], o["probe"], o["beta_floor"]) == ("layer", "kvzip", "attention", -4.0)
    assert o["query_sources"] == {"context": 0.4, "repeat": 0.4, "random": 0.2}
    r = CliRunner().invoke(cli, ["compress", str(doc), "--model", str(tiny_llama), "--query-sources", "recall=1",
                                 "-o", str(tmp_path / "bad.h5")])
    assert r.exit_code != 0 and "Error:" in r.output and not (tmp_path / "bad.h5").exists()


def test_compress_api_records_each_presets_options(tiny_llama, doc_text):
    """`compactor.compress` (pipeline.compress_to_cache) with preset="fast", with no preset (DEFAULT_PRESET) and with
    explicit overrides: the artifact's method_params hold the preset's options and the probe its score needs."""
    import compactor
    from compactor.pipeline import DEFAULT_PRESET, PRESETS

    lm = load_model(str(tiny_llama))
    run = dict(ratio=4, max_queries=64, max_tokens=100)
    probe = {"fast": "none", "quality": "gradient"}
    for name, given in (("fast", {"preset": "fast"}), (DEFAULT_PRESET, {})):
        cache = compactor.compress(doc_text, lm.model, lm.tokenizer, **run, **given)
        meta = cache.artifact.meta
        p = meta["method_params"]
        assert p["preset"] == name and p["probe"] == probe[name]
        for key, value in {**PRESETS[name]["options"], **PRESETS[name]["method"]}.items():
            assert p["query_sources" if key == "sources" else key] == value, (name, key)
        assert meta["method"] == "am" and meta["T"] == 100 and meta["budget_total"] == 25 * len(cache.layers) * 2
    p = compactor.compress(doc_text, lm.model, lm.tokenizer, **run, preset="quality", value_fit="all",
                           budget="layer").artifact.meta["method_params"]
    assert (p["value_fit"], p["budget"], p["score"], p["beta_ridge"], p["split_share"]) == \
        ("all", "layer", "kvgrad", 0.01, None)
