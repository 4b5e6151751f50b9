"""compactor: offline KV-cache compaction (Attention Matching) into versioned .h5 artifacts.

- `compactor.compress(document, model, tokenizer, ratio=10)` -> a CompactedCache (a transformers Cache) in memory;
  `cache.save("doc.h5")` writes the artifact `compactor compress` would;
- `compactor.load_cache(path, model)` -> the CompactedCache of an artifact;
- `compactor.ask(cache, questions, model, tokenizer)` and `compactor.answer(document, questions, model, tokenizer)`
  -> answers (greedy by default).
"""
__version__ = "0.1.0"


def compress(document, model, tokenizer, ratio: float = 10.0, **options):
    """Compress a document (text or token ids) into a CompactedCache for `model` (see
    compactor.pipeline.compress_to_cache for the options)."""
    from .pipeline import compress_to_cache

    return compress_to_cache(document, model, tokenizer, ratio, **options)


def load_cache(path, model, tokenizer=None, verify: bool = True):
    """Load an .h5 artifact as a transformers Cache for `model` (see compactor.serving.loader.load_cache)."""
    from .serving.loader import load_cache as _load

    return _load(path, model, tokenizer, verify)


def ask(cache, questions, model, tokenizer, **sampling):
    """Answers (list of str) to each question (str or list of str) after a compacted document (see
    compactor.serving.answer.ask)."""
    from .serving.answer import ask as _ask

    return _ask(cache, questions, model, tokenizer, **sampling)


def answer(document, questions, model, tokenizer, ratio: float = 10.0, *, max_new_tokens: int = 64,
           temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, **options):
    """Compress `document` as the opening of a chat turn, then answer each question from the compressed cache."""
    cache = compress(document, model, tokenizer, ratio, chat=True, **options)
    return ask(cache, questions, model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
               top_p=top_p, seed=seed)
