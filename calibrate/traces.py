"""Reasoning traces with phases, made by the model itself (no public traces ship here).

For each prompt (a passage of a corpus document and a question about it, in the model's chat format), the model
generates after a forced `<think>` opening; its thinking ends at its own `</think>` or, after `think_tokens`
tokens, at a forced `</think>`; then it answers (at least `min_answer_tokens`, at most `answer_tokens`). The trace
is the whole text; its phase boundaries (prompt | think | answer) are then found from the markers, exactly as for
a trace a user supplies (capture/phases.py), and how each was found is recorded: the model's own `</think>`, a
forced one, or the fallback fraction when a marker is missing (user traces).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..capture.documents import Document
from ..capture.phases import MARKERS, PHASE_NAMES, Phases, find_phases

QUESTIONS = (
    "Who speaks in this passage, and what do they want?",
    "Summarise what happens in this passage and why it matters.",
    "What is the mood of this passage? Explain with words from it.",
    "Which character seems most troubled here, and why?",
    "What might happen next, judging from this passage?",
)


@dataclass
class Trace:
    name: str
    text: str
    phases: Phases
    close: str  # how thinking ended: "own" (the model wrote </think>), "forced", or "given" (a user trace)


def _prompt(tokenizer, passage: str, question: str) -> str:
    user = f"Read this passage and answer the question.\n\n{passage}\n\nQuestion: {question}"
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    return f"{user}\n\nAnswer:\n"


def _passage(tokenizer, doc: Document, tokens: int, rng: torch.Generator) -> str:
    ids = tokenizer(doc.text, add_special_tokens=False).input_ids
    start = int(torch.randint(0, max(1, len(ids) - tokens), (1,), generator=rng))
    return tokenizer.decode(ids[start:start + tokens], skip_special_tokens=True).strip()


@torch.no_grad()
def _sample(model, tokenizer, texts: list[str], max_new: int, min_new: int, seed: int) -> list[str]:
    """Sampled continuations of several texts in one batched generate (left-padded with the eos id, masked): on a
    CPU a batch of a few rows costs about what one row does."""
    device = next(model.parameters()).device
    rows = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    width = max(len(r) for r in rows)
    pad = tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    torch.manual_seed(seed)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=min_new, do_sample=True,
                         temperature=0.7, top_p=0.95, pad_token_id=pad, eos_token_id=pad)
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]


def generate_traces(model, tokenizer, docs: list[Document], n: int, think_tokens: int = 160,
                    answer_tokens: int = 96, min_answer_tokens: int = 48, passage_tokens: int = 192,
                    markers=MARKERS, fallback_fraction: float = 0.7, seed: int = 0,
                    progress: bool = True, batch: int = 4) -> list[Trace]:
    """n traces from passages of `docs` (round robin), sampled with temperature 0.7, `batch` at a time."""
    open_marker, close_marker = markers[0][0], markers[-1][0]
    rng = torch.Generator().manual_seed(seed)
    out = []
    with tqdm(total=n, desc="traces", unit="trace", disable=not progress) as bar:
        for first in range(0, n, batch):
            idx = list(range(first, min(n, first + batch)))
            heads = [_prompt(tokenizer, _passage(tokenizer, docs[i % len(docs)], passage_tokens, rng),
                             QUESTIONS[i % len(QUESTIONS)]) + f"{open_marker}\n" for i in idx]
            bodies, closes = [], []
            for head, think in zip(heads, _sample(model, tokenizer, heads, think_tokens, 0, seed * 1000 + first)):
                closes.append("own" if close_marker in think else "forced")
                think = think[:think.index(close_marker)] if close_marker in think else think
                bodies.append(f"{head}{think.rstrip()}\n{close_marker}\n")
            answers = _sample(model, tokenizer, bodies, answer_tokens, min_answer_tokens, seed * 1000 + first + 1)
            for i, body, answer, close in zip(idx, bodies, answers, closes):
                text = body + answer
                out.append(Trace(f"trace-{i}", text, find_phases(text, tokenizer, markers, fallback_fraction,
                                                                 add_special_tokens=False), close))
            bar.update(len(idx))
    return out


def given_traces(tokenizer, docs: list[Document], markers=MARKERS, fallback_fraction: float = 0.7) -> list[Trace]:
    """User-supplied traces: phases from their markers, or the fallback where a marker is missing."""
    return [Trace(d.name, d.text, find_phases(d.text, tokenizer, markers, fallback_fraction,
                                              add_special_tokens=False), "given") for d in docs]


def boundary_counts(traces: list[Trace]) -> dict[str, int]:
    """How each phase boundary was found, over all traces: '<phase> start: marker (own|forced|given) / fallback'."""
    counts: dict[str, int] = {}
    for t in traces:
        for i, method in enumerate(t.phases.methods):
            key = f"{PHASE_NAMES[i + 1] if i + 1 < len(PHASE_NAMES) else i + 1} start: {method}"
            if method == "marker" and i == len(t.phases.methods) - 1:
                key += f" ({t.close})"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
