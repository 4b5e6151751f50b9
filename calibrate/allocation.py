"""Bit allocation between storage units (layer x phase x keys/values), two policies and a control.

- `taqg_bits`: TAQG's published rule (Think-Answer Quantization Gap): with ρ_H > ρ_L the redundancy of the more and
  the less redundant phase, the more redundant one gets b_H = b_L − ⌊log2((1 − ρ_L)/(1 − ρ_H) + 1)⌋ bits (at least
  1), and b_H = b_L when ρ_H <= ρ_L. Note the rule always gives at least one bit less once ρ_H > ρ_L (the ratio is
  then > 1, so the log is >= 1): compared with uniform b_L it spends fewer bits, which is why policies are compared
  here at equal average bits.
- `greedy_allocation`: measured policy. Each unit u holds n_u coordinates and has a measured cost c_u(b) at every
  allowed bit width (predicted continuation KL when u alone is quantized at b bits); choose b_u to minimise
  Σ c_u(b_u) subject to Σ n_u b_u <= B Σ n_u. Marginal-analysis greedy on each unit's lower convex hull of
  (bits, cost): start every unit at the fewest bits, repeatedly take the step with the largest cost decrease per
  added bit·coordinate that still fits. Exact (for the bits it uses) with convex costs and one-bit steps; with a
  wider step (6 -> 8 bits) it can miss a better knapsack packing by part of one step.
- `random_control`: the same bit widths as an allocation, given to random token subsets of the same sizes (within
  each layer and tensor), to tell a phase-aware allocation from one that merely mixes bit widths.
"""
from __future__ import annotations

import math

import numpy as np


def taqg_bits(rho_high: float, rho_low: float, b_low: int = 4) -> int:
    """b_H from TAQG's rule (module docstring). rho_high/rho_low: redundancy of the two phases (any order)."""
    if rho_high <= rho_low:
        return int(b_low)
    gap = math.floor(math.log2((1 - rho_low) / (1 - rho_high) + 1))
    return max(int(b_low) - gap, 1)


def _hull(bits: np.ndarray, cost: np.ndarray) -> list[int]:
    """Indices (ascending bits) of the lower convex hull of the points (bits, cost) from the fewest bits on, keeping
    only points that lower the cost (more bits for no gain are never worth taking)."""
    hull: list[int] = []
    for i in np.argsort(bits, kind="stable"):
        if hull and cost[i] >= cost[hull[-1]]:
            continue
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b stays only if the cost falls faster per bit from a to b than from a to i
            if (cost[a] - cost[b]) * (bits[i] - bits[a]) <= (cost[a] - cost[i]) * (bits[b] - bits[a]):
                hull.pop()
            else:
                break
        hull.append(int(i))
    return hull


def greedy_allocation(cost: np.ndarray, options: list[int], counts: np.ndarray, avg_bits: float) -> np.ndarray:
    """cost (U, B) for the bit widths `options` (B ascending), counts (U,) coordinates per unit -> bits (U,) with
    Σ counts·bits <= avg_bits·Σ counts (module docstring). Raises ValueError when even the fewest bits do not fit."""
    options = np.asarray(options, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.float64)
    U = cost.shape[0]
    budget = avg_bits * counts.sum()
    hulls = [_hull(options, cost[u]) for u in range(U)]
    pos = np.zeros(U, dtype=np.int64)  # position on each hull
    bits = np.array([options[h[0]] for h in hulls], dtype=np.int64)
    used = float((counts * bits).sum())
    if used > budget + 1e-9:
        raise ValueError(f"{avg_bits} average bits is below the fewest allowed ({options.min()})")
    while True:
        best, best_gain = -1, 0.0
        for u in range(U):
            h = hulls[u]
            if pos[u] + 1 >= len(h) or counts[u] == 0:
                continue
            a, b = h[pos[u]], h[pos[u] + 1]
            extra = counts[u] * (options[b] - options[a])
            if used + extra > budget + 1e-9:
                continue
            gain = (cost[u, a] - cost[u, b]) / extra
            if gain > best_gain:
                best, best_gain = u, gain
        if best < 0:
            return bits
        a, b = hulls[best][pos[best]], hulls[best][pos[best] + 1]
        used += counts[best] * (options[b] - options[a])
        pos[best] += 1
        bits[best] = options[b]


def average_bits(bits: np.ndarray, counts: np.ndarray) -> float:
    """Coordinate-weighted mean bit width."""
    counts = np.asarray(counts, dtype=np.float64)
    return float((np.asarray(bits) * counts).sum() / counts.sum())


def random_control(token_bits: np.ndarray, seed: int) -> np.ndarray:
    """token_bits (..., T) bit width of each token (per layer/tensor rows) -> the same widths, each row's
    permuted at random (numpy Generator(seed)): the same number of tokens at each width, on random tokens."""
    rng = np.random.default_rng(seed)
    flat = np.asarray(token_bits).reshape(-1, np.asarray(token_bits).shape[-1]).copy()
    for row in flat:
        rng.shuffle(row)
    return flat.reshape(np.asarray(token_bits).shape)
