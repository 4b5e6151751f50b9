"""Which rank compresses which document: greedy longest-processing-time (LPT) assignment on document costs.

Documents are taken longest first (ties by listing order) and each goes to the rank with the least total cost so
far (ties to the lowest rank). LPT's makespan is at most 4/3 - 1/(3N) of the optimum (Graham 1969), and it starts
the longest documents first, so no rank is left with one long document at the end. The assignment is a pure
function of the costs and the world size: every rank computes it from the same listing and gets the same answer,
with no communication.

The cost is the document's UTF-8 byte length, not its token count: the sizes are known from the listing (a stat per
file) while counting tokens means reading and tokenizing every document, on every rank, before any work starts.
Measured (benchmarks/results_corpus.md, 300 pieces of the bundled plays, 12 MB): listing 4-12 ms, tokenizing
with SmolLM2's tokenizer 12-38 s (0.3-1.0 MB/s on the shared 2-core machine, by its load: 17-52 min per rank for
1 GB); bytes per token 3.12 +- 0.14, so the largest rank share in tokens of the assignment on bytes is within
0.3% (2 ranks) to 3% (64 ranks) of the one on exact token counts.
With --max-tokens the cost is capped at max_tokens x the corpus's bytes per token, estimated on a fixed sample
(runner.py `cost_caps`), so that a huge document cut to N tokens does not count as huge.
"""
from __future__ import annotations

import heapq


def lpt_assign(costs: list[int], world: int) -> list[int]:
    """The rank (0..world-1) of each document: longest first, each to the least loaded rank (lowest on ties)."""
    if world < 1:
        raise ValueError("world size must be >= 1")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    loads = [(0, r) for r in range(world)]  # a heap of (total cost, rank)
    rank_of = [0] * len(costs)
    for i in order:
        load, r = heapq.heappop(loads)
        rank_of[i] = r
        heapq.heappush(loads, (load + costs[i], r))
    return rank_of


def shares(costs: list[int], rank_of: list[int], world: int) -> list[int]:
    """Total cost per rank."""
    out = [0] * world
    for c, r in zip(costs, rank_of):
        out[r] += c
    return out
