"""Chat wrapping: a document as the opening of the first user turn, questions as its continuation.

With the model's chat template, the conversation [user: DOCUMENT + "\\n\\n" + QUESTION] renders as
    head + DOCUMENT + "\\n\\n" + QUESTION + tail
where `head` is everything the template puts before the first user message (system prompt, turn header) and
`tail` closes the turn and opens the assistant's (e.g. for SmolLM2: head = "<|im_start|>system\\n...<|im_end|>\\n
<|im_start|>user\\n", tail = "<|im_end|>\\n<|im_start|>assistant\\n"). A chat artifact compresses head + DOCUMENT;
a question later appends "\\n\\n" + QUESTION + tail. One user message means the wrapping works with templates that
insist on alternating roles; further turns (assistant answers, user follow-ups) are rendered by the same template.
The template's sha256 is recorded in the artifact so a question is wrapped by the template that wrapped the document.
"""
from __future__ import annotations

import hashlib

import torch

from ..errors import CompactorError

SEPARATOR = "\n\n"  # between the document and the first question, inside the same user message
_MARK = "\ue000compactor-document\ue000"  # stands for the document while rendering; private-use characters


def template_digest(tokenizer) -> str:
    """sha256 of the tokenizer's chat template; a clear error when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise CompactorError("the tokenizer has no chat template, so the document cannot be wrapped as a chat turn")
    if isinstance(template, dict):  # several named templates: the default one is used
        template = template.get("default") or next(iter(template.values()))
    return hashlib.sha256(str(template).encode()).hexdigest()


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja's TemplateError (e.g. a role the template refuses) and the like
        raise CompactorError(f"the chat template cannot render this conversation: {e}") from None


def _split(text: str) -> tuple[str, str]:
    if text.count(_MARK) != 1:
        raise CompactorError("the chat template does not place the user's message verbatim, exactly once; "
                             "it cannot wrap a compressed document")
    head, tail = text.split(_MARK)
    return head, tail


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids if text else []


def document_ids(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids (T,) of head + the document's first `max_tokens` tokens (all when None): the open first turn."""
    template_digest(tokenizer)
    head, _ = _split(_render(tokenizer, [{"role": "user", "content": _MARK}], add_generation_prompt=True))
    doc = _encode(tokenizer, text)
    if max_tokens is not None:
        doc = doc[:max_tokens]
    return torch.tensor(_encode(tokenizer, head) + doc, dtype=torch.long)


def check_messages(messages) -> list[dict]:
    """Validated [{role, content}] with roles user/assistant alternating, starting and ending with the user."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise CompactorError("messages must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ("user",
                                                                                                    "assistant"):
            raise CompactorError(f"message {i}: expected {{'role': 'user' | 'assistant', 'content': str}}")
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise CompactorError("messages must alternate user / assistant, starting with the user (the document "
                                 "opens the first user turn)")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise CompactorError("the last message must be the user's")
    return out


def continuation_text(tokenizer, messages: list[dict]) -> str:
    """What follows the compressed head + document: the rest of the first user message, later turns, and the
    assistant header."""
    messages = check_messages(messages)
    first = {"role": "user", "content": _MARK + SEPARATOR + messages[0]["content"]}
    _, rest = _split(_render(tokenizer, [first, *messages[1:]], add_generation_prompt=True))
    return rest


def chat_ids(tokenizer, messages: list[dict], template_sha256: str | None = None) -> torch.Tensor:
    """Token ids (n,) to append to a chat artifact for `messages`; refuses a template other than the recorded one."""
    digest = template_digest(tokenizer)
    if template_sha256 is not None and digest != template_sha256:
        raise CompactorError(f"the artifact was wrapped with chat template sha256 {template_sha256[:12]}, but this "
                             f"tokenizer's template is {digest[:12]}: questions would not continue the document's turn")
    return torch.tensor(_encode(tokenizer, continuation_text(tokenizer, messages)), dtype=torch.long)


def fresh_chat_ids(tokenizer, messages: list[dict]) -> torch.Tensor:
    """Token ids (n,) of `messages` as a conversation of their own (after a raw-text artifact): the whole template,
    system prompt included, and the assistant header."""
    template_digest(tokenizer)
    text = _render(tokenizer, check_messages(messages), add_generation_prompt=True)
    return torch.tensor(_encode(tokenizer, text), dtype=torch.long)
