"""Real weights, bf16, CUDA: does serving the stored codes (keep_quantized, the ragged Triton kernel) give the answers
of the dequantized cache (transformers' sdpa with a beta bias), and which of the two is closer to float32?

The random-weight 8B-shaped model of bench_serving_e2e.py showed logit differences of 0.25-0.45 between the two
paths; random layers amplify rounding, so this checks a trained model (the bundled SmolLM2-135M, Llama
architecture). For each play and codec: compress the first T tokens at --ratio (compactor.compress, default
preset), save, load three ways, and run the next C tokens of the play (teacher-forced) after the cache:
- kernel bf16: model in bf16, keep_quantized=True (the kernel attends in float32, dot operands in bf16);
- sdpa bf16: model in bf16, keep_quantized=False (sdpa in bf16);
- reference: model in float32, keep_quantized=False (sdpa in float32), the same artifact.
Reported per path against the reference: max |logit difference|, mean KL(ref || path) per token (nats), top-1
agreement; kernel vs sdpa directly; greedy generation of --gen tokens after a question, tokens equal to the bf16
sdpa path's. Timing per path: question prefill (first call, which includes Triton compilation, and a second call)
and decode ms/token.

    python benchmarks/bench_serving_realweights.py --plays macbeth hamlet --T 2048 --ratio 10 --out results.md
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

import torch

import compactor
from compactor.capture.documents import bundled_play
from compactor.models import load_model

QUESTION = "\n\nQuestion: Who speaks first in this scene, and what do they say?\nAnswer:"


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def teacher_forced(model, cache, cont):
    """Logits (C, V) float32 of the continuation tokens after the cache (one forward)."""
    return model(cont[None], past_key_values=cache.fork(), use_cache=True).logits[0].float()


@torch.no_grad()
def timed_question(model, cache, q_ids, steps):
    """(first prefill ms, second prefill ms, decode ms/token after one untimed decode step, greedy tokens)."""
    times = []
    for _ in range(2):
        c = cache.fork()
        sync()
        t0 = time.perf_counter()
        out = model(q_ids[None], past_key_values=c, use_cache=True)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    tok = out.logits[0, -1].argmax()
    toks = [int(tok)]
    out = model(tok.view(1, 1), past_key_values=c, use_cache=True)  # first decode step: compiles the decode tiles
    tok = out.logits[0, -1].argmax()
    toks.append(int(tok))
    sync()
    t0 = time.perf_counter()
    for _ in range(steps - 2):
        out = model(tok.view(1, 1), past_key_values=c, use_cache=True)
        tok = out.logits[0, -1].argmax()
        toks.append(int(tok))
    sync()
    return times[0], times[1], (time.perf_counter() - t0) * 1e3 / max(1, steps - 2), toks


def compare(logits, ref):
    lp, lr = torch.log_softmax(logits, -1), torch.log_softmax(ref, -1)
    kl = (lr.exp() * (lr - lp)).sum(-1)
    return {"max_dlogit": float((logits - ref).abs().max()), "kl": float(kl.mean()),
            "top1": float((logits.argmax(-1) == ref.argmax(-1)).float().mean())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--plays", nargs="+", default=["macbeth", "hamlet"])
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--C", type=int, default=256)
    ap.add_argument("--ratio", type=float, default=10.0)
    ap.add_argument("--codecs", nargs="+", default=["16", "K4V4", "q4_0"])
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("Error: this benchmark needs CUDA (it measures the Triton kernel against bf16 sdpa)")
    started = time.time()
    bf = load_model(args.model)
    bf.model.to("cuda", torch.bfloat16)
    ref = load_model(args.model)
    ref.model.to("cuda", torch.float32)
    tok = bf.tokenizer
    q_ids = tok(QUESTION, add_special_tokens=False, return_tensors="pt").input_ids[0].cuda()
    rows = []
    tmp = tempfile.mkdtemp()
    for play in args.plays:
        ids = tok(bundled_play(play).text, return_tensors="pt").input_ids[0]
        doc, cont = ids[:args.T], ids[args.T:args.T + args.C].cuda()
        for bits in args.codecs:
            t0 = time.perf_counter()
            cache = compactor.compress(doc, bf.model, tok, ratio=args.ratio, kv_bits=bits)
            path = cache.save(os.path.join(tmp, f"{play}-{bits}.h5"))
            secs = time.perf_counter() - t0
            kern = compactor.load_cache(path, bf.model, tok, keep_quantized=True)
            sdpa = compactor.load_cache(path, bf.model, tok, keep_quantized=False)
            full32 = compactor.load_cache(path, ref.model, tok, keep_quantized=False)
            lk, ls = teacher_forced(bf.model, kern, cont), teacher_forced(bf.model, sdpa, cont)
            lr = teacher_forced(ref.model, full32, cont)
            qk = timed_question(bf.model, kern, q_ids, args.gen)
            qs = timed_question(bf.model, sdpa, q_ids, args.gen)
            same = sum(a == b for a, b in zip(qk[3], qs[3]))
            prefix_agree = next((i for i, (a, b) in enumerate(zip(qk[3], qs[3])) if a != b), len(qk[3]))
            rows.append(dict(play=play, codec=bits, compress_s=secs, kernel=compare(lk, lr), sdpa=compare(ls, lr),
                             kernel_vs_sdpa=compare(lk, ls), logit_scale=float(lr.abs().max()),
                             q_first=(qk[0], qs[0]), q_second=(qk[1], qs[1]), decode=(qk[2], qs[2]),
                             greedy_same=same, greedy_prefix=prefix_agree,
                             held=(kern.memory_bytes(), sdpa.memory_bytes())))
            print(rows[-1], flush=True)
    lines = [
        "## Real weights, bf16 (SmolLM2-135M): kernel vs dequantized sdpa vs float32",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='minutes')}",
        f"- device: {torch.cuda.get_device_name()}, torch {torch.__version__}",
        f"- command: `python benchmarks/bench_serving_realweights.py {' '.join(argv or sys.argv[1:])}`",
        f"- setting: {args.model}, plays {', '.join(args.plays)}, T={args.T}, ratio {args.ratio:g} (compactor.compress "
        f"defaults), C={args.C} teacher-forced continuation tokens; question {len(q_ids)} tokens, {args.gen} greedy "
        f"tokens; reference = the same artifact through the float32 model (sdpa float32); ran "
        f"{time.time() - started:.0f} s",
        "",
        "| play | K/V | max dlogit kernel / sdpa vs fp32 (logits up to) | KL kernel / sdpa vs fp32 (nats/tok) | "
        "top-1 kernel / sdpa vs fp32 | kernel vs sdpa max dlogit, top-1 | greedy equal (first diff) | "
        "question ms 1st call kernel / sdpa | 2nd call | decode ms/token kernel / sdpa | held bytes kernel / sdpa |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        k, s, ks = r["kernel"], r["sdpa"], r["kernel_vs_sdpa"]
        lines.append(
            f"| {r['play']} | {r['codec']} | {k['max_dlogit']:.3f} / {s['max_dlogit']:.3f} ({r['logit_scale']:.1f}) | "
            f"{k['kl']:.2e} / {s['kl']:.2e} | {k['top1']:.3f} / {s['top1']:.3f} | {ks['max_dlogit']:.3f}, "
            f"{ks['top1']:.3f} | {r['greedy_same']}/{args.gen} ({r['greedy_prefix']}) | "
            f"{r['q_first'][0]:.0f} / {r['q_first'][1]:.0f} | {r['q_second'][0]:.1f} / {r['q_second'][1]:.1f} | "
            f"{r['decode'][0]:.2f} / {r['decode'][1]:.2f} | {r['held'][0]:,} / {r['held'][1]:,} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
