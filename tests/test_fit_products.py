"""fit_products: the torch references against dense float64, and the Triton kernels (interpreter) against them.

As in test_attention_stats.py, the `test_interp_*` cases run in this process only when triton was imported with
TRITON_INTERPRET=1; otherwise `test_fit_kernels_under_interpreter` runs them in a child pytest. Sizes are small
(the interpreter is slow) but every case has several tiles, ragged tails and padded keys.
"""
import importlib
import importlib.util

import pytest
import torch
from triton_interp import HAS_TRITON, interpreter_active, run_interpreter_child

fp = importlib.import_module("compactor.kernels.fit_products")

_HAS_TRITON = HAS_TRITON
_CHILD_ENV = "COMPACTOR_FIT_PRODUCTS_CHILD"  # set in the child: interpreter tests must run, never skip
_INTERP = interpreter_active(_CHILD_ENV)


def problem(seed, B=2, n=70, t=45, d=64, dtype=torch.float32, causal=False):
    """Queries, kept keys (the first lengths[b] of t), full-cache lse over t + 9 keys, positions."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, n, d, generator=g) * (1 + 2 * torch.rand(B, n, 1, generator=g))
    k_all = torch.randn(B, t + 9, d, generator=g)
    q, k_all = q.to(dtype), k_all.to(dtype)
    lse = torch.logsumexp(q.double() @ k_all.double().transpose(1, 2) * d ** -0.5, -1)
    lengths = torch.tensor([t] + [t - 7 * (b + 1) for b in range(B - 1)])
    qpos = kpos = None
    if causal:
        qpos = torch.randint(0, 60, (B, n), generator=g)
        kpos = torch.randint(0, 60, (B, t), generator=g)
    return q, k_all[:, :t].contiguous(), lse.float(), lengths, qpos, kpos


def dense_shares(q, k, lse, scale, lengths, qpos, kpos):
    a = torch.exp(q.double() @ k.double().transpose(1, 2) * scale - lse.double()[..., None])
    keep = torch.arange(k.shape[1])[None, None, :] < lengths[:, None, None]
    if qpos is not None:
        keep = keep & (kpos[:, None, :] <= qpos[:, :, None])
    return torch.where(keep, a, 0.0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_shares_match_dense(causal, dtype, monkeypatch):
    monkeypatch.setattr(fp, "_TORCH_CHUNK", 16)  # several query chunks
    q, k, lse, lengths, qpos, kpos = problem(1, dtype=dtype, causal=causal)
    ref = dense_shares(q, k, lse, 0.125, lengths, qpos, kpos)
    assert float(ref.max()) <= 1 + 1e-6  # a share of the full mass
    for out_dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5), (torch.float16, 2 ** -11)):
        got = fp.mass_shares_torch(q, k, lse, 0.125, lengths, qpos, kpos, out_dtype)
        assert got.dtype == out_dtype
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * 1e-3)
    assert (got[1, :, int(lengths[1]):] == 0).all()  # padded keys carry nothing


def test_torch_products_match_dense():
    g = torch.Generator().manual_seed(2)
    A = torch.rand(3, 50, 40, generator=g).half()
    X, R = torch.randn(3, 40, 7, generator=g), torch.randn(3, 50, 1, generator=g)
    Ad = A.double()
    torch.testing.assert_close(fp.shares_matmul_torch(A, X).double(), Ad @ X.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fp.shares_t_matmul_torch(A, R).double(), Ad.transpose(1, 2) @ R.double(),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fp.shares_t_matmul_torch(A, R, square=True).double(),
                               (Ad * Ad).transpose(1, 2) @ R.double(), rtol=1e-5, atol=1e-5)
    assert fp.shares_matmul_torch(A, X.double()).dtype == torch.float64


def test_bad_inputs_raise_value_error():
    q, k, lse, lengths, qpos, kpos = problem(3)
    bad = [dict(keys=k[:1]), dict(keys=k.double()), dict(lse=lse[:, :5]), dict(lengths=lengths.float()),
           dict(query_pos=qpos if qpos is not None else torch.zeros(2, 70, dtype=torch.int64)),
           dict(out_dtype=torch.bfloat16)]
    for fn in (fp.mass_shares_torch, fp.mass_shares_triton, fp.mass_shares):
        for override in bad:
            args = dict(queries=q, keys=k, lse=lse, scale=0.1, lengths=lengths, query_pos=None, key_pos=None,
                        out_dtype=torch.float16)
            args.update(override)
            with pytest.raises(ValueError):
                fn(**args)
    A = torch.rand(2, 5, 4)
    for fn, x in ((fp.shares_matmul_torch, torch.rand(2, 5, 1)), (fp.shares_t_matmul_torch, torch.rand(2, 4, 1)),
                  (fp.shares_matmul_torch, torch.rand(5, 1))):
        with pytest.raises(ValueError):
            fn(A, x)
    with pytest.raises(ValueError, match="square"):
        fp.shares_t_matmul_torch(A, torch.rand(2, 5, 3), square=True)


def test_dispatch_cpu_uses_torch(monkeypatch):
    calls = []
    for name in ("mass_shares_triton", "shares_matmul_triton", "shares_t_matmul_triton"):
        monkeypatch.setattr(fp, name, lambda *a, **kw: calls.append(1))
    q, k, lse, lengths, _, _ = problem(4)
    for env in (None, "0"):
        if env is None:
            monkeypatch.delenv("COMPACTOR_TRITON", raising=False)
        else:
            monkeypatch.setenv("COMPACTOR_TRITON", env)
        A = fp.mass_shares(q, k, lse, 0.1, lengths)
        fp.shares_matmul(A, torch.rand(2, 45, 3))
        fp.shares_t_matmul(A, torch.rand(2, 70, 1))
    assert not calls


if _INTERP:

    @pytest.mark.parametrize("causal", [False, True])
    @pytest.mark.parametrize("dtype,d", [(torch.float32, 64), (torch.bfloat16, 32), (torch.float16, 16)])
    def test_interp_shares_match_reference(causal, dtype, d):
        q, k, lse, lengths, qpos, kpos = problem(5, d=d, dtype=dtype, causal=causal)
        ref = dense_shares(q, k, lse, d ** -0.5, lengths, qpos, kpos)
        for out_dtype, tol in ((torch.float16, 2 ** -11), (torch.float32, 1e-5)):
            got = fp.mass_shares_triton(q, k, lse, d ** -0.5, lengths, qpos, kpos, out_dtype,
                                        blocks={"BLOCK_M": 16, "BLOCK_N": 16})
            assert got.dtype == out_dtype and torch.isfinite(got).all()
            torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * 1e-3)

    def test_interp_shares_default_tiles_and_strided_inputs():
        q, k, lse, lengths, _, _ = problem(6, B=3, n=150, t=140, d=64)
        q = q.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous batch stride
        ref = dense_shares(q, k, lse, 0.125, lengths, None, None)
        got = fp.mass_shares_triton(q, k, lse, 0.125, lengths)
        torch.testing.assert_close(got.double(), ref, rtol=2 ** -11, atol=1e-6)

    @pytest.mark.parametrize("k", [1, 20])
    @pytest.mark.parametrize("A_dtype", [torch.float16, torch.float32])
    def test_interp_products_match_reference(k, A_dtype):
        g = torch.Generator().manual_seed(7 + k)
        A = torch.rand(2, 70, 45, generator=g).to(A_dtype)
        X, R = torch.randn(2, 45, k, generator=g), torch.randn(2, 70, k, generator=g)
        blocks = {"BLOCK_M": 16, "BLOCK_N": 16}
        ref = fp.shares_matmul_torch(A, X.double())
        got = fp.shares_matmul_triton(A, X, blocks=blocks)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
        for splits in (1, 3):
            ref = fp.shares_t_matmul_torch(A, R.double())
            got = fp.shares_t_matmul_triton(A, R, blocks=blocks, splits=splits)
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
        if k == 1:
            ref = fp.shares_t_matmul_torch(A, R.double(), square=True)
            got = fp.shares_t_matmul_triton(A, R, square=True, blocks=blocks)
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)

    def test_interp_products_default_tiles():
        g = torch.Generator().manual_seed(9)
        A = torch.rand(2, 130, 70, generator=g).half()
        for k in (1, 130):
            X, R = torch.randn(2, 70, k, generator=g), torch.randn(2, 130, k, generator=g)
            torch.testing.assert_close(fp.shares_matmul_triton(A, X).double(), fp.shares_matmul_torch(A, X.double()),
                                       rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(fp.shares_t_matmul_triton(A, R).double(),
                                       fp.shares_t_matmul_torch(A, R.double()), rtol=1e-5, atol=1e-4)

    @pytest.mark.parametrize("with_rows", [False, True])
    @pytest.mark.parametrize("A_dtype", [torch.float16, torch.float32])
    def test_interp_scale_shares_match_float64(with_rows, A_dtype):
        g = torch.Generator().manual_seed(11)
        A = torch.rand(2, 70, 45, generator=g).to(A_dtype)
        A = A.transpose(0, 1).contiguous().transpose(0, 1)  # strided batch: the kernel reads A's strides
        rows = torch.rand(2, 70, generator=g) * 3 if with_rows else None
        cols = 1 / (torch.rand(2, 45, generator=g) + 0.5)
        ref = A.double() * cols.double()[:, None, :]
        if with_rows:
            ref = ref * rows.double()[:, :, None]
        got = fp.scale_shares_triton(A, rows, cols, blocks={"BLOCK_M": 16, "BLOCK_N": 16})
        assert got.dtype == A_dtype and got.shape == A.shape
        tol = 2 ** -11 if A_dtype == torch.float16 else 1e-6
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=0)
        torch.testing.assert_close(fp.scale_shares_torch(A, rows, cols).double(), ref, rtol=tol, atol=0)

    @pytest.mark.parametrize("has_rs,has_cs", [(False, False), (True, True)])
    def test_interp_cg_step_matches_float64(has_rs, has_cs):
        """cg_dot, cg_update and cg_direction against the same step written out in float64."""
        g = torch.Generator().manual_seed(12)
        B, t, k = 2, 45, 20
        Qh = torch.randn(B, t, k, generator=g).half()
        sq, dg = torch.rand(B, k, generator=g) + 0.5, torch.rand(B, t, generator=g)
        rs = torch.rand(B, t, generator=g) + 0.5 if has_rs else None
        cs = torch.rand(B, t, generator=g) + 0.5 if has_cs else None
        D, Y, R = (torch.randn(B, t, k, generator=g) for _ in range(3))
        minv = torch.rand(B, t, generator=g) * (torch.rand(B, t, generator=g) > 0.2)  # 0 off the solved rows
        alpha, beta = torch.randn(B, k, generator=g), torch.rand(B, k, generator=g)
        sigma = torch.rand(B, k, generator=g) + 1.0
        blocks = {"BLOCK_T": 16, "BLOCK_K": 16}
        dd = lambda x: None if x is None else x.double()  # noqa: E731
        Q = Qh.double() * sq.double()[:, None, :] * (1 if rs is None else dd(rs)[:, :, None]) + dd(dg)[:, :, None] * dd(D)
        torch.testing.assert_close(fp.cg_dot_triton(Qh, sq, rs, dg, D, blocks=blocks).double(), (dd(D) * Q).sum(1),
                                   rtol=1e-5, atol=1e-5)
        Y_ref = dd(Y) + dd(alpha)[:, None, :] * dd(D)
        R_ref = torch.where(minv[:, :, None] > 0, dd(R) - dd(alpha)[:, None, :] * Q, 0.0)
        Z = dd(minv)[:, :, None] * R_ref
        rz_ref = (R_ref * Z).sum(1)
        zmax_ref = (Z * (1 if cs is None else dd(cs)[:, :, None])).abs().amax(1)
        Y1, R1 = Y.clone(), R.clone()
        rz, zmax = fp.cg_update_triton(Qh, sq, rs, dg, D, Y1, R1, alpha, minv, cs, blocks=blocks)
        for got, ref in ((Y1, Y_ref), (R1, R_ref), (rz, rz_ref), (zmax, zmax_ref)):
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
        Y2, R2 = Y.clone(), R.clone()  # the torch reference agrees too
        for got, ref in zip(fp.cg_update_torch(Qh, sq, rs, dg, D, Y2, R2, alpha, minv, cs), (rz_ref, zmax_ref)):
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(R2.double(), R_ref, rtol=1e-5, atol=1e-5)
        D_ref = dd(minv)[:, :, None] * R_ref + dd(beta)[:, None, :] * dd(D)
        Ds_ref = D_ref * (1 if cs is None else dd(cs)[:, :, None])
        D1 = D.clone()
        out, dmax = fp.cg_direction_triton(R1, D1, minv, beta, sigma, cs, blocks=blocks)
        assert out.dtype == torch.float16
        torch.testing.assert_close(D1.double(), D_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.double(), Ds_ref / dd(sigma)[:, None, :], rtol=2 ** -10, atol=1e-4)
        torch.testing.assert_close(dmax.double(), Ds_ref.abs().amax(1), rtol=1e-5, atol=1e-5)

    def test_interp_dispatcher_routes_to_triton(monkeypatch):
        monkeypatch.setenv("COMPACTOR_TRITON", "1")
        seen = []
        real = fp.shares_matmul_triton
        monkeypatch.setattr(fp, "shares_matmul_triton", lambda *a, **kw: seen.append(1) or real(*a, **kw))
        A = torch.rand(1, 20, 16).half()
        fp.shares_matmul(A, torch.rand(1, 16, 1))
        assert seen == [1]


@pytest.mark.skipif(not _HAS_TRITON, reason="triton not installed")
@pytest.mark.skipif(_INTERP, reason="the interpreter cases already run in this process")
def test_fit_kernels_under_interpreter():
    """Run the test_interp_* cases in a child pytest with the interpreter enabled from the start."""
    run_interpreter_child(__file__, _CHILD_ENV, 19)


@pytest.mark.skipif(not (torch.cuda.is_available() and _HAS_TRITON), reason="needs a CUDA device and triton")
def test_compiled_kernels_match_reference_on_cuda():
    q, k, lse, lengths, qpos, kpos = problem(8, B=3, n=700, t=333, d=128, dtype=torch.bfloat16, causal=True)
    ref = dense_shares(q, k, lse, 128 ** -0.5, lengths, qpos, kpos)
    A = fp.mass_shares(*(x.cuda() for x in (q, k, lse)), 128 ** -0.5, lengths.cuda(), qpos.cuda(), kpos.cuda())
    torch.testing.assert_close(A.cpu().double(), ref, rtol=2 ** -10, atol=1e-6)
    for kk in (1, 128):
        X, R = torch.randn(3, 333, kk, device="cuda"), torch.randn(3, 700, kk, device="cuda")
        torch.testing.assert_close(fp.shares_matmul(A, X), fp.shares_matmul_torch(A, X), rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(fp.shares_t_matmul(A, R), fp.shares_t_matmul_torch(A, R), rtol=2e-3, atol=2e-3)
    # the scaled copy (on an aligned slot count, as the pipeline pads) and a fused CG step, against the torch code
    A64 = torch.nn.functional.pad(A, (0, 3)).contiguous()[:, :, :336]
    rows, cols = torch.rand(3, 700, device="cuda") * 2, torch.rand(3, 336, device="cuda") + 0.5
    torch.testing.assert_close(fp.scale_shares(A64, rows, cols).double(),
                               fp.scale_shares_torch(A64.double(), rows.double(), cols.double()), rtol=2 ** -10,
                               atol=1e-7)
    g = torch.Generator(device="cuda").manual_seed(3)
    Qh = torch.randn(3, 336, 128, device="cuda", generator=g).half()
    sq, rs, dg, cs = (torch.rand(3, m, device="cuda", generator=g) + 0.5 for m in (128, 336, 336, 336))
    D, Y, R = (torch.randn(3, 336, 128, device="cuda", generator=g) for _ in range(3))
    minv = torch.rand(3, 336, device="cuda", generator=g)
    alpha, beta, sigma = (torch.rand(3, 128, device="cuda", generator=g) + 0.5 for _ in range(3))
    torch.testing.assert_close(fp.cg_dot(Qh, sq, rs, dg, D), fp.cg_dot_torch(Qh, sq, rs, dg, D), rtol=1e-4, atol=1e-3)
    Y1, R1, Y2, R2 = Y.clone(), R.clone(), Y.clone(), R.clone()
    for a, b in zip(fp.cg_update(Qh, sq, rs, dg, D, Y1, R1, alpha, minv, cs),
                    fp.cg_update_torch(Qh, sq, rs, dg, D, Y2, R2, alpha, minv, cs)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(R1, R2, rtol=1e-5, atol=1e-5)
    D1, D2 = D.clone(), D.clone()
    (o1, m1), (o2, m2) = fp.cg_direction(R1, D1, minv, beta, sigma, cs), fp.cg_direction_torch(R2, D2, minv, beta,
                                                                                               sigma, cs)
    torch.testing.assert_close(D1, D2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o1.float(), o2.float(), rtol=2 ** -10, atol=1e-4)
    torch.testing.assert_close(m1, m2, rtol=1e-5, atol=1e-5)
