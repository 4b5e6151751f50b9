"""`compactor compress` with a calibration file: it picks up the model's file (or --calibration PATH), applies its
codebooks, per-layer and per-phase bits and head budgets, records the calibration's digest, and writes an artifact
that decodes on its own; --no-calibration turns it off; a calibration for another model is refused in one line."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from calib_helpers import write_synthetic_calibration
from compactor.cli import cli
from compactor.models import load_model
from compactor.errors import ArtifactError
from compactor.serving import loader
from compactor.serving.loader import decode_layers, load_cache
from compactor.storage.artifact import read_artifact
from compactor.storage.calibration_file import read_calibration
from decode_from_doc import decode

TRACE = ("Question: who jumps over the dog? <think>\nThe quick brown fox jumps over the lazy dog. To be, or not to "
         "be, that is the question. The fox jumps.</think>\nThe quick brown fox jumps over the lazy dog, whether 'tis "
         "nobler in the mind to suffer the slings and arrows of outrageous fortune. ") * 2


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def lm(tiny_llama):
    return load_model(str(tiny_llama))


@pytest.fixture(scope="module")
def cal(tmp_path_factory, lm):
    return write_synthetic_calibration(tmp_path_factory.mktemp("cal") / "tiny.h5", lm)


@pytest.fixture
def doc(tmp_path, doc_text):
    p = tmp_path / "doc.txt"
    p.write_text(doc_text)
    return p


def compress(doc, model, out, *extra):
    r = run("compress", doc, "--model", model, "--ratio", 4, "--kv-bits", "K4V4", "-o", out, "--quiet",
            "--max-queries", 128, *extra)
    assert r.exit_code == 0, r.output
    return read_artifact(out)


def test_calibration_applied_and_recorded(tmp_path, tiny_llama, cal, doc, lm):
    art = compress(doc, tiny_llama, tmp_path / "a.h5", "--calibration", cal)
    c = read_calibration(cal)
    assert art.meta["calibration_sha256"] == c.digest
    # the default (quality) preset's split budgets stay, without the head budgets (measured to hurt at 10x under
    # them); the fast preset's layer budgets give way to the calibration's mode and its head budgets
    assert art.meta["method_params"]["calibration"] == ["layer bits (avg 4)", "fitted codebooks"]
    assert art.meta["method_params"]["budget"] == "split" and art.meta["method_params"]["preset"] == "quality"
    fast = compress(doc, tiny_llama, tmp_path / "f.h5", "--calibration", cal, "--preset", "fast")
    assert fast.meta["method_params"]["budget"] == "global"
    assert fast.meta["method_params"]["calibration"] == ["layer bits (avg 4)", "fitted codebooks", "head budgets"]
    # per-layer bits at the same average (layer 0 keys +1, last layer's keys -1) with each layer's fitted codebook
    assert art.meta["layer_codecs"] == "K5V4@v0b4,K3@k1b3V4@v1b4"
    assert np.array_equal(art.codebooks["k1b3"], c.codebook("keys", 1, 3))
    # decodes without the calibration: compactor's loader and the independent decoder agree
    cache = load_cache(tmp_path / "a.h5", lm.model, lm.tokenizer)
    theirs = decode(str(tmp_path / "a.h5"))["layers"]
    for layer, ours in zip(theirs, decode_layers(art)):
        n0 = layer["lengths"][0]
        assert np.allclose(layer["keys"][:n0], ours.keys[0, :n0].numpy(), atol=1e-4)
    assert cache.get_seq_length() == art.T


def test_no_calibration_and_the_default_file(tmp_path, tiny_llama, cal, doc, monkeypatch):
    plain = compress(doc, tiny_llama, tmp_path / "p.h5", "--no-calibration")
    assert "calibration_sha256" not in plain.meta and plain.meta["layer_codecs"] == "K4V4,K4V4"
    monkeypatch.chdir(tmp_path)  # compress looks for artifacts/calibration/<model folder name>.h5 here
    (tmp_path / "artifacts" / "calibration").mkdir(parents=True)
    (tmp_path / "artifacts" / "calibration" / f"{tiny_llama.name}.h5").write_bytes(cal.read_bytes())
    auto = compress(doc, tiny_llama, tmp_path / "auto.h5")
    assert auto.meta["calibration_sha256"] == read_calibration(cal).digest
    off = compress(doc, tiny_llama, tmp_path / "off.h5", "--no-calibration")
    assert "calibration_sha256" not in off.meta
    chosen = compress(doc, tiny_llama, tmp_path / "l.h5", "--budget", "layer")  # an explicit --budget wins
    assert chosen.meta["method_params"]["budget"] == "layer"


def test_head_budgets_follow_the_weights(tmp_path, tiny_llama, doc, lm):
    """Same total, shared by key scores times the calibration's head weights: a heavily weighted head gains."""
    heavy = tmp_path / "heavy.h5"
    write_synthetic_calibration(heavy, lm, defaults={"codebooks": False, "layer_bits": False, "phase_bits": False,
                                                     "head_budgets": True, "budget": "global"})
    c = read_calibration(heavy)
    w = torch.from_numpy(c.arrays["head_weights"])
    top = int(w.flatten().argmax())
    lengths = lambda a: np.stack([layer.arrays["lengths"] for layer in a.layers]).reshape(-1)  # noqa: E731
    # split budgets (quality preset) follow the file's defaults_split; a file without it leaves the head budgets out
    split_on = tmp_path / "split_on.h5"
    write_synthetic_calibration(split_on, lm, defaults={"codebooks": False, "layer_bits": False, "phase_bits": False,
                                                        "head_budgets": True, "budget": "global"},
                                defaults_split={"codebooks": False, "layer_bits": False, "phase_bits": False,
                                                "head_budgets": True, "budget": "split"})
    for preset, mode, file, used in (("fast", "global", heavy, True), ("quality", "split", heavy, False),
                                     ("quality", "split", split_on, True)):
        base = compress(doc, tiny_llama, tmp_path / f"b{preset}.h5", "--no-calibration", "--preset", preset,
                        "--budget", mode, "--kv-bits", "16")
        cal = compress(doc, tiny_llama, tmp_path / f"c{preset}.h5", "--calibration", file, "--preset", preset,
                       "--kv-bits", "16")
        assert cal.meta["method_params"]["budget"] == mode
        assert base.meta["budget_total"] == cal.meta["budget_total"]
        assert ("head budgets" in cal.meta["method_params"]["calibration"]) == used
        if not used:
            assert np.array_equal(lengths(cal), lengths(base))
            continue
        assert lengths(cal)[top] > lengths(base)[top]
        assert not np.array_equal(lengths(cal), lengths(base))


def test_trace_with_markers_is_stored_per_phase(tmp_path, tiny_llama, cal, lm, monkeypatch):
    doc = tmp_path / "trace.txt"
    doc.write_text(TRACE)
    art = compress(doc, tiny_llama, tmp_path / "t.h5", "--calibration", cal, "--ratio", 2)
    phases = art.meta["phases"]
    assert phases["names"] == ["prompt", "think", "answer"] and 0 < phases["bounds"][1] < phases["bounds"][2]
    # think one bit less, answer one more than the prompt; the think phase of layer 0 keys has its own codebook
    assert art.meta["layer_codecs"].split(",")[0] == "K4@k0b4V4@v0b4/K3@k0p1b3V3@v0b3/K5V5"
    for l, layer in enumerate(art.layers):
        pos = layer.arrays["positions"]
        split = layer.arrays["phase_lengths"]
        start = 0
        for h, n in enumerate(layer.arrays["lengths"]):
            counts = np.diff(np.searchsorted(pos[start:start + n], phases["bounds"]))
            assert counts.tolist() == split[:, h].tolist()
            start += n
    load_cache(tmp_path / "t.h5", lm.model, lm.tokenizer)
    # one codec per layer is what the ragged kernel reads: a phased file is served dequantized, by rule and by force
    monkeypatch.setattr(loader, "ragged_kernel_available", lambda model: True)
    assert not loader.keep_quantized_default(lm.model, art) and loader.keep_quantized_default(lm.model)
    with pytest.raises(ArtifactError, match="per-phase codecs"):
        load_cache(tmp_path / "t.h5", lm.model, lm.tokenizer, keep_quantized=True)
    r = run("inspect", tmp_path / "t.h5")
    assert r.exit_code == 0 and "served     dequantized (per-phase codecs" in r.output, r.output
    theirs = decode(str(tmp_path / "t.h5"))["layers"]
    for layer, ours in zip(theirs, decode_layers(art)):
        n0 = layer["lengths"][0]
        assert np.allclose(layer["values"][:n0], ours.values[0, :n0].numpy(), atol=1e-4)


def test_refusals(tmp_path, tiny_llama, tiny_models, cal, doc):
    r = run("compress", doc, "--model", tiny_models["qwen2"], "--calibration", cal, "-o", tmp_path)
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1].startswith("Error: calibration")
    assert "was made for model" in r.output.strip().splitlines()[-1]
    old = tmp_path / "bits.json"
    old.write_text('{"layers": {"0": "K8V8"}}')
    r = run("compress", doc, "--model", tiny_llama, "--calibration", old, "-o", tmp_path)
    assert r.exit_code == 1 and "no longer read" in r.output and len(r.output.strip().splitlines()) == 1
    broken = tmp_path / "broken.h5"
    broken.write_bytes(cal.read_bytes()[:-100])
    r = run("compress", doc, "--model", tiny_llama, "--calibration", broken, "-o", tmp_path)
    assert r.exit_code == 1 and r.output.startswith("Error: ") and len(r.output.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.h5")) or all(p.name == "broken.h5" for p in tmp_path.glob("*.h5"))


def test_pinned_layers_of_a_phased_document_keep_their_codec(tmp_path, tiny_llama, cal):
    doc = tmp_path / "trace.txt"
    doc.write_text(TRACE)
    art = compress(doc, tiny_llama, tmp_path / "t.h5", "--calibration", cal, "--ratio", 2, "--hi-layers", "-1",
                   "--hi-bits", "K8V8")
    last = art.meta["layer_codecs"].split(",")[-1]
    assert last == "K8V8/K8V8/K8V8" and "phases" in art.meta


@pytest.mark.parametrize("chat", [False, True])
def test_phase_boundaries_follow_the_markers_in_the_compressed_tokens(lm, cal, chat):
    """Each boundary is the first compressed token after its marker, with the plain text and with the chat template's
    head before the document (checked by decoding the token ids the pipeline compresses)."""
    from compactor.capture.documents import Document
    from compactor.pipeline import CompressOptions, document_phases, prepare

    opts = CompressOptions(ratio=2, chat=chat, calibration=read_calibration(cal))
    ids = prepare(lm, Document("trace", TRACE), opts)
    phases = document_phases(lm, Document("trace", TRACE), ids.numel(), opts.calibration, chat)
    text = lambda n: lm.tokenizer.decode(ids[:n])  # noqa: E731
    for b, marker in zip(phases.bounds[1:-1], ("<think>", "</think>")):
        assert text(b).count(marker) == 1 and text(b - 1).count(marker) == 0, (b, marker)
    assert phases.bounds[-1] == ids.numel()


def test_tempered_head_weights(lm, tmp_path):
    """A check that chose head_power p gives score weights w**p (float64 reference), and says so."""
    from compactor.storage.calibrated_plan import calibrated_plan
    from compactor.storage.calibration_file import Calibration
    from compactor.storage.kv_codec import parse_kv_bits

    c = read_calibration(write_synthetic_calibration(
        tmp_path / "t.h5", lm, defaults_split={"codebooks": False, "layer_bits": False, "phase_bits": False, "head_budgets": True,
                        "budget": "split", "head_power": 0.25}))
    base = [parse_kv_bits("16")] * lm.config.num_hidden_layers
    w = torch.from_numpy(c.arrays["head_weights"]).double()
    split = calibrated_plan(base, c, None, (), 32, "split")
    assert torch.allclose(split.score_weights.double(), w ** 0.25, rtol=1e-6)
    assert split.applied == ["head budgets (weights^0.25)"] and split.budget == "split"
    layer = calibrated_plan(base, Calibration({**c.meta, "defaults": {**c.meta["defaults_split"], "budget": "layer",
                                                                        "head_power": 1.0}}, c.arrays), None, (), 32)
    assert torch.allclose(layer.score_weights.double(), w, rtol=1e-6) and layer.applied == ["head budgets"]
