"""GPU timing of the whole compaction path (prefill, capture, scoring, batched fits) against the device's ceilings.

For random-weight models with real shapes (Llama-3.1-8B, Qwen3-4B; bf16) and document lengths T it measures, in one
run on one GPU:
- ceilings: bf16 matmul (TFLOP/s) and device copy (GB/s, bytes read + written), the rates every floor below uses;
- kernels: the fit-product kernels (kernels/fit_products.py) on a layer of the 8B shape at T=32k (t=3277): error
  against the torch reference on fresh random inputs, time, floor (bytes over the copy rate or flops over the
  matmul rate, the larger), share of the floor reached;
- per model and T: plain prefill (sdpa, chunks), plain prefill of document + repeat pass, prefill with query
  capture, key scoring, the batched AM compaction (whole cache, end to end through compact_capture) and its steps
  (selection, mass shares, beta, values, packing; timed with a device sync after each step, in a second run),
  peak memory, the per-head path (the old loop, exact float64 fits) where T <= --per-head-max-T, and the batched
  OMP-fast at T <= --omp-max-T;
- a synthetic layer at T = 131,072 (random queries/keys, 8B shape) when --synthetic is given: scoring + batched
  fits of one layer, times 32 layers.
Random weights give meaningless text but the real tensor shapes, which is what the timing depends on.

Run (GPU): python benchmarks/bench_compaction_gpu.py               (or `make bench-gpu`; ~6-8 minutes on an H100)
           python benchmarks/bench_compaction_gpu.py --quick       (8B shape, T=8k/32k + synthetic 128k layer)
      CPU: python benchmarks/bench_compaction_gpu.py --dry-run     (toy sizes, torch paths: checks the script runs)
Without an installed package, put the package layout on PYTHONPATH (compactor/ with kernels/ inside it).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch

CONFIGS = {
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # Qwen3-4B's native 40,960 positions, raised to 131,072 (its YaRN-extended length) so that T = 128k runs
    "qwen3-4b": dict(model_type="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     max_position_embeddings=131072, rope_theta=1000000.0, tie_word_embeddings=True),
}


def tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["Repeat the text above, word for word."] * 4, vocab_size=300, special_tokens=["<s>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<s>")


def random_model(name: str, device: str, tiny: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(CONFIGS[name])
    if tiny:  # the CPU dry run: same code path, toy sizes
        kw.update(num_hidden_layers=2, hidden_size=256, intermediate_size=512, vocab_size=1000,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=g)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg).to(device)  # meta init left inv_freq empty
    return model.eval()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def sync_time(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def event_time(fn, reps: int = 10, warmup: int = 2) -> float:
    """Median seconds of fn() over reps (CUDA events; perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1000)
        else:
            times.append(sync_time(fn)[1])
    times.sort()
    return times[len(times) // 2]


def peak_reset():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else float("nan")


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# ceilings and kernels
# ---------------------------------------------------------------------------------------------------------------


def ceilings(device: str, tiny: bool) -> dict:
    """bf16 matmul FLOP/s and copy bytes/s (read + write) measured on this device."""
    n = 512 if tiny else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t_mm = event_time(lambda: a @ b, reps=5 if tiny else 20)
    size = (1 << 20) if tiny else (1 << 30)
    src = torch.empty(size, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    t_cp = event_time(lambda: dst.copy_(src), reps=5 if tiny else 20)
    return {"matmul_flops": 2 * n ** 3 / t_mm, "copy_bytes": 2 * size / t_cp}


def kernel_checks(device: str, ceil: dict, tiny: bool) -> list[dict]:
    """Each fit-product kernel on a layer-sized problem: error vs the torch reference, time, floor, share."""
    from compactor.kernels import fit_products as fp

    B, n, t, d = (2, 256, 100, 64) if tiny else (8, 8192, 3277, 128)
    T_full = t * 10
    g = torch.Generator(device=device).manual_seed(1)
    q = (torch.randn(B, n, d, device=device, generator=g) * 1.5).bfloat16()
    k = torch.randn(B, t, d, device=device, generator=g).bfloat16()
    lse = torch.logsumexp(d ** -0.5 * (q.float() @ k.float().transpose(1, 2)), -1) + math.log(10)
    lengths = torch.full((B,), t, device=device)
    rows = []

    def row(name, fn, ref_fn, bytes_, flops):
        got = fn()
        ref = ref_fn()
        err = float((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))
        sec = event_time(fn, reps=3 if tiny else 10)
        floor = max(bytes_ / ceil["copy_bytes"], flops / ceil["matmul_flops"])
        rows.append(dict(kernel=name, seconds=sec, floor=floor, rel_err=err, shape=f"B={B}, n={n}, t={t}, d={d}",
                         bound="copy" if bytes_ / ceil["copy_bytes"] >= flops / ceil["matmul_flops"] else "matmul"))

    A_bytes = B * n * t * 2
    row("mass_shares (bf16 q,k -> fp16 A)", lambda: fp.mass_shares(q, k, lse, d ** -0.5, lengths),
        lambda: fp.mass_shares_torch(q, k, lse, d ** -0.5, lengths, out_dtype=torch.float32),
        A_bytes + B * (n + t) * d * 2, 2 * B * n * t * d)
    A = fp.mass_shares(q, k, lse, d ** -0.5, lengths)
    x1 = torch.randn(B, t, 1, device=device, generator=g)
    r1 = torch.randn(B, n, 1, device=device, generator=g)
    xd = torch.randn(B, t, d, device=device, generator=g)
    rd = torch.randn(B, n, d, device=device, generator=g)
    row("A @ w (k=1)", lambda: fp.shares_matmul(A, x1), lambda: fp.shares_matmul_torch(A, x1), A_bytes, 2 * B * n * t)
    row("A^T @ r (k=1)", lambda: fp.shares_t_matmul(A, r1), lambda: fp.shares_t_matmul_torch(A, r1), A_bytes,
        2 * B * n * t)
    row("(A*A)^T @ c (k=1)", lambda: fp.shares_t_matmul(A, r1, square=True),
        lambda: fp.shares_t_matmul_torch(A, r1, square=True), A_bytes, 3 * B * n * t)
    row(f"A @ X (k={d})", lambda: fp.shares_matmul(A, xd), lambda: fp.shares_matmul_torch(A, xd), A_bytes,
        2 * B * n * t * d)
    row(f"A^T @ R (k={d})", lambda: fp.shares_t_matmul(A, rd), lambda: fp.shares_t_matmul_torch(A, rd), A_bytes,
        2 * B * n * t * d)
    G_src = (A.float() / A.float().norm(dim=1, keepdim=True).clamp_min(1e-30)).half()
    row("scaled Gram (cuBLAS bmm, fp16)", lambda: torch.bmm(G_src.transpose(1, 2), G_src),
        lambda: torch.bmm(G_src.float().transpose(1, 2), G_src.float()), A_bytes + B * t * t * 2, 2 * B * n * t * t)
    del T_full
    return rows


# ---------------------------------------------------------------------------------------------------------------
# floors of the pipeline steps
# ---------------------------------------------------------------------------------------------------------------


def prefill_flops(cfg, T: int, extra: int = 0) -> float:
    """Forward flops of T tokens (after `extra` earlier tokens): 2 * params per token (no embedding) + attention."""
    h, L, i = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    d, hq, hk = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    per_layer = h * d * (hq + 2 * hk) + hq * d * h + 3 * h * i
    dense = 2 * per_layer * L * T
    # causal attention: q.k and p.v, each 2 * d flops per (query, visible key) pair
    pairs = T * extra + T * (T + 1) / 2
    return dense + 4 * d * hq * L * pairs


def fit_floors(n: int, t: int, d: int, heads: int, ceil: dict, beta_iters: int, value_iters: int) -> dict:
    """Seconds of the floor of each batched fit step for `heads` heads, on the path `use_gram` picks: each term the
    larger of its bytes over the copy rate and its flops over the matmul rate."""
    from compactor.fitting.batched_fits import use_gram

    F, Bw = ceil["matmul_flops"], ceil["copy_bytes"]
    a = n * t * 2  # bytes of one head's float16 shares
    pas = lambda k: max(a / Bw, 2 * n * t * k / F)  # noqa: E731  one product of A with k columns
    g_step = lambda k: max(t * t * 2 / Bw, 2 * t * t * k / F)  # noqa: E731  one product of the float16 Gram
    gram_build = max(2 * n * t * t / F, (a + t * t * 4) / Bw)
    shares = max(2 * n * t * d / F, a / Bw)
    if use_gram(n, t, beta_iters):
        beta = 3 * pas(1) + gram_build + (beta_iters + 3) * g_step(1)
    else:
        beta = (2 * beta_iters + 9) * pas(1)
    if use_gram(n, t, value_iters, d):
        values = 2 * pas(1) + 2 * a / Bw + gram_build + pas(d) + (value_iters + 1) * g_step(d)
    else:
        values = 2 * pas(1) + (2 * value_iters + 3) * pas(d)
    return {"shares": heads * shares, "beta": heads * beta, "values": heads * values}


# ---------------------------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------------------------


def plain_prefill(model, ids: torch.Tensor, chunk: int) -> None:
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        for lo in range(0, ids.numel(), chunk):
            hi = min(lo + chunk, ids.numel())
            model(input_ids=ids[None, lo:hi].to(dev), position_ids=torch.arange(lo, hi, device=dev)[None],
                  past_key_values=cache, use_cache=True, logits_to_keep=1)
    del cache


def run_config(name: str, model, tok, args, ceil: dict, device: str, log) -> list[dict]:
    from compactor.capture.prefill import REPEAT_PROMPT, prefill_and_capture
    from compactor.evaluation.metrics import head_fidelity
    from compactor.fitting.batched_fits import BETA_ITERS, VALUE_ITERS, BatchedFitInfo, use_gram
    from compactor.fitting.budgets import layer_budgets
    from compactor.methods import make_method
    from compactor.methods.batched import omp_layer
    from compactor.pipeline import compact_capture

    cfg = model.config
    L, H, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    rows = []
    # warm-up: Triton compile/autotune, cuBLAS handles; not timed
    warm = torch.randint(0, cfg.vocab_size, (min(args.T),))
    cap = prefill_and_capture(model, tok, warm, chunk_size=args.chunk_size, max_queries=args.max_queries,
                              progress=False)
    compact_capture(cap, make_method("am"), args.ratio, "layer", progress=False, batched=True)
    del cap
    free()
    prompt_len = len(tok(REPEAT_PROMPT, add_special_tokens=False).input_ids)
    for T in args.T:
        if T > cfg.max_position_embeddings:
            log(f"{name} T={T}: longer than the model's {cfg.max_position_embeddings} positions, skipped")
            continue
        r = {"model": name, "T": T}
        ids = torch.randint(0, cfg.vocab_size, (T,), generator=torch.Generator().manual_seed(T))
        peak_reset()
        _, r["prefill_s"] = sync_time(lambda: plain_prefill(model, ids, args.chunk_size))
        r["prefill_peak_gib"] = peak_gib()
        free()
        room = cfg.max_position_embeddings - T - prompt_len
        rep = max(0, min(T, room))
        r["repeat_tokens"] = rep
        r["prefill_floor_s"] = prefill_flops(cfg, T) / ceil["matmul_flops"]
        if rep:
            both = torch.cat([ids, torch.randint(0, cfg.vocab_size, (prompt_len + rep,))])
            _, r["prefill_repeat_s"] = sync_time(lambda: plain_prefill(model, both, args.chunk_size))
            free()
        peak_reset()
        cap, r["capture_s"] = sync_time(lambda: prefill_and_capture(
            model, tok, ids, chunk_size=args.chunk_size, max_queries=args.max_queries, progress=False))
        r["capture_peak_gib"] = peak_gib()
        r["capture_floor_s"] = (prefill_flops(cfg, T) + prefill_flops(cfg, prompt_len + rep, T)) / \
            ceil["matmul_flops"] if rep else r["prefill_floor_s"]
        n = cap.queries[0].shape[1]
        r["n"] = n
        _, r["scoring_s"] = sync_time(lambda: cap.attention_stats("full"))
        r["scoring_floor_s"] = L * H * 6 * n * T * d / ceil["matmul_flops"]
        scores = torch.stack([s.p_rms for s in cap._stats["full"]]).float().cpu()
        t_mean = float(layer_budgets(scores, args.ratio).float().mean())
        r["t"] = t_mean
        # the batched AM, end to end (the goal's number), then the same with a sync after each step
        free()
        peak_reset()
        base = torch.cuda.memory_allocated() / 2 ** 30 if torch.cuda.is_available() else float("nan")
        info = BatchedFitInfo()
        (layers, _), r["am_batched_s"] = sync_time(lambda: compact_capture(
            cap, make_method("am"), args.ratio, "layer", progress=False, batched=True, fit_info=info))
        r["compact_extra_peak_gib"] = peak_gib() - base
        r["beta_fallback"], r["value_fallback"] = info.beta_fallback, info.value_fallback
        r["gram"] = f"{'Gram' if info.gram_calls else 'A'}/{'Gram' if info.value_gram_calls else 'A'}"
        r["kept"] = sum(int(x.lengths.sum()) for x in layers)
        timed = BatchedFitInfo(timings={})
        compact_capture(cap, make_method("am"), args.ratio, "layer", progress=False, batched=True, fit_info=timed)
        r["steps"] = timed.timings
        floors = fit_floors(n, round(t_mean), d, L * H, ceil, BETA_ITERS, VALUE_ITERS)
        r["step_floors"] = floors
        if T <= args.per_head_max_T and not late(args):
            (old, _), r["am_per_head_s"] = sync_time(lambda: compact_capture(
                cap, make_method("am"), args.ratio, "layer", progress=False, batched=False))
            # in-sample agreement on layer 0 (random weights: only a check that both paths fit the same thing)
            errs = {"batched": [], "per_head": []}
            for which, lay in (("batched", layers[0]), ("per_head", old[0])):
                for h in range(H):
                    k = int(lay.lengths[h])
                    errs[which].append(head_fidelity(cap.queries[0][h], cap.keys[0][h], cap.values[0][h],
                                                     lay.keys[h, :k], lay.beta[h, :k], lay.values[h, :k],
                                                     cap.scale))
            for which, e in errs.items():
                r[f"layer0_out_err_{which}"] = sum(x[0] for x in e) / H
                r[f"layer0_mass_err_{which}"] = sum(x[1] for x in e) / H
            del old
        del layers
        free()
        if T <= args.omp_max_T and not late(args):
            stats = cap._stats["full"]
            t_head = math.ceil(T / args.ratio)

            per_group = max(1, args.omp_group_bytes // (H * n * T * 2))  # layers whose shares of all T keys fit

            def omp_all():
                oinfo = BatchedFitInfo()
                for lo in range(0, L, per_group):
                    group = list(range(lo, min(L, lo + per_group)))
                    cat = lambda xs: torch.cat(xs) if len(xs) > 1 else xs[0]  # noqa: E731
                    gstats = type(stats[lo])(*(cat([getattr(stats[l], f) for l in group]) for f in stats[lo]._fields))
                    omp_layer(cat([cap.keys[l] for l in group]), cat([cap.values[l] for l in group]),
                              cat([cap.queries[l] for l in group]), torch.full((H * len(group),), t_head), gstats,
                              cap.scale, info=oinfo)
            peak_reset()
            _, r["omp_s"] = sync_time(omp_all)
            r["omp_peak_gib"] = peak_gib()
        del cap
        free()
        log(json.dumps(r))
        rows.append(r)
    return rows


def synthetic_layer(T: int, args, ceil: dict, device: str, tiny: bool, L: int = 32) -> dict:
    """Scoring + batched AM of one 8B-shaped layer (8 KV heads, n queries, d=128) on random tensors, x L layers."""
    from compactor.fitting.batched_fits import BETA_ITERS, VALUE_ITERS, BatchedFitInfo, use_gram
    from compactor.fitting.key_selection import key_stats
    from compactor.methods.batched import am_layer

    H, d, n = (2, 64, 128) if tiny else (8, 128, args.max_queries)
    g = torch.Generator(device=device).manual_seed(T)
    q = (torch.randn(H, n, d, device=device, generator=g) * 2).bfloat16()
    k = torch.randn(H, T, d, device=device, generator=g).bfloat16()
    v = torch.randn(H, T, d, device=device, generator=g).bfloat16()
    budgets = torch.full((H,), math.ceil(T / args.ratio))
    stats, t_score = sync_time(lambda: key_stats(k, v, q, d ** -0.5))
    am_layer(k, v, q, budgets, stats, stats.p_rms, d ** -0.5)  # warm-up at this shape
    peak_reset()
    base = torch.cuda.memory_allocated() / 2 ** 30 if torch.cuda.is_available() else float("nan")
    _, t_fit = sync_time(lambda: am_layer(k, v, q, budgets, stats, stats.p_rms, d ** -0.5))
    extra = peak_gib() - base
    info = BatchedFitInfo(timings={})
    am_layer(k, v, q, budgets, stats, stats.p_rms, d ** -0.5, info=info)
    t = int(budgets[0])
    # both beta paths on this layer's shares (use_gram picks one; this measures the other too)
    from compactor.fitting.batched_fits import nnls_batched
    from compactor.kernels import mass_shares
    from compactor.methods.batched import select_top_keys
    idx, counts = select_top_keys(stats.p_rms, budgets)
    ksel = torch.gather(k, 1, idx[..., None].expand(-1, -1, d))
    A = mass_shares(q, ksel, stats.lse, d ** -0.5, counts.to(device))
    mask = torch.ones(H, t, dtype=torch.bool, device=device)
    paths = {}
    for gram in (False, True):
        nnls_batched(A, mask, gram=gram)
        _, paths["gram" if gram else "A"] = sync_time(lambda: nnls_batched(A, mask, gram=gram))
    del A
    return {"T": T, "n": n, "t": t, "layers": L, "scoring_s": L * t_score, "fits_s": L * t_fit,
            "beta_paths_s": {key: L * x for key, x in paths.items()},
            "steps": {s: L * x for s, x in info.timings.items()},
            "step_floors": fit_floors(n, t, d, L * H, ceil, BETA_ITERS, VALUE_ITERS),
            "scoring_floor_s": L * H * 6 * n * T * d / ceil["matmul_flops"], "layer_extra_peak_gib": extra,
            "gram": f"{'Gram' if info.gram_calls else 'A'}/{'Gram' if info.value_gram_calls else 'A'}"}


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------


def fmt(x, spec=".2f"):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def report(args, ceil, kernels, rows, synth, device_name: str, elapsed: float) -> str:
    from compactor.fitting.batched_fits import BETA_ITERS, VALUE_ITERS

    out = [f"# GPU compaction timing\n",
           f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
           f"- device: {device_name}, torch {torch.__version__}"
           + (f", triton {__import__('triton').__version__}" if _has_triton() else ""),
           f"- command: `python {' '.join(sys.argv)}` ({elapsed:.0f} s)",
           f"- ratio {args.ratio:g}, layer budgets, {args.max_queries} reference queries per KV head, prefill chunks "
           f"of {args.chunk_size}; AM = highest-attention keys, beta by NNLS, ridge values; batched fits: "
           f"{BETA_ITERS} beta steps, {VALUE_ITERS} value steps, float16 mass shares; random-weight bf16 models, one "
           f"untimed warm-up per model",
           f"- ceilings measured in this run: bf16 matmul {ceil['matmul_flops'] / 1e12:.0f} TFLOP/s, device copy "
           f"{ceil['copy_bytes'] / 1e9:.0f} GB/s (read + write); every floor below is the larger of bytes / copy rate "
           f"and flops / matmul rate\n"]
    out += [f"## Fit-product kernels ({kernels[0]['shape']}: one 8B layer at T=32k, ratio 10)\n",
            "| kernel | ms | floor ms | bound | floor/actual | rel err vs torch |", "|---|---:|---:|---|---:|---:|"]
    for k in kernels:
        out.append(f"| {k['kernel']} | {1e3 * k['seconds']:.3f} | {1e3 * k['floor']:.3f} | {k['bound']} | "
                   f"{100 * k['floor'] / k['seconds']:.0f}% | {k['rel_err']:.1e} |")
    if rows:
        out += ["\n## Whole cache (all layers x KV heads)\n",
                "| model | T | n | mean t | plain prefill s | + repeat pass s | prefill+capture s | scoring s | "
                "AM batched s | AM batched / prefill | AM per-head s | OMP-fast s | peak GiB capture / +compact |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            out.append(f"| {r['model']} | {r['T']} | {r['n']} | {r['t']:.0f} | {r['prefill_s']:.2f} | "
                       f"{fmt(r.get('prefill_repeat_s'))} | {r['capture_s']:.2f} | {r['scoring_s']:.3f} | "
                       f"{r['scoring_s'] + r['am_batched_s']:.3f} | "
                       f"{(r['scoring_s'] + r['am_batched_s']) / r['prefill_s']:.2f} | "
                       f"{fmt(r.get('am_per_head_s'))} | {fmt(r.get('omp_s'))} | "
                       f"{r['capture_peak_gib']:.1f} / +{r['compact_extra_peak_gib']:.1f} |")
        out += ["\n`AM batched s` counts scoring + selection + shares + beta + values + packing for the whole cache "
                "(compact_capture end to end plus the scoring pass); `AM per-head s` is the old per-head loop "
                "(fits only, exact float64).\n",
                "### Steps and their floors (seconds, whole cache; steps timed with a device sync after each)\n",
                "| model | T | prefill (floor) | capture (floor) | scoring (floor) | select | shares (floor) | "
                "beta (floor) | values (floor) | pack | beta/values path | fallbacks beta/values |",
                "|---|---:|---|---|---|---:|---|---|---|---:|---|---|"]
        for r in rows:
            s, f = r["steps"], r["step_floors"]
            out.append(f"| {r['model']} | {r['T']} | {r['prefill_s']:.2f} ({r['prefill_floor_s']:.2f}) | "
                       f"{r['capture_s']:.2f} ({r['capture_floor_s']:.2f}) | {r['scoring_s']:.3f} "
                       f"({r['scoring_floor_s']:.3f}) | {s.get('select', 0):.3f} | {s.get('shares', 0):.3f} "
                       f"({f['shares']:.3f}) | {s.get('beta', 0):.3f} ({f['beta']:.3f}) | {s.get('values', 0):.3f} "
                       f"({f['values']:.3f}) | {s.get('pack', 0):.3f} | {r['gram']} | "
                       f"{r['beta_fallback']}/{r['value_fallback']} |")
        agree = [r for r in rows if "layer0_out_err_batched" in r]
        if agree:
            out += ["\nIn-sample fit on layer 0 (reference queries; random weights, so only a check that the two "
                    "paths fit alike): out err / mass err batched vs per-head: "
                    + "; ".join(f"{r['model']} T={r['T']}: {r['layer0_out_err_batched']:.4f}/"
                                f"{r['layer0_mass_err_batched']:.4f} vs {r['layer0_out_err_per_head']:.4f}/"
                                f"{r['layer0_mass_err_per_head']:.4f}" for r in agree)]
    if synth:
        out += ["\n## Synthetic 8B-shaped cache (random queries/keys; one layer timed, x 32 layers)\n",
                "| T | n | t | scoring s (floor) | fits s | select | shares (floor) | beta (floor) | values (floor) | "
                "beta/values path | beta on A / on Gram | extra peak GiB per layer |",
                "|---:|---:|---:|---|---:|---:|---|---|---|---|---|---:|"]
        for r in synth:
            s, f = r["steps"], r["step_floors"]
            out.append(f"| {r['T']} | {r['n']} | {r['t']} | {r['scoring_s']:.3f} ({r['scoring_floor_s']:.3f}) | "
                       f"{r['fits_s']:.3f} | {s.get('select', 0):.3f} | {s.get('shares', 0):.3f} ({f['shares']:.3f}) "
                       f"| {s.get('beta', 0):.3f} ({f['beta']:.3f}) | {s.get('values', 0):.3f} ({f['values']:.3f}) | "
                       f"{r['gram']} | {r['beta_paths_s']['A']:.3f} / "
                       f"{r['beta_paths_s']['gram']:.3f} | {r['layer_extra_peak_gib']:.2f} |")
    return "\n".join(out) + "\n"


def late(args) -> bool:
    return args.deadline is not None and time.perf_counter() - args.t_start > args.deadline


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:
        return False


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--T", nargs="+", type=int, default=[8192, 32768, 131072])
    ap.add_argument("--ratio", type=float, default=10)
    ap.add_argument("--max-queries", type=int, default=8192)
    ap.add_argument("--chunk-size", type=int, default=4096)
    ap.add_argument("--per-head-max-T", type=int, default=32768, help="run the old per-head path up to this T")
    ap.add_argument("--omp-max-T", type=int, default=8192, help="run the batched OMP-fast up to this T")
    ap.add_argument("--omp-group-bytes", type=int, default=8 << 30,
                    help="OMP-fast takes as many layers at once as fit this many bytes of float16 shares of all keys")
    ap.add_argument("--synthetic", nargs="*", type=int, default=[], help="T of synthetic 8B layers to time")
    ap.add_argument("--quick", action="store_true", help="8B shape, T=8k/32k, per-head at 8k, synthetic 128k layer")
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: checks that the script runs")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds: skip the optional sections (per-head, OMP, synthetic) once past this")
    ap.add_argument("--out", default="benchmarks/results_gpu.md")
    ap.add_argument("--json", default=None, help="also write every number as JSON here")
    args = ap.parse_args(argv)
    try:
        import compactor.kernels  # noqa: F401
    except ImportError as e:
        sys.exit(f"Error: cannot import compactor.kernels ({e}); install the package or put its layout on "
                 "PYTHONPATH (compactor/ with kernels/ inside it)")
    if args.quick:
        args.configs, args.T, args.per_head_max_T = ["llama-3.1-8b"], [8192, 32768], 8192
        args.synthetic = args.synthetic or [32768, 131072]
    if args.dry_run:
        args.configs, args.T, args.max_queries, args.chunk_size = ["llama-3.1-8b"], [256], 128, 128
        args.synthetic = [512]
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("Error: bench_compaction_gpu.py needs a CUDA device (or --dry-run on the CPU)")
    t_start = args.t_start = time.perf_counter()

    def log(msg):
        print(msg, flush=True)

    ceil = ceilings(device, args.dry_run)
    log(f"ceilings: {ceil['matmul_flops'] / 1e12:.1f} TFLOP/s bf16, {ceil['copy_bytes'] / 1e9:.0f} GB/s copy")
    kernels = kernel_checks(device, ceil, args.dry_run)
    for k in kernels:
        log(json.dumps(k))
    tok = tokenizer()
    rows = []
    for name in args.configs:
        model = random_model(name, device, args.dry_run)
        rows += run_config(name, model, tok, args, ceil, device, log)
        del model
        free()
    synth = []
    for T in args.synthetic:
        if late(args):
            log(f"synthetic T={T}: skipped (past the deadline)")
            continue
        synth.append(synthetic_layer(T, args, ceil, device, args.dry_run))
        log(json.dumps(synth[-1]))
        free()
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run: toy sizes, torch paths)"
    text = report(args, ceil, kernels, rows, synth, name, time.perf_counter() - t_start)
    print(text)
    Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"ceilings": ceil, "kernels": kernels, "rows": rows,
                                               "synthetic": synth}, indent=1, default=str))
    return text


if __name__ == "__main__":
    main()
