"""The bundled SmolLM2-135M end to end: compress a Shakespeare play, load the artifact into transformers,
continue exactly at ratio 1, and do better than eviction at 10x."""
import pytest
import torch
from click.testing import CliRunner

from compactor import load_cache
from compactor.cli import cli
from compactor.capture.documents import bundled_play
from compactor.evaluation.harness import Evaluator
from compactor.methods import make_method
from compactor.pipeline import compact_capture
from compactor.capture.prefill import prefill_and_capture

pytestmark = pytest.mark.slow
T, C = 384, 64


@pytest.fixture(scope="module")
def play_ids(smollm2):
    return smollm2.tokenizer(bundled_play("macbeth").text, return_tensors="pt").input_ids[0][: T + C]


def test_ratio_one_reproduces_full_cache_logits(tmp_path, smollm2, play_ids):
    path = tmp_path / "macbeth.h5"
    r = CliRunner().invoke(cli, ["compress", "--play", "macbeth", "--ratio", "1", "--max-tokens", str(T),
                                 "--dtype", "float32", "-o", str(path), "--quiet", "--max-queries", "512"])
    assert r.exit_code == 0, r.output
    model = smollm2.model
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(play_ids[None]).logits[0, T:]  # one plain forward over prefix + continuation
        cache = load_cache(path, model, smollm2.tokenizer)
        assert cache.get_seq_length() == T
        out = model(play_ids[None, T:], past_key_values=cache).logits[0]
    assert (out - ref).abs().max().item() <= 1e-4


def test_generate_after_compacted_prefix(tmp_path, smollm2):
    path = tmp_path / "m.h5"
    r = CliRunner().invoke(cli, ["compress", "--play", "macbeth", "--ratio", "10", "--max-tokens", str(T),
                                 "-o", str(path), "--quiet", "--max-queries", "512"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["generate", str(path), "--prompt", "\n\nFirst Witch:", "--max-new-tokens", "8"])
    assert r.exit_code == 0, r.output
    assert len(r.output.strip()) > 0


def test_am_beats_baselines_at_10x(smollm2, play_ids):
    cap = prefill_and_capture(smollm2.model, smollm2.tokenizer, play_ids[:T], max_queries=1024, progress=False)
    ev = Evaluator(smollm2.model, smollm2.tokenizer, cap, play_ids, C=C)
    rows = {}
    for name in ("am", "eviction", "streaming", "random"):
        layers, _ = compact_capture(cap, make_method(name), 10, "global", progress=False)
        rows[name] = ev.score(layers, name, 10, 0.0)
    assert rows["am"].ckl < min(rows[n].ckl for n in ("eviction", "streaming", "random"))
    assert rows["am"].out_err < rows["eviction"].out_err
