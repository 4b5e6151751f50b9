"""Calibration: the pure pieces against independent references (TAQG's published example, brute-force cosine and
allocation, DESIGN.md's Lloyd-Max MSE tables), phase boundaries, and the whole pipeline on a tiny model and corpus
(seconds): file, report, plots, resumed stages."""
import itertools
import math

import numpy as np
import pytest
import torch

from compactor.calibrate.allocation import average_bits, greedy_allocation, random_control, taqg_bits
from compactor.calibrate.codebooks import analytic_codebooks, codebook_mse, fit_codebook, rotated_coordinates
from compactor.calibrate.redundancy import mean_pairwise_cosine, windowed_rho
from compactor.capture.phases import find_phases

# DESIGN.md, "Known facts": Lloyd-Max MSE for N(0,1), and d·MSE of the Beta quantizer at d=128, b = 1..4
GAUSS_MSE = [0.363380, 0.117482, 0.034548, 0.009501]
BETA_DMSE_128 = [0.3609, 0.1160, 0.0340, 0.00931]


def test_taqg_published_example_and_edges():
    assert taqg_bits(0.544, 0.463, 4) == 3  # the paper's DeepSeek-R1-Distill-1.5B numbers
    assert taqg_bits(0.463, 0.544, 4) == 4  # rho_H <= rho_L: no gap
    assert taqg_bits(0.5, 0.5, 4) == 4
    assert taqg_bits(0.5001, 0.5, 4) == 3  # the rule's floor(log2(ratio + 1)) >= 1 as soon as rho_H > rho_L
    assert taqg_bits(0.9, 0.1, 4) == 1     # (0.9/0.1) + 1 = 10: gap 3
    assert taqg_bits(0.99, 0.0, 4) == 1    # gap 6, clipped at 1 bit


def test_mean_pairwise_cosine_against_the_pair_matrix():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 37, 16, generator=g) + torch.randn(1, 1, 1, 16, generator=g)
    x[0, 0, 5] = 0  # a zero vector has no direction: its pairs count as cosine 0
    got = mean_pairwise_cosine(x)
    u = x.double() / x.double().norm(dim=-1, keepdim=True).clamp_min(1e-300)
    cos = u @ u.transpose(-1, -2)
    n = x.shape[-2]
    iu = torch.triu_indices(n, n, 1)
    want = cos[..., iu[0], iu[1]].mean(-1)
    assert torch.allclose(got, want, atol=1e-12)
    w = windowed_rho(x, 8)  # 4 windows of 8, the last 5 vectors left out
    want = torch.stack([mean_pairwise_cosine(x[..., i * 8:(i + 1) * 8, :]) for i in range(4)]).mean(0)
    assert torch.allclose(w, want, atol=1e-12)
    assert torch.isnan(windowed_rho(x[..., :5, :], 8)).all()


def test_mean_pairwise_cosine_falls_with_length_on_a_drifting_sequence():
    """Why length-matched windows: a slowly drifting direction has high local and low global redundancy."""
    t = torch.linspace(0, 3 * math.pi, 400)
    x = torch.stack([torch.cos(t), torch.sin(t), 0.3 * torch.ones_like(t)], -1)
    assert mean_pairwise_cosine(x[:50]) > 0.85 > 0.2 > mean_pairwise_cosine(x)
    assert windowed_rho(x, 50) > 0.85


def test_greedy_allocation_is_optimal_for_convex_costs():
    """Against exhaustive search: with convex costs, one-bit steps and equal unit sizes (marginal analysis is exact
    there), no allocation within the bits greedy used costs less."""
    rng = np.random.default_rng(0)
    options = [2, 3, 4, 5, 6]
    for trial in range(20):
        U = 4
        scale = rng.uniform(0.1, 10, size=U)
        cost = scale[:, None] * 4.0 ** -np.array(options)[None, :] * rng.uniform(0.9, 1.1, size=(U, 1))
        counts = np.ones(U)
        avg = rng.uniform(2.2, 5.5)
        bits = greedy_allocation(cost, options, counts, avg)
        assert average_bits(bits, counts) <= avg + 1e-9
        got = sum(cost[u, options.index(b)] for u, b in enumerate(bits))
        best = min(sum(cost[u, options.index(b)] for u, b in enumerate(combo))
                   for combo in itertools.product(options, repeat=U) if sum(combo) <= bits.sum())
        assert got <= best + 1e-15, (trial, bits)


def test_greedy_skips_bits_that_do_not_help_and_refuses_an_impossible_budget():
    cost = np.array([[1.0, 1.0, 0.5, 0.5], [1.0, 0.2, 0.1, 0.05]])
    bits = greedy_allocation(cost, [2, 3, 4, 5], np.array([10, 10]), 10)
    assert bits.tolist() == [4, 5]  # unit 0 never takes 3 (no gain) nor 5 (no gain over 4)
    with pytest.raises(ValueError, match="below the fewest"):
        greedy_allocation(cost, [2, 3, 4, 5], np.array([1, 1]), 1.5)


def test_random_control_keeps_the_bits_moves_the_tokens():
    bits = np.array([[[4] * 30 + [3] * 70, [2] * 50 + [6] * 50]])
    ctl = random_control(bits, seed=1)
    assert ctl.shape == bits.shape
    for a, b in zip(bits.reshape(-1, 100), ctl.reshape(-1, 100)):
        assert sorted(a) == sorted(b) and not np.array_equal(a, b)


def test_beta_and_gaussian_codebooks_match_the_published_mse_tables():
    """Coordinates of uniform random unit vectors (rotated Gaussian vectors) in d=128: the Beta codebook's MSE is the
    published d·MSE / d, a codebook fitted to them does as well, and N(0,1) samples give the Gaussian table."""
    g = torch.Generator().manual_seed(0)
    coords = rotated_coordinates(torch.randn(1, 6000, 128, generator=g), seed=3)
    gauss = torch.randn(400_000, generator=g)
    for b in range(1, 5):
        books = analytic_codebooks(b, 128)
        assert codebook_mse(coords, books["beta"]) * 128 == pytest.approx(BETA_DMSE_128[b - 1], rel=0.02)
        fitted = fit_codebook(coords[: len(coords) // 2], b, 128)
        assert codebook_mse(coords[len(coords) // 2:], fitted) * 128 == pytest.approx(BETA_DMSE_128[b - 1], rel=0.03)
        gaussian = books["gaussian"] * math.sqrt(128)  # back to unit variance
        assert codebook_mse(gauss, gaussian) == pytest.approx(GAUSS_MSE[b - 1], rel=0.02)


def test_fitted_codebook_beats_beta_on_keys_with_an_outlier_channel():
    """Keys whose energy sits in a few channels are not uniform directions: their rotated coordinates cluster, and
    a fitted codebook has a clearly lower held-out error than the Beta one."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3000, 64, generator=g)
    x[..., 3] *= 30
    coords = rotated_coordinates(x)
    half = len(coords) // 2
    for b in (2, 3):
        fitted = fit_codebook(coords[:half], b, 64)
        assert np.all(np.diff(fitted) > 0) and np.abs(fitted).max() <= 1
        beta = analytic_codebooks(b, 64)["beta"]
        assert codebook_mse(coords[half:], fitted) < 0.8 * codebook_mse(coords[half:], beta)


def test_find_phases(tiny_llama):
    from compactor.models import load_model

    tok = load_model(str(tiny_llama)).tokenizer
    text = "Question: why? <think>\nbecause the fox</think>\nThe answer is the dog."
    ph = find_phases(text, tok, add_special_tokens=False)
    offsets = tok(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    assert ph.methods == ("marker", "marker") and ph.by_markers
    b1, b2 = ph.bounds[1], ph.bounds[2]
    assert offsets[b1 - 1][1] <= text.index("<think>") + 7 <= offsets[b1][0]
    assert offsets[b2 - 1][1] <= text.index("</think>") + 8 <= offsets[b2][0] and ph.bounds[-1] == len(offsets)
    plain = find_phases("no markers in this text at all, just words", tok, fallback_fraction=0.5,
                        add_special_tokens=False)
    n = plain.bounds[-1]
    assert plain.methods == ("fallback", "fallback") and plain.bounds == (0, 0, round(0.5 * n), n)
    only_close = find_phases("thinking here</think>answer", tok, add_special_tokens=False)
    assert only_close.methods == ("fallback", "marker") and only_close.bounds[1] == 0
    assert find_phases(text, tok, add_special_tokens=False).clipped(5).bounds[-1] == 5


@pytest.fixture(scope="module")
def tiny_calibration(tmp_path_factory, tiny_llama):
    from conftest import CORPUS
    from compactor.calibrate import Settings, calibrate
    from compactor.models import load_model

    root = tmp_path_factory.mktemp("calib")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"d{i}.txt").write_text((CORPUS * 3)[i * 7:])
    lm = load_model(str(tiny_llama))
    s = Settings(docs=2, doc_tokens=80, continuation=12, traces=3, heldout_traces=1, think_tokens=16,
                 answer_tokens=24, min_answer_tokens=16, trace_continuation=8, window=8, codebook_bits=(2, 3),
                 bit_options=(2, 4, 8), avg_bits=(3.0, 4.0), weight_docs=1, head_ratio=4.0, check_ratio=4.0,
                 max_queries=32)
    path, md = calibrate(lm, str(corpus), None, str(root / "out" / "tiny.h5"), None, s, progress=False)
    return lm, s, corpus, root, path, md


def test_tiny_calibration_writes_a_valid_file_and_report(tiny_calibration):
    from compactor.storage.calibration_file import check_calibration_model, read_calibration

    lm, s, _, _, path, md = tiny_calibration
    cal = read_calibration(path)
    check_calibration_model(cal, lm)
    assert cal.arrays["bits_phases"].shape == (2, 2, 3, 2) and cal.arrays["head_weights"].shape == (2, 2)
    summary = cal.meta["summary"]
    assert sum(summary["boundaries"].values()) == 2 * summary["traces"]
    assert {r["policy"] for r in summary["policies"]} >= {"TAQG", "TAQG: random-token control",
                                                         "measured, per layer and phase"}
    taqg = next(r for r in summary["policies"] if r["policy"] == "TAQG")
    control = next(r for r in summary["policies"] if r["policy"] == "TAQG: random-token control")
    assert taqg["avg_bits"] == pytest.approx(control["avg_bits"])  # the control spends exactly the same bits
    # the check ran once per preset: each preset's defaults keep a part only where it lowered that preset's cKL
    rows = {r["config"]: r["ckl"] for r in summary["check"]}
    split = cal.meta["defaults_split"]
    assert split["budget"] == "split" and cal.meta["defaults"]["budget"] in ("layer", "global")
    assert any(k.startswith("fast: ") for k in rows) and "quality: + head budgets (split)" in rows
    before = [v for k, v in rows.items() if k.startswith("quality: ") and "head budgets" not in k]
    heads = {k: v for k, v in rows.items() if k.startswith("quality: + head budgets")}
    assert set(heads) == {"quality: + head budgets (split)", "quality: + head budgets (split, weights^0.5)",
                          "quality: + head budgets (split, weights^0.25)"}
    assert split["head_budgets"] == (min(heads.values()) < min(before))
    if split["head_budgets"]:  # the power of the best tempered row
        best = min(heads, key=heads.get)
        assert split["head_power"] == (float(best.split("^")[1].rstrip(")")) if "^" in best else 1.0)
    text = md.read_text()
    for part in ("Phase boundaries", "Redundancy", "length-matched", "Codebooks", "TAQG", "Defaults"):
        assert part.lower() in text.lower()
    for png in ("rho.png", "mse.png", "budgets.png"):
        assert (md.parent / png).stat().st_size > 1000


def test_rerun_resumes_finished_stages(tiny_calibration):
    from dataclasses import replace

    from compactor.calibrate import calibrate
    from compactor.storage.calibration_file import read_calibration

    lm, s, corpus, root, path, _ = tiny_calibration
    first = read_calibration(path)
    again, _ = calibrate(lm, str(corpus), None, str(path), None, s, progress=False)
    summary = read_calibration(again).meta["summary"]
    assert summary["resumed_stages"] == ["traces", "rho", "codebooks", "costs", "weights", "allocation", "policies",
                                         "heads", "check"]
    assert np.array_equal(read_calibration(again).arrays["bits_phases"], first.arrays["bits_phases"])
    changed, _ = calibrate(lm, str(corpus), None, str(root / "out2" / "tiny.h5"), None,
                           replace(s, window=4), progress=False, cache_dir=str(path.parent / ".stages" / "tiny"))
    resumed = read_calibration(changed).meta["summary"]["resumed_stages"]
    assert "traces" in resumed and "rho" not in resumed  # only what depends on the window is redone


def test_batched_quantizer_matches_the_stored_codec():
    """calibrate's batched lloyd round trip equals kv_codec's per-head stored path (float32 storage), with the Beta
    codebook and with a fitted one, exact rows by importance and by position."""
    from compactor.calibrate.distortion import lloyd, quantize_heads
    from compactor.storage.kv_codec import roundtrip_tensor

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 40, 16, generator=g) * torch.linspace(0.2, 3, 16) + 0.5
    imp = torch.rand(3, 40, generator=g)
    book = np.sort(np.random.default_rng(0).uniform(-0.9, 0.9, 8)).astype(np.float32)
    for spec in (lloyd(3, None), lloyd(3, book)):
        for importance in (None, imp):
            got = quantize_heads(x, spec, importance, seed=7)
            for h in range(3):
                want = roundtrip_tensor(x[h], spec[0], "float32", 7, None if importance is None else importance[h],
                                        spec[1])
                assert torch.allclose(got[h], want, atol=1e-5), (spec[0], importance is None, h)
