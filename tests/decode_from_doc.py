"""An independent decoder of schema v2 artifacts written from artifacts/README.md alone: h5py and numpy, no
compactor import. `decode(path)` verifies the digest and returns T and, per layer, per head, the decoded keys,
values (float32), beta and positions. tests/test_doc_decoder.py compares it with compactor's decoder.

Run: python tests/decode_from_doc.py ARTIFACT.h5   (prints a summary)
"""
from __future__ import annotations

import hashlib
import json
import sys

import h5py
import numpy as np

STORED = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18}


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def stored_to_f32(arr: np.ndarray, stored: str) -> np.ndarray:
    if stored == "bfloat16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


def mt_words(seed: int, n: int) -> np.ndarray:
    """The first n 32-bit outputs of MT19937 after init_genrand(seed)."""
    return np.random.RandomState(seed).randint(0, 2**32, size=n, dtype=np.uint64)


def hadamard(d: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h


def gaussian_matrix(d: int, seed: int) -> np.ndarray:
    n = d * d
    w = mt_words(seed, 2 * (n + 16))
    u = ((w[0::2] << np.uint64(32)) | w[1::2]) & np.uint64((1 << 53) - 1)
    u = u.astype(np.float64) * 2.0**-53

    def block(x):
        r, theta = np.sqrt(-2 * np.log(1 - x[:8])), 2 * np.pi * x[8:16]
        return np.concatenate([r * np.cos(theta), r * np.sin(theta)])

    z = u[:n].copy()
    for i in range(0, n - 15, 16):
        z[i:i + 16] = block(u[i:i + 16])
    if n % 16:
        z[n - 16:] = block(u[n:n + 16])
    return z.reshape(d, d)


def rotation_inverse(y: np.ndarray, d: int, seed: int) -> np.ndarray:
    """R^T y for rows y (n, d)."""
    y = y.astype(np.float64)
    if d & (d - 1) == 0:
        s = 2.0 * (mt_words(seed, d) % 2).astype(np.float64) - 1
        return (y @ hadamard(d).T / np.sqrt(d)) * s
    q, r = np.linalg.qr(gaussian_matrix(d, seed))
    q = q * np.sign(np.diag(r))
    return y @ q  # rows: (Q^T y^T)^T


def unpack_codes(packed: np.ndarray, bits: int, d: int) -> np.ndarray:
    stream = np.unpackbits(packed, axis=-1, bitorder="little")[:, : d * bits].reshape(-1, d, bits)
    return (stream.astype(np.int64) << np.arange(bits)).sum(-1)


def blocks_decode(rows: np.ndarray, codec: str, d: int) -> np.ndarray:
    blk = rows.reshape(rows.shape[0], d // 32, BLOCK_BYTES[codec])
    scale = blk[..., :2].copy().view("<f2").astype(np.float32)  # (n, d/32, 1)
    if codec == "q8_0":
        q = blk[..., 2:].copy().view(np.int8).astype(np.float32)
    else:
        nib = blk[..., 2:]
        q = np.concatenate([nib & 0x0F, nib >> 4], axis=-1).astype(np.float32) - 8
    return (q * scale).reshape(rows.shape[0], d)


def parse_label(label: str) -> tuple[str, str]:
    assert label[0] == "K" and "V" in label[1:], label
    k, v = label[1:].split("V", 1)
    return k, v


def decode(path: str) -> dict:
    with h5py.File(path, "r") as f:
        assert sorted(f.attrs) == ["digest_sha256", "format", "format_version", "meta"]
        assert f.attrs["format"] == b"compactor-kv" and int(f.attrs["format_version"]) == 2
        meta = json.loads(f.attrs["meta"])
        digest = f.attrs["digest_sha256"].decode()
        data = {name: f[name][()] for name in f}
    h = hashlib.sha256(b"compactor-kv/2\n")
    h.update(canonical({"format": "compactor-kv", "format_version": 2, "meta": meta}))
    h.update(b"\n")
    for name in sorted(data):
        arr = data[name]
        h.update(f"{name}|{arr.dtype.str}|{','.join(map(str, arr.shape))}|".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    assert h.hexdigest() == digest, "digest mismatch"

    T, d, Hkv = meta["T"], meta["head_dim"], meta["num_kv_heads"]
    stored, seed, exact = meta["stored_dtype"], meta["rotation_seed"], meta["lloyd_exact"]
    lengths = data["lengths"]
    offsets: dict[str, int] = {}

    def take(name: str, count: int) -> np.ndarray:
        start = offsets.get(name, 0)
        offsets[name] = start + count
        return data[name][start:start + count]

    def decode_unit(t: str, part: str, n: list[int]) -> np.ndarray:
        """Rows (sum(n), d) of keys or values of one storage unit whose heads keep n[h] entries."""
        N = sum(n)
        if part == "16":
            return stored_to_f32(take(t, N), stored)
        if part in BLOCK_BYTES:
            return blocks_decode(take(f"{t}_{part}", N), part, d)
        bits, _, book_id = part.partition("@")
        b = int(bits)
        width = (d * b + 7) // 8
        codes = unpack_codes(take(f"{t}_codes", N * width).reshape(N, width), b, d)
        gains = take(f"{t}_gains", N).astype(np.float32)
        means = take(f"{t}_mean", Hkv).astype(np.float32)
        book = data[f"codebook_{book_id}" if book_id else f"codebook_b{b}"]
        y = book[codes]
        x = np.empty((N, d), np.float32)
        e = min([exact] + n)
        if exact:
            ex = stored_to_f32(take(f"{t}_exact", Hkv * e), stored)
            rows = take(f"{t}_exact_rows", Hkv * e).reshape(Hkv, e)
        start = 0
        for hh, nh in enumerate(n):
            xh = (means[hh] + gains[start:start + nh, None] * rotation_inverse(y[start:start + nh], d, seed)
                  ).astype(np.float32)
            if exact:
                xh[rows[hh]] = ex[hh * e:(hh + 1) * e]
            x[start:start + nh] = xh
            start += nh
        return x

    # positions, per layer per head
    enc = meta["positions"]
    phases = meta.get("phases")
    layers = []
    for l, entry in enumerate(meta["layer_codecs"].split(",")):
        n = [int(x) for x in lengths[l]]
        N = sum(n)
        beta = take("beta", N).astype(np.float32) if meta["beta"] == "stored" else np.zeros(N, np.float32)
        if enc == "all":
            pos = [np.arange(T) for _ in n]
        elif enc == "bitmap":
            pos = [np.flatnonzero(np.unpackbits(data["positions_bitmap"][l, h], bitorder="little")[:T])
                   for h in range(Hkv)]
        else:
            pos = []
            for nh in n:
                g = take("positions_delta", nh).astype(np.int64)
                pos.append(np.cumsum(g + 1) - 1)
        out = {"beta": beta, "positions": pos, "lengths": n}
        units = entry.split("/")  # one label, or one per phase
        unit_n = [n] if phases is None else [[int(x) for x in row] for row in data["phase_lengths"][l]]
        assert len(units) == len(unit_n)
        for t in ("keys", "values"):
            per_unit = [decode_unit(t, parse_label(label)[t == "values"], un) for label, un in zip(units, unit_n)]
            heads = []
            for h in range(Hkv):  # head h: its rows of each phase, phases in order (= position order)
                heads += [x[sum(un[:h]):sum(un[:h + 1])] for x, un in zip(per_unit, unit_n)]
            out[t] = np.concatenate(heads) if heads else np.zeros((0, d), np.float32)
        layers.append(out)
    for name, arr in data.items():
        if name in offsets:
            assert offsets[name] == arr.shape[0], f"{name} not used up"
    return {"T": T, "layers": layers}


if __name__ == "__main__":
    result = decode(sys.argv[1])
    total = sum(sum(layer["lengths"]) for layer in result["layers"])
    print(f"T={result['T']}, {len(result['layers'])} layers, {total} entries, digest OK")
