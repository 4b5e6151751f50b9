"""`compactor eval --sweep`: every method x ratio x storage on every document and prefix length, one row each.

Layout of the output folder:
- `sweep.json`: the settings rows depend on (model, dtype, C, seed, preset, max_queries); a folder is only resumed
  with the same settings;
- `rows/<document>_T<T>.csv`: one file per (document, T), a row appended (and flushed) as soon as it is measured.
  A killed sweep resumes where it stopped: rows already there are skipped, a line cut short by the kill is dropped;
  a (document, T) whose rows are all there is not even prefilled;
- `sweep.csv` (every row), `sweep.md` (means over the documents; pooled retention) and `sweep_T<T>.png` (cKL and
  recall retention against stored bytes, one curve per method, log axes; needs matplotlib) are rewritten at the end.
Deterministic with a seed: the capture's query sampling, the random baseline and the codecs' rotations all take it,
and each (document, T) is computed in a fresh capture, so rows do not depend on the order, the resume or --jobs.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import CompactorError
from .harness import EvalRow

ROW_FIELDS = ["document", "T", "C", "seed", *[f.name for f in fields(EvalRow)], "ce_full", "ce_none"]
SETTINGS = ("model", "dtype", "C", "seed", "preset", "max_queries")


@dataclass
class SweepSpec:
    documents: list[str]          # bundled play names or paths of text files
    lengths: list[int]            # prefix lengths T
    methods: list[str]
    ratios: list[float]
    kv_bits: list[str]            # storages, e.g. 16, K4V4, q4_0
    C: int = 256
    seed: int = 0
    model: str = "smollm2-135m"
    dtype: str = "float32"        # model weights (float32 keeps GPU rows comparable with CPU ones)
    device: str = "cpu"
    preset: str = "fast"          # AM's and eviction's options and budget (fitting/presets.py)
    max_queries: int = 4096

    def settings(self) -> dict:
        return {k: getattr(self, k) for k in SETTINGS}


def kv_label(bits: str) -> str:
    from ..storage.kv_codec import parse_kv_bits

    return parse_kv_bits(bits).label


def row_key(row: dict) -> tuple:
    return row["method"], float(row["ratio"]), row["kv"]


def unit_file(out: Path, document: str, T: int) -> Path:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(document).stem if Path(document).name != document else document)
    return out / "rows" / f"{stem}_T{T}.csv"


def read_rows(path: Path) -> list[dict]:
    """The complete rows of a unit file; a last line cut short (no newline, or too few fields) is dropped and the
    file rewritten without it, so appending continues cleanly."""
    if not path.exists():
        return []
    text = path.read_text()
    complete = text if text.endswith("\n") else text[: text.rfind("\n") + 1]
    rows = [r for r in csv.DictReader(io.StringIO(complete)) if None not in r.values() and None not in r]
    if complete != text:
        _write(path, rows)
    return rows


def _write(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, ROW_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(buf.getvalue())
    tmp.replace(path)


def _append(path: Path, row: dict) -> None:
    if not path.exists():
        _write(path, [])
    with path.open("a") as f:
        csv.DictWriter(f, ROW_FIELDS, lineterminator="\n").writerow(row)
        f.flush()
        os.fsync(f.fileno())


def jobs_of(spec: SweepSpec) -> list[tuple[str, float, str]]:
    return [(m, float(r), k) for m in spec.methods for r in spec.ratios for k in spec.kv_bits]


def missing(spec: SweepSpec, out: Path, document: str, T: int) -> list[tuple[str, float, str]]:
    done = {row_key(r) for r in read_rows(unit_file(out, document, T))}
    return [j for j in jobs_of(spec) if (j[0], j[1], kv_label(j[2])) not in done]


_MODEL_CACHE: dict = {}


def _model(spec: SweepSpec):
    from ..models import load_model

    key = (spec.model, spec.device, spec.dtype)
    if key not in _MODEL_CACHE:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec.dtype]
        _MODEL_CACHE[key] = load_model(spec.model, device=spec.device, dtype=dtype)
    return _MODEL_CACHE[key]


def _document(name: str):
    from ..capture.documents import bundled_play, list_plays, read_document

    return bundled_play(name) if name in list_plays() else read_document(name)


def run_unit(spec: SweepSpec, out: Path, document: str, T: int, progress=None) -> int:
    """Measure the rows of one (document, T) that are not in its file yet. Returns how many were measured;
    `progress(n)` is called after each row."""
    from ..capture.prefill import prefill_and_capture
    from ..fitting.presets import preset
    from ..methods import method_from_options
    from ..pipeline import probe_for
    from .harness import Evaluator

    todo = missing(spec, out, document, T)
    if not todo:
        return 0
    lm = _model(spec)
    ids = lm.tokenizer(_document(document).text, return_tensors="pt").input_ids[0]
    if ids.numel() < T + spec.C:
        raise CompactorError(f"document {document!r} has {ids.numel()} tokens; the sweep needs T+C={T + spec.C}")
    opts = preset(spec.preset)["options"]
    methods = {name: method_from_options(name, spec.seed, preset=spec.preset) for name in {j[0] for j in todo}}
    probes = {probe_for(m) for m in methods.values()}
    probe = "gradient" if "gradient" in probes else ("attention" if "attention" in probes else "none")
    torch.manual_seed(spec.seed)
    capture = prefill_and_capture(lm.model, lm.tokenizer, ids[:T], max_queries=spec.max_queries, seed=spec.seed,
                                  progress=False, probe=probe)
    ev = Evaluator(lm.model, lm.tokenizer, capture, ids, C=spec.C)
    path = unit_file(out, document, T)
    for name, ratio, bits in todo:
        row = ev.run([methods[name]], [ratio], opts.get("budget", "layer"), opts.get("budget_floor", 0.75),
                     progress=False, kv_bits=[bits], seed=spec.seed,
                     split_share=opts.get("split_share", 0.5))[0]
        _append(path, {"document": document, "T": T, "C": spec.C, "seed": spec.seed, **row.as_dict(),
                       "ce_full": ev.ce_full, "ce_none": ev.ce_none})
        if progress is not None:
            progress(1)
    return len(todo)


def _worker(args) -> tuple[str, int, int]:
    spec, out, document, T, threads = args
    torch.set_num_threads(threads)
    return document, T, run_unit(spec, out, document, T)


def check_settings(spec: SweepSpec, out: Path) -> None:
    """Create the folder, or make sure an existing sweep there was run with the same settings."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows").mkdir(exist_ok=True)
    path = out / "sweep.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            raise CompactorError(f"{path} is not valid JSON; use another --out") from None
        diff = {k: (old.get(k), v) for k, v in spec.settings().items() if old.get(k) != v}
        if diff:
            raise CompactorError(f"the sweep in {out} was run with other settings ("
                                 + ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
                                 + "); use another --out")
    else:
        path.write_text(json.dumps(spec.settings(), indent=2) + "\n")


def run_sweep(spec: SweepSpec, out: str | Path, jobs: int = 1, progress: bool = True, draw: bool = True
              ) -> list[dict]:
    """Measure what is missing, then write sweep.csv, sweep.md and (`draw`) the plots. Returns every row of the
    folder."""
    out = Path(out)
    check_settings(spec, out)
    from ..fitting.budgets import per_head_budget

    try:
        for bits in spec.kv_bits:
            kv_label(bits)
        for T in spec.lengths:
            for ratio in spec.ratios:
                per_head_budget(T, ratio)
    except ValueError as e:
        raise CompactorError(str(e)) from None
    units = [(d, T) for d in spec.documents for T in spec.lengths]
    total = sum(len(missing(spec, out, d, T)) for d, T in units)
    with tqdm(total=total, desc="sweep", unit="row", disable=not progress) as bar:
        if jobs <= 1 or total == 0:
            for d, T in units:
                run_unit(spec, out, d, T, bar.update)
        else:
            import multiprocessing as mp

            threads = max(1, torch.get_num_threads() // jobs)
            todo = [(spec, out, d, T, threads) for d, T in units if missing(spec, out, d, T)]
            with mp.get_context("spawn").Pool(min(jobs, len(todo))) as pool:
                for _, _, n in pool.imap_unordered(_worker, todo):
                    bar.update(n)
    rows = all_rows(out)
    write_reports(rows, out, progress, draw)
    return rows


def all_rows(out: Path) -> list[dict]:
    rows = [r for p in sorted((out / "rows").glob("*.csv")) for r in read_rows(p)]
    return sorted(rows, key=lambda r: (r["document"], int(r["T"]), r["method"], float(r["ratio"]), r["kv"]))


def summarise(rows: list[dict]) -> list[dict]:
    """Per (T, storage, method, ratio): means over the documents of cKL, retention, bytes and seconds, and the
    pooled retention sum(CE_none - CE_c) / sum(CE_none - CE_full)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((int(r["T"]), r["kv"], r["method"], float(r["ratio"])), []).append(r)
    out = []
    for (T, kv, method, ratio), rs in sorted(groups.items()):
        mean = lambda key: sum(float(r[key]) for r in rs) / len(rs)  # noqa: E731
        gain_full = sum(float(r["ce_none"]) - float(r["ce_full"]) for r in rs)
        out.append({"T": T, "kv": kv, "method": method, "ratio": ratio, "documents": len(rs), "ckl": mean("ckl"),
                    "retention": mean("retention"),
                    "pooled_retention": sum(float(r["ce_none"]) - float(r["ce"]) for r in rs) / gain_full,
                    "out_err": mean("out_err"), "stored_bytes": mean("stored_bytes"),
                    "full_bytes": mean("full_bytes"), "seconds": mean("seconds")})
    return out


def markdown(summary: list[dict]) -> str:
    lines = ["# Sweep: means over the documents", "",
             "cKL in nats/token (lower is better); retention: mean over documents and pooled "
             "(sum of CE gains over sum of full-cache gains); stored bytes: artifact payload, x = full 16-bit cache "
             "over stored; out err: attention-output rel-L2 on held-out queries.", ""]
    for T, kv in sorted({(s["T"], s["kv"]) for s in summary}):
        part = [s for s in summary if s["T"] == T and s["kv"] == kv]
        lines += [f"## T = {T}, storage {kv}", "",
                  "| method | ratio | docs | cKL | retention | pooled ret. | out err | stored bytes | x | compact s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in sorted(part, key=lambda s: (s["method"], s["ratio"])):
            lines.append(f"| {s['method']} | {s['ratio']:g} | {s['documents']} | {s['ckl']:.4f} | "
                         f"{s['retention']:.3f} | {s['pooled_retention']:.3f} | {s['out_err']:.3f} | "
                         f"{s['stored_bytes']:,.0f} | {s['full_bytes'] / s['stored_bytes']:.1f} | "
                         f"{s['seconds']:.2f} |")
        lines.append("")
        best = []
        for ratio in sorted({s["ratio"] for s in part}):
            at = [s for s in part if s["ratio"] == ratio]
            c = min(at, key=lambda s: s["ckl"])
            r = max(at, key=lambda s: s["pooled_retention"])
            best.append(f"| {ratio:g} | {c['method']} {c['ckl']:.4f} | {r['method']} {r['pooled_retention']:.3f} |")
        lines += ["| ratio | best cKL | best pooled retention |", "|---:|---|---|", *best, ""]
    return "\n".join(lines)


def plot(summary: list[dict], out: Path, progress: bool = True) -> list[Path]:
    """One PNG per T: a row per storage, cKL (log) and pooled retention against stored bytes (log), one curve per
    method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if progress:
            print("matplotlib is not installed: no plots (pip install -e .[plot]; rerun with the same --out to draw)")
        return []
    paths = []
    for T in sorted({s["T"] for s in summary}):
        kvs = sorted({s["kv"] for s in summary if s["T"] == T})
        fig, axes = plt.subplots(len(kvs), 2, figsize=(13, 4.5 * len(kvs)), squeeze=False)
        methods = sorted({s["method"] for s in summary})
        colors = plt.get_cmap("tab20")
        for row_axes, kv in zip(axes, kvs):
            for i, m in enumerate(methods):
                pts = sorted((s for s in summary if s["T"] == T and s["kv"] == kv and s["method"] == m),
                             key=lambda s: s["stored_bytes"])
                if not pts:
                    continue
                for ax, key in zip(row_axes, ("ckl", "pooled_retention")):
                    ax.plot([p["stored_bytes"] for p in pts], [max(p[key], 1e-6) if key == "ckl" else p[key]
                                                              for p in pts], "-o", ms=3, color=colors(i % 20),
                            lw=2.2 if m == "am" else 1.2, label=m)
            for ax, name in zip(row_axes, ("cKL (nats/token, log)", "pooled recall retention")):
                ax.set_xscale("log")
                ax.set_xlabel("stored bytes (mean over documents, log)")
                ax.set_ylabel(name)
                ax.set_title(f"T={T}, {kv}")
                ax.grid(alpha=0.3)
            row_axes[0].set_yscale("log")
            row_axes[1].legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out / f"sweep_T{T}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def write_reports(rows: list[dict], out: Path, progress: bool = True, draw: bool = True) -> None:
    _write(out / "sweep.csv", rows)
    summary = summarise(rows)
    (out / "sweep.md").write_text(markdown(summary) + "\n")
    if draw:
        plot(summary, out, progress)


