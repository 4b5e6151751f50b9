"""Where the ragged attention op spends its time, and which launch settings win (H100; bench_serving_kernel.py's shapes).

1. GPU correctness checks of the current kernels (bench_serving_kernel.run_checks);
2. per-kernel time split (torch.profiler, CUDA activity) of _rotate/_partial/_combine for decode and prefill;
3. µs/layer (CUDA-graph replays over layers beyond L2) of the current kernels, and of a baseline copy of the
   module if one is importable as compactor.kernels.ragged_attention_old (e.g. `git show main:kernels/...`);
4. decode variants of the current kernels (fused merge; lloyd centroids by the select chain; rotations with
   the stored dense R);
5. a sweep of decode/prefill settings (programs per SM, key block, warps);
and the same-size copy of each layer's stored bytes (the decode ceiling; % = copy µs / kernel µs).

    python benchmarks/profile_ragged.py --T 32768 --ratio 10 20 --deadline 240
"""
from __future__ import annotations

import argparse
import ast
import importlib
import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_serving_kernel as bench  # noqa: E402

Hq, Hkv, d = 32, 8, 128


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[32768])
    ap.add_argument("--ratio", type=int, nargs="+", default=[10])
    ap.add_argument("--cases", nargs="+", default=["decode", "decode B=8", "prefill"])
    ap.add_argument("--no-variants", action="store_true")
    ap.add_argument("--codecs", nargs="+", default=["16", "K4V4", "q4_0"])
    ap.add_argument("--deadline", type=float, default=240.0)
    ap.add_argument("--no-checks", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--knob", nargs="*", default=[], help="NAME=VALUE module settings of the new kernel, e.g. "
                    "_DECODE_SWAP=True (a Python literal)")
    ap.add_argument("--variant", nargs="*", default=None,
                    help="decode variants replacing the default list, each NAME=K:V,K:V (K starting with _ a module "
                         "setting, else a launcher keyword; V a Python literal)")
    args = ap.parse_args()
    new = importlib.import_module("compactor.kernels.ragged_attention")
    bench.set_knobs(new, args.knob)
    try:
        old = importlib.import_module("compactor.kernels.ragged_attention_old")
    except ImportError:
        old = None
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    cpu_gen = torch.Generator().manual_seed(0)
    log = bench.log
    rows = []

    def over():
        return time.time() - bench.START > args.deadline

    if not args.no_checks:
        log("== correctness ==")
        _, ok = bench.run_checks(new, False)
        log("checks", "OK" if ok else "FAILED")

    def layers_of(T, codec, n):
        return [bench.random_prefix(bench.ragged_lengths(T, ratio, Hkv, cpu_gen), codec, d, dev, gen)
                for _ in range(n)]

    def fns_of(mod, prefixes, B, Lq, L_app, **kw):
        return bench.op_fns(mod, prefixes, B, Hq, Hkv, d, Lq, L_app, gen, **kw)

    def split(fns):
        """Mean µs per call of each kernel name over eager calls of fns."""
        for f in fns[:2]:
            f()
        torch.cuda.synchronize()
        from torch.profiler import ProfilerActivity, profile

        try:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for f in fns:
                    f()
                torch.cuda.synchronize()
            tot = defaultdict(float)
            for e in prof.events():
                if e.device_type.name == "CUDA":
                    tot[e.name] += e.time_range.elapsed_us()
            return {k: v / len(fns) for k, v in tot.items()}
        except Exception as exc:  # the profiler is a diagnostic: never lose the run to it
            return {f"profiler-{type(exc).__name__}": 0.0}

    def fmt(sp):
        return " ".join(f"{k.strip('_').split('_kernel')[0]}={v:.1f}" for k, v in sorted(sp.items()))

    cases = [c for c in [("decode", 1, 1, 64), ("decode B=8", 8, 1, 64), ("prefill", 1, 256, 256)]
             if c[0] in args.cases]
    copy = {}
    for T, ratio in [(T, r) for T in args.T for r in args.ratio]:
        for codec in args.codecs:
            if over():
                log("deadline: skipped", T, ratio, codec)
                continue
            probe = layers_of(T, codec, 1)[0]
            nb = probe.nbytes()
            n_layers = bench.n_layers_for(nb)
            prefixes = [probe] + layers_of(T, codec, n_layers - 1)
            copy[T, ratio, codec] = bench.same_size_copy_us(nb)
            log(f"T={T} r={ratio} {codec}: {nb / 1e6:.2f} MB/layer, same-size copy {copy[T, ratio, codec]:.2f} us")
            for name, B, Lq, L_app in cases:
                if over():
                    log("deadline: skipped", T, codec, name)
                    continue
                ps = prefixes if Lq == 1 else prefixes[:4]
                kw = dict(min_ms=40, trials=3) if Lq > 1 else {}
                us_new = bench.time_us(fns_of(new, ps, B, Lq, L_app), **kw)
                us_old = bench.time_us(fns_of(old, ps, B, Lq, L_app), **kw) if old else float("nan")
                sp_new = split(fns_of(new, ps[:8], B, Lq, L_app))
                sp_old = split(fns_of(old, ps[:8], B, Lq, L_app)) if old else {}
                log(f"T={T} r={ratio} {codec:5s} {name:10s}: new {us_new:8.2f} us  old {us_old:8.2f} us | new split "
                    f"{fmt(sp_new)} | old split {fmt(sp_old)}")
                rows.append((T, ratio, codec, name, us_old, us_new))
            if not args.no_variants and ratio == args.ratio[0] and not over():
                flip = not new._DECODE_SWAP
                variants = [("fused merge", dict(_FUSE_COMBINE=True), {}),
                            ("transposed products" if flip else "plain products", dict(_DECODE_SWAP=flip), {}),
                            ("1 stage", {}, dict(num_stages=1)), ("3 stages", {}, dict(num_stages=3))]
                if args.variant is not None:
                    variants = []
                    for spec in args.variant:
                        vname, _, body = spec.partition("=")
                        pairs = [kv.split(":", 1) for kv in body.split(",") if kv]
                        variants.append((vname, {k: ast.literal_eval(v) for k, v in pairs if k.startswith("_")},
                                         {k: ast.literal_eval(v) for k, v in pairs if not k.startswith("_")}))
                elif codec.startswith("K"):
                    variants += [("select chain", dict(_LLOYD_LUT=False), {}),
                                 ("select chain, dense R", dict(_LLOYD_LUT=False, _HADAMARD=False), {})]
                for vname, knobs, kw in variants:
                    saved = {k: getattr(new, k) for k in knobs}
                    for k, v in knobs.items():
                        setattr(new, k, v)
                    try:
                        us = bench.time_us(fns_of(new, prefixes, 1, 1, 64, **kw))
                        sp = split(fns_of(new, prefixes[:8], 1, 1, 64, **kw))
                        log(f"  variant T={T} r={ratio} {codec} decode {vname}: {us:.2f} us | split {fmt(sp)}")
                        rows.append((T, ratio, codec, f"decode ({vname})", float("nan"), us))
                    except Exception as exc:
                        log(f"  variant {vname}: {type(exc).__name__} {str(exc)[:150]}")
                    finally:
                        for k, v in saved.items():
                            setattr(new, k, v)
            if args.no_sweep:
                continue
            # decode sweep
            grid = [(pps, bn, 2, w) for pps in (1, 2, 4) for bn in (64, 128) for w in (4, 8)]
            best = None
            for pps, bn, st, w in grid:
                if over():
                    break
                new._PROGRAMS_PER_SM = pps
                try:
                    us = bench.time_us(fns_of(new, prefixes, 1, 1, 64, block_n=bn, num_stages=st, num_warps=w),
                                       min_ms=30, trials=3)
                except Exception as exc:  # a config that does not compile or launch
                    log(f"  sweep pps={pps} bn={bn} st={st} warps={w}: {type(exc).__name__} {str(exc)[:100]}")
                    continue
                log(f"  sweep decode T={T} {codec} pps={pps} bn={bn} st={st} warps={w}: {us:.2f} us")
                if best is None or us < best[0]:
                    best = (us, pps, bn, st, w)
            log(f"  BEST decode T={T} {codec}: {best}")
            for pps, bn in ((2, 64), (4, 128), (2, 128)):
                if over():
                    break
                new._PROGRAMS_PER_SM = pps
                try:
                    us = bench.time_us(fns_of(new, prefixes[:4], 1, 256, 256, block_n=bn), min_ms=40, trials=3)
                except Exception as exc:
                    log(f"  sweep prefill pps={pps} bn={bn}: {type(exc).__name__} {str(exc)[:100]}")
                    continue
                log(f"  sweep prefill T={T} {codec} pps={pps} bn={bn}: {us:.2f} us")
            new._PROGRAMS_PER_SM = None
            del prefixes
            torch.cuda.empty_cache()
    if copy:
        log(f"copy ceiling (1 GiB device copy): {bench.copy_ceiling_gbs():.0f} GB/s")
    print("\n| T | r | codec | case | old µs | new µs | speed-up | same-size copy µs | % of copy (new) |\n"
          "|---:|---:|---|---|---:|---:|---:|---:|---:|")
    for T, ratio, codec, name, a, b in rows:
        c = copy.get((T, ratio, codec), float("nan"))
        pct = f"{100 * c / b:.0f}%" if name.startswith("decode") else ""
        print(f"| {T} | {ratio} | {codec} | {name} | {a:.2f} | {b:.2f} | {a / b:.2f}x | {c:.2f} | {pct} |")


if __name__ == "__main__":
    main()
