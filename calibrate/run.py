"""`make calibrate MODEL=...` / `compactor calibrate`: once per model, measure what compression should do for it
and write artifacts/calibration/<model>.h5 plus a report.

Stages (each cached under a digest of its inputs, stages.py, so a rerun resumes):
  traces      reasoning traces with phases: generated (forced `<think>`, `</think>` after N tokens or the model's
              own, an answer) or given; boundaries from markers, with a fallback fraction; method counts
  rho         ρ per (layer, KV head) per phase and for plain documents, keys and values, raw and on length-matched
              windows (redundancy.py)
  codebooks   empirical Lloyd-Max codebooks per layer (and per phase where they pay) of the rotated K and V
              coordinates; held-out MSE of fitted, Beta and Gaussian codebooks at each bit width (codebooks.py)
  costs       attention error of every (layer, phase, tensor, bits) unit on held-out queries (distortion.py)
  weights     per (layer, tensor): continuation KL through the model / attention error, at ref_bits
  allocation  measured per-layer (documents) and per-layer-per-phase (traces) bits at each average (allocation.py)
  policies    held-out traces: TAQG vs measured allocation vs their random-token controls at equal average bits,
              and uniform bits (cKL, attention KL)
  heads       per-head sensitivity -> per-head multipliers of the key scores (head_budgets.py)
  check       held-out document, AM at check_ratio with check_bits: which calibrated parts lower cKL (the defaults
              `compress` applies)
Documents: `docs` calibration documents and one held-out, the first doc_tokens tokens as prefix and continuation
tokens after it. Traces: the last `heldout_traces` are held out.
"""
from __future__ import annotations

import datetime
import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..capture.documents import Document
from ..capture.phases import FALLBACK_FRACTION, MARKERS, PHASE_NAMES
from ..capture.prefill import QueryRecorder, prefill_and_capture
from ..errors import CompactorError
from ..evaluation.harness import Evaluator, full_dynamic_cache
from ..evaluation.metrics import continuation_logits, kl_per_token
from ..fitting.presets import preset
from ..methods import make_method, method_from_options
from ..models import LoadedModel, config_fingerprint, tokenizer_fingerprint, weights_identity
from ..pipeline import compact_capture, probe_for
from ..serving.attention import using_compactor_attention
from ..storage.calibrated_plan import calibrated_plan
from ..storage.calibration_file import CODEBOOK_KINDS, Calibration, default_path, write_calibration
from ..storage.kv_codec import parse_kv_bits
from . import allocation, codebooks, distortion, redundancy, report, traces
from .corpus import load_corpus, load_traces
from .head_budgets import head_weights
from .stages import StageCache

TENSORS = ("keys", "values")
_EVERY_PART = {"codebooks": True, "layer_bits": True, "phase_bits": True, "head_budgets": True}  # the draft's defaults


@dataclass
class Settings:
    docs: int = 3                 # calibration documents (plus one held out)
    doc_tokens: int = 1024        # prefix tokens of each document
    continuation: int = 64        # held-out continuation tokens after each prefix
    traces: int = 4               # reasoning traces (generated unless given; one batch of 4 costs about one)
    heldout_traces: int = 2
    passage_tokens: int = 128     # the passage each trace's question is about
    think_tokens: int = 128       # a forced </think> after this many thinking tokens
    answer_tokens: int = 96
    min_answer_tokens: int = 64
    trace_continuation: int = 32  # the last tokens of each trace are its held-out continuation
    window: int = 32              # length-matched ρ: tokens per window
    codebook_bits: tuple = (2, 3, 4, 5)
    phase_gain: float = 0.05      # a per-phase codebook is used when it lowers held-out MSE by this share
    phase_codebook_bits: int = 4  # per-phase codebooks up to this width (wider ones need more trace data)
    bit_options: tuple = (2, 3, 4, 5, 6, 8)
    avg_bits: tuple = (2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0)
    ref_bits: int = 3             # bit width at which layer weights are measured
    cost_docs: int = 2            # documents whose unit costs are measured
    weight_docs: int = 1          # documents whose layer weights are measured (2 model passes per layer)
    taqg_b_low: int = 4
    head_ratio: float = 10.0
    head_shrink: float = 0.5
    head_continuation: int = 32   # continuation tokens of the per-head sensitivity scores
    head_powers: tuple = (1.0, 0.5, 0.25)  # the check tries the head weights raised to each (tempered)
    check_ratio: float = 10.0
    check_bits: str = "K4V4"
    max_queries: int = 2048       # reference queries per KV head for the compaction stages
    markers: tuple = MARKERS
    fallback_fraction: float = FALLBACK_FRACTION
    seed: int = 0

    def as_json(self) -> dict:
        d = asdict(self)
        d["markers"] = [list(m) for m in self.markers]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass
class Sample:
    """One calibration text: its prefix keys/values, its continuation's queries and full-cache logits."""

    name: str
    ids: torch.Tensor                 # (T + C,)
    T: int
    phase: torch.Tensor               # (T,) phase index of each prefix token (0 for a document)
    keys: list = field(default_factory=list)      # L x (H, T, d) float32
    values: list = field(default_factory=list)
    queries: list = field(default_factory=list)   # L x (H, m, d) held-out queries
    logits: torch.Tensor | None = None            # (C, V) float32 full-cache continuation logits
    scale: float = 1.0


def _log(msg: str) -> None:
    tqdm.write(msg)


@torch.no_grad()
def capture_sample(lm: LoadedModel, name: str, ids: torch.Tensor, T: int, phase: torch.Tensor, chunk: int = 512
                   ) -> Sample:
    model = lm.model
    cap = prefill_and_capture(model, lm.tokenizer, ids[:T], chunk_size=chunk, max_queries=1, repeat_fraction=0.0,
                              progress=False)
    cfg = model.config
    rec = QueryRecorder(cfg.num_hidden_layers, cfg.num_key_value_heads)
    rec.rows = torch.arange(ids.numel() - T)
    with using_compactor_attention(model):
        logits = continuation_logits(model, full_dynamic_cache(cap, model), ids[T:], T, compactor_recorder=rec)
    return Sample(name, ids, T, phase, [k.float().cpu() for k in cap.keys], [v.float().cpu() for v in cap.values],
                  [rec.pooled(i).float().cpu() for i in range(cfg.num_hidden_layers)], logits.cpu(), cap.scale)


@torch.no_grad()
def sample_ckl(lm: LoadedModel, s: Sample, keys: list, values: list) -> float:
    """Continuation KL (nats/token) of the sample with these (quantized) keys/values in place of its cache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=lm.model.config)
    dtype = next(lm.model.parameters()).dtype
    dev = lm.device
    for i, (k, v) in enumerate(zip(keys, values)):
        cache.update(k[None].to(dev, dtype), v[None].to(dev, dtype), i)
    logits = continuation_logits(lm.model, cache, s.ids[s.T:], s.T)
    return float(kl_per_token(s.logits.to(logits.device), logits).mean())


def _pick_docs(corpus: list[Document], n: int, lm: LoadedModel, tokens: int, seed: int) -> list[tuple]:
    """n + 1 documents with at least `tokens` tokens, in a seeded order: [(name, ids)]."""
    order = torch.randperm(len(corpus), generator=torch.Generator().manual_seed(seed)).tolist()
    out = []
    for i in order:
        ids = lm.tokenizer(corpus[i].text, return_tensors="pt").input_ids[0]
        if ids.numel() >= tokens:
            out.append((corpus[i].name, ids[:tokens]))
        if len(out) == n + 1:
            return out
    raise CompactorError(f"the corpus has {len(out)} documents of at least {tokens} tokens; calibration needs "
                         f"{n + 1} (lower --doc-tokens or add documents)")


class Calibrator:
    def __init__(self, lm: LoadedModel, settings: Settings, corpus: list[Document], given: list[Document] | None,
                 cache_dir: Path, progress: bool = True):
        self.lm, self.s, self.corpus, self.given, self.progress = lm, settings, corpus, given, progress
        cfg = lm.model.config
        self.L, self.H = int(cfg.num_hidden_layers), int(cfg.num_key_value_heads)
        self.d = int(lm.model.model.layers[0].self_attn.head_dim)
        self.P = len(PHASE_NAMES)
        ident = weights_identity(lm.model)
        self.identity = ident
        self.model_key = hashlib.sha256((config_fingerprint(cfg) + ident["sha256"]["float32"]
                                         + tokenizer_fingerprint(lm.tokenizer)).encode()).hexdigest()
        self.stages = StageCache(cache_dir, _log)
        self.corpus_digest = hashlib.sha256("".join(d.sha256 for d in corpus).encode()).hexdigest()
        self._docs = self._traces = self._picked = None
        self.timings: dict[str, float] = {}

    # ---- inputs ----------------------------------------------------------------------------------------------------
    def picked(self) -> list[tuple]:
        """[(name, ids)] of the calibration documents, the held-out one last."""
        if self._picked is None:
            s = self.s
            self._picked = _pick_docs(self.corpus, s.docs, self.lm, s.doc_tokens + s.continuation, s.seed)
        return self._picked

    def docs(self) -> list[Sample]:
        """Captured documents; the last one is held out."""
        if self._docs is None:
            s = self.s
            picked = self.picked()
            self._docs = [capture_sample(self.lm, name, ids, s.doc_tokens, torch.zeros(s.doc_tokens, dtype=torch.long))
                          for name, ids in tqdm(picked, desc="capture documents", unit="doc",
                                                disable=not self.progress)]
        return self._docs

    def trace_samples(self, tr: dict) -> list[Sample]:
        if self._traces is None:
            out = []
            for text, bounds in tqdm(list(zip(tr["texts"], tr["bounds"])), desc="capture traces", unit="trace",
                                     disable=not self.progress):
                ids = self.lm.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
                T = ids.numel() - self.s.trace_continuation
                ph = torch.zeros(T, dtype=torch.long)
                for p in range(self.P):
                    ph[min(bounds[p], T):min(bounds[p + 1], T)] = p
                out.append(capture_sample(self.lm, f"trace-{len(out)}", ids, T, ph))
            self._traces = out
        return self._traces

    # ---- stages ----------------------------------------------------------------------------------------------------
    # the settings each stage reads (beyond what its upstream stages digest)
    DOCS = ("docs", "doc_tokens", "continuation", "seed")
    STAGE_SETTINGS = {
        "traces": ("traces", "passage_tokens", "think_tokens", "answer_tokens", "min_answer_tokens", "markers",
                   "fallback_fraction", "trace_continuation", "heldout_traces", "seed"),
        "rho": DOCS + ("window", "trace_continuation"),
        "codebooks": DOCS + ("codebook_bits", "phase_gain", "phase_codebook_bits", "heldout_traces",
                             "trace_continuation"),
        "costs": DOCS + ("bit_options", "cost_docs", "heldout_traces", "trace_continuation"),
        "weights": DOCS + ("ref_bits", "weight_docs"),
        "allocation": ("avg_bits", "bit_options"),
        "policies": ("taqg_b_low", "heldout_traces", "trace_continuation", "seed"),
        "heads": DOCS + ("head_ratio", "head_shrink", "head_continuation", "max_queries"),
        "check": DOCS + ("check_ratio", "check_bits", "max_queries", "head_powers"),
    }

    def run(self) -> tuple[dict, dict]:
        tr = self._stage("traces", [], self.stage_traces)
        rho = self._stage("rho", ["traces"], lambda: self.stage_rho(tr))
        books = self._stage("codebooks", ["traces"], lambda: self.stage_codebooks(tr))
        book_of = self.book_lookup(books)
        costs = self._stage("costs", ["traces", "codebooks"], lambda: self.stage_costs(tr, book_of))
        weights = self._stage("weights", ["codebooks"], lambda: self.stage_weights(book_of))
        alloc = self._stage("allocation", ["costs", "weights"], lambda: self.stage_allocation(costs, weights))
        pol = self._stage("policies", ["traces", "rho", "costs", "weights", "codebooks"],
                          lambda: self.stage_policies(tr, rho, costs, weights, book_of))
        heads = self._stage("heads", [], self.stage_heads)
        draft = self.calibration(tr, rho, books, alloc, heads, pol, check=None)
        check = self._stage("check", ["codebooks", "allocation", "heads", "policies"],
                            lambda: self.stage_check(draft, pol), version=2)
        return {"traces": tr, "rho": rho, "codebooks": books, "costs": costs, "weights": weights,
                "allocation": alloc, "policies": pol, "heads": heads, "check": check}, draft.meta

    def _stage(self, name, upstream, fn, version: int = 1):
        settings = self.s.as_json()
        params = {"model": self.model_key, "corpus": self.corpus_digest,
                  "settings": {k: settings[k] for k in self.STAGE_SETTINGS[name]}}
        if name == "traces":
            params["given"] = None if self.given is None else [d.sha256 for d in self.given]
        t0 = time.perf_counter()
        out = self.stages.run(name, version, params, upstream, fn)
        self.timings[name] = round(time.perf_counter() - t0, 1)
        return out

    def stage_traces(self) -> dict:
        s = self.s
        if self.given is not None:
            found = traces.given_traces(self.lm.tokenizer, self.given, s.markers, s.fallback_fraction)
        else:
            found = traces.generate_traces(self.lm.model, self.lm.tokenizer, self.corpus, s.traces, s.think_tokens,
                                           s.answer_tokens, s.min_answer_tokens, s.passage_tokens,
                                           markers=s.markers,
                                           fallback_fraction=s.fallback_fraction, seed=s.seed,
                                           progress=self.progress)
        keep = [t for t in found if t.phases.bounds[-1] - s.trace_continuation > t.phases.bounds[-2]]
        if len(keep) <= s.heldout_traces:
            raise CompactorError(f"{len(keep)} usable traces (an answer longer than the {s.trace_continuation}-token "
                                 f"held-out continuation), calibration needs more than {s.heldout_traces}")
        return {"texts": [t.text for t in keep], "bounds": [list(t.phases.bounds) for t in keep],
                "methods": [list(t.phases.methods) for t in keep], "close": [t.close for t in keep],
                "boundary_counts": traces.boundary_counts(keep), "dropped": len(found) - len(keep)}

    def stage_rho(self, tr: dict) -> dict:
        """rho (2 tensors, 2 kinds raw/matched, S sources = document + phases, L, H)."""
        S = self.P + 1
        sums = np.zeros((2, 2, S, self.L, self.H))
        counts = np.zeros((2, 2, S, 1, 1))
        samples = [(0, x) for x in self.docs()[:-1]] + [(1, x) for x in self.trace_samples(tr)]
        for kind, smp in tqdm(samples, desc="rho", unit="text", disable=not self.progress):
            for ti, xs in enumerate((smp.keys, smp.values)):
                x = torch.stack(xs)  # (L, H, T, d)
                for p in range(1 if kind == 0 else self.P):
                    rows = (smp.phase == p).nonzero().flatten()
                    if rows.numel() < 2:
                        continue
                    src = 0 if kind == 0 else 1 + p
                    seg = x[:, :, rows]
                    sums[ti, 0, src] += redundancy.mean_pairwise_cosine(seg).numpy()
                    counts[ti, 0, src] += 1
                    w = redundancy.windowed_rho(seg, self.s.window)
                    if not bool(torch.isnan(w).any()):
                        sums[ti, 1, src] += w.numpy()
                        counts[ti, 1, src] += 1
        rho = sums / np.maximum(counts, 1)
        return {"rho": rho.astype(np.float32), "rho_counts": counts[..., 0, 0].astype(np.int64)}

    def _coords(self, samples: list[Sample], layer: int, tensor: int, phase: int | None = None) -> torch.Tensor:
        out = []
        for smp in samples:
            x = (smp.keys if tensor == 0 else smp.values)[layer]
            if phase is not None:
                x = x[:, smp.phase == phase]
            if x.shape[1] >= 2:
                out.append(codebooks.rotated_coordinates(x, self.s.seed))
        return torch.cat(out) if out else torch.zeros(0)

    def stage_codebooks(self, tr: dict) -> dict:
        s = self.s
        docs = self.docs()
        ts = self.trace_samples(tr)
        train_t, held_t = ts[:-s.heldout_traces], ts[-s.heldout_traces:]
        B = len(s.codebook_bits)
        out = {f"codebook_{t}_b{b}": np.zeros((self.L, 2 ** b), np.float32) for t in TENSORS
               for b in s.codebook_bits}
        out.update({f"phase_codebook_{t}_b{b}": np.zeros((self.P, self.L, 2 ** b), np.float32) for t in TENSORS
                    for b in s.codebook_bits})
        used = np.zeros((self.P, self.L, 2, B), np.uint8)
        mse = np.zeros((self.L, 2, B, len(CODEBOOK_KINDS)), np.float32)
        phase_mse = np.zeros((self.P, self.L, 2, B, 2), np.float32)  # (phase book, layer book) on held-out phases
        jobs = [(l, ti) for l in range(self.L) for ti in range(2)]
        cap = codebooks.MAX_FIT_SAMPLES
        for l, ti in tqdm(jobs, desc="codebooks", unit="tensor", disable=not self.progress):
            t = TENSORS[ti]
            fit = torch.cat([self._coords(docs[:-1], l, ti), self._coords(train_t, l, ti)])
            held = codebooks.subsample(self._coords(docs[-1:], l, ti), cap, s.seed + 1)
            phase_fit = [self._coords(train_t, l, ti, p) for p in range(self.P)]
            phase_held = [codebooks.subsample(self._coords(held_t, l, ti, p), cap, s.seed + 1) for p in range(self.P)]
            for bi, b in enumerate(s.codebook_bits):
                book = codebooks.fit_codebook(fit, b, self.d, s.seed)
                out[f"codebook_{t}_b{b}"][l] = book
                ana = codebooks.analytic_codebooks(b, self.d)
                mse[l, ti, bi] = [codebooks.codebook_mse(held, c) for c in (book, ana["beta"], ana["gaussian"])]
                for p, (pf, ph) in enumerate(zip(phase_fit, phase_held)):
                    out[f"phase_codebook_{t}_b{b}"][p, l] = book
                    if b > s.phase_codebook_bits or pf.numel() < 64 * 2 ** b or ph.numel() == 0:  # too little data
                        continue
                    pbook = codebooks.fit_codebook(pf, b, self.d, s.seed)
                    ours, theirs = codebooks.codebook_mse(ph, pbook), codebooks.codebook_mse(ph, book)
                    phase_mse[p, l, ti, bi] = (ours, theirs)
                    if ours < (1 - s.phase_gain) * theirs:
                        used[p, l, ti, bi] = 1
                        out[f"phase_codebook_{t}_b{b}"][p, l] = pbook
        return {**out, "phase_codebook_used": used, "codebook_mse": mse, "phase_mse": phase_mse}

    def book_lookup(self, books: dict):
        """(tensor, layer, bits) -> fitted centroids, for the bit widths that have them."""
        return {(t, l, b): books[f"codebook_{t}_b{b}"][l] for t in TENSORS for l in range(self.L)
                for b in self.s.codebook_bits}

    def stage_costs(self, tr: dict, book_of: dict) -> dict:
        s = self.s
        docs = self.docs()[:-1][: s.cost_docs]
        ts = self.trace_samples(tr)[:-s.heldout_traces]
        opts = list(s.bit_options)
        doc_err = np.zeros((len(docs), self.L, 1, 2, len(opts)))
        tr_err = np.zeros((len(ts), self.L, self.P, 2, len(opts)))
        jobs = [(0, i, l) for i in range(len(docs)) for l in range(self.L)] + \
               [(1, i, l) for i in range(len(ts)) for l in range(self.L)]
        for kind, i, l in tqdm(jobs, desc="unit costs", unit="layer", disable=not self.progress):
            smp = (docs if kind == 0 else ts)[i]
            err = distortion.unit_errors(smp.queries[l], smp.keys[l], smp.values[l], smp.scale, smp.phase,
                                         1 if kind == 0 else self.P, opts, book_of, l, s.seed)
            (doc_err if kind == 0 else tr_err)[i, l] = err
        tokens = np.array([[int((smp.phase == p).sum()) for p in range(self.P)] for smp in ts])
        return {"doc_err": doc_err, "trace_err": tr_err, "trace_tokens": tokens,
                "doc_tokens": np.array([smp.T for smp in docs])}

    def stage_weights(self, book_of: dict) -> dict:
        """w (L, 2): continuation KL per unit of attention error, each layer's K or V alone at ref_bits."""
        s = self.s
        docs = self.docs()[:-1][: s.weight_docs]
        w = np.zeros((len(docs), self.L, 2))
        kl = np.zeros((len(docs), self.L, 2))
        jobs = [(i, l, ti) for i in range(len(docs)) for l in range(self.L) for ti in range(2)]
        for i, l, ti in tqdm(jobs, desc="layer weights", unit="unit", disable=not self.progress):
            smp = docs[i]
            spec = distortion.lloyd(s.ref_bits, book_of.get((TENSORS[ti], l, s.ref_bits)))
            imp = distortion.head_importance(smp.queries[l], smp.keys[l], smp.scale)
            x = (smp.keys, smp.values)[ti][l]
            xq = distortion.quantize_groups(x, torch.ones(smp.T, dtype=torch.long), {1: spec}, imp, s.seed)
            keys, values = list(smp.keys), list(smp.values)
            (keys if ti == 0 else values)[l] = xq
            err, _ = distortion.attention_error(smp.queries[l], smp.keys[l], smp.values[l], keys[l], values[l],
                                                smp.scale)
            kl[i, l, ti] = sample_ckl(self.lm, smp, keys, values)
            w[i, l, ti] = max(kl[i, l, ti], 0.0) / max(err, 1e-30)
        return {"w": w.mean(0), "ref_kl": kl.mean(0)}

    def _unit_costs(self, costs: dict, weights: dict, phased: bool) -> tuple[np.ndarray, np.ndarray]:
        """(cost (L, P', 2, B) predicted continuation KL, counts (L, P', 2) tokens) for documents or traces."""
        w = weights["w"][:, None, :, None]
        if phased:
            cost = costs["trace_err"].mean(0) * w
            counts = np.broadcast_to(costs["trace_tokens"].sum(0)[None, :, None], (self.L, self.P, 2))
        else:
            cost = costs["doc_err"].mean(0) * w
            counts = np.full((self.L, 1, 2), costs["doc_tokens"].sum())
        return cost, np.ascontiguousarray(counts, dtype=np.float64)

    def allocate(self, costs: dict, weights: dict, avg: float, phased: bool) -> np.ndarray:
        cost, counts = self._unit_costs(costs, weights, phased)
        flat = allocation.greedy_allocation(cost.reshape(-1, cost.shape[-1]), list(self.s.bit_options),
                                            counts.reshape(-1), avg)
        return flat.reshape(counts.shape)  # (L, P', 2)

    def stage_allocation(self, costs: dict, weights: dict) -> dict:
        s = self.s
        doc = np.stack([self.allocate(costs, weights, a, False)[:, 0] for a in s.avg_bits])
        ph = np.stack([self.allocate(costs, weights, a, True) for a in s.avg_bits])
        return {"bits_document": doc.astype(np.uint8), "bits_phases": ph.astype(np.uint8)}

    def stage_policies(self, tr: dict, rho: dict, costs: dict, weights: dict, book_of: dict) -> dict:
        """Held-out traces: cKL and attention KL of each bit policy, and its average bits there."""
        s = self.s
        held = self.trace_samples(tr)[-s.heldout_traces:]
        r = rho["rho"][0, 0]  # keys, raw: (S, L, H); TAQG's inputs: mean over layers and heads per phase
        think, answer = PHASE_NAMES.index("think"), PHASE_NAMES.index("answer")
        rho_think, rho_answer = float(r[1 + think].mean()), float(r[1 + answer].mean())
        high = think if rho_think > rho_answer else answer
        b_high = allocation.taqg_bits(max(rho_think, rho_answer), min(rho_think, rho_answer), s.taqg_b_low)
        taqg = np.full((self.L, self.P, 2), s.taqg_b_low)
        taqg[:, high] = b_high
        _, counts = self._unit_costs(costs, weights, True)
        taqg_avg = allocation.average_bits(taqg, counts)
        policies = {
            f"uniform {s.taqg_b_low}": np.full((self.L, self.P, 2), s.taqg_b_low),
            f"uniform {s.taqg_b_low - 1}": np.full((self.L, self.P, 2), s.taqg_b_low - 1),
            "TAQG": taqg,
            "measured, per layer and phase": self.allocate(costs, weights, taqg_avg, True),
            "measured, per layer (no phases)": np.repeat(self.allocate(costs, weights, taqg_avg, False), self.P, 1),
        }
        rows = []
        for name, bits in tqdm(list(policies.items()), desc="policies", unit="policy", disable=not self.progress):
            for control in ((False, True) if name.startswith(("TAQG", "measured, per layer and")) else (False,)):
                ckl, akl, nb, nt = [], [], 0.0, 0
                for j, smp in enumerate(held):
                    token_bits = torch.from_numpy(bits[:, :, :]).long()[:, smp.phase]  # (L, T, 2)
                    token_bits = token_bits.permute(0, 2, 1).numpy()                 # (L, 2, T)
                    if control:
                        token_bits = allocation.random_control(token_bits, s.seed + j)
                    keys, values, kls = self._quantize_tokens(smp, bits, token_bits, control, book_of)
                    ckl.append(sample_ckl(self.lm, smp, keys, values))
                    akl.append(float(np.mean(kls)))
                    nb += float(token_bits.sum()) / (self.L * 2)
                    nt += smp.T
                label = f"{name}: random-token control" if control else name
                rows.append({"policy": label, "avg_bits": nb / nt, "ckl": float(np.mean(ckl)),
                             "attention_kl": float(np.mean(akl))})
        return {"rows": rows, "rho_think": rho_think, "rho_answer": rho_answer, "taqg_high": PHASE_NAMES[high],
                "taqg_b_high": b_high, "taqg_b_low": s.taqg_b_low, "taqg_avg_train": taqg_avg}

    def _quantize_tokens(self, smp: Sample, bits: np.ndarray, token_bits: np.ndarray, control: bool, book_of: dict):
        """Keys/values of a sample with each token at its bit width: phase units (a policy) or, for a random control,
        one unit per bit width (its tokens). Returns (keys, values, attention KL per layer)."""
        keys, values, kls = [], [], []
        for l in range(self.L):
            imp = distortion.head_importance(smp.queries[l], smp.keys[l], smp.scale)
            out = []
            for ti in range(2):
                x = (smp.keys, smp.values)[ti][l]
                if control:
                    groups = torch.from_numpy(token_bits[l, ti]).long()
                    specs = {int(b): distortion.lloyd(int(b), book_of.get((TENSORS[ti], l, int(b))))
                             for b in np.unique(token_bits[l, ti])}
                else:
                    groups = smp.phase
                    specs = {p: distortion.lloyd(int(bits[l, p, ti]), book_of.get((TENSORS[ti], l,
                                                                                    int(bits[l, p, ti]))))
                             for p in range(self.P)}
                out.append(distortion.quantize_groups(x, groups, specs, imp, self.s.seed))
            keys.append(out[0])
            values.append(out[1])
            kls.append(distortion.attention_error(smp.queries[l], smp.keys[l], smp.values[l], out[0], smp.values[l],
                                                  smp.scale)[1])
        return keys, values, kls

    def _compaction_capture(self, ids: torch.Tensor, C: int, n_spans: int, span_len: int, probe: str = "none",
                            sources=None):
        """Capture (with reference queries, as compress makes it: a preset's probe and query sources) and evaluator
        of a document."""
        s = self.s
        cap = prefill_and_capture(self.lm.model, self.lm.tokenizer, ids[: s.doc_tokens], max_queries=s.max_queries,
                                  seed=s.seed, progress=False, probe=probe, sources=sources)
        span = min(span_len, max(2, s.doc_tokens // 4))
        return Evaluator(self.lm.model, self.lm.tokenizer, cap, ids, C=min(C, ids.numel() - s.doc_tokens),
                         n_spans=n_spans, span_len=span)

    def stage_heads(self) -> dict:
        s = self.s
        picked = self.picked()
        # one score per head: a shorter continuation and two recall spans keep the 90 model passes of SmolLM2 cheap
        ev = self._compaction_capture(picked[0][1], s.head_continuation, 2, 32)
        method = make_method("am")
        w, d_ckl, d_ret = head_weights(ev, method, s.head_ratio, s.head_shrink, progress=self.progress)
        return {"head_weights": w.numpy().astype(np.float32), "head_d_ckl": d_ckl.numpy().astype(np.float32),
                "head_d_ret": d_ret.numpy().astype(np.float32)}

    def stage_check(self, draft: Calibration, pol: dict) -> dict:
        """Held-out document at check_ratio, once per preset: each calibrated part added in turn, kept when it
        lowers cKL. The fast preset (layer budgets; head budgets tried with layer and global budgets) gives
        `defaults`, the quality preset (split budgets, its probe and query sources) gives `defaults_split`; head
        budgets are tried with the weights raised to each of `head_powers`."""
        s = self.s
        ids = self.picked()[-1][1]
        base = [parse_kv_bits(s.check_bits)] * self.L
        rows, budgets, chosen_by = [], {}, {}
        by_name = {r["policy"]: r["ckl"] for r in pol["rows"]}
        phase_bits = bool(by_name["measured, per layer and phase"] < by_name["measured, per layer (no phases)"])
        for name in ("fast", "quality"):
            options = preset(name)["options"]
            method = method_from_options("am", s.seed, preset=name)
            ev = self._compaction_capture(ids, s.continuation, 4, 64, probe_for(method), options.get("sources"))
            own = options["budget"]

            def score(label, defaults):
                cal = Calibration({**draft.meta, "defaults": defaults, "defaults_split": defaults}, draft.arrays)
                plan = calibrated_plan(base, cal, None, (), self.d, own)
                budget = plan.budget or own
                layers, used = compact_capture(ev.capture, method, s.check_ratio, budget, options["budget_floor"],
                                               False, plan.codecs, "bfloat16", s.seed,
                                               score_weights=plan.score_weights, codebooks=plan.codebooks,
                                               split_share=options.get("split_share", 0.5))
                if defaults.get("head_power", 1.0) == 1:  # the heat maps show base and untempered head budgets
                    key = f"budgets_{name}_{'heads_' + budget if defaults['head_budgets'] else 'base_' + budget}"
                    budgets[key] = used.numpy().astype(np.int64)
                row = ev.score(layers, "am", s.check_ratio, 0.0, plan.codecs, "bfloat16", s.seed, plan.codebooks)
                rows.append({"config": f"{name}: {label}", "ckl": row.ckl, "retention": row.retention,
                             "stored_bytes": row.stored_bytes, "memory_bytes": row.memory_bytes})
                return row.ckl

            off = {"codebooks": False, "layer_bits": False, "phase_bits": False, "head_budgets": False,
                   "budget": own}
            best = score(f"uniform {s.check_bits}, Beta codebooks, {own} budgets", off)
            chosen = dict(off)
            for part, label in (("codebooks", "+ fitted codebooks"), ("layer_bits", "+ measured per-layer bits")):
                trial = {**chosen, part: True}
                c = score(label, trial)
                if c < best:
                    best, chosen = c, trial
            tries = {}
            for mode in (("layer", "global") if own != "split" else ("split",)):
                for power in s.head_powers:
                    trial = {**chosen, "head_budgets": True, "budget": mode, "head_power": float(power)}
                    tag = mode if power == 1 else f"{mode}, weights^{power:g}"
                    tries[mode, float(power)] = (score(f"+ head budgets ({tag})", trial), trial)
            ckl, trial = min(tries.values(), key=lambda t: t[0])
            if ckl < best:
                best, chosen = ckl, trial
            chosen_by[name] = {**chosen, "phase_bits": phase_bits}
        return {"rows": rows, "defaults": chosen_by["fast"], "defaults_split": chosen_by["quality"], **budgets}

    # ---- output ----------------------------------------------------------------------------------------------------
    def calibration(self, tr, rho, books, alloc, heads, pol, check: dict | None) -> Calibration:
        """The calibration file's content; `check` (the check stage's result) gives the defaults, None a draft with
        every part on."""
        s = self.s
        lm = self.lm
        meta = {
            "compactor_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model_id": lm.model_id, "model_type": lm.config.model_type,
            "model_config_sha256": config_fingerprint(lm.config), "model_weights": self.identity,
            "tokenizer_sha256": tokenizer_fingerprint(lm.tokenizer),
            "num_layers": self.L, "num_kv_heads": self.H, "head_dim": self.d,
            "phases": {"names": list(PHASE_NAMES), "markers": [list(m) for m in s.markers],
                       "fallback_fraction": float(s.fallback_fraction)},
            "codebooks": {"bits": list(s.codebook_bits), "phase_gain": float(s.phase_gain)},
            "allocation": {"avg_bits": [float(a) for a in s.avg_bits], "bit_options": list(s.bit_options)},
            "head_budgets": {"ratio": float(s.head_ratio), "shrink": float(s.head_shrink), "unit": "head"},
            "defaults": check["defaults"] if check else {**_EVERY_PART, "budget": "global"},
            "defaults_split": check["defaults_split"] if check else {**_EVERY_PART, "budget": "split"},
            "settings": s.as_json(),
            "summary": {},
        }
        arrays = {"rho": rho["rho"], "phase_codebook_used": books["phase_codebook_used"],
                  "codebook_mse": books["codebook_mse"], **alloc, **heads}
        arrays.update({k: v for k, v in books.items() if k.startswith(("codebook_", "phase_codebook_"))
                       and k != "phase_codebook_used"})
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        return Calibration({**meta, "digest_sha256": "", "path": "(draft)"}, arrays)


def calibrate(lm: LoadedModel, corpus: str | None = None, traces_path: str | None = None, out: str | None = None,
              report_dir: str | None = None, settings: Settings | None = None, progress: bool = True,
              cache_dir: str | None = None) -> tuple[Path, Path]:
    """Run every stage for `lm` and write the calibration file and its report. Returns (file, report.md)."""
    s = settings or Settings()
    t0 = time.perf_counter()
    out_path = Path(out) if out else default_path(lm.model_id)
    if out_path.is_dir():
        raise CompactorError(f"calibration output {out_path} is a directory; give a file name ending in .h5")
    docs = load_corpus(corpus)
    given = load_traces(traces_path) if traces_path else None
    cache = Path(cache_dir) if cache_dir else out_path.parent / ".stages" / out_path.stem
    cal = Calibrator(lm, s, docs, given, cache, progress)
    results, _ = cal.run()
    check = results["check"]
    final = cal.calibration(results["traces"], results["rho"], results["codebooks"], results["allocation"],
                            results["heads"], results["policies"], check)
    meta = {k: v for k, v in final.meta.items() if k not in ("digest_sha256", "path")}
    seconds = round(time.perf_counter() - t0, 1)
    meta["summary"] = report.summary(results, cal.timings, seconds, cal.stages.resumed)
    meta["summary"]["documents"] = [name for name, _ in cal.picked()]
    path = write_calibration(out_path, meta, final.arrays)
    rdir = Path(report_dir) if report_dir else out_path.parent / f"{out_path.stem}_report"
    md = report.write_report(rdir, lm.model_id, results, final.arrays, meta, s)
    return path, md

