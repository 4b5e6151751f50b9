"""Extra reference-query sources beside the document's own queries and the repeat pass.

- self-study (the paper's self-study, small): after the document the model is asked to write a question about it and
  answer it; `n` such question/answer texts are sampled (seeded), then teacher-forced after the document so that the
  queries of both the question and the answer are captured (`self_study_texts`);
- random: directions uniform on the sphere with norms drawn from the head's captured queries (`random_queries`).
The prompts differ from the evaluation's recall cue ("Recite from the text above:"), which is never a reference query.
"""
from __future__ import annotations

import torch

SELF_STUDY_PROMPT = "\n\nWrite one question a reader could ask about the text above, then answer it.\nQuestion:"


@torch.no_grad()
def self_study_texts(model, tokenizer, make_cache, T: int, n: int, max_new_tokens: int = 48, seed: int = 0,
                     temperature: float = 0.8) -> list[torch.Tensor]:
    """`n` token sequences (prompt + sampled question and answer) to teacher-force after the document.
    make_cache() gives a fresh cache holding the document (T tokens)."""
    device = next(model.parameters()).device
    prompt = tokenizer(SELF_STUDY_PROMPT, add_special_tokens=False, return_tensors="pt").input_ids[0]
    gen = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_token_id
    out = []
    for _ in range(n):
        cache = make_cache()
        ids = prompt.clone()
        step = ids
        for _ in range(max_new_tokens):
            pos = torch.arange(T + ids.numel() - step.numel(), T + ids.numel(), device=device)[None]
            logits = model(input_ids=step[None].to(device), position_ids=pos, past_key_values=cache, use_cache=True,
                           logits_to_keep=1).logits[0, -1].float().cpu()
            probs = torch.softmax(logits / temperature, -1)
            nxt = torch.multinomial(probs, 1, generator=gen)
            if eos is not None and int(nxt) == eos:
                break
            ids = torch.cat([ids, nxt])
            step = nxt
        out.append(ids)
    return out


def random_queries(queries: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """(Hkv, n, d) random directions, each scaled by the norm of a random captured query of the same head
    (queries (Hkv, m, d))."""
    H, m, d = queries.shape
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(H, n, d, generator=gen)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    norms = queries.float().norm(dim=-1).cpu()  # (H, m)
    pick = torch.randint(m, (H, n), generator=gen)
    return (dirs * norms.gather(1, pick)[..., None]).to(queries.dtype).to(queries.device)
