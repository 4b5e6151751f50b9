"""Quantization primitives: pure tensor functions (rotation, codebooks, bit packing, codecs)."""
from .bitpack import pack_bits, packed_size, unpack_bits
from .ggml_blocks import BLOCK_BYTES, q4_0_decode, q4_0_encode, q8_0_decode, q8_0_encode
from .hadamard import Rotation, fwht, make_rotation
from .lloyd_codec import LloydCode, lloyd_decode, lloyd_encode
from .lloyd_max import (
    Codebook,
    beta_codebook,
    dequantize_scalar,
    empirical_codebook,
    gaussian_codebook,
    quantize_scalar,
)
from .qjl import QJLCode, qjl_correction, qjl_encode, qjl_inner_product, qjl_signs, sketch_matrix

__all__ = [
    "BLOCK_BYTES", "Codebook", "LloydCode", "QJLCode", "Rotation", "beta_codebook", "dequantize_scalar",
    "empirical_codebook", "fwht", "gaussian_codebook", "lloyd_decode", "lloyd_encode", "make_rotation",
    "pack_bits", "packed_size", "q4_0_decode", "q4_0_encode", "q8_0_decode", "q8_0_encode",
    "qjl_correction", "qjl_encode", "qjl_inner_product", "qjl_signs", "quantize_scalar", "sketch_matrix",
    "unpack_bits",
]
