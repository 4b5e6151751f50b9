"""Evaluation metrics, with the exact definitions of the design notes.

Document tokens x[0:T+C]; the prefix x[:T] is compressed, C tokens follow.
- continuation KL (cKL): teacher-force x[T:T+C] after the full and after the compressed cache (positions
  T..T+C-1); mean over the C positions of KL(p_full || p_compressed), nats/token;
- recall retention: after the prefix, teacher-force a cue and a 64-token span copied from inside the prefix;
  CE over the span tokens with the full cache, the compressed cache and no prefix at all;
  retention = (CE_none - CE_c) / (CE_none - CE_full);
- attention fidelity per (layer, KV head) on held-out queries (the continuation's): relative L2 error of the
  attention output over the prefix, and relative error of the attention mass exp(lse);
- bytes: in-memory KV bytes against the full 16-bit cache of the same prefix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

RECALL_CUE = "\n\nRecite from the text above:\n"


@torch.no_grad()
def continuation_logits(model, cache, ids: torch.Tensor, start: int, **kwargs) -> torch.Tensor:
    """float32 logits (n, V) of ids (n,) fed at positions start.. after `cache` (None: no prefix)."""
    device = next(model.parameters()).device
    pos = torch.arange(start, start + ids.numel(), device=device)[None]
    out = model(input_ids=ids[None].to(device), position_ids=pos, past_key_values=cache, use_cache=cache is not None,
                **kwargs)
    return out.logits[0].float()


def kl_per_token(logits_ref: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_ref || p) per row, nats (n,)."""
    lp_ref, lp = F.log_softmax(logits_ref.double(), -1), F.log_softmax(logits.double(), -1)
    return (lp_ref.exp() * (lp_ref - lp)).sum(-1)


def span_ce(logits: torch.Tensor, ids: torch.Tensor, span_start: int) -> float:
    """Mean cross-entropy (nats) of ids[span_start:] given logits (n, V) of the same fed ids (teacher forcing)."""
    lp = F.log_softmax(logits.double(), -1)
    targets = ids[span_start:].to(lp.device)
    return float(-lp[span_start - 1:-1].gather(1, targets[:, None]).mean())


def retention(ce_none: float, ce_full: float, ce_c: float) -> float:
    return (ce_none - ce_c) / (ce_none - ce_full)


def head_fidelity(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, ckeys: torch.Tensor,
                  cbeta: torch.Tensor, cvalues: torch.Tensor, scale: float) -> tuple[float, float]:
    """Held-out queries (n, d) against the full prefix (T, d) and its compaction (t, d) with beta (t,).
    Returns (relative L2 error of the outputs, mean relative error of the attention mass). Computed in float64 on
    the device of `queries`."""
    q = queries.double()
    keys, values, ckeys, cbeta, cvalues = (x.to(q.device, torch.float64)
                                           for x in (keys, values, ckeys, cbeta, cvalues))
    s_full = scale * q @ keys.T
    s_c = scale * q @ ckeys.T + cbeta
    lse_full, lse_c = torch.logsumexp(s_full, -1), torch.logsumexp(s_c, -1)
    out_full = torch.softmax(s_full, -1) @ values
    out_c = torch.softmax(s_c, -1) @ cvalues
    out_err = float((out_c - out_full).norm() / out_full.norm())
    mass_err = float((torch.exp(lse_c - lse_full) - 1).abs().mean())
    return out_err, mass_err


def full_cache_bytes(n_layers: int, n_kv_heads: int, T: int, head_dim: int, item_bytes: int = 2) -> int:
    """Bytes of the uncompressed 16-bit K and V cache of a T-token prefix."""
    return 2 * n_layers * n_kv_heads * T * head_dim * item_bytes
