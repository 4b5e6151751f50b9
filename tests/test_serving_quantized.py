"""Serving a compacted cache as stored (`load_cache(..., keep_quantized=True)`): the ragged prefix keeps its codes,
the "compactor" attention runs the ragged kernel (its torch reference on CPU), and a model served that way gives the
logits and the generations of the same artifact loaded dequantized and padded (transformers' sdpa with a beta bias).
Memory is measured from the tensors the loaded cache holds and compared with the artifact's stored arrays.

On CUDA (the GPU run) the same tests run the Triton kernel in bfloat16; on CPU, in float32 through the reference.
"""
import numpy as np
import pytest
import torch

import compactor
from compactor.errors import ArtifactError
from compactor.models import load_model
from compactor.serving.cache import RaggedLayer
from compactor.serving.loader import keep_quantized_default
from compactor.storage.artifact import read_artifact

from conftest import make_tiny_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
# logits: float32 on CPU differ only by summation order; bf16 on CUDA by the dot operands' rounding
LOGIT_TOL = 2e-4 if DTYPE == torch.float32 else 6e-2
CODECS = ["16", "K4V4", "K3V2", "q4_0", "Kq8_0V4"]


@pytest.fixture(scope="module")
def lm32(tmp_path_factory):
    """A tiny Llama with head_dim 32 (q4_0/q8_0 need blocks of 32), 4 query / 2 KV heads."""
    folder = make_tiny_model(tmp_path_factory.mktemp("tiny-d32") / "llama", "llama", seed=3, head_dim=32)
    lm = load_model(str(folder))
    lm.model.to(device=DEVICE, dtype=DTYPE)
    return lm


@pytest.fixture(scope="module")
def artifacts(lm32, doc_text, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized-artifacts")
    out = {}
    for bits in CODECS:
        # budget "global": the heads of a layer keep different numbers of entries (ragged)
        cache = compactor.compress(doc_text, lm32.model, lm32.tokenizer, ratio=4, max_queries=256, kv_bits=bits,
                                   budget="global")
        out[bits] = cache.save(root / f"{bits}.h5")
    return out


def _both(lm, path):
    padded = compactor.load_cache(path, lm.model, lm.tokenizer, keep_quantized=False)
    ragged = compactor.load_cache(path, lm.model, lm.tokenizer, keep_quantized=True)
    assert not padded.keeps_quantized and ragged.keeps_quantized
    assert all(isinstance(layer, RaggedLayer) for layer in ragged.layers)
    return padded, ragged


@pytest.mark.parametrize("bits", CODECS)
def test_logits_match_the_dequantized_cache(lm32, artifacts, bits):
    padded, ragged = _both(lm32, artifacts[bits])
    lengths = [layer.prefix.lengths for layer in ragged.layers]
    assert any(len(set(h)) > 1 for h in lengths), f"expected ragged heads, got {lengths}"
    ids = lm32.tokenizer("The lazy dog jumps over the quick brown fox.", return_tensors="pt").input_ids.to(DEVICE)
    with torch.no_grad():
        ref = lm32.model(ids, past_key_values=padded).logits.float()
        got = lm32.model(ids, past_key_values=ragged).logits.float()
        assert ragged.get_seq_length() == padded.get_seq_length() == ragged.logical_length + ids.shape[1]
        # then decode steps: appended tokens on both sides
        for tok in (5, 17, 42):
            step = torch.tensor([[tok]], device=DEVICE)
            ref = torch.cat([ref, lm32.model(step, past_key_values=padded).logits.float()], 1)
            got = torch.cat([got, lm32.model(step, past_key_values=ragged).logits.float()], 1)
    assert (got - ref).abs().max().item() < LOGIT_TOL * max(1.0, ref.abs().max().item())


def test_generate_batch_and_fork_match(lm32, artifacts):
    padded, ragged = _both(lm32, artifacts["K4V4"])
    tok = lm32.tokenizer
    tok.padding_side = "left"
    prompts = ["The quick brown fox", "A lazy dog jumps over the quick brown fox and"]
    batch = tok(prompts, return_tensors="pt", padding=True).to(DEVICE)
    assert (batch.attention_mask == 0).any(), "the batch must be left-padded"
    kw = dict(max_new_tokens=12, do_sample=False)
    ref = lm32.model.generate(**padded.generation_inputs(batch), **kw)
    got = lm32.model.generate(**ragged.generation_inputs(batch), **kw)
    assert torch.equal(got, ref)
    assert ragged.layers[0].appended == 0  # generate ran on a fork
    # an explicit fork: appending to it leaves the original as it was, and both agree with the padded cache
    fork = ragged.fork()
    one = torch.tensor([[7, 8, 9]], device=DEVICE)
    with torch.no_grad():
        a = lm32.model(one, past_key_values=fork).logits.float()
        b = lm32.model(one, past_key_values=ragged.fork()).logits.float()
        c = lm32.model(one, past_key_values=padded.fork()).logits.float()
    assert fork.layers[0].appended == 3 and ragged.layers[0].appended == 0
    assert torch.equal(a, b)
    assert (a - c).abs().max().item() < LOGIT_TOL * max(1.0, c.abs().max().item())


@pytest.mark.parametrize("bits", ["16", "K4V4", "q4_0"])
def test_served_bytes_are_the_stored_bytes(lm32, artifacts, bits):
    """Measured bytes of the ragged cache = the stored per-layer arrays (codes, gains, means, beta) + a stated
    fixed overhead: int32 offsets (Hkv+1 per layer), lloyd's served exact segment (float32 copies of the stored
    exact rows, and a float32 beta per exact row) instead of the stored ones, one float32 rotation (d x d) and the
    centroids per layer."""
    padded, ragged = _both(lm32, artifacts[bits])
    art = read_artifact(artifacts[bits])
    H, d, L = int(art.meta["num_kv_heads"]), int(art.meta["head_dim"]), len(art.layers)
    stored = sum(v.nbytes for layer in art.layers for k, v in layer.arrays.items()
                 if k not in ("lengths", "positions") and "exact" not in k)
    served = ragged.memory_bytes()
    overhead = L * (H + 1) * 4
    for layer in ragged.layers:
        p = layer.prefix
        if p.num_exact:
            overhead += sum(t.numel() * t.element_size() for t in (p.exact_keys, p.exact_values, p.exact_beta))
        for part in (p.keys, p.values):
            if part.centroids is not None:
                overhead += part.centroids.numel() * 4
    if "lloyd" in str(art.layers[0].attrs.values()):
        overhead += d * d * 4
    assert served == stored + overhead
    # and the padded, dequantized cache holds more (16-bit or float32 values, padded heads)
    assert padded.memory_bytes() > served


def test_default_rule_and_sliding_window_refused(lm32, artifacts, tiny_models):
    cache = compactor.load_cache(artifacts["K4V4"], lm32.model, lm32.tokenizer)
    assert cache.keeps_quantized == keep_quantized_default(lm32.model) == (DEVICE == "cuda")
    mistral = load_model(str(tiny_models["mistral"]))
    mistral.model.config.sliding_window = 64
    assert not keep_quantized_default(mistral.model)


def test_no_prefix_is_sdpa(lm32):
    """Without a compacted prefix the "compactor" attention is sdpa's, bit for bit (the ragged path is never
    entered)."""
    from compactor.serving.attention import using_compactor_attention

    ids = torch.arange(3, 40, device=DEVICE)[None]
    with torch.no_grad():
        ref = lm32.model(ids).logits
        with using_compactor_attention(lm32.model):
            got = lm32.model(ids).logits
    assert torch.equal(got, ref)


def test_damaged_codes_refused(lm32, artifacts):
    art = read_artifact(artifacts["K4V4"])
    layer = art.layers[0]
    layer.arrays["keys_codes"] = np.ascontiguousarray(layer.arrays["keys_codes"][:-1])
    with pytest.raises(ArtifactError, match="cannot serve layer 0"):
        compactor.load_cache(art, lm32.model, keep_quantized=True)


def test_inspect_reports_served_bytes(lm32, artifacts):
    """`compactor inspect` reports what loading with keep_quantized=True really allocates (same measurement)."""
    import json

    from click.testing import CliRunner

    from compactor.cli import cli

    for bits in ("K4V4", "16"):
        r = CliRunner().invoke(cli, ["inspect", str(artifacts[bits]), "--json"])
        assert r.exit_code == 0, r.output
        sizes = json.loads(r.output)["bytes"]
        ragged = compactor.load_cache(artifacts[bits], lm32.model, keep_quantized=True)
        assert sizes["memory_as_stored"] == ragged.memory_bytes()
        assert sizes["memory_as_stored"] < sizes["memory"]
        # dequantized: measured from the padded bf16 tensors; closed form per layer: Hkv * t_max * (2 d * 2 + 4)
        art = read_artifact(artifacts[bits])
        d = int(art.meta["head_dim"])
        assert sizes["memory"] == sum(len(layer.arrays["lengths"]) * int(layer.arrays["lengths"].max()) * (4 * d + 4)
                                      for layer in art.layers)
        r = CliRunner().invoke(cli, ["inspect", str(artifacts[bits])])
        assert "as stored (load_cache keep_quantized=True" in r.output and f"{ragged.memory_bytes():,}" in r.output


def test_eval_reports_the_bytes_the_loaded_caches_hold(lm32, artifacts):
    """Evaluator.score's two memory columns are what load_cache then holds, measured from the tensors: as stored
    (keep_quantized=True) and dequantized (padded 16-bit: a bf16 copy of the model loads it). The evaluated layers
    are the artifact's own, so the same entries go through the same codec."""
    import copy

    from compactor.capture.prefill import prefill_and_capture
    from compactor.evaluation.harness import Evaluator
    from compactor.serving.loader import decode_layers
    from compactor.storage.kv_codec import parse_kv_bits

    art = read_artifact(artifacts["K4V4"])
    ids = torch.randint(3, lm32.model.config.vocab_size, (art.T + 40,), generator=torch.Generator().manual_seed(0))
    cap = prefill_and_capture(lm32.model, lm32.tokenizer, ids[:art.T].to(DEVICE), max_queries=64, progress=False)
    ev = Evaluator(lm32.model, lm32.tokenizer, cap, ids.to(DEVICE), C=16, n_spans=1, span_len=16)
    row = ev.score(decode_layers(art), "am", 4, 0.0, [parse_kv_bits("K4V4")] * len(art.layers))
    held = compactor.load_cache(artifacts["K4V4"], lm32.model, keep_quantized=True)
    assert row.held_bytes == held.memory_bytes() < row.memory_bytes
    bf16 = copy.deepcopy(lm32.model).to(torch.bfloat16)
    padded = compactor.load_cache(artifacts["K4V4"], bf16, keep_quantized=False)
    assert row.memory_bytes == padded.memory_bytes()
