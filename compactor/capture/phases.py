"""Phases of a document (a reasoning trace: prompt, think, answer) from marker strings, as token boundaries.

`find_phases(text, tokenizer, markers, fallback_fraction)`: markers[i] lists the strings that end phase i (the
first occurrence after the previous boundary of any of them counts; the marker belongs to the phase it ends).
Boundary i is the first token that starts at or after the marker's end. A boundary whose marker is missing falls
back to a fixed rule: the first (prompt -> think) to the start of the text (no prompt phase), later ones to
`fallback_fraction` of the way from the previous boundary to the end. Which rule found each boundary is returned
("marker" or "fallback"), so calibration can report how often markers were really there.
Used by calibration (its traces) and by `compress` (a document with markers is stored with per-phase bits).
"""
from __future__ import annotations

from dataclasses import dataclass

PHASE_NAMES = ("prompt", "think", "answer")
MARKERS = (("<think>",), ("</think>",))
FALLBACK_FRACTION = 0.7


@dataclass(frozen=True)
class Phases:
    names: tuple[str, ...]
    bounds: tuple[int, ...]   # P+1 token positions, 0 .. T, non-decreasing
    methods: tuple[str, ...]  # per inner boundary: "marker" or "fallback"

    def clipped(self, T: int) -> "Phases":
        """The same phases over the first T tokens (bounds beyond T become T)."""
        return Phases(self.names, tuple(min(b, T) for b in self.bounds[:-1]) + (T,), self.methods)

    @property
    def by_markers(self) -> bool:
        return all(m == "marker" for m in self.methods)


def _token_at(offsets: list[tuple[int, int]], char: int) -> int:
    """Index of the first token whose text starts at or after `char` (special tokens with empty spans count as
    starting where they stand)."""
    for i, (start, end) in enumerate(offsets):
        if start >= char and (end > start or start > 0):
            return i
    return len(offsets)


def find_phases(text: str, tokenizer, markers=MARKERS, fallback_fraction: float = FALLBACK_FRACTION,
                names=PHASE_NAMES, add_special_tokens: bool = True) -> Phases:
    """Phases of `text` as tokenized by `tokenizer(text)` (module docstring). len(names) = len(markers) + 1."""
    if len(names) != len(markers) + 1:
        raise ValueError("need one phase name more than marker lists")
    if not 0 < fallback_fraction < 1:
        raise ValueError("fallback_fraction must be in (0, 1)")
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    T = len(offsets)
    bounds, methods = [0], []
    char = 0
    for i, options in enumerate(markers):
        hits = [(text.find(m, char), m) for m in options if m and text.find(m, char) >= 0]
        if hits:
            at, m = min(hits)
            char = at + len(m)
            b = max(_token_at(offsets, char), bounds[-1])
            methods.append("marker")
        else:
            prev = bounds[-1]
            b = prev if i == 0 else prev + round(fallback_fraction * (T - prev))
            methods.append("fallback")
        bounds.append(b)
    bounds.append(T)
    return Phases(tuple(names), tuple(bounds), tuple(methods))
