"""PyramidKV (arXiv 2406.02069): SnapKV's key ranking with pyramid layer budgets (fitting/budgets.pyramid_budgets):
the first layer keeps most, the last avg / beta, linearly in between, the same total as uniform budgets."""
from __future__ import annotations

from .snapkv import SnapKV


class PyramidKV(SnapKV):
    name = "pyramidkv"
    budget_mode = "pyramid"  # compact_capture takes this budget rule whatever the run's --budget

    def __init__(self, kernel: int = 5, beta: float = 20.0):
        super().__init__(kernel)
        if not beta >= 1:
            raise ValueError(f"pyramid beta must be >= 1, got {beta}")
        self.beta = float(beta)

    def params(self) -> dict:
        return {**super().params(), "beta": self.beta}
