"""Quality of the batched (GPU-path) fits against the exact per-head float64 fits, on real heads.

SmolLM2-135M, a bundled play, T=2048, C=256 (the quality benchmark's setting). For each ratio, AM with layer budgets
is compacted three ways from the same prefill and scored by the Evaluator (cKL, retention, held-out attention
fidelity):
- exact: the per-head path (active-set NNLS and Cholesky ridge in float64);
- exact, other queries: the same with a different seeded sample of reference queries (a second capture): how much
  the result moves for reasons that have nothing to do with the solver (the noise floor of the comparison);
- batched: compact_capture's batched path with float16 mass shares (the GPU numerics, emulated on the CPU):
  40 Jacobi-scaled FISTA steps for beta, 20 Jacobi-CG steps for the values.
A second block repeats exact vs batched with few reference queries (n = 512 per KV head) so that t >= n, the regime
of T = 131k on the 8B shape (t = 13,108 > n = 8,192), where the NNLS is underdetermined.

Run: python benchmarks/bench_fit_quality.py   (CPU, ~15 minutes; writes benchmarks/results_fit_quality.md)
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

from compactor.capture.documents import bundled_play
from compactor.capture.prefill import prefill_and_capture
from compactor.evaluation.harness import Evaluator
from compactor.fitting.batched_fits import BETA_ITERS, VALUE_ITERS, BatchedFitInfo
from compactor.methods import make_method
from compactor.methods import batched as batched_methods
from compactor.models import load_model
from compactor.pipeline import compact_capture


def score(ev, cap, ratio, label, batched, rows, log):
    info = BatchedFitInfo()
    t0 = time.perf_counter()
    layers, _ = compact_capture(cap, make_method("am"), ratio, "layer", progress=False, batched=batched,
                                fit_info=info)
    sec = time.perf_counter() - t0
    r = ev.score(layers, label, ratio, sec)
    rows.append((label, r, info))
    log(f"{label} r={ratio}: cKL {r.ckl:.4f} ret {r.retention:.3f} out {r.out_err:.4f} mass {r.mass_err:.4f} "
        f"{sec:.1f}s fallbacks {info.beta_fallback}/{info.value_fallback}")


def table(rows) -> str:
    out = ["| fits | ratio | cKL (nats/tok) | retention | out err | mass err | serving bytes | compact s | "
           "fallbacks beta/values |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for label, r, info in rows:
        out.append(f"| {label} | {r.ratio:g} | {r.ckl:.4f} | {r.retention:.3f} | {r.out_err:.4f} | {r.mass_err:.4f} | "
                   f"{r.memory_bytes:,} | {r.seconds:.1f} | {info.beta_fallback}/{info.value_fallback} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--play", default="macbeth")
    ap.add_argument("-T", type=int, default=2048)
    ap.add_argument("-C", type=int, default=256)
    ap.add_argument("--ratios", default="5,10,20")
    ap.add_argument("--few-queries", type=int, default=512)
    ap.add_argument("--few-ratios", default="4")
    ap.add_argument("--out", default="benchmarks/results_fit_quality.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    batched_methods.SHARE_DTYPE["cpu"] = torch.float16  # the GPU's float16 shares

    def log(msg):
        print(msg, flush=True)

    lm = load_model("smollm2-135m")
    ids = lm.tokenizer(bundled_play(args.play).text, return_tensors="pt").input_ids[0]
    cap = prefill_and_capture(lm.model, lm.tokenizer, ids[:args.T], max_queries=4096, seed=0, progress=False)
    other = prefill_and_capture(lm.model, lm.tokenizer, ids[:args.T], max_queries=4096, seed=1, progress=False)
    ev = Evaluator(lm.model, lm.tokenizer, cap, ids, C=args.C)
    rows = []
    for ratio in [float(x) for x in args.ratios.split(",")]:
        score(ev, cap, ratio, "exact", False, rows, log)
        score(ev, other, ratio, "exact, other queries", False, rows, log)
        score(ev, cap, ratio, "batched", True, rows, log)
    few = prefill_and_capture(lm.model, lm.tokenizer, ids[:args.T], max_queries=args.few_queries, seed=0,
                              progress=False)
    rows_few = []
    for ratio in [float(x) for x in args.few_ratios.split(",")]:
        score(ev, few, ratio, "exact", False, rows_few, log)
        score(ev, few, ratio, "batched", True, rows_few, log)
    n_few = few.queries[0].shape[1]
    text = (f"# Batched fits vs exact per-head fits (quality)\n\n"
            f"- date: {datetime.date.today().isoformat()}\n"
            f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}\n"
            f"- command: `python {' '.join(sys.argv)}`\n"
            f"- setting: SmolLM2-135M, {args.play}, T={args.T}, C={args.C}, AM with layer budgets (floor 0.75); "
            f"batched = {BETA_ITERS} beta steps + {VALUE_ITERS} value steps on float16 mass shares; exact = the "
            f"per-head float64 solvers\n- recall CE (nats/token): full cache {ev.ce_full:.3f}, no prefix "
            f"{ev.ce_none:.3f}\n\n## {cap.queries[0].shape[1]} reference queries per KV head (t < n)\n\n"
            f"{table(rows)}\n\n## {n_few} reference queries per KV head (t >= n at ratio "
            f"{args.few_ratios}: t = {-(-args.T // int(float(args.few_ratios.split(',')[0])))})\n\n{table(rows_few)}\n")
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
