"""The corpus GPU benchmark runs end to end (CPU dry run with toy sizes: every single-process section)."""
import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_corpus_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_corpus_gpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_corpus_gpu_dry_run(bench, tmp_path):
    out = tmp_path / "r.md"
    text = bench.main(["--dry-run", "--deadline", "1e9", "--out", str(out), "--json", str(tmp_path / "r.json"),
                       "--work", str(tmp_path / "work")])
    assert out.read_text() == text
    assert "| one model, one GPU | 1 | 3 |" in text and "| --device-map (accelerate hooks) |" in text
    assert "3 of 3 documents verified and skipped" in text
    assert "bitwise equal to the one-device run: 3/3" in text  # the same model through accelerate's hooks
    assert "same kept positions in 2/2 layers, largest difference in keys/values/beta 0" in text
    assert "Not run" not in text
    for section in ("imports + model", "warm-up document", "1. one GPU: corpus", "3. mixed devices",
                    "2. --device-map: corpus"):
        assert section in text


def test_bench_corpus_gpu_deadline_skips_the_later_sections(bench, tmp_path):
    text = bench.main(["--dry-run", "--deadline", "0", "--out", str(tmp_path / "r.md")])
    assert "| one model, one GPU | 1 | 3 |" in text
    assert "Not run (they would have ended after --deadline 0 s): 3. mixed devices, 2. --device-map." in text
    assert "--device-map (accelerate hooks)" not in text and "Mixed devices" not in text
