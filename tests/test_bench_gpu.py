"""The GPU benchmark script runs end to end (CPU dry run with toy sizes: every section, the torch paths)."""
import importlib.util
from pathlib import Path


def test_bench_compaction_gpu_dry_run(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_compaction_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_compaction_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.md"
    text = bench.main(["--dry-run", "--out", str(out), "--json", str(tmp_path / "r.json")])
    assert out.read_text() == text
    assert "| A^T @ r (k=1) |" in text and "| llama-3.1-8b | 256 |" in text and "| 512 |" in text
    assert "OMP-fast" in text and (tmp_path / "r.json").stat().st_size > 0
