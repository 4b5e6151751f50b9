"""attention_stats: the torch reference and the Triton kernels against a dense float64 reference.

The Triton kernels run under the interpreter (TRITON_INTERPRET=1) on CPU. triton.jit picks compiled vs
interpreted when a function is decorated, including triton's own library functions (tl.zeros, tl.max, ...)
decorated when triton is first imported. So the interpreter cases (`test_interp_*`) run in this process
only when triton was imported in interpreter mode; otherwise `test_triton_kernels_under_interpreter`
re-runs them in a child pytest with TRITON_INTERPRET=1 and COMPACTOR_TRITON=1 set before anything
imports triton. Either way one plain `pytest tests/` run covers them.
"""

import importlib
import importlib.util

import pytest
import torch
from triton_interp import HAS_TRITON, interpreter_active, run_interpreter_child

stats_mod = importlib.import_module("compactor.kernels.attention_stats")
from compactor.kernels import AttentionStats, attention_stats, attention_stats_torch, attention_stats_triton  # noqa: E402

_HAS_TRITON = HAS_TRITON
_CHILD_ENV = "COMPACTOR_ATTN_STATS_CHILD"  # set in the child: interpreter tests must run, never skip
_INTERP = interpreter_active(_CHILD_ENV)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def dense_reference(q, k, v, scale, query_pos=None):
    """Materialise the n x T matrix in float64 (inputs upcast exactly from their dtype)."""
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(1, 2) * scale  # (B, n, T)
    T = k.shape[1]
    if query_pos is not None:
        qp = query_pos if query_pos.dim() == 2 else query_pos[None]
        hidden = torch.arange(T)[None, None, :] > qp.to(torch.int64)[..., None]
        s = s.masked_fill(hidden, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    return AttentionStats(p @ v, lse, p.square().mean(dim=1).sqrt(), p.amax(dim=1))


def make_inputs(seed, B, n, T, d, dtype, qpos_kind):
    g = torch.Generator().manual_seed(seed)
    # queries with a few large-norm rows so some softmaxes are peaked
    q = torch.randn(B, n, d, generator=g) * (1.0 + 2.0 * torch.rand(B, n, 1, generator=g))
    k = torch.randn(B, T, d, generator=g)
    v = torch.randn(B, T, d, generator=g)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if qpos_kind is None:
        qpos = None
    elif qpos_kind == "batched":  # (B, n): random positions, some beyond T-1 (= all keys visible)
        qpos = torch.randint(0, T + 8, (B, n), generator=g)
        qpos[:, 0] = 0  # a query that sees only key 0
    elif qpos_kind == "boundary":  # (B, n): positions on / next to the 16- and 32-key tile edges
        edges = torch.tensor([0, 1, 15, 16, 30, 31, 32, 33, 47, 48, 62, 63, 64, 94, 95, 96, 126, 127, 128])
        edges = edges[edges < T]
        qpos = edges[torch.randint(0, len(edges), (B, n), generator=g)]
        qpos = torch.sort(qpos, dim=1).values  # sorted: whole query tiles share one boundary
    elif qpos_kind == "shared":  # (n,): sorted causal positions of the queries, like context queries
        qpos = torch.sort(torch.randint(0, T, (n,), generator=g)).values.to(torch.int32)
    else:
        raise AssertionError(qpos_kind)
    return q, k, v, qpos


def assert_matches(got, ref, dtype, shapes):
    B, n, T, d = shapes
    assert isinstance(got, AttentionStats)
    expected_shapes = dict(out=(B, n, d), lse=(B, n), p_rms=(B, T), p_max=(B, T))
    for name in AttentionStats._fields:
        g, r = getattr(got, name), getattr(ref, name)
        assert tuple(g.shape) == expected_shapes[name], name
        assert g.dtype == torch.float32, name
        assert torch.isfinite(g).all(), f"{name}: non-finite entries (unwritten or NaN)"
        if dtype == torch.float32:
            rtol = 1e-5
        elif name == "out":  # p is rounded to the 16-bit input dtype for p @ v, as on the GPU
            rtol = 1e-2
        else:  # scores are exact products of the 16-bit inputs, accumulated in float32
            rtol = 1e-4
        scale = r.abs().max().item()
        torch.testing.assert_close(g.double(), r, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: {m}")
        rel_l2 = ((g.double() - r).norm() / r.norm()).item()
        assert rel_l2 < rtol, f"{name}: relative L2 error {rel_l2:.2e}"


CASES = [
    (n, T, d, qpos_kind, dtype)
    for n in (37, 64)
    for T in (50, 130)
    for d in (64, 128)
    for qpos_kind in (None, "batched", "shared", "boundary")
    for dtype in (torch.float32, torch.bfloat16)
    if not (qpos_kind == "boundary" and dtype != torch.float32)
]


def _case_id(c):
    n, T, d, qpos_kind, dtype = c
    return f"n{n}-T{T}-d{d}-{qpos_kind or 'full'}-{str(dtype).split('.')[-1]}"


def _seed(c):
    n, T, d, qpos_kind, dtype = c
    return 1000 * n + 10 * T + d + (0 if qpos_kind is None else len(qpos_kind)) + (7 if dtype == torch.bfloat16 else 0)


# ----------------------------------------------------------------------------------------------
# torch reference (runs everywhere)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_torch_reference_matches_dense(case, monkeypatch):
    n, T, d, qpos_kind, dtype = case
    monkeypatch.setattr(stats_mod, "_TORCH_CHUNK", 16)  # several query chunks per problem
    q, k, v, qpos = make_inputs(_seed(case), 2, n, T, d, dtype, qpos_kind)
    scale = d**-0.5
    got = attention_stats_torch(q, k, v, scale, qpos)
    assert_matches(got, dense_reference(q, k, v, scale, qpos), torch.float32, (2, n, T, d))


def test_torch_reference_float16_and_tiny_shapes():
    for (B, n, T, d) in [(1, 1, 1, 8), (3, 1, 5, 16), (2, 5, 1, 64)]:
        q, k, v, _ = make_inputs(B + n + T + d, B, n, T, d, torch.float16, None)
        got = attention_stats_torch(q, k, v, 0.3)
        assert_matches(got, dense_reference(q, k, v, 0.3), torch.float32, (B, n, T, d))


def test_query_pos_semantics():
    q, k, v, _ = make_inputs(5, 2, 20, 30, 64, torch.float32, None)
    full = attention_stats_torch(q, k, v, 0.125)
    beyond = attention_stats_torch(q, k, v, 0.125, torch.full((20,), 29))  # >= T-1: everything visible
    far = attention_stats_torch(q, k, v, 0.125, torch.full((2, 20), 10**6, dtype=torch.int64))
    for a, b, c in zip(full, beyond, far):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    # query_pos = 0: each query sees only key 0 -> out = v_0, lse = s_00, p = 1 on key 0
    zero = attention_stats_torch(q, k, v, 0.125, torch.zeros(2, 20, dtype=torch.int32))
    torch.testing.assert_close(zero.out, v[:, :1].expand(2, 20, 64))
    torch.testing.assert_close(zero.lse, (q @ k[:, 0, :, None]).squeeze(-1) * 0.125)
    assert torch.equal(zero.p_max[:, 0], torch.ones(2)) and torch.equal(zero.p_rms[:, 0], torch.ones(2))
    assert not zero.p_max[:, 1:].any() and not zero.p_rms[:, 1:].any()
    # (n,) and its (B, n) expansion agree; scale=None means d**-0.5
    pos = torch.arange(20) + 5
    a = attention_stats_torch(q, k, v, None, pos)
    b = attention_stats_torch(q, k, v, 64**-0.5, pos.expand(2, 20).clone())
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("fn", [attention_stats_torch, attention_stats_triton, attention_stats], ids=lambda f: f.__name__)
def test_bad_inputs_raise_value_error(fn):
    q, k, v, _ = make_inputs(9, 2, 8, 12, 64, torch.float32, None)
    bad = [
        dict(query_pos=torch.tensor([0, 1, -1, 2, 3, 4, 5, 6])),  # negative position
        dict(query_pos=torch.zeros(8, dtype=torch.float32)),  # not an integer tensor
        dict(query_pos=torch.zeros(2, 7, dtype=torch.int64)),  # wrong n
        dict(query_pos=torch.zeros(3, 8, dtype=torch.int64)),  # wrong B
        dict(query_pos=torch.zeros(2, 8, 1, dtype=torch.int64)),  # wrong rank
        dict(keys=k[:, :10]),  # keys / values length mismatch
        dict(keys=k[:1], values=v[:1]),  # batch mismatch
        dict(keys=k[..., :32], values=v[..., :32]),  # head-dim mismatch
        dict(values=v.to(torch.bfloat16)),  # dtype mismatch
        dict(queries=q[0]),  # not 3-D
        dict(queries=q.double(), keys=k.double(), values=v.double()),  # unsupported dtype
    ]
    for override in bad:
        args = dict(queries=q, keys=k, values=v, scale=0.125, query_pos=None)
        args.update(override)
        with pytest.raises(ValueError):
            fn(**args)


@pytest.mark.skipif(not _HAS_TRITON, reason="triton not installed")
def test_triton_rejects_unsupported_head_dim_and_blocks():
    for d in (96, 8, 512):
        q, k, v, _ = make_inputs(3, 1, 4, 6, d, torch.float32, None)
        with pytest.raises(ValueError, match="head dims"):
            attention_stats_triton(q, k, v, d**-0.5)
    q, k, v, _ = make_inputs(3, 1, 4, 6, 64, torch.float32, None)
    for kw in (dict(block_m=24), dict(block_n=8)):
        with pytest.raises(ValueError, match="power of two"):
            attention_stats_triton(q, k, v, 0.125, **kw)


def test_dispatch_cpu_uses_torch(monkeypatch):
    q, k, v, _ = make_inputs(4, 1, 4, 6, 64, torch.float32, None)
    called = []
    monkeypatch.setattr(stats_mod, "attention_stats_triton", lambda *a, **kw: called.append(1))
    for env in (None, "0"):
        if env is None:
            monkeypatch.delenv("COMPACTOR_TRITON", raising=False)
        else:
            monkeypatch.setenv("COMPACTOR_TRITON", env)
        res = attention_stats(q, k, v, 0.125)
        assert isinstance(res, AttentionStats) and not called


# ----------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (in this process when possible, else in a child pytest)
# ----------------------------------------------------------------------------------------------


def _poison(monkeypatch):
    monkeypatch.setattr(
        stats_mod, "_alloc_output", lambda shape, device: torch.full(shape, float("nan"), device=device)
    )


if _INTERP:  # defined only where they can run; otherwise the child pytest below runs them

    @pytest.mark.parametrize("case", CASES, ids=_case_id)
    def test_interp_triton_matches_dense(case, monkeypatch):
        """Small tiles (16 queries x 32 keys) so every case has several blocks, ragged tails and, with
        query_pos, the causal-boundary paths of both kernels."""
        n, T, d, qpos_kind, dtype = case
        _poison(monkeypatch)
        q, k, v, qpos = make_inputs(_seed(case), 2, n, T, d, dtype, qpos_kind)
        scale = d**-0.5
        got = attention_stats_triton(q, k, v, scale, qpos, block_m=16, block_n=32)
        assert_matches(got, dense_reference(q, k, v, scale, qpos), dtype, (2, n, T, d))

    @pytest.mark.parametrize(
        "B,n,T,d,qpos_kind,dtype",
        [
            (2, 37, 130, 128, "batched", torch.bfloat16),
            (2, 64, 130, 64, "shared", torch.float32),
            (1, 200, 70, 64, None, torch.float16),
            (3, 1, 1, 64, None, torch.float32),
            (1, 3, 300, 32, "batched", torch.float32),
            (1, 20, 40, 16, "shared", torch.bfloat16),
            (1, 40, 70, 256, "batched", torch.float32),
        ],
    )
    def test_interp_triton_default_blocks_and_other_shapes(B, n, T, d, qpos_kind, dtype, monkeypatch):
        """The launcher's default (Hopper) tile sizes, float16, 1-row/1-key problems, d in {16, 32, 256}."""
        _poison(monkeypatch)
        q, k, v, qpos = make_inputs(B * 7 + n + T + d, B, n, T, d, dtype, qpos_kind)
        got = attention_stats_triton(q, k, v, d**-0.5, qpos)
        assert_matches(got, dense_reference(q, k, v, d**-0.5, qpos), dtype, (B, n, T, d))

    def test_interp_triton_strided_inputs(monkeypatch):
        """Non-contiguous batch/row strides (views into a larger cache) are read in place."""
        _poison(monkeypatch)
        g = torch.Generator().manual_seed(11)
        big_q = torch.randn(4, 50, 2, 64, generator=g)
        big_kv = torch.randn(2, 3, 90, 64, generator=g)
        q = big_q[::2, :, 1]  # (2, 50, 64), strides (6400, 128, 1)
        k, v = big_kv[0, 1:], big_kv[1, :2]  # (2, 90, 64)
        qpos = torch.arange(50).expand(2, 50) * 2
        got = attention_stats_triton(q, k, v, 0.1, qpos, block_m=32, block_n=16)
        assert_matches(got, dense_reference(q, k, v, 0.1, qpos), torch.float32, (2, 50, 90, 64))

    def test_interp_dispatcher_routes_to_triton(monkeypatch):
        monkeypatch.setenv("COMPACTOR_TRITON", "1")
        q, k, v, qpos = make_inputs(21, 2, 10, 20, 64, torch.float32, "batched")
        seen = []
        real = stats_mod.attention_stats_triton

        def spy(*a, **kw):
            seen.append(1)
            return real(*a, **kw)

        monkeypatch.setattr(stats_mod, "attention_stats_triton", spy)
        got = attention_stats(q, k, v, 0.125, qpos)
        assert seen == [1]
        assert_matches(got, dense_reference(q, k, v, 0.125, qpos), torch.float32, (2, 10, 20, 64))


@pytest.mark.skipif(not _HAS_TRITON, reason="triton not installed")
@pytest.mark.skipif(_INTERP, reason="the interpreter cases already run in this process")
def test_triton_kernels_under_interpreter():
    """Run the test_interp_* cases in a child pytest with the interpreter enabled from the start."""
    run_interpreter_child(__file__, _CHILD_ENV, len(CASES) + 7 + 2)


# ----------------------------------------------------------------------------------------------
# compiled Triton on a real GPU (skipped where there is none, e.g. CI)
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(not (torch.cuda.is_available() and _HAS_TRITON), reason="needs a CUDA device and triton")
@pytest.mark.parametrize("case", CASES + [(700, 1500, 128, "shared", torch.bfloat16),
                                          (513, 2049, 64, "batched", torch.float16)], ids=_case_id)
def test_compiled_triton_matches_dense_on_cuda(case, monkeypatch):
    n, T, d, qpos_kind, dtype = case
    monkeypatch.setenv("COMPACTOR_TF32", "0")  # 3xTF32 for float32 inputs: IEEE-level accuracy
    q, k, v, qpos = make_inputs(_seed(case), 3, n, T, d, dtype, qpos_kind)
    ref = dense_reference(q, k, v, d ** -0.5, qpos)
    got = attention_stats(q.cuda(), k.cuda(), v.cuda(), d ** -0.5, None if qpos is None else qpos.cuda())
    assert_matches(AttentionStats(*(x.cpu() for x in got)), ref, dtype, (3, n, T, d))
