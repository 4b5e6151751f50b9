"""Hundreds of seeded corruptions of real artifacts (three codecs, made by the pipeline on tiny models): each one is
either refused with a one-line ArtifactError or loads a cache identical to the original. Nothing else may happen:
no other exception out of read_meta / load_cache / inspect's read path, no different cache. Counts by kind are
printed (pytest -s) and checked; peak traced memory per forged file is bounded by the model's full cache size."""
from __future__ import annotations

import json
import shutil
import tracemalloc
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from compactor.cli import cli
from compactor.errors import ArtifactError
from compactor.storage import schema
from compactor.storage.artifact import read_artifact, read_meta
from compactor.storage.kv_codec import byte_breakdown
from compactor.serving.loader import decode_layers, load_cache

KINDS = {"flip": 50, "truncate": 17, "zero": 20, "meta_edit": 22, "meta_forged": 22, "dataset_forged": 16,
         "oversize": 6}  # per base artifact; four bases


# ---- file surgery ---------------------------------------------------------------------------------------------------
def read_meta_json(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return json.loads(f.attrs["meta"])


def set_meta(path: Path, meta: dict, recompute: bool) -> None:
    with h5py.File(path, "r+") as f:
        text = schema.canonical_json(meta).encode()
        del f.attrs["meta"]
        f.attrs.create("meta", np.array(text, dtype=f"S{max(1, len(text))}"))
        if recompute:
            data = {k: f[k][()] for k in f if isinstance(f.get(k, getclass=True), type) and f.get(k, getclass=True)
                    is h5py.Dataset}
            digest = schema.digest_v2(meta, data)
            del f.attrs["digest_sha256"]
            f.attrs.create("digest_sha256", np.array(digest.encode(), dtype="S64"))


def recompute_digest(path: Path) -> None:
    set_meta(path, read_meta_json(path), recompute=True)


def meta_edit(path: Path, rng: np.random.Generator) -> None:
    """Change, add or delete one meta field; the digest is left as it was."""
    meta = read_meta_json(path)
    key = str(rng.choice(sorted(meta)))
    value = meta[key]
    op = rng.integers(5)
    if op == 0:
        meta.pop(key)
    elif op == 1:
        meta["x_" + key] = value
    elif isinstance(value, bool) or value is None:
        meta[key] = not value
    elif isinstance(value, int):
        meta[key] = [value + 1, value - 1, -value, float(value), str(value), 2**40][int(rng.integers(6))]
    elif isinstance(value, float):
        meta[key] = [value * 1.001, value + 1, int(value), str(value)][int(rng.integers(4))]
    elif isinstance(value, str):
        meta[key] = [value[:-1], value + "x", value.upper(), 7][int(rng.integers(4))]
    else:
        meta[key] = {"changed": True}
    set_meta(path, meta, recompute=False)


def meta_forged(path: Path, rng: np.random.Generator) -> None:
    """A forger's edit: the digest is recomputed, so only validation stands between the edit and the loader.
    Every edit here is invalid or leaves the cache as it was (an edit that is valid and changes the cache, e.g.
    another rotation seed, makes a new artifact, which no digest can tell from an honest one)."""
    meta = read_meta_json(path)
    edits = [
        ("T", "abc"), ("T", 5_000_000_000), ("T", float(meta["T"])), ("T", 0), ("T", -3),
        ("T", int(meta["T"]) * 1000), ("num_layers", meta["num_layers"] + 1), ("num_kv_heads", 1), ("head_dim", 32),
        ("head_dim", 8), ("head_dim", "16"), ("ratio", float(meta["T"]) * 2), ("ratio", "x"), ("ratio", 0.5),
        ("stored_dtype", "float64"), ("stored_dtype", "float32"), ("lloyd_mean_dtype", "bfloat16"),
        ("positions", "delta64"), ("positions", "all" if meta["positions"] != "all" else "bitmap"),
        ("beta", "zero" if meta["beta"] == "stored" else "stored"), ("beta", "none"),
        ("layer_codecs", meta["layer_codecs"].replace("4", "3", 1).replace("16", "8", 1).replace("q4_0", "q8_0", 1)),
        ("layer_codecs", "K9V9," * (meta["num_layers"] - 1) + "K9V9"), ("kv_bits", "K2V2"),
        ("budget_total", -1), ("budget_total", 0), ("lloyd_exact", 1000), ("model_weights", {"scheme": "x"}),
        ("model_weights", "sha"), ("method_params", "text"), ("seconds", {"a": "b"}), ("model_type", "a b"),
        ("tokenizer_sha256", "0" * 63), ("document_sha256", 12), ("format_extra", 1),
        ("document_name", "renamed"), ("created", "yesterday"), ("seconds", {"prefill": 99.0}),  # harmless
        ("phases", {"names": ["prompt", "think", "answer"], "bounds": [0, 1, 2, meta["T"]]}),
        ("phases", {"names": ["x"], "bounds": [0, meta["T"]]}), ("calibration_sha256", "z" * 64),
        ("layer_codecs", meta["layer_codecs"].replace("@", "@b", 1).replace("K16", "K4@zz", 1)),
    ]
    key, value = edits[int(rng.integers(len(edits)))]
    meta[key] = value
    set_meta(path, meta, recompute=True)


def dataset_forged(path: Path, rng: np.random.Generator, tmp: Path) -> None:
    """Replace one dataset with a variant HDF5 can read but this schema forbids; the digest is recomputed."""
    with h5py.File(path, "r+") as f:
        names = sorted(f)
        name = str(rng.choice(names))
        data = f[name][()]
        variant = int(rng.integers(11))
        del f[name]
        other = tmp / f"other-{rng.integers(1 << 30)}.h5"
        if variant == 0:
            raw = tmp / f"raw-{rng.integers(1 << 30)}.bin"
            raw.write_bytes(data.tobytes())
            f.create_dataset(name, shape=data.shape, dtype=data.dtype, external=[(str(raw), 0, max(1, data.nbytes))])
        elif variant == 1:
            with h5py.File(other, "w") as o:
                o["d"] = data
            layout = h5py.VirtualLayout(shape=data.shape, dtype=data.dtype)
            layout[...] = h5py.VirtualSource(str(other), "d", shape=data.shape)
            f.create_virtual_dataset(name, layout)
        elif variant == 2:
            f["moved"] = data
            f[name] = h5py.SoftLink("/moved")
        elif variant == 3:
            with h5py.File(other, "w") as o:
                o["d"] = data
            f[name] = h5py.ExternalLink(str(other), "/d")
        elif variant == 4:
            f.create_dataset(name, data=data, compression="gzip", chunks=True)
        elif variant == 5:
            f.create_dataset(name, data=data, chunks=True, fletcher32=True)
        elif variant == 6:
            f.create_dataset(name, data=data.astype(data.dtype.newbyteorder(">")))
        elif variant == 7:
            f[name] = data
            f["unexpected"] = data
        elif variant == 8:
            f.create_group(name)
        elif variant == 9:
            f[name] = data.reshape(-1)[:-1] if data.size else np.zeros(1, data.dtype)
        else:
            f[name] = data
            f[name].attrs["note"] = 1
    recompute_digest(path)


def oversize(path: Path, rng: np.random.Generator) -> None:
    """Declarations far beyond what the file holds: huge unallocated datasets, lengths or T, a huge attribute."""
    variant = int(rng.integers(6))
    with h5py.File(path, "r+") as f:
        if variant == 0:  # a dataset declaring 4 GiB, no storage
            name = str(rng.choice(sorted(f)))
            dtype = f[name].dtype
            del f[name]
            f.create_dataset(name, shape=(2**32 // dtype.itemsize,), dtype=dtype)
        elif variant == 1:  # lengths claiming 2^30 entries per head
            lengths = f["lengths"][()]
            del f["lengths"]
            f["lengths"] = np.full_like(lengths, 2**30)
        elif variant == 2:  # an attribute declaring 2 MiB
            f.attrs.create("meta", np.array(b"{}", dtype="S2097152"))
        elif variant == 3:  # an array attribute of 10^6 ints
            f.attrs.create("format_version", np.full(10**6, 2, dtype=np.int64))
        elif variant == 4:  # 4 GiB unallocated dataset under a new name
            f.create_dataset("huge", shape=(2**30,), dtype="<f4")
    if variant == 5:  # T and lengths forged to need a 40 GB mask, digest recomputed
        meta = read_meta_json(path)
        meta["T"] = 2**31 - 1
        set_meta(path, meta, recompute=True)
    elif variant == 1:
        recompute_digest(path)


# ---- outcomes -------------------------------------------------------------------------------------------------------
def same_cache(a, b) -> bool:
    return a.logical_length == b.logical_length and len(a.layers) == len(b.layers) and all(
        torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values) and torch.equal(x.beta, y.beta)
        for x, y in zip(a.layers, b.layers))


def _json_refusal(output: str) -> bool:
    """inspect --json's verdict on a refused file: valid JSON, integrity not ok, a one-line error message."""
    try:
        verdict = json.loads(output)["integrity"]
    except (ValueError, KeyError, TypeError):
        return False
    return verdict.get("ok") is False and isinstance(verdict.get("error"), str) and "\n" not in verdict["error"] \
        and bool(verdict["error"])


def outcome(path: Path, ref, model, tokenizer, kind: str) -> tuple[str, str]:
    """('rejected' | 'identical' | 'other', detail) for one corrupted file, through every read path: inspect
    --no-verify's read (without the digest, decode, count bytes: may show altered data, must not crash),
    generate's read_meta, the CLI's inspect (all but bit flips, to keep the test short), and load_cache."""
    def refused(e: Exception) -> tuple[str, str]:
        msg = str(e)
        ok = isinstance(e, ArtifactError) and msg and "\n" not in msg
        return ("rejected" if ok else "other"), f"{type(e).__name__}: {msg[:200]}"

    for read in (lambda: byte_breakdown(art) if decode_layers(art := read_artifact(path, verify=False)) else None,
                 lambda: read_meta(path)):
        try:
            read()
        except Exception as e:
            if refused(e)[0] == "other":
                return refused(e)
    if kind != "flip":  # the CLI's inspect on every edited file (its report formats every validated field)
        for args in (["inspect", str(path)], ["inspect", str(path), "--no-verify"], ["inspect", str(path), "--json"]):
            r = CliRunner().invoke(cli, args)
            lines = r.output.strip().splitlines()
            if "--json" in args:  # a refusal is the JSON verdict {"integrity": {"ok": false, "error": one line}}
                refused_ok = r.exit_code == 1 and _json_refusal(r.output)
            else:
                refused_ok = r.exit_code == 1 and bool(lines) and lines[-1].startswith("Error:")
            if r.exit_code not in (0, 1) or r.exit_code == 1 and not refused_ok \
                    or r.exception is not None and not isinstance(r.exception, SystemExit):
                return "other", f"inspect {args[2:]}: exit {r.exit_code} {r.exception!r} {r.output[-200:]}"
    try:
        cache = load_cache(path, model, tokenizer)
    except Exception as e:
        return refused(e)
    return ("identical", "") if same_cache(cache, ref) else ("other", "loaded a different cache")


# ---- the test -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bases(tmp_path_factory, tiny_llama, doc_text):
    """(artifact, model, tokenizer): K4V3 + K8V8 lloyd AM at 4x; bf16 16-bit at ratio 1 (beta zero, positions
    all); head dim 32 with q4_0 keys, q8_0 values, eviction at 8x; a reasoning trace stored per phase with a
    calibration (phases, phase_lengths, fitted codebooks under their own names)."""
    from conftest import make_tiny_model
    from compactor.capture.documents import Document
    from compactor.methods import make_method
    from compactor.models import load_model
    from compactor.pipeline import CompressOptions, compress

    root = tmp_path_factory.mktemp("corruption")
    doc = Document("story", doc_text)
    d32 = load_model(str(make_tiny_model(root / "d32", "llama", seed=3, head_dim=32)))
    d16 = load_model(str(tiny_llama))
    from calib_helpers import write_synthetic_calibration
    from compactor.storage.calibration_file import read_calibration
    from test_calibrated_compress import TRACE

    cal = read_calibration(write_synthetic_calibration(root / "cal.h5", d16))
    out = []
    for lm, method, opts in [
            (d16, "am", CompressOptions(ratio=4, kv_bits="K4V3", hi_layers=(0,), max_queries=64)),
            (d16, "am", CompressOptions(ratio=1, max_queries=64, max_tokens=300)),
            (d32, "eviction", CompressOptions(ratio=8, kv_bits="Kq4_0Vq8_0", max_queries=64)),
            (d16, "am", CompressOptions(ratio=2, kv_bits="K4V4", max_queries=64, calibration=cal))]:
        text = Document("trace", TRACE) if opts.calibration is not None else doc
        path, *_ = compress(lm, text, make_method(method), root / f"{method}-{opts.kv_bits}-{opts.ratio}.h5", opts,
                            progress=False)
        if opts.calibration is not None:
            assert "phases" in read_meta(path) and "@" in read_meta(path)["layer_codecs"]
        out.append((path, lm.model, lm.tokenizer))
    return out


def test_corruptions_are_refused_or_harmless(bases, tmp_path):
    counts: Counter = Counter()
    others, peaks = [], {}
    case = 0
    tracemalloc.start()
    try:
        for b, (base, model, tokenizer) in enumerate(bases):
            ref = load_cache(base, model, tokenizer)
            cache_bound = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * \
                model.config.max_position_embeddings * model.model.layers[0].self_attn.head_dim * 4
            data = base.read_bytes()
            for kind, n in KINDS.items():
                for _ in range(n):
                    case += 1
                    rng = np.random.default_rng(case)
                    path = tmp_path / f"c{case}.h5"
                    if kind == "flip":
                        buf = bytearray(data)
                        i = int(rng.integers(len(buf)))
                        buf[i] ^= 1 << int(rng.integers(8))
                        path.write_bytes(bytes(buf))
                    elif kind == "truncate":
                        path.write_bytes(data[: int(rng.integers(len(data)))])
                    elif kind == "zero":
                        buf = bytearray(data)
                        i, n_zero = int(rng.integers(len(buf))), int(rng.integers(1, 4097))
                        buf[i:i + n_zero] = bytes(len(buf[i:i + n_zero]))
                        path.write_bytes(bytes(buf))
                    else:
                        shutil.copyfile(base, path)
                        if kind == "meta_edit":
                            meta_edit(path, rng)
                        elif kind == "meta_forged":
                            meta_forged(path, rng)
                        elif kind == "dataset_forged":
                            dataset_forged(path, rng, tmp_path)
                        else:
                            oversize(path, rng)
                    before = tracemalloc.get_traced_memory()[0]
                    tracemalloc.reset_peak()
                    result, detail = outcome(path, ref, model, tokenizer, kind)
                    peak = tracemalloc.get_traced_memory()[1] - before
                    peaks[kind] = max(peaks.get(kind, 0), peak)
                    counts[kind, result] += 1
                    if result == "other":
                        others.append(f"base {b} {kind} case {case}: {detail}")
                    if peak > cache_bound:
                        others.append(f"base {b} {kind} case {case}: peak traced memory {peak} > {cache_bound}")
                    path.unlink()
    finally:
        tracemalloc.stop()
    table = "\n".join(f"  {kind:15s} rejected {counts[kind, 'rejected']:4d}  identical {counts[kind, 'identical']:4d}  "
                      f"other {counts[kind, 'other']:3d}  peak traced {peaks[kind] / 1024:8.1f} KiB"
                      for kind in KINDS)
    print(f"\ncorruptions of {len(bases)} artifacts ({sum(counts.values())} cases):\n{table}")
    assert sum(counts.values()) >= 500
    assert not others, "\n".join(others[:20])
