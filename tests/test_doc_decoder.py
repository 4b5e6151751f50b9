"""The schema document is complete: tests/decode_from_doc.py (h5py + numpy, written from artifacts/README.md, no
compactor import) decodes every codec exactly as compactor does, and recomputes the digest."""
import numpy as np
import pytest
import torch

from compactor.layer_kv import LayerKV
from compactor.serving.loader import decode_layers
from compactor.storage.artifact import StoredLayer, read_artifact, write_artifact
from compactor.storage.kv_codec import PhasedCodec, codec_from_label, encode_layer, parse_kv_bits
from decode_from_doc import decode
from test_artifact import META


def layer(d, T, lengths, seed, zero_beta=False, importance=True):
    g = torch.Generator().manual_seed(seed)
    H, t = len(lengths), max(lengths)
    keys = torch.randn(H, t, d, generator=g) * 2 + torch.randn(H, 1, d, generator=g) * 3  # off-centre, like k_proj
    values = torch.randn(H, t, d, generator=g)
    beta = torch.zeros(H, t) if zero_beta else torch.randn(H, t, generator=g)
    pos = torch.full((H, t), -1, dtype=torch.long)
    for h, n in enumerate(lengths):
        pos[h, :n] = torch.randperm(T, generator=g)[:n].sort().values
        keys[h, n:] = values[h, n:] = beta[h, n:] = 0
    imp = torch.rand(H, t, generator=g) if importance else None
    return LayerKV(keys, values, beta, pos, torch.tensor(lengths), imp)


CASES = [  # (head dim, T, per-layer lengths, per-layer codecs, stored dtype, rotation seed)
    (32, 64, [[64, 64], [64, 64]], ["K16V16", "K16V16"], "bfloat16", 0),                # ratio 1: positions all
    (32, 64, [[20, 13], [7, 30]], ["K4V3", "K8V16"], "float16", 7),                      # bitmap, lloyd pow2
    (24, 3000, [[9, 4], [5, 1], [3, 3]], ["K2V1", "K5V6", "K7V4"], "float32", 123456789),  # d=24: QR rotation
    (64, 5000, [[40, 35], [12, 50]], ["Kq4_0Vq8_0", "Kq8_0V4"], "bfloat16", 2**32 - 1),    # delta16, blocks
    (21, 300, [[30, 30]], ["K3V8"], "bfloat16", 5),                                        # d=21: d*d % 16 != 0
    # phases (bounds 0, 40, 90, T): per-phase codecs, custom (calibrated) codebooks, a head empty in a phase
    (32, 120, [[50, 31], [44, 60]], ["K4@kaV3/K2V16/Kq8_0V4@vb", "K16V16/K4@kaV2/K3V3@vc"], "bfloat16", 9),
    (24, 3000, [[9, 4], [5, 1]], ["K2@kaV1/K5V6/K16V4@vb", "K3V3/K3V3/K3V3"], "float32", 77),
]
BOUNDS = {5: (0, 40, 90, 120), 6: (0, 1000, 1001, 3000)}
NAMES = ("prompt", "think", "answer")


def custom_books(labels, d, seed):
    """Ascending centroids in [-1, 1] (unlike a Beta codebook) for every custom codebook id the labels name."""
    g = torch.Generator().manual_seed(seed)
    books = {}
    for label in labels:
        for unit in label.split("/"):
            c = codec_from_label(unit)
            for part in (c.keys, c.values):
                if part.codebook:
                    books[part.codebook] = (torch.rand(2 ** part.bits, generator=g) * 1.2 - 0.6).sort().values \
                        .numpy().astype("float32")
    return books


@pytest.mark.parametrize("case", range(len(CASES)))
def test_doc_decoder_matches_compactor(tmp_path, case):
    d, T, lengths, labels, stored, seed = CASES[case]
    books, layers = custom_books(labels, d, case), []
    for i, (ls, label) in enumerate(zip(lengths, labels)):
        src = layer(d, T, ls, seed=case * 10 + i, zero_beta=(case == 0))
        codec = parse_kv_bits(label) if case not in BOUNDS else \
            PhasedCodec(tuple(codec_from_label(x) for x in label.split("/")), BOUNDS[case], NAMES)
        layers.append(StoredLayer(*encode_layer(src, codec, stored, seed, books)))
    meta = {**META, "T": T, "ratio": 1.0 if case == 0 else 2.0, "head_dim": d, "num_kv_heads": len(lengths[0]),
            "budget_total": sum(map(sum, lengths))}
    path = write_artifact(tmp_path / "a.h5", meta, layers, books)
    art = read_artifact(path)
    ours = decode_layers(art)
    theirs = decode(str(path))
    assert theirs["T"] == T
    if case == 0:
        assert art.meta["positions"] == "all" and art.meta["beta"] == "zero"
    for a, b, label in zip(ours, theirs["layers"], labels):
        for h, n in enumerate(b["lengths"]):
            assert int(a.lengths[h]) == n
            assert np.array_equal(a.positions[h, :n].numpy(), b["positions"][h])
        start = 0
        for h, n in enumerate(b["lengths"]):
            assert np.array_equal(a.beta[h, :n].numpy(), b["beta"][start:start + n])
            for t in ("keys", "values"):
                want, got = a.__dict__[t][h, :n].numpy(), b[t][start:start + n]
                # lloyd: float64 rotation here vs float32 in compactor; raw and llama.cpp blocks: bit-exact
                parts = {u.split("V")[t == "values"].lstrip("K") for u in label.split("/")}
                tol = 0 if parts <= {"16", "q8_0", "q4_0"} else 1e-4 * (np.abs(want).max() + 1)
                assert np.allclose(got, want, rtol=0, atol=tol), (t, label, np.abs(got - want).max())
            start += n
    assert any(art.meta["positions"] == p for p in ("all", "bitmap", "delta8", "delta16"))
    if case in BOUNDS:
        assert art.meta["phases"] == {"names": list(NAMES), "bounds": list(BOUNDS[case])}
        split = read_artifact(path).layers[0].arrays["phase_lengths"]
        assert split.shape == (3, len(lengths[0])) and (split == 0).any() == (case == 6)
