"""Fitting: key scores and selection, per-head budgets, beta by NNLS, values by least squares."""
