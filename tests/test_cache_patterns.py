"""The compacted cache in every transformers generation pattern, for every supported family.

Each pattern runs once with a ratio-1 compacted cache from `compactor.compress` (float32 storage: every key kept,
beta = 0) holding the document, and once through plain transformers on the full token sequence (document +
prompt, its own DynamicCache): the greedy/beam tokens must be equal and the logits within float32 tolerance.
Sliding-window models (Mistral, Qwen2 with some sliding layers) run with a window shorter than the document, so a
mask that ignored the window would fail. Then the patterns that only a compacted prefix has: reuse without fork,
crop limits, and batches over a ratio-4 cache with unequal layer widths and beta.
"""
import pytest
import torch

import compactor
from compactor.models import load_model

from conftest import CORPUS, FAMILIES, make_tiny_model

TOL = 1e-4
NEW = 8
PROMPTS = [" The quick brown", " To be, or not to be, that is"]
SLIDING = {"mistral-window": ("mistral", dict(sliding_window=24)),
           "qwen2-window": ("qwen2", dict(use_sliding_window=True, sliding_window=24, max_window_layers=1))}


class Setup:
    def __init__(self, folder):
        self.lm = load_model(str(folder))
        self.model, self.tok = self.lm.model, self.lm.tokenizer
        self.tok.padding_side = "left"
        self.doc = CORPUS * 2
        self.doc_ids = self.tok(self.doc, return_tensors="pt").input_ids  # (1, T)
        self.cache = compactor.compress(self.doc, self.model, self.tok, ratio=1, stored_dtype="float32")
        self.T = self.doc_ids.shape[1]
        assert self.cache.get_seq_length() == self.T

    def prompt(self, text=PROMPTS[0]):
        return self.tok(text, add_special_tokens=False, return_tensors="pt")

    def full(self, enc):
        """The reference's input: document + prompt, left-padded as a batch (a row's padding goes before its
        document; plain transformers derives positions from the mask, so the document starts at 0 either way)."""
        rows = [torch.cat([self.doc_ids[0], ids[m.bool()]]) for ids, m in zip(enc["input_ids"],
                                                                             enc["attention_mask"])]
        width = max(r.numel() for r in rows)
        ids = torch.stack([torch.cat([torch.zeros(width - r.numel(), dtype=torch.long), r]) for r in rows])
        mask = torch.stack([torch.cat([torch.zeros(width - r.numel(), dtype=torch.long), torch.ones_like(r)])
                            for r in rows])
        return {"input_ids": ids, "attention_mask": mask}

    def after_dynamic_cache(self, enc):
        """The reference with the padding where the compacted cache has it, after the document: a DynamicCache
        (the model's own, sliding layers included) prefilled with the document, and generate's usual inputs, the
        full ids and a mask over them. (With a sliding window, padding inside the window changes which real tokens
        it covers, so the layout matters.)"""
        from transformers import DynamicCache

        b = enc["input_ids"].shape[0]
        cache = DynamicCache(config=self.model.config)
        with torch.no_grad():
            self.model(self.doc_ids.expand(b, -1), past_key_values=cache)
        ids = torch.cat([self.doc_ids.expand(b, -1), enc["input_ids"]], 1)
        mask = torch.cat([torch.ones(b, self.T, dtype=torch.long), enc["attention_mask"]], 1)
        return {"input_ids": ids, "attention_mask": mask, "past_key_values": cache}


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    root = tmp_path_factory.mktemp("pattern-models")
    built = {}

    def get(name):
        if name not in built:
            family, overrides = SLIDING.get(name, (name, {}))
            built[name] = Setup(make_tiny_model(root / name, family, **overrides))
        return built[name]
    return get


def gen(model, *args, **kwargs):
    with torch.no_grad():
        return model.generate(*args, max_new_tokens=NEW, pad_token_id=0, return_dict_in_generate=True,
                              output_logits=True, **kwargs)


def same_generation(ours, ref, n_ours, n_ref):
    assert ours.sequences[:, n_ours:].tolist() == ref.sequences[:, n_ref:].tolist()
    assert len(ours.logits) == len(ref.logits)
    diff = max((a - b).abs().max().item() for a, b in zip(ours.logits, ref.logits))
    assert diff < TOL, diff


# --- the patterns: each compares the compacted cache with plain transformers on the full sequence --------------

def forward(s):
    enc = s.prompt()
    with torch.no_grad():
        ours = s.model(enc.input_ids, past_key_values=s.cache.fork()).logits
        ref = s.model(**s.full(enc)).logits[:, s.T:]
    assert (ours - ref).abs().max() < TOL


def forward_decode_loop(s):
    """A hand-written greedy loop of forward calls on one cache (positions continue at T + appended)."""
    enc, cache, tokens, logits = s.prompt(), s.cache.fork(), [], []
    ids = enc.input_ids
    with torch.no_grad():
        for _ in range(NEW):
            step = s.model(ids, past_key_values=cache).logits[:, -1]
            ids = step.argmax(-1, keepdim=True)
            tokens.append(int(ids))
            logits.append(step)
    ref = gen(s.model, **s.full(enc), do_sample=False)
    assert tokens == ref.sequences[0, -NEW:].tolist()
    assert max((a - b).abs().max().item() for a, b in zip(logits, ref.logits)) < TOL
    assert cache.get_seq_length() == s.T + enc.input_ids.shape[1] + NEW - 1


def generate_ids(s):
    """generate(prompt_ids, past_key_values=cache): the ids are the prompt only."""
    enc = s.prompt()
    full = s.full(enc)
    same_generation(gen(s.model, enc.input_ids, past_key_values=s.cache, do_sample=False),
                    gen(s.model, **full, do_sample=False), enc.input_ids.shape[1], full["input_ids"].shape[1])


def generate_encoding(s):
    """generate(**tokenizer(prompt), past_key_values=cache): a mask over the prompt only."""
    enc = s.prompt()
    full = s.full(enc)
    same_generation(gen(s.model, **enc, past_key_values=s.cache, do_sample=False),
                    gen(s.model, **full, do_sample=False), enc.input_ids.shape[1], full["input_ids"].shape[1])


def generation_inputs(s):
    """generate(**cache.generation_inputs(ids)) with 1-D ids: a mask over the logical length."""
    enc = s.prompt()
    full = s.full(enc)
    same_generation(gen(s.model, **s.cache.generation_inputs(enc.input_ids[0]), do_sample=False),
                    gen(s.model, **full, do_sample=False), enc.input_ids.shape[1], full["input_ids"].shape[1])


def chat_template_encoding(s):
    """generation_inputs on the BatchEncoding that apply_chat_template returns."""
    enc = s.tok.apply_chat_template([{"role": "user", "content": "Who jumps?"}], add_generation_prompt=True,
                                    return_dict=True, return_tensors="pt")
    full = s.full(enc)
    same_generation(gen(s.model, **s.cache.generation_inputs(enc), do_sample=False),
                    gen(s.model, **full, do_sample=False), enc["input_ids"].shape[1], full["input_ids"].shape[1])


def padded_batch(s):
    """Left-padded prompts of different lengths; the batch-1 prefix serves both rows."""
    enc = s.tok(PROMPTS, add_special_tokens=False, return_tensors="pt", padding=True)
    assert (enc.attention_mask == 0).any()
    full = s.after_dynamic_cache(enc)
    same_generation(gen(s.model, **enc, past_key_values=s.cache, do_sample=False),
                    gen(s.model, **full, do_sample=False), enc.input_ids.shape[1], full["input_ids"].shape[1])


def batch_expansion(s):
    """batch_repeat_interleave on a fork, then a forward of two prompts: the prefix stays one shared view."""
    cache = s.cache.fork()
    cache.batch_repeat_interleave(2)
    rows = [s.prompt(p).input_ids[0] for p in PROMPTS]
    k = min(r.numel() for r in rows)
    ids = torch.stack([r[:k] for r in rows])  # no padding: a plain forward numbers positions without the mask
    with torch.no_grad():
        ours = s.model(ids, past_key_values=cache).logits
        ref = s.model(torch.cat([s.doc_ids.expand(2, -1), ids], 1)).logits[:, -k:]
    assert (ours - ref).abs().max() < TOL
    assert all(layer.prefix_keys.shape[0] == 1 for layer in cache.layers)
    assert all(a.prefix_keys.data_ptr() == b.prefix_keys.data_ptr() for a, b in zip(cache.layers, s.cache.layers))
    assert cache.layers[0].keys.shape[0] == 2


def num_return_sequences(s):
    """Sampling, three sequences per prompt, the same seed on both sides."""
    enc = s.prompt()
    full = s.full(enc)
    kw = dict(do_sample=True, top_k=0, temperature=1.0, num_return_sequences=3)
    torch.manual_seed(7)
    ours = gen(s.model, **enc, past_key_values=s.cache, **kw)
    torch.manual_seed(7)
    ref = gen(s.model, **full, **kw)
    same_generation(ours, ref, enc.input_ids.shape[1], full["input_ids"].shape[1])


def beam_search(s):
    """num_beams=3, two returned sequences (reorder_cache on every step)."""
    enc = s.prompt()
    full = s.full(enc)
    kw = dict(do_sample=False, num_beams=3, num_return_sequences=2, output_scores=True)
    ours = gen(s.model, **enc, past_key_values=s.cache, **kw)
    ref = gen(s.model, **full, **kw)
    same_generation(ours, ref, enc.input_ids.shape[1], full["input_ids"].shape[1])
    assert torch.allclose(ours.sequences_scores, ref.sequences_scores, atol=TOL)


def crop(s):
    """crop(-k) removes k appended tokens, crop(n) keeps n tokens in all; feeding them again gives the same logits."""
    enc = s.prompt(PROMPTS[1])
    n = enc.input_ids.shape[1]
    ref = None
    with torch.no_grad():
        ref = s.model(**s.full(enc)).logits[:, -3:]
        for how in (-3, s.T + n - 3):
            cache = s.cache.fork()
            s.model(enc.input_ids, past_key_values=cache)
            cache.crop(how)
            assert cache.get_seq_length() == s.T + n - 3
            again = s.model(enc.input_ids[:, -3:], past_key_values=cache).logits
            assert (again - ref).abs().max() < TOL


PATTERNS = [forward, forward_decode_loop, generate_ids, generate_encoding, generation_inputs, chat_template_encoding,
            padded_batch, batch_expansion, num_return_sequences, beam_search, crop]
MODELS = list(FAMILIES) + list(SLIDING)


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.__name__)
@pytest.mark.parametrize("model_name", MODELS)
def test_pattern_matches_full_cache(setups, model_name, pattern):
    s = setups(model_name)
    pattern(s)
    assert s.cache.get_seq_length() == s.T  # no pattern changed the loaded cache


# --- what only a compacted prefix has ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compacted(tiny_models):
    """A ratio-4 cache with global budgets: layers of unequal width, heads padded within a layer, fitted beta."""
    lm = load_model(str(tiny_models["llama"]))
    lm.tokenizer.padding_side = "left"
    cache = compactor.compress(CORPUS * 2, lm.model, lm.tokenizer, ratio=4, max_queries=256, budget="global",
                               budget_floor=0.25)
    widths = [layer.prefix_slots for layer in cache.layers]
    assert len(set(widths)) > 1, widths
    assert any(torch.isinf(layer.beta).any() for layer in cache.layers)  # padded heads
    return lm, cache


def test_reuse_without_fork_gives_the_same_answer(compacted):
    lm, cache = compacted
    prefix = [(layer.prefix_keys.clone(), layer.prefix_values.clone()) for layer in cache.layers]
    enc = lm.tokenizer(PROMPTS[0], add_special_tokens=False, return_tensors="pt")
    first = gen(lm.model, **enc, past_key_values=cache, do_sample=False)
    other = gen(lm.model, **lm.tokenizer(PROMPTS[1], add_special_tokens=False, return_tensors="pt"),
                past_key_values=cache, do_sample=False)
    again = gen(lm.model, **enc, past_key_values=cache, do_sample=False)
    assert first.sequences.tolist() == again.sequences.tolist()
    assert max((a - b).abs().max().item() for a, b in zip(first.logits, again.logits)) == 0
    assert other.sequences[0, -NEW:].tolist() != first.sequences[0, -NEW:].tolist()
    assert cache.get_seq_length() == cache.logical_length
    for layer, (k, v) in zip(cache.layers, prefix):
        assert torch.equal(layer.prefix_keys, k) and torch.equal(layer.prefix_values, v)
    # the fork the generation ran on comes back for a continuation
    assert first.past_key_values is not cache
    assert first.past_key_values.get_seq_length() == cache.logical_length + enc.input_ids.shape[1] + NEW - 1


def test_padded_batch_rows_match_single_prompts(compacted):
    """With beta and unequal layer widths: each row of a left-padded batch equals that prompt alone."""
    lm, cache = compacted
    batch = gen(lm.model, **lm.tokenizer(PROMPTS, add_special_tokens=False, return_tensors="pt", padding=True),
                past_key_values=cache, do_sample=False)
    for i, p in enumerate(PROMPTS):
        alone = gen(lm.model, **lm.tokenizer(p, add_special_tokens=False, return_tensors="pt"),
                    past_key_values=cache, do_sample=False)
        assert batch.sequences[i, -NEW:].tolist() == alone.sequences[0, -NEW:].tolist()
        assert max((a[i] - b[0]).abs().max().item() for a, b in zip(batch.logits, alone.logits)) < TOL


def test_crop_cannot_reach_into_the_prefix(compacted):
    lm, cache = compacted
    fork = cache.fork()
    with torch.no_grad():
        lm.model(lm.tokenizer(PROMPTS[0], add_special_tokens=False, return_tensors="pt").input_ids,
                 past_key_values=fork)
    n = fork.get_seq_length() - cache.logical_length
    with pytest.raises(ValueError, match="only"):
        fork.crop(-(n + 1))
    with pytest.raises(ValueError, match="only"):
        fork.crop(cache.logical_length - 1)
    fork.crop(fork.get_seq_length() + 5)  # keeping more than there is: nothing to do, as in transformers
    assert fork.get_seq_length() == cache.logical_length + n
    fork.reset()
    assert fork.get_seq_length() == cache.logical_length


def test_padded_batch_without_a_cache_is_sdpa_after_load(tiny_models, tmp_path):
    """load_cache switches the model to "compactor": with no compacted prefix it must give sdpa's logits exactly,
    padding mask included (the silent wrong answer this replaced ignored the padding)."""
    lm = load_model(str(tiny_models["qwen2"]))
    lm.tokenizer.padding_side = "left"
    enc = lm.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        sdpa = lm.model(**enc).logits
    path = compactor.compress(CORPUS, lm.model, lm.tokenizer, ratio=4, max_queries=128).save(tmp_path / "d.h5")
    compactor.load_cache(path, lm.model, lm.tokenizer)
    assert lm.model.config._attn_implementation == "compactor"
    with torch.no_grad():
        after = lm.model(**enc).logits
        generated = lm.model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0)
    lm.model.set_attn_implementation("sdpa")
    with torch.no_grad():
        expected = lm.model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(after, sdpa)
    assert torch.equal(generated, expected)
