"""Storage of compact keys/values: spec parsing, exact raw round trips, quantized round trips within their
error, byte accounting, codebooks once per file, and refusal of bad input."""
import pytest
import torch

from compactor.storage.kv_codec import (EXACT_DEFAULT, RAW, KVCodec, TensorCodec, check_codec, decode_layer, encode_layer, parse_kv_bits,
                                roundtrip, roundtrip_tensor)
from compactor.layer_kv import LayerKV
from compactor.quant import beta_codebook, q4_0_decode, q4_0_encode


def layer(d=64, lengths=(40, 25, 33), seed=0, bias=0.0):
    g = torch.Generator().manual_seed(seed)
    H, t = len(lengths), max(lengths)
    keys = torch.randn(H, t, d, generator=g) + bias
    values = torch.randn(H, t, d, generator=g)
    beta = torch.randn(H, t, generator=g)
    pos = torch.arange(t).repeat(H, 1)
    for h, n in enumerate(lengths):
        keys[h, n:] = values[h, n:] = beta[h, n:] = 0
        pos[h, n:] = -1
    return LayerKV(keys, values, beta, pos, torch.tensor(lengths))


def test_parse():
    e = EXACT_DEFAULT
    assert parse_kv_bits("K4V3") == KVCodec(TensorCodec("lloyd", 4, e), TensorCodec("lloyd", 3, e))
    assert parse_kv_bits("q4_0") == KVCodec(TensorCodec("q4_0"), TensorCodec("q4_0"))
    assert parse_kv_bits("K8V16") == KVCodec(TensorCodec("lloyd", 8, e), TensorCodec("raw"))
    assert parse_kv_bits("16") == RAW and parse_kv_bits("K4V3").label == "K4V3"
    for bad in ("K9V3", "K0V1", "4", "K4", "q5_0", "K4V3x"):
        with pytest.raises(ValueError, match="bad --kv-bits"):
            parse_kv_bits(bad)


def test_block_codecs_need_head_dim_multiple_of_32():
    check_codec(parse_kv_bits("q4_0"), 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        check_codec(parse_kv_bits("Kq8_0V4"), 48)


@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
def test_raw_round_trip_is_exact_and_ragged(stored):
    src = layer()
    books = {}
    arrays, attrs = encode_layer(src, RAW, stored, 0, books)
    assert arrays["keys"].shape == (98, 64) and not books  # 40+25+33 rows, no padding
    out = decode_layer(arrays, attrs, books, 64)
    want = torch.float32 if stored == "float32" else torch.bfloat16
    assert torch.equal(out.keys, src.keys.to(want).float()) and torch.equal(out.positions, src.positions)
    assert torch.equal(out.lengths, src.lengths) and torch.equal(out.beta, src.beta)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lloyd_round_trip_error_matches_codebook_mse(bits):
    """Relative MSE of keys after the round trip is about the Beta codebook's d*MSE (rotation makes any input
    look like a random direction), and the per-head mean removes a large shared bias first."""
    src = layer(d=64, lengths=(300, 280), bias=30.0)
    out, nbytes = roundtrip(src, parse_kv_bits(f"K{bits}V{bits}"), stored="float32")  # exact rows in fp32
    for h, n in enumerate(src.lengths):
        x = src.keys[h, :n]
        centered = x - x.mean(0)
        rel = float(((out.keys[h, :n] - x) ** 2).sum() / (centered ** 2).sum())
        expected = 64 * beta_codebook(bits, 64).mse
        assert 0.7 * expected < rel < 1.15 * expected, (bits, rel, expected)
    rows, d, e = 580, 64, EXACT_DEFAULT
    per_tensor = rows * (d * bits // 8) + rows * 2 + 2 * d * 2 + 2 * e * (4 + d * 4)  # codes gains fp16 means exact
    assert nbytes == 2 * per_tensor + rows * 4 + rows * 4 + 2 * 4  # + beta, positions, lengths


def test_block_codec_matches_the_primitive():
    src = layer(d=64)
    arrays, attrs = encode_layer(src, parse_kv_bits("q4_0"), "bfloat16", 0, {})
    assert arrays["keys_blocks"].shape == (98, 2 * 18)
    out = decode_layer(arrays, attrs, {}, 64)
    ref = q4_0_decode(q4_0_encode(src.keys[0, :40]))
    assert torch.equal(out.keys[0, :40], ref)


def test_codebooks_stored_once_and_used_at_decode():
    books = {}
    a1, t1 = encode_layer(layer(seed=1), parse_kv_bits("K4V4"), "bfloat16", 0, books)
    a2, t2 = encode_layer(layer(seed=2), parse_kv_bits("K4V3"), "bfloat16", 0, books)
    assert sorted(books) == ["beta-b3-d64", "beta-b4-d64"]
    tampered = {k: v.copy() for k, v in books.items()}
    tampered["beta-b4-d64"] *= 2  # decode reads the stored centroids, not a recomputation
    x = decode_layer(a1, t1, books, 64).keys
    y = decode_layer(a1, t1, tampered, 64).keys
    assert not torch.allclose(x, y)
    with pytest.raises(ValueError, match="missing"):
        decode_layer(a2, t2, {"beta-b4-d64": books["beta-b4-d64"]}, 64)
    with pytest.raises(ValueError, match="centroids"):
        decode_layer(a1, t1, {"beta-b4-d64": books["beta-b3-d64"], "beta-b3-d64": books["beta-b3-d64"]}, 64)


def test_mismatched_head_dim_is_refused():
    arrays, attrs = encode_layer(layer(d=64), parse_kv_bits("K4V4"), "bfloat16", 0, books := {})
    with pytest.raises(ValueError, match="head dim"):
        decode_layer(arrays, attrs, books, 128)


def test_non_finite_values_are_refused():
    bad = layer()
    bad.values[0, 3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        encode_layer(bad, parse_kv_bits("K4V4"), "bfloat16", 0, {})


def test_roundtrip_tensor_matches_layer_path():
    src = layer(lengths=(50,))
    codec = parse_kv_bits("K3V3")
    via_layer, _ = roundtrip(src, codec)
    assert torch.equal(roundtrip_tensor(src.keys[0, :50], codec.keys), via_layer.keys[0, :50])


def test_most_attended_entries_are_kept_exact():
    src = layer(d=64, lengths=(60, 50), bias=5.0)
    src.importance = torch.rand(2, 60, generator=torch.Generator().manual_seed(3))
    src.importance[0, 17] = src.importance[1, 3] = 10.0  # the "attention sinks" of each head
    out, _ = roundtrip(src, parse_kv_bits("K3V3"), stored="float32")
    assert torch.equal(out.keys[0, 17], src.keys[0, 17]) and torch.equal(out.values[1, 3], src.values[1, 3])
    assert not torch.equal(out.keys[0, 16], src.keys[0, 16])  # the others are quantized
    top2 = torch.topk(src.importance[0, :60], 2).indices
    assert all(torch.equal(out.keys[0, i], src.keys[0, i]) for i in top2)
