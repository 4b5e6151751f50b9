"""Which rank compresses which document: greedy longest-processing-time (LPT) assignment on document costs.

Documents are taken longest first (ties by listing order) and each goes to the rank with the least total cost so
far (ties to the lowest rank). LPT's makespan is at most 4/3 - 1/(3N) of the optimum (Graham 1969), and it starts
the longest documents first, so no rank is left with one long document at the end. The assignment is a pure
function of the costs and the world size: every rank computes it from the same listing and gets the same answer,
with no communication.

The cost is the document's UTF-8 byte length, not its token count: the sizes are known from the listing (a stat per
file) while counting tokens means reading and tokenizing every document, on every rank, before any work starts
(measured in benchmarks/results_corpus.md: the SmolLM2 tokenizer reads ~1-2 MB/s per core here, so a 1 GB corpus
would cost each rank 10+ minutes; bytes per token vary little within one language, which is all LPT needs).
With --max-tokens the cost is capped at max_tokens x the corpus's bytes per token, estimated on a fixed sample
(`bytes_per_token`), so that a huge document cut to N tokens does not count as huge.
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
