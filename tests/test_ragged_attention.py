"""ragged_attention: the torch reference against a float64 dense attention over compactor's own decoded cache, and
the Triton kernels against the reference under the interpreter (TRITON_INTERPRET=1, CPU).

The float64 side is built independently of kernels/: keys/values are encoded by compactor.storage.kv_codec and
decoded by its decode_layer (exact entries overwritten there), beta is the stored beta, and the causal and
padding masks are an explicit bias, one query head at a time. The interpreter cases run in a child pytest with
TRITON_INTERPRET=1 set before triton is imported (as in test_attention_stats.py), unless this process already is
one.
"""
import importlib
import importlib.util

import numpy as np
import pytest
import torch
from triton_interp import HAS_TRITON, interpreter_active, run_interpreter_child

from compactor.layer_kv import LayerKV
from compactor.storage.kv_codec import KVCodec, TensorCodec, decode_layer, encode_layer, parse_kv_bits

attn_mod = importlib.import_module("compactor.kernels.ragged_attention")
from compactor.kernels.ragged_attention import ragged_attention, ragged_attention_torch, ragged_attention_triton  # noqa: E402
from compactor.kernels.ragged_prefix import RaggedPrefix  # noqa: E402

_HAS_TRITON = HAS_TRITON
_CHILD_ENV = "COMPACTOR_RAGGED_CHILD"  # set in the child: interpreter tests must run, never skip
_INTERP = interpreter_active(_CHILD_ENV)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def codec_of(label: str) -> KVCodec:
    if label.endswith("-noexact"):  # lloyd without exact entries
        c = parse_kv_bits(label[: -len("-noexact")])
        return KVCodec(TensorCodec(c.keys.name, c.keys.bits, 0), TensorCodec(c.values.name, c.values.bits, 0))
    if label.startswith("raw"):
        return KVCodec()
    return parse_kv_bits(label)


def make_layer(lens, d, seed, neg_inf_beta=False) -> LayerKV:
    """Keys with a shared offset (what the lloyd mean is for), values, betas in [-2, 2], an importance score."""
    g = torch.Generator().manual_seed(seed)
    H, t = len(lens), max(max(lens), 1)
    keys = torch.randn(H, t, d, generator=g) * 1.5 + torch.randn(H, 1, d, generator=g)
    values = torch.randn(H, t, d, generator=g)
    beta = 4 * torch.rand(H, t, generator=g) - 2
    if neg_inf_beta:  # a few entries nobody may attend to, and one head of only such entries
        beta[torch.rand(H, t, generator=g) < 0.2] = float("-inf")
        beta[0] = float("-inf")
    valid = torch.arange(t)[None, :] < torch.tensor(lens)[:, None]
    keys, values, beta = keys * valid[..., None], values * valid[..., None], beta.masked_fill(~valid, 0.0)
    pos = torch.where(valid, torch.arange(t).expand(H, t), -1)
    return LayerKV(keys, values, beta, pos, torch.tensor(lens), torch.rand(H, t, generator=g))


def stored(label: str, lens, d, seed=0, stored_dtype="bfloat16", neg_inf_beta=False):
    """(arrays, attrs, codebooks) of one layer as the artifact stores it."""
    books = {}
    arrays, attrs = encode_layer(make_layer(lens, d, seed, neg_inf_beta), codec_of(label), stored_dtype, 7, books)
    return arrays, attrs, books


def make_queries(seed, B, Hq, Lq, L_app, Hkv, d, dtype, pad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, d, generator=g) * (0.5 + 1.5 * torch.rand(B, Hq, Lq, 1, generator=g))
    if not L_app:
        return q.to(dtype), None, None, None
    ak = torch.randn(B, Hkv, L_app, d, generator=g)
    av = torch.randn(B, Hkv, L_app, d, generator=g)
    mask = None
    if pad:  # left padding: sequence b starts after b*(L_app - Lq)//B tokens (at most before the queries)
        mask = torch.ones(B, L_app, dtype=torch.bool)
        for b in range(B):
            mask[b, : b * (L_app - Lq) // max(B - 1, 1)] = False
    return q.to(dtype), ak.to(dtype), av.to(dtype), mask


def dense_float64(q, arrays, attrs, books, d, ak, av, mask, scale):
    """Independent float64 attention over the cache as compactor's own codec decodes it; (B, Lq, Hq, d)."""
    B, Hq, Lq, _ = q.shape
    out = torch.zeros(B, Lq, Hq, d, dtype=torch.float64)
    lens = [int(n) for n in arrays["lengths"]] if arrays is not None else []
    if arrays is not None:
        dec = decode_layer(arrays, attrs, books, d)
        beta = torch.from_numpy(np.asarray(arrays["beta"])).double()
        starts = np.concatenate([[0], np.cumsum(lens)])
    Hkv = len(lens) if arrays is not None else ak.shape[1]
    L_app = 0 if ak is None else ak.shape[2]
    for b in range(B):
        for hq in range(Hq):
            h = hq // (Hq // Hkv)
            ks, vs, bias = [], [], []
            if arrays is not None:
                n = lens[h]
                ks.append(dec.keys[h, :n].double())
                vs.append(dec.values[h, :n].double())
                bias.append(beta[starts[h]:starts[h] + n].expand(Lq, n))
            if L_app:
                ks.append(ak[b, h].double())
                vs.append(av[b, h].double())
                allowed = torch.zeros(Lq, L_app, dtype=torch.bool)
                for i in range(Lq):
                    allowed[i, : L_app - Lq + i + 1] = True
                if mask is not None:
                    allowed &= mask[b][None, :]
                bias.append(torch.zeros(Lq, L_app, dtype=torch.float64).masked_fill(~allowed, float("-inf")))
            k, v, bias = torch.cat(ks), torch.cat(vs), torch.cat(bias, dim=1)
            s = q[b, hq].double() @ k.T * scale + bias
            seen = torch.isfinite(s).any(dim=1)
            p = torch.softmax(torch.where(seen[:, None], s, torch.zeros_like(s)), dim=1) * seen[:, None]
            p = torch.where(torch.isfinite(s), p, torch.zeros_like(p))
            out[b, :, hq] = p @ v
    return out


def rel_err(got, ref):
    got, ref = got.double(), ref.double()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# case: (label, lens, d, B, G, Lq, L_app, pad, qdtype, stored_dtype, neg_inf_beta)
REFERENCE_CASES = [
    ("raw", [5, 0, 1, 23], 32, 2, 2, 3, 6, True, torch.float32, "bfloat16", False),
    ("raw", [9, 3], 64, 1, 8, 1, 4, False, torch.float32, "float16", True),
    ("raw", [4, 7, 2], 48, 3, 1, 2, 2, False, torch.float32, "float32", False),
    ("K4V4", [17, 1, 30, 5], 64, 2, 3, 2, 5, True, torch.float32, "bfloat16", False),
    ("K3V5", [12, 2], 48, 1, 4, 1, 3, False, torch.float32, "bfloat16", True),
    ("K1V8", [6, 9], 32, 2, 2, 1, 1, False, torch.float32, "float16", False),
    ("K8V2-noexact", [11, 4], 64, 1, 2, 4, 0, False, torch.float32, "bfloat16", False),
    ("q8_0", [7, 0, 13], 64, 2, 2, 2, 4, True, torch.float32, "bfloat16", False),
    ("q4_0", [3, 18], 32, 1, 4, 3, 3, False, torch.float32, "bfloat16", True),
    ("K6Vq4_0", [10, 5], 64, 2, 1, 1, 2, False, torch.float32, "float32", False),
    ("Kq8_0V7", [8, 8], 32, 1, 2, 2, 5, True, torch.float32, "bfloat16", False),
]


def _rid(c):
    label, lens, d, B, G, Lq, L_app, pad, qd, sd, ninf = c
    return (f"{label}-d{d}-l{'_'.join(map(str, lens))}-B{B}G{G}Lq{Lq}La{L_app}{'-pad' if pad else ''}"
            f"-{sd}{'-ninf' if ninf else ''}")


# ----------------------------------------------------------------------------------------------
# the torch reference and the served layout (run everywhere)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=_rid)
def test_reference_matches_float64_over_compactor_decoder(case):
    label, lens, d, B, G, Lq, L_app, pad, qdtype, sdtype, ninf = case
    arrays, attrs, books = stored(label, lens, d, seed=len(lens) * d + B, stored_dtype=sdtype, neg_inf_beta=ninf)
    prefix = RaggedPrefix.from_stored(arrays, attrs, books, d)
    Hkv = len(lens)
    q, ak, av, mask = make_queries(d + Lq, B, Hkv * G, Lq, L_app, Hkv, d, qdtype, pad)
    scale = 0.7 * d ** -0.5
    got = ragged_attention_torch(q, prefix, ak, av, mask, scale)
    ref = dense_float64(q, arrays, attrs, books, d, ak, av, mask, scale)
    assert got.shape == (B, Lq, Hkv * G, d) and got.dtype == qdtype
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("label", ["K4V4", "K3V5", "K7V1", "q8_0", "q4_0", "K2Vq8_0", "raw"])
def test_served_prefix_decodes_like_kv_codec(label):
    """Every ragged row the prefix keeps coded decodes to compactor's own decode; the exact segment holds the
    rows kv_codec overwrites with the stored exact entries, with their beta, and masks the coded copies."""
    lens, d = [9, 1, 14], 64
    arrays, attrs, books = stored(label, lens, d, seed=3)
    prefix = RaggedPrefix.from_stored(arrays, attrs, books, d)
    dec = decode_layer(arrays, attrs, books, d)
    keys, values = prefix.dequantize()
    beta = torch.from_numpy(arrays["beta"])
    n_exact = 0
    for h, n in enumerate(lens):
        lo = int(prefix.offsets[h])
        coded = torch.isfinite(prefix.beta[lo:lo + n])
        exact_rows = (~coded).nonzero().flatten()
        n_exact += exact_rows.numel()
        torch.testing.assert_close(keys[lo:lo + n][coded], dec.keys[h, :n][coded], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(values[lo:lo + n][coded], dec.values[h, :n][coded], rtol=1e-6, atol=1e-6)
        for j, r in enumerate(exact_rows.tolist()):
            torch.testing.assert_close(prefix.exact_keys[h, j], dec.keys[h, r], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(prefix.exact_values[h, j], dec.values[h, r], rtol=1e-6, atol=1e-6)
            assert prefix.exact_beta[h, j] == beta[lo + r]
        if prefix.num_exact:
            assert torch.isinf(prefix.exact_beta[h, exact_rows.numel():]).all()
    expected = 0 if label in ("raw", "q8_0", "q4_0") else sum(min(2, min(lens)) for _ in lens)
    assert n_exact == expected


@pytest.mark.parametrize("label", ["raw", "K4V4", "K2V3", "q4_0", "q8_0"])
def test_served_bytes_are_the_stored_bytes(label):
    """What the served prefix allocates = the stored arrays it keeps (codes, gains, means, beta; not the positions
    or the lengths) + the int32 offsets + the codebooks + the exact segment, exactly."""
    lens, d = [40, 3, 17, 9], 64
    arrays, attrs, books = stored(label, lens, d)
    prefix = RaggedPrefix.from_stored(arrays, attrs, books, d)
    kept = sum(a.nbytes for name, a in arrays.items() if name not in ("positions", "lengths")
               and not name.endswith(("_exact", "_exact_rows")))
    used_books = sum(books[attrs[f"{t}_codebook"]].nbytes for t in ("keys", "values") if f"{t}_codebook" in attrs)
    H, E = len(lens), prefix.num_exact
    assert prefix.nbytes() == kept + 4 * (H + 1) + used_books + H * E * (2 * d * 4 + 4)


def test_reference_without_prefix_or_without_appended():
    d, Hkv, G = 32, 2, 2
    q, ak, av, _ = make_queries(1, 2, Hkv * G, 3, 5, Hkv, d, torch.float32)
    got = ragged_attention_torch(q, None, ak, av)
    ref = dense_float64(q, None, None, None, d, ak, av, None, d ** -0.5)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    empty = RaggedPrefix.from_heads([torch.zeros(0, d)] * Hkv, [torch.zeros(0, d)] * Hkv, [torch.zeros(0)] * Hkv)
    torch.testing.assert_close(ragged_attention_torch(q, empty, ak, av), got, rtol=0, atol=0)
    # prefix only; a query that sees nothing (empty head 1) gets 0
    arrays, attrs, books = stored("q4_0", [6, 0], d)  # (kv_codec cannot lloyd-encode an empty head)
    prefix = RaggedPrefix.from_stored(arrays, attrs, books, d)
    out = ragged_attention_torch(q, prefix)
    ref = dense_float64(q, arrays, attrs, books, d, None, None, None, d ** -0.5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert not out[:, :, G:].any()


def test_bad_inputs_raise_value_error():
    d = 32
    arrays, attrs, books = stored("K4V4", [5, 3], d)
    prefix = RaggedPrefix.from_stored(arrays, attrs, books, d)
    q, ak, av, mask = make_queries(0, 2, 4, 2, 4, 2, d, torch.float32, pad=True)
    bad = [
        dict(queries=q[0]),  # not 4-D
        dict(queries=q.double()),  # dtype
        dict(queries=q[:, :3]),  # 3 query heads over 2 KV heads
        dict(queries=q[..., :16]),  # head dim
        dict(app_keys=ak[:, :, :1], app_values=av[:, :, :1]),  # fewer appended tokens than queries
        dict(app_values=None),  # keys without values
        dict(app_keys=ak[:, :1], app_values=av[:, :1]),  # KV heads disagree with the prefix
        dict(app_keys=ak.half(), app_values=av.half()),  # dtype differs from the queries
        dict(app_mask=mask[:, :3]),  # mask shape
        dict(prefix=None, app_keys=None, app_values=None, app_mask=None),  # nothing to attend to
        dict(scale=float("nan")),
    ]
    for override in bad:
        args = dict(queries=q, prefix=prefix, app_keys=ak, app_values=av, app_mask=mask, scale=None)
        args.update(override)
        with pytest.raises(ValueError):
            ragged_attention_torch(**args)


def test_from_stored_rejects_inconsistent_arrays():
    d = 32
    arrays, attrs, books = stored("K4V4", [5, 3], d)

    def broken(**changes):
        a, t = dict(arrays), dict(attrs)
        for k, v in changes.items():
            (t if k in attrs else a)[k] = v
        return a, t

    cases = [
        broken(lengths=np.array([5, 4], dtype=np.int32)),  # lengths disagree with the rows
        broken(lengths=np.array([9, -1], dtype=np.int32)),
        broken(beta=np.full(8, np.nan, dtype=np.float32)),
        broken(keys_codes=arrays["keys_codes"][:, :-1]),  # wrong packed width
        broken(keys_gains=arrays["keys_gains"].astype(np.float32)),
        broken(values_mean=arrays["values_mean"][:1]),
        broken(keys_bits=3),  # codes of 4 bits read as 3: width and codebook disagree
        broken(keys_codebook="nope"),
        broken(keys_exact_rows=np.array([[0, 7], [0, 1]], dtype=np.int32)),  # row 7 beyond head 0's 5 entries
        broken(keys_exact_rows=np.array([[1, 1], [0, 1]], dtype=np.int32)),  # repeated row
        broken(keys_codec="zstd"),
    ]
    for a, t in cases:
        with pytest.raises(ValueError):
            RaggedPrefix.from_stored(a, t, books, d)
    with pytest.raises(ValueError):
        RaggedPrefix.from_stored(arrays, attrs, {k: v[:3] for k, v in books.items()}, d)  # short codebook
    q8, q8_attrs, _ = stored("q8_0", [5, 3], d)
    with pytest.raises(ValueError):
        RaggedPrefix.from_stored({**q8, "keys_blocks": q8["keys_blocks"][:, :-2]}, q8_attrs, {}, d)


def test_dispatch_cpu_uses_torch(monkeypatch):
    arrays, attrs, books = stored("q4_0", [4, 2], 32)
    prefix = RaggedPrefix.from_stored(arrays, attrs, books, 32)
    q, ak, av, _ = make_queries(2, 1, 2, 1, 2, 2, 32, torch.float32)
    called = []
    monkeypatch.setattr(attn_mod, "ragged_attention_triton", lambda *a, **kw: called.append(1))
    for env in (None, "0"):
        if env is None:
            monkeypatch.delenv("COMPACTOR_TRITON", raising=False)
        else:
            monkeypatch.setenv("COMPACTOR_TRITON", env)
        out = ragged_attention(q, prefix, ak, av)
        assert not called
        torch.testing.assert_close(out, ragged_attention_torch(q, prefix, ak, av), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Triton kernels under the interpreter
# ----------------------------------------------------------------------------------------------

# (label, lens, d, B, G, Lq, L_app, pad, qdtype, stored dtype, -inf betas, chunk)
KERNEL_CASES = [
    # raw prefixes in each stored dtype; GQA groups 1..8; decode (Lq=1) and prefill-like (Lq>1)
    ("raw", [17, 0, 1, 40], 64, 2, 2, 1, 6, True, torch.float32, "bfloat16", False, 16),
    ("raw", [33, 5], 64, 3, 1, 4, 9, True, torch.float32, "float16", True, 16),
    ("raw", [20, 16, 3], 32, 1, 3, 5, 5, False, torch.float32, "float32", False, 32),
    ("raw", [50, 7], 64, 2, 8, 1, 3, False, torch.bfloat16, "bfloat16", False, 16),
    ("raw", [18, 2], 48, 1, 4, 2, 2, False, torch.float16, "float16", False, 16),
    # lloyd: every bit width for keys and for values, exact entries, d = 48 (seeded orthogonal rotation)
    ("K1V8", [17, 1, 30], 64, 2, 2, 1, 4, False, torch.float32, "bfloat16", False, 16),
    ("K2V7", [9, 21], 64, 1, 4, 2, 3, True, torch.float32, "bfloat16", False, 16),
    ("K3V6", [25, 4], 48, 2, 1, 1, 2, False, torch.float32, "bfloat16", True, 16),
    ("K4V5", [40, 13, 2], 64, 1, 2, 3, 7, True, torch.float32, "bfloat16", False, 32),
    ("K5V4", [19, 33], 48, 2, 3, 1, 3, False, torch.float32, "float16", False, 16),
    ("K6V3", [7, 2], 64, 1, 8, 2, 2, False, torch.float32, "bfloat16", False, 16),
    ("K7V2", [31, 6], 32, 3, 2, 1, 5, True, torch.float32, "bfloat16", False, 16),
    ("K8V1", [12, 45], 64, 1, 2, 4, 4, False, torch.float32, "bfloat16", False, 16),
    ("K4V4-noexact", [29, 3], 64, 2, 4, 1, 1, False, torch.float32, "bfloat16", False, 16),
    ("K4V4", [37, 11, 60, 1], 64, 2, 4, 1, 8, True, torch.bfloat16, "bfloat16", False, 16),
    ("K3V2", [22, 14], 48, 1, 2, 3, 3, False, torch.float16, "float16", True, 16),
    # llama.cpp blocks, and mixtures with lloyd (exact rows of one tensor only)
    ("q8_0", [21, 0, 3], 64, 2, 2, 1, 5, True, torch.float32, "bfloat16", False, 16),
    ("q4_0", [16, 35], 32, 1, 4, 3, 3, False, torch.float32, "bfloat16", True, 16),
    ("q4_0", [64, 9], 64, 2, 4, 1, 4, False, torch.bfloat16, "bfloat16", False, 32),
    ("q8_0", [27, 8], 32, 1, 2, 2, 2, False, torch.float16, "float16", False, 16),
    ("K4Vq4_0", [18, 26], 64, 2, 2, 1, 3, False, torch.float32, "bfloat16", False, 16),
    ("Kq8_0V3", [15, 2], 64, 1, 4, 2, 6, True, torch.float32, "float32", False, 16),
    ("Kq4_0V4", [40, 20], 64, 1, 2, 1, 2, False, torch.bfloat16, "bfloat16", False, 16),
    # d = 96 and 128 (head-dim tile 128) and 256 (the rotation products in two and four column steps)
    ("K4V3", [23, 9], 96, 1, 2, 2, 3, True, torch.float32, "bfloat16", False, 16),
    ("K5V2", [17, 30], 128, 2, 1, 1, 2, False, torch.float32, "bfloat16", False, 16),
    ("K2V6", [11, 5], 256, 1, 2, 1, 1, False, torch.float32, "bfloat16", False, 16),
    ("q4_0", [26, 3], 96, 1, 3, 1, 2, False, torch.float32, "bfloat16", False, 16),
    # the served shape (d = 128): 4-bit pair tables with float16 and bfloat16 queries, 16-bit block loads
    ("K4V4", [45, 3, 1], 128, 2, 4, 1, 5, False, torch.float16, "float16", False, 16),
    ("K4V4", [70, 19], 128, 1, 4, 2, 4, True, torch.bfloat16, "bfloat16", True, 32),
    ("q4_0", [33, 8], 128, 2, 4, 1, 3, False, torch.float16, "float16", False, 16),
    ("q8_0", [29, 2], 128, 1, 4, 1, 2, False, torch.bfloat16, "bfloat16", False, 16),
]


def _kid(c):
    return _rid(c[:11]) + f"-{str(c[8]).split('.')[-1]}-c{c[11]}"


def _tolerance(qdtype):
    return 2e-6 if qdtype == torch.float32 else 2e-2  # 16-bit: dot operands rounded as on the GPU


def _poison(monkeypatch):
    monkeypatch.setattr(attn_mod, "_alloc", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                      device=device))


def _four_heads(label, G, B, Lq, L_app, seed, qdtype, pad):
    """4 KV heads of 70, 0, 1 and 33 prefix entries (d = 64, G query heads each) in `label`'s codec ("16": raw):
    (prefix, queries, appended keys, appended values, mask)."""
    d, lens = 64, [70, 0, 1, 33]
    arrays, attrs, books = stored(label if label != "16" else "raw", lens, d, seed=seed)
    prefix = RaggedPrefix.from_stored(arrays, attrs, books, d)
    return (prefix,) + tuple(make_queries(sum(lens) + Lq, B, 4 * G, Lq, L_app, 4, d, qdtype, pad=pad))


if _INTERP:

    @pytest.mark.parametrize("case", KERNEL_CASES, ids=_kid)
    def test_interp_kernel_matches_reference(case, monkeypatch):
        """Small blocks (16 keys) and chunks so heads span several splits with ragged tails."""
        label, lens, d, B, G, Lq, L_app, pad, qdtype, sdtype, ninf, chunk = case
        _poison(monkeypatch)
        arrays, attrs, books = stored(label, lens, d, seed=sum(lens) + d, stored_dtype=sdtype, neg_inf_beta=ninf)
        prefix = RaggedPrefix.from_stored(arrays, attrs, books, d)
        Hkv = len(lens)
        q, ak, av, mask = make_queries(sum(lens) + Lq, B, Hkv * G, Lq, L_app, Hkv, d, qdtype, pad)
        got = ragged_attention_triton(q, prefix, ak, av, mask, 0.9 * d ** -0.5, block_n=16, chunk=chunk)
        ref = ragged_attention_torch(q, prefix, ak, av, mask, 0.9 * d ** -0.5)
        assert got.shape == ref.shape and got.dtype == qdtype
        assert torch.isfinite(got).all(), "unwritten (NaN-poisoned) or non-finite outputs"
        err = rel_err(got, ref)
        assert err < _tolerance(qdtype), f"relative L2 error {err:.2e}"
        if qdtype == torch.float32:  # and against the independent float64 attention directly
            ref64 = dense_float64(q, arrays, attrs, books, d, ak, av, mask, 0.9 * d ** -0.5)
            assert rel_err(got, ref64) < 2e-6

    @pytest.mark.parametrize("with_prefix", ["none", "empty", "prefix-only"])
    def test_interp_kernel_without_prefix_or_appended(with_prefix, monkeypatch):
        _poison(monkeypatch)
        d, Hkv, G = 32, 2, 2
        q, ak, av, mask = make_queries(5, 2, Hkv * G, 3, 7, Hkv, d, torch.float32, pad=True)
        if with_prefix == "none":
            prefix = None
        elif with_prefix == "empty":
            prefix = RaggedPrefix.from_heads([torch.zeros(0, d)] * Hkv, [torch.zeros(0, d)] * Hkv,
                                             [torch.zeros(0)] * Hkv)
        else:
            arrays, attrs, books = stored("Kq4_0Vq8_0", [21, 0], d)
            prefix = RaggedPrefix.from_stored(arrays, attrs, books, d)
            ak = av = mask = None
        got = ragged_attention_triton(q, prefix, ak, av, mask, block_n=16, chunk=16)
        ref = ragged_attention_torch(q, prefix, ak, av, mask)
        assert torch.isfinite(got).all()
        assert rel_err(got, ref) < 2e-6
        if with_prefix == "prefix-only":
            assert not got[:, :, G:].any()  # queries of the empty head see nothing: 0

    def test_interp_default_config_and_strided_appended(monkeypatch):
        """The launcher's own tiles and chunks; appended keys/values read in place from a larger static cache."""
        _poison(monkeypatch)
        d, lens, G, B = 64, [300, 77, 1, 150], 4, 2
        arrays, attrs, books = stored("K4V4", lens, d, seed=9)
        prefix = RaggedPrefix.from_stored(arrays, attrs, books, d)
        g = torch.Generator().manual_seed(4)
        big = torch.randn(2, B, 4, 64, d, generator=g)
        ak, av = big[0, :, :, :20], big[1, :, :, :20]  # (B, 4, 20, d) with the strides of a 64-slot cache
        q = torch.randn(B, 4 * G, 1, d, generator=g)
        got = ragged_attention_triton(q, prefix, ak, av)
        assert rel_err(got, ragged_attention_torch(q, prefix, ak, av)) < 2e-6
        q = torch.randn(B, 4 * G, 20, d, generator=g)  # prefill: several row tiles
        got = ragged_attention_triton(q, prefix, ak, av)
        assert rel_err(got, ragged_attention_torch(q, prefix, ak, av)) < 2e-6

    @pytest.mark.parametrize("fuse,rotate", [(True, "hadamard"), (False, "hadamard"), (True, "prologue"),
                                             (False, "prologue"), ("prefill", "kernel"), (False, "matmul")])
    @pytest.mark.parametrize("label,B,Lq", [("K4V4", 2, 1), ("K2V3", 1, 40), ("16", 3, 1), ("q4_0", 1, 37)])
    def test_interp_merge_and_rotation_paths(fuse, rotate, label, B, Lq, monkeypatch):
        """The merge in the partial kernel (last program of a tile and head) and the separate combine; the
        rotations of d = 64 made in registers as Hadamard products (query rotation and value un-rotation in the
        partial kernel), or with the stored dense R: the query in the prologue, by _rotate_kernel or by a matmul,
        the values in the merge: same outputs; the tickets are back to 0."""
        _poison(monkeypatch)
        monkeypatch.setattr(attn_mod, "_FUSE_COMBINE", fuse)
        monkeypatch.setattr(attn_mod, "_HADAMARD", rotate == "hadamard")
        monkeypatch.setattr(attn_mod, "_ROTATE", "prologue" if rotate == "hadamard" else rotate)
        prefix, q, ak, av, mask = _four_heads(label, 2, B, Lq, Lq + 5, B + Lq, torch.float32, pad=B > 1)
        for _ in range(2):  # a second call sees the counters the first one left
            got = ragged_attention_triton(q, prefix, ak, av, mask, block_n=16, chunk=32)
            assert rel_err(got, ragged_attention_torch(q, prefix, ak, av, mask)) < 2e-6
        for held in attn_mod._COUNTERS.values():
            assert not held[-1].any(), "a ticket counter was left non-zero"

    @pytest.mark.parametrize("label", ["K4V4", "16", "q4_0"])
    def test_interp_combine_gathers_in_several_steps(label, monkeypatch):
        """The separate combine with 2 buffers per gather (the launcher sizes it to a head's buffer count: one
        step): heads of 0, 1 and 5 prefix items plus the exact and appended buffers merge over several steps
        with the online rescale between them."""
        _poison(monkeypatch)
        monkeypatch.setattr(attn_mod, "_FUSE_COMBINE", False)
        real = attn_mod._combine_config
        monkeypatch.setattr(attn_mod, "_combine_config", lambda *a, **k: (lambda c: (c[0], 2, c[2]))(real(*a, **k))
                            if k.get("fused_rows") is None else real(*a, **k))
        prefix, q, ak, av, mask = _four_heads(label, 2, 2, 1, 6, 3, torch.float32, pad=True)
        got = ragged_attention_triton(q, prefix, ak, av, mask, block_n=16, chunk=16)
        assert torch.isfinite(got).all()
        assert rel_err(got, ragged_attention_torch(q, prefix, ak, av, mask)) < 2e-6

    @pytest.mark.parametrize("knobs", [{"_DECODE_SWAP": False}, {"_PREFETCH": 0}, {"_PREFETCH": 2},
                                       {"_FWHT": False}], ids=["plain-products", "no-prefetch", "codes-ahead",
                                                               "rotation-products"])
    @pytest.mark.parametrize("label", ["K4V4", "q4_0", "q8_0", "16"])
    def test_interp_decode_paths(knobs, label, monkeypatch):
        """Decode tiles of 16-bit queries under each non-default setting of the prefix loop: the products taken
        plainly instead of transposed, nothing or every code loaded a step ahead, the Hadamard rotations as
        products with H instead of the butterfly: each matches the reference (heads of 0, 1 and several blocks)."""
        _poison(monkeypatch)
        for k, v in knobs.items():
            monkeypatch.setattr(attn_mod, k, v)
        prefix, q, ak, av, mask = _four_heads(label, 4, 2, 1, 6, 5, torch.bfloat16, pad=True)
        got = ragged_attention_triton(q, prefix, ak, av, mask, block_n=16, chunk=32)
        assert torch.isfinite(got).all()
        assert rel_err(got, ragged_attention_torch(q, prefix, ak, av, mask)) < _tolerance(torch.bfloat16)

    def test_interp_fwht_is_x_times_hadamard():
        """`_fwht` (the butterfly the kernels rotate with) against x @ scipy.linalg.hadamard(d) in float64."""
        import scipy.linalg
        import triton
        import triton.language as tl

        @triton.jit
        def fwht_kernel(X, Y, ROWS: tl.constexpr, D: tl.constexpr):
            idx = tl.arange(0, ROWS)[:, None] * D + tl.arange(0, D)[None, :]
            tl.store(Y + idx, attn_mod._fwht(tl.load(X + idx), ROWS, D))

        g = torch.Generator().manual_seed(0)
        for d in (16, 64, 128, 256):
            x = torch.randn(16, d, generator=g)
            y = torch.empty_like(x)
            fwht_kernel[(1,)](x, y, ROWS=16, D=d)
            want = x.double() @ torch.from_numpy(scipy.linalg.hadamard(d)).double()
            assert rel_err(y, want) < 1e-6, d

    def test_interp_dispatcher_routes_to_triton(monkeypatch):
        monkeypatch.setenv("COMPACTOR_TRITON", "1")
        arrays, attrs, books = stored("q4_0", [10, 4], 32)
        prefix = RaggedPrefix.from_stored(arrays, attrs, books, 32)
        q, ak, av, _ = make_queries(3, 1, 4, 1, 3, 2, 32, torch.float32)
        seen = []
        real = attn_mod.ragged_attention_triton

        def spy(*a, **kw):
            seen.append(1)
            return real(*a, **kw)

        monkeypatch.setattr(attn_mod, "ragged_attention_triton", spy)
        out = ragged_attention(q, prefix, ak, av)
        assert seen == [1]
        assert rel_err(out, ragged_attention_torch(q, prefix, ak, av)) < 2e-6


_N_INTERP = len(KERNEL_CASES) + 3 + 1 + 24 + 3 + 16 + 1 + 1


@pytest.mark.skipif(not _HAS_TRITON, reason="triton not installed")
@pytest.mark.skipif(_INTERP, reason="the interpreter cases already run in this process")
def test_triton_kernels_under_interpreter():
    """Run the test_interp_* cases in a child pytest with the interpreter enabled from the start."""
    run_interpreter_child(__file__, _CHILD_ENV, _N_INTERP)


# ----------------------------------------------------------------------------------------------
# 4-bit centroids by byte permutes (inline PTX, GPU only)
# ----------------------------------------------------------------------------------------------


def _prmt(a: int, b: int, sel: int) -> int:
    """PTX prmt.b32 d, a, b, c in its default mode (PTX ISA: byte k of d is byte c[4k+2:4k] of the 8 bytes
    {b, a}, a's bytes first; bit 4k+3 replicates that byte's sign bit instead)."""
    src = (b << 32) | a
    out = 0
    for k in range(4):
        nib = (sel >> (4 * k)) & 0xF
        byte = (src >> (8 * (nib & 7))) & 0xFF
        if nib & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * k)
    return out


def _run_lut_asm(asm: str, regs: dict) -> dict:
    """Executes the and/or/shr/prmt lines of `_LUT4_ASM` on 32-bit Python ints."""
    import re
    regs = dict(regs)

    def val(tok):
        tok = tok.strip()
        return int(tok, 16) if tok.startswith("0x") else (int(tok) if tok.isdigit() else regs[tok])

    for line in asm.splitlines():
        m = re.match(r"\s*(and|or|shr|prmt)\.b32\s+([^,]+),(.*);", line)
        if not m:
            continue
        op, dst, args = m.group(1), m.group(2).strip(), [val(t) for t in m.group(3).split(",")]
        if op == "and":
            r = args[0] & args[1]
        elif op == "or":
            r = args[0] | args[1]
        elif op == "shr":
            r = args[0] >> args[1]
        else:
            r = _prmt(args[0], args[1], args[2])
        regs[dst] = r & 0xFFFFFFFF
    return regs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lut4_asm_looks_up_every_code(dtype):
    """The PTX of `_lut4`, executed line by line by a prmt model written from the PTX ISA, maps every packed code
    pair to the centroids rounded to the 16-bit dtype; the table words built as `_lut_words` documents them."""
    cent = torch.linspace(-2.7, 2.9, 16) ** 3  # distinct, non-uniform, both signs
    bits = [int(v) & 0xFFFF for v in cent.to(dtype).view(torch.int16).tolist()]
    words = [sum(((bits[4 * w + k] >> sh) & 0xFF) << (8 * k) for k in range(4)) for sh in (0, 8) for w in range(4)]
    g = np.random.default_rng(0)
    for _ in range(200):
        codes = g.integers(0, 16, 8)
        packed = sum(int(codes[2 * k] | codes[2 * k + 1] << 4) << (8 * k) for k in range(4))
        regs = {"$4": packed}
        for i, w in enumerate(words):  # operand 5 + 4i (each 32-bit splat operand comes 4 times)
            regs.update({f"${5 + 4 * i + j}": w for j in range(4)})
        out = _run_lut_asm(str(attn_mod._LUT4_ASM).replace("{\n", "\n").rsplit("}", 1)[0], regs)
        halves = [(out[f"${r}"] >> (16 * k)) & 0xFFFF for r in range(4) for k in range(2)]
        even, odd = halves[:4], halves[4:]  # $0, $1: codes 0, 2, 4, 6; $2, $3: codes 1, 3, 5, 7
        assert even == [bits[c] for c in codes[0::2]]
        assert odd == [bits[c] for c in codes[1::2]]


@pytest.mark.skipif(not (_HAS_TRITON and torch.cuda.is_available()), reason="needs triton and a CUDA GPU")
@pytest.mark.parametrize("label,qdtype", [("K4V4", torch.bfloat16), ("K4V4", torch.float16), ("K4V2", torch.bfloat16),
                                          ("K3V4", torch.bfloat16), ("K4V4", torch.float32)])
@pytest.mark.parametrize("Lq", [1, 70])
def test_cuda_lut_and_hadamard_paths(label, qdtype, Lq, monkeypatch):
    """On the GPU: 4-bit centroids by byte permutes give the select chain's outputs (both round the float32
    centroids to the queries' dtype), and the Hadamard rotations made in registers agree with the float32
    products of the stored R (float32 queries: the three-part bf16 split of the query rotation, no byte
    permutes); each against the reference."""
    monkeypatch.setattr(attn_mod, "_alloc", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                      device=device))
    d, lens, G, B = 128, [300, 0, 1, 77], 4, 2
    arrays, attrs, books = stored(label, lens, d, seed=Lq, stored_dtype="bfloat16")
    prefix = RaggedPrefix.from_stored(arrays, attrs, books, d).to("cuda")
    q, ak, av, mask = (t.cuda() for t in make_queries(sum(lens) + Lq, B, 4 * G, Lq, Lq + 9, 4, d, qdtype, pad=True))
    ref = ragged_attention_torch(q, prefix, ak, av, mask)
    outs = {}
    for lut, had in ((True, True), (False, True), (False, False)):
        monkeypatch.setattr(attn_mod, "_LLOYD_LUT", lut)
        monkeypatch.setattr(attn_mod, "_HADAMARD", had)
        outs[lut, had] = ragged_attention_triton(q, prefix, ak, av, mask)
        assert torch.isfinite(outs[lut, had]).all()
        assert rel_err(outs[lut, had], ref) < 2e-2
    assert rel_err(outs[True, True], outs[False, True]) < 1e-5
    assert rel_err(outs[False, True], outs[False, False]) < 5e-3


@pytest.mark.skipif(not _HAS_TRITON, reason="triton not installed")
@pytest.mark.skipif(_INTERP, reason="compiles for the GPU: runs in the parent process")
def test_launcher_tiles_compile_for_sm90():
    """The tiles the launcher picks compile for an H100 (sm_90) with the installed triton and fit its shared memory:
    no GPU needed. 4-bit lloyd codes (byte-permute centroids for 16-bit queries) at d = 32/64/128 for decode, decode
    of 8 sequences, prefill of 2 sequences and of one (fused merge), with bf16 and float32 queries; q4_0 and raw
    with float32 queries. Triton 3.6-3.9 fail on d = 32 with 128-key byte-permute blocks at 4 warps, and on
    64-row float32 tiles of sub-byte codes, which the launcher must therefore not pick (both found on the GPU)."""
    spec = importlib.util.spec_from_file_location(
        "check_ragged_compile", str(__import__("pathlib").Path(__file__).parents[1] / "benchmarks" /
                                    "check_ragged_compile.py"))
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    cases = [(qty, "K4V4", d, shape) for qty in ("bf16", "fp32") for d in (32, 64, 128)
             for shape in ((1, 4, 1), (8, 4, 1), (2, 2, 10), (1, 4, 70))]
    cases += [("fp32", label, 128, (1, 4, 70)) for label in ("q4_0", "16")]
    for qty, label, d, (B, G, Lq) in cases:
        name, args = check.partial_variant(qty, label, d, B, G, Lq, Lq + 5, B > 1)
        if label == "K4V4":
            assert args[2]["LUT"] == (qty == "bf16") and args[2]["K_HAD"], name
        kernel = check.compile_one(*args)  # raises when the compiler fails
        assert kernel.metadata.shared <= check.SHARED_LIMIT, f"{name}: {kernel.metadata.shared} B of shared memory"
