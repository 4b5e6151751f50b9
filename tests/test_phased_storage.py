"""Schema v2 extensions: a document with phases stored with a codec per phase (each kept entry decodes with the
codec of the phase its position lies in), and custom (calibrated) codebooks carried by the file under their own
name; both validated like every other field, digest-covered, refused when inconsistent."""
import h5py
import numpy as np
import pytest
import torch

from compactor.errors import ArtifactError
from compactor.layer_kv import LayerKV
from compactor.quant import empirical_codebook
from compactor.storage.artifact import StoredLayer, read_artifact, write_artifact
from compactor.storage.kv_codec import (PhasedCodec, codec_from_label, decode_layer, encode_layer, parse_kv_bits,
                                        roundtrip, roundtrip_keys, roundtrip_tensor)
from compactor.serving.loader import decode_layers
from test_artifact import META, rewrite_meta

T = 90
BOUNDS = (0, 30, 70, T)
NAMES = ("prompt", "think", "answer")


def mixed_layer(seed=0, d=32, lengths=(40, 33)):
    """Two heads keeping entries spread over all three phases (positions sorted, unique, < T)."""
    g = torch.Generator().manual_seed(seed)
    H, t = len(lengths), max(lengths)
    keys = torch.randn(H, t, d, generator=g) * 2 + 5
    values = torch.randn(H, t, d, generator=g)
    beta = torch.randn(H, t, generator=g)
    pos = torch.full((H, t), -1, dtype=torch.long)
    for h, n in enumerate(lengths):
        pos[h, :n] = torch.randperm(T, generator=g)[:n].sort().values
        keys[h, n:] = values[h, n:] = beta[h, n:] = 0
    return LayerKV(keys, values, beta, pos, torch.tensor(lengths), torch.rand(H, t, generator=g))


def phased(*labels):
    return PhasedCodec(tuple(codec_from_label(x) for x in labels), BOUNDS, NAMES)


def fitted_book(bits, seed=0, d=32):
    """An empirical codebook for rotated unit-vector coordinates of Laplace-like data (not the Beta codebook)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.distributions.Laplace(0.0, 1.0).sample((4000,)) / 8
    x = x.clamp(-0.99, 0.99)
    return empirical_codebook(x, bits).centroids.numpy().astype(np.float32)


def test_each_entry_decodes_with_the_codec_of_its_phase():
    src = mixed_layer()
    codec = phased("K16V16", "K3V2", "Kq8_0V4")
    books = {}
    out, _ = roundtrip(src, codec, "float32", 5, books)
    assert torch.equal(out.positions, src.positions) and torch.equal(out.beta, src.beta)
    for h, n in enumerate(src.lengths.tolist()):
        pos = src.positions[h, :n]
        phase = codec.phase_of(pos)
        for p, unit in enumerate(codec.codecs):
            rows = (phase == p).nonzero().flatten()
            for t, part in (("keys", unit.keys), ("values", unit.values)):
                x = getattr(src, t)[h, rows]
                want = roundtrip_tensor(x, part, "float32", 5, src.importance[h, rows])
                got = getattr(out, t)[h, rows]
                assert torch.allclose(got, want, atol=1e-6), (h, p, t)
        # the raw phase is exact, the 3-bit phase is not: the codecs really differ by phase
        assert torch.equal(out.keys[h, :n][phase == 0], src.keys[h, :n][phase == 0])
        assert not torch.equal(out.keys[h, :n][phase == 1], src.keys[h, :n][phase == 1])
    keys = roundtrip_keys(src.keys[0, :40], codec, src.positions[0, :40], src.importance[0, :40], "float32", 5)
    assert torch.allclose(keys, out.keys[0, :40], atol=1e-6)


def test_phased_layer_with_custom_codebooks_round_trips_through_a_file(tmp_path):
    books = {"k3": fitted_book(3), "v2": fitted_book(2, seed=1)}
    codecs = [phased("K3@k3V2@v2", "K3V2", "K4V16"), phased("K16V16", "K3@k3V3", "K2V2@v2")]
    src = [mixed_layer(seed=i) for i in range(2)]
    stored = [StoredLayer(*encode_layer(layer, c, "bfloat16", 3, books)) for layer, c in zip(src, codecs)]
    meta = {**META, "T": T, "ratio": 1.5, "num_kv_heads": 2, "budget_total": 146}
    path = write_artifact(tmp_path / "a.h5", meta, stored, dict(books))
    art = read_artifact(path)
    assert art.meta["layer_codecs"] == "K3@k3V2@v2/K3V2/K4V16,K16V16/K3@k3V3/K2V2@v2"
    assert art.meta["phases"] == {"names": list(NAMES), "bounds": list(BOUNDS)}
    with h5py.File(path) as f:
        assert np.array_equal(f["codebook_k3"][()], books["k3"]) and "codebook_b3" in f and "phase_lengths" in f
    for got, s, layer in zip(decode_layers(art), stored, src):
        want = decode_layer(s.arrays, s.attrs, books, 32)
        assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
        assert torch.equal(got.positions, layer.positions)
    # the file decodes on its own: the custom codebook differs from the Beta one and is the one used
    from compactor.quant import beta_codebook
    assert not np.allclose(books["k3"], beta_codebook(3, 32).centroids.numpy(), atol=1e-3)


def write_phased(tmp_path, labels=(("K3@k3V2", "K3V2", "K4V16"), ("K16V16", "K3V3", "K2V2"))):
    books = {"k3": fitted_book(3)}
    stored = [StoredLayer(*encode_layer(mixed_layer(seed=i), phased(*ls), "bfloat16", 0, books))
              for i, ls in enumerate(labels)]
    meta = {**META, "T": T, "ratio": 1.5, "num_kv_heads": 2, "budget_total": 146}
    return write_artifact(tmp_path / "a.h5", meta, stored, books)


@pytest.mark.parametrize("changes,msg", [
    ({"phases": {"names": ["a", "b", "c"], "bounds": [0, 30, 70, 91]}}, "phases must be"),   # not ending at T
    ({"phases": {"names": ["a", "a", "c"], "bounds": [0, 30, 70, 90]}}, "phases must be"),   # duplicate name
    ({"phases": {"names": ["a", "b", "c"], "bounds": [0, 70, 30, 90]}}, "phases must be"),   # decreasing
    ({"phases": {"names": ["a", "B"], "bounds": [0, 30, 90]}}, "phases must be"),            # bad name
    ({"phases": {"names": ["a", "b"], "bounds": [0, 30, 90]}}, "name 2 phase codec"),        # P disagrees
    ({"phases": {"names": ["a", "b", "c"], "bounds": [0, 30, 70, 90], "x": 1}}, "phases must be"),
    ({"phases": None}, "name 1 phase codec"),
    ({"phases": {"names": ["a", "b", "c"], "bounds": [0, 45, 70, 90]}}, "disagree with the kept positions"),
    ({"layer_codecs": "K3@k3V2/K3@k3V2/K4V16,K16V16/K3@b3V3/K2V2"}, "collide"),
    ({"layer_codecs": "K3@k3V2/K4@k3V2/K4V16,K16V16/K3V3/K2V2"}, "two bit widths"),
    ({"layer_codecs": "K3@K3V2/K3V2/K4V16,K16V16/K3V3/K2V2"}, "bad layer codec"),
])
def test_invalid_phase_and_codebook_fields_refused_even_with_a_recomputed_digest(tmp_path, changes, msg):
    path = write_phased(tmp_path)
    if "layer_codecs" in changes:
        changes["kv_bits"] = ",".join(sorted(set(changes["layer_codecs"].replace(",", "/").split("/"))))
    rewrite_meta(path, recompute_digest=True, **changes)
    with pytest.raises(ArtifactError, match=msg) as e:
        read_artifact(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("edit,msg", [("sum", "add up"), ("swap", "disagree with the kept positions"),
                                      ("shape", "shape"), ("missing", "no phase_lengths"),
                                      ("book", "ascending codebook"), ("nobook", "missing")])
def test_inconsistent_phase_datasets_refused(tmp_path, edit, msg):
    path = write_phased(tmp_path)
    with h5py.File(path, "r+") as f:
        split = f["phase_lengths"][()]
        if edit in ("sum", "swap", "shape", "missing"):
            del f["phase_lengths"]
        if edit == "sum":
            split[0, 0, 0] += 1
        elif edit == "swap":  # same totals, entries moved between phases
            split[0, 0, 0] += 1
            split[0, 1, 0] -= 1
        if edit in ("sum", "swap"):
            f["phase_lengths"] = split
        elif edit == "shape":
            f["phase_lengths"] = split[:, :2]
        elif edit == "book":
            book = f["codebook_k3"][()]
            del f["codebook_k3"]
            f["codebook_k3"] = book[::-1].copy()
        elif edit == "nobook":
            del f["codebook_k3"]
    rewrite_meta(path, recompute_digest=True)
    with pytest.raises(ArtifactError, match=msg):
        read_artifact(path)


def test_unknown_phase_field_is_digested(tmp_path):
    """Moving a phase bound without recomputing the digest is caught by the digest (the layout still agrees when
    no kept entry crosses it)."""
    path = write_phased(tmp_path)
    rewrite_meta(path, phases={"names": ["p", "t", "a"], "bounds": list(BOUNDS)})
    with pytest.raises(ArtifactError, match="digest"):
        read_artifact(path)


def test_phases_must_agree_across_layers(tmp_path):
    stored = [StoredLayer(*encode_layer(mixed_layer(seed=0), phased("K3V3", "K2V2", "K4V4"), "bfloat16", 0, {})),
              StoredLayer(*encode_layer(mixed_layer(seed=1), parse_kv_bits("K3V3"), "bfloat16", 0, {}))]
    with pytest.raises(ValueError, match="disagree on phases"):
        write_artifact(tmp_path / "a.h5", {**META, "T": T, "num_kv_heads": 2, "budget_total": 146}, stored, {})
    assert not (tmp_path / "a.h5").exists()


def test_custom_codebook_must_be_given_to_encode():
    with pytest.raises(ValueError, match="not available"):
        encode_layer(mixed_layer(), codec_from_label("K3@nopeV3"), "bfloat16", 0, {})
    with pytest.raises(ValueError, match="collide"):
        codec_from_label("K3@b3V3")
