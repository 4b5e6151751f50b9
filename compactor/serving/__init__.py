"""Serving: the compacted transformers Cache, the beta-aware attention function, and loading artifacts."""
