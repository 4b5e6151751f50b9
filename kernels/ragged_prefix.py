"""A compacted prefix as a serving process holds it: ragged per KV head, keys/values kept in their stored codec.

Layout (one layer; N = sum of the per-head lengths; the prefix is shared by every sequence of a batch):
- `offsets` (Hkv+1,) int32: the entries of KV head h are rows offsets[h]:offsets[h+1] of every per-entry array;
- `beta` (N,) float32: per-key bias, score = q.k*scale + beta (-inf = never attended);
- `keys`, `values`: a `PrefixTensor` each, holding exactly the arrays of the artifact (see artifacts/README.md):
    raw   `data` (N, d) float16/bfloat16/float32;
    lloyd `data` (N, ceil(d*b/8)) uint8 codes, bit-packed LSB first (a code may straddle two bytes),
          `gains` (N,) float16, `mean` (Hkv, d) float16/float32, `centroids` (2^b,) float32,
          `rotation` (d, d) float32 R with y = R (x - mean)/gain (rebuilt from (d, seed); shared by all layers);
          decode x = mean + gain * R^T centroids[codes];
    q8_0  `data` (N, d/32*34) uint8, llama.cpp blocks: fp16 scale, 32 int8;
    q4_0  `data` (N, d/32*18) uint8, llama.cpp blocks: fp16 scale, 16 bytes of nibbles (byte j = q_j | q_{j+16} << 4).
- the `exact` segment: lloyd stores each head's most attended entries (`<t>_exact`) unquantized. They are served as
  a small dense segment per head, `exact_keys`/`exact_values` (Hkv, E, d) float32 with `exact_beta` (Hkv, E)
  (-inf in padding), and their coded rows get beta = -inf in `beta`. A row exact in only one of keys/values takes
  its other half decoded from the stored codes. This costs E*d*8 + 4E bytes per head (E = 2 by default) and a copy
  of beta, which the served prefix holds instead of the stored one.

Memory = the stored bytes of codes, gains, means, beta, plus the exact segment; positions are not needed to attend.
`dequantize()` is the plain-torch decoder used by the reference attention (the same address arithmetic as the
Triton kernel), checked against compactor's own codec decoder in tests/test_ragged_attention.py.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

CODECS = ("raw", "lloyd", "q8_0", "q4_0")
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18}
_RAW_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@functools.lru_cache(maxsize=32)
def rotation_matrix(dim: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """(dim, dim) float32 R of compactor's lloyd codec (y = R x), one shared tensor per (dim, seed, device)."""
    from compactor.quant import make_rotation

    return make_rotation(dim, seed).dense().to(device=device, dtype=torch.float32).contiguous()


@dataclass
class PrefixTensor:
    """Keys or values of a prefix in one codec (module docstring). `bits`/`seed` are lloyd's (0 otherwise)."""

    codec: str
    data: torch.Tensor
    gains: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    centroids: torch.Tensor | None = None
    rotation: torch.Tensor | None = None
    bits: int = 0
    seed: int = 0

    def tensors(self) -> dict[str, torch.Tensor]:
        """Per-layer tensors (the shared rotation excluded)."""
        named = {"data": self.data, "gains": self.gains, "mean": self.mean, "centroids": self.centroids}
        return {k: v for k, v in named.items() if v is not None}

    def to(self, device) -> "PrefixTensor":
        def mv(t):
            return None if t is None else t.to(device)

        rot = None if self.rotation is None else rotation_matrix(self.rotation.shape[0], self.seed, str(device))
        return PrefixTensor(self.codec, mv(self.data), mv(self.gains), mv(self.mean), mv(self.centroids), rot,
                            self.bits, self.seed)

    def dequantize(self, row_head: torch.Tensor, d: int) -> torch.Tensor:
        """float32 (n, d) values of the held rows; row_head (n,) int64: KV head of each row (for lloyd's mean)."""
        x, c = self.data, torch.arange(d, device=self.data.device)
        if self.codec == "raw":
            return x.float()
        if self.codec == "lloyd":
            b, nbytes = self.bits, x.shape[-1]
            bit = c * b
            byte, shift = bit // 8, bit % 8
            word = x[:, byte].long() | (x[:, (byte + 1).clamp(max=nbytes - 1)].long() << 8)
            code = (word >> shift) & ((1 << b) - 1)  # the high byte only matters where shift + b > 8
            y = self.centroids.float()[code]
            return self.mean.float()[row_head] + self.gains.float()[:, None] * (y @ self.rotation.float())
        blk, w = c // 32, c % 32
        nb = BLOCK_BYTES[self.codec]
        scale = x.contiguous().view(torch.float16)[:, blk * (nb // 2)].float()
        if self.codec == "q8_0":
            q = x.contiguous().view(torch.int8)[:, blk * nb + 2 + w].float()
        else:
            q = ((x[:, blk * nb + 2 + w % 16].long() >> ((w // 16) * 4)) & 15).float() - 8
        return q * scale


@dataclass
class RaggedPrefix:
    """One layer's compacted prefix as served (module docstring). Host-side `lengths` size the launch grid."""

    lengths: tuple[int, ...]
    offsets: torch.Tensor
    beta: torch.Tensor
    keys: PrefixTensor
    values: PrefixTensor
    head_dim: int
    exact_keys: torch.Tensor | None = None
    exact_values: torch.Tensor | None = None
    exact_beta: torch.Tensor | None = None
    row_head: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_kv_heads(self) -> int:
        return len(self.lengths)

    @property
    def num_entries(self) -> int:
        return sum(self.lengths)  # host-side: no device sync (launches must be capturable in a CUDA graph)

    def host_offsets(self) -> list[int]:
        return [0, *np.cumsum(self.lengths).tolist()]

    @property
    def max_length(self) -> int:
        return max(self.lengths, default=0)

    @property
    def num_exact(self) -> int:
        return 0 if self.exact_beta is None else self.exact_beta.shape[1]

    @property
    def device(self) -> torch.device:
        return self.beta.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every per-layer tensor the prefix holds (the rotation, shared by all layers, excluded)."""
        out = {"offsets": self.offsets, "beta": self.beta}
        out.update({f"keys_{k}": v for k, v in self.keys.tensors().items()})
        out.update({f"values_{k}": v for k, v in self.values.tensors().items()})
        for name in ("exact_keys", "exact_values", "exact_beta"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def nbytes(self) -> int:
        """Bytes this layer allocates, measured from its tensors (shared rotation matrices excluded: d*d*4 bytes
        once per (d, seed) for the whole model)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device) -> "RaggedPrefix":
        def mv(t):
            return None if t is None else t.to(device)

        return RaggedPrefix(self.lengths, mv(self.offsets), mv(self.beta), self.keys.to(device),
                            self.values.to(device), self.head_dim, mv(self.exact_keys), mv(self.exact_values),
                            mv(self.exact_beta), mv(self.row_head))

    def heads(self) -> torch.Tensor:
        """(N,) int64 KV head of each entry."""
        if self.row_head is None or self.row_head.device != self.device:
            self.row_head = torch.repeat_interleave(torch.arange(self.num_kv_heads, device=self.device),
                                                    torch.tensor(self.lengths, device=self.device),
                                                    output_size=self.num_entries)
        return self.row_head

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (N, d) keys and values of the ragged rows (exact rows decoded from their codes; their beta is
        -inf, the exact segment holds them)."""
        heads = self.heads()
        return self.keys.dequantize(heads, self.head_dim), self.values.dequantize(heads, self.head_dim)

    # ------------------------------------------------------------------------------------------------------
    # constructors
    # ------------------------------------------------------------------------------------------------------

    @classmethod
    def from_heads(cls, keys: list[torch.Tensor], values: list[torch.Tensor], beta: list[torch.Tensor]
                   ) -> "RaggedPrefix":
        """Unquantized prefix from per-head (n_h, d) keys/values (kept in their dtype) and (n_h,) betas."""
        if not (len(keys) == len(values) == len(beta)) or not keys:
            raise ValueError("keys, values and beta need one entry per KV head (at least one head)")
        d = keys[0].shape[-1]
        for h, (k, v, b) in enumerate(zip(keys, values, beta)):
            if k.dim() != 2 or k.shape != v.shape or k.shape[-1] != d or b.shape != (k.shape[0],):
                raise ValueError(f"head {h}: keys {tuple(k.shape)}, values {tuple(v.shape)}, beta {tuple(b.shape)}"
                                 f" must be (n, {d}), (n, {d}), (n,)")
        lengths = tuple(int(k.shape[0]) for k in keys)
        dev = keys[0].device
        offsets = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32, device=dev)
        return cls(lengths, offsets, torch.cat(beta).float().contiguous(),
                   PrefixTensor("raw", torch.cat(keys).contiguous()), PrefixTensor("raw", torch.cat(values).contiguous()),
                   d)

    @classmethod
    def from_stored(cls, arrays: dict, attrs: dict, codebooks: dict, head_dim: int, device="cpu") -> "RaggedPrefix":
        """A layer group as stored (kv_codec.encode_layer's arrays/attributes, numpy or torch), kept in its codecs.

        Everything is validated (the arrays come from a file): shapes, lengths, bit widths, codebook sizes,
        exact rows. Raises ValueError on anything inconsistent."""
        d = int(head_dim)
        a = {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v for k, v in arrays.items()}
        if "lengths" not in a or "beta" not in a:
            raise ValueError("layer needs `lengths` and `beta`")
        lengths = tuple(int(n) for n in a["lengths"].reshape(-1).tolist())
        if not lengths or min(lengths) < 0:
            raise ValueError(f"bad per-head lengths {lengths}")
        n = sum(lengths)
        beta = a["beta"].float().reshape(-1)
        if beta.shape[0] != n:
            raise ValueError(f"beta has {beta.shape[0]} entries, the lengths sum to {n}")
        if torch.isnan(beta).any() or (beta == float("inf")).any():
            raise ValueError("beta contains NaN or +inf")
        H = len(lengths)
        offsets = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
        heads = torch.repeat_interleave(torch.arange(H), torch.tensor(lengths))
        parts, exact = {}, {}
        for name in ("keys", "values"):
            parts[name] = _stored_tensor(name, a, attrs, codebooks, n, H, d)
            if parts[name].codec == "lloyd" and f"{name}_exact_rows" in a:
                exact[name] = _stored_exact(name, a, attrs, lengths, d)
        prefix = cls(lengths, offsets, beta.contiguous(), parts["keys"], parts["values"], d, row_head=heads)
        if exact:
            prefix._split_exact(exact)
        return prefix.to(device)

    def _split_exact(self, exact: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Move rows stored exactly (exact[name] = (rows (H, e) within the head, vectors (H, e, d))) into the dense
        exact segment and mask their coded copies with beta = -inf."""
        H, d = self.num_kv_heads, self.head_dim
        per_head = [sorted({int(r) for rows, _ in exact.values() for r in rows[h]}) for h in range(H)]
        E = max(len(r) for r in per_head)
        ek, ev = torch.zeros(H, E, d), torch.zeros(H, E, d)
        eb = torch.full((H, E), float("-inf"))
        beta = self.beta.clone()
        for h, rows in enumerate(per_head):
            if not rows:
                continue
            glob = torch.tensor(rows, dtype=torch.long) + int(self.offsets[h])
            for name, dst in (("keys", ek), ("values", ev)):
                part: PrefixTensor = getattr(self, name)
                dst[h, :len(rows)] = _rows_of(part, glob, h, d)
                if name in exact:
                    er, ex = exact[name]
                    for j, r in enumerate(rows):
                        hit = (er[h] == r).nonzero()
                        if hit.numel():
                            dst[h, j] = ex[h, int(hit[0])]
            eb[h, :len(rows)] = beta[glob]
            beta[glob] = float("-inf")
        self.beta, self.exact_keys, self.exact_values, self.exact_beta = beta, ek, ev, eb


def _rows_of(part: PrefixTensor, glob: torch.Tensor, head: int, d: int) -> torch.Tensor:
    """float32 decoded rows `glob` of one head."""
    sub = PrefixTensor(part.codec, part.data[glob], None if part.gains is None else part.gains[glob], part.mean,
                       part.centroids, part.rotation, part.bits, part.seed)
    return sub.dequantize(torch.full((len(glob),), head, dtype=torch.long), d)


def _as_raw(t: torch.Tensor, stored: str) -> torch.Tensor:
    if stored not in _RAW_DTYPES:
        raise ValueError(f"unknown stored dtype {stored!r}")
    if stored == "bfloat16":
        if t.dtype not in (torch.uint16, torch.int16, torch.bfloat16):
            raise ValueError(f"bfloat16 data must be stored as 16-bit patterns, got {t.dtype}")
        return t.contiguous().view(torch.bfloat16)
    if t.dtype != _RAW_DTYPES[stored]:
        raise ValueError(f"{stored} data stored as {t.dtype}")
    return t.contiguous()


def _stored_tensor(name: str, a: dict, attrs: dict, codebooks: dict, n: int, H: int, d: int) -> PrefixTensor:
    kind = attrs.get(f"{name}_codec", "raw")
    if kind == "raw":
        x = _as_raw(a[name], attrs.get(f"{name}_dtype", "float32"))
        if tuple(x.shape) != (n, d):
            raise ValueError(f"{name}: shape {tuple(x.shape)}, expected ({n}, {d})")
        return PrefixTensor("raw", x)
    if kind in BLOCK_BYTES:
        blocks = a[f"{name}_blocks"]
        if d % 32 or blocks.dtype != torch.uint8 or tuple(blocks.shape) != (n, d // 32 * BLOCK_BYTES[kind]):
            raise ValueError(f"{name}: {kind} blocks {tuple(blocks.shape)} {blocks.dtype} do not fit {n} rows of d={d}")
        return PrefixTensor(kind, blocks.contiguous())
    if kind != "lloyd":
        raise ValueError(f"unknown codec {kind!r} for {name}")
    bits, seed, cb = int(attrs[f"{name}_bits"]), int(attrs[f"{name}_seed"]), attrs[f"{name}_codebook"]
    if not 1 <= bits <= 8:
        raise ValueError(f"{name}: lloyd bits must be 1..8, got {bits}")
    if cb not in codebooks:
        raise ValueError(f"codebook {cb!r} missing from the file")
    cent = torch.as_tensor(np.asarray(codebooks[cb], dtype=np.float32)).reshape(-1)
    if cent.numel() != 2 ** bits or not torch.isfinite(cent).all():
        raise ValueError(f"codebook {cb!r} has {cent.numel()} values, {bits}-bit codes need {2 ** bits} finite ones")
    codes, gains, mean = a[f"{name}_codes"], a[f"{name}_gains"], a[f"{name}_mean"]
    if codes.dtype != torch.uint8 or tuple(codes.shape) != (n, (d * bits + 7) // 8):
        raise ValueError(f"{name}: codes {tuple(codes.shape)} {codes.dtype}, expected ({n}, {(d * bits + 7) // 8}) uint8")
    if gains.dtype != torch.float16 or tuple(gains.shape) != (n,):
        raise ValueError(f"{name}: gains {tuple(gains.shape)} {gains.dtype}, expected ({n},) float16")
    if mean.dtype not in (torch.float16, torch.float32) or tuple(mean.shape) != (H, d):
        raise ValueError(f"{name}: mean {tuple(mean.shape)} {mean.dtype}, expected ({H}, {d}) float16/float32")
    return PrefixTensor("lloyd", codes.contiguous(), gains.contiguous(), mean.contiguous(), cent.contiguous(),
                        rotation_matrix(d, seed), bits, seed)


def _stored_exact(name: str, a: dict, attrs: dict, lengths: tuple[int, ...], d: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = a[f"{name}_exact_rows"].long()
    H = len(lengths)
    if rows.dim() != 2 or rows.shape[0] != H:
        raise ValueError(f"{name}_exact_rows has shape {tuple(rows.shape)}, expected ({H}, e)")
    e = rows.shape[1]
    for h, n in enumerate(lengths):
        if e and (rows[h].min() < 0 or rows[h].max() >= n or rows[h].unique().numel() != e):
            raise ValueError(f"{name}_exact_rows of head {h} are not {e} distinct rows of 0..{n - 1}")
    x = _as_raw(a[f"{name}_exact"], attrs.get(f"{name}_exact_dtype", "float32"))
    if tuple(x.shape) != (H * e, d):
        raise ValueError(f"{name}_exact has shape {tuple(x.shape)}, expected ({H * e}, {d})")
    return rows, x.float().reshape(H, e, d)
