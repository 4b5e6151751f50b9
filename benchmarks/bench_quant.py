"""Quantization benchmark: Lloyd-Max (rotation + codebook) against llama.cpp's q4_0 / q8_0 blocks, alone (ratio 1)
and combined with Attention Matching at ratios 5, 10, 20, on a bundled play.

Runs on several plays (cKL of one 256-token continuation is noisy at high ratios) and compares at equal bytes on
the mean. Writes benchmarks/results_quant.md (tables, equal-bytes comparison, date, machine, command), a JSON,
and benchmarks/quant_frontier.png (stored bytes vs cKL). Run from the repo root:
`python benchmarks/bench_quant.py` (needs matplotlib for the plot: pip install -e .[plot]).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from compactor.documents import bundled_play
from compactor.evaluate import Evaluator, format_table
from compactor.methods import make_method
from compactor.models import load_model
from compactor.prefill import prefill_and_capture

LLOYD = ["K2V2", "K3V3", "K4V4", "K5V4", "K8V8"]
BLOCKS = ["q4_0", "q8_0"]


def interpolate_at(points: list[tuple[int, float]], x: float) -> float | None:
    """cKL of a frontier (bytes, cKL), linear in log-bytes/log-cKL, at x bytes; None outside its range."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            f = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return math.exp(math.log(y0) + f * (math.log(y1) - math.log(y0)))
    return None


def mean_rows(per_play: dict) -> list:
    """Row-wise mean over plays (same method, ratio and storage in the same order)."""
    from dataclasses import fields, replace

    groups = list(zip(*per_play.values()))
    out = []
    for group in groups:
        avg = {f.name: sum(getattr(r, f.name) for r in group) / len(group) for f in fields(group[0])
               if isinstance(getattr(group[0], f.name), (int, float)) and f.name != "ratio"}
        avg = {k: (round(v) if isinstance(getattr(group[0], k), int) else v) for k, v in avg.items()}
        out.append(replace(group[0], **avg))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--plays", default="macbeth,hamlet,othello",
                    help="comma-separated plays; the equal-bytes verdict uses the mean over them")
    ap.add_argument("-T", type=int, default=2048)
    ap.add_argument("-C", type=int, default=256)
    ap.add_argument("--ratios", default="1,5,10,20")
    ap.add_argument("--kv-bits", default=",".join(["16"] + LLOYD + BLOCKS))
    ap.add_argument("--budget", default="layer")
    ap.add_argument("--budget-floor", type=float, default=0.75)
    ap.add_argument("--max-queries", type=int, default=4096)
    ap.add_argument("--out", default="benchmarks/results_quant.md")
    ap.add_argument("--plot", default="benchmarks/quant_frontier.png")
    args = ap.parse_args()

    lm = load_model(args.model)
    ratios = [float(r) for r in args.ratios.split(",")]
    bits = args.kv_bits.split(",")
    plays = args.plays.split(",")
    t0 = time.perf_counter()
    per_play = {}
    for play in plays:
        ids = lm.tokenizer(bundled_play(play).text, return_tensors="pt").input_ids[0]
        capture = prefill_and_capture(lm.model, lm.tokenizer, ids[:args.T], max_queries=args.max_queries)
        ev = Evaluator(lm.model, lm.tokenizer, capture, ids, C=args.C)
        per_play[play] = ev.run([make_method("am")], ratios, args.budget, args.budget_floor, kv_bits=bits)
        print(play, format_table(per_play[play]), sep="\n")
    rows = mean_rows(per_play)
    print("mean over plays", format_table(rows), sep="\n")

    lines = ["| ratio | q codec | q stored bytes | q cKL | lloyd cKL at those bytes (interpolated) | "
             "lloyd point with fewer bytes | its cKL |", "|---:|---|---:|---:|---:|---|---:|"]
    verdicts = []
    for r in ratios:
        lloyd = [(x.stored_bytes, x.ckl) for x in rows if x.ratio == r and x.kv in LLOYD]
        for q in (x for x in rows if x.ratio == r and x.kv == "Kq4_0Vq4_0"):
            at = interpolate_at(lloyd, q.stored_bytes)
            cheaper = [x for x in rows if x.ratio == r and x.kv in LLOYD and x.stored_bytes <= q.stored_bytes]
            best = min(cheaper, key=lambda x: x.ckl) if cheaper else None
            lines.append(f"| {r:g} | q4_0 | {q.stored_bytes:,} | {q.ckl:.4f} | "
                         f"{'n/a' if at is None else f'{at:.4f}'} | {best.kv if best else 'none'} "
                         f"({best.stored_bytes:,} B) | {best.ckl:.4f} |" if best else "| |")
            verdicts.append(at is not None and at < q.ckl)
    equal = "\n".join(lines)
    print(equal)

    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(7, 4.5))
            for r in ratios:
                for family, names, marker in (("lloyd", LLOYD, "o"), ("q4_0/q8_0", ["Kq4_0Vq4_0", "Kq8_0Vq8_0"], "s"),
                                              ("bf16", ["K16V16"], "^")):
                    pts = sorted((x.stored_bytes, x.ckl, x.kv) for x in rows if x.ratio == r and x.kv in names)
                    if pts:
                        ax.plot([p[0] for p in pts], [max(p[1], 1e-5) for p in pts], marker=marker,
                                linestyle="-" if family == "lloyd" else ":", label=f"{family}, {r:g}x")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("stored bytes (codes, gains, means, scales, beta, positions, codebooks)")
            ax.set_ylabel("cKL (nats/token)")
            ax.set_title(f"{args.model}, mean of {len(plays)} plays, T={args.T}, C={args.C}: AM + quantization",
                         fontsize=9)
            ax.legend(fontsize=7, ncol=2)
            ax.grid(True, which="both", alpha=0.3)
            fig.tight_layout()
            fig.savefig(args.plot, dpi=120)
            print(f"wrote {args.plot}")
        except ImportError:
            print("matplotlib not installed: no plot (pip install -e .[plot])")

    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    text = (f"# Quantization benchmark\n\n- date: {datetime.date.today().isoformat()}\n- machine: {machine}\n"
            f"- command: `python {' '.join(sys.argv)}`\n- setting: {args.model}, plays {', '.join(plays)}, T={args.T}, "
            f"C={args.C}; AM with {args.budget} budgets (ratio 1 = no compaction, quantization only); keys and "
            f"values stored with each codec and loaded back before scoring; {time.perf_counter() - t0:.0f} s\n"
            f"- stored bytes count everything the artifact holds for the cache; memory bytes are the serving cache "
            f"(dequantized to 16 bits, padded per layer)\n\n## Mean over the plays\n\n{format_table(rows)}\n\n"
            f"## Equal bytes: Lloyd-Max against q4_0 (mean over the plays)\n\n{equal}\n\n"
            f"lloyd beats q4_0 at equal bytes at every ratio: {all(verdicts)}\n\n![frontier](quant_frontier.png)\n"
            + "".join(f"\n## {play}\n\n{format_table(r)}\n" for play, r in per_play.items()))
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {play: [r.as_dict() for r in r_] for play, r_ in {"mean": rows, **per_play}.items()}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
