"""The .h5 artifact (schema v2): round trip, layout, the digest over attributes and datasets, refusal of damaged,
foreign and hostile files before they allocate, atomic writes, and the v1 reader."""
import json
import os

import h5py
import numpy as np
import pytest
import torch

from compactor.errors import ArtifactError
from compactor.layer_kv import LayerKV
from compactor.models import weights_identity
from compactor.storage import schema
from compactor.storage.artifact import ModelLimits, StoredLayer, read_artifact, read_meta, write_artifact
from compactor.storage.kv_codec import decode_layer, encode_layer, parse_kv_bits
from compactor.storage.packing import decode_positions, encode_positions

IDENTITY = weights_identity(torch.nn.Linear(8, 8))
META = {"compactor_version": "0.1.0", "created": "2026-11-23T00:00:00+00:00", "model_id": "x", "model_type": "llama",
        "model_config_sha256": "a" * 64, "model_weights": IDENTITY, "tokenizer_sha256": "b" * 64,
        "document_name": "doc", "document_sha256": "c" * 64, "tokens_sha256": "d" * 64, "T": 50, "ratio": 5.0,
        "method": "am", "method_params": {"score": "rms"}, "budget_total": 60, "num_kv_heads": 2, "head_dim": 32,
        "seconds": {"prefill": 0.1}}


def compact_layers(seed=0, n_layers=3, d=32, zero_beta=False):
    """Padded LayerKV: head 0 keeps 10 entries, head 1 keeps 7 (positions sorted, unique, < T=50)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_layers):
        lengths = torch.tensor([10, 7])
        keys, values = torch.randn(2, 10, d, generator=g), torch.randn(2, 10, d, generator=g)
        beta = torch.zeros(2, 10) if zero_beta else torch.randn(2, 10, generator=g)
        pos = torch.stack([torch.randperm(50, generator=g)[:10].sort().values for _ in range(2)])
        keys[1, 7:] = values[1, 7:] = beta[1, 7:] = 0
        pos[1, 7:] = -1
        out.append(LayerKV(keys, values, beta, pos, lengths))
    return out


def layers(seed=0, n_layers=3, dtype="float32", kv="16", zero_beta=False):
    books = {}
    stored = [StoredLayer(*encode_layer(layer, parse_kv_bits(kv), dtype, 0, books))
              for layer in compact_layers(seed, n_layers, zero_beta=zero_beta)]
    return stored, books


def write(path, seed=0, dtype="float32", kv="16", n_layers=3, **meta):
    stored, books = layers(seed, n_layers, dtype, kv)
    return write_artifact(path, {**META, **meta}, stored, books)


def decoded(art):
    return [decode_layer(s.arrays, s.attrs, art.codebooks, 32) for s in art.layers]


def rewrite_meta(path, recompute_digest=False, **changes):
    """Edit fields of the meta attribute (None deletes), optionally recomputing the digest as a forger would."""
    with h5py.File(path, "r+") as f:
        meta = json.loads(f.attrs["meta"])
        for k, v in changes.items():
            meta.pop(k) if v is None else meta.__setitem__(k, v)
        text = schema.canonical_json(meta)
        del f.attrs["meta"]
        f.attrs.create("meta", np.array(text.encode(), dtype=f"S{len(text.encode())}"))
        if recompute_digest:
            data = {k: f[k][()] for k in f}
            digest = schema.digest_v2(meta, data)
            del f.attrs["digest_sha256"]
            f.attrs.create("digest_sha256", np.array(digest.encode(), dtype="S64"))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("kv", ["16", "K4V3", "q8_0", "Kq4_0V8"])
def test_round_trip(tmp_path, dtype, kv):
    stored, books = layers(dtype=dtype, kv=kv)
    path = write(tmp_path / "a.h5", dtype=dtype, kv=kv)
    art = read_artifact(path)
    assert art.T == 50 and art.meta["method_params"] == {"score": "rms"} and art.version == 2
    for got, want in zip(decoded(art), [decode_layer(s.arrays, s.attrs, books, 32) for s in stored]):
        for name in ("keys", "values", "beta", "positions", "lengths"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
    src = compact_layers()
    if kv == "16":
        want = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
        for a, b in zip(decoded(art), src):
            assert torch.equal(a.keys, b.keys.to(want).float()) and torch.equal(a.beta, b.beta)
            assert torch.equal(a.positions, b.positions)
    assert not list(tmp_path.glob(".*tmp*"))


def test_layout_few_contiguous_datasets(tmp_path):
    path = write(tmp_path / "a.h5", dtype="bfloat16")
    with h5py.File(path) as f:
        # positions: a 50-bit bitmap per head (7 B) beats 17 one-byte deltas
        assert sorted(f) == ["beta", "keys", "lengths", "model_weights_kept", "positions_bitmap", "values"]
        assert sorted(f.attrs) == ["digest_sha256", "format", "format_version", "meta"]
        assert f["keys"].dtype == np.uint16 and f["keys"].shape == (51, 32)  # 3 layers x (10 + 7), no padding
        assert f["keys"].chunks is None and f["keys"].compression is None and not f["keys"].fletcher32
        assert f["lengths"].shape == (3, 2) and f["positions_bitmap"].shape == (3, 2, 7)


def test_beta_and_positions_omitted_when_they_carry_nothing(tmp_path):
    stored, books = layers(zero_beta=True)
    path = write_artifact(tmp_path / "z.h5", META, stored, books)
    art = read_artifact(path)
    assert art.meta["beta"] == "zero" and "beta" not in art.dataset_bytes
    assert all(torch.equal(a.beta, torch.zeros_like(a.beta)) for a in decoded(art))


@pytest.mark.parametrize("T,keep,want", [(40, 40, "all"), (200, 150, "bitmap"), (200, 20, "delta8"),
                                         (2000, 4, "delta16"), (200_000, 3, "delta32")])
def test_positions_encodings_round_trip(T, keep, want):
    rng = np.random.default_rng(T + keep)
    lengths = np.array([[keep, keep], [keep, keep if want == "all" else keep - 1]], dtype=np.int32)
    per_layer = [np.concatenate([np.sort(rng.choice(T, n, replace=False)) for n in row]) for row in lengths]
    if want == "delta16":
        per_layer[0][:4] = [0, 10, 1000, 1999]
    if want == "delta32":
        per_layer[0][:3] = [0, 5, 199_999]
    enc, data = encode_positions(per_layer, lengths, T)
    assert enc == want
    for a, b in zip(decode_positions(enc, data, lengths, T), per_layer):
        assert np.array_equal(a, b)


def test_unsorted_positions_refused_by_the_writer(tmp_path):
    stored, books = layers()
    stored[0].arrays["positions"][:2] = [5, 3]
    with pytest.raises(ValueError, match="strictly increasing"):
        write_artifact(tmp_path / "u.h5", META, stored, books)


def test_flipped_byte_is_detected(tmp_path):
    path = write(tmp_path / "a.h5")
    with h5py.File(path) as f:
        offset = f["values"].id.get_offset()
    data = bytearray(path.read_bytes())
    data[offset + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="digest"):
        read_artifact(path)
    read_artifact(path, verify=False)  # forensics may skip the digest deliberately


@pytest.mark.parametrize("field,value", [("T", 49), ("T", 600), ("stored_dtype", "float16"), ("rotation_seed", 1),
                                         ("ratio", 5.5), ("document_name", "other")])
def test_attribute_edits_fail_the_digest(tmp_path, field, value):
    """v1 let T, dtypes and seeds change unnoticed; in v2 every field is under the digest (edits that change the
    expected layout are refused even earlier, by the shape checks)."""
    path = write(tmp_path / "a.h5", kv="K4V3")
    rewrite_meta(path, **{field: value})
    with pytest.raises(ArtifactError, match="digest|shape|dtype"):
        read_artifact(path)


@pytest.mark.parametrize("changes,msg", [
    ({"T": "abc"}, "must be an integer"), ({"T": 5_000_000_000}, "outside"), ({"T": 600.0}, "must be an integer"),
    ({"method_params": "not json"}, "JSON object"), ({"head_dim": 0}, "outside"),
    ({"stored_dtype": "float64"}, "one of"),
    ({"layer_codecs": "K4V3,K9V3,K4V3"}, "bad layer codec"), ({"layer_codecs": "K4V3"}, "names 1 layers"),
    ({"lloyd_exact": 100}, "outside"), ({"model_weights": None}, "lacks required"), ({"positions": "gzip"}, "one of"),
    ({"kv_bits": "K16V16"}, "disagrees"), ({"budget_total": 10}, "more than budget_total"),
    ({"ratio": 100.0}, "larger than T"), ({"surprise": 1}, "unknown meta"), ({"head_dim": 16}, "shape"),
    ({"lloyd_mean_dtype": "float32"}, "dtype")])
def test_invalid_attributes_refused_even_with_a_recomputed_digest(tmp_path, changes, msg):
    path = write(tmp_path / "a.h5", kv="K4V3")
    rewrite_meta(path, recompute_digest=True, **changes)
    with pytest.raises(ArtifactError, match=msg) as e:
        read_artifact(path)
    assert "\n" not in str(e.value)


def test_model_limits_checked_before_any_dataset_is_read(tmp_path, monkeypatch):
    path = write(tmp_path / "a.h5")
    import compactor.storage.h5safe as h5safe

    def no_read(*a, **k):
        raise AssertionError("a dataset was read")

    monkeypatch.setattr(h5safe, "read_dataset", no_read)
    with pytest.raises(ArtifactError, match="num_layers = 3; this model has 4"):
        read_artifact(path, limits=ModelLimits(4, 2, 32, 1024))
    with pytest.raises(ArtifactError, match="beyond this model's context of 40"):
        read_artifact(path, limits=ModelLimits(3, 2, 32, 40))


def test_oversize_dataset_refused_without_allocating(tmp_path):
    """A small file whose dataset declares 4 GiB (and attributes agreeing with it) is refused from the header."""
    import tracemalloc

    path = write(tmp_path / "a.h5")
    with h5py.File(path, "r+") as f:
        del f["keys"]
        f.create_dataset("keys", shape=(2**25, 32), dtype="<f4")  # never written: no storage
    rewrite_meta(path, recompute_digest=False)
    tracemalloc.start()
    with pytest.raises(ArtifactError, match="shape|holds"):
        read_artifact(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 10 * path.stat().st_size


@pytest.mark.parametrize("variant", ["external", "virtual", "soft", "external_link", "gzip", "chunked", "bigendian",
                                     "extra", "group"])
def test_dataset_storage_variants_refused(tmp_path, variant):
    """Datasets must be plain storage in this file, even when the digest is made to match."""
    path = write(tmp_path / "a.h5")
    other = tmp_path / "other.h5"
    with h5py.File(path, "r+") as f:
        beta = f["beta"][()]
        del f["beta"]
        if variant == "external":
            raw = tmp_path / "beta.bin"
            raw.write_bytes(beta.tobytes())
            f.create_dataset("beta", shape=beta.shape, dtype=beta.dtype, external=[(str(raw), 0, beta.nbytes)])
        elif variant == "virtual":
            with h5py.File(other, "w") as o:
                o["beta"] = beta
            layout = h5py.VirtualLayout(shape=beta.shape, dtype=beta.dtype)
            layout[:] = h5py.VirtualSource(str(other), "beta", shape=beta.shape)
            f.create_virtual_dataset("beta", layout)
        elif variant == "soft":
            f["beta_data"] = beta
            f["beta"] = h5py.SoftLink("/beta_data")
        elif variant == "external_link":
            with h5py.File(other, "w") as o:
                o["beta"] = beta
            f["beta"] = h5py.ExternalLink(str(other), "/beta")
        elif variant == "gzip":
            f.create_dataset("beta", data=beta, compression="gzip")
        elif variant == "chunked":
            f.create_dataset("beta", data=beta, chunks=(4,))
        elif variant == "bigendian":
            f.create_dataset("beta", data=beta.astype(">f4"))
        elif variant == "extra":
            f["beta"] = beta
            f["surprise"] = beta
        elif variant == "group":
            f.create_group("beta")
    with pytest.raises(ArtifactError) as e:
        read_artifact(path)
    assert "\n" not in str(e.value)


def test_truncated_file(tmp_path):
    path = write(tmp_path / "a.h5")
    data = path.read_bytes()
    for keep in (0.0, 0.3, 0.9, 0.999):
        path.write_bytes(data[: int(len(data) * keep)])
        with pytest.raises(ArtifactError):
            read_artifact(path)


def test_not_an_artifact(tmp_path):
    p = tmp_path / "x.h5"
    p.write_text("hello")
    with pytest.raises(ArtifactError, match="not a readable"):
        read_artifact(p)
    with h5py.File(tmp_path / "y.h5", "w") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(ArtifactError, match="not a compactor artifact"):
        read_meta(tmp_path / "y.h5")
    with pytest.raises(ArtifactError, match="not found"):
        read_artifact(tmp_path / "missing.h5")
    with pytest.raises(ArtifactError, match="not a file"):
        read_artifact(tmp_path)


def test_newer_version_refused(tmp_path):
    path = write(tmp_path / "a.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(ArtifactError, match="newer"):
        read_meta(path)


def test_writer_refuses_what_the_reader_would(tmp_path):
    stored, books = layers()
    with pytest.raises(ArtifactError, match="refusing to write"):
        write_artifact(tmp_path / "a.h5", {**META, "ratio": 0.5}, stored, books)
    with pytest.raises(KeyError):
        write_artifact(tmp_path / "a.h5", {k: v for k, v in META.items() if k != "model_weights"}, stored, books)
    assert not list(tmp_path.iterdir())


def test_unknown_meta_keys_kept_in_extra(tmp_path):
    stored, books = layers()
    path = write_artifact(tmp_path / "a.h5", {**META, "notes": {"source": "x"}}, stored, books)
    assert read_artifact(path).meta["extra"] == {"notes": {"source": "x"}}


def test_chat_field_is_validated(tmp_path):
    stored, books = layers()
    chat = {"template_sha256": "ab" * 32, "separator": "\n\n"}
    path = write_artifact(tmp_path / "a.h5", {**META, "chat": chat}, stored, books)
    assert read_artifact(path).meta["chat"] == chat
    for bad in ({"template": "x"}, {**chat, "template_sha256": "xyz"}, {**chat, "separator": 3}):
        with pytest.raises(ArtifactError, match="chat"):
            write_artifact(tmp_path / "b.h5", {**META, "chat": bad}, stored, books)


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    good = write(tmp_path / "a.h5")
    before = good.read_bytes()
    import compactor.storage.artifact as art

    def explode(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(art, "_write_attr", explode)
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path / "a.h5", seed=1)  # overwrite attempt dies midway
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path / "b.h5", seed=1)
    assert good.read_bytes() == before  # the old artifact is intact
    assert sorted(os.listdir(tmp_path)) == ["a.h5"]  # no temporary file left behind


def test_killed_writer_leaves_no_partial_artifact(tmp_path):
    """SIGKILL mid-write (no chance to clean up): the final name never holds a partial file; the next write into
    the folder removes the dead writer's temporary file."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).parent)!r})
import compactor.storage.artifact as a
from test_artifact import write
real = a._write_attr
def slow(*x, **k):
    time.sleep(0.5); return real(*x, **k)
a._write_attr = slow
print("start", flush=True)
write({str(tmp_path / 'k.h5')!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "start"
    time.sleep(1.0)
    proc.kill()
    proc.wait()
    assert not (tmp_path / "k.h5").exists()
    assert [p.name for p in tmp_path.iterdir()] == [f".k.h5.tmp-{proc.pid}"]
    write(tmp_path / "next.h5")
    assert [p.name for p in tmp_path.iterdir()] == ["next.h5"]


# ---- schema v1 --------------------------------------------------------------------------------------------------
def write_v1(path, kv="16", dtype="float32"):
    from legacy_v1 import write_artifact_v1

    stored, books = layers(dtype=dtype, kv=kv)
    meta = {k: v for k, v in META.items() if k != "model_weights"}
    return write_artifact_v1(path, {**meta, "model_weights_signature": [0.5, 0.25]}, stored, books)


@pytest.mark.parametrize("kv", ["16", "K4V3", "q4_0"])
def test_v1_files_still_load(tmp_path, kv):
    stored, books = layers(kv=kv)
    art = read_artifact(write_v1(tmp_path / "v1.h5", kv=kv))
    assert art.version == 1
    for got, want in zip(decoded(art), [decode_layer(s.arrays, s.attrs, books, 32) for s in stored]):
        assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
        assert torch.equal(got.beta, want.beta) and torch.equal(got.positions, want.positions)


def test_v1_checks(tmp_path):
    path = write_v1(tmp_path / "v1.h5", kv="K4V3")
    with h5py.File(path, "r+") as f:
        f["layers/00001/beta"][0] = 123.0  # chunk checksum recomputed by HDF5; v1's payload digest catches it
    with pytest.raises(ArtifactError, match="payload digest"):
        read_artifact(path)
    path = write_v1(tmp_path / "v1b.h5", kv="K4V3")
    with h5py.File(path, "r+") as f:
        f["layers/00000"].attrs["keys_dtype"] = "float64"
        del f.attrs["model_weights_signature"]
    with pytest.raises(ArtifactError, match="model_weights_signature"):
        read_artifact(path)
    path = write_v1(tmp_path / "v1c.h5")
    with h5py.File(path, "r+") as f:
        f["layers/00000"].attrs["keys_dtype"] = "float64"
    with pytest.raises(ArtifactError, match="stored dtype"):
        read_artifact(path)
    path = write_v1(tmp_path / "v1d.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["T"] = 5  # below the kept positions: refused (v1 cannot catch an edit that stays consistent)
    with pytest.raises(ArtifactError, match="outside 0..T-1|more than T"):
        read_artifact(path)


def test_means_beyond_fp16_make_the_file_float32_exactly(tmp_path):
    """One layer's lloyd mean needs float32 (a k_proj bias beyond fp16's range): the file stores all means in
    float32, and every layer decodes exactly as it did from its own arrays."""
    src = compact_layers()
    src[1].keys += 1e5
    books = {}
    stored = [StoredLayer(*encode_layer(layer, parse_kv_bits("K4V4"), "float32", 0, books)) for layer in src]
    assert stored[0].arrays["keys_mean"].dtype == np.float16 and stored[1].arrays["keys_mean"].dtype == np.float32
    art = read_artifact(write_artifact(tmp_path / "m.h5", META, stored, books))
    assert art.meta["lloyd_mean_dtype"] == "float32"
    for got, s in zip(decoded(art), stored):
        want = decode_layer(s.arrays, s.attrs, books, 32)
        assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
