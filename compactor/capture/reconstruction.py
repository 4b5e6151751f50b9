"""Reconstruction probe (KVzip / KVgrad style): score every document key by how much a replay of the document uses it.

After the document prefill, the model is asked to repeat the document, teacher-forced, in chunks as KVzip does:
chunk i is fed as  [instruction (+ the 8 tokens before the chunk)] + doc[s_i:e_i]  at positions T, T+1, ... against
the read-only document cache (the chunks do not see each other). For every layer, query head h and document key c:

    recon[h, c]      = max_p p_hpc                    (KVzip)
    recon_grad[h, c] = max_p p_hpc * ||dPhi/da_p||    (KVgrad: input x gradient attribution at the probe)
    wo_norm[h, c]    = ||W_O^(h) v_c||                (the value as head h writes it into the residual stream)

p: every replay position (no subsampling); p_hpc: the model's own softmax weight, normalised over everything p sees
(the document and the replay so far), so a head that mostly attends inside the replay gives small scores; a_p: the
layer's attention output (after o_proj) at p; Phi = sum_p ||h^L_p||^2 over the replay's last hidden states (before the
final norm), as in kvpress 0.5.5's KVgradPress. Scores are comparable across heads and layers: max over the GQA group
happens later, in fitting/key_scores.py, after the per-head products.
The instructions differ from the recall cue of the evaluation (evaluation/metrics.py), which is never a probe.
"""
from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from ..serving.attention import compactor_attention

PROBE_NAME = "compactor_probe"
FIRST_PROMPT = "\n\nRepeat the text above, word for word.\n\n"
NEXT_PROMPT = "\n\nRepeat the part of the text above that starts with:"
OVERLAP = 8  # tokens of the previous chunk quoted after NEXT_PROMPT (KVzip's prev_postfix_size)


def probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The compactor attention, handing (layer, query, key, scale) to a `compactor_probe` callback first."""
    probe = kwargs.get("compactor_probe")
    if probe is not None:
        probe(module.layer_idx, query, key, scaling)
    return compactor_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


@contextlib.contextmanager
def using_probe_attention(model):
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(PROBE_NAME, probe_attention)
    AttentionMaskInterface.register(PROBE_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # the mask compactor's gets
    previous = model.config._attn_implementation
    model.set_attn_implementation(PROBE_NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def doc_weights(query: torch.Tensor, key: torch.Tensor, scale: float, T: int) -> torch.Tensor:
    """Softmax weights (Hq, q, T) of replay queries (Hq, q, d) on the T document keys, normalised over all keys they
    see: key (Hkv, T + q, d) = the document then the replay chunk itself (causal)."""
    hq, q_len, _ = query.shape
    group = hq // key.shape[0]
    k = key.float().repeat_interleave(group, 0)
    s = scale * query.float() @ k.transpose(1, 2)  # (Hq, q, T + q)
    cols = torch.arange(s.shape[-1], device=s.device)
    rows = torch.arange(q_len, device=s.device)[:, None] + T
    s = s.masked_fill(cols[None] > rows, float("-inf"))
    return torch.exp(s[..., :T] - torch.logsumexp(s, -1, keepdim=True))


class _Probe:
    """Running maxima per layer; with `keep` set, also keeps each layer's replay queries for the gradient step."""

    def __init__(self, n_layers: int, n_q: int, T: int):
        self.T = T
        self.recon = torch.zeros(n_layers, n_q, T)
        self.kept: dict[int, tuple] = {}
        self.keep = False

    def __call__(self, layer: int, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        q, k = query[0].detach(), key[0].detach()
        p = doc_weights(q, k, scale, self.T)
        self.recon[layer] = torch.maximum(self.recon[layer], p.amax(1).cpu())
        if self.keep:
            self.kept[layer] = (q, k, scale)


def output_norms(values: torch.Tensor, o_proj_weight: torch.Tensor) -> torch.Tensor:
    """||W_O^(h) v_c|| (Hq, T) for values (Hkv, T, d) and o_proj.weight (hidden, Hq * d)."""
    n_kv, T, d = values.shape
    w = o_proj_weight.detach().float().reshape(o_proj_weight.shape[0], -1, d)  # (hidden, Hq, d)
    hq = w.shape[1]
    v = values.float().repeat_interleave(hq // n_kv, 0)  # (Hq, T, d)
    return torch.einsum("htd,ohd->hto", v, w).norm(dim=-1)


def _chunks(doc_ids: torch.Tensor, chunk: int, tokenizer) -> list[tuple[int, int, torch.Tensor]]:
    first = tokenizer(FIRST_PROMPT, add_special_tokens=False, return_tensors="pt").input_ids[0]
    nxt = tokenizer(NEXT_PROMPT, add_special_tokens=False, return_tensors="pt").input_ids[0]
    out = []
    for s in range(0, doc_ids.numel(), chunk):
        e = min(s + chunk, doc_ids.numel())
        head = first if s == 0 else torch.cat([nxt, doc_ids[max(0, s - OVERLAP):s]])
        out.append((s, e, torch.cat([head, doc_ids[s:e]])))
    return out


def _doc_cache(keys, values, config):
    """A cache holding the whole document in every layer. Built without the config on purpose: a sliding-window
    layer's cache would keep only the window, while a compacted prefix stays visible to every later query (the
    probe scores keys for that)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(zip(keys, values)):
        cache.update(k[None].detach(), v[None].detach(), i)
    return cache


@contextlib.contextmanager
def _frozen(model):
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def reconstruction_scores(model, tokenizer, doc_ids: torch.Tensor, keys: list[torch.Tensor],
                          values: list[torch.Tensor], gradient: bool = False, chunk_size: int = 256,
                          progress: bool = False) -> dict[str, torch.Tensor]:
    """Scores of the document keys from a chunked replay of the document (module docstring).
    keys/values: L x (Hkv, T, d) of the document prefill. Returns {"recon", "wo_norm"[, "recon_grad"]}, each
    (L, Hq, T) float32 on the CPU."""
    cfg = model.config
    L, T = cfg.num_hidden_layers, doc_ids.numel()
    n_q = cfg.num_attention_heads
    device = next(model.parameters()).device
    probe = _Probe(L, n_q, T)
    grad_max = torch.zeros(L, n_q, T) if gradient else None
    layers = model.model.layers
    chunks = _chunks(doc_ids, chunk_size, tokenizer)
    with using_probe_attention(model), tqdm(total=len(chunks), desc="reconstruction probe", unit="chunk",
                                            disable=not progress) as bar:
        for s, e, ids in chunks:
            cache = _doc_cache(keys, values, cfg)
            pos = torch.arange(T, T + ids.numel(), device=device)[None]
            if not gradient:
                with torch.no_grad():
                    model.model(input_ids=ids[None].to(device), position_ids=pos, past_key_values=cache,
                                use_cache=True, compactor_probe=probe)
                bar.update()
                continue
            outs: dict[int, torch.Tensor] = {}
            last: list[torch.Tensor] = []
            hooks = [layers[-1].register_forward_hook(lambda m, a, o: last.append(o[0] if isinstance(o, tuple)
                                                                                  else o))]
            for i, layer in enumerate(layers):
                def keep_out(m, a, o, i=i):
                    o[0].retain_grad()
                    outs[i] = o[0]
                hooks.append(layer.self_attn.register_forward_hook(keep_out))
            probe.keep = True
            try:
                with torch.enable_grad(), _frozen(model):
                    emb = model.model.embed_tokens(ids[None].to(device)).detach().requires_grad_(True)
                    model.model(inputs_embeds=emb, position_ids=pos, past_key_values=cache, use_cache=True,
                                compactor_probe=probe)
                    phi = last[-1].float().square().sum()
                    phi.backward()
            finally:
                for h in hooks:
                    h.remove()
                probe.keep = False
            with torch.no_grad():
                for i in range(L):
                    g = outs[i].grad[0].float().norm(dim=-1)  # (q,)
                    q, k, scale = probe.kept[i]
                    p = doc_weights(q, k, scale, T) * g.to(q.device)[None, :, None]
                    grad_max[i] = torch.maximum(grad_max[i], p.amax(1).cpu())
            probe.kept.clear()
            del cache, outs, last
            bar.update()
    with torch.no_grad():
        wo = torch.stack([output_norms(values[i], layers[i].self_attn.o_proj.weight).cpu() for i in range(L)])
    out = {"recon": probe.recon, "wo_norm": wo}
    if gradient:
        out["recon_grad"] = grad_max
    return out
