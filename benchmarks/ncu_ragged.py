"""A target for Nsight Compute: the serving op on one layer of bench_serving_kernel.py's shapes, called a few times.

    ncu --clock-control none --kernel-name regex:_partial_kernel --launch-skip 2 --launch-count 1 --set full \\
        --import-source yes -o k4v4_32k python3 benchmarks/ncu_ragged.py --T 32768 --ratio 10 --codec K4V4

(the first calls compile; ncu's report then gives the launch's stall reasons, occupancy, registers, and per-SASS
line samples with `ncu --import k4v4_32k.ncu-rep --page source --print-source sass --csv`).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_serving_kernel as bench  # noqa: E402

Hq, Hkv, d = 32, 8, 128


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=32768)
    ap.add_argument("--ratio", type=int, default=10)
    ap.add_argument("--codec", default="K4V4")
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--Lq", type=int, default=1)
    ap.add_argument("--L-app", type=int, default=64)
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--knob", nargs="*", default=[], help="NAME=VALUE module settings, e.g. _DECODE_SWAP=True")
    args = ap.parse_args()
    mod = importlib.import_module("compactor.kernels.ragged_attention")
    bench.set_knobs(mod, args.knob)
    dev = torch.device("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    cpu_gen = torch.Generator().manual_seed(0)
    prefix = bench.random_prefix(bench.ragged_lengths(args.T, args.ratio, Hkv, cpu_gen), args.codec, d, dev, gen)
    (fn,) = bench.op_fns(mod, [prefix], args.B, Hq, Hkv, d, args.Lq, args.L_app, gen)
    for _ in range(args.calls):
        fn()
    torch.cuda.synchronize()
    print(f"ncu_ragged: T={args.T} r={args.ratio} {args.codec} B={args.B} Lq={args.Lq}: "
          f"{prefix.nbytes() / 1e6:.2f} MB, {args.calls} calls")


if __name__ == "__main__":
    main()
