"""Benchmark attention_stats (Triton kernels vs the plain-torch reference) on a CUDA GPU.

Llama-3.1-8B-like shapes by default: d=128, bf16, B=8 (layer, KV-head) problems, n=8192 reference queries,
T in {8192, 32768} cached keys. For each T:
  - correctness: Triton vs the torch reference (float32 math) on the same inputs, relative L2 error of
    out, lse, p_rms and p_max;
  - timing with triton.testing.do_bench (median), rotating over several input sets so the 50 MB L2 does
    not flatter repeated calls; per-pass device times from the torch profiler;
  - achieved TFLOP/s counting 4*n*T*d flops (pass 1: q k^T and p v) + 2*n*T*d (pass 2: q k^T again) per
    problem, against the floor set by a measured bf16 matmul rate on this device.
Prints a markdown table last and writes it (with date, device and command) to --out.

    python benchmarks/bench_attention_stats.py                       # from the repo root, no install needed
    python benchmarks/bench_attention_stats.py --T 8192 --causal --out /tmp/attn.md
"""

import argparse
import datetime
import importlib
import importlib.util
import os
import platform
import shlex
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_module():
    """compactor.kernels.attention_stats if installed, else the file itself (no package import needed)."""
    try:
        return importlib.import_module("compactor.kernels.attention_stats")
    except ImportError:
        pass
    path = os.path.join(REPO, "kernels", "attention_stats.py")
    # loaded by path: a top-level name `kernels` could resolve to the unrelated PyPI package
    spec = importlib.util.spec_from_file_location("compactor_bench_attention_stats", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def rel_l2(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def bench_ms(fn, rep_ms):
    import triton.testing

    # quantiles (not return_mode) works across triton 2.x - 3.x; index 0 is the median
    q = triton.testing.do_bench(fn, warmup=max(25, rep_ms // 4), rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return q[0] if isinstance(q, (list, tuple)) else float(q)


def matmul_rate_tflops(dtype, size=8192, rep_ms=300):
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    ms = bench_ms(lambda: torch.matmul(a, b), rep_ms)
    return 2 * size**3 / (ms * 1e-3) / 1e12


def per_pass_ms(fn, iters=5):
    """Average device time per call of each Triton kernel (by name) from the torch profiler; {} if unavailable."""
    try:
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
        out = {}
        for evt in prof.key_averages():
            for kname in ("_fwd_kernel", "_stats_kernel"):
                if kname in evt.key:
                    t_us = getattr(evt, "device_time_total", None)
                    if t_us is None:
                        t_us = getattr(evt, "cuda_time_total", 0.0)
                    out[kname] = out.get(kname, 0.0) + t_us / 1e3 / iters
        return out
    except Exception as exc:  # profiler quirks must not sink the benchmark
        print(f"  (per-pass profile unavailable: {type(exc).__name__}: {exc})")
        return {}


def rotating(sets, fn):
    """A no-argument callable that runs fn on the next input set each call (defeats L2 reuse)."""
    state = {"i": 0}

    def call():
        s = sets[state["i"] % len(sets)]
        state["i"] += 1
        return fn(*s)

    return call


def make_sets(n_sets, B, n, T, d, dtype, causal, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    sets = []
    for _ in range(n_sets):
        q = torch.randn(B, n, d, device="cuda", dtype=dtype, generator=g)
        k = torch.randn(B, T, d, device="cuda", dtype=dtype, generator=g)
        v = torch.randn(B, T, d, device="cuda", dtype=dtype, generator=g)
        # Llama-like logit spread: a few keys stand out (attention sinks), most are diffuse
        k[:, :4] *= 3.0
        qpos = None
        if causal:  # sorted positions spread over the document, like context (self-study) queries
            qpos = torch.linspace(0, T - 1, n, device="cuda").round().to(torch.int64)
        sets.append((q, k, v, qpos))
    return sets


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, default=8, help="problems per call ((layer, KV-head) pairs)")
    ap.add_argument("--n", type=int, default=8192, help="reference queries per problem")
    ap.add_argument("--T", type=int, nargs="+", default=[8192, 32768], help="cached keys per problem")
    ap.add_argument("--d", type=int, default=128, help="head dim")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--causal", action="store_true", help="sorted query_pos over [0, T) (flops still counted dense)")
    ap.add_argument("--sets", type=int, default=3, help="input sets rotated through while timing")
    ap.add_argument("--rep-ms", type=int, default=500, help="do_bench measuring time per timing")
    ap.add_argument("--skip-torch-timing", action="store_true", help="time only Triton (still checks correctness)")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results_attention_stats.md"))
    args = ap.parse_args()

    if not torch.cuda.is_available():
        sys.exit("bench_attention_stats.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                 "on CPU run the tests instead: pytest tests/test_attention_stats.py")
    try:
        import triton
    except ImportError:
        sys.exit("bench_attention_stats.py needs the `triton` package")

    mod = load_module()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    dev_name = torch.cuda.get_device_name()
    B, n, d = args.B, args.n, args.d
    scale = d**-0.5
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    print(f"device: {dev_name} | torch {torch.__version__} | triton {triton.__version__} | {cmd}")

    mm_tflops = matmul_rate_tflops(torch.bfloat16 if dtype == torch.float32 else dtype)
    print(f"measured {'bf16' if dtype == torch.float32 else args.dtype} matmul rate (8192^3): {mm_tflops:.0f} TFLOP/s")

    rows, pass_rows, checks = [], [], []
    for T in args.T:
        print(f"\n== B={B} n={n} T={T} d={d} {args.dtype}{' causal' if args.causal else ''} ==")
        sets = make_sets(max(1, args.sets), B, n, T, d, dtype, args.causal, seed=T)
        flops_p1 = 4.0 * n * T * d  # per problem
        flops_p2 = 2.0 * n * T * d
        floor_ms = (flops_p1 + flops_p2) / (mm_tflops * 1e12) * 1e3  # per problem

        # correctness on set 0 (also triggers compilation / autotuning before timing)
        q, k, v, qpos = sets[0]
        tri = mod.attention_stats_triton(q, k, v, scale, qpos)
        torch.cuda.synchronize()
        ref = mod.attention_stats_torch(q, k, v, scale, qpos)
        torch.cuda.synchronize()
        errs = {name: rel_l2(getattr(tri, name), getattr(ref, name)) for name in mod.AttentionStats._fields}
        finite = all(bool(torch.isfinite(getattr(tri, name)).all()) for name in mod.AttentionStats._fields)
        # 16-bit: scores are exact products accumulated in float32, only p is rounded for p @ v;
        # float32 inputs run TF32 dots (~1e-3 relative per score)
        f32 = dtype == torch.float32
        tol = {"out": 5e-3 if f32 else 2e-2, "lse": 1e-3 if f32 else 1e-4, "p_rms": 2e-2 if f32 else 1e-2,
               "p_max": 2e-2 if f32 else 1e-2}
        ok = finite and all(errs[k_] < tol[k_] for k_ in tol)
        checks.append(ok)
        print("  rel L2 vs torch reference: " + ", ".join(f"{k_} {e:.2e}" for k_, e in errs.items())
              + f" -> {'OK' if ok else 'MISMATCH'}")
        del tri, ref

        tri_call = rotating(sets, lambda q_, k_, v_, p_: mod.attention_stats_triton(q_, k_, v_, scale, p_))
        ms_tri = bench_ms(tri_call, args.rep_ms)
        passes = per_pass_ms(tri_call)
        impls = [("triton", ms_tri)]
        if not args.skip_torch_timing:
            ref_call = rotating(sets, lambda q_, k_, v_, p_: mod.attention_stats_torch(q_, k_, v_, scale, p_))
            impls.append(("torch reference", bench_ms(ref_call, args.rep_ms)))
        for name, ms in impls:
            per_prob = ms / B
            tflops = (flops_p1 + flops_p2) / (per_prob * 1e-3) / 1e12
            rows.append((T, name, ms, per_prob, tflops, floor_ms, 100.0 * floor_ms / per_prob,
                         errs["out"] if name == "triton" else 0.0, errs["p_rms"] if name == "triton" else 0.0))
            print(f"  {name:16s} {ms:9.3f} ms/call  {per_prob:8.3f} ms/problem  {tflops:7.1f} TFLOP/s  "
                  f"(floor {floor_ms:.3f} ms/problem)")
        for kname, label, fl in (("_fwd_kernel", "pass 1 (out, lse)", flops_p1), ("_stats_kernel", "pass 2 (p_rms, p_max)", flops_p2)):
            if kname in passes:
                per_prob = passes[kname] / B
                tf = fl / (per_prob * 1e-3) / 1e12
                pass_rows.append((T, label, per_prob, tf, fl / (mm_tflops * 1e12) * 1e3))
                print(f"  {label:22s} {per_prob:8.3f} ms/problem  {tf:7.1f} TFLOP/s")
        del sets, tri_call
        if not args.skip_torch_timing:
            del ref_call
        torch.cuda.empty_cache()

    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [
        "# attention_stats benchmark",
        "",
        f"- date: {now}",
        f"- device: {dev_name} (torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()})",
        f"- command: `{cmd}`",
        f"- shapes: B={B} problems, n={n} queries, d={d}, {args.dtype}"
        + (", causal sorted query_pos (flops counted dense)" if args.causal else ", no query_pos"),
        f"- flops per problem: 4·n·T·d (pass 1) + 2·n·T·d (pass 2); floor = those flops at the measured "
        f"{'bf16' if dtype == torch.float32 else args.dtype} matmul rate of {mm_tflops:.0f} TFLOP/s",
        f"- correctness (Triton vs torch reference in float32): {'all OK' if all(checks) else 'MISMATCH, see the log'}",
        "",
        "| T | impl | ms/call | ms/problem | TFLOP/s | floor ms/problem | floor/actual | rel L2 out | rel L2 p_rms |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for T, name, ms, pp, tf, fl, pct, e_out, e_rms in rows:
        err = f"{e_out:.1e} | {e_rms:.1e}" if name == "triton" else "ref | ref"
        lines.append(f"| {T} | {name} | {ms:.3f} | {pp:.3f} | {tf:.1f} | {fl:.3f} | {pct:.0f}% | {err} |")
    if pass_rows:
        lines += ["", "| T | Triton pass | ms/problem | TFLOP/s | floor ms/problem |", "|---:|---|---:|---:|---:|"]
        for T, label, pp, tf, fl in pass_rows:
            lines.append(f"| {T} | {label} | {pp:.3f} | {tf:.1f} | {fl:.3f} |")
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w") as f:
        f.write(table)
    print(f"written to {args.out}")
    if not all(checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
