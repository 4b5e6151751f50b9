"""How a calibration file shapes one compression: codecs per layer (and per phase), fitted codebooks, head weights.

Given the uniform plan (`--kv-bits`, `--hi-layers`) and a model's calibration (`make calibrate`), `calibrated_plan`
applies the parts the calibration's own held-out check found to help (its `defaults`):
- layer bits: with lloyd `--kv-bits K<a>V<b>`, the measured per-layer K/V bits at the same average (a+b)/2 replace
  the uniform plan (same code bytes; `--hi-layers` still override their layers);
- phase bits: a document whose phase markers are found (a saved reasoning trace) is stored per phase, with the
  measured per-layer, per-phase bits at that average (PhasedCodec);
- codebooks: every lloyd tensor whose bit width has a fitted codebook uses it (its layer's, or its phase's where
  that paid); the codebook travels in the artifact under its own id, so the file decodes without the calibration;
- head budgets: per-head multipliers of the key scores (from measured sensitivity, raised to the check's
  `head_power`: tempered weights shift less of the budget), and the budget mode to share
  the total with (`plan.budget`); compress uses that mode in place of a preset's "layer"/"global" unless the user
  chose one (pipeline.calibrated_budget_mode).
Which parts apply is the calibration's check, made once per preset: `defaults` for layer/global budgets (the fast
preset), `defaults_split` for split budgets (the quality preset, the default). A file without `defaults_split` (made
before the check covered the quality preset) applies its `defaults` under split budgets without the head budgets,
which were measured only under layer/global budgets (under split they raised cKL at 10x on held-out plays,
benchmarks/results_calibration.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..capture.phases import Phases
from .calibration_file import Calibration
from .kv_codec import KVCodec, PhasedCodec, TensorCodec


@dataclass
class Plan:
    codecs: list                                   # per layer: KVCodec or PhasedCodec
    codebooks: dict[str, np.ndarray] = field(default_factory=dict)  # custom codebook id -> centroids
    score_weights: torch.Tensor | None = None      # (L, H) or None
    budget: str | None = None                      # the calibration's budget mode, or None
    applied: list[str] = field(default_factory=list)  # which calibration parts were used
    notes: list[str] = field(default_factory=list)    # why a part was not used


def _lloyd_avg(codec: KVCodec) -> float | None:
    if codec.keys.name == "lloyd" and codec.values.name == "lloyd":
        return (codec.keys.bits + codec.values.bits) / 2
    return None


def _with_bits(codec: KVCodec, k_bits: int, v_bits: int) -> KVCodec:
    return KVCodec(TensorCodec("lloyd", int(k_bits), codec.keys.exact), TensorCodec("lloyd", int(v_bits),
                                                                                     codec.values.exact))


def calibrated_plan(base: list[KVCodec], cal: Calibration | None, phases: Phases | None = None,
                    hi_layers: tuple = (), head_dim: int = 64, budget: str | None = None) -> Plan:
    """The plan for one document (module docstring). base: the uniform plan, one KVCodec per layer; hi_layers: the
    layers the user pinned (left as they are); phases: the document's phases (used when found by markers);
    budget: the budget mode the compression uses ("split" leaves the head budgets out)."""
    plan = Plan(list(base))
    if cal is None:
        return plan
    L = len(base)
    pinned = {int(i) % L for i in hi_layers}
    de = cal.meta["defaults"]
    if budget == "split":
        de = cal.meta.get("defaults_split") or {**de, "head_budgets": False, "budget": "split"}
    avgs = {_lloyd_avg(c) for l, c in enumerate(base) if l not in pinned}
    avg = avgs.pop() if len(avgs) == 1 else None
    phased = phases is not None and phases.by_markers and len(phases.names) == len(cal.phase_names)
    if avg is not None and de["layer_bits"]:
        bits = cal.bits(avg)
        if bits is None:
            plan.notes.append(f"no measured allocation at {avg:g} average bits (have {cal.avg_bits}); uniform bits")
        else:
            plan.codecs = [c if l in pinned else _with_bits(c, *bits[l]) for l, c in enumerate(base)]
            plan.applied.append(f"layer bits (avg {avg:g})")
    if phased and avg is not None and de["phase_bits"]:
        bits = cal.bits(avg, phased=True)
        if bits is not None:  # every layer of a file is phased or none is: pinned layers keep one codec throughout
            P = len(phases.names)
            plan.codecs = [PhasedCodec(tuple(c if l in pinned else _with_bits(base[l], *bits[l, p]) for p in range(P)),
                                       phases.bounds, phases.names) for l, c in enumerate(plan.codecs)]
            plan.applied.append(f"phase bits (avg {avg:g})")
    if de["codebooks"]:
        plan.codecs = [_fitted(c, l, cal, plan.codebooks) for l, c in enumerate(plan.codecs)]
        if plan.codebooks:
            plan.applied.append("fitted codebooks")
    if de["head_budgets"]:
        power = float(de.get("head_power", 1.0))
        plan.score_weights = torch.from_numpy(np.asarray(cal.arrays["head_weights"], dtype=np.float32)) ** power
        plan.budget = de["budget"]
        plan.applied.append("head budgets" if power == 1 else f"head budgets (weights^{power:g})")
    return plan


def _fitted(codec, layer: int, cal: Calibration, books: dict) -> KVCodec | PhasedCodec:
    """The codec with every lloyd part that has a fitted codebook at its bit width pointing to it."""
    if isinstance(codec, PhasedCodec):
        return PhasedCodec(tuple(_fitted_unit(c, layer, cal, books, p) for p, c in enumerate(codec.codecs)),
                           codec.bounds, codec.names)
    return _fitted_unit(codec, layer, cal, books, None)


def _fitted_unit(codec: KVCodec, layer: int, cal: Calibration, books: dict, phase: int | None) -> KVCodec:
    parts = []
    for t, part in (("keys", codec.keys), ("values", codec.values)):
        book = cal.codebook(t, layer, part.bits, phase) if part.name == "lloyd" else None
        if book is None:
            parts.append(part)
            continue
        ident = f"{t[0]}{layer}b{part.bits}"  # e.g. k3b4: keys of layer 3 at 4 bits; k3p1b4: its phase 1 book
        if phase is not None and bool(cal.arrays["phase_codebook_used"][phase, layer, ("keys", "values").index(t),
                                                                       cal.codebook_bits.index(part.bits)]):
            ident = f"{t[0]}{layer}p{phase}b{part.bits}"
        books[ident] = np.asarray(book, dtype=np.float32)
        parts.append(TensorCodec("lloyd", part.bits, part.exact, ident))
    return KVCodec(*parts)
