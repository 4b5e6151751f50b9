import gguf
import numpy as np
import pytest
import torch

from compactor.quant.ggml_blocks import q4_0_decode, q4_0_encode, q8_0_decode, q8_0_encode

Q8, Q4 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0
CODECS = [(q8_0_encode, q8_0_decode, Q8, 34), (q4_0_encode, q4_0_decode, Q4, 18)]


def _inputs():
    rng = np.random.default_rng(0)
    out = []
    for scale in (1e-3, 1.0, 30.0, 1e3):
        x = (rng.standard_normal((6, 256)) * scale).astype(np.float32)
        x[0, :32] = 0.0  # all-zero block (+0.0)
        x[1, :32] = np.round(rng.standard_normal(32) * 3) * scale  # many ties in magnitude
        x[1, 40], x[1, 41] = 5 * scale, -5 * scale  # equal magnitude, opposite sign
        x[2, 64:96] = rng.integers(-127, 128, 32) * np.float32(0.5)  # exact .5 products
        out.append(x + np.float32(0.0))  # -0.0 -> +0.0: an all -0.0 block is tested on its own below
    out.append(rng.standard_t(2, size=(3, 2, 64)).astype(np.float32))  # heavy tails, 3-D
    return out


@pytest.mark.parametrize("enc,dec,qtype,nb", CODECS)
def test_matches_gguf_bytes_and_values(enc, dec, qtype, nb):
    for x in _inputs():
        ref = gguf.quants.quantize(x, qtype)
        mine = enc(torch.from_numpy(x))
        assert mine.dtype == torch.uint8 and mine.shape == (*x.shape[:-1], x.shape[-1] // 32 * nb)
        np.testing.assert_array_equal(mine.numpy(), ref)
        np.testing.assert_array_equal(dec(mine).numpy(), gguf.quants.dequantize(ref, qtype))


def test_q8_0_documented_bytes():
    # amax 127 -> d = 1.0 (fp16 0x3C00, little-endian 00 3c); roundf rounds halves away from 0.
    x = torch.zeros(32)
    x[:9] = torch.tensor([127, -127, 2.5, -2.5, 0.5, -0.5, 1.49, -1.5, 3.0])
    expected = "003c" + "7f8103fd01ff01fe03" + "00" * 23
    assert q8_0_encode(x).numpy().tobytes().hex() == expected
    assert q8_0_encode(torch.zeros(32)).numpy().tobytes().hex() == "00" * 34
    np.testing.assert_array_equal(q8_0_decode(q8_0_encode(x)).numpy()[:9], [127, -127, 3, -3, 1, -1, 1, -2, 3])


def test_q4_0_documented_bytes():
    # max = -8 -> d = 1.0 (00 3c); q = min(15, trunc(x + 8.5)); byte j = q[j] | q[j+16] << 4.
    lo = [-8, 7, 7.6, 0, 0.4, 0.5, -0.5, -0.6, 3, -3, 1, 2, -1, -2, 6.5, -7.5]
    hi = [0] * 8 + [1, 2, 3, 4, 5, 6, 7, -7]
    x = torch.tensor(lo + hi, dtype=torch.float32)
    assert q4_0_encode(x).numpy().tobytes().hex() == "003c" + "808f8f8888898887" + "9ba5b9cad7e6ff11"
    # Tie 8 / -8: the first one wins, max = +8, d = -1.0 (00 bc); 8 -> 0, -8 -> min(15, 16) = 15.
    y = torch.zeros(32)
    y[0], y[1] = 8.0, -8.0
    assert q4_0_encode(y).numpy().tobytes().hex() == "00bc" + "808f" + "88" * 14
    np.testing.assert_array_equal(q4_0_decode(q4_0_encode(y)).numpy()[:3], [8.0, -7.0, 0.0])
    # All-zero block: max stays +0.0 in the C code, d = 0/-8 = -0.0 -> 00 80.
    assert q4_0_encode(torch.zeros(32)).numpy().tobytes().hex() == "0080" + "88" * 16
    # All -0.0 block: same bytes as ggml-quants.c (gguf's numpy port writes 00 00 here instead).
    assert q4_0_encode(-torch.zeros(32)).numpy().tobytes().hex() == "0080" + "88" * 16


@pytest.mark.parametrize("enc,dec,qtype,nb", CODECS)
def test_bad_inputs(enc, dec, qtype, nb):
    with pytest.raises(ValueError, match="multiple of 32"):
        enc(torch.zeros(4, 48))
    with pytest.raises(ValueError, match="NaN or inf"):
        enc(torch.tensor([float("nan")] + [0.0] * 31))
    with pytest.raises(ValueError, match="NaN or inf"):
        enc(torch.tensor([float("inf")] + [0.0] * 31))
    with pytest.raises(ValueError, match="overflows fp16"):
        enc(torch.full((32,), 1e7))
    with pytest.raises(ValueError, match=f"multiple of {nb}"):
        dec(torch.zeros(nb + 1, dtype=torch.uint8))
