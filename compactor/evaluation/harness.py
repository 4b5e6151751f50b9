"""Evaluation harness: one prefill of x[:T], references with the full cache, then any number of compactions."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..storage.kv_codec import RAW, parse_kv_bits, store_and_load
from ..layer_kv import LayerKV
from ..serving.attention import using_compactor_attention
from ..methods import Method
from .metrics import (RECALL_CUE, continuation_logits, full_cache_bytes, head_fidelity, kl_per_token, retention,
                      span_ce)
from ..pipeline import compact_capture
from ..capture.prefill import Capture, QueryRecorder
from ..serving.loader import cache_from_layers, served_bytes


@dataclass
class EvalRow:
    method: str
    ratio: float
    kv: str               # storage of keys/values, e.g. K16V16 (bf16), K4V3 (lloyd bits), Kq4_0Vq4_0
    ckl: float            # nats/token
    retention: float
    ce: float             # recall CE with this cache (nats/token)
    out_err: float        # attention fidelity: mean over (layer, head) of the relative L2 output error
    mass_err: float       # mean relative attention-mass error
    stored_bytes: int     # artifact payload: codes, gains, means, scales, beta, positions, lengths, codebooks
    memory_bytes: int     # served dequantized (keep_quantized=False): padded 16-bit keys/values + float32 beta
    full_bytes: int       # the full 16-bit K/V cache of the same prefix
    seconds: float        # compaction time (prefill and key scoring excluded)
    held_bytes: int = 0   # served as stored (keep_quantized=True; per-phase layers: dequantized); 0: not measured

    def as_dict(self) -> dict:
        return asdict(self)


def full_dynamic_cache(capture: Capture, model):
    """A fresh transformers DynamicCache holding the uncompressed prefix."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(zip(capture.keys, capture.values)):
        cache.update(k[None], v[None], i)
    return cache


class Evaluator:
    """Full-cache references for x[:T] (compressed) and x[T:T+C] (continuation) of one document."""

    def __init__(self, model, tokenizer, capture: Capture, ids: torch.Tensor, C: int = 256, n_spans: int = 4,
                 span_len: int = 64):
        self.model, self.capture = model, capture
        ids = ids.cpu()  # joined with tokenizer outputs (CPU); what is fed goes to the model's device then
        T = self.T = capture.length
        if ids.numel() < T + C:
            raise ValueError(f"evaluation needs T+C={T + C} tokens, the document has {ids.numel()}")
        if T < span_len + 1:
            raise ValueError(f"evaluation needs a prefix longer than the {span_len}-token recall span (T={T})")
        self.cont = ids[T:T + C]
        cfg = model.config
        n_layers, n_kv = cfg.num_hidden_layers, cfg.num_key_value_heads
        recorder = QueryRecorder(n_layers, n_kv)
        recorder.rows = torch.arange(C)
        with torch.no_grad(), using_compactor_attention(model):
            self.full_logits = continuation_logits(model, full_dynamic_cache(capture, model), self.cont, T,
                                                   compactor_recorder=recorder)
        self.heldout = [recorder.pooled(i) for i in range(n_layers)]
        cue = tokenizer(RECALL_CUE, add_special_tokens=False, return_tensors="pt").input_ids[0]
        starts = [int((T - span_len) * (k + 0.5) / n_spans) for k in range(n_spans)]
        self.recall = [torch.cat([cue, ids[s:s + span_len]]) for s in starts]
        self.span_start = cue.numel()
        self.ce_full = self._recall_ce(lambda: full_dynamic_cache(capture, model))
        self.ce_none = self._recall_ce(lambda: None, start=0)
        self.full_bytes = full_cache_bytes(n_layers, n_kv, T, capture.keys[0].shape[-1])

    def _recall_ce(self, make_cache, start: int | None = None) -> float:
        start = self.T if start is None else start
        ces = [span_ce(continuation_logits(self.model, make_cache(), ids, start), ids, self.span_start)
               for ids in self.recall]
        return sum(ces) / len(ces)

    def score(self, layers: list[LayerKV], method: str, ratio: float, seconds: float,
              codecs: list | None = None, stored_dtype: str = "bfloat16", seed: int = 0,
              codebooks: dict | None = None) -> EvalRow:
        """Metrics of the cache as it is served: each layer goes through its codec's store-and-load first (a
        KVCodec or PhasedCodec; custom codebooks they name come from `codebooks` and count in the bytes)."""
        codecs = codecs or [RAW] * len(layers)
        books: dict = dict(codebooks or {})
        trips = [store_and_load(layer, codec, stored_dtype, seed, books) for layer, codec in zip(layers, codecs)]
        layers = [t[0] for t in trips]
        stored_bytes = sum(a.nbytes for t in trips for a in t[1].values()) + sum(b.nbytes for b in books.values())
        memory_bytes, held_bytes = served_bytes([t[1:] for t in trips], layers, books, layers[0].keys.shape[-1],
                                                self.T)
        cache = cache_from_layers(layers, self.T, self.model)
        logits = continuation_logits(self.model, cache.fork(), self.cont, self.T)
        ckl = float(kl_per_token(self.full_logits, logits).mean())
        ce_c = self._recall_ce(cache.fork)
        out_errs, mass_errs = [], []
        for l, layer in enumerate(layers):
            for h in range(layer.keys.shape[0]):
                n = int(layer.lengths[h])
                o, m = head_fidelity(self.heldout[l][h], self.capture.keys[l][h], self.capture.values[l][h],
                                     layer.keys[h, :n], layer.beta[h, :n], layer.values[h, :n], self.capture.scale)
                out_errs.append(o)
                mass_errs.append(m)
        label = ",".join(sorted({c.label for c in codecs}))
        return EvalRow(method, ratio, label, ckl, retention(self.ce_none, self.ce_full, ce_c), ce_c,
                       sum(out_errs) / len(out_errs), sum(mass_errs) / len(mass_errs), stored_bytes,
                       memory_bytes, self.full_bytes, seconds, held_bytes)

    def run(self, methods: list[Method], ratios: list[float], budget: str = "layer", budget_floor: float = 0.75,
            progress: bool = True, kv_bits: list[str] = ("16",), stored_dtype: str = "bfloat16",
            seed: int = 0, on_policy: int = 0, split_share: float = 0.5) -> list[EvalRow]:
        """Every method x ratio x storage; ratio 1 means no compaction (quantization only). on_policy > 1: AM
        refits in that many layer groups on recaptured queries (capture/on_policy.py)."""
        from ..capture.on_policy import OnPolicyQueries

        rows = []
        jobs = [(m, r, k) for m in methods for r in ratios for k in kv_bits]
        L = len(self.capture.keys)
        for method, ratio, bits in tqdm(jobs, desc="evaluate", unit="run", disable=not progress):
            codecs = [parse_kv_bits(bits)] * L
            t0 = time.perf_counter()
            op = OnPolicyQueries(self.model, self.capture, on_policy) if on_policy > 1 and method.name == "am" \
                else None
            layers, _ = compact_capture(self.capture, method, ratio, budget, budget_floor, progress=False,
                                        codecs=codecs, stored_dtype=stored_dtype, seed=seed, on_policy=op,
                                        split_share=split_share)
            rows.append(self.score(layers, method.name, ratio, time.perf_counter() - t0, codecs, stored_dtype, seed))
        return rows


def format_table(rows: list[EvalRow]) -> str:
    """Markdown table of evaluation rows."""
    head = ("| method | ratio | K/V | cKL (nats/tok) | retention | out err | mass err | stored bytes | vs full "
            "| held dequantized | vs full | held as stored | vs full | compact s |\n"
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        held = (f"{r.held_bytes:,} | {r.full_bytes / r.held_bytes:.1f}x" if r.held_bytes else "- | -")
        lines.append(f"| {r.method} | {r.ratio:g} | {r.kv} | {r.ckl:.4f} | {r.retention:.3f} | {r.out_err:.3f} | "
                     f"{r.mass_err:.3f} | {r.stored_bytes:,} | {r.full_bytes / r.stored_bytes:.1f}x | "
                     f"{r.memory_bytes:,} | {r.full_bytes / max(1, r.memory_bytes):.1f}x | {held} | "
                     f"{r.seconds:.1f} |")
    return "\n".join(lines)
