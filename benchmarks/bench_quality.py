"""Quality benchmark: AM against eviction, StreamingLLM and random keep on a bundled play.

Writes benchmarks/results.md (table + date, machine, command) and a JSON file of the rows. Default setting (the
one quoted in the README and issue notes): SmolLM2-135M, Macbeth, T=2048, C=256, ratios 2, 5, 10, 20, 50.
Run from the repo root: `python benchmarks/bench_quality.py` (or `make bench`).
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

from compactor.capture.documents import bundled_play
from compactor.evaluation.harness import Evaluator, format_table
from compactor.methods import make_method
from compactor.models import load_model
from compactor.capture.prefill import prefill_and_capture


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--play", default="macbeth")
    ap.add_argument("-T", type=int, default=2048)
    ap.add_argument("-C", type=int, default=256)
    ap.add_argument("--ratios", default="2,5,10,20,50")
    ap.add_argument("--methods", default="am,eviction,streaming,random")
    ap.add_argument("--budget", default="layer", choices=["uniform", "global", "layer"])
    ap.add_argument("--budget-floor", type=float, default=0.75)
    ap.add_argument("--max-queries", type=int, default=4096)
    ap.add_argument("--repeat-fraction", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results.md")
    args = ap.parse_args()

    lm = load_model(args.model)
    ids = lm.tokenizer(bundled_play(args.play).text, return_tensors="pt").input_ids[0]
    t0 = time.perf_counter()
    capture = prefill_and_capture(lm.model, lm.tokenizer, ids[:args.T], max_queries=args.max_queries,
                                  repeat_fraction=args.repeat_fraction, seed=args.seed)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    capture.attention_stats("full", progress=True)  # shared by AM and eviction; timed on its own line
    score_s = time.perf_counter() - t0
    ev = Evaluator(lm.model, lm.tokenizer, capture, ids, C=args.C)
    methods = [make_method(m) for m in args.methods.split(",")]
    rows = ev.run(methods, [float(r) for r in args.ratios.split(",")], args.budget, args.budget_floor)
    rows.sort(key=lambda r: (r.ratio, args.methods.split(",").index(r.method)))

    table = format_table(rows)
    print(table)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {platform.python_version()}"
    cmd = "python " + " ".join(sys.argv)
    text = (f"# Quality benchmark\n\n"
            f"- date: {datetime.date.today().isoformat()}\n- machine: {machine}\n- command: `{cmd}`\n"
            f"- setting: {args.model}, {args.play}, T={args.T}, C={args.C}, budget={args.budget} "
            f"(floor {args.budget_floor}) for AM and eviction, uniform for streaming/random; "
            f"{args.max_queries} reference queries per KV head ({args.repeat_fraction:.0%} repeat)\n"
            f"- recall CE (nats/token): full cache {ev.ce_full:.3f}, no prefix {ev.ce_none:.3f}\n"
            f"- prefill + query capture: {prefill_s:.1f} s; key scoring (shared by AM and eviction): "
            f"{score_s:.1f} s; `compact s` below excludes both\n\n{table}\n")
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps([r.as_dict() for r in rows], indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
