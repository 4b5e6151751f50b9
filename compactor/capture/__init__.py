"""Capture: documents in, prefill of the model with keys, values and reference queries recorded."""
