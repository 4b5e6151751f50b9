"""Calibration benchmark: cKL and recall retention with and without the model's calibration, at equal bytes, on
plays the calibration did not see.

For each held-out play (T prefix tokens, C continuation), AM at ratios 1 (quantization only), 10 and 20:
- 16-bit keys/values: layer budgets vs the calibration's head budgets (same total entries, so the same stored bytes);
- K4V4 lloyd: the uniform Beta baseline, then each calibrated part alone (fitted codebooks; measured per-layer bits at
  the same 4-bit average; head budgets) and the calibration's defaults (what `compress` applies).
The rows report stored bytes, so "equal bytes" can be read off (codebooks add their centroids: 64 B per tensor at
4 bits). Also copies the calibration's own summary: runtime, ρ per phase (raw and length-matched), TAQG vs measured
vs random controls at equal average bits, codebook MSE.

Writes benchmarks/results_calibration.md (+ .json). Run from the repo root, after `make calibrate`:
`python benchmarks/bench_calibration.py [--calibration artifacts/calibration/smollm2-135m.h5]`.
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

import numpy as np
import torch

from compactor.capture.documents import bundled_play, list_plays
from compactor.capture.prefill import prefill_and_capture
from compactor.evaluation.harness import Evaluator
from compactor.fitting.presets import PRESETS, preset
from compactor.methods import method_from_options
from compactor.models import load_model
from compactor.pipeline import calibrated_budget_mode, compact_capture, probe_for
from compactor.storage.calibrated_plan import calibrated_plan
from compactor.storage.calibration_file import Calibration, check_calibration_model, read_calibration
from compactor.storage.kv_codec import parse_kv_bits

OFF = {"codebooks": False, "layer_bits": False, "phase_bits": False, "head_budgets": False, "budget": "layer"}


def configs(cal: Calibration, ratio: float, preset_mode: str, powers: tuple = (1.0,)
            ) -> list[tuple[str, str, dict, float]]:
    """(label, kv bits, defaults, head-weight power) rows for one ratio; preset_mode: the preset's budget mode (the
    baseline's); powers: head budgets are also tried with the weights raised to these powers (tempered)."""
    rows = []
    modes = ("layer", "global") if preset_mode in ("layer", "global") else (preset_mode,)
    tag = lambda m, p: m if p == 1 else f"{m}, weights^{p:g}"  # noqa: E731
    if ratio > 1:
        rows += [(f"16-bit, {preset_mode} budgets", "16", OFF, 1.0)]
        rows += [(f"16-bit, head budgets ({tag(m, p)})", "16", {**OFF, "head_budgets": True, "budget": m}, p)
                 for m in modes for p in powers]
    rows += [("K4V4 Beta codebooks, uniform bits", "K4V4", OFF, 1.0),
             ("K4V4 + fitted codebooks", "K4V4", {**OFF, "codebooks": True}, 1.0),
             ("K4V4 + measured per-layer bits", "K4V4", {**OFF, "layer_bits": True}, 1.0)]
    if ratio > 1:
        mode = calibrated_budget_mode(cal, preset_mode)
        rows += [(f"K4V4 + head budgets ({tag(mode, p)})", "K4V4", {**OFF, "head_budgets": True, "budget": mode}, p)
                 for p in powers]
    rows += [("K4V4 calibrated (the file's defaults)", "K4V4", dict(cal.meta["defaults"]), 1.0)]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calibration", default="artifacts/calibration/smollm2-135m.h5")
    ap.add_argument("--plays", type=int, default=2, help="held-out plays (not used by the calibration)")
    ap.add_argument("-T", type=int, default=1024)
    ap.add_argument("-C", type=int, default=128)
    ap.add_argument("--ratios", default="1,10,20")
    ap.add_argument("--max-queries", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="fast", choices=sorted(PRESETS),
                    help="method and budget mode of every row (quality: kvgrad scores need the gradient probe)")
    ap.add_argument("--out", default="benchmarks/results_calibration.md")
    ap.add_argument("--head-powers", default="1", help="comma-separated powers of the head weights to try "
                    "(tempered head budgets, e.g. 1,0.5,0.25)")
    args = ap.parse_args()

    lm = load_model(args.model)
    cal = read_calibration(args.calibration)
    check_calibration_model(cal, lm)
    used = set(cal.meta["summary"].get("documents", []))
    plays = [p for p in list_plays() if p not in used][: args.plays]
    L = lm.config.num_hidden_layers
    d = lm.model.model.layers[0].self_attn.head_dim
    method = method_from_options("am", args.seed, preset=args.preset)
    preset_mode = preset(args.preset)["options"]["budget"]
    split_share = preset(args.preset)["options"].get("split_share", 0.5)
    powers = tuple(float(p) for p in args.head_powers.split(","))
    rows = []
    t_start = time.perf_counter()
    for play in plays:
        ids = lm.tokenizer(bundled_play(play).text, return_tensors="pt").input_ids[0]
        cap = prefill_and_capture(lm.model, lm.tokenizer, ids[: args.T], max_queries=args.max_queries,
                                  seed=args.seed, progress=False, probe=probe_for(method),
                                  sources=preset(args.preset)["options"].get("sources"))
        ev = Evaluator(lm.model, lm.tokenizer, cap, ids, C=args.C)
        for ratio in [float(r) for r in args.ratios.split(",")]:
            for label, bits, defaults, power in configs(cal, ratio, preset_mode, powers):
                c = Calibration({**cal.meta, "defaults": defaults}, cal.arrays)
                # the defaults row is what compress does (no head budgets under split); the others force their part
                mode = calibrated_budget_mode(c, preset_mode) if "defaults" in label else None
                plan = calibrated_plan([parse_kv_bits(bits)] * L, c, None, (), d, mode)
                if power != 1 and plan.score_weights is not None:
                    plan.score_weights = plan.score_weights ** power
                t0 = time.perf_counter()
                budget = calibrated_budget_mode(c, preset_mode) if plan.budget else preset_mode
                layers, _ = compact_capture(cap, method, ratio, budget, 0.75, False, plan.codecs,
                                            "bfloat16", args.seed, score_weights=plan.score_weights,
                                            codebooks=plan.codebooks, split_share=split_share)
                r = ev.score(layers, "am", ratio, time.perf_counter() - t0, plan.codecs, "bfloat16", args.seed,
                             plan.codebooks)
                rows.append({"play": play, "ratio": ratio, "config": label, "ckl": r.ckl, "retention": r.retention,
                             "stored_bytes": r.stored_bytes, "memory_bytes": r.memory_bytes,
                             "full_bytes": r.full_bytes})
                print(f"{play} {ratio:g}x {label}: cKL {r.ckl:.4f} retention {r.retention:.3f} "
                      f"stored {r.stored_bytes:,}", flush=True)
    seconds = time.perf_counter() - t_start

    lines = ["| ratio | configuration | cKL (mean) | retention (mean) | stored bytes (mean) | vs full |" + "".join(
        f" cKL {p} |" for p in plays), "|---:|---|---:|---:|---:|---:|" + "---:|" * len(plays)]
    keys = list(dict.fromkeys((r["ratio"], r["config"]) for r in rows))
    for ratio, label in keys:
        sel = [r for r in rows if r["ratio"] == ratio and r["config"] == label]
        lines.append(f"| {ratio:g} | {label} | {np.mean([r['ckl'] for r in sel]):.4f} | "
                     f"{np.mean([r['retention'] for r in sel]):.3f} | {np.mean([r['stored_bytes'] for r in sel]):,.0f}"
                     f" | {np.mean([r['full_bytes'] / r['stored_bytes'] for r in sel]):.1f}x |"
                     + "".join(f" {r['ckl']:.4f} |" for r in sel))
    sm = cal.meta["summary"]
    pol = ["| policy | avg bits | cKL | attention KL |", "|---|---:|---:|---:|"] + [
        f"| {p['policy']} | {p['avg_bits']:.3f} | {p['ckl']:.5f} | {p['attention_kl']:.2e} |" for p in sm["policies"]]
    srcs = list(next(iter(sm["rho_mean"].values())))
    rho = ["| tensor, kind | " + " | ".join(srcs) + " |", "|---|" + "---:|" * len(srcs)] + [
        f"| {k} | " + " | ".join(f"{v[s]:.3f}" for s in srcs) + " |" for k, v in sm["rho_mean"].items()]
    mse = ["| codebook | " + " | ".join(f"{b} bits" for b in cal.codebook_bits) + " |",
           "|---|" + "---:|" * len(cal.codebook_bits)] + [
        f"| {k} | " + " | ".join(f"{x:.3g}" for x in v) + " |" for k, v in sm["codebook_mse_mean"].items()]
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
               f"Python {platform.python_version()}")
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    text = "\n".join([
        "# Calibration benchmark", "",
        f"- date: {datetime.date.today().isoformat()}", f"- machine: {machine}; load average at the end {load}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- calibration: {args.calibration} (sha256 {cal.digest[:12]}), made in {sm['seconds']:.0f} s "
        f"(stages: {', '.join(f'{k} {v:.0f} s' for k, v in sm['stage_seconds'].items())}); defaults "
        f"{cal.meta['defaults']}",
        f"- setting: {args.model}, AM with the {args.preset!r} preset ({preset_mode} budgets), held-out plays {', '.join(plays)}, T={args.T}, C={args.C}, "
        f"{args.max_queries} reference queries; this benchmark ran {seconds:.0f} s", "",
        "## With and without calibration (equal bytes: same entries and average bits; codebooks add their "
        "centroids)", "", *lines, "",
        "## Bit allocation on held-out reasoning traces (from the calibration run)", "",
        f"TAQG: ρ think {sm['taqg']['rho_think']}, answer {sm['taqg']['rho_answer']} (keys, raw): {sm['taqg']['high']}"
        f" gets {sm['taqg']['b_high']} bits, the rest {sm['taqg']['b_low']}.", "", *pol, "",
        "## ρ per phase (mean over layers and KV heads)", "", *rho, "",
        f"Phase boundaries: {sm['boundaries']}", "",
        "## Codebook MSE per rotated coordinate (held-out document, mean over layers and K/V)", "", *mse, ""])
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps({"rows": rows, "summary": sm}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
