"""Schema v2's dataset layout: one dataset per kind of array, all layers concatenated in layer order.

The per-layer arrays (`kv_codec.encode_layer`'s names: keys, keys_codes, keys_gains, ...) are packed into a few
root datasets; where each layer's slice starts is not stored but follows from the attributes and `lengths`
(a reader walks the layers in order, and every dataset must be used up exactly). Fewer datasets is what keeps the
file within a few KB of its payload: v1 kept ~13 chunked datasets per layer, and their chunk indexes and object
headers were up to half of a small quantized file.

Kinds (for t in keys, values; present when at least one layer uses them):
  lengths            int32 (L, Hkv)                      entries kept per head
  beta               float32 (N,)                        only when attribute beta = 'stored' (else all zero)
  positions_bitmap   uint8 (L, Hkv, ceil(T/8))           attribute positions = 'bitmap'
  positions_delta    uint8/16/32 (N,)                    positions = 'delta8/16/32': per head p0, then p_i - p_{i-1} - 1
  t                  stored dtype (N_raw, d)             raw layers
  t_codes            uint8 (sum N_l * ceil(d*b_l/8),)    lloyd layers, each layer's (N_l, ceil(d*b_l/8)) flattened
  t_gains            float16 (N_lloyd,)
  t_mean             lloyd mean dtype (L_lloyd * Hkv, d)
  t_exact            stored dtype (sum Hkv * e_l, d)     lloyd_exact > 0; e_l = min(lloyd_exact, shortest head)
  t_exact_rows       int32 (sum Hkv * e_l,)
  t_q8_0 / t_q4_0    uint8 (N_q, d/32 * 34 or 18)        llama.cpp blocks
  codebook_b<b>      float32 (2^b,)                      one per lloyd bit width used with the Beta codebook
  codebook_<id>      float32 (2^b,)                      one per custom codebook id (e.g. fitted by calibration)
  phase_lengths      int32 (L, P, Hkv)                   only when the meta has `phases`: entries per head per phase
With `phases`, each layer's codec datasets are walked per phase unit (layer-major, then phase), as if each
(layer, phase) were a layer keeping phase_lengths[l, p] entries per head; beta and positions stay per layer.
  model_weights_kept uint16 (tensors, 8)                 bf16 values of the weights identity
"""
from __future__ import annotations

import math

import numpy as np

from .kv_codec import KVCodec, TensorCodec, book_key, codec_from_label, exact_count, tensor_attrs, tensor_specs

POSITION_WIDTHS = {"delta8": np.dtype("u1"), "delta16": np.dtype("<u2"), "delta32": np.dtype("<u4")}
IDENTITY_DATASET = "model_weights_kept"


def _root_name(tensor: str, codec: TensorCodec, layer_name: str) -> str:
    """Root dataset holding a layer's array `layer_name` of one of keys/values (block codecs: one per codec)."""
    if codec.name in ("q8_0", "q4_0"):
        return f"{tensor}_{codec.name}"
    return layer_name


def unit_prefixes(n_units: int, phased: bool) -> list[str]:
    """Prefix of each storage unit's per-layer array names: '' for a plain layer, 'p<p>.' per phase."""
    return [f"p{p}." for p in range(n_units)] if phased else [""]


def layer_specs(codecs: list[KVCodec], unit_lengths: list[list[int]], d: int, stored: str, mean_dtype: str,
                phased: bool = False) -> dict:
    """{per-layer array name: (root dataset, dtype, shape of the layer's slice)} for keys and values of each storage
    unit (one, or one per phase with `phased`), in the order the units are stored."""
    out = {}
    for prefix, codec, row in zip(unit_prefixes(len(codecs), phased), codecs, unit_lengths):
        for t, part in (("keys", codec.keys), ("values", codec.values)):
            for name, (dtype, shape) in tensor_specs(prefix + t, part, row, d, stored, mean_dtype).items():
                out[name] = (_root_name(t, part, name[len(prefix):]), dtype, shape)
    return out


def book_dataset(part: TensorCodec) -> str:
    """Root dataset of a lloyd tensor's codebook: `codebook_b<b>` (Beta) or `codebook_<id>` (custom)."""
    return f"codebook_{part.codebook}" if part.codebook else f"codebook_b{part.bits}"


def _flat(root: str, shape: tuple) -> tuple:
    """Shape of a layer's slice inside the root dataset: codes and exact rows are stored flat."""
    if root.endswith("_codes") or root.endswith("_exact_rows"):
        return (math.prod(shape),)
    return shape


def _unit_lengths(meta: dict, lengths: np.ndarray, phase_lengths: np.ndarray | None, l: int) -> list[list[int]]:
    return phase_lengths[l].tolist() if "phases" in meta else [lengths[l].tolist()]


def dataset_specs(meta: dict, lengths: np.ndarray, phase_lengths: np.ndarray | None = None
                  ) -> dict[str, tuple[np.dtype, tuple]]:
    """Every root dataset a v2 file with these (validated) attributes, lengths (L, Hkv) and, with `phases`,
    phase_lengths (L, P, Hkv) must hold, exactly."""
    d, T, stored, mean = meta["head_dim"], meta["T"], meta["stored_dtype"], meta["lloyd_mean_dtype"]
    L, H = lengths.shape
    N = int(lengths.sum())
    phased = "phases" in meta
    specs: dict[str, list] = {}
    for l, codecs in enumerate(meta["codecs"]):
        rows = _unit_lengths(meta, lengths, phase_lengths, l)
        for name, (root, dtype, shape) in layer_specs(codecs, rows, d, stored, mean, phased).items():
            flat = _flat(root, shape)
            if root in specs:
                specs[root][1] = (specs[root][1][0] + flat[0], *flat[1:])
            else:
                specs[root] = [dtype, flat]
        for part in (p for c in codecs for p in (c.keys, c.values)):
            if part.name == "lloyd":
                specs.setdefault(book_dataset(part), [np.dtype("<f4"), (2 ** part.bits,)])
    out = {k: (v[0], tuple(v[1])) for k, v in specs.items()}
    out["lengths"] = (np.dtype("<i4"), (L, H))
    if phased:
        out["phase_lengths"] = (np.dtype("<i4"), (L, len(meta["phases"]["names"]), H))
    if meta["beta"] == "stored":
        out["beta"] = (np.dtype("<f4"), (N,))
    if meta["positions"] == "bitmap":
        out["positions_bitmap"] = (np.dtype("u1"), (L, H, (T + 7) // 8))
    elif meta["positions"] in POSITION_WIDTHS:
        out["positions_delta"] = (POSITION_WIDTHS[meta["positions"]], (N,))
    out[IDENTITY_DATASET] = (np.dtype("<u2"), (meta["model_weights"]["tensors"], 8))
    return out


# ---- positions ------------------------------------------------------------------------------------------------------
def encode_positions(positions: list[np.ndarray], lengths: np.ndarray, T: int) -> tuple[str, np.ndarray | None]:
    """(encoding, dataset) for the per-layer positions (N_l,) int: the smallest of 'all' (every head keeps
    0..T-1: nothing stored), a bitmap of kept positions per head, or per-head deltas minus one in the narrowest
    unsigned width. Each head's positions must be strictly increasing in [0, T) (the methods' contract)."""
    L, H = lengths.shape
    heads = []
    for l, pos in enumerate(positions):
        start = 0
        for n in lengths[l].tolist():
            p = np.asarray(pos[start:start + n], dtype=np.int64)
            if p.size and (p[0] < 0 or p[-1] >= T or (np.diff(p) <= 0).any()):
                raise ValueError("kept positions must be strictly increasing in [0, T) within each head")
            heads.append(p)
            start += n
    if all(p.size == T for p in heads):
        return "all", None
    gaps = np.concatenate([np.diff(p, prepend=-1) - 1 for p in heads]) if heads else np.zeros(0, np.int64)
    top = int(gaps.max()) if gaps.size else 0
    width = "delta8" if top < 2**8 else "delta16" if top < 2**16 else "delta32"
    delta_bytes = gaps.size * POSITION_WIDTHS[width].itemsize
    bitmap_bytes = L * H * ((T + 7) // 8)
    if bitmap_bytes <= delta_bytes:
        bits = np.zeros((L * H, (T + 7) // 8 * 8), dtype=np.uint8)
        for i, p in enumerate(heads):
            bits[i, p] = 1
        return "bitmap", np.packbits(bits, axis=-1, bitorder="little").reshape(L, H, -1)
    return width, gaps.astype(POSITION_WIDTHS[width])


def decode_positions(encoding: str, data: np.ndarray | None, lengths: np.ndarray, T: int) -> list[np.ndarray]:
    """Per layer (N_l,) int32 positions. Raises ValueError when the data disagree with lengths or T."""
    L, H = lengths.shape
    if encoding == "all":
        if (lengths != T).any():
            raise ValueError("positions = 'all' but a head keeps fewer than T entries")
        return [np.tile(np.arange(T, dtype=np.int32), H) for _ in range(L)]
    if encoding == "bitmap":
        bits = np.unpackbits(data.reshape(L * H, -1), axis=-1, bitorder="little")
        if bits[:, T:].any():
            raise ValueError("positions bitmap marks positions >= T")
        if (bits.sum(-1, dtype=np.int64) != lengths.reshape(-1)).any():
            raise ValueError("positions bitmap disagrees with lengths")
        flat = [np.flatnonzero(row).astype(np.int32) for row in bits]
        return [np.concatenate(flat[l * H:(l + 1) * H]) for l in range(L)]
    out, start = [], 0
    gaps = data.astype(np.int64)
    for l in range(L):
        heads = []
        for n in lengths[l].tolist():
            p = np.cumsum(gaps[start:start + n] + 1) - 1
            if p.size and p[-1] >= T:
                raise ValueError(f"a kept position lies beyond T={T}")
            heads.append(p.astype(np.int32))
            start += n
        out.append(np.concatenate(heads))
    return out


# ---- pack / unpack --------------------------------------------------------------------------------------------------
def _units(layer) -> list[tuple[str, list[int]]]:
    """(array-name prefix, per-head entries) of each storage unit of a StoredLayer."""
    split = layer.arrays.get("phase_lengths")
    if split is None:
        return [("", [int(n) for n in layer.arrays["lengths"]])]
    return [(f"p{p}.", [int(n) for n in row]) for p, row in enumerate(np.asarray(split))]


def _file_params(layers) -> dict:
    """stored dtype, rotation seed, exact count and mean dtype shared by every layer (ValueError if they differ)."""
    seen = {"stored": set(), "seed": set(), "mean": set()}
    exacts, exact_present = [], set()
    for layer in layers:
        a = layer.attrs
        for prefix, lengths in _units(layer):
            for t in (prefix + "keys", prefix + "values"):
                if a.get(f"{t}_codec") == "raw":
                    seen["stored"].add(a[f"{t}_dtype"])
                if a.get(f"{t}_codec") == "lloyd":
                    seen["seed"].add(int(a[f"{t}_seed"]))
                    seen["mean"].add(layer.arrays[f"{t}_mean"].dtype.str)
                    rows = layer.arrays.get(f"{t}_exact_rows")
                    exact_present.add(rows is not None)
                    if rows is not None:
                        seen["stored"].add(a[f"{t}_exact_dtype"])
                        exacts.append((rows.shape[1], lengths))
    for k in ("stored", "seed"):
        if len(seen[k]) > 1:
            raise ValueError(f"layers disagree on {k}: {sorted(seen[k])}")
    if len(exact_present) > 1:
        raise ValueError("some lloyd tensors keep exact entries and others do not")
    exact = max((e for e, _ in exacts), default=0)
    if any(e != exact_count(exact, lengths) for e, lengths in exacts):
        raise ValueError("lloyd tensors disagree on the number of exact entries per head")
    return {"stored_dtype": next(iter(seen["stored"]), "bfloat16"), "rotation_seed": next(iter(seen["seed"]), 0),
            "lloyd_exact": exact, "lloyd_mean_dtype": "float32" if "<f4" in seen["mean"] else "float16"}


def _phases(layers) -> dict | None:
    """The file's `phases` field ({names, bounds}) when the layers are phased (all alike), else None."""
    found = {(tuple(layer.attrs["phase_names"]), tuple(layer.attrs["phase_bounds"])) if "phase_lengths" in
             layer.arrays else None for layer in layers}
    if len(found) != 1:
        raise ValueError("layers disagree on phases (all layers of a file share the same phases or none)")
    only = found.pop()
    return None if only is None else {"names": list(only[0]), "bounds": [int(b) for b in only[1]]}


def pack(layers, codebooks: dict[str, np.ndarray], T: int, head_dim: int) -> tuple[dict, dict[str, np.ndarray]]:
    """Per-layer arrays (StoredLayer: arrays and attrs of `kv_codec.encode_layer`) -> (the file attributes this
    layout defines, root datasets). Raises ValueError when the layers do not fit one file."""
    params = _file_params(layers)
    phases = _phases(layers)
    labels = [str(layer.attrs["kv_codec"]) for layer in layers]
    lengths = np.stack([np.asarray(layer.arrays["lengths"], dtype=np.int32) for layer in layers])
    parts: dict[str, list[np.ndarray]] = {}
    books: dict[str, tuple[int, np.ndarray]] = {}
    for layer, label in zip(layers, labels):
        units = _units(layer)
        codecs = [codec_from_label(x, params["lloyd_exact"]) for x in label.split("/")]
        if len(codecs) != len(units):
            raise ValueError(f"layer codec {label!r} names {len(codecs)} phases, the layer stores {len(units)}")
        specs = layer_specs(codecs, [u[1] for u in units], head_dim, params["stored_dtype"],
                            params["lloyd_mean_dtype"], phases is not None)
        for name, (root, dtype, shape) in specs.items():
            arr = np.asarray(layer.arrays[name])
            if arr.shape != shape or arr.dtype != dtype and not name.endswith("_mean"):  # means: fp16 -> fp32 exact
                raise ValueError(f"layer array {name} is {arr.dtype.str} {arr.shape}, expected {dtype.str} {shape}")
            parts.setdefault(root, []).append(arr.astype(dtype).reshape(_flat(root, shape)))
        for part in (p for c in codecs for p in (c.keys, c.values)):
            if part.name == "lloyd":
                book = np.asarray(codebooks[book_key(part, head_dim)], dtype="<f4")
                name = book_dataset(part)
                if name in books and (books[name][0] != part.bits or not np.array_equal(books[name][1], book)):
                    raise ValueError(f"codebook {name} is used with two bit widths or two sets of centroids")
                books[name] = (part.bits, book)
    datasets = {k: np.concatenate(v) for k, v in parts.items()}
    datasets.update({name: book for name, (_, book) in books.items()})
    beta = np.concatenate([np.asarray(layer.arrays["beta"], dtype="<f4") for layer in layers])
    unit_labels = {x for label in labels for x in label.split("/")}
    attrs = {**params, "layer_codecs": ",".join(labels), "kv_bits": ",".join(sorted(unit_labels)),
             "beta": "zero" if not beta.any() else "stored"}
    if phases is not None:
        attrs["phases"] = phases
        datasets["phase_lengths"] = np.stack([np.asarray(layer.arrays["phase_lengths"], dtype="<i4")
                                              for layer in layers])
    if attrs["beta"] == "stored":
        datasets["beta"] = beta
    encoding, pos = encode_positions([layer.arrays["positions"] for layer in layers], lengths, T)
    attrs["positions"] = encoding
    if pos is not None:
        datasets["positions_bitmap" if encoding == "bitmap" else "positions_delta"] = pos
    datasets["lengths"] = lengths.astype("<i4")
    return attrs, datasets


def check_phase_positions(positions: np.ndarray, lengths: list[int], split: np.ndarray, bounds: list[int]) -> None:
    """Each head's count of positions inside each phase's range equals phase_lengths (ValueError otherwise)."""
    start = 0
    for h, n in enumerate(lengths):
        counts = np.diff(np.searchsorted(positions[start:start + n], bounds, side="left"))  # sorted per head
        if (counts != split[:, h]).any():
            raise ValueError("phase_lengths disagree with the kept positions and the phase bounds")
        start += n


def unpack(meta: dict, data: dict[str, np.ndarray]) -> tuple[list[tuple[dict, dict]], dict[str, np.ndarray]]:
    """Root datasets (shapes checked against `dataset_specs`) -> per layer (arrays, attrs) as
    `kv_codec.decode_layer` reads them (slices of the datasets, no copy), and the codebooks by name.
    Raises ValueError on inconsistent content."""
    d, T, stored, mean = meta["head_dim"], meta["T"], meta["stored_dtype"], meta["lloyd_mean_dtype"]
    lengths = data["lengths"]
    phase_lengths = data.get("phase_lengths")
    phased = "phases" in meta
    positions = decode_positions(meta["positions"], data.get("positions_bitmap", data.get("positions_delta")),
                                 lengths, T)
    beta = data.get("beta")
    offsets: dict[str, int] = {}
    layers, books = [], {}
    n_start = 0
    for l, codecs in enumerate(meta["codecs"]):
        row = lengths[l].tolist()
        N = sum(row)
        arrays = {"lengths": lengths[l].copy(), "positions": positions[l],
                  "beta": beta[n_start:n_start + N] if beta is not None else np.zeros(N, dtype=np.float32)}
        n_start += N
        units = _unit_lengths(meta, lengths, phase_lengths, l)
        attrs = {"kv_codec": "/".join(c.label for c in codecs)}
        if phased:
            arrays["phase_lengths"] = phase_lengths[l].copy()
            if (phase_lengths[l] < 0).any() or (phase_lengths[l].sum(0) != lengths[l]).any():
                raise ValueError(f"layer {l}: phase_lengths do not add up to lengths")
            check_phase_positions(positions[l], row, phase_lengths[l], meta["phases"]["bounds"])
            attrs.update({"phase_bounds": list(meta["phases"]["bounds"]), "phase_names": list(meta["phases"]["names"])})
        for name, (root, dtype, shape) in layer_specs(codecs, units, d, stored, mean, phased).items():
            flat = _flat(root, shape)
            start = offsets.get(root, 0)
            arrays[name] = data[root][start:start + flat[0]].reshape(shape)
            offsets[root] = start + flat[0]
        for prefix, codec in zip(unit_prefixes(len(codecs), phased), codecs):
            for t, part in (("keys", codec.keys), ("values", codec.values)):
                attrs.update(tensor_attrs(prefix + t, part, stored, meta["rotation_seed"], d))
                if part.name == "lloyd":
                    book = data[book_dataset(part)]
                    if not (np.isfinite(book).all() and (np.diff(book) > 0).all() and np.abs(book).max() <= 1):
                        raise ValueError(f"{book_dataset(part)} is not an ascending codebook in [-1, 1]")
                    books[book_key(part, d)] = book
        layers.append((arrays, attrs))
    return layers, books
