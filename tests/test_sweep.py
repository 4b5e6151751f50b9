"""`compactor eval --sweep` on a tiny model: deterministic with a seed, and a killed sweep resumes to the same rows."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from compactor.cli import METHOD_CHOICES, cli
from compactor.evaluation.sweep import SweepSpec, all_rows, missing, read_rows, run_sweep, unit_file
from compactor.methods import METHODS

T, C = 80, 16
METHODS_HERE = ["random", "snapkv", "prototype", "eviction"]


def _docs(tmp_path: Path, doc_text: str) -> list[str]:
    paths = []
    for i, text in enumerate((doc_text, doc_text[::-1])):
        p = tmp_path / f"doc{i}.txt"
        p.write_text(text)
        paths.append(str(p))
    return paths


def _spec(model, docs, methods=METHODS_HERE) -> SweepSpec:
    return SweepSpec(docs, [T], methods, [2.0, 8.0], ["16", "K4V4"], C=C, seed=3, model=str(model), preset="fast",
                     max_queries=64)


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_cli_choices_are_the_registry():
    assert METHOD_CHOICES == list(METHODS)


def test_sweep_cli_writes_reports_and_refuses_other_settings(tiny_llama, doc_text, tmp_path):
    docs = _docs(tmp_path, doc_text)
    out = tmp_path / "cli"
    args = ["eval", "--sweep", *docs, "-T", str(T), "-C", str(C), "--methods", "random,tova", "--ratios", "4",
            "--kv-bits", "16", "--model", str(tiny_llama), "--preset", "fast", "--max-queries", "64", "--seed", "3",
            "--out", str(out), "--quiet"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    rows = all_rows(out)
    assert len(rows) == 4 and {r["method"] for r in rows} == {"random", "tova"}
    assert "| random | 4 |" in (out / "sweep.md").read_text()
    assert (out / "sweep.csv").read_text().count("\n") == 5
    pytest.importorskip("matplotlib")
    assert (out / f"sweep_T{T}.png").stat().st_size > 10_000
    res = CliRunner().invoke(cli, [a if a != "3" else "4" for a in args])  # another seed into the same folder
    assert res.exit_code == 1 and "Error: the sweep in" in res.output and "seed" in res.output


def test_sweep_is_deterministic_and_resumes_after_a_kill(tiny_llama, doc_text, tmp_path):
    docs = _docs(tmp_path, doc_text)
    spec = _spec(tiny_llama, docs)
    whole = run_sweep(spec, tmp_path / "a", progress=False, draw=False)
    assert len(whole) == 2 * len(METHODS_HERE) * 2 * 2
    # an interrupted sweep: part of the methods done, then the last row of one file cut short by the kill
    out = tmp_path / "b"
    run_sweep(_spec(tiny_llama, docs, METHODS_HERE[:2]), out, progress=False, draw=False)
    f = unit_file(out, docs[0], T)
    text = f.read_text()
    f.write_text(text[: len(text) - 20])
    assert len(read_rows(f)) == 2 * 2 * 2 - 1
    assert len(missing(spec, out, docs[0], T)) == len(METHODS_HERE) * 4 - 7
    resumed = run_sweep(spec, out, jobs=2, progress=False, draw=False)  # the rest, two documents at once
    assert _strip(resumed) == _strip(whole)
    # nothing left: a rerun measures nothing and loads no model
    assert all(not missing(spec, out, d, T) for d in docs)
    assert _strip(run_sweep(spec, out, progress=False, draw=False)) == _strip(whole)


def test_sweep_rejects_a_ratio_above_T(tiny_llama, doc_text, tmp_path):
    from compactor.errors import CompactorError

    spec = _spec(tiny_llama, _docs(tmp_path, doc_text))
    spec.ratios = [200.0]
    with pytest.raises(CompactorError, match="larger than the document length"):
        run_sweep(spec, tmp_path / "c", progress=False, draw=False)
