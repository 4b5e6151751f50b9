"""Prototype memory against quantization and AM at equal stored bytes (issue 13; results in results_sweep.md).

The claim tested (a public RFC): a bounded prototype memory (m = ceil(T / r) mean keys/values per head, read with a
log-count mass bias) is "22x more accurate than 1-bit QJL" on attention outputs (rel-L2 0.020 vs 0.437).

Part 1, synthetic (the setting such a claim is usually measured in): one head, keys/values/queries iid N(0, 1),
d = 64, T = 2048, 256 queries, softmax scale d^-1/2; attention-output rel-L2 of
  - QJL, b bits per coordinate: keys stored as m = b * d signs of a Gaussian sketch + the fp16 norm (the inner product
    estimator of quant/qjl.py, an unbiased key k^ = |k| sqrt(pi/2)/m S^T sign(S k)), values b-bit Lloyd-Max (the
    codec's lloyd path);
  - prototype memory with as many bytes (16-bit mean keys and values + float32 beta + int32 position per entry).
Part 2, SmolLM2 on a play (T, C as given): every (layer, KV head) of the real cache, scored by the evaluation harness
(attention-output rel-L2 on the continuation's held-out queries, cKL, recall retention, stored bytes) for lloyd
K1V1..K4V4, QJL b = 1..4 (values lloyd b-bit), and prototype memory and AM at the ratios whose stored bytes match
each lloyd storage.

    OMP_NUM_THREADS=1 python benchmarks/bench_prototype.py --play macbeth -T 2048 -C 256 --out benchmarks/runs/proto.json
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

from compactor.capture.documents import bundled_play
from compactor.capture.prefill import prefill_and_capture
from compactor.evaluation.harness import Evaluator
from compactor.layer_kv import LayerKV
from compactor.methods import make_method, method_from_options
from compactor.methods.prototype_memory import PrototypeMemory
from compactor.models import load_model
from compactor.pipeline import compact_capture, probe_for
from compactor.quant.qjl import qjl_encode, qjl_signs, sketch_matrix
from compactor.storage.kv_codec import TensorCodec, parse_kv_bits, roundtrip_tensor


def qjl_keys(keys: torch.Tensor, bits: int, seed: int) -> tuple[torch.Tensor, int]:
    """(n, d) keys as QJL serves them (the unbiased key), and the bytes stored (signs + fp16 norms)."""
    d = keys.shape[-1]
    m = bits * d
    code = qjl_encode(keys.float(), torch.zeros_like(keys, dtype=torch.float32), m=m, seed=seed)
    k_hat = code.rnorm.float()[:, None] * (math.sqrt(math.pi / 2) / m) * (qjl_signs(code) @ sketch_matrix(m, d, seed))
    return k_hat, code.nbytes


def rel_l2(q, keys, values, ckeys, cbeta, cvalues, scale) -> float:
    q = q.double()
    full = torch.softmax(scale * q @ keys.double().T, -1) @ values.double()
    comp = torch.softmax(scale * q @ ckeys.double().T + cbeta.double(), -1) @ cvalues.double()
    return float((comp - full).norm() / full.norm())


def synthetic(T=2048, d=64, n=256, seed=0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    keys, values, q = (torch.randn(x, d, generator=g) for x in (T, T, n))
    scale = d ** -0.5
    rows = []
    for b in (1, 2, 3, 4):
        k_hat, k_bytes = qjl_keys(keys, b, seed)
        v_hat = roundtrip_tensor(values, TensorCodec("lloyd", b, 0), "bfloat16", seed)
        v_bytes = T * (math.ceil(d * b / 8) + 2)  # codes + fp16 gain per vector (channel means: negligible)
        qjl_bytes = k_bytes + v_bytes
        err = rel_l2(q, keys, values, k_hat, torch.zeros(T), v_hat, scale)
        m = max(1, qjl_bytes // (4 * d + 8))  # prototype entry: 16-bit key + value, float32 beta, int32 position
        c = PrototypeMemory().compact(keys, values, None, m)
        perr = rel_l2(q, keys, values, c.keys, c.beta, c.values, scale)
        # QJL on the keys alone (values exact, 16-bit), the reading "1-bit QJL" most often has
        ko_bytes = k_bytes + T * d * 2
        ko_err = rel_l2(q, keys, values, k_hat, torch.zeros(T), values, scale)
        m2 = max(1, ko_bytes // (4 * d + 8))
        c2 = PrototypeMemory().compact(keys, values, None, m2)
        rows.append({"bits": b, "qjl_bytes": qjl_bytes, "qjl_rel_l2": err, "prototypes": int(m),
                     "prototype_bytes": int(m * (4 * d + 8)), "prototype_rel_l2": perr,
                     "qjl_keys_only_bytes": ko_bytes, "qjl_keys_only_rel_l2": ko_err, "prototypes_ko": int(m2),
                     "prototype_ko_rel_l2": rel_l2(q, keys, values, c2.keys, c2.beta, c2.values, scale)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--play", default="macbeth")
    ap.add_argument("-T", type=int, default=2048)
    ap.add_argument("-C", type=int, default=256)
    ap.add_argument("--preset", default="quality", help="AM's preset (its budget rule and key score)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/runs/prototype.json")
    args = ap.parse_args()
    result = {"synthetic": synthetic(seed=args.seed)}
    for r in result["synthetic"]:
        print(f"synthetic b={r['bits']}: QJL K+V {r['qjl_bytes']:,} B rel-L2 {r['qjl_rel_l2']:.3f} | prototype "
              f"m={r['prototypes']} {r['prototype_bytes']:,} B rel-L2 {r['prototype_rel_l2']:.3f} || QJL keys only "
              f"{r['qjl_keys_only_bytes']:,} B rel-L2 {r['qjl_keys_only_rel_l2']:.3f} | prototype m={r['prototypes_ko']}"
              f" rel-L2 {r['prototype_ko_rel_l2']:.3f}", flush=True)

    lm = load_model("smollm2-135m", device=args.device)
    ids = lm.tokenizer(bundled_play(args.play).text, return_tensors="pt").input_ids[0]
    am = method_from_options("am", args.seed, preset=args.preset)
    from compactor.fitting.presets import preset

    opts = preset(args.preset)["options"]
    t0 = time.perf_counter()
    cap = prefill_and_capture(lm.model, lm.tokenizer, ids[:args.T], seed=args.seed, progress=False,
                              probe=probe_for(am))
    ev = Evaluator(lm.model, lm.tokenizer, cap, ids, C=args.C)
    print(f"capture + references {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []

    def add(row, label, extra=None):
        d = {**row.as_dict(), "config": label, **(extra or {})}
        rows.append(d)
        print(f"{label:>18}: stored {d['stored_bytes']:>10,} B  rel-L2 {d['out_err']:.3f}  cKL {d['ckl']:.4f}  "
              f"retention {d['retention']:.3f}", flush=True)

    run = lambda m, r, bits: ev.run([m], [r], opts.get("budget", "layer"), opts.get("budget_floor", 0.75),  # noqa
                                    progress=False, kv_bits=[bits], seed=args.seed,
                                    split_share=opts.get("split_share", 0.5))[0]
    full = run(make_method("streaming"), 1.0, "16")
    add(full, "16-bit (full)")
    L = len(cap.keys)
    full_layers, _ = compact_capture(cap, make_method("streaming"), 1.0, progress=False)
    for b in (1, 2, 3, 4):
        lloyd = run(make_method("streaming"), 1.0, f"K{b}V{b}")
        add(lloyd, f"lloyd K{b}V{b}")
        # QJL keys (b * d sign bits + fp16 norm), lloyd b-bit values: scored with raw keys, then the key bytes swapped
        layers, qjl_bytes = [], 0
        for l, layer in enumerate(full_layers):
            k = torch.stack([qjl_keys(layer.keys[h], b, args.seed * 1000 + l * 16 + h)[0]
                             for h in range(layer.keys.shape[0])])
            qjl_bytes += sum(qjl_keys(layer.keys[h], b, 0)[1] for h in range(layer.keys.shape[0]))
            layers.append(LayerKV(k, layer.values, layer.beta, layer.positions, layer.lengths, layer.importance))
        row = ev.score(layers, "qjl", 1.0, 0.0, [parse_kv_bits(f"K16V{b}")] * L, seed=args.seed)
        raw_keys = sum(int(x.lengths.sum()) * x.keys.shape[-1] * 2 for x in full_layers)
        row.stored_bytes = row.stored_bytes - raw_keys + qjl_bytes
        add(row, f"QJL{b} + V{b}")
        ratio = full.stored_bytes / lloyd.stored_bytes
        add(run(make_method("prototype"), ratio, "16"), f"prototype r={ratio:.1f}", {"matches": f"K{b}V{b}"})
        add(run(am, ratio, "16"), f"AM r={ratio:.1f}", {"matches": f"K{b}V{b}"})
    result["smollm2"] = {"play": args.play, "T": args.T, "C": args.C, "preset": args.preset, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
