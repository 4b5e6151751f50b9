"""End-to-end serving of a compacted cache through `load_cache`: keep_quantized (ragged kernel over the stored codes)
vs dequantized (padded per layer, sdpa + beta) vs the full uncompacted cache, on one random-weight model.

Model: Llama-3.1-8B's shape built from its config (no hub, random weights, bf16, CUDA). Document: T random token
ids; its compacted layers are synthetic (per-head entry counts log-normal around ceil(T/r) as a global budget gives,
random keys/values/beta), encoded by compactor's own codec and written as a real artifact, then loaded with
`load_cache(..., keep_quantized=True/False)`. For each: bytes held (CompactedCache.memory_bytes, and the CUDA
allocator's growth during the load) against the artifact's stored payload; a 256-token question prefill (ms); greedy
decode ms/token and tokens/s (CUDA-synchronised wall time over --steps steps, after 3 warm-up steps); agreement of
keep_quantized with dequantized (max |logit difference| on the question's last position, greedy tokens equal).

    python benchmarks/bench_serving_e2e.py --T 32768 --ratio 10 --codecs 16 K4V4 --out results.md
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import tempfile
import time

import torch

START = time.time()


def log(*a):
    print(f"[{time.time() - START:6.1f}s]", *a, flush=True)


def llama31_8b_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


def small_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 4, vocab_size=300, min_frequency=1,
                            special_tokens=["<eos>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>", pad_token="<eos>")


def synthetic_layers(T, ratio, n_layers, H, d, gen):
    from compactor.layer_kv import LayerKV

    mean = math.ceil(T / ratio)
    out = []
    for _ in range(n_layers):
        w = torch.exp(0.5 * torch.randn(H, generator=gen))
        lens = torch.clamp((w / w.mean() * mean).floor().long(), min=max(1, mean // 4), max=T)
        while int(lens.sum()) > mean * H:  # a global budget: at most ceil(T/r) per head on average
            lens[int(lens.argmax())] -= int(lens.sum()) - mean * H
            lens = lens.clamp(min=max(1, mean // 4))
        t = int(lens.max())
        keys = torch.randn(H, t, d, generator=gen) * 2.0
        values = torch.randn(H, t, d, generator=gen)
        beta = torch.randn(H, t, generator=gen) * 0.5
        pos = torch.full((H, t), -1, dtype=torch.long)
        for h, n in enumerate(lens.tolist()):
            pos[h, :n] = torch.randperm(T, generator=gen)[:n].sort().values
            keys[h, n:] = 0
            values[h, n:] = 0
            beta[h, n:] = 0
        out.append(LayerKV(keys, values, beta, pos, lens))
    return out


def write_synthetic(lm, T, ratio, bits, path, gen):
    from compactor.methods import make_method
    from compactor.pipeline import CompressOptions, artifact_meta, codec_plan
    from compactor.storage.artifact import StoredLayer, write_artifact
    from compactor.storage.kv_codec import encode_layer

    cfg = lm.config
    n_layers, H, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    opts = CompressOptions(ratio=float(ratio), kv_bits=bits, budget="global")
    layers = synthetic_layers(T, ratio, n_layers, H, d, gen)
    ids = torch.randint(0, cfg.vocab_size, (T,), generator=gen)
    budgets = torch.stack([layer.lengths for layer in layers])
    meta = artifact_meta(lm, None, ids, make_method("am"), opts, budgets, {"prefill": 0.0, "compact": 0.0})
    books: dict = {}
    stored = [StoredLayer(*encode_layer(layer, c, opts.stored_dtype, opts.seed, books))
              for layer, c in zip(layers, codec_plan(n_layers, opts))]
    return write_artifact(path, meta, stored, books)


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3, out


@torch.no_grad()
def serve(model, cache, question, steps):
    """((first, warm) question prefill ms, decode ms/token, last-position logits of the question, greedy tokens) on
    a fork of `cache`. The first prefill includes Triton's compilation of the prefill tiles; the warm one is the
    median of three more on fresh forks."""
    fork = (lambda: cache.fork()) if hasattr(cache, "fork") else (lambda: cache)
    first_ms, _ = timed(lambda: model(question, past_key_values=fork(), logits_to_keep=1))
    warm = sorted(timed(lambda: model(question, past_key_values=fork(), logits_to_keep=1))[0] for _ in range(3))
    c = fork()
    _, out = timed(lambda: model(question, past_key_values=c, logits_to_keep=1))
    ms_q = (first_ms, warm[1])
    first = out.logits[:, -1].float()
    tok = first.argmax(-1, keepdim=True)
    toks = [tok]
    for _ in range(3):  # warm-up steps (kernel compilation, allocator)
        tok = model(tok, past_key_values=c, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        toks.append(tok)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = model(tok, past_key_values=c, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        toks.append(tok)
    torch.cuda.synchronize()
    return ms_q, (time.perf_counter() - t0) * 1e3 / steps, first, torch.cat(toks, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, default=32768)
    ap.add_argument("--ratio", type=int, default=10)
    ap.add_argument("--codecs", nargs="+", default=["16", "K4V4"])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--question", type=int, default=256)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--no-full", action="store_true", help="skip the full-cache baseline")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_serving_e2e.py needs a CUDA GPU")
    from transformers import DynamicCache, LlamaForCausalLM

    import compactor
    from compactor.models import LoadedModel
    from compactor.serving.loader import prepare_model
    from compactor.storage.artifact import read_artifact

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(llama31_8b_config(args.layers)).to(torch.bfloat16).eval()
    lm = LoadedModel(model, small_tokenizer(), "random-llama-3.1-8b-shape")
    prepare_model(model)
    env = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.layers} layers"
    log(env)
    question = torch.randint(0, 128256, (1, args.question), generator=gen).cuda()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bits in args.codecs:
            path = write_synthetic(lm, args.T, args.ratio, bits, os.path.join(tmp, f"{bits}.h5"), gen)
            art = read_artifact(path)
            log(f"{bits}: artifact written, payload {art.payload_bytes:,} bytes")
            got = {}
            for keep in (True, False):
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                cache = compactor.load_cache(path, model, lm.tokenizer, keep_quantized=keep)
                torch.cuda.synchronize()
                grown = torch.cuda.memory_allocated() - before
                ms_q, ms_tok, first, toks = serve(model, cache, question, args.steps)
                got[keep] = (first, toks)
                rows.append(dict(codec=bits, keep=keep, stored=art.payload_bytes, held=cache.memory_bytes(),
                                 allocated=grown, prefill_ms=ms_q, ms_tok=ms_tok))
                log(f"  keep_quantized={keep}: held {cache.memory_bytes():,} B (allocator +{grown:,} B), "
                    f"question {ms_q[0]:.1f} ms first, {ms_q[1]:.1f} ms warm, decode {ms_tok:.2f} ms/token ({1e3 / ms_tok:.1f} tok/s)")
                del cache
                torch.cuda.empty_cache()
            diff = (got[True][0] - got[False][0]).abs().max().item()
            scale = got[False][0].abs().max().item()
            same = int((got[True][1] == got[False][1]).all(0).long().cumprod(0).sum())
            rows[-2].update(logit_diff=diff, logit_scale=scale, same_tokens=same, n_tokens=got[True][1].shape[1])
            log(f"  keep vs dequantized: max |dlogit| {diff:.3g} (logits up to {scale:.3g}), first {same} of "
                f"{got[True][1].shape[1]} greedy tokens equal")
    if not args.no_full:
        ids = torch.randint(0, 128256, (1, args.T), generator=gen).cuda()
        full = DynamicCache(config=model.config)
        with torch.no_grad():
            for lo in range(0, args.T, 4096):  # chunked prefill of the document
                model(ids[:, lo:lo + 4096], past_key_values=full, logits_to_keep=1)
        torch.cuda.synchronize()
        held = sum(t.numel() * t.element_size() for layer in full.layers for t in (layer.keys, layer.values))
        ms_q, ms_tok, _, _ = serve(model, _Frozen(full), question, args.steps)
        rows.append(dict(codec="full", keep=None, stored=None, held=held, allocated=None, prefill_ms=ms_q,
                         ms_tok=ms_tok))
        log(f"full cache: held {held:,} B, question {ms_q[1]:.1f} ms warm, decode {ms_tok:.2f} ms/token")
    md = render(rows, args, env)
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)


class _Frozen:
    """The full DynamicCache; a "fork" crops it back to the document (DynamicCache.crop), no copy of 4 GB."""

    def __init__(self, cache):
        self.cache, self.length = cache, cache.get_seq_length()

    def fork(self):
        self.cache.crop(self.length)
        return self.cache


def render(rows, args, env) -> str:
    out = [f"## End-to-end through load_cache ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)",
           "", f"- device: {env}; random-weight Llama-3.1-8B shape, bf16; T = {args.T}, r = {args.ratio}; synthetic "
           "compacted layers (global-budget-like ragged heads) written as an artifact",
           f"- command: `python benchmarks/bench_serving_e2e.py {' '.join(sys.argv[1:])}`",
           f"- question prefill: {args.question} tokens; decode: {args.steps} greedy steps after 3 warm-up, "
           "wall time with CUDA synchronisation, plain transformers forward calls (no CUDA graphs)", "",
           "| cache | load | stored bytes | held bytes (measured) | allocator growth | held / stored | question ms "
           "first call (with compile) | question ms warm | decode ms/token | tokens/s | max abs dlogit vs dequantized |"
           " greedy tokens equal |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        load = "-" if r["keep"] is None else ("keep_quantized" if r["keep"] else "dequantized")
        st = "-" if r["stored"] is None else f"{r['stored'] / 1e6:.1f} MB"
        ratio = "-" if r["stored"] is None else f"{r['held'] / r['stored']:.3f}"
        al = "-" if r["allocated"] is None else f"{r['allocated'] / 1e6:.1f} MB"
        agree = (f"{r['logit_diff']:.3g} (of {r['logit_scale']:.3g})", f"{r['same_tokens']}/{r['n_tokens']}") \
            if "logit_diff" in r else ("", "")
        out.append(f"| {r['codec']} | {load} | {st} | {r['held'] / 1e6:.1f} MB | {al} | {ratio} | "
                   f"{r['prefill_ms'][0]:.1f} | {r['prefill_ms'][1]:.1f} | {r['ms_tok']:.2f} | {1e3 / r['ms_tok']:.1f} | {agree[0]} | {agree[1]} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
