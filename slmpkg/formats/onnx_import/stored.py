"""Initializers as stored (an external file's byte range, or inline) and the lazy canonical tensors made from them:
ranged reads, transposed [in, out] weights, row slices and concatenations, all exact for any float type."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..._io import read_range
from ...checkpoint import LazyTensor
from ...errors import FormatError
from ...quant import QuantType


@dataclass(frozen=True)
class _Stored:
    """Where an initializer's bytes are: a range of an external file, or the proto itself (inline)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype  # the element type as stored (bf16 as uint16)
    qtype: Optional[QuantType]  # None for non-float types (MatMulNBits' uint8 blocks, int64 shapes)
    proto: Any
    file: Optional[Path] = None
    offset: int = 0
    where: str = ""  # "MODEL_FILE: tensor NAME", for errors

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def read(self, offset: int, nbytes: int) -> np.ndarray:
        """``nbytes`` of the stored bytes from ``offset`` (uint8)."""
        if self.file is not None:
            return read_range(self.file, self.offset + offset, nbytes)
        return self.bytes()[offset : offset + nbytes]

    def columns(self, start: int, nbytes: int) -> np.ndarray:
        """Bytes ``start:start+nbytes`` of every row of a 2-D tensor, [rows, nbytes] uint8, with one open
        file and one read per row (a transposed slab without reading the rest)."""
        rows, cols = self.shape
        stride = cols * self.dtype.itemsize
        out = np.empty((rows, nbytes), np.uint8)
        if self.file is None:
            out[:] = self.bytes().reshape(rows, stride)[:, start : start + nbytes]
            return out
        with open(self.file, "rb", buffering=0) as f:
            for r in range(rows):
                f.seek(self.offset + r * stride + start)
                if f.readinto(memoryview(out[r])) != nbytes:
                    raise FormatError(f"{self.file}: truncated: tensor {self.name} ends past the end of the file")
        return out

    def bytes(self) -> np.ndarray:
        if self.file is not None:
            return read_range(self.file, self.offset, self.nbytes)
        from onnx import numpy_helper

        if self.proto.data_type not in _FLOATS and self.proto.data_type not in _OTHERS:
            raise FormatError(f"{self.where}: ONNX data type {self.proto.data_type} is not one slmpkg reads")
        try:
            array = numpy_helper.to_array(self.proto)
        except (ValueError, TypeError, KeyError) as e:  # data that does not fill the shape
            raise FormatError(f"{self.where}: its data does not match its type and shape {list(self.shape)} ({e})") from None
        if self.qtype is QuantType.BF16:  # onnx hands bf16 back in its own ml_dtypes type; keep the bits
            array = array.view(np.uint16)
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        if data.size != self.nbytes:
            raise FormatError(f"{self.where}: holds {data.size} bytes, its shape {list(self.shape)} needs {self.nbytes}")
        return data

    def array(self) -> np.ndarray:
        """The elements in ``shape``; floats as same-size unsigned ints, so moving them is exact."""
        return self.bytes().view(self.dtype).reshape(self.shape)


_FLOATS = {1: (np.float32, QuantType.F32), 10: (np.float16, QuantType.F16), 16: (np.uint16, QuantType.BF16)}


_OTHERS = {2: np.uint8, 3: np.int8, 6: np.int32, 7: np.int64, 11: np.float64}


def _inside(directory: Path, location: str, what: str = "external data location") -> tuple[Optional[Path], str]:
    """``location`` (``what``) resolved inside ``directory`` (symlinks followed), or None and why it is refused."""
    if not location:
        return None, f"{what} is empty"
    if os.path.isabs(location) or location.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", location):
        # the ONNX spec: locations are relative to the model file's directory
        return None, f"{what} {location!r} is an absolute path, not one inside the model directory"
    if "\x00" in location:
        return None, f"{what} {location!r} holds a NUL character"
    root = os.path.realpath(directory)
    target = os.path.realpath(os.path.join(root, location))
    if os.path.commonpath([root, target]) != root:
        return None, f"{what} {location!r} leaves the model directory"
    return Path(target), ""


def _stored(tensor: Any, directory: Path, model_file: Path, sizes: dict[Path, int]) -> _Stored:
    """Describe one initializer, checking its external data: inside the directory, present, long enough."""
    from onnx import TensorProto

    where = f"{model_file}: tensor {tensor.name}"
    if tensor.data_type in _FLOATS:
        dtype, qtype = _FLOATS[tensor.data_type]
    elif tensor.data_type in _OTHERS:
        dtype, qtype = _OTHERS[tensor.data_type], None
    else:
        dtype, qtype = np.uint8, None  # a type we never read as a weight; its size is not checked
    shape = tuple(int(d) for d in tensor.dims)
    if any(d < 0 for d in shape):
        raise FormatError(f"{where}: shape {list(shape)} has a negative dimension")
    stored = _Stored(tensor.name, shape, np.dtype(dtype), qtype, tensor, where=where)
    if tensor.data_location != TensorProto.EXTERNAL:
        return stored
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")
    path, refused = _inside(directory, location)
    if path is None:
        raise FormatError(f"{where}: {refused}")
    if not path.is_file():
        raise FormatError(f"{where}: external data file {location!r} is missing")
    try:
        offset = int(entries.get("offset", "0"))
        length = int(entries["length"]) if "length" in entries else stored.nbytes
    except ValueError:
        raise FormatError(f"{where}: external data offset/length are not numbers") from None
    if offset < 0 or length < 0:
        raise FormatError(f"{where}: negative external data offset or length")
    if length != stored.nbytes and (tensor.data_type in _FLOATS or tensor.data_type in _OTHERS):
        raise FormatError(f"{where}: declares {length} bytes of external data but its shape {list(shape)} needs {stored.nbytes}")
    size = sizes.setdefault(path, path.stat().st_size)
    if offset + length > size:
        raise FormatError(
            f"{where}: external data {location!r} is {size} bytes, shorter than offset {offset} + length {length}"
        )
    return _Stored(tensor.name, shape, np.dtype(dtype), qtype, tensor, path, offset, where)


def _plain(name: str, src: _Stored) -> LazyTensor:
    """An initializer whose stored layout is the canonical one: ranged reads straight from the file."""
    return LazyTensor(name, src.shape, src.qtype, src.bytes, read=src.read)  # type: ignore[arg-type]


def _cached_reads(raw: Callable[[], np.ndarray]) -> Callable[[int, int], np.ndarray]:
    """Ranged reads of a tensor that must be computed whole (converted from MatMulNBits blocks).

    Writers and conversions read a tensor front to back, possibly in slabs or as a fused projection's
    parts; the computed bytes are kept between those reads and dropped when the last byte has been
    read, so the source is read once and at most this one tensor is held.
    """
    cache: dict[str, np.ndarray] = {}

    def read(offset: int, nbytes: int) -> np.ndarray:
        data = cache.get("data")
        if data is None:
            data = cache["data"] = raw()
        piece = data[offset : offset + nbytes].copy()
        if offset + nbytes >= data.size:
            cache.clear()
        return piece

    read.release = cache.clear  # type: ignore[attr-defined]  # for a reader that stops early (a probe)
    return read


# stored rows read at a time while transposing a whole tensor
_CHUNK_BYTES = 8 << 20


def _transposed(name: str, src: _Stored) -> LazyTensor:
    """``src`` [rows, cols] as [cols, rows] (a MatMul weight [in, out] as [out, in]); elements are moved
    as same-size integers, so any float type stays bit-exact.

    The whole tensor is built from stored row chunks (the result and one chunk in memory, not two
    copies). A ranged read (a converter's slab, a fused projection's part, a probe) is a range of
    output rows, i.e. of stored columns: it reads just those bytes of each stored row, so memory stays
    at the slab and the file is read once over all slabs.
    """
    rows, cols = src.shape
    item = src.dtype.itemsize

    def raw() -> np.ndarray:
        out = np.empty((cols, rows), src.dtype)
        step = max(1, _CHUNK_BYTES // max(cols * item, 1))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            out[:, r0:r1] = src.read(r0 * cols * item, (r1 - r0) * cols * item).view(src.dtype).reshape(r1 - r0, cols).T
        return out.reshape(-1).view(np.uint8)

    row_bytes = rows * item  # one output row

    def read(offset: int, nbytes: int) -> np.ndarray:
        if nbytes <= 0:
            return np.empty(0, np.uint8)
        first, last = offset // row_bytes, (offset + nbytes - 1) // row_bytes + 1
        stored = src.columns(first * item, (last - first) * item).view(src.dtype)  # [rows, last - first]
        gathered = np.ascontiguousarray(stored.T).reshape(-1).view(np.uint8)
        start = offset - first * row_bytes
        return gathered[start : start + nbytes]

    return LazyTensor(name, (cols, rows), src.qtype, raw, read=read)  # type: ignore[arg-type]


def _row_bytes(t: LazyTensor) -> int:
    return t.nbytes // t.shape[0]  # a 2-D tensor's rows are whole blocks in any type; a 1-D one's are elements


def _with_rows(t: LazyTensor, fn: Callable[[np.ndarray], np.ndarray]) -> LazyTensor:
    """``t`` with its rows reordered by ``fn``, moved as bytes (exact for any type)."""

    def raw() -> np.ndarray:
        rows = np.asarray(t.raw()).reshape(-1).view(np.uint8).reshape(t.shape[0], _row_bytes(t))
        return np.ascontiguousarray(fn(rows)).reshape(-1)

    return LazyTensor(t.name, t.shape, t.qtype, raw)


def _rows(t: LazyTensor, start: int, stop: int) -> LazyTensor:
    """Rows ``start:stop`` of ``t`` (one part of a fused projection), read as that byte range."""
    row = _row_bytes(t)

    def raw() -> np.ndarray:
        return np.asarray(t.byte_range(start * row, (stop - start) * row)).reshape(-1).view(np.uint8).copy()

    return LazyTensor(t.name, (stop - start, *t.shape[1:]), t.qtype, raw)


def _as_stored_floats(s: _Stored) -> np.ndarray:
    """A small float initializer in its own float type (bf16, which numpy lacks, as float32: exact)."""
    if s.qtype is QuantType.F16:
        return s.array().view(np.float16)
    if s.qtype is QuantType.F32:
        return s.array().view(np.float32)
    return _as_f64(s).astype(np.float32)


def _as_f64(s: _Stored) -> np.ndarray:
    """A small float initializer (rotary caches) as float64."""
    if s.qtype is QuantType.BF16:
        return (s.array().astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return s.array().astype(np.float64)


def _concat_rows(name: str, parts: list[LazyTensor]) -> LazyTensor:
    """``parts`` stacked row-wise (Phi-3's fused q/k/v or gate/up), one part in memory besides the result."""
    qtype = parts[0].qtype
    if any(p.qtype is not qtype or p.shape[1:] != parts[0].shape[1:] for p in parts):
        raise FormatError(f"{name}: the projections to fuse differ in type or width")

    def raw() -> np.ndarray:
        return np.concatenate([np.asarray(p.raw()).reshape(-1).view(np.uint8) for p in parts])

    return LazyTensor(name, (sum(p.shape[0] for p in parts), *parts[0].shape[1:]), qtype, raw)
