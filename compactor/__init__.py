"""compactor: offline KV-cache compaction (Attention Matching) into versioned .h5 artifacts.

`compactor.load_cache(path, model)` returns a transformers Cache holding a compacted document prefix.
"""
__version__ = "0.1.0"


def load_cache(path, model, tokenizer=None, verify: bool = True):
    """Load an .h5 artifact as a transformers Cache for `model` (see compactor.serving.loader.load_cache)."""
    from .serving.loader import load_cache as _load

    return _load(path, model, tokenizer, verify)
