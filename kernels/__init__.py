"""Triton kernels, each beside its plain-torch reference (installed as compactor.kernels)."""
from .attention_stats import (AttentionStats, attention_stats, attention_stats_torch,  # noqa: F401
                              attention_stats_triton)
from .fit_products import mass_shares, shares_matmul, shares_t_matmul  # noqa: F401
