"""GPU timing of the whole compaction path on random-weight models with real shapes.

For each config (Llama-3.1-8B, Qwen3-4B shapes, bf16) and document length T: random token ids are prefilled with
query capture, then key scoring (Triton attention_stats) and Attention Matching per (layer, KV head) are timed.
Random weights give meaningless text but the real tensor shapes, which is what the timing depends on.
Prints a markdown table and writes it to --out (default benchmarks/results_gpu.md).
Run: python benchmarks/bench_compaction_gpu.py --configs llama-3.1-8b qwen3-4b --T 8192 32768
"""
from __future__ import annotations

import argparse
import datetime
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
    "qwen3-4b": dict(model_type="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=True),
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
    if tiny:  # a CPU dry run of this script: same code path, toy sizes
        kw.update(num_hidden_layers=2, hidden_size=256, intermediate_size=512, vocab_size=1000)
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


def sync_time(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from compactor.methods import make_method
    from compactor.pipeline import compact_capture
    from compactor.capture.prefill import prefill_and_capture

    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=["llama-3.1-8b", "qwen3-4b"])
    ap.add_argument("--T", nargs="+", type=int, default=[8192, 32768])
    ap.add_argument("--ratio", type=float, default=10)
    ap.add_argument("--max-queries", type=int, default=8192)
    ap.add_argument("--chunk-size", type=int, default=4096)
    ap.add_argument("--out", default="benchmarks/results_gpu.md")
    ap.add_argument("--tiny", action="store_true", help="dry run on the CPU with toy sizes")
    args = ap.parse_args()
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_compaction_gpu.py needs a CUDA device (or --tiny for a CPU dry run)")
    tok = tokenizer()
    rows = []
    for name in args.configs:
        model = random_model(name, device, args.tiny)
        cfg = model.config
        # warm-up: Triton compilation and autotuning, cuBLAS/cuSOLVER handles; not timed
        warm = torch.randint(0, cfg.vocab_size, (min(args.T),))
        compact_capture(prefill_and_capture(model, tok, warm, chunk_size=args.chunk_size,
                                            max_queries=args.max_queries, progress=False),
                        make_method("am"), args.ratio, "layer", progress=False)
        for T in args.T:
            ids = torch.randint(0, cfg.vocab_size, (T,), generator=torch.Generator().manual_seed(T))
            cap, t_prefill = sync_time(lambda: prefill_and_capture(model, tok, ids, chunk_size=args.chunk_size,
                                                                   max_queries=args.max_queries, progress=False))
            _, t_score = sync_time(lambda: cap.attention_stats("full"))
            heads = cfg.num_hidden_layers * cfg.num_key_value_heads
            for budget in ("uniform", "layer"):
                (layers, _), t_am = sync_time(lambda: compact_capture(cap, make_method("am"), args.ratio, budget,
                                                                      progress=False))
                kept = sum(int(layer.lengths.sum()) for layer in layers)
                rows.append((name, T, cap.queries[0].shape[1], budget, t_prefill, t_score, t_am, heads, kept))
                print(rows[-1], flush=True)
            del cap
            torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()
    head = ("| model shape | T | queries/KV head | budget | prefill+capture s | key scoring s | AM fits s | "
            "heads | ms/head (scoring+fits) | kept entries |\n|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    lines = [head] + [f"| {n} | {T} | {q} | {b} | {tp:.2f} | {ts:.2f} | {ta:.2f} | {h} | {1000 * (ts + ta) / h:.1f} | "
                      f"{k:,} |" for n, T, q, b, tp, ts, ta, h, k in rows]
    table = "\n".join(lines)
    print(table)
    dev = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"
    text = (f"# GPU compaction timing\n\n- date: {datetime.date.today()}\n- device: {dev}, torch {torch.__version__}\n"
            f"- command: `python {' '.join(sys.argv)}`\n- ratio {args.ratio:g}, AM (highest attention, NNLS beta, "
            f"ridge values), bf16 random-weight models; one untimed warm-up run per model (Triton compile/autotune)\n\n{table}\n")
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
