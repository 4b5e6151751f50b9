"""Triton kernels, each beside its plain-torch reference (installed as compactor.kernels)."""
from .attention_stats import (AttentionStats, attention_stats, attention_stats_torch,  # noqa: F401
                              attention_stats_triton)
