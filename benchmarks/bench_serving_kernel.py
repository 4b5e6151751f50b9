"""Benchmark (and check on the GPU) the ragged beta-attention kernels that serve a compacted prefix.

Random-weight Llama-3.1-8B attention shape: 32 query heads, 8 KV heads, d=128, bf16. A document of T tokens
compacted r x: each KV head keeps about ceil(T/r) entries, drawn per head like a global budget would
(log-normal spread, sigma 0.5, floor a quarter of the mean), stored 16-bit (bf16), K4V4 (lloyd, 4-bit codes +
fp16 gain + fp16 mean, 2 exact entries per head) or q4_0 (llama.cpp blocks).

1. correctness on the GPU: the Triton kernels against the torch reference (float32, also on the GPU) on fresh
   caches encoded by compactor's own codec (every codec, GQA 1-8, ragged heads, left padding, decode and
   prefill), outputs poisoned with NaN first; and the reference against float64 over compactor's decoder;
2. decode (1 query per sequence, 64 appended tokens): the attention op alone, microseconds per layer from CUDA
   graph replays over enough distinct layers that they do not fit in L2 (a model step streams every layer once);
   achieved GB/s counting the bytes the op must read (the whole served prefix + appended K/V + q + out) against
   the device copy ceiling measured in this run (read + write of 1 GiB), and a copy of the same bytes; against
   torch sdpa (FlashAttention backend) over the FULL uncompacted bf16 cache of the same T;
3. batched decode: 8 sequences continuing the same document (the prefix is read once per KV head);
4. prefill: a 256-token question (256 queries, causal over the 256 appended tokens) vs sdpa over the full cache;
5. a sweep of split sizes and key blocks for decode, to check the launcher's default against the best.
Prints tables last and writes them (date, device, command) to --out; a JSON with every number to --json.

    python benchmarks/bench_serving_kernel.py --out benchmarks/results_serving.md
    python benchmarks/bench_serving_kernel.py --quick    # fewer cases (a smoke run)
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START = time.time()
DEV = "cuda"  # where caches and queries live (the timing helpers need CUDA)


def log(*a):
    print(f"[{time.time() - START:6.1f}s]", *a, flush=True)


# ----------------------------------------------------------------------------------------------
# caches
# ----------------------------------------------------------------------------------------------


def ragged_lengths(T, ratio, H, gen):
    """Per-head entry counts of one layer: mean ceil(T/ratio), log-normal spread, floor mean/4."""
    mean = math.ceil(T / ratio)
    w = torch.exp(0.5 * torch.randn(H, generator=gen))
    w = w / w.mean()
    lens = torch.clamp((w * mean).round().long(), min=max(1, mean // 4))
    return [int(x) for x in lens]


def random_prefix(lens, codec, d, device, gen):
    """A served prefix with random contents of the right layout and byte count (timing only)."""
    from compactor.kernels.ragged_prefix import PrefixTensor, RaggedPrefix, rotation_matrix
    from compactor.quant import beta_codebook

    H, N = len(lens), sum(lens)
    offsets = torch.tensor([0, *np.cumsum(lens)], dtype=torch.int32, device=device)
    beta = torch.randn(N, device=device, generator=gen)

    def part(kind):
        if kind == "16":
            return PrefixTensor("raw", torch.randn(N, d, device=device, generator=gen).to(torch.bfloat16))
        if kind == "K4V4":
            codes = torch.randint(0, 256, (N, d * 4 // 8), device=device, generator=gen, dtype=torch.uint8)
            gains = (math.sqrt(d) * (0.5 + torch.rand(N, device=device, generator=gen))).to(torch.float16)
            mean = (0.3 * torch.randn(H, d, device=device, generator=gen)).to(torch.float16)
            cent = beta_codebook(4, d).centroids.to(device=device, dtype=torch.float32)
            return PrefixTensor("lloyd", codes, gains, mean, cent, rotation_matrix(d, 0, str(device)), 4, 0)
        blocks = torch.randint(0, 256, (N, d // 32, 18), device=device, generator=gen, dtype=torch.uint8)
        scale = (0.05 + 0.1 * torch.rand(N, d // 32, 1, device=device, generator=gen)).to(torch.float16)
        blocks[..., :2] = scale.view(torch.uint8)
        return PrefixTensor("q4_0", blocks.reshape(N, -1).contiguous())

    prefix = RaggedPrefix(tuple(lens), offsets, beta, part(codec), part(codec), d)
    if codec == "K4V4":  # 2 exact entries per head, their coded rows masked
        E = 2
        prefix.exact_keys = torch.randn(H, E, d, device=device, generator=gen)
        prefix.exact_values = torch.randn(H, E, d, device=device, generator=gen)
        prefix.exact_beta = torch.randn(H, E, device=device, generator=gen)
        for h in range(H):
            beta[int(offsets[h]):int(offsets[h]) + min(E, lens[h])] = float("-inf")
    return prefix


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------


def graph_us(fns, min_ms=60.0, trials=5):
    """Median microseconds per call of the callables `fns` (one per layer), replayed as one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation, allocator) outside capture
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    torch.cuda.synchronize()
    t0 = time.time()
    g.replay()
    torch.cuda.synchronize()
    one = max(time.time() - t0, 1e-6)
    reps = max(1, int(min_ms / 1e3 / one))
    res = []
    for _ in range(trials):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        res.append(a.elapsed_time(b) * 1e3 / (reps * len(fns)))
    del g
    return statistics.median(res)


def time_us(fns, **kw):
    """graph_us, or (where capture fails, e.g. an op that syncs with the host) CUDA events around eager calls."""
    try:
        return graph_us(fns, **kw)
    except Exception as exc:
        log(f"  (graph capture failed: {type(exc).__name__}: {str(exc)[:120]}; timing eager calls with events)")
        torch.cuda.synchronize()
        res = []
        for _ in range(5):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for f in fns:
                f()
            b.record()
            torch.cuda.synchronize()
            res.append(a.elapsed_time(b) * 1e3 / len(fns))
        return statistics.median(res)


def eager_us(fns, rounds=3):
    """Wall microseconds per eager call (Python + launch overhead included), median of `rounds` passes."""
    res = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for f in fns:
            f()
        torch.cuda.synchronize()
        res.append((time.perf_counter() - t0) * 1e6 / len(fns))
    return statistics.median(res)


def copy_ceiling_gbs(nbytes=1 << 30):
    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    y = torch.empty_like(x)
    us = time_us([lambda: y.copy_(x)], min_ms=100)
    return 2 * nbytes / (us * 1e-6) / 1e9


def same_size_copy_us(nbytes, min_total=256 << 20):
    """A device copy moving `nbytes` (read nbytes/2 + write nbytes/2), rotated over buffers beyond L2."""
    half = max(nbytes // 2, 256)
    n = max(2, min(256, -(-min_total // half)))
    bufs = [(torch.empty(half, dtype=torch.uint8, device="cuda").random_(), torch.empty(half, dtype=torch.uint8,
                                                                                        device="cuda"))
            for _ in range(n)]
    return time_us([lambda s=s, t=t: t.copy_(s) for s, t in bufs])


def n_layers_for(nbytes, min_total=256 << 20, cap=256):
    """Distinct layers to rotate through so their bytes exceed ~5x the 50 MB L2."""
    return max(2, min(cap, -(-min_total // max(nbytes, 1))))


# ----------------------------------------------------------------------------------------------
# sdpa baselines over the full cache
# ----------------------------------------------------------------------------------------------


def set_knobs(mod, specs):
    """Module settings of the kernel module from "NAME=VALUE" strings (VALUE a Python literal), e.g.
    "_DECODE_SWAP=False"; an unknown NAME is an error."""
    import ast

    for kv in specs:
        name, val = kv.split("=", 1)
        if not hasattr(mod, name):
            raise SystemExit(f"{mod.__name__} has no setting {name}")
        setattr(mod, name, ast.literal_eval(val))


def op_fns(mod, prefixes, B, Hq, Hkv, d, Lq, L_app, gen, **kw):
    """One closure per prefix: mod.ragged_attention_triton over fresh bf16 queries (B, Hq, Lq, d) and appended
    keys/values (B, Hkv, L_app, d) on the prefix's device; kw are the launcher's tuning knobs."""
    fns = []
    for p in prefixes:
        dev = p.device
        q = torch.randn(B, Hq, Lq, d, device=dev, generator=gen).to(torch.bfloat16)
        ak = torch.randn(B, Hkv, L_app, d, device=dev, generator=gen).to(torch.bfloat16)
        av = torch.randn(B, Hkv, L_app, d, device=dev, generator=gen).to(torch.bfloat16)
        fns.append(lambda p=p, q=q, ak=ak, av=av: mod.ragged_attention_triton(q, p, ak, av, **kw))
    return fns


def sdpa_decode_fns(T, B, Hq, Hkv, d, n_sets, gen):
    """FlashAttention (sdpa) decode over the full bf16 cache: the G query heads of a KV head become its query rows
    (exact for one query per sequence, which sees every key), so no KV head is repeated."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    G = Hq // Hkv
    sets = []
    for _ in range(n_sets):
        q = torch.randn(B, Hkv, G, d, device=DEV, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(B, Hkv, T, d, device=DEV, dtype=torch.bfloat16, generator=gen)
        v = torch.randn(B, Hkv, T, d, device=DEV, dtype=torch.bfloat16, generator=gen)
        sets.append((q, k, v))

    def run(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    return [lambda s=s: run(*s) for s in sets], 2 * B * Hkv * T * d * 2


def sdpa_prefill_fns(T_full, Lq, Hq, Hkv, d, n_sets, gen):
    """sdpa over the full cache for Lq new queries, causal aligned bottom-right, GQA; returns (fns, how)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    sets = []
    for _ in range(n_sets):
        q = torch.randn(1, Hq, Lq, d, device=DEV, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, Hkv, T_full, d, device=DEV, dtype=torch.bfloat16, generator=gen)
        v = torch.randn(1, Hkv, T_full, d, device=DEV, dtype=torch.bfloat16, generator=gen)
        sets.append((q, k, v))
    mask = causal_lower_right(Lq, T_full)
    attempts = [
        ("flash, GQA, lower-right causal", SDPBackend.FLASH_ATTENTION, True),
        ("efficient, GQA, lower-right causal", SDPBackend.EFFICIENT_ATTENTION, True),
        ("flash, KV heads repeated, lower-right causal", SDPBackend.FLASH_ATTENTION, False),
    ]
    for how, backend, gqa in attempts:
        def run(q, k, v, backend=backend, gqa=gqa):
            with sdpa_kernel(backend):
                if gqa:
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
                rep = q.shape[1] // k.shape[1]
                return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                      attn_mask=mask)
        try:
            run(*sets[0])
            torch.cuda.synchronize()
            return [lambda s=s, run=run: run(*s) for s in sets], how
        except Exception as exc:  # backend/GQA support differs between torch versions
            log(f"  sdpa prefill '{how}' unavailable: {type(exc).__name__}: {str(exc)[:160]}")
    return None, "unavailable"


# ----------------------------------------------------------------------------------------------
# correctness on the GPU
# ----------------------------------------------------------------------------------------------


def check_cases(quick):
    """(label, lens, d, B, G, Lq, L_app, pad, qdtype, stored dtype)."""
    bf, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    llama = [1500, 611, 2048, 1, 63, 1200, 3000, 777]
    cases = [
        ("16", llama, 128, 1, 4, 1, 40, False, bf, "bfloat16"),
        ("16", llama, 128, 4, 4, 1, 70, True, bf, "bfloat16"),
        ("16", llama, 128, 2, 4, 256, 300, True, f16, "float16"),
        ("16", llama, 128, 1, 4, 1, 9, False, f32, "float32"),
        ("K4V4", llama, 128, 1, 4, 1, 40, False, bf, "bfloat16"),
        ("K4V4", llama, 128, 1, 4, 256, 256, False, bf, "bfloat16"),
        ("q4_0", llama, 128, 1, 4, 1, 40, False, bf, "bfloat16"),
        ("q4_0", llama, 128, 2, 4, 256, 270, True, bf, "bfloat16"),
        ("q8_0", llama, 128, 3, 4, 1, 33, True, bf, "bfloat16"),
        ("K4Vq4_0", llama, 128, 1, 4, 1, 17, False, f16, "float16"),
        ("K3V5", [700, 91, 1300, 2], 128, 2, 8, 1, 20, False, bf, "bfloat16"),
        ("K2V7", [64, 640, 5], 64, 1, 3, 1, 12, False, bf, "bfloat16"),   # SmolLM2 shape: 3 KV heads, G=3, d=64
        ("16", [900, 31, 450], 64, 2, 3, 128, 140, True, bf, "bfloat16"),
        ("K8V1", [333, 1024], 256, 1, 2, 1, 8, False, bf, "bfloat16"),  # d=256
        ("K4V4", [520, 97], 96, 1, 1, 3, 5, False, f32, "bfloat16"),     # d=96: seeded orthogonal rotation
        ("q4_0", [520, 97], 96, 2, 2, 1, 6, False, bf, "bfloat16"),
        ("K6V3", [1000, 3, 1700, 250], 128, 1, 4, 1, 1, False, bf, "bfloat16"),
    ]
    return cases[:6] if quick else cases


def encode(label, lens, d, seed, stored):
    from compactor.layer_kv import LayerKV
    from compactor.storage.kv_codec import KVCodec, encode_layer, parse_kv_bits

    g = torch.Generator().manual_seed(seed)
    H, t = len(lens), max(lens)
    keys = torch.randn(H, t, d, generator=g) * 1.5 + torch.randn(H, 1, d, generator=g)
    keys[:, 0] *= 4  # a sink-like entry
    values = torch.randn(H, t, d, generator=g)
    beta = 4 * torch.rand(H, t, generator=g) - 2
    valid = torch.arange(t)[None, :] < torch.tensor(lens)[:, None]
    layer = LayerKV(keys * valid[..., None], values * valid[..., None], beta.masked_fill(~valid, 0.0),
                    torch.where(valid, torch.arange(t).expand(H, t), -1), torch.tensor(lens),
                    torch.rand(H, t, generator=g))
    codec = KVCodec() if label == "16" else parse_kv_bits(label)
    books = {}
    arrays, attrs = encode_layer(layer, codec, stored, 5, books)
    return arrays, attrs, books


def float64_over_decoder(q, arrays, attrs, books, d, ak, av, mask, scale):
    """Dense float64 attention over compactor's decode_layer (as in tests/test_ragged_attention.py)."""
    from compactor.storage.kv_codec import decode_layer

    dec = decode_layer(arrays, attrs, books, d)
    lens = [int(n) for n in arrays["lengths"]]
    starts = np.concatenate([[0], np.cumsum(lens)])
    beta = torch.from_numpy(np.asarray(arrays["beta"])).double()
    B, Hq, Lq, _ = q.shape
    Hkv = len(lens)
    L_app = ak.shape[2]
    out = torch.zeros(B, Lq, Hq, d, dtype=torch.float64)
    allowed = torch.arange(L_app)[None, :] <= (torch.arange(Lq)[:, None] + L_app - Lq)
    for b in range(B):
        ok = allowed & (mask[b][None, :] if mask is not None else True)
        app_bias = torch.zeros(Lq, L_app, dtype=torch.float64).masked_fill(~ok, float("-inf"))
        for hq in range(Hq):
            h = hq // (Hq // Hkv)
            n = lens[h]
            k = torch.cat([dec.keys[h, :n].double(), ak[b, h].double().cpu()])
            v = torch.cat([dec.values[h, :n].double(), av[b, h].double().cpu()])
            bias = torch.cat([beta[starts[h]:starts[h] + n].expand(Lq, n), app_bias], dim=1)
            s = q[b, hq].double().cpu() @ k.T * scale + bias
            out[b, :, hq] = torch.softmax(s, dim=1) @ v
    return out


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_checks(mod, quick):
    from compactor.kernels.ragged_prefix import RaggedPrefix

    rows, all_ok = [], True
    real_alloc = mod._alloc
    mod._alloc = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    try:
        for n, (label, lens, d, B, G, Lq, L_app, pad, qdtype, stored) in enumerate(check_cases(quick)):
            arrays, attrs, books = encode(label, lens, d, n, stored)
            prefix = RaggedPrefix.from_stored(arrays, attrs, books, d, device=DEV)
            g = torch.Generator(device=DEV).manual_seed(100 + n)
            Hkv = len(lens)
            q = torch.randn(B, Hkv * G, Lq, d, device=DEV, generator=g).to(qdtype)
            ak = torch.randn(B, Hkv, L_app, d, device=DEV, generator=g).to(qdtype)
            av = torch.randn(B, Hkv, L_app, d, device=DEV, generator=g).to(qdtype)
            mask = None
            if pad:
                mask = torch.ones(B, L_app, dtype=torch.bool, device=DEV)
                for b in range(B):
                    mask[b, : b * (L_app - Lq) // max(B - 1, 1)] = False
            scale = d ** -0.5
            name = (f"{label} d={d} heads={len(lens)}x{G} B={B} Lq={Lq} L_app={L_app}{' pad' if pad else ''} "
                    f"q={str(qdtype).split('.')[-1]} stored={stored}")
            try:
                got = mod.ragged_attention_triton(q, prefix, ak, av, mask, scale)
                torch.cuda.synchronize()
            except Exception as exc:  # record and go on: the timings still run
                all_ok = False
                rows.append(dict(case=name, error=f"{type(exc).__name__}: {str(exc)[:200]}", ok=False))
                log(f"  check {name}: ERROR {type(exc).__name__}: {str(exc)[:200]}")
                continue
            ref = mod.ragged_attention_torch(q, prefix, ak, av, mask, scale)
            torch.cuda.synchronize()
            finite = bool(torch.isfinite(got).all())
            err = rel(got, ref)
            tol = 3e-2 if qdtype != torch.float32 else 1e-2  # 16-bit dot operands and output / TF32
            e64 = None
            if B * Hkv * G * Lq <= 4096:  # the reference's float32 math (inputs upcast exactly) vs float64
                ref32 = mod.ragged_attention_torch(q.float(), prefix, ak.float(), av.float(), mask, scale)
                e64 = rel(ref32, float64_over_decoder(q.cpu(), arrays, attrs, books, d, ak.cpu(), av.cpu(),
                                                      None if mask is None else mask.cpu(), scale))
            ok = finite and err < tol and (e64 is None or e64 < 1e-5)
            all_ok &= ok
            rows.append(dict(case=name, rel_l2_kernel_vs_ref=err, rel_l2_ref_vs_float64=e64, finite=finite, ok=ok))
            log(f"  check {name}: kernel vs ref {err:.2e}, ref vs float64 "
                f"{'-' if e64 is None else f'{e64:.1e}'} -> {'OK' if ok else 'FAIL'}")
    finally:
        mod._alloc = real_alloc
    return rows, all_ok


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--ratios", type=int, nargs="+", default=[10, 20])
    ap.add_argument("--codecs", nargs="+", default=["16", "K4V4", "q4_0"])
    ap.add_argument("--app", type=int, default=64, help="appended tokens during decode")
    ap.add_argument("--question", type=int, default=256, help="prefill question tokens")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--deadline", type=float, default=270.0, help="seconds after which optional parts are skipped")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results_serving.md"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if DEV == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_serving_kernel.py needs a CUDA GPU; on CPU run pytest tests/test_ragged_attention.py")
    import triton

    import compactor.kernels.ragged_attention as mod

    torch.backends.cuda.matmul.allow_tf32 = False
    Hq, Hkv, d = 32, 8, 128
    G = Hq // Hkv
    dev = torch.device(DEV)
    props = torch.cuda.get_device_properties(dev)
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    env = (f"{torch.cuda.get_device_name()} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
           f"triton {triton.__version__}, python {sys.version.split()[0]}")
    log(env, "|", cmd)
    results = dict(env=env, command=cmd, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"))

    def over():
        return time.time() - START > args.deadline

    def write():
        md = render(results, args)
        with open(args.out, "w") as f:
            f.write(md)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    log("== correctness on the GPU ==")
    results["checks"], results["checks_ok"] = run_checks(mod, args.quick)
    write()

    ceiling = copy_ceiling_gbs()
    results["copy_ceiling_gbs"] = ceiling
    log(f"copy ceiling (1 GiB, read+write): {ceiling:.0f} GB/s")

    gen = torch.Generator(device=DEV).manual_seed(0)
    cpu_gen = torch.Generator().manual_seed(0)
    T_list = args.T[:1] if args.quick else args.T
    decode, prefill, batched, sweep = [], [], [], []
    results.update(decode=decode, prefill=prefill, batched=batched, sweep=sweep)

    def layers_of(T, ratio, codec, n):
        return [random_prefix(ragged_lengths(T, ratio, Hkv, cpu_gen), codec, d, dev, gen) for _ in range(n)]

    def layer_fns(prefixes, B, Lq, L_app, **kw):
        return op_fns(mod, prefixes, B, Hq, Hkv, d, Lq, L_app, gen, **kw)

    def op_bytes(p, B, Lq, L_app):
        return p.nbytes() + B * Hkv * L_app * d * 2 * 2 + 2 * B * Hq * Lq * d * 2

    log("== decode ==")
    for T in T_list:
        sd_fns, full_bytes = sdpa_decode_fns(T + args.app, 1, Hq, Hkv, d, 2, gen)
        sd_us = time_us(sd_fns)
        del sd_fns
        log(f"T={T}: sdpa flash over the full cache {sd_us:.1f} us/layer "
            f"({full_bytes / (sd_us * 1e-6) / 1e9:.0f} GB/s)")
        for ratio in args.ratios:
            for codec in args.codecs:
                if over():
                    log("  deadline: decode case skipped")
                    continue
                probe = layers_of(T, ratio, codec, 1)[0]
                nb = op_bytes(probe, 1, 1, args.app)
                prefixes = [probe] + layers_of(T, ratio, codec, n_layers_for(nb) - 1)
                fns = layer_fns(prefixes, 1, 1, args.app)
                us = time_us(fns)
                eag = eager_us(fns[:50])
                cp = same_size_copy_us(nb)
                lens = [n for p in prefixes for n in p.lengths]
                row = dict(T=T, ratio=ratio, codec=codec, entries_mean=sum(lens) / len(lens), entries_min=min(lens),
                           entries_max=max(lens), layer_bytes=nb, prefix_bytes=probe.nbytes(), us=us, eager_us=eag,
                           gbs=nb / (us * 1e-6) / 1e9, copy_us=cp, sdpa_full_us=sd_us, full_bytes=full_bytes,
                           layers=len(prefixes))
                decode.append(row)
                log(f"  r={ratio} {codec:5s}: {us:7.2f} us/layer ({row['gbs']:.0f} GB/s, "
                    f"{100 * row['gbs'] / ceiling:.0f}% of copy; same-size copy {cp:.1f} us; eager {eag:.0f} us/call)"
                    f"  vs sdpa full {sd_us:.1f} us: {sd_us / us:.1f}x, layers {len(prefixes)}")
                del fns, prefixes
        write()
        torch.cuda.empty_cache()

    log("== batched decode (B=8 sequences, one document) ==")
    T, ratio, B = T_list[0], args.ratios[0], 8
    sd_fns, full_bytes = sdpa_decode_fns(T + args.app, B, Hq, Hkv, d, 2, gen)
    sd_us = time_us(sd_fns)
    del sd_fns
    for codec in args.codecs:
        if over():
            break
        probe = layers_of(T, ratio, codec, 1)[0]
        nb = op_bytes(probe, B, 1, args.app)
        prefixes = [probe] + layers_of(T, ratio, codec, n_layers_for(nb) - 1)
        us = time_us(layer_fns(prefixes, B, 1, args.app))
        batched.append(dict(T=T, ratio=ratio, codec=codec, B=B, us=us, layer_bytes=nb, gbs=nb / (us * 1e-6) / 1e9,
                            sdpa_full_us=sd_us))
        log(f"  B={B} T={T} r={ratio} {codec}: {us:.2f} us/layer ({nb / (us * 1e-6) / 1e9:.0f} GB/s) vs sdpa full "
            f"{sd_us:.1f} us")
    write()

    log("== prefill (question of %d tokens) ==" % args.question)
    Lq = args.question
    for T in T_list:
        if over():
            log("  deadline: prefill skipped for T=%d" % T)
            break
        sp_fns, how = sdpa_prefill_fns(T + Lq, Lq, Hq, Hkv, d, 2, gen)
        sp_us = time_us(sp_fns) if sp_fns else float("nan")
        del sp_fns
        log(f"T={T}: sdpa over the full cache ({how}) {sp_us / 1e3:.3f} ms/layer")
        for ratio in args.ratios:
            for codec in args.codecs:
                prefixes = layers_of(T, ratio, codec, 4)
                us = time_us(layer_fns(prefixes, 1, Lq, Lq), min_ms=40, trials=3)
                prefill.append(dict(T=T, ratio=ratio, codec=codec, ms=us / 1e3, sdpa_full_ms=sp_us / 1e3, sdpa_how=how))
                log(f"  r={ratio} {codec:5s}: {us / 1e3:.3f} ms/layer vs {sp_us / 1e3:.3f}: {sp_us / us:.1f}x")
        write()
        torch.cuda.empty_cache()

    if not args.no_sweep and not args.quick:
        log("== sweep (decode): programs per SM x key block ==")
        grid = [(pps, bn, st) for bn in (32, 64, 128) for pps in (1, 2, 4, 8) for st in (2,)] + \
               [(pps, 64, 3) for pps in (1, 2, 4, 8)]
        for T in T_list[::-1]:
            for codec in args.codecs:
                if over():
                    log("  deadline: sweep stopped")
                    break
                probe = layers_of(T, 10, codec, 1)[0]
                nb = op_bytes(probe, 1, 1, args.app)
                prefixes = [probe] + layers_of(T, 10, codec, n_layers_for(nb) - 1)
                default_us = time_us(layer_fns(prefixes, 1, 1, args.app), min_ms=30, trials=3)
                best = (default_us, "default")
                for pps, bn, st in grid:
                    if over():
                        break
                    _, _, chunk, _, _ = mod._pick_config(G, probe.num_entries + args.app, Hkv, d, dev, None, bn,
                                                         None, programs_per_sm=pps)
                    us = time_us(layer_fns(prefixes, 1, 1, args.app, block_n=bn, chunk=chunk, num_stages=st),
                                 min_ms=30, trials=3)
                    sweep.append(dict(T=T, ratio=10, codec=codec, programs_per_sm=pps, block_n=bn, stages=st,
                                      chunk=chunk, us=us))
                    if us < best[0]:
                        best = (us, f"block_n={bn} chunk={chunk} (~{pps}/SM) stages={st}")
                sweep.append(dict(T=T, ratio=10, codec=codec, default_us=default_us, best_us=best[0], best=best[1]))
                log(f"  T={T} {codec}: default {default_us:.2f} us, best {best[0]:.2f} us ({best[1]})")
                del prefixes
            write()
    write()
    print("\n" + render(results, args))
    if not results["checks_ok"]:
        sys.exit("correctness check FAILED (see above)")


def render(res, args) -> str:
    ceil = res.get("copy_ceiling_gbs")
    out = ["# Serving kernel benchmark: ragged beta-attention over a compacted prefix", "",
           f"- date: {res['date']} UTC", f"- device: {res['env']}", f"- command: `{res['command']}`",
           "- shape: random-weight Llama-3.1-8B attention (32 query heads, 8 KV heads, d=128, bf16 queries);"
           " per-head entries log-normal around ceil(T/r) (sigma 0.5, floor mean/4);"
           f" decode: 1 query, {args.app} appended tokens; prefill: {args.question}-token question",
           "- µs/layer: CUDA-graph replays of the op over distinct layers (more bytes than L2), median of trials;"
           " bytes = the served prefix (codes, gains, means, beta, exact entries, offsets) + appended K/V + q + out",
           ""]
    checks = res.get("checks", [])
    if checks:
        out += [f"## Correctness on the GPU: {'all OK' if res.get('checks_ok') else 'FAILURES'}", "",
                "| case | rel L2 kernel vs torch reference | rel L2 reference vs float64 (kv_codec decode) | ok |",
                "|---|---:|---:|---|"]
        for c in checks:
            if "error" in c:
                out.append(f"| {c['case']} | {c['error']} | | FAIL |")
                continue
            e64 = c["rel_l2_ref_vs_float64"]
            out.append(f"| {c['case']} | {c['rel_l2_kernel_vs_ref']:.2e} | {'-' if e64 is None else f'{e64:.1e}'} |"
                       f" {'OK' if c['ok'] else 'FAIL'} |")
        out.append("")
    if ceil:
        out += [f"Copy ceiling (1 GiB device copy, read + write): **{ceil:.0f} GB/s**.", ""]
    if res.get("decode"):
        out += ["## Decode: attention op alone, per layer", "",
                "| T | r | codec | entries/head mean (min-max) | bytes/layer | µs/layer | GB/s | % of copy ceiling |"
                " same-size copy µs | eager µs/call | sdpa flash full cache µs | speed-up |",
                "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in res["decode"]:
            out.append(f"| {r['T']} | {r['ratio']} | {r['codec']} | {r['entries_mean']:.0f} ({r['entries_min']}-"
                       f"{r['entries_max']}) | {r['layer_bytes'] / 1e6:.2f} MB | {r['us']:.2f} | {r['gbs']:.0f} |"
                       f" {100 * r['gbs'] / ceil:.0f}% | {r['copy_us']:.2f} | {r['eager_us']:.0f} |"
                       f" {r['sdpa_full_us']:.1f} | {r['sdpa_full_us'] / r['us']:.1f}x |")
        out.append("")
    if res.get("batched"):
        out += ["## Batched decode: B sequences continuing one document (prefix read once per KV head)", "",
                "| T | r | codec | B | µs/layer | GB/s | sdpa flash over B full caches µs | speed-up |",
                "|---:|---:|---|---:|---:|---:|---:|---:|"]
        for r in res["batched"]:
            out.append(f"| {r['T']} | {r['ratio']} | {r['codec']} | {r['B']} | {r['us']:.2f} | {r['gbs']:.0f} |"
                       f" {r['sdpa_full_us']:.1f} | {r['sdpa_full_us'] / r['us']:.1f}x |")
        out.append("")
    if res.get("prefill"):
        how = res["prefill"][0]["sdpa_how"]
        out += [f"## Prefill: {args.question}-token question, per layer (sdpa baseline: {how})", "",
                "| T | r | codec | ms/layer | sdpa full cache ms/layer | speed-up |", "|---:|---:|---|---:|---:|---:|"]
        for r in res["prefill"]:
            out.append(f"| {r['T']} | {r['ratio']} | {r['codec']} | {r['ms']:.3f} | {r['sdpa_full_ms']:.3f} |"
                       f" {r['sdpa_full_ms'] / r['ms']:.1f}x |")
        out.append("")
    best = [r for r in res.get("sweep", []) if "best_us" in r]
    if best:
        out += ["## Decode launch sweep (r=10): launcher default vs best of block_n x chunk x stages", "",
                "| T | codec | default µs | best µs | best config |", "|---:|---|---:|---:|---|"]
        for r in best:
            out.append(f"| {r['T']} | {r['codec']} | {r['default_us']:.2f} | {r['best_us']:.2f} | {r['best']} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
