"""How compact keys and values are stored: raw 16/32-bit, or quantized (lloyd, q8_0, q4_0), per layer.

A layer's entries are stored ragged: the kept entries of its KV heads one after another (N = sum of per-head
lengths rows), so heads of unequal length cost no padding on disk. Each of keys and values has its own codec:

- raw:   `<t>` (N, d) in the stored dtype (bfloat16 as its uint16 bit pattern);
- lloyd: `<t>_codes` (N, ceil(d*b/8)) uint8 bit-packed Lloyd-Max codes of the rotated unit vectors,
         `<t>_gains` (N,) float16 per-vector gains, `<t>_mean` (Hkv, d) float16 per-head channel means
         (float32 beyond fp16's range; subtracted before rotation, so a shared k_proj bias does not eat the
         code range); rotation seed and codebook name in the layer attributes, the codebook's centroids once
         per file (the Beta codebook of the bit width, or a custom one, e.g. fitted by calibration, by its id);
         plus the `exact` most attended entries of each head kept in the stored dtype (`<t>_exact` (Hkv*e, d),
         `<t>_exact_rows` (Hkv, e) int32 row within the head). Measured on SmolLM2: the attention sink alone
         caused most of 4-bit keys' damage (cKL 0.0115 -> 0.0019 when it was kept exact): rotation spreads its
         large, far-from-the-mean components over every coordinate, and nearly every query attends to it;
- q8_0 / q4_0: `<t>_blocks` (N, d/32 * 34 or 18) uint8, llama.cpp's block layout byte for byte.
beta (N,) float32, positions (N,) int32 and lengths (Hkv,) int32 are always stored as they are.
A layer of a document with phases (a reasoning trace: prompt, think, answer) can use a PhasedCodec: the entries of
each phase form one unit stored with that phase's codec (arrays prefixed `p<p>.`, `phase_lengths` (P, Hkv)).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from ..layer_kv import LayerKV
from ..quant import (BLOCK_BYTES, Codebook, LloydCode, beta_codebook, lloyd_decode, lloyd_encode, packed_size,
                     q4_0_decode,
                     q4_0_encode, q8_0_decode, q8_0_encode)

STORED_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# how each stored dtype lies on disk (bfloat16 as its uint16 bit pattern), little-endian
STORED_NP = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}
MEAN_NP = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
BLOCK_CODECS = {"q8_0": (q8_0_encode, q8_0_decode), "q4_0": (q4_0_encode, q4_0_decode)}
CODECS = ("raw", "lloyd", *BLOCK_CODECS)
MAX_EXACT = 64  # lloyd: most exact entries per head a file may declare


EXACT_DEFAULT = 2  # lloyd: most attended entries per head kept unquantized


@dataclass(frozen=True)
class TensorCodec:
    """How one of keys/values is stored: name in {raw, lloyd, q8_0, q4_0}; bits for lloyd (1..8); exact: lloyd
    entries per head kept in the stored dtype (the most attended ones); codebook: for lloyd, the id of a custom
    codebook (e.g. fitted by calibration) the file carries as `codebook_<id>`, or None for the Beta codebook."""

    name: str = "raw"
    bits: int | None = None
    exact: int = 0
    codebook: str | None = None

    @property
    def label(self) -> str:
        if self.name == "lloyd":
            return f"{self.bits}@{self.codebook}" if self.codebook else str(self.bits)
        return {"raw": "16"}.get(self.name, self.name)


@dataclass(frozen=True)
class KVCodec:
    keys: TensorCodec = TensorCodec()
    values: TensorCodec = TensorCodec()

    @property
    def label(self) -> str:
        return f"K{self.keys.label}V{self.values.label}"

    @property
    def is_raw(self) -> bool:
        return self.keys.name == "raw" and self.values.name == "raw"


@dataclass(frozen=True)
class PhasedCodec:
    """One layer stored with a codec per phase of the document: phase p covers the token positions
    [bounds[p], bounds[p+1]) and each kept entry is stored with the codec of the phase its position lies in
    (a reasoning trace: prompt, think, answer). bounds: P+1 non-decreasing ints from 0 to T."""

    codecs: tuple[KVCodec, ...]
    bounds: tuple[int, ...]
    names: tuple[str, ...]

    def __post_init__(self):
        P = len(self.codecs)
        if not (P >= 1 and len(self.names) == P and len(self.bounds) == P + 1 and self.bounds[0] == 0
                and all(a <= b for a, b in zip(self.bounds, self.bounds[1:]))):
            raise ValueError(f"phases need P codecs, P names and P+1 non-decreasing bounds from 0; got "
                             f"{len(self.codecs)}, {len(self.names)}, {self.bounds}")

    @property
    def label(self) -> str:
        return "/".join(c.label for c in self.codecs)

    @property
    def is_raw(self) -> bool:
        return all(c.is_raw for c in self.codecs)

    def phase_of(self, positions: torch.Tensor) -> torch.Tensor:
        """Phase index (int64, same shape) of each token position."""
        inner = torch.tensor(self.bounds[1:-1], dtype=torch.int64, device=positions.device)
        return torch.searchsorted(inner, positions.to(torch.int64).contiguous(), right=True)


RAW = KVCodec()
_PART = r"(16|[1-8]|q8_0|q4_0)"
_ID = r"[a-z][a-z0-9_]{0,31}"
_STORED_PART = rf"(16|[1-8](?:@{_ID})?|q8_0|q4_0)"  # labels in files: lloyd bits may name a custom codebook


def _tensor_codec(part: str) -> TensorCodec:
    if part == "16":
        return TensorCodec("raw")
    if part in BLOCK_CODECS:
        return TensorCodec(part)
    bits, _, book = part.partition("@")
    if book and re.fullmatch(r"b[0-9]+", book):
        raise ValueError(f"codebook id {book!r} would collide with the Beta codebooks' names")
    return TensorCodec("lloyd", int(bits), EXACT_DEFAULT, book or None)


def parse_kv_bits(text: str) -> KVCodec:
    """'K4V3' (lloyd 4-bit keys, 3-bit values), 'K8V16' (16 = unquantized), 'Kq4_0Vq8_0', or 'q4_0' / 'q8_0'
    (both tensors); '16' or 'none' keeps both unquantized."""
    t = text.strip()
    if t.lower() in ("16", "none", "raw"):
        return RAW
    if t in BLOCK_CODECS:
        return KVCodec(TensorCodec(t), TensorCodec(t))
    m = re.fullmatch(f"K{_PART}V{_PART}", t)
    if not m:
        raise ValueError(f"bad --kv-bits {text!r}: expected K<b>V<b> with b in 1..8, 16, q8_0 or q4_0 "
                         "(e.g. K4V3, K8V16, Kq4_0Vq4_0), or q4_0 / q8_0 / 16")
    return KVCodec(_tensor_codec(m.group(1)), _tensor_codec(m.group(2)))


def codec_from_label(label: str, exact: int = EXACT_DEFAULT) -> KVCodec:
    """The strict inverse of KVCodec.label ('K4V3', 'K16Vq8_0', 'K4@k03V3', ...), with `exact` entries per lloyd
    head."""
    m = re.fullmatch(f"K{_STORED_PART}V{_STORED_PART}", label)
    if not m:
        raise ValueError(f"bad layer codec label {label!r:.80}")
    parts = [_tensor_codec(g) for g in m.groups()]
    return KVCodec(*(TensorCodec(p.name, p.bits, exact if p.name == "lloyd" else 0, p.codebook) for p in parts))


def unit_codecs(codec: KVCodec | PhasedCodec) -> list[KVCodec]:
    """The codecs of a layer's storage units: one per phase of a PhasedCodec, else the codec itself."""
    return list(codec.codecs) if isinstance(codec, PhasedCodec) else [codec]


def check_codec(codec: KVCodec | PhasedCodec, head_dim: int) -> None:
    for part in (p for c in unit_codecs(codec) for p in (c.keys, c.values)):
        if part.name in BLOCK_CODECS and head_dim % 32:
            raise ValueError(f"{part.name} needs a head dim that is a multiple of 32, this model has {head_dim}")
        if part.name == "lloyd" and head_dim < 4:
            raise ValueError(f"lloyd codes need a head dim of at least 4, this model has {head_dim}")


def codebook_name(bits: int, dim: int) -> str:
    return f"beta-b{bits}-d{dim}"


def book_key(part: TensorCodec, dim: int) -> str:
    """Name of a lloyd tensor's codebook in a `codebooks` dict: its custom id, or the Beta codebook's name."""
    return part.codebook or codebook_name(part.bits, dim)


def codebook_from_centroids(centroids: np.ndarray, dim: int) -> Codebook:
    """A Codebook (for lloyd_encode) from stored float32 centroids (ascending)."""
    c = torch.from_numpy(np.asarray(centroids, dtype=np.float32).astype(np.float64))
    return Codebook(c, (c[1:] + c[:-1]) / 2, float("nan"), int(dim))


def exact_count(exact: int, lengths: list[int]) -> int:
    """Entries per head a lloyd tensor keeps exact: `exact`, or fewer when a head is shorter."""
    return min([exact] + list(lengths))


def tensor_specs(name: str, codec: TensorCodec, lengths: list[int], d: int, stored: str, mean_dtype: str = "float16"
                 ) -> dict[str, tuple[np.dtype, tuple]]:
    """{array name: (dtype, shape)} that one of keys/values of a layer stores with `codec` (the layer's heads
    keep `lengths` entries each)."""
    N, H = sum(lengths), len(lengths)
    if codec.name == "raw":
        return {name: (STORED_NP[stored], (N, d))}
    if codec.name in BLOCK_CODECS:
        return {f"{name}_blocks": (np.dtype("u1"), (N, d // 32 * BLOCK_BYTES[codec.name]))}
    out = {f"{name}_codes": (np.dtype("u1"), (N, packed_size(d, codec.bits))),
           f"{name}_gains": (np.dtype("<f2"), (N,)),
           f"{name}_mean": (MEAN_NP[mean_dtype], (H, d))}
    if codec.exact:
        e = exact_count(codec.exact, lengths)
        out[f"{name}_exact"] = (STORED_NP[stored], (H * e, d))
        out[f"{name}_exact_rows"] = (np.dtype("<i4"), (H, e))
    return out


def tensor_attrs(name: str, codec: TensorCodec, stored: str, seed: int, d: int) -> dict:
    """The layer attributes describing one of keys/values (names as in schema v1's layer groups)."""
    attrs = {f"{name}_codec": codec.name}
    if codec.name == "raw":
        attrs[f"{name}_dtype"] = stored
    elif codec.name == "lloyd":
        attrs.update({f"{name}_bits": codec.bits, f"{name}_seed": seed, f"{name}_codebook": book_key(codec, d)})
        if codec.exact:
            attrs[f"{name}_exact_dtype"] = stored
    return attrs


def check_layer_arrays(arrays: dict[str, np.ndarray], T: int) -> None:
    """Content rules the writer guarantees, checked before decoding: each head's positions strictly increasing in
    [0, T), each lloyd head's exact rows strictly increasing inside the head. Raises ValueError."""
    lengths = [int(n) for n in arrays["lengths"]]
    starts = np.concatenate([[0], np.cumsum(lengths)])[:-1]
    pos = arrays["positions"].astype(np.int64)
    if pos.size:
        if pos.min() < 0 or pos.max() >= T:
            raise ValueError(f"a kept position lies outside 0..T-1 (T={T})")
        step = np.diff(pos)
        first = np.zeros(pos.size, dtype=bool)
        first[starts[np.array(lengths) > 0]] = True
        if (step[~first[1:]] <= 0).any():
            raise ValueError("a head's kept positions are not strictly increasing")
    for t in ("keys", "values"):
        rows = arrays.get(f"{t}_exact_rows")
        if rows is None or rows.size == 0:
            continue
        if (rows < 0).any() or (rows >= np.array(lengths)[:, None]).any() or (np.diff(rows, axis=1) <= 0).any():
            raise ValueError(f"{t}_exact_rows are not increasing rows inside each head")


def estimate_entry_bytes(codec: KVCodec | PhasedCodec, d: int, stored: str) -> float:
    """Stored bytes per kept entry (keys + values + beta + a position, at most), ignoring per-head means and exact
    rows (an upper bound for the free-space check, not an accounting; a phased layer: its largest phase codec)."""
    if isinstance(codec, PhasedCodec):
        return max(estimate_entry_bytes(c, d, stored) for c in codec.codecs)
    total = 8.0  # float32 beta + up to 4 bytes of position
    for part in (codec.keys, codec.values):
        if part.name == "lloyd":
            total += packed_size(d, part.bits) + 2  # codes + fp16 gain
        elif part.name in BLOCK_CODECS:
            total += d // 32 * BLOCK_BYTES[part.name]
        else:
            total += STORED_NP[stored].itemsize * d
    return total


def _to_stored(x: torch.Tensor, stored: str) -> np.ndarray:
    x = x.detach().cpu()
    if stored == "bfloat16":
        return x.to(torch.bfloat16).view(torch.uint16).numpy()
    return x.to(STORED_DTYPES[stored]).numpy()


def _from_stored(arr: np.ndarray, stored: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return (t.view(torch.bfloat16) if stored == "bfloat16" else t).float()


def _ragged(x: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    """(H, t_max, ...) padded -> per-head valid rows."""
    return [x[h, : int(n)] for h, n in enumerate(lengths)]


def _exact_rows(importance: list[torch.Tensor] | None, lengths: list[int], exact: int) -> torch.Tensor:
    """(Hkv, e) rows of each head kept exact: the e most important (ties and no importance: the first rows)."""
    e = min([exact] + lengths)
    rows = []
    for h, n in enumerate(lengths):
        score = importance[h].float() if importance is not None else -torch.arange(n, dtype=torch.float32)
        rows.append(torch.topk(score.cpu(), e).indices.sort().values)
    return torch.stack(rows).to(torch.int32) if rows else torch.zeros(0, 0, dtype=torch.int32)


def _encode_tensor(name: str, heads: list[torch.Tensor], codec: TensorCodec, stored: str, seed: int,
                   codebooks: dict[str, np.ndarray], importance: list[torch.Tensor] | None = None
                   ) -> tuple[dict, dict]:
    """Arrays and attributes of one of keys/values (`name`, possibly prefixed by a phase) for heads of (n_h, d)
    rows. A lloyd codec with a custom codebook takes its centroids from `codebooks[id]` (the caller puts them
    there); the Beta codebook is added to `codebooks` when missing."""
    arrays, attrs = {}, {}
    d = heads[0].shape[-1]
    rows = torch.cat(heads).float()
    attrs.update(tensor_attrs(name, codec, stored, seed, d))
    if codec.name == "raw":
        arrays[name] = _to_stored(rows, stored)
    elif codec.name in BLOCK_CODECS:
        arrays[f"{name}_blocks"] = BLOCK_CODECS[codec.name][0](rows).cpu().numpy()
    else:
        cb = book_key(codec, d)
        if codec.codebook is None:
            codebooks.setdefault(cb, beta_codebook(codec.bits, d).centroids.numpy().astype(np.float32))
            custom = None
        elif cb not in codebooks:
            raise ValueError(f"codebook {cb!r} is not available to encode with")
        else:
            custom = codebook_from_centroids(codebooks[cb], d)
            if custom.centroids.numel() != 2 ** codec.bits:
                raise ValueError(f"codebook {cb!r} has {custom.centroids.numel()} centroids, {codec.bits} bits "
                                 f"need {2 ** codec.bits}")
        codes = [lloyd_encode(h.float().cpu(), codec.bits, seed=seed, center=True, codebook=custom)
                 if h.shape[0] else None for h in heads]
        empty = torch.zeros(0, packed_size(d, codec.bits), dtype=torch.uint8)
        arrays[f"{name}_codes"] = torch.cat([c.packed if c else empty for c in codes]).numpy()
        arrays[f"{name}_gains"] = torch.cat([c.gains if c else torch.zeros(0, dtype=torch.float16)
                                             for c in codes]).numpy()
        means = [c.mean if c else torch.zeros(d, dtype=torch.float16) for c in codes]  # an empty head: mean 0
        dtype = torch.float16 if all(m.dtype == torch.float16 for m in means) else torch.float32
        arrays[f"{name}_mean"] = torch.stack([m.to(dtype) for m in means]).numpy()
        if codec.exact:
            rows = _exact_rows(importance, [h.shape[0] for h in heads], codec.exact)
            arrays[f"{name}_exact_rows"] = rows.numpy()
            arrays[f"{name}_exact"] = _to_stored(torch.cat([h[r.long()] for h, r in zip(heads, rows)])
                                                 if rows.numel() else torch.zeros(0, d), stored)
    return arrays, attrs


def phase_split(layer: LayerKV, codec: PhasedCodec) -> torch.Tensor:
    """(P, Hkv) int64 entries of each head in each phase (by the entries' positions)."""
    P, H = len(codec.codecs), layer.keys.shape[0]
    out = torch.zeros(P, H, dtype=torch.int64)
    for h, n in enumerate(layer.lengths.tolist()):
        out[:, h] = torch.bincount(codec.phase_of(layer.positions[h, :n].cpu()), minlength=P)[:P]
    return out


def encode_layer(layer: LayerKV, codec: KVCodec | PhasedCodec, stored: str, seed: int,
                 codebooks: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays and attributes of one layer. `codebooks` collects the codebooks the file must hold (and provides
    the custom ones the codec names). A PhasedCodec stores each phase's entries as one unit with its own codec:
    arrays and attributes prefixed `p<p>.`, plus `phase_lengths` (P, Hkv); each head's positions must lie in
    [0, T) and increase, so its phases' entries follow one another in position order."""
    if not (torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all()):
        raise ValueError("compact keys/values contain NaN or inf; refusing to store them")
    arrays, attrs = {}, {}
    importance = None if layer.importance is None else _ragged(layer.importance, layer.lengths)
    keys, values = _ragged(layer.keys, layer.lengths), _ragged(layer.values, layer.lengths)
    if isinstance(codec, PhasedCodec):
        counts = phase_split(layer, codec)
        if not all(bool((torch.diff(p[: int(n)]) > 0).all()) for p, n in zip(layer.positions, layer.lengths)):
            raise ValueError("kept positions must increase within each head to be split into phases")
        units = []
        for p, unit in enumerate(codec.codecs):
            lo, hi = counts[:p].sum(0), counts[: p + 1].sum(0)
            pick = lambda xs: [x[int(a):int(b)] for x, a, b in zip(xs, lo, hi)]  # noqa: E731
            units.append((f"p{p}.", unit, pick(keys), pick(values), None if importance is None else pick(importance)))
        arrays["phase_lengths"] = counts.to(torch.int32).numpy()
        attrs.update({"phase_bounds": list(codec.bounds), "phase_names": list(codec.names)})
    else:
        units = [("", codec, keys, values, importance)]
    for prefix, unit, k, v, imp in units:
        for name, heads, part in (("keys", k, unit.keys), ("values", v, unit.values)):
            a, t = _encode_tensor(prefix + name, heads, part, stored, seed, codebooks, imp)
            arrays.update(a)
            attrs.update(t)
    arrays["beta"] = torch.cat(_ragged(layer.beta, layer.lengths)).float().cpu().numpy()
    arrays["positions"] = torch.cat(_ragged(layer.positions, layer.lengths)).to(torch.int32).cpu().numpy()
    arrays["lengths"] = layer.lengths.to(torch.int32).cpu().numpy()
    attrs["kv_codec"] = codec.label
    return arrays, attrs


def _decode_tensor(name: str, arrays: dict, attrs: dict, codebooks: dict, lengths: list[int], d: int
                   ) -> torch.Tensor:
    kind = attrs.get(f"{name}_codec", "raw")
    if kind == "raw":
        return _from_stored(arrays[name], attrs[f"{name}_dtype"])
    if kind in BLOCK_CODECS:
        return BLOCK_CODECS[kind][1](torch.from_numpy(arrays[f"{name}_blocks"]))
    if kind != "lloyd":
        raise ValueError(f"unknown codec {kind!r} for {name}")
    bits, seed, cb = int(attrs[f"{name}_bits"]), int(attrs[f"{name}_seed"]), attrs[f"{name}_codebook"]
    if cb not in codebooks:
        raise ValueError(f"codebook {cb!r} missing from the file")
    cent = torch.from_numpy(codebooks[cb]).float()
    if cent.numel() != 2 ** bits:
        raise ValueError(f"codebook {cb!r} has {cent.numel()} centroids, {bits}-bit codes need {2 ** bits}")
    codes, gains = torch.from_numpy(arrays[f"{name}_codes"]), torch.from_numpy(arrays[f"{name}_gains"])
    means = torch.from_numpy(arrays[f"{name}_mean"])
    if means.shape[-1] != d:
        raise ValueError(f"{name} mean has dim {means.shape[-1]}, expected head dim {d}")
    exact_rows = arrays.get(f"{name}_exact_rows")
    exact = None if exact_rows is None else _from_stored(arrays[f"{name}_exact"], attrs[f"{name}_exact_dtype"])
    out, start = [], 0
    for h, n in enumerate(lengths):
        code = LloydCode(codes[start:start + n], gains[start:start + n], means[h], bits, d, seed, cent)
        x = lloyd_decode(code)
        if exact is not None:
            e = exact_rows.shape[1]
            x[torch.from_numpy(exact_rows[h]).long()] = exact[h * e:(h + 1) * e]
        out.append(x)
        start += n
    return torch.cat(out) if out else torch.zeros(0, d)


def _decode_rows(name: str, arrays: dict, attrs: dict, codebooks: dict, lengths: list[int], d: int
                 ) -> torch.Tensor:
    """(N, d) float32 rows of keys or values in head order, each head's rows in position order; a phased layer's
    units are decoded one by one and each head's rows put back together."""
    split = arrays.get("phase_lengths")
    if split is None:
        return _decode_tensor(name, arrays, attrs, codebooks, lengths, d)
    per_unit = [_decode_tensor(f"p{p}.{name}", arrays, attrs, codebooks, [int(n) for n in row], d)
                .split([int(n) for n in row]) for p, row in enumerate(split)]
    heads = [torch.cat([unit[h] for unit in per_unit]) for h in range(len(lengths))]
    return torch.cat(heads) if heads else torch.zeros(0, d)


def decode_layer(arrays: dict[str, np.ndarray], attrs: dict, codebooks: dict[str, np.ndarray], head_dim: int
                 ) -> LayerKV:
    """Stored arrays of one layer -> LayerKV padded per head (float32 keys/values; beta 0 and position -1 in
    padding)."""
    lengths = [int(n) for n in arrays["lengths"]]
    H, t_max = len(lengths), max(lengths) if lengths else 0
    split = arrays.get("phase_lengths")
    if split is not None and (split.shape[-1] != H or (split.sum(0) != np.asarray(lengths)).any()):
        raise ValueError("phase_lengths disagree with the per-head lengths")
    keys = _decode_rows("keys", arrays, attrs, codebooks, lengths, head_dim)
    values = _decode_rows("values", arrays, attrs, codebooks, lengths, head_dim)
    beta = torch.from_numpy(arrays["beta"]).float()
    pos = torch.from_numpy(arrays["positions"]).long()
    if not (keys.shape[0] == values.shape[0] == beta.shape[0] == pos.shape[0] == sum(lengths)):
        raise ValueError("layer arrays disagree with the per-head lengths")
    out = LayerKV(torch.zeros(H, t_max, head_dim), torch.zeros(H, t_max, head_dim), torch.zeros(H, t_max),
                  torch.full((H, t_max), -1, dtype=torch.long), torch.tensor(lengths, dtype=torch.long))
    start = 0
    for h, n in enumerate(lengths):
        sl = slice(start, start + n)
        out.keys[h, :n], out.values[h, :n] = keys[sl], values[sl]
        out.beta[h, :n], out.positions[h, :n] = beta[sl], pos[sl]
        start += n
    return out


def roundtrip(layer: LayerKV, codec: KVCodec | PhasedCodec, stored: str = "bfloat16", seed: int = 0,
              codebooks: dict[str, np.ndarray] | None = None) -> tuple[LayerKV, int]:
    """What a layer looks like after being stored and loaded, and the bytes its arrays take; the codebooks it
    needs are added to `codebooks` (shared by a file, so counted once there; custom ones must be there)."""
    out, arrays, _ = store_and_load(layer, codec, stored, seed, codebooks)
    return out, sum(a.nbytes for a in arrays.values())


def store_and_load(layer: LayerKV, codec: KVCodec | PhasedCodec, stored: str = "bfloat16", seed: int = 0,
                   codebooks: dict[str, np.ndarray] | None = None) -> tuple[LayerKV, dict, dict]:
    """`roundtrip` that also returns the stored arrays and attributes (what a file holds for the layer)."""
    books = {} if codebooks is None else codebooks
    arrays, attrs = encode_layer(layer, codec, stored, seed, books)
    out = decode_layer(arrays, attrs, books, layer.keys.shape[-1])
    out.importance = layer.importance
    return out, arrays, attrs


def roundtrip_tensor(x: torch.Tensor, codec: TensorCodec, stored: str = "bfloat16", seed: int = 0,
                     importance: torch.Tensor | None = None, codebooks: dict[str, np.ndarray] | None = None
                     ) -> torch.Tensor:
    """One head's vectors (n, d) (with their attention scores, if known) after storing and loading with `codec`
    (float32, on x's device). `codebooks` provides a custom codebook the codec names."""
    if codec.name == "raw":
        return x.to(STORED_DTYPES[stored]).float()
    if x.shape[0] == 0:
        return x.float()
    books: dict[str, np.ndarray] = dict(codebooks or {})
    arrays, attrs = _encode_tensor("t", [x], codec, stored, seed, books,
                                   None if importance is None else [importance])
    return _decode_tensor("t", arrays, attrs, books, [x.shape[0]], x.shape[-1]).to(x.device)


def roundtrip_keys(x: torch.Tensor, codec: KVCodec | PhasedCodec, positions: torch.Tensor | None,
                   importance: torch.Tensor | None = None, stored: str = "bfloat16", seed: int = 0,
                   codebooks: dict[str, np.ndarray] | None = None) -> torch.Tensor:
    """One head's keys (n, d) at `positions` (n,) after storing and loading: with a PhasedCodec, the keys of each
    phase go through that phase's key codec (as `encode_layer` stores them); positions may then not be None."""
    if not isinstance(codec, PhasedCodec):
        return roundtrip_tensor(x, codec.keys, stored, seed, importance, codebooks)
    if positions is None:
        raise ValueError("a phased codec needs the keys' positions")
    phase = codec.phase_of(positions.cpu()).to(x.device)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for p, unit in enumerate(codec.codecs):
        rows = (phase == p).nonzero().flatten()
        if rows.numel():
            out[rows] = roundtrip_tensor(x[rows], unit.keys, stored, seed,
                                         None if importance is None else importance[rows], codebooks)
    return out


def _byte_kind(name: str) -> str | None:
    base = name.rsplit("/", 1)[-1].rsplit(".", 1)[-1]  # v1 layer group / phase unit prefixes
    if name.startswith("codebook"):
        return "codebooks"
    if base in ("keys", "values"):
        return "raw K/V"
    if base.endswith("_exact") or base.endswith("_exact_rows"):
        return "exact entries"
    if base.startswith("positions") or base in ("lengths", "phase_lengths"):
        return "positions"
    if base == "beta":
        return "beta"
    suffix = base.split("_", 1)[-1]
    return {"codes": "codes", "gains": "gains", "mean": "means", "blocks": "q-blocks (codes+scales)",
            "q8_0": "q-blocks (codes+scales)", "q4_0": "q-blocks (codes+scales)"}.get(suffix)


def byte_breakdown(art) -> dict[str, int]:
    """Stored bytes of an Artifact's datasets by kind: raw keys/values, codes, gains, means, q-blocks, exact
    entries, beta, positions (+ lengths), codebooks (the model identity sample is not payload)."""
    sizes = art.dataset_bytes or {f"layers/{i:05d}/{k}": a.nbytes for i, layer in enumerate(art.layers)
                                  for k, a in layer.arrays.items()}
    out: dict[str, int] = {}
    for name, n in sorted(sizes.items()):
        kind = _byte_kind(name)
        if kind is not None:
            out[kind] = out.get(kind, 0) + n
    if not art.dataset_bytes and art.codebooks:
        out["codebooks"] = sum(c.nbytes for c in art.codebooks.values())
    return out
