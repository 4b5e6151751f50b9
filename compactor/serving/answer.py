"""Answering from a compacted document: prompt ids (chat turns or raw text), sampling, one generation per prompt.

Shared by `compactor generate`, the server and `compactor.ask`. Every generation runs on a fork of the cache
(`model.generate` forks a CompactedCache), so one loaded document answers any number of prompts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..capture import chat
from ..capture.prefill import context_limit
from ..errors import CompactorError
from .cache import CompactedCache


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0   # 0: greedy
    top_p: float = 1.0
    seed: int | None = None    # seeds torch's generator before sampling
    min_new_tokens: int = 0    # end-of-sequence is suppressed before this many tokens

    def check(self) -> "Sampling":
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise CompactorError(f"max_new_tokens must be a positive integer (got {self.max_new_tokens!r})")
        if not 0 <= self.temperature <= 100:
            raise CompactorError(f"temperature must be in [0, 100] (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise CompactorError(f"top_p must be in (0, 1] (got {self.top_p})")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise CompactorError(f"min_new_tokens must be between 0 and max_new_tokens (got {self.min_new_tokens})")
        return self

    def generate_kwargs(self) -> dict:
        lengths = {"max_new_tokens": self.max_new_tokens, "min_new_tokens": self.min_new_tokens}
        if self.temperature == 0:
            return {"do_sample": False, **lengths}
        return {"do_sample": True, "temperature": float(self.temperature), "top_p": float(self.top_p), "top_k": 0,
                **lengths}


def is_chat(meta: dict) -> bool:
    return isinstance(meta.get("chat"), dict)


def messages_ids(meta: dict, tokenizer, messages: list[dict]) -> torch.Tensor:
    """Token ids (n,) that follow a document for chat `messages`: the continuation of the document's user turn for
    a chat artifact, or a conversation of their own after a raw-text one."""
    if is_chat(meta):
        return chat.chat_ids(tokenizer, messages, meta["chat"].get("template_sha256"))
    return chat.fresh_chat_ids(tokenizer, messages)


def text_ids(tokenizer, prompt: str) -> torch.Tensor:
    """Token ids (n,) of raw text that continues the document (no special tokens added)."""
    if not isinstance(prompt, str) or not prompt:
        raise CompactorError("the prompt must be a non-empty string")
    return torch.tensor(tokenizer(prompt, add_special_tokens=False).input_ids, dtype=torch.long)


def check_room(model, cache: CompactedCache, n_prompt: int, max_new_tokens: int) -> None:
    """The prefix, the prompt and the answer must fit in the model's context (positions T .. T + n + m - 1)."""
    limit = context_limit(model)
    need = cache.get_seq_length() + n_prompt + max_new_tokens
    if limit and need > limit:
        raise CompactorError(f"document ({cache.get_seq_length()} tokens) + prompt ({n_prompt}) + max_new_tokens "
                             f"({max_new_tokens}) = {need} tokens exceeds the model's context of {limit}")


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end-of-sequence token) or "length" (max_new_tokens reached)


@torch.no_grad()
def generate(model, tokenizer, cache: CompactedCache, ids: torch.Tensor, sampling: Sampling, streamer=None,
             stopping_criteria=None) -> Generation:
    """One generation after the cache (left as it is) for prompt ids (n,)."""
    sampling.check()
    if ids.numel() == 0:
        raise CompactorError("the prompt has no tokens")
    check_room(model, cache, ids.numel(), sampling.max_new_tokens)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    out = model.generate(ids[None].to(device), past_key_values=cache, pad_token_id=eos, streamer=streamer,
                         stopping_criteria=stopping_criteria, **sampling.generate_kwargs())
    new = out[0, ids.numel():]
    stopped = eos is not None and new.numel() > 0 and int(new[-1]) == eos
    return Generation(tokenizer.decode(new, skip_special_tokens=True), int(ids.numel()), int(new.numel()),
                      "stop" if stopped or new.numel() < sampling.max_new_tokens else "length")


def ask(cache: CompactedCache, questions, model, tokenizer, max_new_tokens: int = 64, temperature: float = 0.0,
        top_p: float = 1.0, seed: int | None = None) -> list[str]:
    """The answer to each question (a str or a list of str), each asked on its own after the document."""
    if isinstance(questions, str):
        questions = [questions]
    sampling = Sampling(max_new_tokens, temperature, top_p, seed).check()
    return [generate(model, tokenizer, cache, messages_ids(cache.metadata, tokenizer, [{"role": "user",
                                                                                      "content": q}]),
                     sampling).text.strip() for q in questions]
