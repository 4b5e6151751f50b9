"""Reading an untrusted .h5 file: nothing is allocated, opened or decompressed on the file's word.

Every check here runs before a payload byte is read:
- objects: hard links only (soft and external links are refused), and only the kinds the caller expects;
- attributes: plain numbers and strings (arrays only where allowed), their size read from the HDF5 header and
  bounded before h5py allocates anything;
- datasets: exact dtype and shape (what the caller derived from validated attributes), storage inside this file
  (no external storage, not virtual), only the layouts and filters the caller allows, and the bytes HDF5 says it
  holds both match the declared shape and lie inside the file. A 1.6 MB file declaring a 4 GiB dataset is refused
  here, without allocating it.
Any h5py/HDF5/numpy exception met on the way becomes an ArtifactError with a one-line message.
"""
from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np

from ..errors import ArtifactError

# what a damaged or hostile file can make h5py / numpy raise while we look at it
H5_ERRORS = (OSError, KeyError, RuntimeError, ValueError, TypeError, IndexError, OverflowError, UnicodeError,
             AttributeError, SystemError, MemoryError)
FLETCHER32 = h5py.h5z.FILTER_FLETCHER32
CONTIGUOUS, COMPACT, CHUNKED = h5py.h5d.CONTIGUOUS, h5py.h5d.COMPACT, h5py.h5d.CHUNKED
MAX_MEMBERS = 4096        # links in one group
MAX_ATTRS = 256           # attributes on one object
MAX_ATTR_BYTES = 1 << 20  # one attribute's declared size
MAX_CHUNKS = 1 << 20      # chunks of one (v1) dataset


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def open_file(path: Path) -> tuple[h5py.File, int]:
    """(open read-only file, its size in bytes)."""
    if not path.exists():
        raise ArtifactError(f"artifact not found: {path}")
    if not path.is_file():
        raise ArtifactError(f"{path} is not a file")
    try:
        size = path.stat().st_size
        return h5py.File(path, "r"), size
    except H5_ERRORS as e:
        raise ArtifactError(f"{path} is not a readable .h5 artifact (truncated or corrupted?): "
                            f"{first_line(e)}") from None


def members(group: h5py.Group, where: str) -> dict[str, str]:
    """{name: 'group' | 'dataset'} of a group's links; anything but a hard link to a group or dataset is refused."""
    out: dict[str, str] = {}
    for name in group:
        if len(out) >= MAX_MEMBERS:
            raise ArtifactError(f"{where} has more than {MAX_MEMBERS} members")
        link = group.get(name, getlink=True)
        if not isinstance(link, h5py.HardLink):
            raise ArtifactError(f"{where}/{name} is a {type(link).__name__}; only objects stored in this file "
                                "are allowed")
        cls = group.get(name, getclass=True)
        if cls is h5py.Dataset:
            out[name] = "dataset"
        elif cls is h5py.Group:
            out[name] = "group"
        else:
            raise ArtifactError(f"{where}/{name} is a {getattr(cls, '__name__', cls)}, not a group or dataset")
    return out


def _attr_value(raw, dt: np.dtype):
    if dt.kind == "S":
        return bytes(raw).decode("utf-8")
    if h5py.check_string_dtype(dt) is not None:  # variable-length string (v1 files)
        return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    if isinstance(raw, np.ndarray) and raw.shape:
        return raw
    value = raw.item() if isinstance(raw, (np.generic, np.ndarray)) else raw
    return value


def read_attrs(obj, where: str, allow_arrays: bool = False, allow_vlen: bool = False,
               only: tuple[str, ...] | None = None) -> dict:
    """Attributes of an HDF5 object (those named in `only`, if given) as Python values: int, float, str
    (fixed-length UTF-8 bytes, or variable-length strings when `allow_vlen`), and 1-D numeric numpy arrays when
    `allow_arrays`. Sizes are checked on the header before h5py allocates the value."""
    out = {}
    for i, name in enumerate(obj.attrs):
        if i >= MAX_ATTRS:
            raise ArtifactError(f"{where} has more than {MAX_ATTRS} attributes")
        if only is not None and name not in only:
            continue
        aid = obj.attrs.get_id(name)
        dt, shape = aid.dtype, aid.shape
        if shape is None:
            raise ArtifactError(f"{where}: attribute {name!r} has no value (null dataspace)")
        vlen = h5py.check_string_dtype(dt) is not None and h5py.check_string_dtype(dt).length is None
        if vlen and not allow_vlen:
            raise ArtifactError(f"{where}: attribute {name!r} is a variable-length string; this version stores "
                                "strings as fixed-length UTF-8")
        if not (dt.kind in "iuf" and dt.itemsize <= 8 or dt.kind == "S" or vlen):
            raise ArtifactError(f"{where}: attribute {name!r} has unsupported type {dt}")
        if shape and not (allow_arrays and dt.kind in "iuf" and len(shape) == 1):
            raise ArtifactError(f"{where}: attribute {name!r} must be a scalar, has shape {shape}")
        if math.prod(shape) * (16 if vlen else dt.itemsize) > MAX_ATTR_BYTES:
            raise ArtifactError(f"{where}: attribute {name!r} declares {math.prod(shape) * dt.itemsize} bytes")
        try:
            out[name] = _attr_value(obj.attrs[name], dt)
        except UnicodeError:
            raise ArtifactError(f"{where}: attribute {name!r} is not valid UTF-8") from None
    return out


def check_dataset(dset: h5py.Dataset, where: str, dtype: np.dtype, shape: tuple, file_size: int,
                  chunked_with: tuple[int, ...] | None = None) -> None:
    """Refuse a dataset unless it is plain storage inside this file with exactly `dtype` and `shape`.

    chunked_with: None for contiguous/compact storage with no filter (schema v2); a tuple of the filters a
    chunked dataset must carry (schema v1: Fletcher-32), zero-size datasets may then be contiguous."""
    if dset.is_virtual:
        raise ArtifactError(f"{where} is a virtual dataset (data from other files); refused")
    if dset.external:
        raise ArtifactError(f"{where} keeps its data in external files; refused")
    if len(dset.attrs):
        raise ArtifactError(f"{where} carries attributes; this schema has none on datasets")
    plist = dset.id.get_create_plist()
    layout = plist.get_layout()
    filters = tuple(plist.get_filter(i)[0] for i in range(plist.get_nfilters()))
    if dset.dtype != dtype:
        raise ArtifactError(f"{where} has dtype {dset.dtype.str}, expected {np.dtype(dtype).str}")
    if tuple(dset.shape) != tuple(shape):
        raise ArtifactError(f"{where} has shape {tuple(dset.shape)}, the attributes say {tuple(shape)}")
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    storage = dset.id.get_storage_size()
    if chunked_with is not None and layout == CHUNKED:
        if filters != chunked_with:
            raise ArtifactError(f"{where} has filters {filters}, expected exactly {chunked_with}")
        if not nbytes <= storage <= file_size:
            raise ArtifactError(f"{where} declares {nbytes} bytes but the file holds {storage} for it "
                                f"(file size {file_size})")
        n_chunks = dset.id.get_num_chunks()
        if n_chunks > MAX_CHUNKS:
            raise ArtifactError(f"{where} has {n_chunks} chunks")
        for i in range(n_chunks):
            info = dset.id.get_chunk_info(i)
            if info.byte_offset is None or info.byte_offset + info.size > file_size:
                raise ArtifactError(f"{where}: chunk {i} lies outside the file")
        return
    if layout not in (CONTIGUOUS, COMPACT) or (chunked_with and nbytes):
        raise ArtifactError(f"{where} has an unexpected storage layout ({layout})")
    if filters:
        raise ArtifactError(f"{where} has filters {filters}; contiguous datasets take none")
    if storage != nbytes:
        raise ArtifactError(f"{where} declares {nbytes} bytes but the file holds {storage} for it")
    if layout == CONTIGUOUS and nbytes:
        offset = dset.id.get_offset()
        if offset is None or offset + nbytes > file_size:
            raise ArtifactError(f"{where} lies outside the file (offset {offset}, {nbytes} bytes, file size "
                                f"{file_size})")


def read_dataset(dset: h5py.Dataset, where: str) -> np.ndarray:
    """The whole dataset (its dtype and shape were checked with `check_dataset`)."""
    out = np.empty(dset.shape, dtype=dset.dtype)
    if out.size:
        try:
            dset.read_direct(out)
        except OSError as e:
            raise ArtifactError(f"{where} is corrupted: {first_line(e)}") from None
    return out
