"""Does chat wrapping matter? SmolLM2-135M-Instruct, the first T tokens of Macbeth, simple factual questions.

Three ways to ask after the same document, greedy, 32 new tokens:
- raw + chat turn: the document compressed as plain text, then the question as a conversation of its own (the
  template's system prompt, the user turn, the assistant header), what one gets without --chat;
- chat-wrapped: the document compressed as the opening of the first user turn (`compress --chat`), the question
  continuing that turn, then the assistant header;
- chat-wrapped at 10x: the same after Attention Matching at ratio 10.
At ratio 1 the compressed cache is the full cache (every key kept, beta = 0), so the first two differ only in the
wrapping. An answer counts as correct when it contains one of the expected words (case-insensitive).

    python benchmarks/bench_chat.py [--tokens 2048] [--out benchmarks/results_chat.md]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import torch

import compactor
from compactor.capture.documents import bundled_play
from compactor.models import load_model

QUESTIONS = [
    ("Where do the witches plan to meet Macbeth?", ["heath"]),
    ("Who is the king of Scotland?", ["duncan"]),
    ("How many witches are there?", ["three", "3"]),
    ("What title will Macbeth be given for his victory?", ["cawdor"]),
    ("Who is Macbeth's fellow captain in the battle?", ["banquo"]),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--out", default="benchmarks/results_chat.md")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[1]
    lm = load_model("smollm2-135m")
    text = bundled_play("macbeth").text
    t0 = time.perf_counter()
    setups = {
        "raw + chat turn (1x)": compactor.compress(text, lm.model, lm.tokenizer, ratio=1, max_tokens=args.tokens),
        "chat-wrapped (1x)": compactor.compress(text, lm.model, lm.tokenizer, ratio=1, chat=True,
                                                max_tokens=args.tokens),
        "chat-wrapped (10x)": compactor.compress(text, lm.model, lm.tokenizer, ratio=10, chat=True,
                                                 max_tokens=args.tokens),
    }
    compress_s = time.perf_counter() - t0
    rows, correct = [], {name: 0 for name in setups}
    for question, keys in QUESTIONS:
        row = [question]
        for name, cache in setups.items():
            (answer,) = compactor.ask(cache, question, lm.model, lm.tokenizer, max_new_tokens=32)
            ok = any(k in answer.lower() for k in keys)
            correct[name] += ok
            row.append(("**yes**: " if ok else "no: ") + answer.replace("\n", " ").replace("|", "/"))
        rows.append(row)
        print(row, flush=True)
    names = list(setups)
    lines = [
        "# Chat wrapping: answers after a compressed Macbeth (SmolLM2-135M-Instruct, CPU)",
        "",
        f"{datetime.date.today()}, {platform.machine()} CPU, torch {torch.__version__}, {args.threads} thread(s); "
        f"`python benchmarks/bench_chat.py --tokens {args.tokens}` (compression of the three setups: "
        f"{compress_s:.0f} s). Document: the first {args.tokens} tokens of Macbeth (Act I, scenes 1-3). "
        "Greedy, 32 new tokens; correct = the answer contains the expected word (a lenient test: read the "
        f"answers). Machine load average (5 min) {load_before:.1f} before, {os.getloadavg()[1]:.1f} after.",
        "",
        "| question | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
        *["| " + " | ".join(r) + " |" for r in rows],
        "| **correct** | " + " | ".join(f"**{correct[n]}/{len(QUESTIONS)}**" for n in names) + " |",
        "",
        "raw + chat turn: the document as plain text, then `<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n"
        "QUESTION<|im_end|>\\n<|im_start|>assistant\\n`. chat-wrapped: `<|im_start|>system\\n...<|im_end|>\\n"
        "<|im_start|>user\\nDOCUMENT` compressed, then `\\n\\nQUESTION<|im_end|>\\n<|im_start|>assistant\\n`.",
    ]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
