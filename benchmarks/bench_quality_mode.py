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

# capture variants (lever 4: query sources); the reconstruction probe of the base capture is shared by all
VARIANTS = {
    "base": {},                                                             # context 50% / repeat 50%
    "rep75": {"sources": {"context": 0.25, "repeat": 0.75}},
    "ss": {"sources": {"context": 0.4, "repeat": 0.4, "self_study": 0.2}, "self_study": 6},
    "rand": {"sources": {"context": 0.45, "repeat": 0.45, "random": 0.1}},
}


def cfg(method="am", budget="global", floor=0.0, variant="base", on_policy=0, sens=False, split=0.5, **params):
    return {"method": method, "params": params, "budget": budget, "floor": floor, "variant": variant,
            "on_policy": on_policy, "sens": sens, "split": split}


KVG = dict(score="kvgrad")
CONFIGS = {
    # today (the spine): highest RMS attention, layer budgets with a 0.75 floor; eviction with the same
    "am_rms_layer": cfg(budget="layer", floor=0.75),
    "evict_rms_layer": cfg("eviction", budget="layer", floor=0.75),
    # lever 1: scores comparable across heads, one budget for all heads and layers
    "am_rms_global0": cfg(),
    "am_kvzip_layer": cfg(budget="layer", floor=0.75, score="kvzip"),
    "am_kvzip_global0": cfg(score="kvzip"),
    "am_kvzip_wo_global0": cfg(score="kvzip_wo"),
    "am_kvgrad_global0": cfg(**KVG),
    "am_kvgrad_global25": cfg(floor=0.25, **KVG),
    "am_kvgrad_layer": cfg(budget="layer", floor=0.75, **KVG),
    "am_kvgrad_rms_global0": cfg(score="kvgrad_rms"),
    "am_kvzip_rms_global0": cfg(score="kvzip_rms"),
    "evict_kvzip_global0": cfg("eviction", score="kvzip"),
    "evict_kvgrad_global0": cfg("eviction", **KVG),
    "evict_kvgrad_rms_global0": cfg("eviction", score="kvgrad_rms"),
    # lever 1b: split budgets: a share by RMS with layer budgets (continuation), the rest by kvgrad, one global budget
    "am_kvgrad_split50": cfg(budget="split", floor=0.75, split=0.5, **KVG),
    "am_kvgrad_split25": cfg(budget="split", floor=0.75, split=0.25, **KVG),
    "am_kvgrad_split75": cfg(budget="split", floor=0.75, split=0.75, **KVG),
    "evict_kvgrad_split50": cfg("eviction", budget="split", floor=0.75, split=0.5, **KVG),
    "evict_kvgrad_split25": cfg("eviction", budget="split", floor=0.75, split=0.25, **KVG),
    # combinations on the split budget
    "am_split50_check": cfg(budget="split", floor=0.75, split=0.5, value_fit="check", **KVG),
    "am_split50_bfloor": cfg(budget="split", floor=0.75, split=0.5, beta_floor=-5.0, **KVG),
    "am_split50_check_bfloor": cfg(budget="split", floor=0.75, split=0.5, value_fit="check", beta_floor=-5.0, **KVG),
    "am_split25_check": cfg(budget="split", floor=0.75, split=0.25, value_fit="check", **KVG),
    "am_split50_check_rep3": cfg(budget="split", floor=0.75, split=0.5, value_fit="check",
                                 source_weights={"repeat": 3.0}, **KVG),
    "am_split50_check_anchor1": cfg(budget="split", floor=0.75, split=0.5, value_fit="check", value_anchor=1.0,
                                    **KVG),
    "am_split50_check_bridge01": cfg(budget="split", floor=0.75, split=0.5, value_fit="check", beta_ridge=0.01,
                                     **KVG),
    "am_split50_check_bridge1": cfg(budget="split", floor=0.75, split=0.5, value_fit="check", beta_ridge=1.0,
                                    **KVG),
    "am_split50_check_bridge1e-1": cfg(budget="split", floor=0.75, split=0.5, value_fit="check", beta_ridge=0.1,
                                       **KVG),
    "am_split50_bridge01": cfg(budget="split", floor=0.75, split=0.5, beta_ridge=0.01, **KVG),
    "am_split25_check_bridge01": cfg(budget="split", floor=0.75, split=0.25, value_fit="check", beta_ridge=0.01,
                                     **KVG),
    "am_split25_select_bridge01": cfg(budget="split", floor=0.75, split=0.25, value_fit="select", beta_ridge=0.01,
                                      **KVG),
    # levers 4, 3, 2, 6 on the quality preset (split 0.25, value check, beta ridge 0.01)
    "q_ss": cfg(budget="split", floor=0.75, split=0.25, value_fit="check", beta_ridge=0.01, variant="ss", **KVG),
    "q_rand": cfg(budget="split", floor=0.75, split=0.25, value_fit="check", beta_ridge=0.01, variant="rand", **KVG),
    "q_rep75": cfg(budget="split", floor=0.75, split=0.25, value_fit="check", beta_ridge=0.01, variant="rep75",
                   **KVG),
    "q_onpolicy3": cfg(budget="split", floor=0.75, split=0.25, value_fit="check", beta_ridge=0.01, on_policy=3,
                       **KVG),
    "q_omp": cfg(budget="split", floor=0.75, split=0.25, value_fit="check", beta_ridge=0.01, selection="omp",
                 omp_keys=4, omp_refit=2, **KVG),
    "q_sens": cfg(budget="split", floor=0.75, split=0.25, value_fit="check", beta_ridge=0.01, sens=True, **KVG),
    "q_w_rep3": cfg(budget="split", floor=0.75, split=0.25, value_fit="check", beta_ridge=0.01,
                    source_weights={"repeat": 3.0}, **KVG),
    "q_anchor1": cfg(budget="split", floor=0.75, split=0.25, value_fit="check", beta_ridge=0.01, value_anchor=1.0,
                     **KVG),
    # lever 5: fits that respect recall (on am_kvgrad_global0)
    "am_kvgrad_w_rep3": cfg(source_weights={"repeat": 3.0}, **KVG),
    "am_kvgrad_w_ctx3": cfg(source_weights={"context": 3.0}, **KVG),
    "am_kvgrad_bfloor": cfg(beta_floor=-5.0, **KVG),
    "am_kvgrad_anchor1": cfg(value_anchor=1.0, **KVG),
    "am_kvgrad_anchor10": cfg(value_anchor=10.0, **KVG),
    "am_kvgrad_check": cfg(value_fit="check", **KVG),
    "am_kvgrad_betaonly": cfg(value_fit="none", **KVG),
    "am_kvgrad_ridge1e-2": cfg(ridge=1e-2, **KVG),
    "am_kvgrad_bridge01": cfg(beta_ridge=0.01, **KVG),
    "am_kvgrad_bridge1": cfg(beta_ridge=1.0, **KVG),
    # lever 4: query sources
    "am_kvgrad_rep75": cfg(variant="rep75", **KVG),
    "am_kvgrad_ss": cfg(variant="ss", **KVG),
    "am_kvgrad_rand": cfg(variant="rand", **KVG),
    # lever 3: on-policy (3 layer groups)
    "am_kvgrad_onpolicy3": cfg(on_policy=3, **KVG),
    # lever 2: OMP key selection (OMP-fast: 4 keys per step, NNLS refit every 2 steps)
    "am_omp_global0": cfg(selection="omp", omp_keys=4, omp_refit=2, **KVG),
    # lever 6: budgets from measured sensitivity (layer units, measured once on macbeth at 10x, applied to all texts)
    "am_kvgrad_sens": cfg(sens=True, **KVG),
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
    if cap.repeat_ids is not None:
        t["repeat_ids"], t["repeat_keep"] = cap.repeat_ids.contiguous(), cap.repeat_keep.contiguous()
    for name, x in (cap.probe or {}).items():
        t[f"probe.{name}"] = x.contiguous()
    save_file(t, str(path))


def load_capture(path: Path, device="cpu"):
    from safetensors.torch import load_file

    from compactor.capture.prefill import Capture

    t = load_file(str(path))
    L = sum(1 for k in t if k.startswith("keys."))
    probe = {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith("probe.")} or None
    dev = lambda x: x.to(device)  # noqa: E731  (the probe stays on the CPU, as a fresh capture's does)
    return Capture([dev(t[f"keys.{i}"]) for i in range(L)], [dev(t[f"values.{i}"]) for i in range(L)],
                   [dev(t[f"queries.{i}"]) for i in range(L)], dev(t["query_pos"]), dev(t["query_source"]),
                   float(t["scale"]), probe, t.get("repeat_ids"), t.get("repeat_keep"))


def get_capture(lm, name: str, ids: torch.Tensor, T: int, variant: str, args):
    """The capture of a text for a capture variant, from the disk cache when present."""
    from compactor.capture.prefill import prefill_and_capture

    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"qm_{name}_T{T}_q{args.max_queries}_{variant}.safetensors"
    if path.exists():
        return load_capture(path, lm.model.device), json.loads(path.with_suffix(".json").read_text())
    base = None
    if variant != "base":
        base, base_info = get_capture(lm, name, ids, T, "base", args)
    t0 = time.perf_counter()
    kw = dict(max_queries=args.max_queries, seed=0, progress=True, probe="gradient" if base is None else "none",
              **VARIANTS[variant])
    cap = prefill_and_capture(lm.model, lm.tokenizer, ids[:T], **kw)
    info = {"capture_s": round(time.perf_counter() - t0, 1)}
    if base is not None:  # same document, same keys: the probe does not depend on the reference queries
        cap.probe = base.probe
        info["capture_s"] = round(info["capture_s"] + base_info["capture_s"], 1)
    save_capture(path, cap)
    path.with_suffix(".json").write_text(json.dumps(info))
    return cap, info


SENS_TEXT, SENS_RATIO = "macbeth", 10.0


def sensitivity(lm, args, method, c: dict) -> torch.Tensor:
    """(L, H) score multipliers from layer sensitivities measured once on SENS_TEXT (cached in benchmarks/out)."""
    from compactor.evaluation.harness import Evaluator
    from compactor.evaluation.sensitivity import Sensitivity, measure_sensitivity, sensitivity_weights

    path = OUT / f"sensitivity_{SENS_TEXT}_T{args.T}_{method.score}_{c['budget']}_r{SENS_RATIO:g}.json"
    if not path.exists():
        ids = text_ids(lm, SENS_TEXT, args.T + args.C)
        cap, _ = get_capture(lm, SENS_TEXT, ids, args.T, "base", args)
        t0 = time.perf_counter()
        sens = measure_sensitivity(Evaluator(lm.model, lm.tokenizer, cap, ids, C=args.C), method, SENS_RATIO,
                                   c["budget"], c["floor"], split_share=c["split"])
        path.write_text(json.dumps({**sens.as_dict(), "seconds": round(time.perf_counter() - t0, 1)}))
    d = json.loads(path.read_text())
    sens = Sensitivity(torch.tensor(d["d_ckl"]), torch.tensor(d["d_ret"]), d["unit"], d["shrink"], d["ratio"])
    return sensitivity_weights(sens)


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
    from compactor.capture.on_policy import OnPolicyQueries
    from compactor.pipeline import compact_capture

    torch.set_num_threads(args.threads)
    lm = load_model(args.model, device=args.device,
                    dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype])
    configs = args.configs.split(",")
    for c in configs:
        if c not in CONFIGS:
            raise SystemExit(f"unknown config {c!r}; known: {', '.join(CONFIGS)}")
    ratios = [float(r) for r in args.ratios.split(",")]
    for text in args.texts.split(","):
        ids = text_ids(lm, text, args.T + args.C)
        evaluators = {}
        for cname in configs:
            c = CONFIGS[cname]
            budget, floor, variant = c["budget"], c["floor"], c["variant"]
            cap, info = get_capture(lm, text, ids, args.T, variant, args)
            if "ev" not in evaluators:
                evaluators["ev"] = Evaluator(lm.model, lm.tokenizer, cap, ids, C=args.C)
            ev = evaluators["ev"]  # references depend on the document only; fidelity uses the same keys
            method = make_method(c["method"], **c["params"])
            weights = sensitivity(lm, args, method, c) if c["sens"] else None
            rows = []
            for ratio in ratios:
                t0 = time.perf_counter()
                cap.attention_stats("full")  # shared, not timed per config (see capture_s / score_s)
                t_score = time.perf_counter() - t0
                t0 = time.perf_counter()
                op = OnPolicyQueries(lm.model, cap, c["on_policy"]) if c["on_policy"] > 1 else None
                layers, budgets = compact_capture(cap, method, ratio, budget, floor, progress=False, on_policy=op,
                                                  score_weights=weights, split_share=c["split"])
                secs = time.perf_counter() - t0
                row = ev.score(layers, method.name, ratio, secs).as_dict()
                row.update(text=text, T=args.T, config=cname, budget=budget, floor=floor, variant=variant,
                           params=method.params(), on_policy=c["on_policy"], sens=c["sens"], split=c["split"],
                           ce_full=ev.ce_full, ce_none=ev.ce_none,
                           capture_s=info["capture_s"], score_s=round(t_score, 2),
                           max_head=int(budgets.max()), min_head=int(budgets.min()))
                rows.append(row)
                print(f"{text} {cname:28s} {ratio:4g}x cKL {row['ckl']:.4f} ret {row['retention']:.3f} "
                      f"stored {row['full_bytes'] / row['stored_bytes']:.1f}x mem "
                      f"{row['full_bytes'] / row['memory_bytes']:.1f}x {secs:.1f}s", flush=True)
            save_rows(rows)


# kvpress 0.5.5 on held-out text (the table; cKL / pooled retention), for reference only (other tokens)
KVPRESS = {2: ("0.0165 / 0.73", "0.0065 / 1.00"), 5: ("0.064 / 0.41", "0.057 / 0.99"),
           10: ("0.116 / 0.25", "0.137 / 0.95"), 20: ("0.193 / 0.12", "0.233 / 0.77"),
           50: ("0.217 / 0.07", "0.368 / 0.21")}
GOALS = {10: (0.04, 0.97), 20: (0.065, 0.85), 50: (0.10, 0.40)}


def pooled(rows: list[dict]) -> dict:
    """Over texts: mean cKL, pooled retention (sum CE_none - sum CE_c) / (sum CE_none - sum CE_full), mean bytes."""
    none, full, c = (sum(r[k] for r in rows) for k in ("ce_none", "ce_full", "ce"))
    n = len(rows)
    return {"ckl": sum(r["ckl"] for r in rows) / n, "retention": (none - c) / (none - full),
            "stored": sum(r["full_bytes"] / r["stored_bytes"] for r in rows) / n,
            "memory": sum(r["full_bytes"] / r["memory_bytes"] for r in rows) / n,
            "stored_bytes": sum(r["stored_bytes"] for r in rows) / n,
            "memory_bytes": sum(r["memory_bytes"] for r in rows) / n,
            "seconds": sum(r["seconds"] for r in rows) / n, "texts": n}


def groups(rows: list[dict], T: int) -> dict:
    """(config, ratio) -> pooled numbers over the texts that have every config of the comparison."""
    out: dict = {}
    for r in rows:
        if r["T"] == T:
            out.setdefault((r["config"], r["ratio"]), []).append(r)
    return out


QUALITY_CONFIG = "q_rep75"  # the quality preset (compactor/fitting/presets.py PRESETS["quality"])
SUMMARY = [(QUALITY_CONFIG, "quality preset"), ("am_split25_check_bridge01", "previous quality preset (50% repeat)"), ("am_rms_layer", "AM today (fast)"),
           ("evict_rms_layer", "eviction, today's scores/budgets"),
           ("evict_kvgrad_split25", "eviction, the quality preset's keys"),
           ("evict_kvgrad_split50", "eviction, split 0.5 keys"),
           ("am_kvgrad_global0", "AM, kvgrad scores, one global budget")]


def summary(g: dict, T: int) -> list[str]:
    """Per ratio: the quality preset against AM today, the evictions and the issue's kvpress numbers."""
    ratios = sorted({r for _, r in g})
    head = "| ratio | " + " | ".join(f"{label}: cKL / ret / stored x / memory x" for _, label in SUMMARY) + \
        " | kvpress ExpectedAttention | kvpress KVgrad | goal |"
    lines = [f"### Summary, T = {T} (pooled over the texts each cell has; kvpress: the issue's held-out text)", "",
             head, "|---:|" + "---|" * (len(SUMMARY) + 3)]
    for ratio in ratios:
        cells = []
        for cfg, _ in SUMMARY:
            rs = g.get((cfg, ratio))
            if rs:
                p = pooled(rs)
                cells.append(f"{p['ckl']:.4f} / {p['retention']:.2f} / {p['stored']:.1f} / {p['memory']:.1f} "
                             f"({p['texts']}t)")
            else:
                cells.append("")
        ea, kg = KVPRESS.get(int(ratio), ("", ""))
        goal = GOALS.get(int(ratio))
        goal = f"<= {goal[0]} / >= {goal[1]}" if goal else ""
        lines.append(f"| {ratio:g} | " + " | ".join(cells) + f" | {ea} | {kg} | {goal} |")
    return lines + [""]


def write_report(rows: list[dict], args) -> None:
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
               f"{platform.python_version()}")
    lines = [f"# Quality mode (issue 9): recall and continuation at 2-50x",
             "", f"- date: {datetime.date.today().isoformat()}", f"- machine: {machine}",
             f"- command: `python benchmarks/bench_quality_mode.py ...` (cells as listed below), then "
             f"`python benchmarks/bench_quality_mode.py --report`",
             "- model: smollm2-135m; C=256; metrics of DESIGN.md; pooled retention = (sum CE_none - sum CE_c) / "
             "(sum CE_none - sum CE_full) over the texts of a cell; cKL = mean over texts; bytes = mean over texts "
             "(x = full 16-bit cache / bytes); `s` = compaction seconds on this CPU (prefill, probe and key "
             "statistics excluded, see capture seconds)", ""]
    notes = Path(args.out).with_name("results_quality_notes.md")
    if notes.exists():  # the hand-written reading of the numbers (levers, predictions, look back, GPU command)
        lines += [notes.read_text().strip(), ""]
    for T in sorted({r["T"] for r in rows}):
        g = groups(rows, T)
        lines += summary(g, T)
        texts = sorted({r["text"] for r in rows if r["T"] == T})
        lines += [f"## T = {T} (texts: {', '.join(texts)})", "",
                  "| config | ratio | texts | cKL | retention | stored x | memory x | compact s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for (cfg, ratio), rs in sorted(g.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            p = pooled(rs)
            lines.append(f"| {cfg} | {ratio:g} | {p['texts']} | {p['ckl']:.4f} | {p['retention']:.3f} | "
                         f"{p['stored']:.1f} | {p['memory']:.1f} | {p['seconds']:.1f} |")
        lines += ["", "Per text (cKL / retention):", "",
                  "| config | ratio | " + " | ".join(texts) + " |", "|---|---:|" + "---:|" * len(texts)]
        for (cfg, ratio), rs in sorted(g.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            by = {r["text"]: r for r in rs}
            cells = [f"{by[t]['ckl']:.4f} / {by[t]['retention']:.2f}" if t in by else "" for t in texts]
            lines.append(f"| {cfg} | {ratio:g} | " + " | ".join(cells) + " |")
        lines.append("")
        caps = {(r["text"], r["variant"]): r["capture_s"] for r in rows if r["T"] == T}
        lines.append("Capture seconds (prefill + reference queries + reconstruction probe with gradients, this CPU, "
                     "shared with other jobs): " + ", ".join(f"{t}/{v} {s:.0f} s" for (t, v), s in sorted(caps.items()))
                     + "")
        lines.append("")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    plot(rows, Path(args.out).with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e .[plot])")
        return
    Ts = sorted({r["T"] for r in rows})
    fig, axes = plt.subplots(len(Ts), 2, figsize=(13, 5 * len(Ts)), squeeze=False)
    for row_axes, T in zip(axes, Ts):
        g = groups(rows, T)
        names = sorted({c for c, _ in g})
        colors = plt.get_cmap("tab20")
        for i, cfg in enumerate(names):
            pts = sorted((pooled(rs) for (c, _), rs in g.items() if c == cfg), key=lambda p: p["stored_bytes"])
            style = "--" if cfg.startswith("evict") else "-"
            for ax, key in zip(row_axes, ("ckl", "retention")):
                ax.plot([p["stored_bytes"] for p in pts], [p[key] for p in pts], style, marker="os^v"[i // 20 % 4],
                        ms=3, color=colors(i % 20), label=cfg, lw=2.5 if cfg == QUALITY_CONFIG else 1.2)
        for ax, key in zip(row_axes, ("cKL (nats/token, lower is better)", "pooled recall retention")):
            ax.set_xscale("log")
            ax.set_xlabel("stored bytes (mean over texts)")
            ax.set_ylabel(key)
            ax.set_title(f"T={T}")
            ax.grid(alpha=0.3)
        row_axes[0].set_yscale("log")
        row_axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


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
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the whole grid: see results_quality.md)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="model dtype (float32 keeps GPU numbers comparable with the CPU ones)")
    ap.add_argument("--report", action="store_true", help="write results_quality.md/.png from the stored rows")
    ap.add_argument("--out", default="benchmarks/results_quality.md")
    args = ap.parse_args()
    if args.report:
        write_report(load_rows(), args)
        return
    run(args)


if __name__ == "__main__":
    main()
