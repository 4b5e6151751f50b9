import pytest
import torch

from compactor.quant.bitpack import unpack_bits
from compactor.quant.hadamard import make_rotation
from compactor.quant.lloyd_codec import lloyd_decode, lloyd_encode
from compactor.quant.lloyd_max import beta_codebook, empirical_codebook


def _gauss(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _rel_mse(x_hat, x):
    return ((x_hat - x).pow(2).sum() / x.pow(2).sum()).item()


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_norm_scale_mse_matches_codebook(d, bits):
    # With the plain norm as gain the relative error is the codebook's expected unit-vector MSE.
    x = _gauss(2048, d, seed=bits)
    err = _rel_mse(lloyd_decode(lloyd_encode(x, bits, scale="norm")), x)
    assert err == pytest.approx(d * beta_codebook(bits, d).mse, rel=0.03)


@pytest.mark.parametrize("bits", [1, 2, 4, 6, 8])
def test_optimal_gain_beats_norm_and_unit_rescaling(bits):
    d = 128
    x = _gauss(2048, d, seed=10 + bits, dtype=torch.float64)
    plain, opt = lloyd_encode(x, bits, scale="norm"), lloyd_encode(x, bits)
    e_plain, e_opt = _rel_mse(lloyd_decode(plain), x), _rel_mse(lloyd_decode(opt), x)
    # the alternative the brief asked about: rescale the decoded unit vector to norm 1
    y_hat = beta_codebook(bits, d).centroids[unpack_bits(plain.packed, bits, d).long()]
    unit = make_rotation(d, 0).inverse(y_hat / y_hat.norm(dim=-1, keepdim=True)) * plain.gains.double()[:, None]
    e_unit = _rel_mse(unit, x)
    assert e_opt <= e_plain and e_opt <= e_unit * (1 + 1e-3)
    assert e_opt == pytest.approx(e_plain, rel=0.06)  # a few percent, not a different regime
    assert torch.equal(opt.packed, plain.packed)  # only the gain differs


def test_nbytes_by_hand_and_shapes():
    x = _gauss(3, 50, 96, seed=1)  # 96 is not a power of two: QR rotation
    code = lloyd_encode(x, 3)
    assert code.packed.shape == (3, 50, 36) and code.gains.shape == (3, 50) and code.gains.dtype == torch.float16
    assert code.nbytes == 150 * 36 + 150 * 2  # ceil(96·3/8) = 36 code bytes + fp16 gain per vector
    centered = lloyd_encode(x, 3, center=True)
    assert centered.mean.shape == (3, 96) and centered.mean.dtype == torch.float16
    assert centered.nbytes == 150 * 36 + 150 * 2 + 3 * 96 * 2
    cb = empirical_codebook(torch.randn(5000) * 0.1, 3, dim=96)
    assert lloyd_encode(x, 3, center=True, codebook=cb).nbytes == 150 * 38 + 3 * 96 * 2 + 8 * 4
    huge = lloyd_encode(x + 1e5, 3, center=True)  # a mean beyond fp16's range stays float32
    assert huge.mean.dtype == torch.float32 and huge.nbytes == 150 * 38 + 3 * 96 * 4
    assert lloyd_encode(_gauss(7, 128), 5).nbytes == 7 * (80 + 2)
    assert lloyd_decode(code).shape == x.shape and lloyd_decode(code).dtype == torch.float32


def test_mean_centering_removes_shared_bias():
    # Qwen2-like keys: a huge per-channel bias shared by all tokens.
    noise = _gauss(2, 256, 64, seed=3)
    bias = torch.zeros(2, 1, 64)
    bias[:, :, :4] = torch.tensor([150.0, -80.0, 40.0, 220.0])
    x = noise + bias
    plain = lloyd_decode(lloyd_encode(x, 4))
    centered = lloyd_decode(lloyd_encode(x, 4, center=True))
    e_plain = (plain - x).pow(2).sum().item()
    e_centered = (centered - x).pow(2).sum().item()
    resid = x - x.mean(-2, keepdim=True)
    assert e_centered / resid.pow(2).sum().item() < 1.1 * 64 * beta_codebook(4, 64).mse
    assert e_centered < e_plain / 50
    # the fp16 mean rounds 150 + noise by up to 0.06, but the codes carry that remainder: the error matches
    # coding around the float32 mean to within a percent
    code = lloyd_encode(x, 4, center=True)
    assert code.mean.dtype == torch.float16 and (x.mean(-2) - code.mean.float()).abs().max() > 1e-3
    mean32 = x.mean(-2, keepdim=True)
    e_ref = (lloyd_decode(lloyd_encode(x - mean32, 4)) + mean32 - x).pow(2).sum().item()
    assert abs(e_centered / e_ref - 1) < 0.01


def test_round_trip_properties():
    for d in (64, 96):
        x = _gauss(2, 3, 17, d, seed=d)
        code = lloyd_encode(x, 8, seed=5)
        assert _rel_mse(lloyd_decode(code), x) < 1.1 * d * beta_codebook(8, d).mse
        assert not torch.equal(code.packed, lloyd_encode(x, 8, seed=6).packed)  # the seed matters
    z = torch.zeros(4, 64)
    assert torch.equal(lloyd_decode(lloyd_encode(z, 2)), z)
    h = _gauss(100, 64, seed=4).to(torch.bfloat16)
    assert _rel_mse(lloyd_decode(lloyd_encode(h, 4)), h.float()) < 0.011


def test_empirical_codebook_from_calibration():
    # Calibrate on rotated unit vectors of other data, then encode with the fitted codebook.
    d = 64
    rot = make_rotation(d, 0)
    cal = _gauss(3000, d, seed=7)
    y = rot.apply(cal / cal.norm(dim=-1, keepdim=True))
    cb = empirical_codebook(y, 3, dim=d)
    x = _gauss(2000, d, seed=8)
    code = lloyd_encode(x, 3, codebook=cb, scale="norm")
    assert code.centroids is not None and code.centroids.dtype == torch.float32
    assert _rel_mse(lloyd_decode(code), x) == pytest.approx(d * beta_codebook(3, d).mse, rel=0.03)


def test_bad_inputs():
    x = _gauss(8, 64)
    for bits in (0, 9, 1.5):
        with pytest.raises(ValueError, match="bits"):
            lloyd_encode(x, bits)
    with pytest.raises(ValueError, match="head dim 128"):
        lloyd_encode(x, 3, codebook=beta_codebook(3, 128))
    with pytest.raises(ValueError, match="head dim None"):
        lloyd_encode(x, 3, codebook=empirical_codebook(torch.randn(1000), 3))
    with pytest.raises(ValueError, match="need 16"):
        lloyd_encode(x, 4, codebook=beta_codebook(3, 64))
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[3, 5] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            lloyd_encode(y, 3)
    with pytest.raises(ValueError, match="overflows fp16"):
        lloyd_encode(torch.full((2, 64), 1e4), 3)
    with pytest.raises(ValueError, match="scale"):
        lloyd_encode(x, 3, scale="unit")
    with pytest.raises(ValueError, match=r"\(\.\.\., n, d\)"):
        lloyd_encode(torch.zeros(64), 3, center=True)
