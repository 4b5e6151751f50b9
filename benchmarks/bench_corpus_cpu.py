"""compress-corpus on the CPU: the cost proxy of the rank assignment, and documents/s in one process vs two ranks.

1. Cost proxy (the bundled SmolLM2 tokenizer, the 38 bundled plays cut into --pieces documents of random lengths):
   the time to list the corpus (sizes from stat) against the time to tokenize every document, which each rank
   would pay before any work to balance by exact token counts; the spread of bytes per token; and the largest rank
   share (in tokens) of the LPT assignment made on bytes, against the one made on exact token counts, at 2-64 ranks.
2. Throughput: --docs play excerpts (JSONL) compressed with SmolLM2 by `compactor compress-corpus`, as one process
   (1 and 2 threads) and as two ranks under torchrun (gloo, 1 thread each): the loop's documents/s and tokens/s
   (summary of the run) and the whole command's wall time (start-up and model load included).

Run: python benchmarks/bench_corpus_cpu.py --out benchmarks/results_corpus.md     (~10 min on 2 idle cores; far
     longer on a loaded machine: see the notes in results_corpus.md)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def pieces(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n documents cut from the plays: lengths 2-200 KB, log-uniform (a corpus of short notes and long manuals)."""
    from compactor.capture.documents import list_plays

    texts = [p.read_text(encoding="utf-8") for p in list_plays().values()]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = rng.choice(texts)
        length = min(len(text), int(2000 * 100 ** rng.random()))
        start = rng.randrange(0, len(text) - length + 1)
        out.append((f"piece-{i:04d}", text[start:start + length]))
    return out


def proxy_section(args) -> dict:
    from transformers import AutoTokenizer

    from compactor.corpus.listing import list_corpus
    from compactor.corpus.sharding import lpt_assign, shares
    from compactor.models import bundled_folder

    tok = AutoTokenizer.from_pretrained(bundled_folder("smollm2-135m"))
    docs = pieces(args.pieces)
    with tempfile.TemporaryDirectory() as d:
        for name, text in docs:
            Path(d, f"{name}.txt").write_text(text, encoding="utf-8")
        t = time.perf_counter()
        entries = list_corpus(d)
        list_s = time.perf_counter() - t
        t = time.perf_counter()
        tokens = [len(tok(Path(e.source).read_text(encoding="utf-8")).input_ids) for e in entries]
        tok_s = time.perf_counter() - t
    n_bytes = [e.cost for e in entries]
    ratio = [b / t for b, t in zip(n_bytes, tokens)]
    balance = {}
    for world in (2, 4, 8, 16, 32, 64):
        by_bytes = max(shares(tokens, lpt_assign(n_bytes, world), world))
        by_tokens = max(shares(tokens, lpt_assign(tokens, world), world))
        balance[world] = {"by_bytes": by_bytes, "by_tokens": by_tokens, "ideal": sum(tokens) / world}
    return {"documents": len(entries), "mb": sum(n_bytes) / 1e6, "tokens": sum(tokens), "list_s": list_s,
            "tokenize_s": tok_s, "tokenize_mb_s": sum(n_bytes) / 1e6 / tok_s,
            "bytes_per_token": {"mean": statistics.mean(ratio), "stdev": statistics.stdev(ratio),
                                "min": min(ratio), "max": max(ratio)},
            "balance": balance}


def throughput_section(args) -> list[dict]:
    from compactor.capture.documents import bundled_play

    exe = str(Path(sys.executable).with_name("compactor"))
    rng = random.Random(1)
    plays = ["macbeth", "hamlet", "othello", "king-lear", "the-tempest", "twelfth-night", "julius-caesar",
             "romeo-and-juliet"]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        corpus = Path(d, "corpus.jsonl")
        with open(corpus, "w") as f:
            for i in range(args.docs):
                text = bundled_play(plays[i % len(plays)]).text
                length = rng.randint(args.min_chars, args.max_chars)
                f.write(json.dumps({"id": f"doc-{i}", "text": text[2000:2000 + length]}) + "\n")
        common = ["compress-corpus", str(corpus), "--ratio", str(args.ratio), "--quiet", "--json"]
        runs = [("one process, 1 thread", [exe], {"OMP_NUM_THREADS": "1"}),
                ("one process, 2 threads", [exe], {"OMP_NUM_THREADS": "2"}),
                ("torchrun, 2 ranks x 1 thread", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc-per-node", "2", "--no-python", exe],
                 {"OMP_NUM_THREADS": "1"})]
        for name, launcher, env in runs:
            out = Path(d, name.replace(" ", "_").replace(",", ""))
            t = time.perf_counter()
            p = subprocess.run([*launcher, *common, "-o", str(out)], env={**os.environ, **env}, capture_output=True,
                               text=True)
            wall = time.perf_counter() - t
            if p.returncode:
                sys.exit(f"Error: {name} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
            s = json.loads(p.stdout[p.stdout.index("{"):])
            rows.append({"name": name, "ranks": len(s["ranks"]), "done": s["done"], "tokens": s["tokens"],
                         "loop_s": s["seconds"], "documents_per_s": s["documents_per_s"],
                         "tokens_per_s": s["tokens_per_s"], "command_s": wall,
                         "rank_loops_s": [round(r["seconds"], 1) for r in s["ranks"]]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def report(args, proxy, rows, elapsed) -> str:
    b = proxy["bytes_per_token"]
    lines = [
        "# compress-corpus on the CPU", "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), shared with other "
        f"jobs while this ran (load average {os.getloadavg()[0]:.1f} at the end): rates are indicative",
        f"- command: `python benchmarks/bench_corpus_cpu.py {' '.join(sys.argv[1:])}` ({elapsed:.0f} s)", "",
        "## Cost proxy of the rank assignment", "",
        f"{proxy['documents']} documents cut from the bundled plays ({proxy['mb']:.1f} MB, {proxy['tokens']:,} SmolLM2 "
        f"tokens): listing them (sizes from stat) took {proxy['list_s'] * 1e3:.1f} ms; tokenizing all of them "
        f"{proxy['tokenize_s']:.2f} s ({proxy['tokenize_mb_s']:.2f} MB/s), which every rank would pay before starting "
        f"to balance on exact token counts (a 1 GB corpus: ~{1000 / proxy['tokenize_mb_s'] / 60:.0f} min per rank). "
        f"Bytes per token: mean {b['mean']:.2f}, stdev {b['stdev']:.2f}, range {b['min']:.2f}-{b['max']:.2f}.", "",
        "Largest rank share in tokens (the makespan) of the LPT assignment:", "",
        "| ranks | on bytes | on exact tokens | ideal (total / ranks) | bytes vs tokens |", "|---:|---:|---:|---:|---:|"]
    for world, v in proxy["balance"].items():
        lines.append(f"| {world} | {v['by_bytes']:,} | {v['by_tokens']:,} | {v['ideal']:,.0f} | "
                     f"{v['by_bytes'] / v['by_tokens'] - 1:+.2%} |")
    lines += ["", "## Throughput (SmolLM2-135M, AM, ratio "
              f"{args.ratio:g}, {args.docs} play excerpts of {args.min_chars}-{args.max_chars} characters)", "",
              "| run | ranks | documents | tokens | loop s | documents/s | tokens/s | rank loops s | command s |",
              "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['ranks']} | {r['done']} | {r['tokens']:,} | {r['loop_s']:.1f} | "
                     f"{r['documents_per_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['rank_loops_s']} | "
                     f"{r['command_s']:.1f} |")
    lines += ["", "`loop s`: the run's wall time from the moment every rank has its model (the summary's rates); "
              "`command s`: the whole command, start-up and model load included."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pieces", type=int, default=300)
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--min-chars", type=int, default=2500)
    ap.add_argument("--max-chars", type=int, default=6000)
    ap.add_argument("--ratio", type=float, default=10)
    ap.add_argument("--out", default="benchmarks/results_corpus.md")
    args = ap.parse_args(argv)
    t = time.perf_counter()
    proxy = proxy_section(args)
    print(json.dumps(proxy), flush=True)
    rows = throughput_section(args)
    text = report(args, proxy, rows, time.perf_counter() - t)
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
