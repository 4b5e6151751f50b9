"""Serving latency and memory: a 32-token answer from a loaded artifact vs re-prefilling the document.

SmolLM2-135M-Instruct on the CPU, the first T tokens of Macbeth wrapped as a chat turn, compressed at ratios 1 and
10 into artifacts; `compactor serve`'s app runs under uvicorn on localhost (in this process) and is asked over HTTP.
- first request: load the artifact (read, verify, decode) + answer;
- loaded: the same request again (the artifact is in memory), median of `--repeats`, interleaved with the others;
- in-process: the same generation without HTTP (`model.generate` on the loaded cache), median;
- re-prefill: what a server without the artifact does, `model.generate` on the whole token sequence (document +
  question), median.
Every answer is forced to exactly 32 new tokens (min_tokens = max_tokens = 32). Memory: bytes of the tensors the
loaded cache holds (prefix keys, values and beta, in the model's dtype), and of the DynamicCache a full prefill
of the same document leaves.

    python benchmarks/bench_serve.py [--tokens 2048] [--threads 1] [--out benchmarks/results_serve.md]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

import compactor
from compactor.capture import chat
from compactor.capture.documents import bundled_play
from compactor.models import load_model
from compactor.serving.server import DocumentStore, create_app

QUESTION = "What does the sergeant tell Duncan about Macbeth?"
NEW = 32


def serve(app) -> tuple[object, str]:
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--ratios", default="1,10")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results_serve.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[1]
    lm = load_model("smollm2-135m")
    model, tok = lm.model, lm.tokenizer
    text = bundled_play("macbeth").text
    folder = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    ratios = [float(r) for r in args.ratios.split(",")]
    compress_s = {}
    for r in ratios:
        compress_s[r], cache = timed(lambda: compactor.compress(text, model, tok, ratio=r, chat=True,
                                                                max_tokens=args.tokens))
        cache.save(folder / f"macbeth-{r:g}x.h5")
        del cache
    store = DocumentStore(folder, model, tok, max_documents=len(ratios))
    server, url = serve(create_app(store, "smollm2-135m"))
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": NEW, "min_tokens": NEW}

    full_ids = torch.cat([chat.document_ids(tok, text, args.tokens), chat.chat_ids(tok, body["messages"])])[None]

    def full():
        with torch.no_grad():
            return model.generate(full_ids, attention_mask=torch.ones_like(full_ids), max_new_tokens=NEW,
                                  min_new_tokens=NEW, do_sample=False, pad_token_id=tok.eos_token_id,
                                  return_dict_in_generate=True)

    names = [f"macbeth-{r:g}x" for r in ratios]
    times: dict = {(n, k): [] for n in names for k in ("http", "inproc")} | {("full", "inproc"): []}
    with httpx.Client(timeout=600) as client:
        def ask(name):
            r = client.post(f"{url}/v1/chat/completions", json={**body, "document": name})
            r.raise_for_status()
            assert r.json()["usage"]["completion_tokens"] == NEW, r.json()
            return r.json()

        first = {n: timed(lambda: ask(n)) for n in names}
        caches = {n: store.get(n) for n in names}
        ids = chat.chat_ids(tok, body["messages"], caches[names[0]].metadata["chat"]["template_sha256"])
        # interleaved, so that the load of a shared machine weighs on every variant alike
        for _ in range(args.repeats):
            for n in names:
                times[n, "http"].append(timed(lambda: ask(n))[0])
                with torch.no_grad():
                    times[n, "inproc"].append(timed(lambda: model.generate(
                        ids[None], past_key_values=caches[n], max_new_tokens=NEW, min_new_tokens=NEW,
                        do_sample=False, pad_token_id=tok.eos_token_id))[0])
            times["full", "inproc"].append(timed(full)[0])
    rows = [(f"artifact {r:g}x", first[n][0], statistics.median(times[n, "http"]),
             statistics.median(times[n, "inproc"]), caches[n].memory_bytes(),
             first[n][1]["choices"][0]["message"]["content"]) for r, n in zip(ratios, names)]
    T = caches[names[0]].logical_length
    reprefill = statistics.median(times["full", "inproc"])
    out = full()
    full_bytes = tensor_bytes([t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)])
    # the full cache right after the document, before the question and answer were appended
    full_doc_bytes = full_bytes * T // out.past_key_values.get_seq_length()
    answer = tok.decode(out.sequences[0, full_ids.shape[1]:], skip_special_tokens=True)
    server.should_exit = True

    def ms(x):
        return f"{1000 * x:,.0f} ms"

    lines = [
        "# Serving: a 32-token answer from a loaded artifact vs re-prefilling the document",
        "",
        f"{datetime.date.today()}, {platform.machine()} CPU ({platform.processor() or 'unknown'}), torch "
        f"{torch.__version__}, {args.threads} thread(s), Python {sys.version.split()[0]}; "
        f"`python benchmarks/bench_serve.py --tokens {args.tokens} --threads {args.threads}`; machine load average "
        f"(5 min) {load_before:.1f} before, {os.getloadavg()[1]:.1f} after (2 cores shared with other jobs).",
        f"SmolLM2-135M-Instruct (float32 on the CPU), the first {args.tokens} tokens of Macbeth wrapped as a chat "
        f"turn (T = {T}), question \"{QUESTION}\", exactly {NEW} new tokens (greedy, min_tokens = max_tokens). "
        f"Median of {args.repeats}. Compression time (once, offline): "
        + ", ".join(f"{r:g}x {compress_s[r]:.0f} s" for r in ratios) + ".",
        "",
        "| cache | first request (load + answer, HTTP) | loaded, HTTP | loaded, in-process | memory held |",
        "|---|---|---|---|---|",
        *[f"| {name} | {ms(first)} | {ms(loaded)} | {ms(inproc)} | {mem / 2**20:.2f} MiB |"
          for name, first, loaded, inproc, mem, _ in rows],
        f"| re-prefill the document (no artifact) | | | {ms(reprefill)} | {full_doc_bytes / 2**20:.2f} MiB "
        "(DynamicCache after the document) |",
        "",
        "Memory held: the loaded cache's tensors (compacted keys and values in the model's dtype, float32 here, "
        "padded per layer, plus float32 beta), shared by every request (each request adds only its own tokens); "
        "re-prefill: the keys and values a full prefill of the same tokens leaves.",
        "",
        "Answers:",
        *[f"- {name}: {text.strip()!r}" for name, *_, text in rows],
        f"- re-prefill: {answer.strip()!r}",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
