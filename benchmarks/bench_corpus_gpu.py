"""Corpus throughput on GPUs: documents/s and tokens/s of the compress-corpus loop, end to end.

The loop is compactor.corpus.runner.run_corpus, the one `compactor compress-corpus` runs: read a JSONL document,
tokenize, prefill + capture, compact (batched AM), encode, write the artifact atomically, append the manifest. The
model is a random-weight Llama-3.1-8B shape (benchmarks/bench_compaction_gpu.py random_model, bf16) and the
documents are random text cut to T tokens (the timing depends on the shapes, not on the words). Sections:
1. one model on one GPU: one untimed warm-up document (Triton compile and autotune), then --docs documents
   compressed and written; then the same run again, where every artifact is verified (digest, options, model) and
   skipped;
2. --device-map: the same model dispatched by accelerate with a per-block device map over every GPU of this host
   (what `--device-map auto` gives a model over several GPUs; on one GPU every block maps to it and the hooks are
   forced, so the cost of the hooks is measured), the same documents; its artifacts compared with section 1's;
3. mixed devices: a capture (T = --mixed-T) with the second half of its layers moved to the CPU, compacted by the
   batched path (each layer group on the device holding it), against the two halves compacted separately (uniform
   budgets: layers independent), layer by layer.
Under torchrun (--nproc-per-node N, one GPU per rank): section 1 on rank 0 alone, then the same documents over
the N ranks (one model per GPU, LPT assignment): documents/s at 1 and N GPUs and the scaling efficiency.

Run (GPU): python benchmarks/bench_corpus_gpu.py --out benchmarks/results_corpus_gpu.md   (make bench-corpus-gpu)
           (estimated ~1-1.5 min on one H100: 8B weights 16 GB, ~2 s per T=8k document; --deadline, 140 s by
           default, skips sections 2 and 3 when they would end later, estimated from section 1)
           torchrun --standalone --nproc-per-node 2 benchmarks/bench_corpus_gpu.py --out benchmarks/results_corpus_gpu_x2.md
      CPU: python benchmarks/bench_corpus_gpu.py --dry-run      (toy sizes: checks the script runs)
Without an installed package, put the package layout on PYTHONPATH (compactor/ with kernels/ inside it).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
T0 = time.perf_counter()  # the script's start: imports count in its wall time


def _bench_compaction():
    spec = importlib.util.spec_from_file_location("bench_compaction_gpu", HERE / "bench_compaction_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_corpus(path: Path, docs: int, chars: int, seed: int = 0) -> Path:
    """docs documents of random lower-case text (a space every ~6 characters), `chars` characters each."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz     "
    with open(path, "w") as f:
        for i in range(docs):
            f.write(json.dumps({"id": f"doc-{i:03d}", "text": "".join(rng.choice(letters) for _ in range(chars))})
                    + "\n")
    return path


def per_doc(out_dir: Path) -> dict:
    """Mean seconds per compressed document: total (manifest), prefill and compact (artifact meta)."""
    from compactor.storage.artifact import read_meta

    recs = [json.loads(x) for x in (out_dir / "manifest.jsonl").read_text().splitlines()]
    done = [r for r in recs if r["status"] == "done"]
    if not done:
        return {}
    secs = [read_meta(r["path"])["seconds"] for r in done]
    total = sum(r["seconds"] for r in done) / len(done)
    prefill = sum(s["prefill"] for s in secs) / len(done)
    compact = sum(s["compact"] for s in secs) / len(done)
    return {"total_s": total, "prefill_s": prefill, "compact_s": compact, "rest_s": total - prefill - compact,
            "artifact_mb": sum(r["bytes"] for r in done) / len(done) / 1e6}


def same_datasets(a: Path, b: Path) -> bool:
    import h5py
    import numpy as np

    with h5py.File(a, "r") as f, h5py.File(b, "r") as g:
        return set(f) == set(g) and all(f[k].dtype == g[k].dtype and np.array_equal(f[k][()], g[k][()]) for k in f)


def run(lm, corpus: Path, out: Path, opts, world=None) -> dict:
    from compactor.corpus.distributed import World
    from compactor.corpus.listing import list_corpus
    from compactor.corpus.runner import run_corpus
    from compactor.methods import make_method

    sync()
    s = run_corpus(lm, list_corpus(corpus), make_method("am"), opts, out, world or World(), progress=False)
    sync()
    return s


def block_map(model, devices: list) -> dict:
    """A per-block device map over `devices`: accelerate's own (balanced over their free memory) when there are
    several, else every block of the model on the one device."""
    names = (["model.embed_tokens", "model.rotary_emb"] + [f"model.layers.{i}" for i in range(len(model.model.layers))]
             + ["model.norm", "lm_head"])
    if len(devices) > 1:
        from accelerate import infer_auto_device_map
        from accelerate.utils import get_balanced_memory

        no_split = model._no_split_modules
        mem = get_balanced_memory(model, {d: torch.cuda.mem_get_info(d)[0] for d in devices},
                                  no_split_module_classes=no_split)
        return infer_auto_device_map(model, max_memory=mem, no_split_module_classes=no_split)
    return dict.fromkeys(names, devices[0])


def mixed_devices(model, tok, args, device: str) -> dict:
    """Section 3: compaction of a capture whose layers live on two devices, against each half alone."""
    from compactor.capture.prefill import Capture, prefill_and_capture
    from compactor.methods import make_method
    from compactor.pipeline import compact_capture
    from compactor.storage.kv_codec import encode_layer, parse_kv_bits

    cfg = model.config
    ids = torch.randint(0, 300, (args.mixed_T,), generator=torch.Generator().manual_seed(1))
    cap = prefill_and_capture(model, tok, ids, chunk_size=args.chunk_size, max_queries=args.mixed_queries,
                              progress=False)
    L = cfg.num_hidden_layers
    half = L // 2
    other = "cpu"
    moved = lambda xs: [x if i < half else x.to(other) for i, x in enumerate(xs)]  # noqa: E731
    mixed = Capture(moved(cap.keys), moved(cap.values), moved(cap.queries), cap.query_pos, cap.query_source,
                    cap.scale)
    part = lambda c, sl: Capture(c.keys[sl], c.values[sl], c.queries[sl], c.query_pos, c.query_source,  # noqa: E731
                                 c.scale)
    am = make_method("am")
    t = time.perf_counter()
    got, _ = compact_capture(mixed, am, args.ratio, "uniform", progress=False, batched=True)
    sync()
    seconds = time.perf_counter() - t
    first, _ = compact_capture(part(mixed, slice(0, half)), am, args.ratio, "uniform", progress=False, batched=True)
    second, _ = compact_capture(part(mixed, slice(half, L)), am, args.ratio, "uniform", progress=False,
                                batched=True)
    ref = first + second
    worst, same_positions = 0.0, 0
    for g, r in zip(got, ref):
        assert g.keys.device == r.keys.device, "a layer was compacted away from its device"
        same_positions += int(torch.equal(g.positions.cpu(), r.positions.cpu()))
        for a, b in ((g.values, r.values), (g.beta, r.beta), (g.keys, r.keys)):
            worst = max(worst, float((a.float() - b.float()).abs().max()))
    books: dict = {}
    for layer in got:  # the writer's encoding gathers every layer to the CPU
        encode_layer(layer, parse_kv_bits("16"), "bfloat16", 0, books)
    return {"T": args.mixed_T, "layers": L, "devices": f"{device} x{half} + {other} x{L - half}",
            "compact_s": seconds, "same_positions": f"{same_positions}/{L}", "max_abs_diff": worst}


def report(args, rows: dict, device_name: str, elapsed: float) -> str:
    cmd = "python " + " ".join([Path(sys.argv[0]).name if sys.argv else "bench_corpus_gpu.py"] + sys.argv[1:])
    if rows.get("world", 1) > 1:
        cmd = f"torchrun --standalone --nproc-per-node {rows['world']} " + cmd.removeprefix("python ")
    lines = [
        "# Corpus throughput (compress-corpus loop)", "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- device: {device_name}, torch {torch.__version__}",
        f"- command: `{cmd}` ({elapsed:.0f} s)",
        f"- model: random-weight {args.config} (bf16); {args.docs} documents of random text cut to T = {args.T} "
        f"tokens; AM at ratio {args.ratio:g}, layer budgets, {args.max_queries} reference queries per KV head, "
        f"prefill chunks of {args.chunk_size}; one untimed warm-up document per model",
        "- rates: compressed documents (tokens) over the wall time of the loop (read, tokenize, prefill + capture, "
        "compact, encode, write + fsync, manifest); per document: prefill and compact from the artifact's own "
        "timings, the rest is tokenizing, identity, encoding, digest and writing", "",
        "| run | GPUs | documents | s | documents/s | tokens/s | per doc s | prefill s | compact s | rest s | "
        "artifact MB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows["runs"]:
        d = r.get("per_doc") or {}
        lines.append(f"| {r['name']} | {r['gpus']} | {r['done']} | {r['seconds']:.2f} | {r['documents_per_s']:.3f} | "
                     f"{r['tokens_per_s']:,.0f} | {d.get('total_s', float('nan')):.3f} | "
                     f"{d.get('prefill_s', float('nan')):.3f} | {d.get('compact_s', float('nan')):.3f} | "
                     f"{d.get('rest_s', float('nan')):.3f} | {d.get('artifact_mb', float('nan')):.1f} |")
    if "skip" in rows:
        s = rows["skip"]
        lines += ["", f"Rerun of the same corpus: {s['skipped']} of {s['documents']} documents verified and skipped in "
                      f"{s['seconds']:.2f} s ({s['seconds'] / max(s['skipped'], 1):.3f} s per document)."]
    if "device_map" in rows:
        m = rows["device_map"]
        lines += ["", f"--device-map: {m['blocks']} blocks over {m['devices']} (hooks forced: {m['forced']}); "
                      f"artifacts with datasets bitwise equal to the one-device run: {m['equal']}."]
    if "mixed" in rows:
        m = rows["mixed"]
        lines += ["", f"Mixed devices: a T={m['T']} capture of {m['layers']} layers on {m['devices']}, compacted "
                      f"in {m['compact_s']:.2f} s; against each half compacted alone: same kept positions in "
                      f"{m['same_positions']} layers, largest difference in keys/values/beta {m['max_abs_diff']:.3g}."]
    if rows.get("skipped_sections"):
        lines += ["", f"Not run (they would have ended after --deadline {args.deadline:g} s): "
                      f"{', '.join(rows['skipped_sections'])}."]
    if rows.get("sections"):
        lines += ["", "Wall time by section (rank 0, seconds): " + "; ".join(
            f"{k} {v:.1f}" for k, v in rows["sections"].items()) + "."]
    if "scaling" in rows:
        s = rows["scaling"]
        lines += ["", f"Scaling: {s['rate_1']:.3f} documents/s on 1 GPU, {s['rate_n']:.3f} on {s['n']} GPUs: "
                      f"speed-up {s['rate_n'] / s['rate_1']:.2f}x, efficiency {s['rate_n'] / s['rate_1'] / s['n']:.0%} "
                      f"(LPT shares in bytes: {s['shares']})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="llama-3.1-8b")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("-T", "--T", type=int, default=8192)
    ap.add_argument("--ratio", type=float, default=10)
    ap.add_argument("--max-queries", type=int, default=8192)
    ap.add_argument("--chunk-size", type=int, default=4096)
    ap.add_argument("--mixed-T", type=int, default=2048)
    ap.add_argument("--mixed-queries", type=int, default=2048)
    ap.add_argument("--deadline", type=float, default=140,
                    help="seconds from the start: sections 2 and 3 are skipped (and say so) when they would end later, "
                         "estimated from section 1's loop")
    ap.add_argument("--work", default=None, help="folder for the corpus and the artifacts (default: a temporary one)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: checks that the script runs")
    ap.add_argument("--out", default="benchmarks/results_corpus_gpu.md")
    ap.add_argument("--json", default=None, help="also write every number as JSON here")
    args = ap.parse_args(argv)
    try:
        import compactor.kernels  # noqa: F401
    except ImportError as e:
        sys.exit(f"Error: cannot import compactor.kernels ({e}); install the package or put its layout on "
                 "PYTHONPATH (compactor/ with kernels/ inside it)")
    from compactor.corpus.distributed import init_world
    from compactor.corpus.listing import list_corpus
    from compactor.corpus.sharding import lpt_assign, shares
    from compactor.models import LoadedModel
    from compactor.pipeline import CompressOptions

    if args.dry_run:
        args.docs, args.T, args.max_queries, args.chunk_size, args.mixed_T, args.mixed_queries = 3, 256, 128, 128, \
            128, 64
    cuda = not args.dry_run
    if cuda and not torch.cuda.is_available():
        sys.exit("Error: bench_corpus_gpu.py needs a CUDA device (or --dry-run on the CPU)")
    world = init_world(cuda)
    device = f"cuda:{world.local_rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(world.local_rank)
    t_start = T0
    sections: dict = {}  # name -> seconds (wall, this rank)
    mark = [time.perf_counter()]

    def log(msg):
        if world.rank == 0:
            print(msg, flush=True)

    def lap(name):
        now = time.perf_counter()
        sections[name] = now - mark[0]
        mark[0] = now
        log(f"{name}: {sections[name]:.1f} s (total {now - t_start:.1f} s)")

    bc = _bench_compaction()
    model = bc.random_model(args.config, device, tiny=args.dry_run)
    tok = bc.tokenizer()
    lm = LoadedModel(model, tok, f"random-{args.config}")
    sections["imports + model"] = time.perf_counter() - t_start
    mark[0] = time.perf_counter()
    log(f"model {args.config} on {device}: {sections['imports + model']:.1f} s since start")
    opts = CompressOptions(ratio=args.ratio, max_queries=args.max_queries, chunk_size=args.chunk_size,
                           max_tokens=args.T)
    work = Path(args.work) if args.work else Path(tempfile.gettempdir()) / "bench_corpus"
    if world.rank == 0:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        corpus = write_corpus(work / "corpus.jsonl", args.docs, int(args.T * 1.5))
        write_corpus(work / "warm.jsonl", 1, int(args.T * 1.5), seed=1)
    world.barrier()
    corpus = work / "corpus.jsonl"
    rows: dict = {"runs": [], "world": world.size, "sections": sections, "skipped_sections": []}

    def add(name, gpus, s, out):
        r = {"name": name, "gpus": gpus, **{k: s[k] for k in ("done", "seconds", "documents_per_s", "tokens_per_s",
                                                             "tokens", "failed")}}
        r["per_doc"] = per_doc(out) if world.rank == 0 else {}
        rows["runs"].append(r)
        log(json.dumps(r))
        if s["failed"] or s["tokens"] != s["done"] * args.T:
            raise SystemExit(f"Error: run {name}: {s['failed']} failed, {s['tokens']} tokens for {s['done']} documents")
        return r

    # 1. one model on one GPU (rank 0 alone under torchrun)
    if world.rank == 0:
        run(lm, work / "warm.jsonl", work / "warm-out", opts)
        lap("warm-up document")
        s1 = run(lm, corpus, work / "one", opts)
        lap("1. one GPU: corpus")
        one = add("one model, one GPU", 1, s1, work / "one")
        rows["skip"] = {k: v for k, v in run(lm, corpus, work / "one", opts).items() if k != "ranks"}
        lap("1. one GPU: rerun (verify + skip)")
        log(json.dumps(rows["skip"]))
    else:  # the other ranks warm up meanwhile
        run(lm, work / "warm.jsonl", work / f"warm-out-{world.rank}", opts)
    world.barrier()
    if world.initialized:
        # the same documents over every rank, one model per GPU
        sn = run(lm, corpus, work / "ranks", opts, world)
        lap(f"{world.size} ranks: corpus")
        if world.rank == 0:
            add(f"one model per GPU, {world.size} ranks", world.size, sn, work / "ranks")
            entries = list_corpus(corpus)
            rows["scaling"] = {"rate_1": one["documents_per_s"], "rate_n": sn["documents_per_s"], "n": world.size,
                               "shares": shares([e.cost for e in entries], lpt_assign([e.cost for e in entries],
                                                                                    world.size), world.size)}
    else:
        def fits(name: str, estimate: float) -> bool:
            late = time.perf_counter() - t_start + estimate > args.deadline
            if late:
                rows["skipped_sections"].append(name)
                log(f"skipping {name}: it would end after --deadline {args.deadline:g} s (estimate {estimate:.0f} s)")
            return not late

        loop_s = sections["1. one GPU: corpus"]
        # 3. mixed devices (before the hooks of section 2 are attached to the model); ~ a quarter of the corpus
        if fits("3. mixed devices", loop_s / 4):
            rows["mixed"] = mixed_devices(model, tok, args, device)
            lap("3. mixed devices")
            log(json.dumps(rows["mixed"]))
        free()
        # 2. --device-map: accelerate's hooks, blocks over every GPU of the host
        if fits("2. --device-map", loop_s * 1.3):  # the loop, its warm-up and the comparison
            from accelerate import dispatch_model

            devices = list(range(torch.cuda.device_count())) if cuda else ["cpu"]
            dmap = block_map(model, devices)
            model = dispatch_model(model, dmap, force_hooks=True, skip_keys=model._skip_keys_device_placement)
            lm = LoadedModel(model, tok, f"random-{args.config}")
            run(lm, work / "warm.jsonl", work / "warm-map", opts)
            s2 = run(lm, corpus, work / "map", opts)
            lap("2. --device-map: corpus")
            add("--device-map (accelerate hooks)", len(devices) if cuda else 0, s2, work / "map")
            names = sorted(p.name for p in (work / "one").glob("*.h5"))
            equal = sum(same_datasets(work / "one" / n, work / "map" / n) for n in names)
            rows["device_map"] = {"blocks": len(dmap), "devices": sorted({str(v) for v in dmap.values()}),
                                  "forced": len(set(dmap.values())) == 1, "equal": f"{equal}/{len(names)}"}
            lap("2. --device-map: compare artifacts")
            log(json.dumps(rows["device_map"]))
    elapsed = time.perf_counter() - t_start
    text = ""
    if world.rank == 0:
        name = torch.cuda.get_device_name() if cuda else "cpu (dry run: toy sizes)"
        text = report(args, rows, name, elapsed)
        print(text)
        Path(args.out).write_text(text)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    world.barrier()
    world.close()
    return text


if __name__ == "__main__":
    main()
