"""K-norm (Devoto et al., arXiv 2406.11430): keep the keys of smallest L2 norm (they draw the most attention)."""
from __future__ import annotations

from ..fitting.key_selection import top_keys
from .base import Compacted, Method, keep_all, take


class KNorm(Method):
    name = "knorm"

    def compact(self, keys, values, queries, budget, **context) -> Compacted:
        if budget >= keys.shape[0]:
            return keep_all(keys, values)
        return take(keys, values, top_keys(-keys.float().norm(dim=-1), budget))
