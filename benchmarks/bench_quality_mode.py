"""Quality-mode ablation (issue 9): every lever alone and combined, against eviction with the same scores and budgets.

For each text: prefill + capture (context and repeat reference queries, the reconstruction probe with gradients) is
done once and cached under benchmarks/out/ (safetensors, no pickle), then every configuration x ratio is compacted and
scored with the Evaluator (cKL, recall retention, fidelity, stored and served bytes, compaction seconds). Rows are
appended to benchmarks/out/quality_mode_rows.json (one row per text x config x ratio, rerunning a cell replaces it);
`--report` writes benchmarks/results_quality.md and results_quality.png from all rows.

Texts: plays by name, `gpl3` (/usr/share/common-licenses/GPL-3, legal text) and `apache2`; the first T+C tokens.
Run (CPU): nice -n 10 python benchmarks/bench_quality_mode.py --texts macbeth --configs am_rms_layer,evict_rms_layer
           python benchmarks/bench_quality_mode.py --report
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

OUT = Path("benchmarks/out")
ROWS = OUT / "quality_mode_rows.json"
LICENSES = {"gpl3": "/usr/share/common-licenses/GPL-3", "apache2": "/usr/share/common-licenses/Apache-2.0"}

# name -> (method, method params, budget mode, budget floor, capture variant)
CONFIGS = {
    # today (the spine): highest RMS attention, layer budgets with a 0.75 floor
    "am_rms_layer": ("am", {}, "layer", 0.75, "base"),
    "evict_rms_layer": ("eviction", {}, "layer", 0.75, "base"),
    # lever 1: scores comparable across heads, one budget for all heads and layers
    "am_rms_global0": ("am", {}, "global", 0.0, "base"),
    "am_kvzip_layer": ("am", {"score": "kvzip"}, "layer", 0.75, "base"),
    "am_kvzip_global0": ("am", {"score": "kvzip"}, "global", 0.0, "base"),
    "am_kvzip_wo_global0": ("am", {"score": "kvzip_wo"}, "global", 0.0, "base"),
    "am_kvgrad_global0": ("am", {"score": "kvgrad"}, "global", 0.0, "base"),
    "am_kvgrad_global25": ("am", {"score": "kvgrad"}, "global", 0.25, "base"),
    "am_kvgrad_layer": ("am", {"score": "kvgrad"}, "layer", 0.75, "base"),
    "am_kvgrad_rms_global0": ("am", {"score": "kvgrad_rms"}, "global", 0.0, "base"),
    "am_kvzip_rms_global0": ("am", {"score": "kvzip_rms"}, "global", 0.0, "base"),
    "evict_kvzip_global0": ("eviction", {"score": "kvzip"}, "global", 0.0, "base"),
    "evict_kvgrad_global0": ("eviction", {"score": "kvgrad"}, "global", 0.0, "base"),
    "evict_kvgrad_rms_global0": ("eviction", {"score": "kvgrad_rms"}, "global", 0.0, "base"),
}


def text_ids(lm, name: str, n_tokens: int) -> torch.Tensor:
    from compactor.capture.documents import bundled_play

    text = Path(LICENSES[name]).read_text() if name in LICENSES else bundled_play(name).text
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < n_tokens:
        raise SystemExit(f"{name} has {ids.numel()} tokens, fewer than T+C={n_tokens}")
    return ids[:n_tokens]


def save_capture(path: Path, cap) -> None:
    from safetensors.torch import save_file

    t = {"query_pos": cap.query_pos, "query_source": cap.query_source, "scale": torch.tensor(cap.scale)}
    for i, (k, v, q) in enumerate(zip(cap.keys, cap.values, cap.queries)):
        t[f"keys.{i}"], t[f"values.{i}"], t[f"queries.{i}"] = k.contiguous(), v.contiguous(), q.contiguous()
    for name, x in (cap.probe or {}).items():
        t[f"probe.{name}"] = x.contiguous()
    save_file(t, str(path))


def load_capture(path: Path):
    from safetensors.torch import load_file

    from compactor.capture.prefill import Capture

    t = load_file(str(path))
    L = sum(1 for k in t if k.startswith("keys."))
    probe = {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith("probe.")} or None
    return Capture([t[f"keys.{i}"] for i in range(L)], [t[f"values.{i}"] for i in range(L)],
                   [t[f"queries.{i}"] for i in range(L)], t["query_pos"], t["query_source"], float(t["scale"]),
                   probe)


def get_capture(lm, name: str, ids: torch.Tensor, T: int, variant: str, args):
    """The capture of a text for a capture variant, from the disk cache when present."""
    from compactor.capture.prefill import prefill_and_capture

    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"qm_{name}_T{T}_q{args.max_queries}_{variant}.safetensors"
    if path.exists():
        return load_capture(path), json.loads(path.with_suffix(".json").read_text())
    t0 = time.perf_counter()
    kw = dict(max_queries=args.max_queries, seed=0, progress=True, probe="gradient")
    cap = prefill_and_capture(lm.model, lm.tokenizer, ids[:T], **kw)
    info = {"capture_s": round(time.perf_counter() - t0, 1)}
    save_capture(path, cap)
    path.with_suffix(".json").write_text(json.dumps(info))
    return cap, info


def load_rows() -> list[dict]:
    return json.loads(ROWS.read_text()) if ROWS.exists() else []


def save_rows(new: list[dict]) -> None:
    rows = load_rows()
    keys = {(r["text"], r["T"], r["config"], r["ratio"]) for r in new}
    rows = [r for r in rows if (r["text"], r["T"], r["config"], r["ratio"]) not in keys] + new
    ROWS.write_text(json.dumps(rows, indent=1))


def run(args) -> None:
    from compactor.evaluation.harness import Evaluator
    from compactor.methods import make_method
    from compactor.models import load_model
    from compactor.pipeline import compact_capture

    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    configs = args.configs.split(",")
    for c in configs:
        if c not in CONFIGS:
            raise SystemExit(f"unknown config {c!r}; known: {', '.join(CONFIGS)}")
    ratios = [float(r) for r in args.ratios.split(",")]
    for text in args.texts.split(","):
        ids = text_ids(lm, text, args.T + args.C)
        evaluators = {}
        for cname in configs:
            method_name, params, budget, floor, variant = CONFIGS[cname]
            cap, info = get_capture(lm, text, ids, args.T, variant, args)
            if variant not in evaluators:
                evaluators[variant] = Evaluator(lm.model, lm.tokenizer, cap, ids, C=args.C)
            ev = evaluators[variant]
            ev.capture = cap
            method = make_method(method_name, **params)
            rows = []
            for ratio in ratios:
                t0 = time.perf_counter()
                cap.attention_stats("full")  # shared, not timed per config (see capture_s / score_s)
                t_score = time.perf_counter() - t0
                t0 = time.perf_counter()
                layers, budgets = compact_capture(cap, method, ratio, budget, floor, progress=False)
                secs = time.perf_counter() - t0
                row = ev.score(layers, method.name, ratio, secs).as_dict()
                row.update(text=text, T=args.T, config=cname, budget=budget, floor=floor, variant=variant,
                           params=method.params(), ce_full=ev.ce_full, ce_none=ev.ce_none,
                           capture_s=info["capture_s"], score_s=round(t_score, 2),
                           max_head=int(budgets.max()), min_head=int(budgets.min()))
                rows.append(row)
                print(f"{text} {cname:28s} {ratio:4g}x cKL {row['ckl']:.4f} ret {row['retention']:.3f} "
                      f"stored {row['full_bytes'] / row['stored_bytes']:.1f}x mem "
                      f"{row['full_bytes'] / row['memory_bytes']:.1f}x {secs:.1f}s", flush=True)
            save_rows(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--texts", default="macbeth,hamlet,othello,gpl3")
    ap.add_argument("-T", type=int, default=2048)
    ap.add_argument("-C", type=int, default=256)
    ap.add_argument("--ratios", default="2,5,10,20,50")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--max-queries", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report", action="store_true", help="write results_quality.md/.png from the stored rows")
    args = ap.parse_args()
    if args.report:
        from bench_quality_report import write_report

        write_report(load_rows(), " ".join(sys.argv))
        return
    run(args)


if __name__ == "__main__":
    main()
