"""GGUF: a lazy reader (``gguf.GGUFReader``, memory-mapped) and a streaming writer.

Tensor bytes are read on demand into their own buffers (not memory-mapped: mapped pages would stay
resident). The writer lays out the header and every tensor's info first (sizes are known from shapes and types
before any data exists), then pulls one tensor at a time and writes it, so peak memory is one tensor,
unlike ``gguf.GGUFWriter`` which holds every tensor until the end. Output goes to a temporary file
that is renamed into place only when complete.

Example:
    >>> from slmpkg.formats import gguf as gguf_format
    >>> ckpt = gguf_format.read("model-f16.gguf")          # doctest: +SKIP
    >>> gguf_format.write("copy.gguf", ckpt)                # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional, Union

import numpy as np
from gguf import GGUFReader, GGUFValueType

from .._io import atomic_writes, read_range
from ..checkpoint import Checkpoint, LazyTensor, MetaValue
from ..errors import FormatError
from ..quant import QuantType

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.FLOAT64: "<d",
    GGUFValueType.BOOL: "<?",
}
_SCALAR_DTYPES = {t: np.dtype(f) for t, f in _SCALAR_FORMATS.items()}

Progress = Callable[[int], None]


# ---- reading ------------------------------------------------------------------------------------


def _field_value(field: Any) -> MetaValue:
    kind = GGUFValueType(field.types[0])
    if kind is GGUFValueType.ARRAY:
        item = GGUFValueType(field.types[-1])
        if len(field.types) > 2:
            raise FormatError(f"nested arrays are not supported (key {field.name})")
        if item is GGUFValueType.STRING:
            values = [bytes(field.parts[i]).decode("utf-8", errors="surrogateescape") for i in field.data]
        else:
            # the numbers of an array are contiguous parts; keep them as one numpy array
            values = np.concatenate([field.parts[i] for i in field.data]) if field.data else np.empty(0, _SCALAR_DTYPES[item])
        return MetaValue(kind, values, item)
    if kind is GGUFValueType.STRING:
        return MetaValue(kind, bytes(field.parts[-1]).decode("utf-8", errors="surrogateescape"))
    return MetaValue(kind, field.parts[-1].tolist()[0])


def read(path: Union[str, os.PathLike]) -> Checkpoint:
    """Open a GGUF file lazily: metadata is read now, each tensor's bytes when it is asked for.

    A split model (``NAME-00001-of-0000N.gguf``) is read whole from its first file: the tensors of
    every shard, the metadata of the first, without the ``split.*`` keys.
    Raises :class:`FormatError` naming the file for anything that is not a complete GGUF v2/v3 file.
    """
    path = Path(path)
    first = _read_one(path)
    count = int(first.get("split.count", 0) or 0)
    if count <= 1:
        return first
    if int(first.get("split.no", 0)) != 0:
        raise FormatError(f"{path}: shard {int(first.get('split.no')) + 1} of {count}; pass the first shard")
    tensors = list(first.tensors)
    for i in range(1, count):
        shard_path = split_path(_split_prefix(path) + ".gguf", i, count)
        if not shard_path.exists():
            raise FormatError(f"{shard_path}: missing shard {i + 1} of {count} (split model {path})")
        tensors += _read_one(shard_path).tensors
    expected = int(first.get("split.tensors.count", len(tensors)))
    if len(tensors) != expected:
        raise FormatError(f"{path}: the shards hold {len(tensors)} tensors, split.tensors.count says {expected}")
    metadata = {k: v for k, v in first.metadata.items() if k not in SPLIT_KEYS}
    return Checkpoint(metadata, tensors)


def _split_prefix(path: Path) -> str:
    match = _SPLIT_NAME.match(str(path))
    if match is None:
        raise FormatError(f"{path}: split model whose name is not NAME-00001-of-0000N.gguf")
    return match.group("prefix")


def _read_one(path: Path) -> Checkpoint:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
    if magic != GGUF_MAGIC:
        raise FormatError(f"{path}: not a GGUF file (magic {magic!r})")
    try:
        reader = GGUFReader(path, "r")
    except Exception as e:  # gguf raises ValueError, IndexError, struct errors on damaged headers
        raise FormatError(f"{path}: damaged or truncated GGUF file ({type(e).__name__}: {e})") from None

    metadata: dict[str, MetaValue] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):  # the reader's own header pseudo-fields
            continue
        metadata[name] = _field_value(field)

    file_size = os.path.getsize(path)
    tensors: list[LazyTensor] = []
    for t in reader.tensors:
        try:
            qtype = QuantType(int(t.tensor_type))
        except ValueError:
            raise FormatError(f"{path}: tensor {t.name} has unknown type id {int(t.tensor_type)}") from None
        end = t.data_offset + t.n_bytes
        if end > file_size:
            raise FormatError(
                f"{path}: truncated: tensor {t.name} ends at byte {end} but the file has {file_size}"
            )
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        base = t.data_offset
        tensors.append(LazyTensor(
            t.name, shape, qtype,
            raw=lambda base=base, n=t.n_bytes: read_range(path, base, n),
            read=lambda offset, n, base=base: read_range(path, base + offset, n),
        ))
    return Checkpoint(metadata, tensors)


# ---- writing ------------------------------------------------------------------------------------


def _string(s: str) -> bytes:
    b = s.encode("utf-8", errors="surrogateescape")
    return struct.pack("<Q", len(b)) + b


def _encode_value(item: MetaValue) -> bytes:
    kind = item.type
    if kind is GGUFValueType.STRING:
        return _string(item.value)
    if kind is GGUFValueType.ARRAY:
        sub = item.item_type
        assert sub is not None
        values = item.value
        head = struct.pack("<IQ", int(sub), len(values))
        if sub is GGUFValueType.STRING:
            return head + b"".join(_string(v) for v in values)
        return head + np.asarray(values, dtype=_SCALAR_DTYPES[sub]).tobytes()
    return struct.pack(_SCALAR_FORMATS[kind], item.value)


def _pad(n: int, alignment: int) -> int:
    return (alignment - n % alignment) % alignment


def encode_header(metadata: dict[str, MetaValue], tensors: list[LazyTensor], alignment: int) -> bytes:
    """Everything before the tensor data: header, key/values, tensor infos, padding."""
    parts = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(metadata))]
    for key, item in metadata.items():
        parts += [_string(key), struct.pack("<I", int(item.type)), _encode_value(item)]
    offset = 0
    for t in tensors:
        ne = list(reversed(t.shape))
        parts += [_string(t.name), struct.pack(f"<I{len(ne)}Q", len(ne), *ne), struct.pack("<IQ", int(t.qtype), offset)]
        offset += t.nbytes + _pad(t.nbytes, alignment)
    head = b"".join(parts)
    return head + bytes(_pad(len(head), alignment))


def alignment_of(metadata: dict[str, MetaValue]) -> int:
    item = metadata.get("general.alignment")
    return int(item.value) if item is not None else DEFAULT_ALIGNMENT


SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
_SPLIT_NAME = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_path(path: Union[str, os.PathLike], index: int, count: int) -> Path:
    """llama.cpp's name of shard ``index`` (0-based) of ``count``: ``NAME-00001-of-00003.gguf``."""
    path = Path(path)
    stem = path.name[: -len(".gguf")] if path.name.endswith(".gguf") else path.name
    return path.with_name(f"{stem}-{index + 1:05d}-of-{count:05d}.gguf")


def plan_splits(tensors: list[LazyTensor], max_size: Optional[int], alignment: int = DEFAULT_ALIGNMENT) -> list[list[LazyTensor]]:
    """Group tensors into shards as llama.cpp's gguf-split does: start a new shard when the next
    tensor's padded size would push this shard's data past ``max_size`` (never leaving one empty)."""
    if not max_size:
        return [tensors]
    shards: list[list[LazyTensor]] = [[]]
    used = 0
    for t in tensors:
        size = t.nbytes + _pad(t.nbytes, alignment)
        if shards[-1] and used + size > max_size:
            shards.append([])
            used = 0
        shards[-1].append(t)
        used += size
    return shards


def write(
    path: Union[str, os.PathLike],
    checkpoint: Checkpoint,
    on_tensor: Optional[Callable[[LazyTensor], None]] = None,
    split_max_size: Optional[int] = None,
) -> list[Path]:
    """Stream ``checkpoint`` into GGUF at ``path``; returns the files written.

    With ``split_max_size`` (bytes of tensor data per file) and more data than that, the output is
    llama.cpp's split layout: ``NAME-00001-of-0000N.gguf``, all metadata in the first file, the
    ``split.*`` keys in each. ``on_tensor`` is called after each tensor is written (progress).
    Nothing appears at the target names unless every file was written completely.
    """
    alignment = alignment_of(checkpoint.metadata)
    metadata = {k: v for k, v in checkpoint.metadata.items() if k not in SPLIT_KEYS}
    shards = plan_splits(list(checkpoint.tensors), split_max_size, alignment)
    if len(shards) == 1:
        targets = [Path(path)]
        headers = [metadata]
    else:
        n, total = len(shards), sum(len(s) for s in shards)
        targets = [split_path(path, i, n) for i in range(n)]
        split_meta = lambda i: {  # noqa: E731
            "split.no": MetaValue(GGUFValueType.UINT16, i),
            "split.count": MetaValue(GGUFValueType.UINT16, n),
            "split.tensors.count": MetaValue(GGUFValueType.INT32, total),
        }
        headers = [{**(metadata if i == 0 else {}), **split_meta(i)} for i in range(n)]
    with atomic_writes(targets) as files:
        for f, header, shard in zip(files, headers, shards):
            f.write(encode_header(header, shard, alignment))
            for t in shard:
                _write_tensor(f, t, alignment)
                if on_tensor is not None:
                    on_tensor(t)
    return targets


def _write_tensor(f: BinaryIO, t: LazyTensor, alignment: int) -> None:
    written = 0
    for piece in t.iter_bytes():
        data = np.ascontiguousarray(piece).reshape(-1).view(np.uint8)
        f.write(memoryview(data))
        written += data.size
    if written != t.nbytes:
        raise FormatError(f"tensor {t.name}: produced {written} bytes, expected {t.nbytes}")
    f.write(bytes(_pad(written, alignment)))
