import numpy as np
import pytest
import torch

from compactor.quant.bitpack import pack_bits, packed_size, unpack_bits


def _reference_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Independent reference: explicit LSB-first bit stream, then numpy.packbits(bitorder='little')."""
    stream = (codes[..., :, None] >> np.arange(bits)) & 1  # (..., n, bits), LSB first
    stream = stream.reshape(*codes.shape[:-1], -1).astype(np.uint8)
    return np.packbits(stream, axis=-1, bitorder="little")


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 13, 64, 100])
def test_round_trip_and_reference(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (3, 2, n), generator=g).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 2, (n * bits + 7) // 8) and packed.shape[-1] == packed_size(n, bits)
    np.testing.assert_array_equal(packed.numpy(), _reference_pack(codes.numpy().astype(np.int64), bits))
    out = unpack_bits(packed, bits, n)
    assert out.dtype == torch.uint8 and torch.equal(out, codes)


def test_documented_example():
    # codes [1, 2, 7] at 3 bits: stream bits 100 010 111 -> bytes 0b11010001, 0b00000001
    packed = pack_bits(torch.tensor([1, 2, 7], dtype=torch.uint8), 3)
    assert packed.tolist() == [0b11010001, 0b00000001]
    assert pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1]), 1).tolist() == [0b10001101, 0b1]
    assert pack_bits(torch.tensor([0x3, 0xA]), 4).tolist() == [0xA3]


def test_bad_inputs():
    with pytest.raises(ValueError, match="0..7"):
        pack_bits(torch.tensor([8], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="0..255"):
        pack_bits(torch.tensor([256]), 8)
    with pytest.raises(ValueError, match="0..1"):
        pack_bits(torch.tensor([-1]), 1)
    for bits in (0, 9):
        with pytest.raises(ValueError, match="bits"):
            pack_bits(torch.zeros(4, dtype=torch.uint8), bits)
        with pytest.raises(ValueError, match="bits"):
            unpack_bits(torch.zeros(4, dtype=torch.uint8), bits, 4)
    with pytest.raises(ValueError, match="integer"):
        pack_bits(torch.zeros(4), 2)
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 3, 5)
