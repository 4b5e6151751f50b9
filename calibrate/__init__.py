"""Calibration pipeline (per-model codebooks, bit allocation, head budgets): not built yet; see README."""
