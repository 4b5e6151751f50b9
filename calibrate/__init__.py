"""Calibration pipeline (installed as compactor.calibrate): once per model, measure per-phase redundancy ρ, fit
codebooks, allocate bits (TAQG and measured) and per-head budgets, and write artifacts/calibration/<model>.h5, which
`compactor compress` then uses. Entry points: `compactor calibrate` / `make calibrate MODEL=...`, `calibrate()`."""
from .run import Settings, calibrate

__all__ = ["Settings", "calibrate"]
